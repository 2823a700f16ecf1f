"""Masked-diffusion LM training (LLaDA-style), Axolotl's DiffusionPlugin and its `diffusion:` block.

The forward process: each row draws t ~ U(0, 1); its maskable tokens (trained labels, i.e.
completions under SFT and every token of pretraining rows, never BOS/EOS/padding) are replaced
by the mask token with probability p = (1 - eps) t + eps. The model reads the noisy row with
bidirectional attention (a 4-D mask built by transformers' own mask interface for the model's
sdpa/eager attention: a token attends to every token of its own sample, so packed samples stay
isolated) and predicts the original tokens at the masked positions. The causal LM head keeps its
alignment: token i is predicted from the output at i - 1 (at a sample's first position, from its
own output). The loss is Axolotl's: per row, the masked tokens' cross-entropy, divided by p when
`importance_weighting`, summed and divided by the row's trained-label count; the rows' mean.

Every `generation_interval` steps (`generate_samples`), a few sequences of the eval split (else
of the last training batch) are masked (SFT: the whole completion; else a random 10-70% of the
tokens) and denoised in `generation_steps` steps that each unmask the most confident predictions;
the original, masked and generated texts are logged.

`install` turns a built NewtuneTrainer (padded, packed or streamed) into a diffusion trainer: it
resolves the mask token, swaps in the diffusion loss, eval and metrics, and adds the callback.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from transformers import TrainerCallback

from newtune.config.schema.compat3 import DiffusionArgs
from newtune.data.tokenize import IGNORE_INDEX
from newtune.errors import ConfigError, DataError, ModelError
from newtune.train.methods.base import Method, MetricLog, mask_readers, unwrap
from newtune.train.trainer import head_can_skip

log = logging.getLogger(__name__)

DEFAULT_MASK_TOKEN = "<|diffusion_mask|>"  # Axolotl's default, added when the tokenizer lacks it
METRICS = (
    "accuracy",
    "mask_ratio",
    "num_masked_tokens",
    "avg_p_mask",
    "ce_loss",
    "importance_weight_avg",
    "answer_ratio",
    "avg_answer_length",
)


@dataclass
class Noised:
    """A batch after the forward process: noisy ids, which positions are masked, and p."""

    input_ids: torch.Tensor  # [B, L] with masked positions replaced by the mask token
    masked: torch.Tensor  # [B, L] bool
    p_mask: torch.Tensor  # [B, L] the row's mask probability at maskable positions, else 0


# -- batch layout -------------------------------------------------------------------------------


def segments_of(batch: dict[str, Any]) -> torch.Tensor:
    """Per-token sample ids of a batch: tokens attend to each other only within one id.

    Packed rows (restarting `position_ids`, no 2-D mask): a new id where a position restarts at
    0 (padding at a row's end is a sample of its own). Padded rows: 1 for real tokens, 0 for
    padding (padding attends only to padding, so no attention row is empty).
    """
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return mask.to(device=ids.device, dtype=torch.long)
    positions = batch.get("position_ids")
    if positions is None:
        return torch.ones_like(ids)
    positions = positions.expand_as(ids)
    return (positions == 0).long().cumsum(-1)


def segment_starts(segments: torch.Tensor) -> torch.Tensor:
    """True at the first token of each sample (where the sample id changes, and position 0)."""
    starts = torch.ones_like(segments, dtype=torch.bool)
    starts[:, 1:] = segments[:, 1:] != segments[:, :-1]
    return starts


def bidirectional_mask(model: Any, segments: torch.Tensor, dtype: torch.dtype) -> Any:
    """The 4-D attention mask of the model's attention implementation (transformers'
    `ALL_MASK_ATTENTION_FUNCTIONS`): query and key attend iff they share a sample id, in both
    directions. sdpa gets a boolean mask, eager an additive one; both models use it as given."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    config = unwrap(model).config
    impl = getattr(config, "_attn_implementation", None) or "sdpa"
    if impl not in ("sdpa", "eager"):
        raise ConfigError(
            f"masked-diffusion training attends bidirectionally through a 4-D attention mask, "
            f"which attn_implementation `{impl}` does not take; set `attn_implementation: sdpa` "
            "(or eager)"
        )
    batch, length = segments.shape

    def same_sample(b: Any, h: Any, q: Any, kv: Any) -> Any:
        return segments[b, q] == segments[b, kv]

    return ALL_MASK_ATTENTION_FUNCTIONS[impl](
        batch_size=batch,
        q_length=length,
        kv_length=length,
        mask_function=same_sample,
        attention_mask=None,
        allow_is_causal_skip=False,
        allow_is_bidirectional_skip=False,
        dtype=dtype,
        device=segments.device,
    )


