"""`newtune inference cfg.yml [--lora_model_dir=DIR | --base_model=DIR] [--prompt TEXT]`."""

from __future__ import annotations

import sys
from typing import Any

import fire

from newtune.cli.common import load, run_command


def _inference(config: str, prompt: str | None, options: dict[str, Any], overrides: dict) -> None:
    from newtune.inference import GenerationOptions, answer_lines, build_generator, interactive

    loaded = load(config, overrides)
    opts = GenerationOptions(**{k: v for k, v in options.items() if v is not None})
    gen = build_generator(loaded.config, opts, base_overridden="base_model" in overrides)
    if prompt is not None:
        print(gen.answer(str(prompt)), flush=True)
    elif sys.stdin.isatty():
        interactive(gen)
    else:
        answer_lines(gen, sys.stdin, sys.stdout)


def inference_command(
    config: str,
    prompt: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    do_sample: bool | None = None,
    debug: bool = False,
    **overrides: Any,
) -> None:
    """Answer prompts with the trained model: --prompt, piped stdin (one per line), or a loop."""
    options = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "do_sample": do_sample,
    }
    run_command(_inference, debug, config, prompt, options, overrides)


def main() -> None:
    """Entry point for `python -m newtune.cli.inference`."""
    fire.Fire(inference_command)


if __name__ == "__main__":
    main()
