"""Hostile and careless configs: bounded YAML and downloads, secrets kept out, no code from URLs."""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from newtune.config import load as config_load
from newtune.config import load_config, resolve
from newtune.errors import ConfigError

TOKEN = "hf_" + "Zq7Rk2Wm" * 4
BASE = """\
base_model: ./model
datasets:
  - path: data.jsonl
    type: alpaca
learning_rate: 0.001
"""


def cli(
    *args: str, cwd: Path | None = None, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run `newtune ARGS` in a fresh interpreter."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=120,
    )


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The error of a failed command: exit 2, no traceback, one line."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    err = proc.stderr[proc.stderr.index("newtune: error: ") :]
    assert err.endswith("\n") and err.count("\n") == 1, err
    return err


def write(tmp_path: Path, text: str, name: str = "cfg.yml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def alias_bomb(levels: int = 9) -> str:
    """`a: &a [x x9]`, `b: &b [*a x9]`, ...: 9**levels values from a few hundred bytes."""
    lines = ["a: &a [" + ",".join(["x"] * 9) + "]"]
    names = "abcdefghijklmnop"
    for prev, name in zip(names, names[1:levels], strict=False):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


# --- 1. bounded YAML: aliases, nesting, recursion ------------------------------------------


def test_alias_bomb_is_refused_in_bounded_time(tmp_path):
    text = alias_bomb()
    assert len(text) < 400
    start = time.monotonic()
    proc = cli("validate", str(write(tmp_path, text)))
    err = error_line(proc)
    assert time.monotonic() - start < 60
    assert (
        f"cfg.yml, line 6: the YAML has more than {config_load.MAX_YAML_NODES:,} values once its "
        in err
    )
    assert "aliases (`*name`)" in err and proc.stdout == ""


def test_alias_bomb_in_an_override_is_refused(tmp_path):
    flow = "[&a [x,x,x,x,x,x,x,x,x]"
    for prev, name in zip("abcdefgh", "bcdefghi", strict=True):
        flow += f", &{name} [" + ",".join([f"*{prev}"] * 9) + "]"
    proc = cli("validate", str(write(tmp_path, BASE)), f"--datasets={flow}]")
    err = error_line(proc)
    assert "newtune: error: --datasets, line 1: the YAML has more than 100,000 values once" in err


def test_small_aliases_still_work(tmp_path):
    text = BASE + "lora_target_modules: &mods [q_proj, v_proj]\nlora_modules_to_save: *mods\n"
    cfg = load_config(str(write(tmp_path, text))).config
    assert cfg.lora_modules_to_save == ["q_proj", "v_proj"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: " + "[" * 10000 + "]" * 10000 + "\n", "cfg.yml: the YAML is nested more than 100"),
        (
            "".join("  " * i + f"k{i}:\n" for i in range(150)) + "  " * 150 + "v\n",
            "cfg.yml, line 101: the YAML is nested more than 100 levels deep",
        ),
    ],
    ids=["flow", "block"],
)
def test_deep_nesting_is_a_clear_error(tmp_path, text, expected):
    err = error_line(cli("validate", str(write(tmp_path, text))))
    assert expected in err and "RecursionError" not in err


def test_deep_nesting_with_the_pure_python_parser(tmp_path, monkeypatch):
    monkeypatch.setattr(config_load, "_LOADER", yaml.SafeLoader)
    text = "a: " + "[" * 10000 + "]" * 10000 + "\n"
    with pytest.raises(ConfigError, match="nested more than 100 levels deep"):
        load_config(str(write(tmp_path, text)))


def test_aliases_that_nest_deeper_than_the_limit(tmp_path):
    # 10 anchors of 15 levels each: 150 levels only once the aliases are followed
    lines = ["a0: &a0 " + "[" * 15 + "x" + "]" * 15]
    lines += [f"a{i}: &a{i} " + "[" * 15 + f"*a{i - 1}" + "]" * 15 for i in range(1, 10)]
    with pytest.raises(ConfigError, match="nested more than 100 levels deep"):
        load_config(str(write(tmp_path, "\n".join(lines) + "\n")))


def test_recursive_alias_is_refused(tmp_path):
    err = error_line(cli("validate", str(write(tmp_path, BASE + "tokens: &t [a, *t]\n"))))
    assert "cfg.yml, line 6: an alias (`*name`) refers to a collection that contains it" in err


def test_local_config_over_1_mib_is_refused(tmp_path):
    path = write(tmp_path, BASE + "# " + "x" * (1 << 20) + "\n")
    err = error_line(cli("validate", str(path)))
    assert f"Config file {path} is larger than 1 MiB" in err


# --- 2. duplicate keys ----------------------------------------------------------------------


