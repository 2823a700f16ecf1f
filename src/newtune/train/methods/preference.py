"""Preference training maths: per-sequence log-probs (padded or packed) and the losses and metrics
of TRL 1.16's DPOTrainer (every `loss_type`), CPOTrainer (SimPO), ORPOTrainer, KTOTrainer and
RewardTrainer, in plain torch.

A batch of sequences is scored once: `sequence_logps` (padded rows) or `packed_sequence_logps`
(several sequences per row, `position_ids` restarting at 0) give a `SequenceStats`, one entry per
sequence in the caller's order, holding the summed log-probs of its trained tokens (labels not
-100, shifted by one as usual) and the token count, plus the detached sums TRL's metrics need
(entropy, mean logit, top-1 hits, the WPO alignment term). The losses take those stats, so padded
and packed batches give the same loss by construction.

Token counts are the scored (shifted) completion tokens. TRL's IPO and `sigmoid_norm` divide by
the unshifted completion mask instead; the two agree whenever the completion does not start at
position 0, i.e. whenever the prompt has at least one token (always, with a BOS token).

Metrics are returned as detached 0-dim tensors under TRL's names, for one batch on one process;
averaging over ranks and logging steps is the trainer's business. TRL's running `num_tokens` is
not a loss metric and is not returned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from newtune.config.schema.preference import DPO_LOSS_TYPES
from newtune.errors import ConfigError

IGNORE_INDEX = -100

F_DIVERGENCE_TYPES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")
F_DIVERGENCE_LOSS_TYPES = frozenset(
    {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft"}
)
CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")
KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")

Metrics = dict[str, torch.Tensor]

_TOKEN_CHUNK = 2048  # rows of the [tokens, vocab] float32 work tensors for the detached extras


@dataclass
class SequenceStats:
    """Per-sequence sums over trained tokens; `logps` carries the gradient, the rest are detached.

    `entropy`, `mean_logits` (the per-token mean over the vocabulary), `top1` (tokens whose label
    is the argmax) and `wpo` (the sum of `log p - log sum_v p_v^2`) are None when not computed.
    """

    logps: torch.Tensor
    counts: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    top1: torch.Tensor | None = None
    wpo: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.logps.shape[0])

    def __getitem__(self, index: slice | torch.Tensor) -> SequenceStats:
        """The stats of the selected sequences (a slice or an index tensor)."""
        return SequenceStats(
            **{
                f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                for f in fields(self)
            }
        )

    def halves(self) -> tuple[SequenceStats, SequenceStats]:
        """(first half, second half): chosen and rejected in the [chosen..., rejected...] order."""
        n = len(self) // 2
        if 2 * n != len(self):
            raise ValueError(f"{len(self)} sequences cannot be split into chosen and rejected")
        return self[:n], self[n:]


def _token_extras(
    logits: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Entropy, mean logit, is-argmax and `log p - log sum p^2` per token (detached, chunked)."""
    if logits.shape[0] == 0:
        empty = logits.new_zeros(0, dtype=torch.float32)
        return empty, empty, empty.bool(), empty
    parts: list[tuple[torch.Tensor, ...]] = []
    with torch.no_grad():
        for start in range(0, logits.shape[0], _TOKEN_CHUNK):
            z = logits[start : start + _TOKEN_CHUNK].detach().float()
            t = targets[start : start + _TOKEN_CHUNK]
            log_p = torch.log_softmax(z, dim=-1)
            entropy = -(log_p.exp() * log_p).sum(-1)
            log_sum_sq = torch.logsumexp(2 * log_p, dim=-1)
            target_log_p = log_p.gather(-1, t.unsqueeze(-1)).squeeze(-1)
            parts.append((entropy, z.mean(-1), z.argmax(-1) == t, target_log_p - log_sum_sq))
    entropy, mean_logits, top1, wpo = (torch.cat(column) for column in zip(*parts, strict=True))
    return entropy, mean_logits, top1, wpo


