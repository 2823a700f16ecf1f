"""`newtune inference cfg.yml [--lora_model_dir=DIR | --base_model=DIR] [--prompt TEXT]`."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

import fire

from newtune.cli.common import load, run_command


def _inference(
    config: str,
    prompt: str | None,
    options: dict[str, Any],
    overrides: dict,
    gradio: bool = False,
    server_name: str = "127.0.0.1",
    server_port: int = 7860,
    share: bool = False,
    images: Sequence[str] = (),
) -> None:
    from newtune.inference import GenerationOptions, answer_lines, build_generator, interactive

    loaded = load(config, overrides)
    from_config = {k: getattr(loaded.config, k) for k in options}
    chosen = {k: options[k] if options[k] is not None else from_config[k] for k in options}
    opts = GenerationOptions(**{k: v for k, v in chosen.items() if v is not None})
    gen = build_generator(loaded.config, opts, base_overridden="base_model" in overrides)
    if gradio:
        from newtune.inference import serve_gradio

        serve_gradio(gen, f"newtune: {loaded.config.base_model}", server_name, server_port, share)
    elif prompt is not None:
        if images:
            check_images(gen, images)
            print(gen.answer(str(prompt), images=list(images)), flush=True)
        else:
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
    gradio: bool = False,
    server_name: str = "127.0.0.1",
    server_port: int = 7860,
    share: bool = False,
    image: Any = None,
    debug: bool = False,
    **overrides: Any,
) -> None:
    """Answer prompts with the trained model: --prompt, piped stdin (one per line), or a loop.

    `--gradio` serves a chat page instead (`--server_name`, `--server_port`, `--share`).
    `--image PATH` (repeatable) shows images with `--prompt` to a vision-language model.
    """
    options = {
        "max_new_tokens": max_new_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "top_k": top_k,
        "repetition_penalty": repetition_penalty,
        "do_sample": do_sample,
    }
    run_command(
        _inference,
        debug,
        config,
        prompt,
        options,
        overrides,
        gradio,
        server_name,
        server_port,
        share,
        _image_list(image),
    )


def _image_list(image: Any) -> list[str]:
    """`--image` values as a list (one path, or the list `gather_images` made)."""
    if image is None:
        return []
    return [str(i) for i in image] if isinstance(image, list | tuple) else [str(image)]


def gather_images(args: list[str]) -> list[str]:
    """Arguments with every `--image X` / `--image=X` joined into one `--image=[...]` list
    (fire keeps only the last of a repeated flag)."""
    images, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        if arg == "--image" and i + 1 < len(args):
            images.append(args[i + 1])
            i += 2
            continue
        if arg.startswith("--image="):
            images.append(arg.split("=", 1)[1])
        else:
            rest.append(arg)
        i += 1
    return [*rest, f"--image={json.dumps(images)}"] if images else rest


def check_images(gen: Any, images: Sequence[str]) -> None:
    """Refuse `--image` for a model that takes no images."""
    from newtune.errors import ConfigError

    if not hasattr(gen, "processor"):
        raise ConfigError(
            f"--image {images[0]}: this config trains a text model; images need a "
            "vision-language config (`processor_type: AutoProcessor` and a VLM `base_model`)"
        )


def main() -> None:
    """Entry point for `python -m newtune.cli.inference`."""
    fire.Fire(inference_command, command=gather_images(sys.argv[1:]))


if __name__ == "__main__":
    main()
