"""Run five of Axolotl's example configs for 2 training steps on tiny local models, offline.

Run from the repository root with the venv active, on an Axolotl checkout (not copied here):

    python benchmarks/axolotl_examples_run.py PATH [--keep]

For each example in EXAMPLES (five model families), it builds in a temp working directory:
a byte-level BPE tokenizer with the family's special tokens (trained in about a second), a
2-layer model of the real base model's `model_type` (hidden size 64) saved beside it, and the
config's datasets as `<datasets[i].path>/train.jsonl`: a few synthetic rows in the real
dataset's schema. newtune reads a relative `path` that is a local folder before it asks the hub,
as `datasets.load_dataset` does, so the config runs unedited. Then it runs

    newtune train PATH/examples/<config> --base_model=<tiny dir> --max_steps=2 <overrides>

with the working directory in that temp folder, and only the overrides this CPU machine needs,
each printed with its reason. It prints one table: config, family, overrides, exit code, the
loss at steps 1 and 2, and seconds; it exits 1 unless every run exited 0 with 2 logged steps,
finite losses and a saved adapter or model.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

HIDDEN = 64
CORPUS = [
    "Below is an instruction that describes a task, paired with an input that provides "
    "further context. Write a response that appropriately completes the request.",
    "### Instruction:\n### Input:\n### Response:\n",
    "The capital of France is Paris. The capital of Veloria is Brintmoor.",
    "Hello there! How are you? I am fine, thank you. What is the answer? Blue, red, green.",
    "system user assistant model human gpt You are a terse assistant. Name a color.",
    "0123456789 the quick brown fox jumps over the lazy dog. plus equals sum of",
]


@dataclass(frozen=True)
class Family:
    """A model family's tiny stand-in: transformers `model_type` and tokenizer tokens."""

    model_type: str
    bos: str | None
    eos: str
    pad: str | None
    extra: tuple[str, ...] = ()
    add_bos: bool = True
    chat_template: str | None = None  # the tokenizer's own template, as on the hub