def segment_logps(
    logits: torch.Tensor,
    targets: torch.Tensor,
    sequence: torch.Tensor,
    num_sequences: int,
    *,
    extras: bool = True,
) -> SequenceStats:
    """Stats of `num_sequences` sequences from scored tokens: `logits[i]` predicts `targets[i]`,
    which belongs to sequence `sequence[i]`.

    This is the core the padded and packed forms share; it also serves logits computed only at
    trained positions ([tokens, vocab]).
    """
    z = logits.float()
    token_logps = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)
    logps = token_logps.new_zeros(num_sequences).index_add(0, sequence, token_logps)
    counts = torch.zeros(num_sequences, dtype=torch.long, device=targets.device)
    counts = counts.index_add(0, sequence, torch.ones_like(sequence))
    stats = SequenceStats(logps, counts)
    if extras:
        sums = []
        for values in _token_extras(logits, targets):
            zero = torch.zeros(num_sequences, dtype=torch.float32, device=targets.device)
            sums.append(zero.index_add(0, sequence, values.float()))
        stats.entropy, stats.mean_logits, stats.top1, stats.wpo = sums
    return stats


def sequence_logps(
    logits: torch.Tensor, labels: torch.Tensor, *, extras: bool = True
) -> SequenceStats:
    """Stats of each padded row: logits [rows, T, V] at position t score `labels[:, t + 1]`."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)
    return segment_logps(
        logits[:, :-1][keep], targets[keep], rows[keep], labels.shape[0], extras=extras
    )


def packed_segments(position_ids: torch.Tensor) -> torch.Tensor:
    """The segment of every token, numbered row-major from 0: a segment starts at position 0."""
    starts = (position_ids == 0).flatten()
    return (starts.cumsum(0) - 1).view_as(position_ids)


def packed_sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    position_ids: torch.Tensor,
    sequence_index: torch.Tensor,
    num_sequences: int,
    *,
    extras: bool = True,
) -> SequenceStats:
    """Stats of packed sequences, in their original order.

    Rows hold several sequences, `position_ids` restarting at 0 for each; segment k (row-major)
    is original sequence `sequence_index[k]`, or padding when it is -1. Each segment's first
    label must be -100 so that no sequence is scored from the previous one's last token.
    """
    segments = packed_segments(position_ids)
    n_segments = int(segments.max()) + 1
    if sequence_index.shape[0] != n_segments:
        raise ValueError(f"{n_segments} packed segments but {sequence_index.shape[0]} indices")
    if (labels[position_ids == 0] != IGNORE_INDEX).any():
        raise ValueError("a packed sequence's first label must be -100")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    sequence = sequence_index.to(labels.device)[segments[:, 1:][keep]]
    if (sequence < 0).any():
        raise ValueError("a padding segment has trained labels")
    return segment_logps(
        logits[:, :-1][keep], targets[keep], sequence, num_sequences, extras=extras
    )


def labelled_sequence_logps(
    logits: torch.Tensor,
    labels: torch.Tensor,
    label_sequence: torch.Tensor,
    num_sequences: int,
    *,
    extras: bool = True,
) -> SequenceStats:
    """Stats of sequences whose trained labels name their sequence in `label_sequence`
    (the shared-prompt layout of `methods.pack.pack_shared_pairs`)."""
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    sequence = label_sequence.to(labels.device)[:, 1:][keep]
    if (sequence < 0).any():
        raise ValueError("a trained label names no sequence")
    return segment_logps(
        logits[:, :-1][keep], targets[keep], sequence, num_sequences, extras=extras
    )


def _ratio(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """total / count as a detached float, 0 when count is 0 (TRL's convention)."""
    total, count = total.detach().float(), count.float()
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


def _token_metrics(chosen: SequenceStats, rejected: SequenceStats) -> Metrics:
    """DPO's entropy, logits/chosen, logits/rejected and mean_token_accuracy."""
    if chosen.entropy is None or rejected.entropy is None:
        return {}
    assert chosen.mean_logits is not None and rejected.mean_logits is not None
    assert chosen.top1 is not None
    return {
        "entropy": _ratio(
            chosen.entropy.sum() + rejected.entropy.sum(),
            chosen.counts.sum() + rejected.counts.sum(),
        ),
        "logits/chosen": _ratio(chosen.mean_logits.sum(), chosen.counts.sum()),
        "logits/rejected": _ratio(rejected.mean_logits.sum(), rejected.counts.sum()),
        "mean_token_accuracy": _ratio(chosen.top1.sum(), chosen.counts.sum()),
    }


def _reward_metrics(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
) -> Metrics:
    """rewards/{chosen,rejected,accuracies,margins} and logps/{chosen,rejected} (batch means)."""
    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    return {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": chosen_logps.detach().mean(),
        "logps/rejected": rejected_logps.detach().mean(),
    }


@dataclass(frozen=True)
class DPOSettings:
    """The DPO family's knobs, TRL's DPOConfig names (Axolotl's keys in the error messages)."""

    loss_types: tuple[str, ...] = ("sigmoid",)
    loss_weights: tuple[float, ...] | None = None
    beta: float = 0.1
    label_smoothing: float = 0.0
    use_weighting: bool = False
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 1.0

    def __post_init__(self) -> None:
        unknown = [t for t in self.loss_types if t not in DPO_LOSS_TYPES]
        if not self.loss_types or unknown:
            raise ConfigError(
                f"dpo_loss_type {list(self.loss_types)} is not valid: each entry must be one of "
                f"{', '.join(DPO_LOSS_TYPES)}, and the list must not be empty."
            )
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_types):
            raise ConfigError(
                f"dpo_loss_weights has {len(self.loss_weights)} entries but dpo_loss_type has "
                f"{len(self.loss_types)}; give one weight per loss type, in the same order."
            )
        if self.f_divergence_type not in F_DIVERGENCE_TYPES:
            raise ConfigError(
                f"f_divergence_type {self.f_divergence_type!r} is not one of "
                f"{', '.join(F_DIVERGENCE_TYPES)}."
            )
        if self.f_divergence_type != "reverse_kl" and not set(self.loss_types) <= (
            F_DIVERGENCE_LOSS_TYPES
        ):
            raise ConfigError(
                f"f_divergence_type {self.f_divergence_type!r} only works with the loss types "
                f"{', '.join(sorted(F_DIVERGENCE_LOSS_TYPES))}; dpo_loss_type is "
                f"{list(self.loss_types)}. Use reverse_kl with these losses."
            )
        if self.use_weighting and {"aot", "aot_unpaired"} & set(self.loss_types):
            raise ConfigError(
                "dpo_use_weighting (WPO) cannot be combined with the aot or aot_unpaired loss "
                "types: they sort the pairs of a batch, so per-pair weights would be misaligned. "
                "Remove one of them."
            )
        if "exo_pair" in self.loss_types and self.label_smoothing <= 0.0:
            raise ConfigError(
                "dpo_loss_type exo_pair needs dpo_label_smoothing > 0 (the EXO paper uses 1e-3); "
                f"it is {self.label_smoothing}."
            )

    @property
    def weights(self) -> tuple[float, ...]:
        """One weight per loss type (1.0 each unless given)."""
        return self.loss_weights or (1.0,) * len(self.loss_types)


