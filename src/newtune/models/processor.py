"""Vision-language models: the processor beside the tokenizer, the model class, frozen modules.

A config is multimodal when it sets `processor_type` (`config.schema.multimodal`). Its
processor (image processor + tokenizer) is loaded from the base model (or from a folder newtune
wrote), with the config's added tokens, pad token and chat template; its model is loaded as
`AutoModelForImageTextToText` unless `model_type` names a class. The vision tower and projector
stay frozen unless `freeze_mm_modules: false`, and `lora_target_linear` adapts only the
language model's linear layers.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from newtune.chat_templates import resolve_chat_template
from newtune.config.schema import NewtuneConfig
from newtune.config.schema.multimodal import is_multimodal
from newtune.errors import ModelError
from newtune.models.location import check_json_files, load_error, locate, transformers_class

log = logging.getLogger(__name__)

VLM_CLASS = "AutoModelForImageTextToText"
# Processors whose constructor needs a video processor (torchvision) that images never use.
_VIDEO_PROCESSORS = {
    "Qwen2VLProcessor": ("<|image_pad|>", "<|video_pad|>"),
    "Qwen2_5_VLProcessor": ("<|image_pad|>", "<|video_pad|>"),
}
# Where the language model lives in the VLMs transformers 5 builds (`get_decoder` first).
_LANGUAGE_MODULES = ("language_model", "text_model")


class LoadedProcessor(NamedTuple):
    """A processor ready for training and the token ids the config added."""

    processor: Any
    new_ids: list[int]


def load_processor(config: NewtuneConfig, source: str | None = None) -> LoadedProcessor:
    """The processor of `source` (a folder newtune wrote) or `base_model`, set up as the config
    says: added tokens, pad token and chat template on its tokenizer."""
    from transformers import AutoProcessor

    from newtune.models.tokenizer import add_tokens

    value = source or config.base_model
    key = "base_model" if source is None else "output_dir"
    loc = locate(value, key)
    check_json_files(key, value, loc)
    cls = transformers_class(
        "processor_type", config.processor_type, AutoProcessor, "AutoProcessor or LlavaProcessor"
    )
    kwargs: dict[str, Any] = {"trust_remote_code": bool(config.trust_remote_code)}
    if source is None and config.revision_of_model:
        kwargs["revision"] = config.revision_of_model
    try:
        processor = cls.from_pretrained(loc.name_or_path, **kwargs)
    except (AttributeError, ImportError, ModuleNotFoundError) as exc:
        processor = _without_video(loc.name_or_path, kwargs, value, exc)
    except (OSError, ValueError) as exc:
        raise load_error(key, value, loc, exc) from exc
    tok = getattr(processor, "tokenizer", None)
    if tok is None or not hasattr(processor, "image_processor"):
        raise ModelError(
            f"`{key}: {value}` loads as {type(processor).__name__}, which is not an image "
            "processor with a tokenizer; a vision-language model needs one (a model folder with "
            "processor_config.json / preprocessor_config.json), or remove `processor_type` to "
            "train a text model"
        )
    new_ids = add_tokens(tok, config)
    template = resolve_chat_template(
        config.chat_template, processor.chat_template or tok.chat_template
    )
    if template is None:
        raise ModelError(
            f"`{key}: {value}`: its processor and tokenizer have no chat template; set "
            "`chat_template` (e.g. qwen2_vl, llava, gemma3, smolvlm, llama3_2_vision)"
        )
    processor.chat_template = tok.chat_template = template
    if tok.pad_token is None:
        tok.pad_token = tok.unk_token or tok.eos_token
    return LoadedProcessor(processor, new_ids)


def _without_video(path: str, kwargs: dict[str, Any], value: str, exc: Exception) -> Any:
    """A Qwen2/2.5-VL processor built without its video processor (which needs torchvision)."""
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.processing_utils import ProcessorMixin

    name = _processor_class(path)
    if name not in _VIDEO_PROCESSORS:
        hint = (
            " torchvision is not installed, and this processor may need it: `pip install "
            "torchvision` (matching your torch)."
            if importlib.util.find_spec("torchvision") is None
            else ""
        )
        raise ModelError(
            f"`base_model: {value}`: its processor ({name or 'unknown class'}) cannot be "
            f"loaded ({type(exc).__name__}: {exc}).{hint}"
        ) from exc
    import transformers

    parent = getattr(transformers, name)
    image_token, video_token = _VIDEO_PROCESSORS[name]

    def __init__(
        self: Any, image_processor: Any, tokenizer: Any, chat_template: Any = None
    ) -> None:
        self.image_token, self.video_token = image_token, video_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    images_only = type(name, (parent,), {"__init__": __init__})  # saves under the same name
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    image_processor = AutoImageProcessor.from_pretrained(path, **kwargs)
    log.info("%s: loaded without its video processor (torchvision is not installed)", name)
    return images_only(image_processor, tokenizer, chat_template=_chat_template_file(path))


def _processor_class(path: str) -> str | None:
    """The `processor_class` a model folder names (processor or preprocessor config)."""
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        file = Path(path) / name
        if file.is_file():
            try:
                found = json.loads(file.read_text(encoding="utf-8")).get("processor_class")
            except (OSError, ValueError):
                continue
            if found:
                return str(found)
    return None


def _chat_template_file(path: str) -> str | None:
    folder = Path(path)
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if (folder / "chat_template.json").is_file():
        return json.loads((folder / "chat_template.json").read_text()).get("chat_template")
    return None


def model_options(config: NewtuneConfig, plan: Any = None, quantize: bool = True) -> Any:
    """ModelOptions for the config; a multimodal config loads `AutoModelForImageTextToText`."""
    from newtune.models.load import ModelOptions

    options = ModelOptions.from_config(config, plan, quantize)
    if is_multimodal(config) and not config.model_type:
        options = dataclasses.replace(options, model_type=VLM_CLASS)
    return options


def language_prefix(model: Any) -> str | None:
    """The module name of the language model inside a VLM (e.g. `model.language_model`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    names = {id(m): n for n, m in model.named_modules()}
    if decoder is not None and decoder is not model and names.get(id(decoder)):
        return names[id(decoder)]
    for name, _ in model.named_modules():
        if name.rsplit(".", 1)[-1] in _LANGUAGE_MODULES:
            return name
    return None


def freeze_vision(model: Any, config: NewtuneConfig) -> int:
    """Freeze every parameter outside the language model and the output head (vision tower,
    projector) unless `freeze_mm_modules: false`; returns how many tensors were frozen."""
    if config.freeze_mm_modules is False:
        return 0
    prefix = language_prefix(model)
    if prefix is None:
        raise ModelError(
            f"{type(model).__name__}: newtune cannot find its language model (no get_decoder, "
            "language_model or text_model) to keep the vision modules frozen; set "
            "`freeze_mm_modules: false` to train every module"
        )
    head = model.get_output_embeddings()
    head_ids = {id(p) for p in head.parameters()} if head is not None else set()
    frozen = 0
    for name, param in model.named_parameters():
        if not name.startswith(prefix + ".") and id(param) not in head_ids:
            param.requires_grad_(False)
            frozen += 1
    log.info("freeze_mm_modules: %d vision/projector tensors frozen", frozen)
    return frozen


def language_lora_config(config: NewtuneConfig, model: Any) -> NewtuneConfig:
    """The config with `lora_target_linear` read as the language model's linear layers only
    (a peft regex), unless `freeze_mm_modules: false` (then every linear layer)."""
    if not config.lora_target_linear or config.freeze_mm_modules is False:
        return config
    prefix = language_prefix(model)
    if prefix is None:
        return config
    inner = model.get_submodule(prefix)
    names = set(linear_names_of(inner)) - set(linear_names_heads(model))
    listed = config.lora_target_modules
    if isinstance(listed, list):
        names |= set(listed)
    if not names:
        return config
    regex = rf"{re.escape(prefix)}\..*\.({'|'.join(sorted(map(re.escape, names)))})"
    return config.model_copy(update={"lora_target_modules": regex, "lora_target_linear": False})


def linear_names_of(module: Any) -> list[str]:
    """Last name component of every linear layer inside `module`."""
    import torch

    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in module.named_modules()
            if name and (isinstance(m, torch.nn.Linear) or "Linear" in type(m).__name__)
        }
    )


