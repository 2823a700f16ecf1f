"""`newtune vllm-serve cfg.yml [--dry_run]`: start the vLLM server an online RL run uses.

Online RL (`rl: grpo | gdpo | ebft` with `trl.use_vllm: true`, server mode) generates on a
vLLM server that TRL's GRPOTrainer talks to. TRL ships that server (`trl vllm-serve`, the
module trl.scripts.vllm_serve), and the trainer syncs its weights to it (merged LoRA weights
included). This command starts it with the config's model and its `vllm:` block, on the host
and port the trainer connects to (`trl.vllm_server_host` / `trl.vllm_server_port`), the way
`axolotl vllm-serve cfg.yml` does for Axolotl. `--dry_run` prints the command line only.
"""

from __future__ import annotations

import importlib.util
import shlex
import subprocess
import sys
from typing import Any

import fire

from newtune.cli.common import command, load, log
from newtune.errors import ConfigError

TRL_SERVER = "trl.scripts.vllm_serve"
# Axolotl's server scripts; newtune runs TRL's, which the GRPOTrainer syncs weights to itself
AXOLOTL_SERVERS = ("axolotl.scripts.vllm_serve", "axolotl.scripts.vllm_serve_lora")
DEFAULT_HOST, DEFAULT_PORT = "0.0.0.0", 8000  # TRL's defaults
# `vllm:` key -> `trl vllm-serve` option
SERVER_OPTIONS = {
    "tensor_parallel_size": "--tensor_parallel_size",
    "data_parallel_size": "--data_parallel_size",
    "gpu_memory_utilization": "--gpu_memory_utilization",
    "dtype": "--dtype",
    "max_model_len": "--max_model_len",
    "enable_prefix_caching": "--enable_prefix_caching",
    "enforce_eager": "--enforce_eager",
}


def server_module(cfg: Any) -> str:
    """The module the server runs: `vllm.serve_module`, Axolotl's scripts read as TRL's."""
    block = getattr(cfg, "vllm", None)
    module = getattr(block, "serve_module", None) or TRL_SERVER
    return TRL_SERVER if module in AXOLOTL_SERVERS else module


def server_address(cfg: Any) -> tuple[str, int]:
    """Host and port the server listens on: `vllm.host/port`, else the trainer's target."""
    block, trl = getattr(cfg, "vllm", None), getattr(cfg, "trl", None)
    host = getattr(block, "host", None) or getattr(trl, "vllm_server_host", None) or DEFAULT_HOST
    port = getattr(block, "port", None) or getattr(trl, "vllm_server_port", None) or DEFAULT_PORT
    return str(host), int(port)


def _value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def server_argv(cfg: Any) -> list[str]:
    """The server's command line for the config (python -m <module> --model ... options)."""
    trl = getattr(cfg, "trl", None)
    if cfg.rl not in ("grpo", "gdpo", "ebft") or not getattr(trl, "use_vllm", False):
        raise ConfigError(
            "newtune vllm-serve starts the vLLM server of an online RL run, and this config "
            f"does not use one (`rl: {cfg.rl}`, `trl.use_vllm: "
            f"{_value(getattr(trl, 'use_vllm', None))}`); set `rl: grpo`, `gdpo` or `ebft` "
            "with `trl.use_vllm: true`"
        )
    if getattr(trl, "vllm_mode", None) == "colocate":
        raise ConfigError(
            "`trl.vllm_mode: colocate` runs vLLM inside the training process, so there is no "
            "server to start; run `newtune train` alone, or set `trl.vllm_mode: server`"
        )
    host, port = server_address(cfg)
    argv = [sys.executable, "-m", server_module(cfg), "--model", str(cfg.base_model)]
    if getattr(cfg, "revision_of_model", None):
        argv += ["--revision", str(cfg.revision_of_model)]
    argv += ["--host", host, "--port", str(port)]
    block = getattr(cfg, "vllm", None)
    for key, option in SERVER_OPTIONS.items():
        value = getattr(block, key, None)
        if value is not None:
            argv += [option, _value(value)]
    if getattr(cfg, "trust_remote_code", None):
        argv += ["--trust_remote_code", "true"]
    return argv


def _serve(config: str, overrides: dict[str, Any]) -> None:
    dry_run = bool(overrides.pop("dry_run", False))
    cfg = load(config, overrides).config
    argv = server_argv(cfg)
    line = shlex.join(argv)
    if dry_run:
        print(line)
        return
    module = argv[2]
    if module == TRL_SERVER and importlib.util.find_spec("vllm") is None:
        raise ConfigError(
            "newtune vllm-serve runs TRL's vLLM server, which needs the `vllm` package and a "
            "CUDA GPU; install it on the server machine (`pip install vllm`, a version TRL "
            f"supports) and run the command again. The command line is: {line}"
        )
    log.info("starting the vLLM server: %s", line)
    code = subprocess.call(argv)
    if code:
        raise SystemExit(code)


vllm_serve_command = command(
    _serve, "Start the vLLM server (TRL's) an online RL config generates with (--dry_run prints it)."
)


def main() -> None:
    """Entry point for `python -m newtune.cli.vllm_serve`."""
    fire.Fire(vllm_serve_command)


if __name__ == "__main__":
    main()
