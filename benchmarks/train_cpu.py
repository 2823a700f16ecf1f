"""LoRA training throughput on CPU: newtune vs TRL's SFTTrainer, padded and packed.

Same model, same data, same machine, same run:
  * Model: SmolLM2-135M-Instruct, read once from the quickstart's GGUF file by newtune's own
    loader (dequantized, rebuilt as a plain Llama) and saved as an ordinary HF folder in
    `--cache`; both tools load that folder. LoRA r=16, alpha=32, dropout 0.05 on all linear
    layers (not the LM head) for both.
  * Data: `--rows` synthetic alpaca rows (instruction, optional input, output) whose token
    lengths are lognormal (median ~150, clipped to `--seq-len`). newtune reads them as
    `type: alpaca`; TRL gets prompt-completion rows holding the same alpaca prompt text. Both
    train on the output only and tokenize every row to the same ids (checked: same token total).
  * Training: micro batch `--batch`, sequence_len `--seq-len`, `--steps` optimizer steps, AdamW
    (`adamw_torch`) at lr 2e-4, constant schedule, no gradient accumulation, seed 42.
    newtune runs through its real path (`newtune.train.run.train` on a YAML config, with
    `sample_packing` off or on). TRL runs `SFTTrainer` with its defaults (padding, and its
    default gradient checkpointing) and with `packing=True` (TRL's bfd packing, padding-free).
  * Precision: `fp32` (weights and compute in float32; newtune's CPU default, TRL with
    `bf16=False`) and `bf16` (newtune `bf16: true`: bf16 base weights, bf16 autocast, fp32 LoRA
    weights; TRL `bf16=True` (its default) with the base loaded in bf16 too).
Each run is a fresh process with 2 torch/OMP threads (`--threads`). Both tools are measured by
the same code: a callback timestamps every optimizer step, and a wrapper around
`Trainer.training_step` counts the tokens of each batch it receives. The first `--warmup` steps
are left out; time runs from the end of the warm-up step to the end of the last step, so it
includes data loading, forward, backward and the optimizer. Real tokens are non-pad tokens (the
attention mask, or for packed rows everything but the trailing padding segment); computed
tokens are every position the model runs on (real + padding).

Runs alternate between tools (shared noise) and each configuration runs `--repeat` times; the
fastest counts. Defaults (micro batch 2, 7 steps, 4 runs) take about 6-7 minutes on 2 quiet cores.

Run: python benchmarks/train_cpu.py [--batch 2 --steps 7 --warmup 2 --precision fp32 bf16 --repeat 1]
(needs `pip install trl` and the quickstart model: bash examples/quickstart/run.sh)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from preprocess import alpaca_prompt  # noqa: E402 - the same prompt text in both benchmarks

GGUF = Path("examples/quickstart/model/SmolLM2-135M-Instruct.Q4_1.gguf")
MODEL_DIR = "SmolLM2-135M-Instruct-f32"
LR = 2e-4
LORA = {"r": 16, "alpha": 32, "dropout": 0.05}
SEED = 42
WORDS = [
    "the",
    "a",
    "of",
    "to",
    "and",
    "in",
    "is",
    "it",
    "that",
    "for",
    "on",
    "with",
    "as",
    "was",
    "at",
    "by",
    "be",
    "this",
    "from",
    "or",
    "have",
    "an",
    "they",
    "which",
    "one",
    "you",
    "were",
    "all",
    "we",
    "when",
    "there",
    "can",
    "been",
    "has",
    "more",
    "if",
    "will",
    "would",
    "about",
    "their",
    "what",
    "so",
    "up",
    "out",
    "into",
    "some",
    "time",
    "could",
    "them",
    "other",
    "than",
    "then",
    "now",
    "only",
    "its",
    "over",
    "also",
    "after",
    "use",
    "two",
    "how",
    "our",
    "work",
    "first",
    "well",
    "way",
    "even",
    "new",
    "want",
    "because",
    "any",
    "these",
    "give",
    "day",
    "most",
    "us",
    "model",
    "data",
    "river",
    "city",
    "garden",
    "music",
    "window",
    "energy",
    "number",
    "letter",
    "system",
    "paper",
    "light",
    "stone",
    "answer",
    "question",
    "train",
    "explain",
    "describe",
    "summary",
    "write",
    "list",
    "reason",
    "example",
    "people",
    "water",
    "history",
    "value",
    "language",
]
RUNS = {  # name -> (tool, packing, label)
    "newtune-pad": ("newtune", False, "newtune, padded (sample_packing: false)"),
    "newtune-pack": ("newtune", True, "newtune, packed (sample_packing: true)"),
    "trl-pad": ("trl", False, "TRL SFTTrainer defaults (padded, gradient checkpointing on)"),
    "trl-pad-nogc": ("trl", False, "TRL padded, gradient_checkpointing=False"),
    "trl-pack": ("trl", True, "TRL packing=True (bfd, padding-free, gradient checkpointing on)"),
    "trl-pack-nogc": ("trl", True, "TRL packing=True, gradient_checkpointing=False"),
}
DEFAULT_RUNS = ["newtune-pad", "newtune-pack", "trl-pad", "trl-pack"]


# ---------------------------------------------------------------------------------------------
# Setup (parent process)


def ensure_model(cache: Path) -> Path:
    """The quickstart GGUF, loaded by newtune and saved once as a plain float32 HF folder."""
    folder = cache / MODEL_DIR
    if (folder / "model.safetensors").is_file():
        return folder
    if not GGUF.is_file():
        sys.exit(f"{GGUF} is missing: run `bash examples/quickstart/run.sh` once first.")
    from transformers import AutoTokenizer

    from newtune.models.load import load_model

    print(f"converting {GGUF} to {folder} (once)", flush=True)
    model = load_model(str(GGUF))
    tmp = cache / f".tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name).save_pretrained(tmp)
    os.replace(tmp, folder)
    return folder


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def alpaca_rows(n: int, tok: Any, seq_len: int) -> tuple[list[dict], list[int]]:
    """n alpaca rows whose full token length is lognormal (median 150, sigma 0.6) <= seq_len."""
    rng = random.Random(0)
    rows, lengths = [], []
    for i in range(n):
        target = min(seq_len, max(48, round(rng.lognormvariate(math.log(150), 0.6))))
        instruction = _words(rng, rng.randint(5, 20))
        input_text = _words(rng, rng.randint(5, 40)) if i % 2 else ""
        prompt = len(tok(alpaca_prompt(instruction, input_text))["input_ids"])
        words = max(3, round((target - prompt - 1) / 1.15))
        while True:  # trim until prompt + output + EOS fits
            output = _words(rng, words)
            total = len(tok(alpaca_prompt(instruction, input_text) + output)["input_ids"]) + 1
            if total <= seq_len:
                break
            words -= max(1, total - seq_len)
        rows.append({"instruction": instruction, "input": input_text, "output": output})
        lengths.append(total)
    return rows, lengths


# ---------------------------------------------------------------------------------------------
# Measurement (child process, the same for both tools)


def batch_tokens(inputs: dict[str, Any], pad_id: int) -> tuple[int, int, int]:
    """(real, computed, trained) tokens of one batch as the model receives it.

    Padded batches: real = attention mask. Packed rows (no mask, `position_ids` restarting
    at 0 per sample): every position but a trailing segment that is pure padding (pad ids,
    no label), which newtune's collator appends to rows shorter than the batch's longest.
    """
    ids, labels = inputs["input_ids"], inputs["labels"]
    computed = ids.numel()
    trained = int((labels[:, 1:] != -100).sum())
    if "attention_mask" in inputs:
        return int(inputs["attention_mask"].sum()), computed, trained
    positions = inputs["position_ids"]
    real = 0
    for row in range(ids.shape[0]):
        starts = (positions[row] == 0).nonzero().flatten().tolist()
        last = starts[-1]
        pad_tail = (
            last > 0
            and bool((labels[row, last:] == -100).all())
            and bool((ids[row, last:] == pad_id).all())
        )
        real += last if pad_tail else ids.shape[1]
    return real, computed, trained


def instrument(record: dict[str, Any]) -> None:
    """Wrap transformers.Trainer so that any trainer times its steps and counts batch tokens."""
    from pyarrow import compute as pc
    from transformers import Trainer, TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            record["times"] = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            record["times"].append(time.perf_counter())

    train, training_step = Trainer.train, Trainer.training_step

    def timed_train(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        self.add_callback(StepTimer())
        column = self.train_dataset.with_format("arrow")["input_ids"]
        record["dataset_tokens"] = int(pc.sum(pc.list_value_length(column)).as_py())
        record["dataset_rows"] = len(self.train_dataset)
        record["gradient_checkpointing"] = bool(self.args.gradient_checkpointing)
        record["trainable"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        record["base_dtype"] = str(self.model.get_input_embeddings().weight.dtype)
        return train(self, *args, **kwargs)

    def counted_step(self, model, inputs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        pad_id = self.processing_class.pad_token_id
        record.setdefault("batches", []).append(batch_tokens(inputs, pad_id))
        return training_step(self, model, inputs, *args, **kwargs)

    Trainer.train, Trainer.training_step = timed_train, counted_step


def run_newtune(spec: dict[str, Any], work: Path) -> None:
    """newtune's real training path on a YAML config."""
    import yaml

    from newtune.cli.common import setup_logging
    from newtune.config.load import load_config
    from newtune.train.run import train

    config = {
        "base_model": spec["model"],
        "datasets": [{"path": spec["alpaca"], "type": "alpaca"}],
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0,
        "sequence_len": spec["seq_len"],
        "sample_packing": spec["packing"],
        "adapter": "lora",
        "lora_r": LORA["r"],
        "lora_alpha": LORA["alpha"],
        "lora_dropout": LORA["dropout"],
        "lora_target_linear": True,
        "micro_batch_size": spec["batch"],
        "gradient_accumulation_steps": 1,
        "max_steps": spec["steps"],
        "learning_rate": LR,
        "optimizer": "adamw_torch",
        "lr_scheduler": "constant",
        "logging_steps": 1,
        "seed": SEED,
        "bf16": spec["precision"] == "bf16",
        "output_dir": str(work / "out"),
    }
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    setup_logging(debug=False)
    train(load_config(str(path)))


