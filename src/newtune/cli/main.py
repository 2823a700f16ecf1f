"""The `newtune` command: preprocess, train, evaluate, inference, merge-lora, vllm-serve,
validate, config-schema.

Only the chosen command's module is imported, so `newtune --help` and `newtune validate`
start without importing torch; the heavy imports happen inside the commands that need them.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

import fire

# name -> (module, function, summary shown by `newtune --help`; the function's docstring's
# first line, which tests/test_startup.py checks).
COMMANDS: dict[str, tuple[str, str, str]] = {
    "preprocess": (
        "newtune.cli.preprocess",
        "preprocess_command",
        "Tokenize the config's datasets and print the prepared dataset's path.",
    ),
    "train": (
        "newtune.cli.train",
        "train_command",
        "Fine-tune the model the config describes and save it to `output_dir`.",
    ),
    "inference": (
        "newtune.cli.inference",
        "inference_command",
        "Answer prompts with the trained model: --prompt, piped stdin (one per line), or a loop.",
    ),
    "evaluate": (
        "newtune.cli.evaluate",
        "evaluate_command",
        "Print eval metrics (JSON) of the trained model, --base, or --lora_model_dir=DIR.",
    ),
    "merge-lora": (
        "newtune.cli.merge_lora",
        "merge_lora_command",
        "Merge the LoRA adapter (lora_model_dir, default output_dir) into the base model.",
    ),
    "vllm-serve": (
        "newtune.cli.vllm_serve",
        "vllm_serve_command",
        "Start the vLLM server (TRL's) an online RL config generates with (--dry_run prints it).",
    ),
    "validate": (
        "newtune.cli.validate",
        "validate_command",
        "Validate a config; print the resolved config and run plan (exit 0 when valid).",
    ),
    "config-schema": (
        "newtune.cli.config_schema",
        "config_schema_command",
        "Print the JSON schema of the newtune config (for editors and other tools).",
    ),
}
# fire also accepts the underscore spelling; list it right after the hyphenated one.
COMMANDS = {
    alias: spec
    for name, spec in COMMANDS.items()
    for alias in ((name, name.replace("-", "_")) if "-" in name else (name,))
}


def load_command(name: str) -> Callable[..., Any]:
    """Import the module of command `name` and return its fire-callable function."""
    module, function, _ = COMMANDS[name]
    return getattr(importlib.import_module(module), function)


def _placeholder(name: str) -> Callable[..., Any]:
    """A stand-in that lists `name` in `newtune --help` without importing its module."""
    module, function, summary = COMMANDS[name]

    def run(*args: Any, **kwargs: Any) -> Any:
        return load_command(name)(*args, **kwargs)

    run.__doc__ = summary
    run.__name__ = run.__qualname__ = function
    run.__module__ = module
    return run


def command_table(chosen: str | None = None) -> dict[str, Callable[..., Any]]:
    """Every command for fire: the real function for `chosen` (and its alias), else stand-ins."""
    table = {name: _placeholder(name) for name in COMMANDS}
    if chosen in COMMANDS:
        real = load_command(chosen)
        for name, spec in COMMANDS.items():
            if spec == COMMANDS[chosen]:
                table[name] = real
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the `newtune` console script."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["train"] and "--" in args:
        # `newtune train cfg.yml --launcher X -- ARGS`: fire would read ARGS as its own flags
        from newtune.cli.train import main as train_main

        train_main(args[1:])
        return
    if args[:1] == ["inference"]:  # repeated --image flags become one list
        from newtune.cli.inference import gather_images

        args = gather_images(args)
    fire.Fire(command_table(args[0] if args else None), command=args, name="newtune")


if __name__ == "__main__":
    main()