def model_dtype(model: Any) -> torch.dtype:
    """The dtype of the model's input embeddings (the additive eager mask's dtype)."""
    return unwrap(model).get_input_embeddings().weight.dtype


def diffusion_forward(
    model: Any,
    input_ids: torch.Tensor,
    segments: torch.Tensor,
    position_ids: torch.Tensor | None = None,
    wanted: torch.Tensor | None = None,
    head_skip: bool = True,
) -> torch.Tensor:
    """Logits predicting each token at its own position, under bidirectional attention.

    The causal head predicts token i from the output at i - 1; a sample's first token from its
    own output. `wanted` (bool [B, L]): only those positions' logits are returned, flattened
    in row-major order, and (with `head_skip`, when the forward takes a boolean
    `logits_to_keep`) the head projects only the outputs they need; else [B, L, V].
    """
    starts = segment_starts(segments)
    source = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
    source = torch.where(starts, source, source - 1)  # the output each position reads
    inputs: dict[str, Any] = {
        "input_ids": input_ids,
        "attention_mask": bidirectional_mask(model, segments, model_dtype(model)),
        "use_cache": False,
    }
    if position_ids is not None:
        inputs["position_ids"] = position_ids
    if wanted is None or not head_skip or not head_can_skip(unwrap(model)):
        logits = model(**inputs).logits
        aligned = logits.gather(1, source.unsqueeze(-1).expand(-1, -1, logits.shape[-1]))
        return aligned if wanted is None else aligned[wanted]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1)
    keep = torch.zeros_like(wanted)
    keep[rows.expand_as(source)[wanted], source[wanted]] = True
    logits = model(**inputs, logits_to_keep=keep).logits.reshape(-1, model_vocab(model))
    index = keep.flatten().long().cumsum(0) - 1  # row-major index of each kept output
    flat = (rows * input_ids.shape[1] + source)[wanted]
    return logits[index[flat]]


def model_vocab(model: Any) -> int:
    """Size of the output head's vocabulary."""
    return int(unwrap(model).get_output_embeddings().weight.shape[0])


# -- the method -------------------------------------------------------------------------------


def special_token_id(tokenizer: Any, text: str) -> int | None:
    """The id of `text` when the tokenizer holds it as one special token (a named special
    token, or an added token marked special, e.g. Llama 3's reserved tokens), else None."""
    named = set(getattr(tokenizer, "all_special_tokens", []) or [])
    added = {
        token.content: int(i)
        for i, token in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).items()
        if getattr(token, "special", False)
    }
    if text in added:
        return added[text]
    found = tokenizer.convert_tokens_to_ids(text) if text in named else None
    return int(found) if isinstance(found, int) and found != tokenizer.unk_token_id else None