def test_duplicate_keys_name_the_key_and_both_lines(tmp_path):
    path = write(tmp_path, BASE + "seed: 3\nlearning_rate: 0.01\n")
    err = error_line(cli("validate", str(path)))
    assert (
        f"{path}: `learning_rate` is set twice in one mapping, on line 5 and line 7; "
        "YAML would silently keep only the last. Keep one of them."
    ) in err
    entry = BASE.replace("    type: alpaca\n", "    type: alpaca\n    type: completion\n")
    err = error_line(cli("validate", str(write(tmp_path, entry))))
    assert "`datasets[0].type` is set twice in one mapping, on line 4 and line 5" in err


def test_merge_keys_may_repeat_what_they_merge(tmp_path):
    text = BASE + "x_defaults: &d {seed: 1}\n"
    data, _ = config_load.parse_yaml(text + "more:\n  <<: *d\n  seed: 2\n", "cfg")
    assert data["more"] == {"seed": 2}


# --- 3 and 4. downloads: redirects obey the first URL's rule, one deadline in all ------------


class _Handler(http.server.BaseHTTPRequestHandler):
    """/cfg.yml: a config; /hop: redirect to /cfg.yml; /away: redirect off loopback; /slow."""

    body = BASE.encode()
    away = "http://example.com/cfg.yml"
    slow_stop = threading.Event()

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        port = self.server.server_address[1]
        if self.path == "/cfg.yml":
            self._send(200, self.body)
        elif self.path in ("/hop", "/away"):
            target = f"http://127.0.0.1:{port}/cfg.yml" if self.path == "/hop" else self.away
            self.send_response(302)
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/slow":  # one byte every 0.3 s: each read is quick, the whole is not
            self.send_response(200)
            self.send_header("Content-Length", str(len(self.body)))
            self.end_headers()
            for byte in self.body:
                if self.slow_stop.wait(0.3):
                    return
                try:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                except OSError:
                    return
        else:
            self._send(404, b"")

    def _send(self, code: int, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        """Quiet."""


@pytest.fixture
def server():
    """A loopback HTTP server; yields its base URL."""
    _Handler.slow_stop.clear()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    _Handler.slow_stop.set()
    httpd.shutdown()
    httpd.server_close()


def test_redirect_within_loopback_is_followed(server):
    assert load_config(f"{server}/hop").config.base_model == "./model"


def test_redirect_from_loopback_to_plain_http_elsewhere_is_refused(server, monkeypatch):
    import socket

    real = socket.create_connection

    def loopback_only(address, *args, **kwargs):
        assert address[0] == "127.0.0.1", f"connected to {address}"
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", loopback_only)
    with pytest.raises(ConfigError) as info:
        load_config(f"{server}/away")
    assert str(info.value) == (
        f"Refusing to download the config {server}/away: {server}/away redirects (HTTP 302) to "
        "http://example.com/cfg.yml, and every redirect must be https, or http to "
        "localhost/127.0.0.1/::1. Use the final https URL, or download the file and pass its "
        "local path."
    )


def test_redirect_from_loopback_through_the_cli(server):
    err = error_line(cli("validate", f"{server}/away"))
    assert f"redirects (HTTP 302) to {_Handler.away}, and every redirect must be https" in err


def test_an_https_url_may_only_redirect_to_https():
    assert config_load._url_allowed("https://example.com/c.yml", loopback_http=False)
    assert not config_load._url_allowed("http://127.0.0.1/c.yml", loopback_http=False)
    assert not config_load._url_allowed("http://example.com/c.yml", loopback_http=True)
    assert not config_load._url_allowed("ftp://127.0.0.1/c.yml", loopback_http=True)
    assert config_load._url_allowed("http://localhost:8/c.yml", loopback_http=True)


def test_download_time_limit_is_on_the_whole_download(server, monkeypatch, capsys):
    from newtune.cli.main import main

    monkeypatch.setattr(config_load, "URL_TIMEOUT_S", 1.5)
    start = time.monotonic()
    with pytest.raises(SystemExit) as info:
        main(["validate", f"{server}/slow"])
    elapsed = time.monotonic() - start
    assert info.value.code == 2
    assert elapsed < 5, elapsed  # the body alone takes 0.3 s x 70 bytes = 21 s
    err = capsys.readouterr().err
    assert err == (
        f"newtune: error: Could not download the config {server}/slow: it did not arrive within "
        "1.5 s (the limit is on the whole download). Check the server, or download the file and "
        "pass its local path.\n"
    )


# --- 5. secrets -----------------------------------------------------------------------------


def test_token_given_to_a_bool_key_is_not_echoed(tmp_path):
    path = write(tmp_path, BASE)
    err = error_line(cli("validate", str(path), f"--hf_use_auth_token={TOKEN}"))
    assert TOKEN not in err and "Zq7Rk2Wm" not in err
    assert (
        "`hf_use_auth_token` (--hf_use_auth_token): Input should be a valid boolean, unable to "
        "interpret input (got a str, not shown because it looks like a token or key)"
    ) in err
    err = error_line(cli("validate", str(write(tmp_path, BASE + f"hf_use_auth_token: {TOKEN}\n"))))
    assert TOKEN not in err and f"`hf_use_auth_token` ({path}, line 6)" in err


@pytest.mark.parametrize(
    "extra",
    [
        f"datasets:\n  - path: data.jsonl\n    type: {TOKEN}\n",  # a format error naming the type
        f"wandb_api_key: {TOKEN}\n",  # an unknown key
        f"bfloat16: {TOKEN}\nbf16: false\n",  # a legacy spelling in conflict
        f"special_tokens: {TOKEN}\n",  # a type error on a mapping key
        f"lora_target_modules: {{a: {TOKEN}}}\n",  # a value repr
    ],
    ids=["format", "unknown-key", "legacy", "type", "nested"],
)
def test_no_error_path_prints_a_token(tmp_path, extra):
    text = "base_model: ./model\n" + extra if extra.startswith("datasets") else BASE + extra
    proc = cli("validate", str(write(tmp_path, text)))
    err = error_line(proc)
    assert "Zq7Rk2Wm" not in proc.stderr + proc.stdout, err


def test_log_lines_do_not_print_tokens(tmp_path):
    text = BASE + f"hub_model_id: me/{TOKEN}\n"
    proc = cli("validate", str(write(tmp_path, text)))
    assert proc.returncode == 0, proc.stderr
    assert "Zq7Rk2Wm" not in proc.stdout + proc.stderr
    assert "hub_model_id: me/<redacted>" in proc.stdout


def test_secret_keys_are_redacted_and_other_token_keys_kept():
    from newtune.config.secrets import REDACTED, redact

    data = {
        "tokenizer_config": "./tok",
        "tokens": ["<a>", "<b>"],
        "special_tokens": {"pad_token": "<pad>", "eos_token": "</s>"},
        "eot_tokens": ["<|im_end|>"],
        "hf_use_auth_token": True,
        "wandb_api_key": "abc123",
        "mlflow": {"api_key": "k", "token": "t", "password": "p"},
        "note": f"x {TOKEN} y",
    }
    assert redact(data) == {
        **data,
        "wandb_api_key": REDACTED,
        "mlflow": {"api_key": REDACTED, "token": REDACTED, "password": REDACTED},
        "note": f"x {REDACTED} y",
    }


# --- 6. no code from a URL without --allow_plugins -------------------------------------------


PLUGIN = """\
from pathlib import Path
Path(__file__).with_name("IMPORTED").write_text("yes")

def load(entry, train_on_inputs):
    raise RuntimeError("not for this test")
"""


@pytest.fixture
def plugin_config(tmp_path):
    """A served config whose dataset format is a plugin that leaves a marker when imported."""
    pkg = tmp_path / "pkgs" / "myformats"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(PLUGIN)
    text = BASE.replace("type: alpaca", "type: myformats.load")
    _Handler.body = text.encode()
    yield {"PYTHONPATH": str(tmp_path / "pkgs")}, pkg / "IMPORTED"
    _Handler.body = BASE.encode()


def test_config_from_url_may_not_import_plugins(server, plugin_config, tmp_path):
    env, marker = plugin_config
    url = f"{server}/cfg.yml"
    for command in ("validate", "preprocess"):
        err = error_line(cli(command, url, env=env, cwd=tmp_path))
        assert (
            f"`datasets[0].type: myformats.load` ({url}, line 4) names a plugin format, whose code "
            f"would be imported and run; but this config came from a URL ({url}), and a config "
            "from a URL may not make newtune import or run code unless you allow it: pass "
            "--allow_plugins on the command line"
        ) in err
        assert not marker.exists()
    proc = cli("validate", url, "--allow_plugins", env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "type: myformats.load" in proc.stdout


def test_local_config_keeps_plugins(tmp_path, plugin_config):
    env, _ = plugin_config
    path = write(tmp_path, BASE.replace("type: alpaca", "type: myformats.load"))
    proc = cli("validate", str(path), env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr


def test_config_from_url_may_not_trust_remote_code(server):
    _Handler.body = (BASE + "trust_remote_code: true\n").encode()
    try:
        url = f"{server}/cfg.yml"
        err = error_line(cli("validate", url))
        assert f"`trust_remote_code: true` ({url}, line 6) would run code from the model" in err
        assert "pass --allow_plugins on the command line" in err
        assert load_config(url, allow_plugins=True).config.trust_remote_code is True
        assert load_config(url, {"allow_plugins": True}).config.trust_remote_code is True
    finally:
        _Handler.body = BASE.encode()


def test_allow_plugins_takes_no_value(tmp_path):
    err = error_line(cli("validate", str(write(tmp_path, BASE)), "--allow_plugins=maybe"))
    assert "--allow_plugins is a flag and takes no value (got 'maybe')" in err


# --- 7, 8, 9. overrides name the flag; did-you-mean threshold; no hard wrap -----------------


def test_override_errors_name_the_flag(tmp_path):
    path = write(tmp_path, BASE)
    err = error_line(cli("validate", str(path), "--learning_rate=-1"))
    assert "`learning_rate` (--learning_rate): Input should be greater than 0 (got -1)" in err
    assert "line 5" not in err
    err = error_line(cli("validate", str(path), "--datasets.0.shards=none"))
    assert "`datasets[0].shards` (--datasets.0.shards): " in err
    err = error_line(cli("validate", str(path), "--datasets=[{path: x, shards: none}]"))
    assert "`datasets[0].shards` (--datasets): " in err
    err = error_line(cli("validate", str(path), "--lerning_rate=0.1"))
    assert "unknown key `lerning_rate` (--lerning_rate) (did you mean `learning_rate`?)" in err


def test_did_you_mean_only_suggests_close_keys(tmp_path):
    text = BASE + "use_liger_everywhere: true\nhybrid_attn_mode: true\nlerning_rate: 0.1\n"
    err = error_line(cli("validate", str(write(tmp_path, text))))
    assert (
        "unknown key `use_liger_everywhere` (" in err and "unknown key `hybrid_attn_mode` (" in err
    )
    assert err.count("did you mean") == 1
    assert "unknown key `lerning_rate` (" in err and "(did you mean `learning_rate`?)" in err


def test_errors_are_not_hard_wrapped(tmp_path):
    text = BASE + "adam_eps: 1e-6\n"
    proc = cli("validate", str(write(tmp_path, text)))
    err = error_line(proc)
    assert len(err) > 120 and "use `adam_epsilon` (AdamW epsilon)" in err


# --- 10. the saved config is the config ------------------------------------------------------


def test_saved_config_validates_and_reproduces_the_run(tmp_path):
    text = BASE + (
        "tokenizer_config: ./tok\ntokens: ['<a>']\nspecial_tokens: {pad_token: '<pad>'}\n"
        "eot_tokens: ['<|im_end|>']\nmicro_batch_size: 2\nbatch_size: 8\n"
        "hf_use_auth_token: true\nflash_attention: false\nsdp_attention: true\n"
    )
    original = load_config(str(write(tmp_path, text)), {"seed": 7})
    saved = write(tmp_path, config_load.dump_config(original.config), "saved.yml")
    body = saved.read_text()
    assert "<redacted>" not in body and "batch_size: null" not in body
    assert "special_tokens:\n  pad_token: <pad>\n" in body and "seed: 7\n" in body
    proc = cli("validate", str(saved))
    assert proc.returncode == 0, proc.stderr
    again = load_config(str(saved))
    assert again.config == original.config
    assert again.config.model_fields_set == original.config.model_fields_set
    assert resolve(again.config).as_dict() == resolve(original.config).as_dict()


def test_saved_config_redacts_real_secrets_only(tmp_path):
    text = BASE.replace("path: data.jsonl", f"path: https://host/{TOKEN}/d.jsonl")
    original = load_config(str(write(tmp_path, text + "tokens: ['<a>']\n"))).config
    body = config_load.dump_config(original)
    assert TOKEN not in body and "path: https://host/<redacted>/d.jsonl" in body
    assert "tokens:\n- <a>\n" in body


def test_train_saves_a_config_that_validates(tmp_path, model_dir):
    import json

    data = tmp_path / "alpaca.jsonl"
    rows = [{"instruction": "Name a color.", "input": "", "output": "Blue."}] * 8
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = {
        "base_model": str(model_dir),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "batch_size": 4,
        "max_steps": 1,
        "tokens": ["<extra>"],
        "special_tokens": {"pad_token": "<pad>"},
    }
    path = write(tmp_path, yaml.safe_dump(cfg))
    proc = cli("train", str(path))
    assert proc.returncode == 0, proc.stderr
    saved = tmp_path / "out" / "newtune_config.yml"
    assert "<redacted>" not in saved.read_text()
    proc = cli("validate", str(saved))
    assert proc.returncode == 0, proc.stderr
    assert load_config(str(saved)).config == load_config(str(path)).config
