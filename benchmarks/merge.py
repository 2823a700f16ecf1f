"""merge-lora memory and time: newtune's streaming merge vs peft's merge_and_unload.

Builds offline a random Llama of about 0.37B parameters saved in 100 MB bf16 safetensors
shards, and a random rank-16 LoRA adapter on every linear layer. Each merge runs in its own
process; the table shows its RSS once the imports are done, the peak RSS of the merge itself
(VmHWM, reset after the imports) and the wall time, beside a process that only imports
torch + transformers + peft, and checks newtune's bound: that import RSS + 2 x the largest
shard (read one, write one). Not ru_maxrss: on Linux a child keeps its parent's peak across
fork + exec, so a child of this script (which holds the ~0.8 GB model it built) would read
about 0.8 GB whatever it does. newtune streams each output shard to disk a block of rows at a
time and reads its input with plain file reads (no mmap), so it stays far below the bound;
peft holds the whole model. Linux only (/proc/self/status, /proc/self/clear_refs).

  * peft: `from_pretrained` (bf16) + `PeftModel.from_pretrained` + `merge_and_unload` +
    `save_pretrained` (100 MB shards), the usual recipe.
  * newtune: `newtune.models.merge.merge_lora`, which streams the shards.

Run: python benchmarks/merge.py [--layers 24] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHARD_BYTES = 100 * 1024 * 1024
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# Peak RSS of the work alone: VmRSS after the imports, then the high-water mark (VmHWM) reset
# through /proc/self/clear_refs and read at the end.
START = """
def status(key):
    line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
    return int(line.split()[1])  # KiB
print("BEFORE", status("VmRSS"))
open("/proc/self/clear_refs", "w").write("5")
"""
PEAK = """
print("PEAK", status("VmHWM"))
"""
IMPORTS = "import torch, transformers, peft" + START + PEAK
PEFT = (
    """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
"""
    + START
    + """
base, adapter, out = sys.argv[1:4]
model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
model.save_pretrained(out, max_shard_size="100MB")
"""
    + PEAK
)
NEWTUNE = (
    """
import sys
from pathlib import Path
from newtune.models.merge import merge_lora
class Tok:
    def save_pretrained(self, folder):
        (Path(folder) / "tokenizer_config.json").write_text("{}")
"""
    + START
    + """
base, adapter, out = sys.argv[1:4]
merge_lora(base, adapter, Path(out), "bfloat16", Tok())
"""
    + PEAK
)


def build(folder: Path, layers: int) -> tuple[Path, Path, int]:
    """A random bf16 Llama in 100 MB shards and a random LoRA adapter; largest shard bytes."""
    import torch
    from peft import LoraConfig
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000,
        hidden_size=1024,
        intermediate_size=2816,
        num_hidden_layers=layers,
        num_attention_heads=16,
        num_key_value_heads=16,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in LlamaForCausalLM(config).state_dict().items()}
    base = folder / "base"
    base.mkdir()
    gen = torch.Generator().manual_seed(0)
    shard: dict = {}
    size = largest = 0
    weight_map: dict[str, str] = {}
    names = list(shapes)

    def flush() -> None:
        nonlocal shard, size, largest
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(base / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        largest = max(largest, size)
        shard, size = {}, 0

    for key in names:
        tensor = (torch.randn(shapes[key], generator=gen) * 0.02).to(torch.bfloat16)
        if size + tensor.numel() * 2 > SHARD_BYTES and shard:
            flush()
        shard[key] = tensor
        size += tensor.numel() * 2
    flush()
    total = sum(torch.Size(s).numel() * 2 for s in shapes.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (base / "model.safetensors.index.json").write_text(json.dumps(index))
    config.save_pretrained(base)

    adapter = folder / "adapter"
    LoraConfig(r=16, lora_alpha=32, target_modules=list(TARGETS)).save_pretrained(adapter)
    lora = {}
    for key, shape in shapes.items():
        module = key.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in TARGETS:
            out_dim, in_dim = shape
            lora[f"base_model.model.{module}.lora_A.weight"] = torch.randn(16, in_dim) * 0.01
            lora[f"base_model.model.{module}.lora_B.weight"] = torch.randn(out_dim, 16) * 0.01
    save_file(lora, str(adapter / "adapter_model.safetensors"))
    params = sum(torch.Size(s).numel() for s in shapes.values())
    print(f"base: {params / 1e9:.3f}B parameters, {len(set(weight_map.values()))} shards")
    return base, adapter, largest


def measure(code: str, *args: str) -> dict[str, float]:
    """RSS after the imports and peak RSS of the work (MiB), and seconds, of `code`."""
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=False
    )
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.exit(proc.stderr[-3000:])
    words = proc.stdout.split()
    out = {k.lower(): int(words[words.index(k) + 1]) / 1024 for k in ("BEFORE", "PEAK")}
    return {**out, "seconds": elapsed}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--keep", type=Path, help="build/reuse the model here instead of tmp")
    opts = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_s:
        folder = opts.keep or Path(tmp_s)
        folder.mkdir(parents=True, exist_ok=True)
        base, adapter, largest = build(folder, opts.layers)
        imports = measure(IMPORTS)
        peft = measure(PEFT, str(base), str(adapter), str(folder / "peft-merged"))
        newtune = measure(NEWTUNE, str(base), str(adapter), str(folder / "nt-merged"))
    shard = largest / 2**20
    bound = imports["before"] + 2 * shard
    print(f"\nlargest shard {shard:.0f} MiB; bound for newtune: {bound:.0f} MiB\n")
    head = f"{'process':<30} {'after imports':>13} {'peak':>7} {'seconds':>8}"
    print(head + "\n" + "-" * len(head))
    print(f"{'import torch+transformers+peft':<30} {imports['before']:>13.0f}")
    for name, row in (("peft merge_and_unload", peft), ("newtune streaming merge", newtune)):
        print(f"{name:<30} {row['before']:>13.0f} {row['peak']:>7.0f} {row['seconds']:>8.1f}")
    verdict = "yes" if newtune["peak"] <= bound else "NO"
    print(
        f"\nnewtune peak {newtune['peak']:.0f} <= import RSS {imports['before']:.0f} + "
        f"2 x largest shard {shard:.0f} = {bound:.0f} MiB: {verdict}"
    )
    print("(MiB; peak = high-water RSS from the end of the imports to the end of the merge)")


if __name__ == "__main__":
    main()