class DiffusionMethod(Method):
    """Masked-diffusion training on SFT or pretraining rows (`input_ids`/`labels`)."""

    name = "diffusion"
    columns = ("input_ids", "labels")
    metric_names = METRICS

    def __init__(self, config: Any = None) -> None:
        self.config = config
        given = getattr(config, "diffusion", None)
        self.settings: DiffusionArgs = given if given is not None else DiffusionArgs()
        self.mask_token_id: int | None = self.settings.mask_token_id
        self.special_ids: tuple[int, ...] = ()
        self.sft = bool(getattr(config, "datasets", None))  # Axolotl's answer_* metrics
        # liger's fused head owns the forward: every position's logits, no logits_to_keep mask
        self.head_skip = not getattr(config, "liger_fused_linear_cross_entropy", None)

    @property
    def is_preference(self) -> bool:
        """Diffusion trains on SFT rows."""
        return False

    def describe(self) -> str:
        """How the config named this method."""
        return "DiffusionPlugin"

    # -- mask token ----------------------------------------------------------------------------

    def resolve_mask_token(self, tokenizer: Any, model: Any = None, add: bool = True) -> int:
        """The mask token id: `mask_token_id`, else `mask_token_str` (default
        `<|diffusion_mask|>`) as an existing special token, else added (embeddings resized)
        when `add` (training), else a ConfigError (evaluating a trained model)."""
        vocab = len(tokenizer)
        if model is not None:
            vocab = max(vocab, model_vocab(model))
        given = self.settings.mask_token_id
        if given is not None:
            if given >= vocab:
                raise ConfigError(
                    f"`diffusion.mask_token_id: {given}` is not a token of the model (its "
                    f"vocabulary has {vocab} ids); use an unused special token's id (e.g. "
                    "128002 for Llama 3), or remove it to add `mask_token_str`"
                )
            return self._use(tokenizer, given)
        text = self.settings.mask_token_str or DEFAULT_MASK_TOKEN
        found = special_token_id(tokenizer, text)
        if found is not None:
            return self._use(tokenizer, found)
        if not add:
            raise ConfigError(
                f"the model's tokenizer has no special token {text!r} to mask with: evaluate "
                "the output of the diffusion run (its tokenizer holds the token it added), or "
                "set `diffusion.mask_token_id`"
            )
        tokenizer.add_special_tokens({"additional_special_tokens": [text]})
        if model is not None and len(tokenizer) > model_vocab(model):
            unwrap(model).resize_token_embeddings(len(tokenizer))
        added = int(tokenizer.convert_tokens_to_ids(text))
        log.info("diffusion: added the mask token %r as id %s", text, added)
        return self._use(tokenizer, added)

    def for_inference(self, tokenizer: Any, model: Any) -> DiffusionMethod:
        """This method, its mask token found in a trained model's tokenizer (none is added)."""
        self.resolve_mask_token(tokenizer, model, add=False)
        log.info(
            "diffusion: answers fill max_new_tokens mask tokens (id %s) in %s denoising steps",
            self.mask_token_id,
            self.settings.num_diffusion_steps,
        )
        return self

    def _use(self, tokenizer: Any, token_id: int) -> int:
        """Take `token_id` as the mask token (not BOS/EOS/pad, which are never masked)."""
        ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
        self.special_ids = tuple(sorted({int(i) for i in ids if i is not None}))
        if int(token_id) in self.special_ids:
            raise ConfigError(
                f"the diffusion mask token (id {token_id}) is the tokenizer's BOS, EOS or pad "
                f"token (ids {', '.join(map(str, self.special_ids))}), which the forward "
                "process never masks and the data already holds; set `diffusion.mask_token_id` "
                "to an unused special token (e.g. 128002 for Llama 3) or `mask_token_str` to a "
                "new one"
            )
        self.mask_token_id = int(token_id)
        return self.mask_token_id

    # -- forward process and loss --------------------------------------------------------------

    def maskable(self, batch: dict[str, Any]) -> torch.Tensor:
        """Positions the forward process may mask: trained labels that are not BOS/EOS/pad."""
        ids = batch["input_ids"]
        allowed = batch["labels"] != IGNORE_INDEX
        mask = batch.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            allowed &= mask.bool()
        for token in self.special_ids:
            allowed &= ids != token
        return allowed

    def noise(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Noised:
        """The forward process: t ~ U(0, 1) per row, each maskable token masked with
        p = (1 - eps) t + eps."""
        if self.mask_token_id is None:
            raise ValueError("resolve_mask_token first")
        ids = batch["input_ids"]
        rows, length = ids.shape
        eps = self.settings.eps
        t = torch.rand(rows, device=ids.device, generator=generator)
        p = ((1 - eps) * t + eps)[:, None].expand(rows, length)
        draws = torch.rand((rows, length), device=ids.device, generator=generator)
        allowed = self.maskable(batch)
        masked = (draws < p) & allowed
        noisy = torch.where(masked, torch.full_like(ids, self.mask_token_id), ids)
        return Noised(noisy, masked, torch.where(allowed, p, torch.zeros_like(p)))

    def reduce(
        self, token_loss: torch.Tensor, noised: Noised, labels: torch.Tensor
    ) -> torch.Tensor:
        """Axolotl's normalisation: per row, sum(CE / p) over its masked tokens divided by the
        row's trained-label count (at least 1); the mean over rows."""
        weights = noised.p_mask[noised.masked].float()
        weighted = token_loss / weights if self.settings.importance_weighting else token_loss
        rows = noised.masked.nonzero()[:, 0]
        per_row = torch.zeros(labels.shape[0], device=labels.device, dtype=weighted.dtype)
        per_row = per_row.index_add(0, rows, weighted)
        counts = (labels != IGNORE_INDEX).sum(1).clamp(min=1).to(per_row.dtype)
        return (per_row / counts).mean()

    def loss(
        self, model: Any, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The diffusion loss of a padded or packed batch, and its metrics."""
        noised = self.noise(batch, generator)
        ids, labels = batch["input_ids"], batch["labels"]
        segments = segments_of(batch)
        positions = None if batch.get("attention_mask") is not None else batch.get("position_ids")
        device = ids.device
        if not noised.masked.any():  # nothing masked: a zero loss that still reaches the graph
            logits = diffusion_forward(
                model, noised.input_ids, segments, positions, noised.masked, self.head_skip
            )
            loss = logits.sum() * 0.0
            zero = torch.zeros((), device=device)
            metrics = {
                "accuracy": zero,
                "ce_loss": zero,
                "mask_ratio": zero,
                "num_masked_tokens": zero,
                "avg_p_mask": zero,
            }
            if self.settings.importance_weighting:
                metrics["importance_weight_avg"] = torch.ones((), device=device)
            return loss, {**metrics, **self._answer_metrics(labels)}
        logits = diffusion_forward(
            model, noised.input_ids, segments, positions, noised.masked, self.head_skip
        )
        targets = ids[noised.masked]
        token_loss = F.cross_entropy(logits.float(), targets, reduction="none")
        loss = self.reduce(token_loss, noised, labels)
        with torch.no_grad():
            p = noised.p_mask[noised.masked].float()
            metrics = {
                "accuracy": (logits.argmax(-1) == targets).float().mean(),
                "ce_loss": token_loss.mean(),
                "mask_ratio": noised.masked.float().mean(),
                "num_masked_tokens": noised.masked.sum().float(),
                "avg_p_mask": p.mean(),
            }
            if self.settings.importance_weighting:
                metrics["importance_weight_avg"] = (1.0 / p).mean()
        return loss, {**metrics, **self._answer_metrics(labels)}

    def _answer_metrics(self, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.sft:
            return {}
        answer = (labels != IGNORE_INDEX).float()
        return {"answer_ratio": answer.mean(), "avg_answer_length": answer.sum(1).mean()}

    # -- the trainer ---------------------------------------------------------------------------

    def install(self, trainer: Any, tokenizer: Any) -> Any:
        """Make a built NewtuneTrainer (or subclass) train and evaluate with this method."""
        check_model(trainer.model)
        self.resolve_mask_token(tokenizer, trainer.model)
        log.info(
            "diffusion: masked-diffusion training, mask token id %s, eps %s, importance "
            "weighting %s",
            self.mask_token_id,
            self.settings.eps,
            self.settings.importance_weighting,
        )
        base = type(trainer)
        trainer.__class__ = type(f"Diffusion{base.__name__}", (DiffusionTrainerMixin, base), {})
        trainer.diffusion = self
        # the loss is a micro-batch mean: Trainer divides it by the accumulation steps
        trainer.model_accepts_loss_kwargs = False
        trainer.loss_is_scaled_for_ga = False
        trainer._diffusion_log = MetricLog(self.metric_names)
        trainer._diffusion_last = None
        if self.settings.generate_samples and sharded(trainer):
            log.warning(
                "diffusion: generate_samples is off: the weights are sharded (FSDP / ZeRO-3), "
                "and rank 0 denoising alone would wait forever on the other ranks"
            )
        elif self.settings.generate_samples:
            trainer.add_callback(DiffusionSamplesCallback(trainer, self, tokenizer))
        return trainer




def check_model(model: Any) -> None:
    """ModelError for layers that do not attend through the 4-D mask (linear attention,
    state-space, ...): they would stay causal. Sliding/chunked layers attend to their whole
    sample under the mask (the window is not applied), as in Axolotl: a warning."""
    text, other, local = mask_readers(model)
    if other:
        raise ModelError(
            f"masked-diffusion training makes every layer attend bidirectionally through a 4-D "
            f"attention mask, and this model ({text.model_type}) has {', '.join(other)} layers, "
            "which do not read it and would stay causal; train a model whose layers are all "
            "attention layers (e.g. Llama, Qwen, Mistral)"
        )
    if local:
        log.warning(
            "diffusion: this model's sliding-window/chunked layers attend to the whole sample "
            "under the bidirectional mask (their window is not applied), as in Axolotl"
        )


def sharded(trainer: Any) -> bool:
    """True when the weights are sharded over ranks (FSDP, DeepSpeed ZeRO-3)."""
    if trainer.args.world_size <= 1:
        return False
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return bool(getattr(trainer, "is_deepspeed_enabled", False)) and (
        getattr(plugin, "zero_stage", 0) == 3
    )


class DiffusionTrainerMixin:
    """Diffusion loss, metrics and eval, put in front of a NewtuneTrainer class by `install`."""

    diffusion: DiffusionMethod

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        """The diffusion loss of the batch; its metrics are kept for the next log."""
        loss, metrics = self.diffusion.loss(model, inputs)
        if model.training:
            self._diffusion_log.add(metrics)
            self._diffusion_last = {k: v.detach() for k, v in inputs.items() if k in KEEP}
        return (loss, None) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Training logs get the diffusion metrics averaged since the last log."""
        if "loss" in logs:
            logs = {**logs, **self._diffusion_log.pop(self.args.device)}
        super().log(logs, start_time)  # type: ignore[misc]

    def eval_metrics(self, dataset: Any, prefix: str) -> dict[str, float]:
        """Mean diffusion loss and metrics over the eval split (`diffusion_eval`)."""
        values = diffusion_eval(
            self.diffusion, self.model, self.eval_loader(dataset), self.args.device, self.args.seed
        )
        return {f"{prefix}_{k}": v for k, v in values.items()}


def diffusion_eval(
    method: DiffusionMethod, model: Any, batches: Any, device: Any, seed: int
) -> dict[str, float]:
    """Mean diffusion loss and metrics over batches (rows weighted, across ranks), with masks
    drawn from a generator seeded by `seed`: every evaluation scores the same noised rows."""
    generator = torch.Generator(device=device).manual_seed(seed)
    metrics = MetricLog(("loss", *method.metric_names))
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, values = method.loss(model, batch, generator)
            metrics.add({"loss": loss, **values}, float(batch["input_ids"].shape[0]))
    model.train(was_training)
    return metrics.pop(device)


def evaluate_diffusion(
    method: DiffusionMethod, model: Any, tokenizer: Any, batches: Any, device: Any, seed: int
) -> dict[str, Any]:
    """`newtune evaluate` of a diffusion config: eval_loss and the diffusion metrics."""
    method.resolve_mask_token(tokenizer, model, add=False)
    values = diffusion_eval(method, model, batches, device, seed)
    if "loss" not in values:
        raise DataError("the evaluated split has no rows")
    return {f"eval_{k}": v for k, v in values.items()}


KEEP = ("input_ids", "labels", "attention_mask", "position_ids")


# -- sample generation ------------------------------------------------------------------------


def denoise(
    model: Any,
    ids: torch.Tensor,
    mask_token_id: int,
    steps: int,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fill every mask token of one sequence ([L]) in `steps` steps under bidirectional
    attention: each step predicts all masked positions and keeps the most confident
    max(1, remaining / steps left) of them (all at the last step); greedy at temperature 0,
    else Gumbel sampling at `temperature`. The mask token itself is never predicted."""
    sequence = ids.clone().unsqueeze(0)
    segments = torch.ones_like(sequence)
    for step in range(steps):
        masked = sequence[0] == mask_token_id
        remaining = int(masked.sum())
        if remaining == 0:
            break
        logits = diffusion_forward(model, sequence, segments)[0, masked].float()
        logits[:, mask_token_id] = -math.inf
        if temperature > 0:
            logits = logits / temperature
            uniform = torch.rand(logits.shape, device=logits.device, generator=generator)
            chosen = (logits - torch.log(-torch.log(uniform.clamp_min(1e-20)))).argmax(-1)
        else:
            chosen = logits.argmax(-1)
        confidence = logits.softmax(-1).gather(1, chosen.unsqueeze(1)).squeeze(1)
        count = remaining if step == steps - 1 else max(1, int(remaining / (steps - step)))
        picked = confidence.topk(min(count, remaining)).indices
        where = masked.nonzero().squeeze(1)[picked]
        sequence[0, where] = chosen[picked]
    return sequence[0]


def complete(
    method: DiffusionMethod,
    model: Any,
    tokenizer: Any,
    prompt_ids: list[int],
    new_tokens: int,
    stream: Any = None,
) -> str:
    """`newtune inference` of a diffusion model (Axolotl's completion mode): `new_tokens` mask
    tokens appended to the prompt, denoised in `num_diffusion_steps` steps at
    `generation_temperature`; the answer is the filled part up to its first EOS."""
    if method.mask_token_id is None:
        method.resolve_mask_token(tokenizer, model, add=False)
    mask_id = int(method.mask_token_id)  # type: ignore[arg-type]
    device = next(unwrap(model).parameters()).device
    prompt = torch.tensor(prompt_ids, dtype=torch.long)
    ids = torch.cat([prompt, torch.full((new_tokens,), mask_id, dtype=torch.long)]).to(device)
    settings = method.settings
    with torch.no_grad():
        out = denoise(
            model, ids, mask_id, settings.num_diffusion_steps, settings.generation_temperature
        )
    answer = out[len(prompt_ids) :].cpu()
    if tokenizer.eos_token_id is not None:
        ends = (answer == tokenizer.eos_token_id).nonzero()
        if len(ends):
            answer = answer[: int(ends[0])]
    if stream is not None:  # a transformers streamer: the prompt first (skipped), then the rest
        stream.put(prompt.unsqueeze(0))
        stream.put(answer)
        stream.end()
    return tokenizer.decode(answer.tolist(), skip_special_tokens=True).strip()


def sample_sequences(
    batch: dict[str, Any], count: int, max_length: int, generator: torch.Generator
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Up to `count` samples (ids, labels) of at least 10 tokens from a padded or packed batch,
    in random order; SFT samples keep their prompt and as much completion as fits."""
    ids, labels = batch["input_ids"].cpu(), batch["labels"].cpu()
    segments = segments_of({k: v.cpu() for k, v in batch.items()})
    found = []
    for row in range(ids.shape[0]):
        for seg in segments[row].unique().tolist():
            span = (segments[row] == seg).nonzero().squeeze(1)
            if seg == 0 and batch.get("attention_mask") is not None:
                continue  # padding
            sample_ids, sample_labels = ids[row, span], labels[row, span]
            trained = (sample_labels != IGNORE_INDEX).nonzero().squeeze(1)
            if len(sample_ids) < 10 or len(trained) == 0:
                continue
            if bool((sample_labels == IGNORE_INDEX)[1:].any()):  # SFT: prompt then completion
                prompt = int(trained[0])
                if prompt >= max_length:
                    continue
            found.append((sample_ids[:max_length], sample_labels[:max_length]))
    order = torch.randperm(len(found), generator=generator).tolist()
    return [found[i] for i in order[:count]]


def mask_for_sample(
    ids: torch.Tensor, labels: torch.Tensor, generator: torch.Generator
) -> torch.Tensor:
    """Which positions a sample hides: an SFT sample's whole completion (trained labels after
    an untrained prompt), else a random 10-70% of its tokens (at least one)."""
    trained = labels != IGNORE_INDEX
    untrained = ~trained
    untrained[0] = False  # a packed sample's first label is always -100
    if untrained.any() and trained.any():
        return trained
    ratio = 0.1 + 0.6 * float(torch.rand((), generator=generator))
    count = max(1, int(len(ids) * ratio))
    hidden = torch.zeros(len(ids), dtype=torch.bool)
    hidden[torch.randperm(len(ids), generator=generator)[:count]] = True
    return hidden


class DiffusionSamplesCallback(TrainerCallback):
    """Every `generation_interval` optimizer steps (rank 0): mask and denoise a few sequences
    and log their original, masked and generated texts."""

    def __init__(self, trainer: Any, method: DiffusionMethod, tokenizer: Any) -> None:
        self.trainer, self.method, self.tokenizer = trainer, method, tokenizer
        self.history: list[dict[str, Any]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Generate when the step is a multiple of `generation_interval`."""
        interval = self.method.settings.generation_interval
        if (
            state.global_step == 0
            or state.global_step % interval
            or not state.is_world_process_zero
        ):
            return
        samples = self.generate(state.global_step)
        self.history.extend(samples)
        for i, sample in enumerate(samples, 1):
            log.info(
                "diffusion sample %s at step %s\n  original (%s tokens): %s\n  masked (%s/%s "
                "tokens, %.1f%%): %s\n  generated: %s",
                i,
                state.global_step,
                sample["total_tokens"],
                sample["original"],
                sample["masked_tokens"],
                sample["total_tokens"],
                100 * sample["masked_tokens"] / sample["total_tokens"],
                sample["masked"],
                sample["generated"],
            )

    def _source(self) -> dict[str, Any] | None:
        trainer = self.trainer
        if trainer.eval_dataset is not None:
            for batch in trainer.eval_loader(trainer.eval_dataset):
                return batch
        return trainer._diffusion_last

    def generate(self, step: int) -> list[dict[str, Any]]:
        """Masked and denoised samples (texts, ids and the masked positions)."""
        batch = self._source()
        if batch is None:
            return []
        settings = self.method.settings
        mask_id = int(self.method.mask_token_id)  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.trainer.args.seed + step)
        model = unwrap(self.trainer.model)
        device = next(model.parameters()).device
        picked = sample_sequences(
            batch, settings.num_generation_samples, settings.generation_max_length, generator
        )
        was_training = model.training
        model.eval()
        out = []
        with torch.no_grad():
            for ids, labels in picked:
                hidden = mask_for_sample(ids, labels, generator)
                noisy = torch.where(hidden, torch.full_like(ids, mask_id), ids)
                generated = denoise(
                    model,
                    noisy.to(device),
                    mask_id,
                    settings.generation_steps,
                    settings.generation_temperature,
                    torch.Generator(device=device).manual_seed(self.trainer.args.seed + step),
                ).cpu()
                out.append(self._describe(step, ids, noisy, generated, hidden, mask_id))
        model.train(was_training)
        return out

    def _describe(
        self,
        step: int,
        ids: torch.Tensor,
        noisy: torch.Tensor,
        generated: torch.Tensor,
        hidden: torch.Tensor,
        mask_id: int,
    ) -> dict[str, Any]:
        decode = self.tokenizer.decode
        pieces = [
            "[MASK]" if t == mask_id else decode([t], skip_special_tokens=True)
            for t in noisy.tolist()
        ]
        return {
            "step": step,
            "original": decode(ids.tolist(), skip_special_tokens=True),
            "masked": "".join(pieces),
            "generated": decode(generated.tolist(), skip_special_tokens=True),
            "generated_ids": generated.tolist(),
            "masked_positions": hidden.nonzero().squeeze(1).tolist(),
            "masked_tokens": int(hidden.sum()),
            "total_tokens": len(ids),
        }
