"""Config loading: unknown keys, Axolotl keys, overrides, error texts, remote YAML."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from newtune.config import load_config, resolve
from newtune.errors import ConfigError

REFERENCE = Path(__file__).parent / "data"  # axolotl-keys.txt: Axolotl's documented keys
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
    assert msg.startswith(f"{path} has 2 unknown key(s): ")
    assert f"unknown key `learning_rat` ({path}, line 5) (did you mean `learning_rate`?)" in msg
    assert f"unknown key `datasets[0].typ` ({path}, line 4) (did you mean `type`?)" in msg


def test_every_axolotl_key_left_null_validates(tmp_path):
    keys = (REFERENCE / "axolotl-keys.txt").read_text().split()
    essentials = {"base_model", "datasets"}
    text = BASE + "".join(f"{k}:\n" for k in keys if k not in essentials)
    cfg = load_config(write(tmp_path, text)).config
    assert cfg.base_model == "./model" and cfg.sample_packing is None


def test_not_implemented_key_with_value_says_what_to_do(tmp_path):
    msg = error_of(write(tmp_path, BASE + "s2_attention: true\ntorchdistx_path: x\n"))
    assert "`s2_attention: True` is not implemented by newtune; remove it" in msg
    assert "`torchdistx_path: 'x'` is not implemented by newtune; remove it" in msg
    assert "planned" not in msg and " work" not in msg


def test_unsupported_key_names_alternative(tmp_path):
    msg = error_of(write(tmp_path, BASE + "xformers_attention: true\n"))
    assert (
        "`xformers_attention: True` is not implemented by newtune; use `attn_implementation: sdpa` instead"
        in msg
    )


def test_every_dataset_entry_key_is_implemented():
    from newtune.config.schema import DatasetEntry, status_of

    assert {status_of(i)["status"] for i in DatasetEntry.model_fields.values()} == {"implemented"}


def test_off_values_and_ignored_keys_are_accepted(tmp_path):
    text = BASE + "sample_packing: false\nwandb_project:\nspecial_tokens: {}\nlocal_rank: 0\n"
    loaded = load_config(write(tmp_path, text))
    assert loaded.notes == ["`local_rank` is ignored: Set by the launcher."]


@pytest.mark.parametrize(
    ("legacy", "canonical", "value"),
    [
        ("flash_attention", "attn_implementation", "flash_attention_2"),
        ("sdp_attention", "attn_implementation", "sdpa"),
        ("bfloat16", "bf16", True),
        ("evaluation_strategy", "eval_strategy", "no"),
    ],
)
def test_legacy_spellings_map_with_a_note(tmp_path, monkeypatch, legacy, canonical, value):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: object() if n == "flash_attn" else real(n, *a)
    )
    given = "'no'" if legacy == "evaluation_strategy" else "true"
    loaded = load_config(write(tmp_path, BASE + f"{legacy}: {given}\n"))
    assert getattr(loaded.config, canonical) == value
    assert loaded.notes == [
        f"`{legacy}` is deprecated; read as `{canonical}: {value}` (write that instead)."
    ]


def test_legacy_conflicting_with_canonical(tmp_path):
    msg = error_of(write(tmp_path, BASE + "sdp_attention: true\nattn_implementation: eager\n"))
    assert (
        "`sdp_attention: True` (" in msg
        and "means `attn_implementation: 'sdpa'`, but `attn_implementation: 'eager'` is also set"
        in msg
    )


RULES = {
    "warmup": (
        "warmup_steps: 10\nwarmup_ratio: 0.1\n",
        "`warmup_steps` and `warmup_ratio` are both set; keep one of them",
    ),
    "evals": (
        "eval_steps: 10\nevals_per_epoch: 2\n",
        "`eval_steps` and `evals_per_epoch` are both set",
    ),
    "saves": (
        "save_steps: 10\nsaves_per_epoch: 2\n",
        "`save_steps` and `saves_per_epoch` are both set",
    ),
    "val": (
        "val_set_size: 0.1\ntest_datasets:\n  - path: t.jsonl\n    type: alpaca\n",
        "`val_set_size` and `test_datasets` are both set",
    ),
    "quant": (
        "load_in_8bit: true\nload_in_4bit: true\n",
        "`load_in_8bit` and `load_in_4bit` are both set; choose one quantization",
    ),
    "precision": (
        "bf16: true\nfp16: true\n",
        "`bf16` and `fp16` are both set; choose one precision",
    ),
    "legacy precision": (
        "bfloat16: true\nfp16: true\n",
        "`bfloat16` and `fp16` are both set; choose one precision",
    ),
    "batch": (
        "micro_batch_size: 2\ngradient_accumulation_steps: 2\nbatch_size: 4\n",
        "`micro_batch_size`, `gradient_accumulation_steps` and `batch_size` are all set; set at most two",
    ),
    "batch multiple": (
        "micro_batch_size: 3\nbatch_size: 4\n",
        "`batch_size: 4` is not a multiple of `micro_batch_size: 3`",
    ),
    "qlora": ("adapter: qlora\n", "`adapter: qlora` requires `load_in_4bit: true`"),
    "regex targets": (
        "adapter: lora\nlora_target_linear: true\nlora_target_modules: 'model.*proj'\n",
        "`lora_target_modules` is a regex string and `lora_target_linear: true` is set; Axolotl "
        "would read the regex as one literal module name",
    ),
    "packing and grouping": (
        "sample_packing: true\ngroup_by_length: true\n",
        "`sample_packing` and `group_by_length` are both set; packing already groups samples",
    ),
    "safetensors": (
        "save_safetensors: false\n",
        "`save_safetensors: false` asks for pickle weights",
    ),
}


@pytest.mark.parametrize("rule", sorted(RULES))
def test_rules_name_both_keys(tmp_path, rule):
    text, expected = RULES[rule]
    assert expected in error_of(write(tmp_path, BASE + text))


def test_flash_attention_missing_is_a_warning_with_pip_command(tmp_path):
    loaded = load_config(write(tmp_path, BASE + "attn_implementation: flash_attention_2\n"))
    assert loaded.notes == [
        "warning: `attn_implementation: flash_attention_2` needs the flash-attn package, which "
        "is not installed here; the machine that trains needs it (`pip install "
        "'newtune[flash-attn]'` or `pip install flash-attn --no-build-isolation`)."
    ]


def test_lora_keys_without_adapter_warn(tmp_path):
    loaded = load_config(write(tmp_path, BASE + "lora_r: 16\nlora_alpha: 32\n"))
    assert loaded.notes == [
        "warning: `lora_alpha`, `lora_r` set without `adapter`; they are ignored and all weights are trained."
    ]


def test_strict_limits_overrides_to_yaml_keys(tmp_path):
    path = write(tmp_path, BASE + "strict: true\nlearning_rate: 0.001\n")
    assert load_config(path, {"learning_rate": 0.01}).config.learning_rate == 0.01
    msg = error_of(path, {"micro_batch_size": 4})
    assert (
        "Override --micro_batch_size: `strict: true` allows overrides only of keys present in the YAML"
        in msg
    )


def test_string_overrides_stay_text(tmp_path):
    cfg = load_config(write(tmp_path, BASE), {"base_model": 123, "output_dir": "true"}).config
    assert cfg.base_model == "123" and cfg.output_dir == "true"


def test_secrets_are_redacted():
    from newtune.config.secrets import REDACTED, redact

    token = "hf_" + "a1B2" * 8
    out = redact(
        {
            "hub_model_id": "me/model",
            "wandb_api_key": "abc",
            "note": f"use {token} here",
            "datasets": [{"path": f"https://x/{token}"}],
            "lr": 1,
        }
    )
    assert out == {
        "hub_model_id": "me/model",
        "wandb_api_key": REDACTED,
        "note": f"use {REDACTED} here",
        "datasets": [{"path": f"https://x/{REDACTED}"}],
        "lr": 1,
    }


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


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server over tmp_path; yields its base URL."""

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(tmp_path), **kw)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_config_from_loopback_url(tmp_path, served):
    (tmp_path / "remote.yml").write_text(BASE)
    (tmp_path / "list.yml").write_text("- a\n")
    (tmp_path / "big.yml").write_text("# " + "x" * (1 << 20) + "\n" + BASE)
    assert load_config(f"{served}/remote.yml").config.base_model == "./model"
    msg = error_of(f"{served}/missing.yml")
    assert msg.startswith(
        f"Could not download the config {served}/missing.yml: the server answered HTTP 404"
    )
    assert "must be a YAML mapping" in error_of(f"{served}/list.yml")
    assert "is larger than 1 MiB" in error_of(f"{served}/big.yml")