def linear_names_heads(model: Any) -> list[str]:
    """The output head's name (never a LoRA target)."""
    head = model.get_output_embeddings()
    return [n.rsplit(".", 1)[-1] for n, m in model.named_modules() if m is head and n]


def build_vlm(config: NewtuneConfig, plan: Any, tokenizer: Any, new_ids: Sequence[int] = ()) -> Any:
    """The vision-language model to train: loaded, resized, vision frozen, adapter attached."""
    from newtune.models.adapters import attach_lora, describe_parameters
    from newtune.models.load import enable_gradient_checkpointing, load_model
    from newtune.models.tokenizer import resize_embeddings

    options = model_options(config, plan)
    model = load_model(config.base_model, plan.dtype, options=options)
    model.config.use_cache = False
    resize_embeddings(model, tokenizer, config)
    freeze_vision(model, config)
    if options.quantize is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model, config)
    if plan.train_mode in ("lora", "qlora"):
        model = attach_lora(model, language_lora_config(config, model), new_tokens=bool(new_ids))
    log.info(describe_parameters(model))
    return model


def load_vlm(config: NewtuneConfig, source: str, dtype: str, plan: Any = None) -> Any:
    """A vision-language model from `source` for inference or merging."""
    from newtune.models.load import load_model

    return load_model(source, dtype, options=model_options(config, plan))


def merge_vlm(
    config: NewtuneConfig, adapter_dir: str, out_dir: Path, dtype: str, processor: Any
) -> Path:
    """Merge a VLM's LoRA adapter in memory (peft, fp32) and write model + processor atomically.

    The streaming merge maps adapter names onto the base's shard names, which VLM checkpoints
    often spell in an older layout that transformers converts at load; peft's merge on the
    loaded model has no such gap. The folder loads with AutoModelForImageTextToText and
    AutoProcessor.
    """
    import torch

    from newtune.fileio import replace_dir, temp_dir_beside
    from newtune.models.adapters import load_adapter
    from newtune.models.load import DTYPES, load_model
    from newtune.models.tokenizer import resize_embeddings

    options = model_options(config, quantize=False)
    options = dataclasses.replace(options, device_map=None, max_memory=None)
    model = load_model(config.base_model, "float32", options=options)
    resize_embeddings(model, processor.tokenizer, config)
    model = load_adapter(model, adapter_dir).merge_and_unload().to(DTYPES[dtype])
    model.config.name_or_path = str(out_dir)
    tmp = temp_dir_beside(out_dir)
    try:
        with torch.no_grad():
            model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        replace_dir(tmp, out_dir)
    finally:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
