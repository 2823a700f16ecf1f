"""Trust (issue 13), models side: clear errors for broken model folders, remote code and a
missing adapter; chat templates below models; no hidden state on the tokenizer; quiet optional
packages; dependency floors; merge-lora streams with bounded memory."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from conftest import write_jsonl
from safetensors import safe_open
from test_merge import QV, _Tok, assert_same, build, gpt2, llama, peft_merged

from newtune.models import streaming_merge
from newtune.models.merge import merge_lora

ROOT = Path(__file__).resolve().parents[1]
ALPACA = [{"instruction": "Name a color.", "input": "", "output": c} for c in ("Blue.", "Red.")] * 4


def cli(*args: str) -> subprocess.CompletedProcess:
    """`newtune ARGS` in a fresh process (offline, one thread)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def config(tmp_path: Path, base: Path, **extra) -> Path:
    """A tiny LoRA alpaca config on `base`; returns its path."""
    data = write_jsonl(tmp_path / "data.jsonl", ALPACA)
    cfg = {
        "base_model": str(base),
        "datasets": [{"path": str(data), "type": "alpaca"}],
        "dataset_prepared_path": str(tmp_path / "prepared"),
        "output_dir": str(tmp_path / "out"),
        "sequence_len": 64,
        "micro_batch_size": 2,
        "max_steps": 1,
        "adapter": "lora",
        "lora_target_modules": ["q_proj", "v_proj"],
        **extra,
    }
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def assert_user_error(proc: subprocess.CompletedProcess, *parts: str) -> str:
    """Exit 2, one `newtune: error:` paragraph containing `parts`, no traceback."""
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    error = proc.stderr.split("newtune: error: ", 1)[1]
    flat = " ".join(error.split())
    for part in parts:
        assert part in flat, flat
    return flat