def test_plain_http_to_other_hosts_is_refused_without_network(monkeypatch):
    import urllib.request

    def no_network(*args, **kwargs):
        raise AssertionError("a network request was made")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    msg = error_of("http://example.com/cfg.yml")
    assert msg.startswith(
        "Refusing to fetch the config over plain http from example.com: use an https:// URL"
    )


def test_unreachable_url_is_a_clear_error():
    msg = error_of("http://127.0.0.1:9/cfg.yml")  # discard port: nothing listens
    assert msg.startswith("Could not download the config http://127.0.0.1:9/cfg.yml: ")


def test_config_docs_are_up_to_date():
    from newtune.config.docs import render

    docs = Path(__file__).parent.parent / "docs" / "config.md"
    assert docs.read_text() == render(), "run: python -m newtune.config.docs > docs/config.md"


def test_null_means_default(tmp_path):
    text = BASE + "    split:\nsequence_len:\nlearning_rate:\nval_set_size:\n"
    cfg = load_config(write(tmp_path, text)).config
    assert (cfg.sequence_len, cfg.learning_rate, cfg.val_set_size) == (2048, 2e-5, 0.0)
    assert cfg.datasets[0].split == "train"


def test_plan_derives_accumulation_attention_adapter_and_paths(tmp_path):
    text = BASE + (
        "adapter: lora\nlora_r: 4\nlora_target_modules: [q_proj, v_proj]\n"
        "micro_batch_size: 2\nbatch_size: 8\noutput_dir: out\n"
    )
    plan = resolve(
        load_config(write(tmp_path, text)).config,
        env={"WORLD_SIZE": "2"},
        probe=lambda: ("cpu", False),
    )
    assert (plan.gradient_accumulation_steps, plan.effective_batch_size) == (4, 16)
    assert plan.attn_implementation == "sdpa" and plan.train_mode == "lora"
    assert plan.adapter == "lora r=4 alpha=16 dropout=0.0 on q_proj, v_proj"
    assert plan.datasets == ("data.jsonl (type: alpaca, split: train)",)
    assert (plan.output_dir, plan.merged_dir) == ("out", "out/merged")
