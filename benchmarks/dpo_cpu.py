"""LoRA DPO training throughput and peak memory on CPU: newtune vs TRL 1.16's DPOTrainer.

Same model, same data, same machine, same run:
  * Model: SmolLM2-135M-Instruct from the quickstart's GGUF file, dequantized to float32 and
    saved once as a plain HF folder (benchmarks/train_cpu.py's `ensure_model`); both tools load
    that folder. LoRA r=16, alpha=32, dropout 0.05 on all linear layers for both; the
    reference model is the base with the adapter switched off (both tools do this with LoRA).
  * Data: `--steps x --batch` text preference rows (prompt, chosen, rejected) whose prompt and
    completion lengths are lognormal (prompt median ~30 words, completions ~50 words). newtune
    reads them as `type: preference`, TRL gets the same rows; both tokenize them to the same ids
    (checked: same token total of prompt+chosen and prompt+rejected).
  * Training: sigmoid DPO, beta 0.1, micro batch `--batch` pairs, sequence_len `--seq-len`,
    `--steps` optimizer steps, AdamW (`adamw_torch`) lr 5e-6, constant schedule, no gradient
    accumulation, seed 42, float32 (TRL with `bf16=False`; newtune's CPU default).
Configurations: newtune padded, packed (`sample_packing: true`: under sdpa each pair is packed
around one copy of its prompt), packed with `precompute_ref_log_probs: true`, and that with
gradient checkpointing; TRL's DPOTrainer with its defaults (gradient checkpointing on, live
reference), with gradient checkpointing off, with its fastest settings (gradient checkpointing
off, `precompute_ref_log_probs=True`; TRL's `padding_free` is disabled in 1.16), and with its
leanest (gradient checkpointing on, precomputed reference). Speed compares like with like: live
reference against live, precomputed against precomputed; memory compares equal checkpointing.
Each configuration runs in a fresh process with `--threads` torch/OMP threads, so its peak RSS
(ru_maxrss, the whole process: model load, reference log-probs, training) is its own. A callback
timestamps every optimizer step and a wrapper around `Trainer.training_step` counts the tokens of
each batch; the first `--warmup` steps are left out. Real tokens are the non-pad tokens of a batch
(the attention mask, or for packed rows everything but the trailing padding segment); computed
tokens are every position the model runs on. Time covers data loading, the policy's forward and
backward, the live reference forward when there is one, and the optimizer; precomputing the
reference log-probs happens before step 1 in both tools and is not in the time.

Run: python benchmarks/dpo_cpu.py [--batch 2 --steps 6 --warmup 2 --threads 2]
(needs `pip install trl` and the quickstart model: bash examples/quickstart/run.sh). Each
configuration's process loads the model, prepares the data and trains; on a quiet machine the
defaults should stay under ~8 minutes, but on a CPU shared with other jobs a step can take 50x
longer (measured: 1.5 s alone, 50-100 s shared), so check the load before trusting the numbers.
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
from train_cpu import LORA, SEED, WORDS, ensure_model  # noqa: E402 - same model and LoRA

LR = 5e-6
BETA = 0.1
RUNS = {  # name -> (tool, label)
    "newtune-pad": ("newtune", "newtune, padded (sample_packing: false), live reference"),
    "newtune-pack": ("newtune", "newtune, packed (sample_packing: true), live reference"),
    "newtune-pack-pre": ("newtune", "newtune, packed, precompute_ref_log_probs: true"),
    "newtune-pack-pre-gc": (
        "newtune",
        "newtune, packed, precompute_ref_log_probs: true, gradient_checkpointing: true",
    ),
    "trl-default": ("trl", "TRL DPOTrainer defaults (padded, gradient checkpointing on)"),
    "trl-nogc": ("trl", "TRL, gradient_checkpointing=False, live reference"),
    "trl-best": ("trl", "TRL, gradient_checkpointing=False, precompute_ref_log_probs=True"),
    "trl-gc-pre": ("trl", "TRL, gradient checkpointing on, precompute_ref_log_probs=True"),
}


# ---------------------------------------------------------------------------------------------
# Data (parent process)


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def preference_rows(n: int, tok: Any, seq_len: int) -> tuple[list[dict[str, str]], int]:
    """n text pairs with lognormal prompt/completion lengths; (rows, tokens of both sequences)."""
    rng = random.Random(0)
    rows, total = [], 0
    for _ in range(n):
        prompt = _words(rng, max(8, round(rng.lognormvariate(math.log(30), 0.5))))
        row = {"prompt": prompt}
        for side in ("chosen", "rejected"):
            words = max(4, round(rng.lognormvariate(math.log(50), 0.6)))
            while True:  # prompt + completion + EOS must fit sequence_len
                text = " " + _words(rng, words)
                length = len(tok(prompt + text)["input_ids"]) + 1
                if length <= seq_len:
                    break
                words -= max(1, length - seq_len)
            row[side] = text
            total += length
        rows.append(row)
    return rows, total


# ---------------------------------------------------------------------------------------------
# Measurement (child process, the same for both tools)


def batch_tokens(inputs: dict[str, Any], pad_id: int) -> tuple[int, int]:
    """(real, computed) tokens of one batch as the model receives it."""
    ids = inputs["input_ids"]
    computed = ids.numel()
    if "attention_mask" in inputs and inputs["attention_mask"].dim() == 2:  # padded rows
        return int(inputs["attention_mask"].sum()), computed
    # newtune's packed rows: `position_ids` restart at 0 per sequence; a row shorter than the
    # widest ends in one padding segment (pad ids, no label), marked -1 in `sequence_index`.
    # With shared prompts a pair is `prompt | chosen | prompt[-1] | rejected`: its real tokens
    # (prompt+chosen and prompt+rejected, as TRL counts them) are the unit's tokens plus
    # len(prompt) - 1, the position of the repeated prompt token.
    positions, labels = inputs["position_ids"], inputs["labels"]
    real = 0
    for row in range(ids.shape[0]):
        last = int((positions[row] == 0).nonzero().flatten()[-1])
        pad_tail = (
            last > 0
            and bool((labels[row, last:] == -100).all())
            and bool((ids[row, last:] == pad_id).all())
        )
        real += last if pad_tail else ids.shape[1]
        if "label_sequence" in inputs:  # shared prompts: count each prompt twice, as TRL runs it
            pos = positions[row]
            bridge = (pos[1:] > 0) & (pos[1:] <= pos[:-1])  # a pair's rejected part starts
            real += int(pos[1:][bridge].sum())  # the bridge stands at len(prompt) - 1
    return real, computed


def instrument(record: dict[str, Any]) -> None:
    """Wrap transformers.Trainer so that any trainer times its steps and counts batch tokens."""
    from transformers import Trainer, TrainerCallback

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            record["times"] = [time.perf_counter()]

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001, ANN003, ANN201
            record["times"].append(time.perf_counter())

    train, training_step = Trainer.train, Trainer.training_step

    def timed_train(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        self.add_callback(StepTimer())
        data = self.train_dataset
        prompt = [len(x) for x in data["prompt_ids"]]
        record["dataset_tokens"] = sum(
            2 * p + len(c) + len(r)
            for p, c, r in zip(prompt, data["chosen_ids"], data["rejected_ids"], strict=True)
        )
        record["dataset_rows"] = len(data)
        record["gradient_checkpointing"] = bool(
            self.args.gradient_checkpointing or self.model.is_gradient_checkpointing
        )
        record["trainable"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        record["base_dtype"] = str(self.model.get_input_embeddings().weight.dtype)
        record["precomputed"] = "ref_chosen_logps" in data.column_names
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
        "rl": "dpo",
        "rl_beta": BETA,
        "datasets": [{"path": spec["data"], "type": "preference"}],
        "dataset_prepared_path": str(work / "prepared"),
        "val_set_size": 0,
        "sequence_len": spec["seq_len"],
        "sample_packing": spec["name"] != "newtune-pad",
        "precompute_ref_log_probs": spec["name"].startswith("newtune-pack-pre"),
        "gradient_checkpointing": spec["name"].endswith("-gc"),
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
        "output_dir": str(work / "out"),
    }
    path = work / "config.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    setup_logging(debug=False)
    train(load_config(str(path)))


def run_trl(spec: dict[str, Any], work: Path) -> None:
    """TRL's DPOTrainer on the same rows, defaults unless the configuration changes them."""
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(spec["data"]).read_text().splitlines()]
    args = DPOConfig(
        output_dir=str(work / "out"),
        beta=BETA,
        max_length=spec["seq_len"],
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
        bf16=False,
        gradient_checkpointing=spec["name"] in ("trl-default", "trl-gc-pre"),
        precompute_ref_log_probs=spec["name"] in ("trl-best", "trl-gc-pre"),
        model_init_kwargs={"dtype": torch.float32},
        dataset_num_proc=1,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = DPOTrainer(
        model=spec["model"],
        args=args,
        train_dataset=datasets.Dataset.from_list(rows),
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
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        (run_newtune if spec["tool"] == "newtune" else run_trl)(spec, Path(tmp))
    record["wall_s"] = time.perf_counter() - start
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
        sys.exit(f"{spec['name']} failed with exit code {proc.returncode}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def summarize(record: dict[str, Any], warmup: int) -> dict[str, Any]:
    """Tokens per second over the steps after the warm-up."""
    times, batches = record["times"], record["batches"]
    if len(batches) != len(times) - 1:
        raise RuntimeError(f"{len(batches)} batches for {len(times) - 1} optimizer steps")
    measured = batches[warmup:]
    seconds = times[-1] - times[warmup]  # times[k]: end of step k (times[0]: train start)
    real, computed = (sum(b[i] for b in measured) for i in range(2))
    return {
        "steps": len(measured),
        "seconds": seconds,
        "s_per_step": seconds / len(measured),
        "real_per_s": real / seconds,
        "computed_per_s": computed / seconds,
        "efficiency": real / computed,
        "rss": record["peak_rss_mb"],
        "record": record,
    }


def cpu_line() -> str:
    """The CPU model and whether it has bf16 instructions (lscpu)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    except OSError:
        return "CPU: unknown (no lscpu)"
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (x.partition(":") for x in out.splitlines())
    )
    flags = set(fields.get("Flags", "").split())
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return (
        f"CPU: {fields.get('Model name', '?')}, {os.cpu_count()} logical CPUs visible; "
        f"bf16 instructions: {', '.join(bf16) if bf16 else 'none'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=6, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="first steps left out")
    parser.add_argument("--batch", type=int, default=2, help="micro batch (pairs per step)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", nargs="+", default=list(RUNS), choices=list(RUNS))
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "newtune-bench"))
    parser.add_argument("--verbose", action="store_true", help="show each run's log")
    opts = parser.parse_args()
    if opts.child:
        child(json.loads(opts.child))
        return
    if opts.steps <= opts.warmup:
        parser.error("--steps must be larger than --warmup")
    print(cpu_line(), flush=True)
    cache = Path(opts.cache)
    cache.mkdir(parents=True, exist_ok=True)
    model = ensure_model(cache)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    n = opts.steps * opts.batch  # one epoch: precomputing covers only the rows trained on
    rows, tokens = preference_rows(n, tok, opts.seq_len)
    data = cache / f"prefs-{n}-{opts.seq_len}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"data: {n} text pairs, {tokens:,} tokens in prompt+chosen and prompt+rejected")
    results: dict[str, dict[str, Any]] = {}
    for name in opts.runs:
        spec = {
            "name": name,
            "tool": RUNS[name][0],
            "model": str(model),
            "data": str(data),
            "seq_len": opts.seq_len,
            "batch": opts.batch,
            "steps": opts.steps,
            "threads": opts.threads,
        }
        start = time.perf_counter()
        results[name] = summarize(launch(spec, opts.verbose), opts.warmup)
        print(
            f"  {name:<16} {results[name]['real_per_s']:>7.1f} real tok/s, peak RSS "
            f"{results[name]['rss']:.0f} MB ({time.perf_counter() - start:.0f} s in all)",
            flush=True,
        )
    print_table(opts, results, tokens)


def print_table(opts: argparse.Namespace, results: dict[str, dict[str, Any]], tokens: int) -> None:
    """One row per configuration, with speed and memory against TRL's defaults and best."""
    print(
        f"\nSmolLM2-135M-Instruct fp32, LoRA r{LORA['r']} all-linear, sigmoid DPO; "
        f"{opts.threads} threads; micro batch {opts.batch} pairs, sequence_len {opts.seq_len}; "
        f"{opts.steps} steps, first {opts.warmup} left out\n"
    )
    head = (
        f"{'run':<16} {'s/step':>7} {'real tok/s':>10} {'computed tok/s':>14} "
        f"{'real/computed':>13} {'peak RSS MB':>11} {'tok/s vs TRL default':>20} "
        f"{'tok/s vs TRL best':>17} {'RSS vs TRL best':>15}"
    )
    print(head)
    print("-" * len(head))
    default, best = results.get("trl-default"), results.get("trl-best")
    notes = []
    for name, s in results.items():
        vs_default = f"{s['real_per_s'] / default['real_per_s']:.2f}x" if default else "-"
        vs_best = f"{s['real_per_s'] / best['real_per_s']:.2f}x" if best else "-"
        rss_best = f"{s['rss'] / best['rss']:.2f}x" if best else "-"
        print(
            f"{name:<16} {s['s_per_step']:>7.2f} {s['real_per_s']:>10.1f} "
            f"{s['computed_per_s']:>14.1f} {s['efficiency']:>13.3f} {s['rss']:>11.0f} "
            f"{vs_default:>20} {vs_best:>17} {rss_best:>15}"
        )
        rec = s["record"]
        same = (
            "same token total as the data"
            if rec["dataset_tokens"] == tokens
            else f"DATA MISMATCH: {rec['dataset_tokens']:,} tokens vs {tokens:,}"
        )
        notes.append(
            f"{name}: {RUNS[name][1]}; base {rec['base_dtype']}, {rec['trainable']:,} trainable; "
            f"gradient checkpointing {rec['gradient_checkpointing']}; reference log-probs in the "
            f"data: {rec['precomputed']}; {rec['dataset_rows']} pairs ({same}); {s['steps']} steps "
            f"timed over {s['seconds']:.1f} s; process {rec['wall_s']:.0f} s"
        )
    print("\n" + "\n".join(notes))


if __name__ == "__main__":
    main()