def copy_model(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


# 1. merge-lora without an adapter


@pytest.mark.parametrize("state", ["missing", "full model", "empty", "lora_model_dir"])
def test_merge_lora_without_an_adapter_names_the_folder_and_the_fix(tmp_path, model_dir, state):
    out = tmp_path / "out"
    args: list[str] = []
    if state == "full model":
        copy_model(model_dir, out)
    elif state == "empty":
        out.mkdir()
    elif state == "lora_model_dir":
        (tmp_path / "adapter").mkdir()
        args = [f"--lora_model_dir={tmp_path / 'adapter'}"]
    proc = cli("merge-lora", str(config(tmp_path, model_dir)), *args)
    if state == "lora_model_dir":
        assert_user_error(
            proc,
            f"merge-lora: `lora_model_dir: {tmp_path / 'adapter'}` holds no LoRA adapter "
            "(no adapter_config.json).",
            "Point `--lora_model_dir=DIR` at a folder written by `newtune train`",
        )
    else:
        what = {
            "missing": "does not exist",
            "full model": "holds a full model (config.json), which needs no merge",
            "empty": "holds no LoRA adapter (no adapter_config.json)",
        }[state]
        assert_user_error(
            proc,
            f"merge-lora: `output_dir: {out}` {what}",
            "Train the adapter first (`newtune train` with `adapter: lora` writes it to "
            "`output_dir`), or pass `--lora_model_dir=DIR` with an adapter folder.",
        )
    assert not (out / "merged").exists()
    assert out.exists() is (state in ("full model", "empty"))
    if out.exists():
        assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


# 2. a broken config.json in a local model folder


@pytest.mark.parametrize("case", ["truncated", "no model_type", "unknown model_type", "a list"])
def test_a_broken_model_config_json_is_named_with_its_problem(tmp_path, model_dir, case):
    base = copy_model(model_dir, tmp_path / "base")
    path = base / "config.json"
    text = path.read_text()
    data = json.loads(text)
    if case == "truncated":
        path.write_text(text[: text.index('"model_type"') + 5])
    elif case == "no model_type":
        del data["model_type"]
        path.write_text(json.dumps(data))
    elif case == "unknown model_type":
        path.write_text(json.dumps({**data, "model_type": "llamalike"}))
    else:
        path.write_text("[1, 2]")
    proc = cli("train", str(config(tmp_path, base)))
    expected = {
        "truncated": f"`base_model: {base}`: {path} is not valid JSON (Unterminated string "
        "starting at: line ",
        "no model_type": f"`base_model: {base}`: {path} has no `model_type` key",
        "unknown model_type": f"`base_model: {base}`: {path} names `model_type: llamalike`, "
        "which transformers",
        "a list": f"`base_model: {base}`: {path} holds a JSON list, not an object",
    }[case]
    message = assert_user_error(proc, expected)
    assert "is not a local folder" not in message
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_a_truncated_config_json_is_named_by_merge_lora_too(tmp_path, model_dir):
    base, adapter = build(tmp_path, llama(), QV)
    (base / "config.json").write_text('{"model_type": "lla')
    from newtune.errors import ModelError

    with pytest.raises(ModelError, match=r"config.json is not valid JSON \(Unterminated string"):
        merge_lora(str(base), str(adapter), tmp_path / "merged", "float32", _Tok())
    assert not (tmp_path / "merged").exists()


# 3. a model or tokenizer that needs its own code


MODELING = """
from transformers import LlamaConfig, LlamaForCausalLM
class TinyConfig(LlamaConfig):
    model_type = "tinycustom"
class TinyModel(LlamaForCausalLM):
    config_class = TinyConfig
"""


def custom_model(model_dir: Path, dest: Path, part: str) -> Path:
    """A copy of the tiny model whose config (or tokenizer) points at code in the folder."""
    base = copy_model(model_dir, dest)
    if part == "model":
        data = json.loads((base / "config.json").read_text())
        data["model_type"] = "tinycustom"
        data["auto_map"] = {
            "AutoConfig": "modeling_tiny.TinyConfig",
            "AutoModelForCausalLM": "modeling_tiny.TinyModel",
        }
        (base / "config.json").write_text(json.dumps(data))
        (base / "modeling_tiny.py").write_text(MODELING)
    else:
        data = json.loads((base / "tokenizer_config.json").read_text())
        data["tokenizer_class"] = "TinyTokenizer"
        data["auto_map"] = {"AutoTokenizer": [None, "tokenization_tiny.TinyTokenizer"]}
        (base / "tokenizer_config.json").write_text(json.dumps(data))
        (base / "tokenization_tiny.py").write_text(
            "from transformers import PreTrainedTokenizerFast\n"
            "class TinyTokenizer(PreTrainedTokenizerFast):\n    pass\n"
        )
    return base


@pytest.mark.parametrize(
    ("part", "module"), [("model", "modeling_tiny.py"), ("tokenizer", "tokenization_tiny.py")]
)
def test_remote_code_without_trust_remote_code_names_the_key(tmp_path, model_dir, part, module):
    base = custom_model(model_dir, tmp_path / "base", part)
    proc = cli("train", str(config(tmp_path, base)))
    assert_user_error(
        proc,
        f"`base_model: {base}` needs Python code that ships with the model folder ({module}), "
        "and `trust_remote_code` is off.",
        "Set `trust_remote_code: true` in the config only if you trust that code: transformers "
        f"then imports and runs it from {base} with your permissions.",
    )
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").glob("*.safetensors"))


def test_trust_remote_code_true_loads_the_custom_model(tmp_path, model_dir):
    from newtune.models.load import ModelOptions, load_model

    base = custom_model(model_dir, tmp_path / "base", "model")
    model = load_model(str(base), options=ModelOptions(trust_remote_code=True))
    assert type(model).__name__ == "TinyModel"


# 4./5. no hidden state on the tokenizer; models import no data code


def test_models_import_no_data_code_and_chat_templates_sit_below_both():
    code = (
        "import sys, newtune.models.tokenizer, newtune.models.load, newtune.models.merge;"
        "print(sorted(m for m in sys.modules if m.startswith('newtune.data')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"
    chat = (ROOT / "src/newtune/chat_templates.py").read_text()
    assert "from newtune.data" not in chat and "from newtune.models" not in chat
    assert not (ROOT / "src/newtune/data/templates.py").exists()


# 6. optional packages stay quiet


def test_train_prints_neither_bitsandbytes_nor_deepspeed_lines(tmp_path, model_dir):
    proc = cli("train", str(config(tmp_path, model_dir)))
    assert proc.returncode == 0, proc.stderr[-2000:]
    both = proc.stdout + proc.stderr
    assert "gemm_4bit_forward" not in both
    assert "Setting accelerator to CPU" not in both
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()


def test_the_filter_drops_exactly_the_known_lines():
    from newtune.quiet import quiet_optional_packages

    quiet_optional_packages()
    quiet_optional_packages()  # idempotent: one filter per logger
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    ds = logging.getLogger("DeepSpeed")

    def passes(logger: logging.Logger, msg: str, *args: str) -> bool:
        record = logger.makeRecord(logger.name, logging.WARNING, "x.py", 1, msg, args, None)
        return bool(logger.filter(record))

    assert sum(type(f).__name__ == "DropKnownLine" for f in bnb.filters) == 1
    assert sum(type(f).__name__ == "DropKnownLine" for f in ds.filters) == 1
    gemm = "Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please make sure"
    assert not passes(bnb, gemm, "No module named 'kernels'")
    assert passes(bnb, "another bitsandbytes warning")
    accel = "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable"
    assert not passes(ds, accel)
    assert passes(ds, "Setting ds_accelerator to cpu (auto detect)")


# 7. dependency floors and extras


def test_all_extra_leaves_out_the_test_tools_and_floors_are_transformers_5():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert all("dev" not in item for item in extras["all"])
    assert "trl>=1.16" in extras["dev"]
    deps = {d.split(">=")[0]: d for d in project["dependencies"]}
    assert deps["transformers"].startswith("transformers>=5.")
    from importlib.metadata import version

    from packaging.version import Version

    for name, spec in deps.items():
        if ">=" in spec:
            floor = spec.split(">=")[1].split(",")[0]
            assert Version(version(name)) >= Version(floor), spec


# 8. merge-lora streams shards: exact, block by block, bounded memory


@pytest.mark.parametrize(
    ("name", "model", "lora", "resize"),
    [
        ("llama q/v/down", llama, QV, None),
        (
            "embedding lora (transposed)",
            lambda: llama(True),
            {**QV, "target_modules": ["q_proj", "embed_tokens"]},
            None,
        ),
        (
            "conv1d fan_in_fan_out",
            gpt2,
            {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "fan_in_fan_out": True},
            None,
        ),
        ("resized embeddings", llama, {**QV, "modules_to_save": ["embed_tokens", "lm_head"]}, 100),
    ],
)
def test_streaming_merge_in_small_blocks_equals_peft(
    tmp_path, monkeypatch, name, model, lora, resize
):
    monkeypatch.setattr(streaming_merge, "BLOCK_BYTES", 300)  # several blocks per tensor
    cls = type(model())
    base, adapter = build(tmp_path, model(), lora, resize=resize, perturb=("modules_to_save",))
    expected = peft_merged(base, adapter, cls, resize=resize)
    out = merge_lora(str(base), str(adapter), tmp_path / "merged", "float32", _Tok())
    got = {k: v.detach() for k, v in cls.from_pretrained(out).state_dict().items()}
    assert_same(got, expected)
    for shard in streaming_merge.base_shards(out):
        with safe_open(str(out / shard), "pt") as f:  # an ordinary safetensors file
            assert f.metadata() == {"format": "pt"}
        raw = (out / shard).read_bytes()
        length = int.from_bytes(raw[:8], "little")
        assert length % 8 == 0  # data 8-byte aligned
        header = json.loads(raw[8 : 8 + length])
        header.pop("__metadata__")
        assert max(v["data_offsets"][1] for v in header.values()) == len(raw) - 8 - length


def test_a_truncated_base_shard_is_a_clear_error(tmp_path):
    from newtune.errors import ModelError

    base, adapter = build(tmp_path, llama(), QV)
    shard = base / streaming_merge.base_shards(base)[1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(ModelError, match=rf"{shard} is truncated"):
        merge_lora(str(base), str(adapter), tmp_path / "merged", "float32", _Tok())
    assert not (tmp_path / "merged").exists()


MEASURE = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from newtune.models.merge import merge_lora
    def status(key):
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024
    class Tok:
        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer_config.json").write_text("{}")
    before = status("VmRSS")
    open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from here
    merge_lora(sys.argv[1], sys.argv[2], Path(sys.argv[3]), "bfloat16", Tok())
    print(before, status("VmHWM"))
    """
)


def test_merge_peak_memory_stays_below_two_shards_over_the_imports(tmp_path):
    """Three 64 MiB bf16 shards: the merge adds less than two shards to the process's peak.

    Building each output shard in memory with fp32 copies of its tensors (the code before
    issue 13) added about 4.6 shards (295 MiB) here and failed this test.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    base = tmp_path / "base"
    base.mkdir()
    gen = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.down_proj.weight" for i in range(6)]
    weight_map = {}
    for i in range(3):  # 2 tensors of 4096 x 4096 bf16 (32 MiB) per shard
        pair = names[2 * i : 2 * i + 2]
        shard = {n: torch.randn(4096, 4096, generator=gen).bfloat16() for n in pair}
        save_file(shard, str(base / f"model-{i}.safetensors"), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, f"model-{i}.safetensors"))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    (base / "config.json").write_text(json.dumps({"model_type": "llama"}))
    adapter = tmp_path / "adapter"
    LoraConfig(r=8, lora_alpha=16, target_modules=["down_proj"]).save_pretrained(adapter)
    lora = {}
    for n in names:
        module = "base_model.model." + n.removesuffix(".weight")
        lora[f"{module}.lora_A.weight"] = torch.randn(8, 4096, generator=gen)
        lora[f"{module}.lora_B.weight"] = torch.randn(4096, 8, generator=gen)
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    shard_bytes = 2 * 4096 * 4096 * 2
    proc = subprocess.run(
        [sys.executable, "-c", MEASURE, str(base), str(adapter), str(tmp_path / "merged")],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    before, peak = map(int, proc.stdout.split()[-2:])
    assert peak <= before + 2 * shard_bytes, (before, peak)
    with safe_open(str(tmp_path / "merged" / "model-1.safetensors"), "pt") as f:
        merged = f.get_tensor(names[2]).float()
    module = "base_model.model." + names[2].removesuffix(".weight")
    a, b = lora[f"{module}.lora_A.weight"], lora[f"{module}.lora_B.weight"]
    with safe_open(str(base / "model-1.safetensors"), "pt") as f:
        want = (f.get_tensor(names[2]).float() + 2.0 * (b @ a)).bfloat16().float()
    torch.testing.assert_close(merged, want, atol=0.0, rtol=0.0)


def test_an_adapter_of_other_shapes_is_refused_before_anything_is_written(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from newtune.errors import ModelError

    base, _ = build(tmp_path / "small", llama(), QV)
    wide = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=96,
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    )
    _, adapter = build(tmp_path / "wide", wide, QV)
    with pytest.raises(
        ModelError,
        match=r"the adapter's update of model\.layers\.0\.mlp\.down_proj\.weight has shape "
        r"\[48, 64\], but the base tensor is \[32, 64\]",
    ):
        merge_lora(str(base), str(adapter), tmp_path / "merged", "float32", _Tok())
    assert not (tmp_path / "merged").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
