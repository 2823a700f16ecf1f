"""EAFT, entropy-aware focal training (Axolotl's `use_eaft`, after LlamaFactory-EAFT).

Each trained token's cross-entropy is weighted by H^alpha, where H is the entropy of the
softmax over the model's k largest logits at that position (no gradient through the weight).
Confident positions (low entropy) count less, uncertain ones more. The sum is divided by the
trained-token count of the whole accumulated step (`num_items_in_batch`), like newtune's
token-normalised SFT loss, or averaged when the Trainer gives no count.

Written here because no library ships it: it is a loss of a few lines given to transformers'
Trainer as `compute_loss_func`.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch

IGNORE_INDEX = -100
DEFAULT_ALPHA = 1.0  # Axolotl's defaults
DEFAULT_K = 20


def topk_entropy(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Entropy (nats) of the softmax over each row's k largest logits, in float32."""
    top = torch.topk(logits.float(), k=min(k, logits.shape[-1]), dim=-1).values
    logp = torch.log_softmax(top, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def eaft_loss(
    outputs: Any,
    labels: torch.Tensor,
    num_items_in_batch: Any = None,
    alpha: float = DEFAULT_ALPHA,
    k: int = DEFAULT_K,
) -> torch.Tensor:
    """The EAFT loss of a causal LM's outputs: position p predicts labels[p + 1]."""
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    target = labels[:, 1:].to(logits.device)
    keep = target != IGNORE_INDEX
    kept = logits[:, :-1][keep].float()
    tokens = target[keep]
    with torch.no_grad():
        weights = topk_entropy(kept, k).pow(alpha)
    per_token = torch.nn.functional.cross_entropy(kept, tokens, reduction="none")
    weighted = per_token * weights
    if num_items_in_batch is None:
        return weighted.mean() if weighted.numel() else weighted.sum()
    count = torch.as_tensor(num_items_in_batch, device=weighted.device, dtype=weighted.dtype)
    return weighted.sum() / count


def loss_func(config: Any) -> Any:
    """The Trainer's `compute_loss_func` for the config: EAFT when `use_eaft`, else None."""
    if not getattr(config, "use_eaft", None):
        return None
    alpha = DEFAULT_ALPHA if config.eaft_alpha is None else float(config.eaft_alpha)
    k = DEFAULT_K if config.eaft_k is None else int(config.eaft_k)
    return partial(eaft_loss, alpha=alpha, k=k)
