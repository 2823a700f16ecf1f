"""Inference and evaluation of a vision-language model, with prompts built as training built them.

The prompt of `newtune inference --image PATH --prompt TEXT` is a user message whose content is
the image parts then the text; `VisionCollator.render` renders it with the processor's chat
template and the generation prompt, the same code that renders training rows.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from newtune.config.resolve import resolve
from newtune.config.schema import NewtuneConfig
from newtune.data.vision import VisionCollator
from newtune.models.adapters import load_adapter
from newtune.models.processor import load_processor, load_vlm
from newtune.models.tokenizer import resize_embeddings

log = logging.getLogger(__name__)

_PROCESSOR_FILES = ("processor_config.json", "preprocessor_config.json")


def load_trained_vlm(
    config: NewtuneConfig, model_source: str, adapter_dir: str | None
) -> tuple[Any, Any]:
    """(model in eval mode with its adapter, processor) as `inference.choose_model` picked them."""
    folder = adapter_dir or model_source
    own = any((Path(folder) / name).is_file() for name in _PROCESSOR_FILES)
    processor = load_processor(config, folder if own else None).processor
    plan = resolve(config)
    model = load_vlm(config, model_source, plan.dtype, plan)
    resize_embeddings(model, processor.tokenizer, config)
    if plan.device != "cpu" and getattr(model, "hf_device_map", None) is None:
        model = model.to(plan.device)
    if adapter_dir:
        model = load_adapter(model, adapter_dir)
    log.info("model: %s%s", model_source, f" + adapter {adapter_dir}" if adapter_dir else "")
    model.eval()
    return model, processor


@dataclass
class VisionGenerator:
    """A VLM, its processor and the training collator that renders prompts."""

    model: Any
    processor: Any
    collator: VisionCollator
    options: Any
    history: list[dict[str, Any]] = field(default_factory=list)
    images: list[str] = field(default_factory=list)  # attached to the next prompt
    is_chat = True

    @property
    def tokenizer(self) -> Any:
        """The processor's tokenizer (streamers decode with it)."""
        return self.processor.tokenizer

    def messages(self, text: str, images: list[Any], history: list | None) -> list[dict]:
        """The conversation of a prompt: history, then a user turn of images then text."""
        parts: list[dict[str, Any]] = [{"type": "image", "image": im} for im in images]
        parts.append({"type": "text", "text": text})
        return [*(history or []), {"role": "user", "content": parts}]

    def batch(self, text: str, images: list[Any], history: list | None = None) -> dict:
        """Processor inputs of the prompt, rendered by the training collator's code."""
        rows = {"messages": self.messages(text, images, history), "_origin": "the prompt"}
        rendered = self.collator.render(rows, add_generation_prompt=True)
        out = self.processor(
            text=[rendered.text],
            images=[rendered.images] if rendered.images else None,
            return_tensors="pt",
            add_special_tokens=False,
        )
        return {k: v.to(self.model.device) for k, v in out.items() if hasattr(v, "to")}

    def answer(
        self,
        text: str,
        history: list | None = None,
        stream: Any = None,
        options: Any = None,
        images: list[Any] | None = None,
    ) -> str:
        """The model's answer to `text` about `images` (default: the attached images)."""
        images = list(self.images if images is None else images)
        self.images = []
        inputs = self.batch(text, images, history)
        tok = self.processor.tokenizer
        with torch.no_grad():
            out = self.model.generate(
                **inputs,
                pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id,
                streamer=stream,
                **(options or self.options).kwargs(),
            )
        prompt = inputs["input_ids"].shape[1]
        return tok.decode(out[0, prompt:], skip_special_tokens=True).strip()


def build_vision_generator(
    config: NewtuneConfig, options: Any, base_overridden: bool = False
) -> VisionGenerator:
    """The trained VLM (adapter, full fine-tune or base) ready to answer prompts with images."""
    from newtune.inference import choose_model
    from newtune.train.methods.vision import vision_collator

    model, processor = load_trained_vlm(config, *choose_model(config, base_overridden))
    collator = vision_collator(config, processor)
    collator.base_dir = Path.cwd()
    return VisionGenerator(model, processor, collator, options)


def evaluate_vision(
    loaded: Any, split: str, base_only: bool, base_overridden: bool
) -> dict[str, Any]:
    """`newtune evaluate` on image rows: trained-token mean loss over the split."""
    from newtune.data.prepare import prepare_data
    from newtune.inference import choose_model
    from newtune.train.evaluate import loss_summary, split_of
    from newtune.train.methods.vision import eval_batches
    from newtune.train.trainer import token_loss

    config = loaded.config
    _, prepared = prepare_data(loaded)
    dataset = split_of(prepared.data, split)
    source, adapter_dir = choose_model(config, base_overridden, base_only)
    model, processor = load_trained_vlm(config, source, adapter_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device)
    total, count = token_loss(model, eval_batches(config, processor, dataset), device)
    return {
        **loss_summary(total, count, split, dataset),
        "split": split,
        "model": source,
        "adapter": adapter_dir,
        "sample_packing": False,
    }