def _f_scores(logratios: torch.Tensor, settings: DPOSettings) -> torch.Tensor:
    """f'(ratio) of the chosen f-divergence, from the log-ratio (reverse KL: the log-ratio)."""
    kind = settings.f_divergence_type
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence" and abs(settings.f_alpha_divergence_coef - 1.0) >= 1e-6:
        a = settings.f_alpha_divergence_coef
        t = (a - 1.0) * logratios
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}[t.dtype]
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) / (a - 1.0)
    return logratios


def dpo_loss(
    chosen: SequenceStats,
    rejected: SequenceStats,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    settings: DPOSettings,
    rows: Metrics | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """DPOTrainer's loss (weighted sum of its loss types, each a mean over pairs) and metrics;
    `rows`, when given, gets the per-pair values (`keep_rows`)."""
    beta, eps = settings.beta, settings.label_smoothing
    chosen_logps, rejected_logps = chosen.logps, rejected.logps
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    chosen_scores = _f_scores(chosen_logratios, settings)
    rejected_scores = _f_scores(rejected_logratios, settings)
    delta = chosen_scores - rejected_scores
    chosen_n = chosen.counts.clamp(min=1)
    rejected_n = rejected.counts.clamp(min=1)

    def smoothed(x: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(beta * x) * (1 - eps) - F.logsigmoid(-beta * x) * eps

    loss = chosen_logps.new_zeros(())
    for loss_type, weight in zip(settings.loss_types, settings.weights, strict=True):
        if loss_type == "sigmoid":
            per_pair = -F.logsigmoid(beta * delta)
        elif loss_type == "hinge":
            per_pair = torch.relu(1 - beta * delta)
        elif loss_type == "ipo":
            ipo_delta = chosen_scores / chosen_n - rejected_scores / rejected_n
            per_pair = (ipo_delta - 1 / (2 * beta)) ** 2
        elif loss_type == "exo_pair":
            epsilon = torch.tensor(eps, device=delta.device)
            per_pair = torch.sigmoid(beta * delta) * (
                F.logsigmoid(beta * delta) - torch.log1p(-epsilon)
            ) + torch.sigmoid(-beta * delta) * (F.logsigmoid(-beta * delta) - torch.log(epsilon))
        elif loss_type == "nca_pair":
            cr, rr = beta * chosen_logratios, beta * rejected_logratios
            per_pair = -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
        elif loss_type == "robust":
            clean = -(1 - eps) * F.logsigmoid(beta * delta)
            flipped = -eps * F.logsigmoid(-beta * delta)
            per_pair = (clean - flipped) / (1 - 2 * eps)
        elif loss_type == "bco_pair":
            per_pair = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(
                -beta * rejected_logratios
            )
        elif loss_type == "sppo_hard":
            per_pair = (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
        elif loss_type == "aot":
            logratios, _ = torch.sort(chosen_logps - rejected_logps, dim=0)
            ref_logratios, _ = torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)
            per_pair = smoothed(logratios - ref_logratios)
        elif loss_type == "aot_unpaired":
            chosen_sorted, _ = torch.sort(chosen_logratios, dim=0)
            rejected_sorted, _ = torch.sort(rejected_logratios, dim=0)
            per_pair = smoothed(chosen_sorted - rejected_sorted)
        elif loss_type == "apo_zero":
            per_pair = (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(
                beta * rejected_logratios
            )
        elif loss_type == "apo_down":
            per_pair = torch.sigmoid(beta * chosen_logratios) + (
                1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios))
            )
        elif loss_type == "discopop":
            logits = delta * beta
            modulation = torch.sigmoid(logits / settings.discopop_tau)
            per_pair = -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
        elif loss_type == "sft":
            nll = -(chosen_logps.sum() / chosen.counts.sum())
            per_pair = nll.expand(len(chosen))
        else:  # sigmoid_norm (the settings admit no other name)
            norm_delta = chosen_scores / chosen_n - rejected_scores / rejected_n
            per_pair = -F.logsigmoid(beta * norm_delta)
        if settings.use_weighting:
            per_pair = per_pair * _wpo_weights(chosen) * _wpo_weights(rejected)
        loss = loss + per_pair.mean() * weight

    metrics = _token_metrics(chosen, rejected)
    metrics.update(
        _reward_metrics(
            beta * chosen_logratios, beta * rejected_logratios, chosen_logps, rejected_logps
        )
    )
    keep_rows(
        rows,
        reward_chosen=beta * chosen_logratios,
        reward_rejected=beta * rejected_logratios,
        logps_chosen=chosen_logps,
        logps_rejected=rejected_logps,
    )
    return loss, metrics


def keep_rows(rows: Metrics | None, **values: torch.Tensor) -> None:
    """Put detached per-row values (one per pair or completion) in `rows` when it is given:
    what the SwanLab completion table shows beside each row's text."""
    if rows is not None:
        rows.update({k: v.detach().float().cpu() for k, v in values.items()})


def _wpo_weights(stats: SequenceStats) -> torch.Tensor:
    """WPO's per-sequence weight: exp(mean over tokens of log p - log sum_v p_v^2), detached."""
    if stats.wpo is None:
        raise ValueError("dpo_use_weighting needs the log-prob stats computed with extras=True")
    return torch.exp(stats.wpo / stats.counts.clamp(min=1))


def mean_logps(stats: SequenceStats) -> torch.Tensor:
    """Per-sequence mean log-prob per scored token (TRL's `average_log_prob=True`)."""
    return stats.logps / stats.counts


def token_nll(stats: SequenceStats) -> torch.Tensor:
    """Cross-entropy averaged over every scored token of all the given sequences."""
    return -(stats.logps.sum() / stats.counts.sum())


def cpo_loss(
    chosen: SequenceStats,
    rejected: SequenceStats,
    *,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    cpo_alpha: float = 1.0,
    simpo_gamma: float = 0.5,
    alpha: float = 0.0,
    rows: Metrics | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """CPOTrainer's loss and metrics; SimPO is `loss_type="simpo"` (cpo_alpha 0 for pure SimPO).

    ipo and simpo score mean log-probs per token, sigmoid and hinge summed ones; the NLL term
    is the chosen completions' token-mean cross-entropy, weighted by `cpo_alpha`. `alpha != 0`
    is AlphaPO's reward shape. TRL's `logits/*` metrics (a mean over every padded position of
    the batch) depend on padding, so they are not reproduced.
    """
    if loss_type not in CPO_LOSS_TYPES:
        raise ConfigError(
            f"the CPO/SimPO loss type {loss_type!r} is not one of {', '.join(CPO_LOSS_TYPES)}."
        )
    average = loss_type in ("ipo", "simpo")
    chosen_logps = mean_logps(chosen) if average else chosen.logps
    rejected_logps = mean_logps(rejected) if average else rejected.logps
    nll = chosen_logps.new_zeros(()) if cpo_alpha == 0 else token_nll(chosen)
    if alpha != 0.0:
        chosen_rewards = (1 - torch.exp(chosen_logps).pow(-alpha)) / alpha
        rejected_rewards = (1 - torch.exp(rejected_logps).pow(-alpha)) / alpha
    else:
        chosen_rewards, rejected_rewards = chosen_logps, rejected_logps
    logits = chosen_rewards - rejected_rewards
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
    if loss_type in ("simpo", "sigmoid"):
        losses = (
            -F.logsigmoid(beta * logits) * (1 - label_smoothing)
            - F.logsigmoid(-beta * logits) * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    else:
        losses = (logits - 1 / (2 * beta)) ** 2
    loss = losses.mean() + cpo_alpha * nll
    metrics = _reward_metrics(
        beta * chosen_rewards, beta * rejected_rewards, chosen_logps, rejected_logps
    )
    metrics["nll_loss"] = nll.detach()
    keep_rows(
        rows,
        reward_chosen=beta * chosen_rewards,
        reward_rejected=beta * rejected_rewards,
        logps_chosen=chosen_logps,
        logps_rejected=rejected_logps,
    )
    return loss, metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen: SequenceStats,
    rejected: SequenceStats,
    nll: torch.Tensor,
    *,
    beta: float = 0.1,
    rows: Metrics | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """ORPOTrainer's loss, `nll - beta * mean(log sigmoid(log odds ratio))`, and its metrics.

    `chosen`/`rejected` are the completion stats (ORPO scores mean log-probs per token); `nll`
    is the chosen sequences' token-mean cross-entropy. TRL 1.16 computes that NLL over the
    whole chosen sequence, prompt included (`token_nll` of the stats with prompt labels kept).
    Axolotl's `orpo_alpha` is this `beta`. TRL's `logits/*` metrics depend on padding and are
    not reproduced.
    """
    chosen_logps = mean_logps(chosen).float()
    rejected_logps = mean_logps(rejected).float()
    log_odds = (chosen_logps - rejected_logps) - (
        _log1mexp(chosen_logps) - _log1mexp(rejected_logps)
    )
    ratio = F.logsigmoid(log_odds)
    loss = nll - (beta * ratio).mean()
    metrics = _reward_metrics(
        beta * chosen_logps, beta * rejected_logps, chosen_logps, rejected_logps
    )
    metrics["nll_loss"] = nll.detach()
    metrics["log_odds_ratio"] = ratio.detach().mean()
    metrics["log_odds_chosen"] = log_odds.detach().mean()
    keep_rows(
        rows,
        reward_chosen=beta * chosen_logps,
        reward_rejected=beta * rejected_logps,
        logps_chosen=chosen_logps,
        logps_rejected=rejected_logps,
        log_odds_ratio=ratio,
        log_odds_chosen=log_odds,
    )
    return loss, metrics


def kto_loss(
    policy: SequenceStats,
    ref_logps: torch.Tensor,
    labels: torch.Tensor,
    kl_logps: torch.Tensor | None,
    ref_kl_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
    rows: Metrics | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """KTOTrainer's loss and metrics for a batch of unpaired completions.

    `labels` marks desirable completions. The KL term is the batch mean of
    `kl_logps - ref_kl_logps` (log-probs of mismatched prompt/completion pairs, no gradient),
    clamped at 0; `apo_zero_unpaired` needs none (pass None).
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ConfigError(
            f"the KTO loss type {loss_type!r} is not one of {', '.join(KTO_LOSS_TYPES)}."
        )
    desirable = labels.to(device=policy.logps.device, dtype=torch.bool)
    chosen_idx = torch.nonzero(desirable).view(-1)
    rejected_idx = torch.nonzero(~desirable).view(-1)
    if loss_type == "kto":
        if kl_logps is None or ref_kl_logps is None:
            raise ValueError("the kto loss needs the KL completions' log-probs")
        kl = (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)
    else:
        kl = torch.zeros((), device=policy.logps.device)
    chosen, rejected = policy[chosen_idx], policy[rejected_idx]
    chosen_logratios = chosen.logps - ref_logps[chosen_idx]
    rejected_logratios = rejected.logps - ref_logps[rejected_idx]
    if loss_type == "kto":
        chosen_losses = 1 - torch.sigmoid(beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(beta * (kl - rejected_logratios))
    else:
        chosen_losses = 1 - torch.sigmoid(beta * chosen_logratios)
        rejected_losses = torch.sigmoid(beta * rejected_logratios)
    loss = torch.cat(
        (desirable_weight * chosen_losses, undesirable_weight * rejected_losses)
    ).nanmean()

    metrics: Metrics = {"kl": kl.detach().float().reshape(())}
    if policy.entropy is not None:
        assert chosen.mean_logits is not None and rejected.mean_logits is not None
        metrics["entropy"] = _ratio(policy.entropy.sum(), policy.counts.sum())
        if chosen.counts.sum() > 0:
            metrics["logits/chosen"] = _ratio(chosen.mean_logits.sum(), chosen.counts.sum())
        if rejected.counts.sum() > 0:
            metrics["logits/rejected"] = _ratio(rejected.mean_logits.sum(), rejected.counts.sum())
    n_chosen, n_rejected = len(chosen), len(rejected)
    if n_chosen:
        metrics["rewards/chosen"] = (beta * chosen_logratios.detach()).nansum() / n_chosen
        metrics["logps/chosen"] = chosen.logps.detach().nansum() / n_chosen
    if n_rejected:
        metrics["rewards/rejected"] = (beta * rejected_logratios.detach()).nansum() / n_rejected
        metrics["logps/rejected"] = rejected.logps.detach().nansum() / n_rejected
    if n_chosen and n_rejected:
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    keep_rows(rows, reward=beta * (policy.logps - ref_logps), logps=policy.logps)
    return loss, metrics


def reward_loss(
    rewards_chosen: torch.Tensor,
    rewards_rejected: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> tuple[torch.Tensor, Metrics]:
    """RewardTrainer's Bradley-Terry loss, `-log sigmoid(r_chosen - r_rejected [- margin])`
    averaged over pairs, plus `center_rewards_coefficient * mean((r_c + r_r)^2)`; and its
    metrics (min/mean/max reward, accuracy, margin)."""
    difference = rewards_chosen - rewards_rejected
    if margin is not None:
        difference = difference - margin
    loss = -F.logsigmoid(difference).mean()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * torch.mean(
            (rewards_chosen + rewards_rejected) ** 2
        )
    with torch.no_grad():
        everything = torch.cat((rewards_chosen, rewards_rejected))
        metrics = {
            "min_reward": everything.min(),
            "mean_reward": everything.mean(),
            "max_reward": everything.max(),
            "accuracy": (rewards_chosen > rewards_rejected).float().mean(),
            "margin": (rewards_chosen - rewards_rejected).mean(),
        }
    return loss, metrics


def sequence_end_index(
    position_ids: torch.Tensor, sequence_index: torch.Tensor, num_sequences: int
) -> torch.Tensor:
    """Flat (row-major) index of each packed sequence's last token, in the original order.

    A reward model scores a sequence from its last token's hidden state; with packed rows,
    `hidden.flatten(0, 1)[sequence_end_index(...)]` gathers them.
    """
    flat = position_ids.flatten()
    starts = torch.nonzero(flat == 0).view(-1)
    ends = torch.cat((starts[1:], starts.new_tensor([flat.shape[0]]))) - 1
    if sequence_index.shape[0] != starts.shape[0]:
        raise ValueError(f"{starts.shape[0]} packed segments but {sequence_index.shape[0]} indices")
    real = sequence_index >= 0
    out = torch.full((num_sequences,), -1, dtype=torch.long, device=flat.device)
    out[sequence_index[real].to(flat.device)] = ends[real.to(flat.device)]
    if (out < 0).any():
        raise ValueError("some sequences are missing from the packed rows")
    return out