CHATML_TEMPLATE = (  # the shape of Qwen2.5's own template (ChatML), without tools
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

FAMILIES: dict[str, Family] = {
    "llama": Family(
        "llama",
        bos="<|begin_of_text|>",
        eos="<|end_of_text|>",
        pad=None,
        extra=("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    ),
    "mistral": Family("mistral", bos="<s>", eos="</s>", pad=None, extra=("<unk>",)),
    "qwen2": Family(
        "qwen2",
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=("<|im_start|>",),
        add_bos=False,
        chat_template=CHATML_TEMPLATE,
    ),
    "qwen3": Family(
        "qwen3",
        bos=None,
        eos="<|im_end|>",
        pad="<|endoftext|>",
        extra=("<|im_start|>", "<think>", "</think>"),
        add_bos=False,
    ),
    "gemma2": Family(
        "gemma2",
        bos="<bos>",
        eos="<eos>",
        pad="<pad>",
        extra=("<unk>", "<start_of_turn>", "<end_of_turn>"),
    ),
    "phi3": Family(
        "phi3",
        bos="<s>",
        eos="<|endoftext|>",
        pad="<|endoftext|>",
        extra=("<unk>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        add_bos=False,
    ),
}


def build_tokenizer(folder: Path, family: Family) -> Any:
    """A byte-level BPE tokenizer with the family's special tokens, trained in about a second."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(t for t in (family.pad, family.bos, family.eos) if t))
    specials += [t for t in family.extra if t not in specials]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400 + len(specials),
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    if family.add_bos and family.bos:
        bos_id = tok.token_to_id(family.bos)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{family.bos} $A",
            pair=f"{family.bos} $A {family.bos} $B",
            special_tokens=[(family.bos, bos_id)],
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=family.bos,
        eos_token=family.eos,
        pad_token=family.pad,
        unk_token="<unk>" if "<unk>" in specials else None,
    )
    if family.chat_template:
        fast.chat_template = family.chat_template
    fast.save_pretrained(folder)
    return fast


def build_model(folder: Path, family: Family) -> Path:
    """A 2-layer, hidden-64 model of `family.model_type` and its tokenizer, saved in `folder`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = build_tokenizer(folder, family)
    ids = {
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
        "pad_token_id": tok.pad_token_id,
    }
    config = AutoConfig.for_model(
        family.model_type,
        vocab_size=len(tok),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HIDDEN // 4,
        max_position_embeddings=4096,
        **ids,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return folder


# Synthetic rows in each dataset's real schema (columns as on the hub).
def alpaca_rows(n: int) -> list[dict[str, Any]]:
    """instruction / input / output rows, as mhenrichsen/alpaca_2k_test and GPT4-LLM-Cleaned."""
    return [
        {
            "instruction": f"What is {i % 7} plus {i % 5}?",
            "input": "" if i % 3 else "Answer with the sum.",
            "output": f"The sum of {i % 7} and {i % 5} is {i % 7 + i % 5}.",
        }
        for i in range(n)
    ]


def sharegpt_rows(n: int) -> list[dict[str, Any]]:
    """`conversations` of {from, value} (system/human/gpt), as FineTome-100k and SlimOrca."""
    return [
        {
            "conversations": [
                {"from": "system", "value": "You are a terse assistant."},
                {"from": "human", "value": f"What is {i % 7} plus {i % 5}?"},
                {"from": "gpt", "value": f"The answer is {i % 7 + i % 5}."},
            ],
            "source": "synthetic",
            "score": 4.5,
        }
        for i in range(n)
    ]


def messages_rows(n: int) -> list[dict[str, Any]]:
    """`messages` of {role, content}, as fozziethebeat/alpaca_messages_2k_test."""
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i % 7} plus {i % 5}?"},
                {"role": "assistant", "content": f"The answer is {i % 7 + i % 5}."},
            ]
        }
        for i in range(n)
    ]


@dataclass(frozen=True)
class Example:
    """One Axolotl example config, the family of its base model and its datasets' schema."""

    config: str  # relative to the Axolotl checkout
    family: str  # key of FAMILIES: the real base model's `model_type`
    rows: Callable[[int], list[dict[str, Any]]]


EXAMPLES = [
    Example("examples/llama-3/lora-1b.yml", "llama", alpaca_rows),
    Example("examples/mistral/lora.yml", "mistral", alpaca_rows),
    Example("examples/deepcogito/cogito-v1-preview-qwen-14B-lora.yml", "qwen2", messages_rows),
    Example("examples/gemma2/qlora.yml", "gemma2", sharegpt_rows),
    Example("examples/phi/lora-3.5.yaml", "phi3", messages_rows),
]
# Run only when `--only` names them: `chat_template: qwen3` (a template newtune renders itself)
EXTRA_EXAMPLES = [
    Example("examples/qwen3/32b-qlora.yaml", "qwen3", sharegpt_rows),
]
ROWS = 200
SEQUENCE_LEN = 256


def attention_for(model_type: str) -> str:
    """`sdpa` when transformers has an sdpa path for the family's model class, else `eager`."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    return "sdpa" if cls._supports_sdpa else "eager"


TORCHAO_OPTIMIZERS = {"adamw_torch_4bit", "adamw_torch_8bit", "adamw_torch_fp8"}
LORA_KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")


def cpu_overrides(cfg: dict[str, Any], family: Family, out: Path) -> list[tuple[str, Any, str]]:
    """The overrides this CPU machine (and newtune) need for `cfg`, each with its reason."""
    found: list[tuple[str, Any, str]] = [
        ("output_dir", str(out), "keep the run's output in the temp folder"),
    ]
    if cfg.get("attn_implementation") == "flash_attention_2" or cfg.get("flash_attention"):
        attn = attention_for(family.model_type)
        why = "flash-attn needs CUDA"
        if attn == "eager":
            why += f"; transformers has no sdpa path for {family.model_type}, so eager"
        if "attn_implementation" in cfg:
            found.append(("attn_implementation", attn, why))
        else:
            found.append(("flash_attention", False, why))
    plugins = [str(p) for p in cfg.get("plugins") or []]
    if cfg.get("cut_cross_entropy") or any(p.endswith("CutCrossEntropyPlugin") for p in plugins):
        found.append(
            ("cut_cross_entropy", False, "Cut Cross Entropy's kernels are Triton GPU kernels")
        )
    if cfg.get("optimizer") in TORCHAO_OPTIMIZERS and importlib.util.find_spec("torchao") is None:
        found.append(("optimizer", "adamw_torch", f"{cfg['optimizer']} needs torchao, not here"))
    for key in LORA_KERNELS:
        if cfg.get(key):
            found.append(
                (
                    key,
                    False,
                    "Axolotl's own Triton LoRA kernel; newtune trains LoRA with peft and its "
                    "`train` refuses the key",
                )
            )
    if (cfg.get("sequence_len") or 0) > SEQUENCE_LEN:
        found.append(
            (
                "sequence_len",
                SEQUENCE_LEN,
                f"2 steps fill from {ROWS} synthetic rows and stay short on CPU",
            )
        )
    return found


def prepare_data(cfg: dict[str, Any], example: Example, workdir: Path) -> list[str]:
    """Write each dataset of `cfg` as `<path>/train.jsonl` under `workdir`; return the paths."""
    written = []
    for entry in cfg.get("datasets") or []:
        folder = workdir / entry["path"]
        folder.mkdir(parents=True, exist_ok=True)
        rows = example.rows(ROWS)
        (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        written.append(entry["path"])
    return written


@dataclass
class Result:
    """One run: what was run and what it logged."""

    example: Example
    overrides: list[tuple[str, Any, str]]
    code: int = -1
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    saved: list[str] = field(default_factory=list)
    problem: str = ""
    tail: str = ""
    trains: str = ""

    @property
    def ok(self) -> bool:
        """Exit 0, 2 logged steps with finite losses, and saved weights."""
        return not self.problem


SAVED = ("adapter_model.safetensors", "model.safetensors")


def expected_rows(entry: dict[str, Any]) -> int:
    """Rows newtune should read from a dataset of ROWS rows: all, or its `split` slice."""
    split = str(entry.get("split") or "train")
    if "[" not in split:
        return ROWS
    import datasets

    (part,) = datasets.ReadInstruction.from_spec(split).to_absolute({split.partition("[")[0]: ROWS})
    return part.to - part.from_


def check(result: Result, out: Path, expected: list[int] | None = None) -> None:
    """Fill losses/saved from the run's output_dir and name the first problem; `expected`:
    the rows per dataset (default ROWS each)."""
    history_file = out / "log_history.json"
    history = json.loads(history_file.read_text()) if history_file.is_file() else []
    steps = {h["step"]: h["loss"] for h in history if "loss" in h}
    result.losses = [steps[s] for s in sorted(steps)]
    result.saved = [n for n in SAVED if (out / n).is_file()]
    if result.code != 0:
        result.problem = f"exit code {result.code}"
    elif sorted(steps) != [1, 2]:
        result.problem = f"logged steps {sorted(steps)}, expected [1, 2]"
    elif not all(math.isfinite(x) for x in result.losses):
        result.problem = f"non-finite loss {result.losses}"
    elif not result.saved:
        result.problem = f"no {' or '.join(SAVED)} in {out}"
    elif not (rows := read_rows(out)) or rows != (expected or [ROWS] * len(rows)):
        result.problem = f"stats.json rows per dataset {rows}, expected {expected or ROWS}"


def read_rows(out: Path) -> list[int]:
    """Rows newtune read per dataset (stats.json): proves the local folder was used."""
    stats = out / "stats.json"
    return [d["rows"] for d in json.loads(stats.read_text())["datasets"]] if stats.is_file() else []


def run_one(root: Path, example: Example, workdir: Path) -> Result:
    """Build the tiny model and data, train 2 steps, check the output."""
    config = root / example.config
    cfg = yaml.safe_load(config.read_text())
    family = FAMILIES[example.family]
    model_dir = build_model(workdir / f"tiny-{family.model_type}", family)
    prepare_data(cfg, example, workdir)
    out = workdir / "out"
    overrides = cpu_overrides(cfg, family, out)
    args = [f"--base_model={model_dir}", "--max_steps=2"]
    args += [f"--{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v, _ in overrides]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    result = Result(example, overrides, trains=describe(cfg))
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "newtune.cli.main", "train", str(config), *args],
        cwd=workdir,
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    result.seconds = time.perf_counter() - start
    result.code = proc.returncode
    result.tail = (proc.stdout + proc.stderr)[-3000:]
    (workdir / "train.log").write_text(proc.stdout + proc.stderr)
    check(result, out, [expected_rows(d) for d in cfg.get("datasets") or []])
    return result


def describe(cfg: dict[str, Any]) -> str:
    """What the config trains: adapter, quantization, packing, data format."""
    parts = [cfg.get("adapter") or "full"]
    parts += [f"{bits}-bit" for bits in (8, 4) if cfg.get(f"load_in_{bits}bit")]
    parts += ["packed"] if cfg.get("sample_packing") else []
    parts += sorted({str(d.get("type")) for d in cfg.get("datasets") or []})
    return ", ".join(parts)


def show(value: Any) -> str:
    """An override value as typed on the command line."""
    return value if isinstance(value, str) else json.dumps(value)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run every example, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="root of an Axolotl checkout (holds examples/)")
    parser.add_argument("--keep", action="store_true", help="keep the temp folders")
    parser.add_argument("--only", help="run only the example whose config path contains this")
    args = parser.parse_args(argv)
    pool = EXAMPLES + EXTRA_EXAMPLES if args.only else EXAMPLES
    examples = [e for e in pool if not args.only or args.only in e.config]
    missing = [e.config for e in examples if not (args.path / e.config).is_file()]
    if missing:
        print(
            f"not in {args.path}: {', '.join(missing)}; pass an Axolotl checkout.", file=sys.stderr
        )
        return 2
    results = []
    for example in examples:
        workdir = Path(tempfile.mkdtemp(prefix="axolotl-example-"))
        try:
            result = run_one(args.path, example, workdir)
        finally:
            if not args.keep:
                shutil.rmtree(workdir, ignore_errors=True)
        results.append(result)
        print(f"\n== {example.config} ({example.family}) in {workdir}")
        print(f"   always: --base_model=<tiny {example.family} dir> --max_steps=2")
        for key, value, why in result.overrides:
            shown = "<tmp>/out" if key == "output_dir" else show(value)
            print(f"   --{key}={shown}: {why}")
        print(f"   -> {'ok' if result.ok else result.problem} ({result.seconds:.1f} s)")
        if not result.ok:
            print("   " + result.tail.replace("\n", "\n   "))
    print(
        "\n| config | family | trains | overrides (besides --base_model, --max_steps=2, "
        "--output_dir) | exit | loss step 1 | loss step 2 | saved | seconds |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        shown = ", ".join(f"{k}={show(v)}" for k, v, _ in r.overrides if k != "output_dir")
        loss = [f"{x:.4f}" for x in r.losses[:2]] + ["-", "-"]
        print(
            f"| {r.example.config.removeprefix('examples/')} | {r.example.family} | {r.trains} | "
            f"{shown or '(none)'} | {r.code} | {loss[0]} | {loss[1]} | "
            f"{', '.join(r.saved) or '-'} | {r.seconds:.1f} |"
        )
    failed = [r for r in results if not r.ok]
    print(f"\n{len(results) - len(failed)} of {len(results)} ran 2 steps end to end.")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
