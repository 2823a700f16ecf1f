"""Generate with a trained model, building prompts with the same strategy code as training."""

from __future__ import annotations

import dataclasses
import logging
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from newtune.config.resolve import resolve
from newtune.config.schema import NewtuneConfig
from newtune.data.prepare import engine_for
from newtune.data.strategies import Conversation, get_strategy
from newtune.data.tokenize import Engine
from newtune.models.adapters import load_adapter
from newtune.models.load import ModelOptions, load_model
from newtune.models.tokenizer import load_tokenizer, resize_embeddings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationOptions:
    """Sampling options passed to `generate`."""

    max_new_tokens: int = 128
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 50
    repetition_penalty: float = 1.0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `model.generate`."""
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "do_sample": self.do_sample,
            "repetition_penalty": self.repetition_penalty,
        }
        if self.do_sample:
            out.update(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return out


def _has(path: str | Path, name: str) -> bool:
    return (Path(path) / name).is_file()


@dataclass
class Generator:
    """A loaded model + tokenizer + the first dataset's prompt strategy."""

    model: Any
    tokenizer: Any
    engine: Engine
    strategy: Any
    options: GenerationOptions
    history: list[dict[str, str]] = field(default_factory=list)
    diffusion: Any = None  # a DiffusionMethod: answers are denoised mask tokens (DiffusionPlugin)

    @property
    def is_chat(self) -> bool:
        """True when prompts are chat conversations (a running history is kept)."""
        return bool(getattr(self.strategy, "chat", False))

    def prompt_ids(self, text: str, history: list[dict[str, str]] | None = None) -> list[int]:
        """The token ids training would have used for this prompt."""
        return self.engine.prompt_ids(self.strategy.prompt(text, history))

    def answer(
        self,
        text: str,
        history: list[dict[str, str]] | None = None,
        stream: Any = None,
        options: GenerationOptions | None = None,
    ) -> str:
        """Generate the model's answer to one prompt."""
        ids = self.prompt_ids(text, history)
        if self.diffusion is not None:  # train.methods.diffusion.complete
            from newtune.train.methods.diffusion import complete

            budget = (options or self.options).max_new_tokens
            return complete(self.diffusion, self.model, self.tokenizer, ids, budget, stream)
        return generate_answer(self.model, self.tokenizer, ids, options or self.options, stream)


def generate_answer(
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    options: GenerationOptions,
    stream: Any = None,
) -> str:
    """The model's answer to one tokenized prompt: generated tokens, decoded without specials."""
    ids = torch.tensor([prompt_ids], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            streamer=stream,
            **options.kwargs(),
        )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def choose_model(
    config: NewtuneConfig, base_overridden: bool = False, base_only: bool = False
) -> tuple[str, str | None]:
    """(model, adapter folder or None): `lora_model_dir`, else the trained `output_dir`
    (an adapter, or a full model unless `base_model` was overridden), else the base model;
    `base_only` skips what training wrote."""
    adapter_dir = config.lora_model_dir
    model_source = config.base_model
    if base_only:
        return model_source, adapter_dir
    if (
        adapter_dir is None
        and config.adapter in ("lora", "qlora")
        and _has(config.output_dir, "adapter_config.json")
    ):
        adapter_dir = config.output_dir
    if adapter_dir is not None and not base_overridden:
        from newtune.train.relora import base_for

        model_source = base_for(adapter_dir, model_source)  # a ReLoRA run's merged base
    if (
        adapter_dir is None
        and config.adapter is None
        and not base_overridden
        and _has(config.output_dir, "config.json")
    ):
        model_source = config.output_dir
    return model_source, adapter_dir


def load_trained(
    config: NewtuneConfig, model_source: str, adapter_dir: str | None
) -> tuple[Any, Any]:
    """A model (in eval mode) with its adapter, as `choose_model` picked them, and its tokenizer."""
    tok_dir = adapter_dir or model_source
    source = tok_dir if _has(tok_dir, "tokenizer_config.json") else None
    tokenizer, _ = load_tokenizer(config, source)
    plan = resolve(config)
    options = ModelOptions.from_config(config, plan)
    model = load_model(model_source, plan.dtype, options=options)
    resize_embeddings(model, tokenizer, config)  # as training did, before the adapter loads
    if options.quantize is None and options.device_map is None and plan.device != "cpu":
        model = model.to(plan.device)
    if adapter_dir:
        model = load_adapter(model, adapter_dir)
    log.info("model: %s%s", model_source, f" + adapter {adapter_dir}" if adapter_dir else "")
    model.eval()
    return model, tokenizer


