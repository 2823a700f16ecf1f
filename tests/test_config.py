"""Config loading: unknown keys, Axolotl keys, overrides, error texts, remote YAML."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from newtune.config import load_config, resolve
from newtune.errors import ConfigError

BASE = """\
base_model: ./model
datasets:
  - path: data.jsonl
    type: alpaca
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "cfg.yml"
    path.write_text(text)
    return str(path)


def error_of(path: str, overrides: dict | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    return str(info.value)


def test_minimal_config_defaults(tmp_path):
    cfg = load_config(write(tmp_path, BASE)).config
    assert cfg.base_model == "./model"
    assert cfg.datasets[0].type == "alpaca" and cfg.datasets[0].split == "train"
    assert (cfg.sequence_len, cfg.micro_batch_size, cfg.adapter, cfg.seed) == (2048, 1, None, 42)


def test_unknown_keys_listed_with_did_you_mean_and_line(tmp_path):
    path = write(
        tmp_path, BASE.replace("    type: alpaca\n", "    typ: alpaca\n") + "learning_rat: 0.1\n"
    )
    msg = error_of(path)
    assert msg.startswith(f"{path} has 2 problem(s): ")
    assert f"unknown key `learning_rat` ({path}, line 5) (did you mean `learning_rate`?)" in msg
    assert f"unknown key `datasets[0].typ` ({path}, line 4) (did you mean `type`?)" in msg


def test_axolotl_key_not_implemented_names_key(tmp_path):
    msg = error_of(write(tmp_path, BASE + "sample_packing: true\n"))
    assert "`sample_packing: True` (" in msg and "line 5" in msg
    assert "Axolotl key newtune does not implement yet; remove it or set it to null" in msg


def test_axolotl_keys_off_and_noop_are_accepted(tmp_path):
    text = BASE + "sample_packing: false\nwandb_project:\nspecial_tokens: {}\nlocal_rank: 0\n"
    loaded = load_config(write(tmp_path, text))
    assert loaded.notes == ["`local_rank` is ignored: set by the launcher."]


def test_false_that_is_a_choice_is_an_error(tmp_path):
    assert "`save_safetensors: False`" in error_of(
        write(tmp_path, BASE + "save_safetensors: false\n")
    )


def test_type_errors_name_key_path_and_line(tmp_path):
    text = BASE + "    train_on_eos: sometimes\nmicro_batch_size: 0\nadapter: qlora2\n"
    msg = error_of(write(tmp_path, text))
    assert (
        "`datasets[0].train_on_eos` (" in msg
        and "line 5): Input should be 'all', 'turn', 'last' or 'none' (got 'sometimes')" in msg
    )
    assert (
        "`micro_batch_size` (" in msg and "line 6): Input should be greater than 0 (got 0)" in msg
    )
    assert "`adapter` (" in msg and "(got 'qlora2')" in msg


def test_missing_base_model(tmp_path):
    msg = error_of(write(tmp_path, "datasets:\n  - path: d.jsonl\n    type: alpaca\n"))
    assert "`base_model` is required but missing" in msg


def test_overrides_are_parsed_like_yaml(tmp_path):
    path = write(tmp_path, BASE)
    cfg = load_config(
        path,
        {
            "learning_rate": "1e-4",
            "adapter": "lora",
            "lora_target_modules": "[q_proj, v_proj]",
            "datasets.0.type": "completion",
            "bf16": "auto",
            "max_steps": 3,
        },
    ).config
    assert cfg.learning_rate == 1e-4 and cfg.adapter == "lora" and cfg.max_steps == 3
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert cfg.datasets[0].type == "completion" and cfg.bf16 == "auto"


def test_override_unknown_key_is_an_error(tmp_path):
    msg = error_of(write(tmp_path, BASE), {"learnin_rate": 0.1})
    assert "unknown key `learnin_rate`" in msg and "did you mean `learning_rate`?" in msg


def test_override_missing_parent(tmp_path):
    msg = error_of(write(tmp_path, BASE), {"datasets.3.type": "x"})
    assert "Override --datasets.3.type: `datasets.3` does not exist in the config" in msg


def test_missing_file_and_bad_yaml(tmp_path):
    assert "Config file nope.yml does not exist" in error_of("nope.yml")
    assert "is not valid YAML" in error_of(write(tmp_path, "base_model: [unclosed\n"))
    assert "must be a YAML mapping" in error_of(write(tmp_path, "- a\n- b\n"))


def test_empty_adapter_means_full_finetune(tmp_path):
    cfg = load_config(write(tmp_path, BASE + "adapter:\n")).config
    assert cfg.adapter is None and resolve(cfg, env={}).train_mode == "full"


def test_resolve_plan(tmp_path):
    cfg = load_config(
        write(tmp_path, BASE + "micro_batch_size: 4\ngradient_accumulation_steps: 2\nbf16: auto\n")
    ).config
    plan = resolve(cfg, env={"WORLD_SIZE": "2", "RANK": "1"})
    assert plan.effective_batch_size == 16 and not plan.is_main_process
    assert plan.dtype == ("bfloat16" if plan.device == "cuda" else "float32")


def test_config_from_https_like_url(tmp_path):
    (tmp_path / "remote.yml").write_text(BASE)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        assert load_config(f"{url}/remote.yml").config.base_model == "./model"
        assert "Could not download the config" in error_of(f"{url}/missing.yml")
    finally:
        server.shutdown()


def test_config_docs_are_up_to_date():
    from newtune.config.docs import render

    docs = Path(__file__).parent.parent / "docs" / "config.md"
    assert docs.read_text() == render(), "run: python -m newtune.config.docs > docs/config.md"
