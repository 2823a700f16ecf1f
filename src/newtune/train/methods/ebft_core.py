"""Energy-based fine-tuning (EBFT, arXiv 2603.12248): the math both modes share.

A frozen feature network (the policy as it was at init: a frozen copy, or a PEFT model with
its adapter disabled) embeds generated and ground-truth continuations; the embeddings are the
hidden states at fractional depths, each layer L2-normalised, concatenated and pooled over the
continuation's tokens. Rewards follow the paper's eq. 7 as Axolotl computes them:
`r_j = alignment_coef * 2 cos(phi_j, phi_gt) - diversity_coef * 2/(n-1) sum_{j'!=j} phi_j . phi_j'`,
optionally after SVD whitening estimated from the group's generated embeddings. Advantages are
RLOO (leave-one-out mean), group_norm ((r - mean) / std) or plain REINFORCE (r).

Shapes: a "group" is the n samples drawn for one prompt (or one block of one document); the
sample axis is always the second to last (`(..., n, D)` embeddings, `(..., n)` rewards).
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

EMBED_METHODS = ("last_token", "mean_pooling", "concat", "completion_mean")
ADVANTAGE_ESTIMATORS = ("rloo", "group_norm", "reinforce")
WHITEN_TOL = 1e-5  # singular values below tol * largest are dropped (pseudo-inverse)


# -- feature network ---------------------------------------------------------------------------


def layer_indices(num_layers: int, fractions: Sequence[float]) -> list[int]:
    """Indices into `hidden_states` for fractional depths: int(f * num_layers).

    `hidden_states[0]` is the embedding output and `hidden_states[num_layers]` the last layer's
    (after the final norm in transformers), so 0.0 is the embeddings and 1.0 the last layer.
    """
    out = []
    for frac in fractions:
        if not 0.0 <= float(frac) <= 1.0:
            raise ValueError(f"feature layer fraction {frac} is outside [0, 1]")
        out.append(int(float(frac) * num_layers))
    return out


def layer_features(hidden_states: Sequence[torch.Tensor], indices: Sequence[int]) -> torch.Tensor:
    """(B, S, len(indices) * H): the chosen layers, each L2-normalised per token, concatenated
    (float32)."""
    return torch.cat([F.normalize(hidden_states[i].float(), p=2, dim=-1) for i in indices], -1)


def _unwrap(model: Any) -> Any:
    """The model inside DDP/DeepSpeed wrappers and torch.compile."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return getattr(model, "_orig_mod", model)


def is_peft(model: Any) -> bool:
    """True for a PEFT model (its base weights are the policy at init while they stay frozen)."""
    return hasattr(_unwrap(model), "disable_adapter") and hasattr(_unwrap(model), "get_base_model")


def num_layers_of(model: Any) -> int:
    """Decoder layers of a causal LM (its text config's num_hidden_layers)."""
    config = _unwrap(model).config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.num_hidden_layers)


