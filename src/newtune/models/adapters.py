"""LoRA adapters through peft."""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from peft import LoftQConfig, LoraConfig, PeftModel, get_peft_model

from newtune.config.schema import NewtuneConfig
from newtune.errors import ConfigError, ModelError

log = logging.getLogger(__name__)


def _module_name(model: Any, module: Any) -> str | None:
    """The last component of `module`'s name in `model` (e.g. `embed_tokens`, `lm_head`)."""
    if module is None:
        return None
    for name, candidate in model.named_modules():
        if candidate is module:
            return name.rsplit(".", 1)[-1]
    return None


def embedding_modules(model: Any) -> list[str]:
    """Names of the input and output embedding modules (one name when they are the same)."""
    names = [
        _module_name(model, model.get_input_embeddings()),
        _module_name(model, model.get_output_embeddings()),
    ]
    return [n for i, n in enumerate(names) if n and n not in names[:i]]


def linear_names(model: Any) -> list[str]:
    """Last name component of every linear layer (nn.Linear, bnb Linear4bit/8bitLt, ...) but the
    output head: the names `lora_target_linear` adapts (Axolotl's find_all_linear_names)."""
    found = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if name and (isinstance(module, torch.nn.Linear) or "Linear" in type(module).__name__)
    }
    head = _module_name(model, model.get_output_embeddings())
    return sorted(found - {head})


def lora_targets(config: NewtuneConfig, model: Any = None) -> Any:
    """`target_modules` for peft: a list of names, a regex string (peft full-matches it), or
    `all-linear`; with `lora_target_linear` a list is joined with the model's linear layers."""
    modules = config.lora_target_modules
    if not config.lora_target_linear:
        return modules
    if getattr(config, "process_reward_model", None) and model is not None:
        # peft's all-linear skips sequence classifiers' heads only; a token classifier's head
        # trains in full (TOKEN_CLS modules_to_save), so it is no LoRA target
        names = set(modules if isinstance(modules, list) else []) | set(linear_names(model))
        return sorted(names - {"score", "classifier"})
    if isinstance(modules, list) and modules:
        if model is None:
            raise ValueError("joining lora_target_modules with the linear layers needs the model")
        return sorted(set(modules) | set(linear_names(model)))
    return "all-linear"  # a regex string with lora_target_linear is refused at validation


def _peft_extras(config: NewtuneConfig) -> dict[str, Any]:
    """The `peft:` mapping as LoraConfig arguments (`loftq_config` becomes a LoftQConfig)."""
    extras = dict(config.peft or {})
    fields = {f.name for f in dataclasses.fields(LoraConfig)}
    for key in extras:
        if key not in fields:
            match = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f" Did you mean `{match[0]}`?" if match else ""
            raise ConfigError(f"`peft.{key}` is not a peft LoraConfig option.{hint}")
    if "loftq_config" in extras:
        loftq = extras["loftq_config"] or {}
        if importlib.util.find_spec("scipy") is None:
            raise ConfigError(
                "`peft.loftq_config` needs scipy (peft uses it): `pip install scipy`."
            )
        try:
            extras["loftq_config"] = LoftQConfig(**loftq)
        except TypeError as exc:
            raise ConfigError(f"`peft.loftq_config` is not valid: {exc}") from exc
        extras.setdefault("init_lora_weights", "loftq")
    return extras


def _task_type(config: NewtuneConfig) -> str:
    """peft's task type: its classifier heads (`score`/`classifier`) are trained in full."""
    if getattr(config, "reward_model", None):
        return "SEQ_CLS"
    if getattr(config, "process_reward_model", None):
        return "TOKEN_CLS"
    return "CAUSAL_LM"


def lora_config(config: NewtuneConfig, model: Any = None, new_tokens: bool = False) -> LoraConfig:
    """peft's LoraConfig for this config's `lora_*` and `peft_*` keys.

    With `new_tokens` (the config added tokens), the embedding modules are trained in full
    (added to `lora_modules_to_save`), or the new tokens' rows would stay untrained.
    """
    targets = lora_targets(config, model)
    to_save = list(config.lora_modules_to_save or [])
    tied = bool(model is not None and getattr(model.config, "tie_word_embeddings", False))
    if new_tokens and model is not None:
        missing = [n for n in embedding_modules(model) if n not in to_save]
        if missing:
            log.warning(
                "the config adds tokens and trains a LoRA adapter: training %s in full "
                "(added to lora_modules_to_save) so the new tokens' embeddings are learned",
                ", ".join(missing),
            )
            to_save += missing
    return LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        modules_to_save=to_save or None,
        fan_in_fan_out=bool(config.lora_fan_in_fan_out),
        layers_to_transform=config.peft_layers_to_transform,
        use_rslora=bool(config.peft_use_rslora),
        use_dora=bool(config.peft_use_dora),
        ensure_weight_tying=tied and bool(to_save),
        target_parameters=config.lora_target_parameters,  # lora_target_parameters (MoE experts)
        bias="none",
        task_type=_task_type(config),
        **_peft_extras(config),
    )


def attach_lora(model: Any, config: NewtuneConfig, new_tokens: bool = False) -> Any:
    """Wrap the model with a new LoRA adapter, or continue the one in `lora_model_dir`."""
    if config.lora_model_dir:
        return load_adapter(model, config.lora_model_dir, trainable=True)
    lora = lora_config(config, model, new_tokens)
    if lora.init_lora_weights == "loftq" and not torch.cuda.is_available():
        raise ConfigError(
            "`peft.loftq_config` needs a CUDA GPU: peft computes the LoftQ initialisation on "
            "cuda. Run on a GPU machine, or remove `peft.loftq_config` to start LoRA from zero."
        )
    try:
        peft_model = get_peft_model(model, lora)
    except (ValueError, TypeError) as exc:
        raise ConfigError(
            f"Could not attach LoRA: {exc}. Check `lora_target_modules`, "
            "`lora_modules_to_save` and `peft_layers_to_transform` against the model's module "
            "names, or set `lora_target_linear: true`."
        ) from exc
    return peft_model


def load_adapter(model: Any, adapter_dir: str, trainable: bool = False) -> Any:
    """Attach a saved adapter folder to a base model."""
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise ModelError(
            f"`lora_model_dir: {adapter_dir}` has no adapter_config.json. Point it at a folder "
            "written by `newtune train` with `adapter: lora`."
        )
    return PeftModel.from_pretrained(model, adapter_dir, is_trainable=trainable)


def describe_parameters(model: Any) -> str:
    """`trainable / total` parameter counts, for the log."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable params: {trainable:,} / {total:,} ({100 * trainable / total:.3f}%)"