def run_trl(spec: dict[str, Any], work: Path) -> None:
    """TRL's SFTTrainer on prompt-completion rows, defaults unless the comparison needs them."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    bf16 = spec["precision"] == "bf16"
    rows = [json.loads(line) for line in Path(spec["alpaca"]).read_text().splitlines()]
    pc_rows = [
        {"prompt": alpaca_prompt(r["instruction"], r["input"]), "completion": r["output"]}
        for r in rows
    ]
    args = SFTConfig(
        output_dir=str(work / "out"),
        max_length=spec["seq_len"],
        packing=spec["packing"],
        per_device_train_batch_size=spec["batch"],
        gradient_accumulation_steps=1,
        max_steps=spec["steps"],
        learning_rate=LR,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        seed=SEED,
        bf16=bf16,
        gradient_checkpointing=not spec["name"].endswith("-nogc"),
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
        dataset_num_proc=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = SFTTrainer(
        model=spec["model"],
        args=args,
        train_dataset=datasets.Dataset.from_list(pc_rows),
        processing_class=AutoTokenizer.from_pretrained(spec["model"]),
        peft_config=LoraConfig(
            r=LORA["r"],
            lora_alpha=LORA["alpha"],
            lora_dropout=LORA["dropout"],
            target_modules="all-linear",
            bias="none",
            task_type="CAUSAL_LM",
        ),
    )
    trainer.train()


def child(spec: dict[str, Any]) -> None:
    """Run one configuration and print its measurements as one JSON line."""
    import torch

    torch.set_num_threads(spec["threads"])
    record: dict[str, Any] = {}
    instrument(record)
    with tempfile.TemporaryDirectory() as tmp:
        (run_newtune if spec["tool"] == "newtune" else run_trl)(spec, Path(tmp))
    record["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print("RESULT " + json.dumps(record), flush=True)


# ---------------------------------------------------------------------------------------------
# Parent: schedule runs, summarize, print the table


def launch(spec: dict[str, Any], verbose: bool) -> dict[str, Any]:
    """Run one configuration in a fresh process; return its measurements."""
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if verbose or proc.returncode:
        sys.stderr.write(proc.stderr[-4000:])
    if proc.returncode:
        sys.exit(f"{spec['name']} ({spec['precision']}) failed with exit code {proc.returncode}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def summarize(record: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Tokens per second over the steps after the warm-up."""
    times, batches = record["times"], record["batches"]
    if len(batches) != len(times) - 1:
        raise RuntimeError(f"{len(batches)} batches for {len(times) - 1} optimizer steps")
    measured = batches[warmup:]
    seconds = times[-1] - times[warmup]  # times[k]: end of step k (times[0]: train start)
    real, computed, trained = (sum(b[i] for b in measured) for i in range(3))
    return {
        "steps": len(measured),
        "seconds": seconds,
        "s_per_step": seconds / len(measured),
        "real_per_step": real / len(measured),
        "real_per_s": real / seconds,
        "computed_per_s": computed / seconds,
        "efficiency": real / computed,
        "trained_per_s": trained / seconds,
        "rss": record["peak_rss_mb"],
        "record": record,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=7, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=2, help="micro batch (rows per step)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--runs", nargs="+", default=DEFAULT_RUNS, choices=list(RUNS))
    parser.add_argument("--repeat", type=int, default=1, help="runs per configuration; best counts")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "newtune-bench"))
    parser.add_argument("--verbose", action="store_true", help="show each run's log")
    opts = parser.parse_args()
    if opts.child:
        child(json.loads(opts.child))
        return
    if opts.steps <= opts.warmup:
        parser.error("--steps must be larger than --warmup")
    cache = Path(opts.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = ensure_model(cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    rows, lengths = alpaca_rows(opts.rows, tok, opts.seq_len)
    data = cache / f"alpaca-{opts.rows}-{opts.seq_len}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ordered = sorted(lengths)
    print(
        f"data: {opts.rows} alpaca rows, {sum(lengths):,} tokens; length median "
        f"{ordered[len(ordered) // 2]}, mean {sum(lengths) / len(lengths):.0f}, "
        f"max {ordered[-1]} (sequence_len {opts.seq_len})",
        flush=True,
    )
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for _ in range(opts.repeat):
        for precision in opts.precision:
            for name in opts.runs:
                tool, packing, _label = RUNS[name]
                spec = {
                    "name": name,
                    "tool": tool,
                    "packing": packing,
                    "precision": precision,
                    "model": str(model),
                    "alpaca": str(data),
                    "seq_len": opts.seq_len,
                    "batch": opts.batch,
                    "steps": opts.steps,
                    "threads": opts.threads,
                }
                start = time.perf_counter()
                summary = summarize(launch(spec, opts.verbose), opts.warmup)
                results.setdefault((precision, name), []).append(summary)
                print(
                    f"  {precision} {name:<14} {summary['real_per_s']:>7.1f} real tok/s "
                    f"({time.perf_counter() - start:.0f} s in all)",
                    flush=True,
                )
    print_table(opts, results, sum(lengths))


def print_table(
    opts: argparse.Namespace, results: dict[tuple[str, str], list[dict]], tokens: int
) -> None:
    """One row per (precision, run): the fastest repeat."""
    print(
        f"\nSmolLM2-135M-Instruct, LoRA r{LORA['r']} all-linear; {opts.threads} threads; "
        f"micro batch {opts.batch}, sequence_len {opts.seq_len}; {opts.steps} steps, first "
        f"{opts.warmup} left out; best of {opts.repeat}\n"
    )
    head = (
        f"{'precision':<9} {'run':<14} {'s/step':>7} {'real tok/step':>13} {'real tok/s':>10} "
        f"{'computed tok/s':>14} {'real/computed':>13} {'peak RSS MB':>11} {'vs TRL pad':>10} "
        f"{'vs TRL pack':>11}"
    )
    print(head)
    print("-" * len(head))
    notes = []
    for precision in opts.precision:
        best = {
            name: max(results[(precision, name)], key=lambda s: s["real_per_s"])
            for name in opts.runs
            if (precision, name) in results
        }
        pad = best.get("trl-pad")
        pack = best.get("trl-pack")
        for name, s in best.items():
            vs_pad = f"{s['real_per_s'] / pad['real_per_s']:.2f}x" if pad else "-"
            vs_pack = f"{s['real_per_s'] / pack['real_per_s']:.2f}x" if pack else "-"
            print(
                f"{precision:<9} {name:<14} {s['s_per_step']:>7.2f} {s['real_per_step']:>13.0f} "
                f"{s['real_per_s']:>10.1f} {s['computed_per_s']:>14.1f} "
                f"{s['efficiency']:>13.3f} {s['rss']:>11.0f} {vs_pad:>10} {vs_pack:>11}"
            )
            rec = s["record"]
            same = (
                "same token total as the data"
                if rec["dataset_tokens"] == tokens
                else (f"DATA MISMATCH: {rec['dataset_tokens']:,} tokens vs {tokens:,}")
            )
            notes.append(
                f"{precision} {name}: {RUNS[name][2]}; base weights {rec['base_dtype']}, "
                f"{rec['trainable']:,} trainable; trained {rec['dataset_rows']} rows "
                f"({same}); {s['steps']} steps timed over {s['seconds']:.1f} s"
            )
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