class FeatureNetwork:
    """The frozen feature network phi: the policy as it was when this object was made.

    A PEFT policy shares its base weights (`kind="adapter"`: the adapter is disabled while
    features are computed, which is the base at init as long as the base stays frozen); any
    other policy is deep-copied (`kind="copy"`), or `model` is used as given (`kind="model"`,
    e.g. the base loaded again from disk). Features run in eval mode without gradients.
    """

    def __init__(self, policy: Any, kind: str | None = None, model: Any = None) -> None:
        # FSDP1 gathers its shards in its own forward: an adapter network runs the wrapper
        self.runner = policy if "FullyShardedDataParallel" in type(policy).__name__ else None
        policy = _unwrap(policy)
        if kind is None:
            kind = "adapter" if is_peft(policy) else "copy"
        if kind not in ("adapter", "copy", "model"):
            raise ValueError(f"unknown feature network kind {kind!r}")
        self.kind = kind
        if kind == "adapter":
            self.model = policy
        elif kind == "copy":
            self.model = copy.deepcopy(policy)
        else:
            self.model = _unwrap(model)
        if kind != "adapter":
            self.model.requires_grad_(False)
            self.model.eval()

    @contextlib.contextmanager
    def running(self) -> Iterator[Any]:
        """The module that computes features: eval mode, no gradients, adapter disabled."""
        model = self.runner if self.kind == "adapter" and self.runner is not None else self.model
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), contextlib.ExitStack() as stack:
                if self.kind == "adapter":
                    stack.enter_context(self.model.disable_adapter())
                yield model
        finally:
            model.train(was_training)

    def features(
        self,
        input_ids: torch.Tensor,
        indices: Sequence[int],
        attention_mask: Any = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """(B, S, L * H) per-token features (`layer_features`) of a forward pass; the
        attention mask may be 2-D padding, a 4-D mask or a flex BlockMask."""
        with self.running() as model:
            out = model(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                output_hidden_states=True,
                use_cache=False,
                return_dict=True,
                **_skip_head(model),
            )
            return layer_features(out.hidden_states, indices)


def _skip_head(model: Any) -> dict[str, Any]:
    """`logits_to_keep=1` where the forward takes it: features need no vocabulary projection."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = inspect.signature(base.forward).parameters
    return {"logits_to_keep": 1} if "logits_to_keep" in params else {}


# -- pooling -----------------------------------------------------------------------------------


def pool(
    features: torch.Tensor,
    method: str,
    mask: torch.Tensor | None = None,
    prompt_lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Pool (..., S, D) per-token features into one embedding per sequence.

    `mask` (..., S): 1 on real tokens (right padding). last_token: the last real token;
    mean_pooling: the mean over real tokens; concat: the tokens at len//4, len//2 and
    3*len//4 concatenated (..., 3D); completion_mean: the mean over real tokens at positions
    >= prompt_lengths (...,).
    """
    *lead, seq, _ = features.shape
    if mask is None:
        mask = torch.ones(*lead, seq, dtype=torch.bool, device=features.device)
    mask = mask.bool()
    lengths = mask.sum(-1)  # (...)
    if method == "last_token":
        index = (lengths - 1).clamp(min=0)
        return _take(features, index)
    if method in ("mean_pooling", "completion_mean"):
        keep = mask
        if method == "completion_mean":
            if prompt_lengths is None:
                raise ValueError("embed_method completion_mean needs prompt lengths")
            positions = torch.arange(seq, device=features.device)
            keep = keep & (positions >= prompt_lengths.unsqueeze(-1))
        weights = keep.to(features.dtype).unsqueeze(-1)
        return (features * weights).sum(-2) / weights.sum(-2).clamp(min=1)
    if method == "concat":
        quarters = [lengths // 4, lengths // 2, (3 * lengths) // 4]
        return torch.cat([_take(features, q.clamp(0, seq - 1)) for q in quarters], -1)
    raise ValueError(f"unknown embed_method {method!r}; use one of {', '.join(EMBED_METHODS)}")


def _take(features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """features[..., index[...], :]."""
    gather = index.long().unsqueeze(-1).unsqueeze(-1).expand(*index.shape, 1, features.shape[-1])
    return features.gather(-2, gather).squeeze(-2)


# -- whitening and rewards ---------------------------------------------------------------------


def whiten(
    gen: torch.Tensor, gt: torch.Tensor, tol: float = WHITEN_TOL
) -> tuple[torch.Tensor, torch.Tensor]:
    """SVD whitening estimated from each group's generated embeddings, applied to both.

    gen: (..., n, D); gt: (..., D) or (..., m, D). With gen^T = U S V^T (feature space, thin
    SVD, no centring), W = U diag(1/S) U^T, singular values <= tol * max dropped
    (pseudo-inverse); returns (gen @ W, gt @ W) in float32. A group whose SVD fails is left
    unwhitened (logged).
    """
    gen32, gt32 = gen.float(), gt.float()
    single = gt32.dim() == gen32.dim() - 1
    if single:
        gt32 = gt32.unsqueeze(-2)
    try:
        u, s, _ = torch.linalg.svd(gen32.transpose(-1, -2), full_matrices=False)
    except RuntimeError as exc:  # torch.linalg.LinAlgError: no convergence
        log.warning("ebft: SVD whitening failed (%s); embeddings left unwhitened", exc)
        return gen32, gt32.squeeze(-2) if single else gt32
    top = s.amax(-1, keepdim=True)
    inv = torch.where(s > tol * top, 1.0 / s.clamp(min=1e-12), torch.zeros_like(s))

    def apply(x: torch.Tensor) -> torch.Tensor:
        return ((x @ u) * inv.unsqueeze(-2)) @ u.transpose(-1, -2)

    gen_w, gt_w = apply(gen32), apply(gt32)
    return gen_w, gt_w.squeeze(-2) if single else gt_w


def alignment(gen: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(..., n): cosine similarity of each sample to its ground truth (gt (..., D) or (..., n, D))."""
    if gt.dim() == gen.dim() - 1:
        gt = gt.unsqueeze(-2)
    return F.cosine_similarity(gen, gt.expand_as(gen), dim=-1)


def diversity(gen: torch.Tensor) -> torch.Tensor:
    """(..., n): mean dot product of each sample with the other n - 1 of its group (0 if n=1)."""
    n = gen.shape[-2]
    if n < 2:
        return torch.zeros(gen.shape[:-1], dtype=gen.dtype, device=gen.device)
    gram = gen @ gen.transpose(-1, -2)
    off = gram.sum(-1) - gram.diagonal(dim1=-2, dim2=-1)
    return off / (n - 1)


def cfm_loss(gen: torch.Tensor, gt: torch.Tensor) -> torch.Tensor:
    """(...): conditional feature-matching loss ||mean_j phi(y_j) - phi(y)||^2 (paper eq 2)."""
    if gt.dim() == gen.dim():
        gt = gt[..., 0, :]
    return ((gen.mean(-2) - gt) ** 2).sum(-1)


@dataclass(frozen=True)
class Rewards:
    """Per-sample rewards and their parts; alignment and diversity are already doubled."""

    rewards: torch.Tensor  # (..., n)
    alignment: torch.Tensor  # (..., n): 2 * cosine to the ground truth
    diversity: torch.Tensor  # (..., n): 2 * mean dot with the group's other samples
    cfm: torch.Tensor  # (...): ||mean gen - gt||^2 on the (whitened) embeddings


def feature_rewards(
    gen: torch.Tensor,
    gt: torch.Tensor,
    alignment_coef: float = 1.0,
    diversity_coef: float = 1.0,
    use_whitening: bool = False,
) -> Rewards:
    """Feature-matching rewards (paper eq 7) of each group of n generated embeddings.

    gen: (..., n, D) pooled embeddings of the samples; gt: (..., D) the ground truth's.
    reward = alignment_coef * 2 cos(gen_j, gt) - diversity_coef * 2 mean_{j'!=j} gen_j . gen_j'.
    """
    gen, gt = gen.float(), gt.float()
    if use_whitening:
        gen, gt = whiten(gen, gt)
    align = 2.0 * alignment(gen, gt)
    div = 2.0 * diversity(gen)
    return Rewards(
        rewards=alignment_coef * align - diversity_coef * div,
        alignment=align,
        diversity=div,
        cfm=cfm_loss(gen, gt),
    )


def advantages(rewards: torch.Tensor, estimator: str = "rloo") -> torch.Tensor:
    """(..., n) advantages within each group of n samples.

    rloo: r_j minus the mean of the other n - 1; group_norm: (r - mean) / (std + 1e-8)
    (unbiased std); reinforce: r. With n = 1, rloo and group_norm fall back to r.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"unknown advantage_estimator {estimator!r}; use one of "
            f"{', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    n = rewards.shape[-1]
    if estimator == "reinforce" or n < 2:
        return rewards
    if estimator == "rloo":
        total = rewards.sum(-1, keepdim=True)
        return rewards - (total - rewards) / (n - 1)
    mean = rewards.mean(-1, keepdim=True)
    return (rewards - mean) / (rewards.std(-1, keepdim=True) + 1e-8)


def policy_gradient_loss(
    logps: torch.Tensor, token_advantages: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """REINFORCE loss: mean over masked tokens of -logp * advantage (advantages detached)."""
    weights = mask.to(logps.dtype)
    total = -(logps * token_advantages.detach().to(logps.dtype) * weights).sum()
    return total / weights.sum().clamp(min=1)
