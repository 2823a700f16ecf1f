"""Startup time of the light commands, and proof that they do not import torch.

Run from the repository root with the venv active:

    python benchmarks/startup.py [--runs 5] [--config examples/quickstart/config.yml]

Times each command as a fresh subprocess (wall clock, min and median of --runs), with
`python -c 'import torch'` as the reference, and checks with `python -X importtime` that
`newtune --help` and `newtune validate` import none of the heavy libraries.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HEAVY = ("torch", "transformers", "datasets", "peft", "accelerate")
BUDGET_S = 1.5


def newtune_argv() -> list[str]:
    """The installed `newtune` script next to this interpreter, else `python -m`."""
    script = Path(sys.executable).with_name("newtune")
    if script.is_file():
        return [str(script)]
    found = shutil.which("newtune")
    return [found] if found else [sys.executable, "-m", "newtune.cli.main"]


def time_runs(argv: list[str], env: dict[str, str], runs: int) -> list[float]:
    """Wall seconds of each run; stdout and stderr go to /dev/null; raise if one fails."""
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        proc = subprocess.run(
            argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=False
        )
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}")
    return times


def heavy_imports(args: list[str], env: dict[str, str]) -> list[str]:
    """Which HEAVY top-level modules `python -X importtime -m newtune.cli.main ARGS` imports."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "newtune.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    imported = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            imported.add(line.rsplit("|", 1)[1].strip())
    return [name for name in HEAVY if name in imported]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--config", default="examples/quickstart/config.yml")
    opts = parser.parse_args()

    env = {**os.environ, "PAGER": "cat", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    newtune = newtune_argv()
    cases = [
        ("newtune --help", [*newtune, "--help"], ["--help"]),
        (
            f"newtune validate {opts.config}",
            [*newtune, "validate", opts.config],
            ["validate", opts.config],
        ),
        ("python -c 'import torch' (reference)", [sys.executable, "-c", "import torch"], None),
    ]
    width = max(len(name) for name, _, _ in cases)
    print(f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}, {opts.runs} runs each")
    print(f"{'command':<{width}}  {'min s':>6}  {'median s':>8}  heavy imports")
    print(f"{'-' * width}  {'-' * 6}  {'-' * 8}  {'-' * 13}")
    ok = True
    for name, argv, importtime_args in cases:
        times = time_runs(argv, env, opts.runs)
        median = statistics.median(times)
        if importtime_args is None:
            heavy = "(reference)"
        else:
            found = heavy_imports(importtime_args, env)
            heavy = ", ".join(found) or "none"
            ok = ok and not found and median <= BUDGET_S
        print(f"{name:<{width}}  {min(times):>6.3f}  {median:>8.3f}  {heavy}")
    verdict = "OK" if ok else "FAIL"
    print(f"{verdict}: light commands import none of {', '.join(HEAVY)}; median <= {BUDGET_S} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
