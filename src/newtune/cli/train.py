"""`newtune train cfg.yml [--key=value ...] [--launcher NAME [-- LAUNCHER ARGS]]`.

Also `accelerate launch -m newtune.cli.train cfg.yml` (or torchrun): every process runs this
module. With `--launcher`, this process checks the config, then replaces itself with the
launcher running `python -m newtune.cli.train` and the same arguments; the words after `--`
go to the launcher (`-- --multi_gpu --num_processes 2`, `-- --nproc_per_node 8`).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import fire

from newtune.cli.common import load, log, run_command
from newtune.errors import ConfigError

MODULE = "newtune.cli.train"
# launcher -> the command that starts it with this interpreter (no PATH lookup, same venv)
LAUNCHERS: dict[str, list[str]] = {
    "accelerate": ["-m", "accelerate.commands.launch"],
    "torchrun": ["-m", "torch.distributed.run"],
    "python": [],
}


def _train(config: str, overrides: dict[str, Any], debug: bool = False) -> None:
    loaded = load(config, overrides)
    if loaded.config.use_ray:  # Ray Train starts the ranks; each runs train.run.train
        from newtune.train.ray_launch import train_with_ray

        log.info("training done; outputs in %s", train_with_ray(loaded, debug))
        return
    from newtune.train.run import train

    out = train(loaded)
    _close_process_group()
    log.info("training done; outputs in %s", out)


def _close_process_group() -> None:
    """Under a launcher: wait until rank 0 has written the outputs, then tear the group down.

    A rank that exits while another still saves could abort in gloo's/DeepSpeed's threads at
    interpreter exit ("terminate called without an active exception", seen once in a 2-rank
    ZeRO-3 test); the command owns its process, so it closes the group it trained in.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def child_args(config: str, overrides: dict[str, Any], debug: bool) -> list[str]:
    """The arguments that make `python -m newtune.cli.train` parse to this config and overrides."""
    args = [str(config), *(f"--{key}={value!r}" for key, value in overrides.items())]
    return [*args, "--debug"] if debug else args


def launch_command(launcher: str, launcher_args: Sequence[str], args: Sequence[str]) -> list[str]:
    """The argv that runs `newtune.cli.train args` under `launcher`."""
    if launcher not in LAUNCHERS:
        raise ConfigError(
            f"`--launcher {launcher}` is not a launcher newtune knows; use one of "
            f"{', '.join(LAUNCHERS)}."
        )
    return [sys.executable, *LAUNCHERS[launcher], *launcher_args, "-m", MODULE, *args]


def _relaunch(
    config: str, overrides: dict[str, Any], launcher: Any, launcher_args: list[str], debug: bool
) -> None:
    """Check the config here, then become the launcher (this process is replaced)."""
    if not isinstance(launcher, str):
        raise ConfigError(f"`--launcher` needs a value: one of {', '.join(LAUNCHERS)}.")
    argv = launch_command(launcher, launcher_args, child_args(config, overrides, debug))
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError(
            f"`--launcher {launcher}` starts new processes, but this one is already rank "
            f"{os.environ.get('RANK', '?')} of {os.environ['WORLD_SIZE']} under a launcher; "
            "drop `--launcher` when you start newtune with accelerate/torchrun yourself."
        )
    from newtune.train.distributed import check_distributed
    from newtune.train.preflight import check_output_dir

    loaded = load(config, overrides)
    from newtune.train.ray_launch import check_no_launcher

    check_no_launcher(loaded.config, launcher)
    check_distributed(loaded)
    check_output_dir(loaded.config.output_dir)  # before the launcher starts its processes
    log.info("re-executing under %s: %s", launcher, " ".join(argv))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, argv)


def _work(
    config: str, overrides: dict[str, Any], launcher: Any, launcher_args: list[str], debug: bool
) -> None:
    if launcher is not None:
        _relaunch(config, overrides, launcher, launcher_args, debug)
    elif launcher_args:
        raise ConfigError(
            f"`-- {' '.join(launcher_args)}` passes arguments to a launcher; add "
            "`--launcher accelerate|torchrun|python` to say which."
        )
    else:
        _train(config, overrides, debug)


def train_command_with(launcher_args: Sequence[str]) -> Callable[..., None]:
    """The fire-callable train command; `launcher_args` are the words after `--`."""

    def train_command(
        config: str, debug: bool = False, launcher: str | None = None, **overrides: Any
    ) -> None:
        """Fine-tune the model the config describes and save it to `output_dir`."""
        run_command(_work, debug, config, overrides, launcher, list(launcher_args), debug)

    return train_command


train_command = train_command_with(())


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point for `python -m newtune.cli.train` (and `newtune train ... -- ARGS`)."""
    args = list(sys.argv[1:] if argv is None else argv)
    tail: list[str] = []
    if "--" in args:  # the launcher's words: fire would read them as its own flags
        cut = args.index("--")
        args, tail = args[:cut], args[cut + 1 :]
    fire.Fire(train_command_with(tail), command=args, name="train")


if __name__ == "__main__":
    main()