def build_generator(
    config: NewtuneConfig, options: GenerationOptions, base_overridden: bool = False
) -> Generator:
    """Load the model the config points at: base + adapter, a full fine-tune, or the base."""
    from newtune.config.schema.multimodal import is_multimodal

    if config.reward_model:
        from newtune.errors import ConfigError

        raise ConfigError(
            "`newtune inference` generates text, and this config trains a reward model "
            "(`reward_model: true`), which scores a sequence with one number instead. Use "
            "`newtune evaluate` for its accuracy on the eval split, or load output_dir with "
            "transformers' AutoModelForSequenceClassification to score texts."
        )
    if config.process_reward_model:
        from newtune.errors import ConfigError

        raise ConfigError(
            "`newtune inference` generates text, and this config trains a process reward "
            "model (`process_reward_model: true`), which labels each reasoning step right or "
            "wrong instead. Use `newtune evaluate` for its step accuracy on the eval split, or "
            "load output_dir with transformers' AutoModelForTokenClassification and read the "
            "logits at each step separator's last token."
        )
    if is_multimodal(config):  # a VLM: prompts with images (inference_vision)
        from newtune.inference_vision import build_vision_generator

        return build_vision_generator(config, options, base_overridden)  # type: ignore[return-value]
    model, tokenizer = load_trained(config, *choose_model(config, base_overridden))
    entry = config.datasets[0]
    strategy = get_strategy(entry, 0, config.train_on_inputs)
    engine = engine_for(entry, config, tokenizer, tokenizer.chat_template, strategy)
    generator = Generator(model, tokenizer, engine, strategy, options)
    from newtune.config.compat2 import diffusion_enabled

    if diffusion_enabled(config):  # a masked-diffusion model answers by denoising
        from newtune.train.methods.diffusion import DiffusionMethod

        generator.diffusion = DiffusionMethod(config).for_inference(tokenizer, model)
    return generator


def answer_lines(gen: Generator, lines: Iterable[str], out: TextIO) -> int:
    """Answer one prompt per non-empty line (piped stdin); one answer per prompt."""
    count = 0
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        print(gen.answer(text), file=out, flush=True)
        count += 1
    return count


def interactive(gen: Generator, inp: TextIO = sys.stdin, out: TextIO = sys.stdout) -> None:
    """A terminal loop: multi-line input ends with an empty line; chats keep their history."""
    from transformers import TextStreamer

    print(
        "Type a prompt; finish it with an empty line. Ctrl-D quits, /reset clears the chat"
        + (
            ", /image PATH attaches an image to the next prompt." if hasattr(gen, "images") else "."
        ),
        file=out,
    )
    while True:
        lines: list[str] = []
        print(">>> ", end="", file=out, flush=True)
        while True:
            line = inp.readline()
            if line == "":
                print(file=out)
                return
            if not line.strip():
                if lines:
                    break
                print(">>> ", end="", file=out, flush=True)
                continue
            lines.append(line.rstrip("\n"))
        text = "\n".join(lines)
        if text.strip() == "/reset":
            gen.history.clear()
            continue
        if text.startswith("/image ") and hasattr(gen, "images"):
            gen.images.append(text[len("/image ") :].strip())
            print(f"attached {gen.images[-1]}", file=out, flush=True)
            continue
        streamer = TextStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
        history = gen.history if gen.is_chat else None
        reply = gen.answer(text, history, stream=streamer)
        if gen.is_chat:
            gen.history += [
                {"role": "user", "content": text},
                {"role": "assistant", "content": reply},
            ]


def _history_messages(history: list[Any]) -> list[dict[str, str]]:
    """Gradio's chat history (message dicts, or [user, bot] pairs) as role/content messages."""
    out: list[dict[str, str]] = []
    for item in history:
        if isinstance(item, dict):
            content = item.get("content")
            if isinstance(content, list):  # gradio 6: a list of typed parts
                content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
            out.append({"role": str(item.get("role")), "content": str(content or "")})
        elif isinstance(item, list | tuple) and len(item) == 2:
            out += [
                {"role": "user", "content": str(item[0] or "")},
                {"role": "assistant", "content": str(item[1] or "")},
            ]
    return out


def serve_gradio(
    gen: Generator,
    title: str,
    server_name: str = "127.0.0.1",
    server_port: int = 7860,
    share: bool = False,
) -> None:
    """Serve a chat page (gradio) that answers with the same prompts as the CLI; blocks."""
    import importlib.util

    if importlib.util.find_spec("gradio") is None:
        from newtune.errors import ConfigError

        raise ConfigError(
            "`--gradio` needs gradio, which is not installed; run `pip install 'newtune[gradio]'`."
        )
    import threading

    import gradio as gr
    from transformers import TextIteratorStreamer

    vision = hasattr(gen, "images")  # a VLM: the page takes images with the text

    def chat(message: Any, history: list[Any], max_new_tokens: float) -> Any:
        past = _history_messages(history) if gen.is_chat else None
        extra: dict[str, Any] = {}
        if isinstance(message, dict):  # a multimodal textbox: {"text", "files"}
            files = [f if isinstance(f, str) else f.get("path") for f in message.get("files") or []]
            extra = {"images": files} if vision else {}
            message = message.get("text") or ""
        streamer = TextIteratorStreamer(gen.tokenizer, skip_prompt=True, skip_special_tokens=True)
        options = dataclasses.replace(gen.options, max_new_tokens=int(max_new_tokens))
        worker = threading.Thread(
            target=gen.answer,
            args=(message, past),
            kwargs={"stream": streamer, "options": options, **extra},
        )
        worker.start()
        text = ""
        for piece in streamer:
            text += piece
            yield text.strip()
        worker.join()

    budget = gr.Slider(1, 4096, value=gen.options.max_new_tokens, step=1, label="max new tokens")
    page = gr.ChatInterface(
        chat,
        title=title,
        additional_inputs=[budget],
        api_name="chat",
        analytics_enabled=False,
        multimodal=vision,
    )
    page.launch(server_name=server_name, server_port=server_port, share=share)


__all__ = [
    "Conversation",
    "GenerationOptions",
    "Generator",
    "answer_lines",
    "build_generator",
    "interactive",
    "serve_gradio",
]
