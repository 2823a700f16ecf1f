"""Preprocessing throughput: newtune's prepare vs TRL's SFTTrainer dataset preparation.

Same tokenizer (SmolLM2-135M-Instruct, from the quickstart's GGUF file), same machine, same run:
  * 20k alpaca rows: newtune `type: alpaca`; TRL prompt-completion rows holding the same alpaca
    prompt text (formatted before timing, which favours TRL), completion-only loss.
  * 2k conversations of 20 turns: newtune `type: chat_template` (assistant-only labels);
    TRL `messages` rows (TRL masks assistants only with `{% generation %}` templates, which
    SmolLM2's lacks, so TRL does strictly less work here).
A third row, `floor`, times only the Rust tokenizer encoding the already-rendered chat text
(CPU time / processes): no tool that must produce these ids can beat it, so it bounds the
speedup any chat preprocessor can show over TRL. Both get the same CPUs (`--procs`): TRL as
`dataset_num_proc` worker processes; newtune as `dataset_processes`, which below 25k rows
per process it spends on the Rust tokenizer's threads in one process instead of workers. newtune's time includes reading the JSONL file and
writing the cache; TRL's starts from an in-memory Dataset and writes nothing.

Each tool runs `--repeat` times (alternating) and its fastest run is reported.

Run: python benchmarks/preprocess.py [--rows 20000 --convs 2000 --procs 2 --repeat 3]
(needs `pip install trl` and the quickstart model: bash examples/quickstart/run.sh)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import datasets  # noqa: E402

MODEL = Path("examples/quickstart/model/SmolLM2-135M-Instruct.Q4_1.gguf")
WORDS = [
    "model",
    "data",
    "token",
    "train",
    "answer",
    "question",
    "river",
    "city",
    "blue",
    "green",
    "seven",
    "apple",
    "quick",
    "system",
    "paper",
    "light",
    "stone",
    "music",
    "garden",
    "window",
    "energy",
    "number",
    "letter",
]


def alpaca_prompt(instruction: str, input_text: str) -> str:
    """Axolotl's standard alpaca prompt (what newtune's `type: alpaca` builds)."""
    if input_text:
        return (
            "Below is an instruction that describes a task, paired with an input that provides "
            "further context. Write a response that appropriately completes the request.\n\n"
            f"### Instruction:\n{instruction}\n\n### Input:\n{input_text}\n\n### Response:\n"
        )
    return (
        "Below is an instruction that describes a task. Write a response that appropriately "
        f"completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
    )


def sentence(rng: random.Random, lo: int, hi: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi))).capitalize() + "."


def alpaca_rows(n: int) -> list[dict]:
    rng = random.Random(0)
    return [
        {
            "instruction": sentence(rng, 5, 20),
            "input": sentence(rng, 0, 30) if i % 2 else "",
            "output": sentence(rng, 10, 60),
        }
        for i in range(n)
    ]


def chat_rows(n: int, turns: int) -> list[dict]:
    rng = random.Random(1)
    return [
        {
            "messages": [
                {"role": "user" if t % 2 == 0 else "assistant", "content": sentence(rng, 5, 40)}
                for t in range(turns)
            ]
        }
        for _ in range(n)
    ]


def time_newtune(
    rows: list[dict], kind: str, tok, procs: int, tmp: Path
) -> tuple[float, int, object]:
    from newtune.config.schema import NewtuneConfig
    from newtune.data.prepare import prepare

    data = tmp / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = NewtuneConfig(
        base_model="unused",
        datasets=[{"path": str(data), "type": kind}],
        dataset_prepared_path=str(tmp / "prepared"),
        sequence_len=100_000,
        dataset_processes=procs,
    )
    start = time.perf_counter()
    prepared = prepare(cfg, tok, tok.chat_template, force=True)
    elapsed = time.perf_counter() - start
    return elapsed, prepared.stats["total_tokens"], prepared.data["train"]


def time_trl(rows: list[dict], tok, procs: int, tmp: Path) -> tuple[float, int, object]:
    from trl import SFTConfig, SFTTrainer

    ds = datasets.Dataset.from_list(rows)
    args = SFTConfig(
        output_dir=str(tmp / "trl"),
        dataset_num_proc=procs,
        max_length=None,
        report_to="none",
        use_cpu=True,
        bf16=False,
    )
    fake = SimpleNamespace(  # the trainer attributes _prepare_dataset reads, set as __init__ does
        _tokenizer=tok, chat_template=None, completion_only_loss="prompt" in rows[0]
    )
    start = time.perf_counter()
    out = SFTTrainer._prepare_dataset(fake, ds, tok, args, False, None, "train")
    elapsed = time.perf_counter() - start
    return elapsed, sum(len(x) for x in out["input_ids"]), out


def best_of(repeat: int, *runs):  # noqa: ANN002, ANN201
    """Run each tool `repeat` times, alternating (shared noise); keep each one's fastest run."""
    results: list[list] = [[] for _ in runs]
    for _ in range(repeat):
        for run, out in zip(runs, results, strict=True):
            out.append(run())
    return [min(out, key=lambda r: r[0]) for out in results]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=20_000)
    parser.add_argument("--convs", type=int, default=2_000)
    parser.add_argument("--turns", type=int, default=20)
    parser.add_argument("--procs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the best counts")
    opts = parser.parse_args()
    if not MODEL.is_file():
        sys.exit(f"{MODEL} is missing: run `bash examples/quickstart/run.sh` once first.")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(MODEL.parent), gguf_file=MODEL.name)
    results = []
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        alpaca = alpaca_rows(opts.rows)
        pc = [
            {"prompt": alpaca_prompt(r["instruction"], r["input"]), "completion": r["output"]}
            for r in alpaca
        ]
        nt, trl = best_of(
            opts.repeat,
            lambda: time_newtune(alpaca, "alpaca", tok, opts.procs, tmp),
            lambda: time_trl(pc, tok, opts.procs, tmp),
        )
        same = sum(a == b for a, b in zip(nt[2]["input_ids"], trl[2]["input_ids"], strict=True))
        labels_same = sum(a == b for a, b in zip(nt[2]["labels"], trl_labels(trl[2]), strict=True))
        results.append(
            (
                f"alpaca, {opts.rows:,} rows",
                opts.rows,
                nt,
                trl,
                f"ids {same}/{opts.rows}, labels {labels_same}/{opts.rows}",
            )
        )
        chats = chat_rows(opts.convs, opts.turns)
        nt, trl = best_of(
            opts.repeat,
            lambda: time_newtune(chats, "chat_template", tok, opts.procs, tmp),
            lambda: time_trl(chats, tok, opts.procs, tmp),
        )
        same = sum(a == b for a, b in zip(nt[2]["input_ids"], trl[2]["input_ids"], strict=True))
        floor = encode_floor(chats, tok, opts.procs)
        results.append(
            (
                f"chat, {opts.convs:,} x {opts.turns} turns",
                opts.convs,
                nt,
                trl,
                f"ids {same}/{opts.convs}",
            )
        )
    print(
        f"\n{os.cpu_count()} CPUs, {opts.procs} for each tool, best of {opts.repeat} runs; "
        "tokenizer SmolLM2-135M-Instruct\n"
    )
    head = f"{'data':<26} {'tool':<8} {'seconds':>8} {'rows/s':>9} {'tokens/s':>10} {'speedup':>8}  identical"
    print(head)
    print("-" * len(head))
    for name, n, nt, trl, same in results:
        for tool, (secs, toks, _) in (("newtune", nt), ("TRL", trl)):
            speed = f"{trl[0] / nt[0]:.2f}x" if tool == "newtune" else "1.00x"
            print(
                f"{name:<26} {tool:<8} {secs:>8.2f} {n / secs:>9,.0f} {toks / secs:>10,.0f} "
                f"{speed:>8}  {same if tool == 'newtune' else ''}"
            )
    secs, toks = floor
    print(
        f"{'chat: encode only':<26} {'floor':<8} {secs:>8.2f} {opts.convs / secs:>9,.0f} "
        f"{toks / secs:>10,.0f} {results[1][3][0] / secs:>7.2f}x  (rendered text -> ids, "
        f"Rust tokenizer, CPU time / {opts.procs})"
    )


def encode_floor(rows: list[dict], tok, procs: int) -> tuple[float, int]:
    """The least any tool must spend on chat rows: tokenizing the rendered text, nothing else.

    The conversations are rendered before timing; the raw Rust tokenizer encodes them without
    offsets in one thread, and the CPU time is divided by `procs` (a perfect parallel split).
    """
    texts = tok.apply_chat_template([r["messages"] for r in rows], tokenize=False)
    start = time.process_time()
    enc = tok._tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    cpu = time.process_time() - start
    return cpu / procs, sum(len(e.ids) for e in enc)


def trl_labels(ds) -> list[list[int]]:
    """TRL's labels (it builds them with -100 outside the completion when completion-only)."""
    if "labels" in ds.column_names:
        return ds["labels"]
    return [
        [t if m else -100 for t, m in zip(ids, mask, strict=True)]
        for ids, mask in zip(ds["input_ids"], ds["completion_mask"], strict=True)
    ]


if __name__ == "__main__":
    main()
