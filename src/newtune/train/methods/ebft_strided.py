"""EBFT strided mode (`rl: ebft`, `ebft.mode: strided`): feature matching on raw documents.

Each document (the "prompt region", length S) gets anchors a_k = anchor_offset + k * stride for
k < num_blocks = (S - gen_len - anchor_offset) // stride + 1. At every anchor the policy writes
gen_len tokens after the document's prefix [0, a_k), all blocks at once: the generated tokens
are appended step-major (slot of step s, block k = S + s * num_blocks + k), with position
a_k + s, and a strided mask lets each see the prefix [0, a_k) and its own block's earlier steps,
so every block is exactly what generating it alone after doc[:a_k] gives. n samples are drawn
per document; the frozen feature network embeds each generated block and the ground-truth
block doc[a_k : a_k + gen_len] under the same mask; rewards (paper eq 7), advantages over the n
samples of a block, and a REINFORCE loss on the generated tokens (each weighted by its own
block's advantage) plus ce_coef times the document's next-token loss.

Axolotl differences (deliberate): log-probs of generated tokens are read at the position that
generated them (Axolotl shifts over the step-major layout, so it scores a token from another
block's position) and each token gets its own block's advantage (Axolotl lays block-major
advantages over step-major tokens); rows are trimmed of right padding, blocks that would reach
past a row's last real token are left out, and the CE term skips padding.

Attention: a boolean 4-D mask under sdpa, an additive one under eager, a flex BlockMask when the
model runs flex_attention (training and feature passes; generation runs sdpa with a KV cache).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from newtune.errors import ConfigError, DataError
from newtune.train.methods import ebft_core as core
from newtune.train.methods.base import Method, Metrics, Reference, mask_readers, unwrap

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
METRICS = (
    "ebft/rl_loss",
    "ebft/ce_loss",
    "ebft/cfm_loss",
    "ebft/mean_reward",
    "ebft/alignment",
    "ebft/diversity",
    "ebft/num_blocks",
    "ebft/advantages_std",
)
# Axolotl's defaults for the strided keys (AxolotlStridedEBFTConfig)
DEFAULTS: dict[str, Any] = {
    "stride": 8,
    "context_length": 8,
    "generate_max_len": 8,
    "n_samples_per_prompt": 4,
    "temperature": 0.6,
    "top_p": 1.0,
    "feature_layers": [0.25, 0.5, 0.75],
    "embed_method": "last_token",
    "use_whitening": False,
    "alignment_coef": 1.0,
    "diversity_coef": 1.0,
    "rl_coef": 1.0,
    "ce_coef": 0.0,
    "advantage_estimator": "rloo",
    "min_completion_prefix": 0,
}


# -- layout ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StridedLayout:
    """Where the blocks of one batch sit: S document tokens, then gen_len steps of
    num_blocks tokens (step-major)."""

    doc_len: int
    anchor_offset: int
    stride: int
    gen_len: int

    @property
    def num_blocks(self) -> int:
        """Anchors that leave gen_len ground-truth tokens inside the document (may be <= 0)."""
        return (self.doc_len - self.gen_len - self.anchor_offset) // self.stride + 1

    @property
    def total_len(self) -> int:
        """Document plus every generated token."""
        return self.doc_len + self.gen_len * self.num_blocks

    def anchors(self) -> torch.Tensor:
        """(num_blocks,) first generated position of each block: anchor_offset + k * stride."""
        return self.anchor_offset + self.stride * torch.arange(self.num_blocks)

    def slots(self) -> torch.Tensor:
        """(gen_len, num_blocks) sequence index of generated step s of block k."""
        nb = self.num_blocks
        return self.doc_len + nb * torch.arange(self.gen_len).unsqueeze(1) + torch.arange(nb)

    def predictors(self) -> torch.Tensor:
        """(gen_len, num_blocks) the index whose logits sample step s of block k: a_k - 1 for
        the first step, the block's previous generated token after."""
        slots = self.slots()
        return torch.cat([(self.anchors() - 1).unsqueeze(0), slots[:-1]], 0)

    def truth(self) -> torch.Tensor:
        """(num_blocks, gen_len) document positions of each block's ground truth."""
        return self.anchors().unsqueeze(1) + torch.arange(self.gen_len)

    def position_ids(self, length: int | None = None) -> torch.Tensor:
        """(length,) positions: 0..S-1 for the document, a_k + s for step s of block k."""
        length = self.total_len if length is None else length
        gen = (self.anchors() + torch.arange(self.gen_len).unsqueeze(1)).reshape(-1)
        return torch.cat([torch.arange(self.doc_len), gen])[:length]

    def _tables(self, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per index: the exclusive prefix limit it sees and its block (-1 in the document)."""
        nb = self.num_blocks
        doc = torch.arange(self.doc_len)
        limit = torch.cat([doc + 1, self.anchors().repeat(self.gen_len)])[:length]
        block = torch.cat([torch.full_like(doc, -1), torch.arange(nb).repeat(self.gen_len)])
        return limit, block[:length]

    def allowed(self, length: int | None = None) -> torch.Tensor:
        """(length, length) bool: query i may attend key j. Document: causal. Generated token of
        block k: the document prefix [0, a_k) and its block's tokens up to itself."""
        length = self.total_len if length is None else length
        limit, block = self._tables(length)
        j = torch.arange(length)
        prefix = j.unsqueeze(0) < limit.unsqueeze(1)
        own = (block.unsqueeze(1) == block.unsqueeze(0)) & (block.unsqueeze(1) >= 0)
        return prefix | (own & (j.unsqueeze(0) <= j.unsqueeze(1)))

    def mask_mod(self, device: Any = None) -> Any:
        """The same rule as `allowed` as a flex_attention mask_mod."""
        limit, block = (t.to(device) for t in self._tables(self.total_len))

        def mod(b: Any, h: Any, q: Any, kv: Any) -> Any:
            own = (block[q] == block[kv]) & (block[q] >= 0) & (kv <= q)
            return (kv < limit[q]) | own

        return mod




def check_strided_model(model: Any) -> None:
    """ModelError for layers that do not read the strided mask (linear attention, state-space):
    a generated block would see the other blocks. Sliding/chunked layers run under the whole
    mask (their window is not applied), as in Axolotl: a warning."""
    from newtune.errors import ModelError

    text, other, local = mask_readers(model)
    if other:
        raise ModelError(
            f"`rl: ebft` (strided) generates every block of a document at once under a strided "
            f"4-D attention mask, and this model ({text.model_type}) has {', '.join(other)} "
            "layers, which do not read it (each block would see the others); use structured "
            "mode (`ebft.mode: structured`) or a model whose layers are all attention layers"
        )
    if local:
        log.warning(
            "ebft strided: this model's sliding-window/chunked layers run under the strided "
            "mask without their window (as in Axolotl); documents longer than the window are "
            "seen whole"
        )


def attention_of(model: Any) -> str:
    """The attention implementation the model runs (sdpa when unset)."""
    config = getattr(unwrap(model), "config", None)
    return str(getattr(config, "_attn_implementation", None) or "sdpa")


def strided_mask(layout: StridedLayout, rows: int, model: Any, device: Any) -> Any:
    """The full sequence's mask for `model`: flex BlockMask, additive (eager) or boolean."""
    attention = attention_of(model)
    if attention == "flex_attention":
        from torch.nn.attention.flex_attention import create_block_mask

        total = layout.total_len
        return create_block_mask(
            layout.mask_mod(device), None, None, total, total, device=str(device)
        )
    return dense_mask(layout.allowed().to(device), rows, model, attention)


def dense_mask(allowed: torch.Tensor, rows: int, model: Any, attention: str) -> torch.Tensor:
    """(rows, 1, q, k) mask: boolean, or additive for eager attention."""
    mask = allowed.unsqueeze(0).unsqueeze(0).expand(rows, 1, *allowed.shape)
    if attention != "eager":
        return mask
    dtype = unwrap(model).get_input_embeddings().weight.dtype
    zeros = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return zeros.masked_fill(~mask, torch.finfo(dtype).min)


# -- sampling ----------------------------------------------------------------------------------


def sample_tokens(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row of (..., V) logits: greedy at temperature 0, else softmax(logits / T)
    restricted to the smallest top-p nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(-1, descending=True)
        before = sorted_probs.cumsum(-1) - sorted_probs  # mass strictly above each token
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1).reshape(probs.shape[:-1])


@torch.no_grad()
def generate_blocks(
    model: Any,
    input_ids: torch.Tensor,
    layout: StridedLayout,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> torch.Tensor:
    """(rows, gen_len * num_blocks) tokens of every block, step-major (the `slots` order).

    One pass over the documents fills a KV cache and samples every block's first token; each
    further step feeds the previous step's num_blocks tokens under their rows of the strided
    mask. Runs the unwrapped model in eval mode, under sdpa when it trains with flex.
    """
    inner = unwrap(model)
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile'd: shapes change every step
    # FSDP1 gathers its shards in its own forward: run through the wrapper there
    runner = model if "FullyShardedDataParallel" in type(model).__name__ else inner
    rows, device = input_ids.shape[0], input_ids.device
    allowed = layout.allowed().to(device)
    positions = layout.position_ids().to(device)
    slots = layout.slots().to(device)
    pred = layout.predictors().to(device)
    config = inner.config
    saved = attention_of(inner)
    attention = "sdpa" if saved == "flex_attention" else saved
    was_training = runner.training
    runner.eval()
    if attention != saved:
        config._attn_implementation = attention
    try:
        from transformers import DynamicCache

        cache = DynamicCache(config=config)
        out = runner(
            input_ids=input_ids,
            attention_mask=dense_mask(
                allowed[: layout.doc_len, : layout.doc_len], rows, inner, attention
            ),
            position_ids=positions[: layout.doc_len].expand(rows, -1),
            cache=cache,
            use_cache=True,
            **_keep_kwargs(inner, pred[0]),  # only the anchors' logits: no (rows, S, V) tensor
        )
        step_logits = out.logits
        if step_logits.shape[1] != layout.num_blocks:  # the forward kept every position
            step_logits = step_logits[:, pred[0]]
        tokens = []
        for step in range(layout.gen_len):
            new = sample_tokens(step_logits, temperature, top_p)
            tokens.append(new)
            if step + 1 == layout.gen_len:
                break
            index = slots[step]
            out = runner(
                input_ids=new,
                attention_mask=dense_mask(
                    allowed[index, : int(index[-1]) + 1], rows, inner, attention
                ),
                position_ids=positions[index].expand(rows, -1),
                cache=cache,
                use_cache=True,
            )
            step_logits = out.logits
        return torch.cat(tokens, 1)
    finally:
        if attention != saved:
            config._attn_implementation = saved
        runner.train(was_training)


# -- the method --------------------------------------------------------------------------------


def settings_of(config: Any) -> dict[str, Any]:
    """The `ebft:` keys (a section object or a mapping), Axolotl's defaults for the unset."""
    section = getattr(config, "ebft", None)
    out = dict(DEFAULTS)
    for key in DEFAULTS:
        value = section.get(key) if isinstance(section, dict) else getattr(section, key, None)
        if value is not None:
            out[key] = value
    return out


class StridedEBFTMethod(Method):
    """`rl: ebft` with `ebft.mode: strided`: rows `input_ids` (+ `attention_mask`, `labels`,
    optional `prompt_length`); loss = rl_coef * REINFORCE + ce_coef * CE; metrics `ebft/*`."""

    name = "ebft"
    columns = ("input_ids",)
    metric_names = METRICS
    needs_reference = True  # the live reference (adapter off / frozen copy) is the feature net
    online = True  # evaluated by generating (train's eval), not by `newtune evaluate`

    def __init__(self, config: Any) -> None:
        s = settings_of(config)
        self.settings = s
        for key in ("stride", "generate_max_len", "n_samples_per_prompt"):
            if int(s[key]) < 1:
                raise ConfigError(f"`ebft.{key}: {s[key]}` must be at least 1.")
        if int(s["context_length"]) < 1:
            raise ConfigError(
                f"`ebft.context_length: {s['context_length']}` must be at least 1: the first "
                "block needs a token of context."
            )
        if s["embed_method"] not in core.EMBED_METHODS:
            raise ConfigError(
                f"`ebft.embed_method: {s['embed_method']}`: use one of "
                f"{', '.join(core.EMBED_METHODS)}."
            )
        if s["advantage_estimator"] not in core.ADVANTAGE_ESTIMATORS:
            raise ConfigError(
                f"`ebft.advantage_estimator: {s['advantage_estimator']}`: use one of "
                f"{', '.join(core.ADVANTAGE_ESTIMATORS)}."
            )
        if getattr(config, "precompute_ref_log_probs", None):
            raise ConfigError(
                "`precompute_ref_log_probs: true` with `rl: ebft`: EBFT scores the blocks it "
                "generates during training, so nothing can be computed ahead; remove the key."
            )
        if getattr(config, "sample_packing", None):
            raise ConfigError(
                "`sample_packing: true` with `rl: ebft` (strided): each document is its own "
                "row of anchors and generated blocks; remove `sample_packing`."
            )
        self.stride = int(s["stride"])
        self.context_length = int(s["context_length"])
        self.gen_len = int(s["generate_max_len"])
        self.n = int(s["n_samples_per_prompt"])
        self.diversity_coef = float(s["diversity_coef"])
        self.estimator = str(s["advantage_estimator"])
        if self.n == 1 and self.diversity_coef > 0:
            log.warning(
                "ebft: n_samples_per_prompt=1 has no diversity term; diversity_coef set to 0"
            )
            self.diversity_coef = 0.0
        if self.n == 1 and self.estimator != "reinforce":
            log.warning("ebft: n_samples_per_prompt=1 has no group baseline; using reinforce")
            self.estimator = "reinforce"
        self.config = config
        self._features: core.FeatureNetwork | None = None

    def describe(self) -> str:
        """How the config names this method."""
        return "rl: ebft (mode: strided)"

    # -- rows and batches ----------------------------------------------------------------------

    def collator(
        self, pad_id: int, capacity: int | None, pad_to: int | None, attention: str | None = None
    ) -> Any:
        """Right-padded batches of whole documents (never packed)."""
        return StridedCollator(pad_id, pad_to)

    def batch_rows(self, batch: dict[str, Any]) -> int:
        """Documents in a batch."""
        return int(batch["input_ids"].shape[0])

    def anchor_offset(self, batch: dict[str, Any]) -> int:
        """Where the first anchor sits: context_length, or, for prompt/completion rows (a
        `prompt_length` column, or labels masked from the start), past the longest prompt
        plus min_completion_prefix, as Axolotl places them."""
        prompt = prompt_lengths(batch)
        if prompt is None:
            return self.context_length
        prefix = int(self.settings["min_completion_prefix"] or 0)
        return max(int(prompt.max()) + prefix, self.context_length)

    def row_anchor(self, length: int, prompt: int | None) -> int:
        """A single row's first anchor (prepare drops rows where no block fits)."""
        if prompt is None or prompt <= 0:
            return self.context_length
        prefix = int(self.settings["min_completion_prefix"] or 0)
        return max(prompt + prefix, self.context_length)

    def prepare_data(self, config: Any, tokenizer: Any, source: str | None = None) -> Any:
        """Rows from the datasets' Axolotl-style `transform` modules (see `transform_rows`);
        `source`: the config file, whose folder may hold them."""
        return prepare_strided_rows(self, config, tokenizer, source)

    trains_itself = True  # train.run hands the run over: the rows come from transform modules

    def train(self, loaded: Any, plan: Any, checkpoint: str | None) -> Path:
        """The whole run as `train.run._train` does it, with the strided rows: tokenizer, rows,
        model (adapter, kernels), the preference Trainer with this method's loss, outputs."""
        from newtune.models.tokenizer import load_tokenizer
        from newtune.train import run
        from newtune.train.callbacks import build_callbacks, check_resume_data
        from newtune.train.report import tracker_environment
        from newtune.train.seed_features import attach

        config = loaded.config
        tokenizer, new_ids = load_tokenizer(config)
        prepared = self.prepare_data(config, tokenizer, loaded.source)
        log.info("ebft strided rows: %s", prepared.stats["rows"])
        self.check_data(prepared.data)
        if checkpoint is not None:
            check_resume_data(checkpoint, prepared.stats["fingerprint"])
        model = run.training_model(config, plan, tokenizer, new_ids)
        check_strided_model(model)
        callbacks = build_callbacks(config)
        with tracker_environment(config):
            trainer = run._preference_trainer(
                self, config, plan, model, tokenizer, prepared, callbacks
            )
            attach(trainer, config, tokenizer)
            metrics = run.train_and_evaluate(trainer, callbacks, config, checkpoint)
        return run.finish_run(trainer, tokenizer, loaded, prepared, metrics)

    # -- loss ----------------------------------------------------------------------------------

    def feature_network(self, model: Any, reference: Reference | None) -> core.FeatureNetwork:
        """The frozen feature network: the live reference (adapter off, or the frozen copy of
        the base), else a copy of the policy made at the first call."""
        if self._features is None:
            if reference is not None and reference.kind == "adapter":
                self._features = core.FeatureNetwork(model, kind="adapter")
            elif reference is not None and reference.kind == "model":
                self._features = core.FeatureNetwork(model, kind="model", model=reference.model)
            else:
                self._features = core.FeatureNetwork(model)
        return self._features

    def loss(
        self, model: Any, batch: dict[str, Any], reference: Reference | None = None
    ) -> tuple[torch.Tensor, Metrics]:
        """The strided EBFT loss of a batch of documents, and its `ebft/*` metrics."""
        s = self.settings
        ids = batch["input_ids"]
        rows, doc_len = ids.shape
        device = ids.device
        mask2d = batch.get("attention_mask")
        lengths = mask2d.sum(1) if mask2d is not None else torch.full((rows,), doc_len)
        layout = StridedLayout(doc_len, self.anchor_offset(batch), self.stride, self.gen_len)
        nb = layout.num_blocks
        if nb <= 0:
            raise DataError(
                f"a batch of documents of {doc_len} tokens has no EBFT block: the first anchor "
                f"is at {layout.anchor_offset} and a block needs {self.gen_len} more tokens"
            )
        n = self.n
        docs = ids.repeat_interleave(n, 0)
        gen = generate_blocks(model, docs, layout, float(s["temperature"]), float(s["top_p"]))
        full = torch.cat([docs, gen], 1)
        positions = layout.position_ids().to(device).expand(rows * n, -1)
        mask = strided_mask(layout, rows * n, model, device)
        ce_coef, rl_coef = float(s["ce_coef"]), float(s["rl_coef"])
        pred = layout.predictors().reshape(-1).to(device)  # (gen_len * nb) in slot order
        keep = torch.cat([pred, torch.arange(doc_len - 1, device=device)]) if ce_coef > 0 else pred
        logits = model(
            input_ids=full,
            attention_mask=mask,
            position_ids=positions,
            use_cache=False,
            **_keep_kwargs(model, keep),
        ).logits
        if logits.shape[1] != keep.shape[0]:  # the forward kept every position
            logits = logits[:, keep]
        m = pred.shape[0]
        gen_logps = torch.log_softmax(logits[:, :m].float(), -1).gather(-1, gen.unsqueeze(-1))
        gen_logps = gen_logps.squeeze(-1).reshape(rows * n, self.gen_len, nb)

        with torch.no_grad():
            rewards, valid = self._rewards(model, reference, full, mask, positions, layout, lengths)
        adv = core.advantages(rewards.rewards, self.estimator)  # (B, nb, n)
        token_adv = adv.permute(0, 2, 1).reshape(rows * n, 1, nb).expand(-1, self.gen_len, -1)
        token_mask = valid.repeat_interleave(n, 0).unsqueeze(1).expand(-1, self.gen_len, -1)
        rl_loss = core.policy_gradient_loss(gen_logps, token_adv, token_mask)

        ce_loss = torch.zeros((), device=device)
        if ce_coef > 0:
            doc_logits = logits[::n, m:].float()  # one copy of each document
            targets = ids[:, 1:]
            trained = torch.ones_like(targets, dtype=torch.bool)
            if "labels" in batch:
                trained &= batch["labels"][:, 1:] != IGNORE_INDEX
            if mask2d is not None:
                trained &= mask2d[:, 1:].bool()
            logps = torch.log_softmax(doc_logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
            ce_loss = -(logps * trained).sum() / trained.sum().clamp(min=1)
        loss = rl_coef * rl_loss + ce_coef * ce_loss
        return loss, self._metrics(rl_loss, ce_loss, rewards, adv, valid, nb)

    def _rewards(
        self,
        model: Any,
        reference: Reference | None,
        full: torch.Tensor,
        mask: Any,
        positions: torch.Tensor,
        layout: StridedLayout,
        lengths: torch.Tensor,
    ) -> tuple[core.Rewards, torch.Tensor]:
        """Rewards (B, nb, n) of every block's samples, and which blocks (B, nb) are inside
        their document."""
        s, n, nb, g = self.settings, self.n, layout.num_blocks, self.gen_len
        net = self.feature_network(model, reference)
        indices = core.layer_indices(core.num_layers_of(net.model), s["feature_layers"])
        feats = net.features(full, indices, mask, positions)  # (B*n, T, D)
        rows = full.shape[0] // n
        device = full.device
        slots = layout.slots().to(device).transpose(0, 1)  # (nb, g)
        gen_feats = feats[:, slots]  # (B*n, nb, g, D)
        truth = layout.truth().to(device)
        gt_feats = feats[::n][:, truth]  # (B, nb, g, D)
        method = str(s["embed_method"])
        if method == "completion_mean":  # a block is all completion: its mean
            method = "mean_pooling"
        gen_emb = core.pool(gen_feats, method).reshape(rows, n, nb, -1).transpose(1, 2)
        gt_emb = core.pool(gt_feats, method)
        rewards = core.feature_rewards(
            gen_emb,
            gt_emb,
            float(s["alignment_coef"]),
            self.diversity_coef,
            bool(s["use_whitening"]),
        )
        valid = layout.anchors().to(device).unsqueeze(0) + g <= lengths.to(device).unsqueeze(1)
        return rewards, valid

    def _metrics(
        self,
        rl_loss: torch.Tensor,
        ce_loss: torch.Tensor,
        rewards: core.Rewards,
        adv: torch.Tensor,
        valid: torch.Tensor,
        nb: int,
    ) -> Metrics:
        """Axolotl's `ebft/*` metrics, over the blocks inside their documents."""
        cells = valid.unsqueeze(-1).expand_as(rewards.rewards)
        return {
            "ebft/rl_loss": rl_loss.detach(),
            "ebft/ce_loss": ce_loss.detach(),
            "ebft/cfm_loss": rewards.cfm[valid].mean(),
            "ebft/mean_reward": rewards.rewards[cells].mean(),
            "ebft/alignment": rewards.alignment[cells].mean(),
            "ebft/diversity": rewards.diversity[cells].mean(),
            "ebft/num_blocks": torch.tensor(float(nb)),
            "ebft/advantages_std": adv[cells].std() if cells.sum() > 1 else torch.zeros(()),
        }


def _keep_kwargs(model: Any, keep: torch.Tensor) -> dict[str, Any]:
    """`logits_to_keep` (an index tensor) where the causal LM's forward takes it."""
    inner = unwrap(model)
    inner = getattr(inner, "_orig_mod", inner)  # torch.compile'd
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    params = inspect.signature(base.forward).parameters
    return {"logits_to_keep": keep} if "logits_to_keep" in params else {}


def prompt_lengths(batch: dict[str, Any]) -> torch.Tensor | None:
    """Prompt tokens per row for prompt/completion rows (Axolotl's rule): the `prompt_length`
    column, else the first trained label when every row's labels start masked; None for
    documents."""
    if "prompt_length" in batch:
        return batch["prompt_length"].long()
    labels = batch.get("labels")
    if labels is None:
        return None
    trained = labels != IGNORE_INDEX
    first = torch.where(
        trained.any(1), trained.float().argmax(1), torch.full_like(labels[:, 0], labels.shape[1])
    )
    return first.long() if bool((first > 0).all()) else None


@dataclass
class StridedCollator:
    """Right-pads `input_ids` (pad id), `attention_mask` (0) and `labels` (-100); carries
    `prompt_length`."""

    pad_id: int
    pad_to: int | None = None

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """The padded batch."""
        width = max(len(r["input_ids"]) for r in rows)
        if self.pad_to:
            width = max(width, self.pad_to)

        def pad(values: list[int], fill: int) -> list[int]:
            return list(values) + [fill] * (width - len(values))

        batch = {
            "input_ids": torch.tensor([pad(r["input_ids"], self.pad_id) for r in rows]),
            "attention_mask": torch.tensor(
                [pad(r.get("attention_mask") or [1] * len(r["input_ids"]), 0) for r in rows]
            ),
            "labels": torch.tensor(
                [pad(r.get("labels") or r["input_ids"], IGNORE_INDEX) for r in rows]
            ),
        }
        if all(r.get("prompt_length") is not None for r in rows) and "prompt_length" in rows[0]:
            batch["prompt_length"] = torch.tensor([int(r["prompt_length"]) for r in rows])
        return batch


# -- data: Axolotl-style transform modules ------------------------------------------------------


def transform_rows(
    method: StridedEBFTMethod,
    entry: Any,
    index: int,
    key: str,
    config: Any,
    tokenizer: Any,
    source: str | None = None,
) -> tuple[Any, dict[str, int]]:
    """One dataset entry as strided rows: its Axolotl-style transform (`train.methods.grpo.
    transformed_rows`: the module on the Python path or beside the config at `source`) gives
    input_ids (+ attention_mask, labels, prompt_length); right padding is trimmed, rows longer
    than sequence_len cut, and rows where no block fits dropped (counted)."""
    import datasets

    from newtune.train.methods.grpo import transformed_rows

    where = f"{key}[{index}]"
    if not isinstance(entry.type, str):
        raise ConfigError(
            f"`{where}.type` must name a transform function for `rl: ebft` (strided), for "
            "example `type: ebft_pretrain.transform` returning input_ids/attention_mask/labels."
        )
    mapped = transformed_rows(entry, index, config, source, tokenizer, key)
    if "input_ids" not in mapped.column_names:
        raise DataError(
            f"`{where}.type: {entry.type}` gives rows with the columns "
            f"{', '.join(mapped.column_names)}, but strided EBFT trains on tokenized documents: "
            "make its row function return input_ids (and attention_mask, labels)."
        )
    names = [c for c in ("attention_mask", "labels", "prompt_length") if c in mapped.column_names]
    table = mapped.select_columns(["input_ids", *names]).to_dict()
    out: dict[str, list[Any]] = {"input_ids": [], "attention_mask": [], "labels": []}
    prompts: list[int] = []
    limit = int(config.sequence_len)
    short = 0
    for i, ids in enumerate(table["input_ids"]):
        ids = list(ids)
        attn = (
            list(table["attention_mask"][i] or [1] * len(ids))
            if "attention_mask" in table
            else [1] * len(ids)
        )
        labels = list(table["labels"][i] or ids) if "labels" in table else ids
        real = sum(1 for a in attn if a)
        if any(attn[real:]) or len(attn) != len(ids) or len(labels) != len(ids):
            raise DataError(
                f"{where} ({entry.path}) row {i}: input_ids, attention_mask and labels must have "
                "one entry per token, padding on the right."
            )
        real = min(real, limit)
        prompt = table["prompt_length"][i] if "prompt_length" in table else None
        trained = [j for j, label in enumerate(labels[:real]) if label != IGNORE_INDEX]
        first = trained[0] if trained else real  # labels masked from the start: a prompt
        anchor = method.row_anchor(real, prompt if prompt is not None else first)
        if real < anchor + method.gen_len:
            short += 1
            continue
        out["input_ids"].append(ids[:real])
        out["attention_mask"].append([1] * real)
        out["labels"].append(labels[:real])
        if prompt is not None:
            prompts.append(int(prompt))
    if prompts and len(prompts) == len(out["input_ids"]):
        out["prompt_length"] = prompts
    return datasets.Dataset.from_dict(out), {"rows": len(mapped), "too_short": short}


def prepare_strided_rows(
    method: StridedEBFTMethod, config: Any, tokenizer: Any, source: str | None = None
) -> Any:
    """PreparedData of the strided rows (kept in memory; a short document count in stats)."""
    import datasets

    from newtune.data.prepare import PreparedData, tokenizer_identity

    report = []
    parts = []
    for i, entry in enumerate(config.datasets or []):
        ds, counts = transform_rows(method, entry, i, "datasets", config, tokenizer, source)
        report.append({"path": entry.path, "type": entry.type, **counts, "kept": len(ds)})
        parts.append(ds)
    if not parts:
        raise ConfigError("`rl: ebft` (strided) needs `datasets` with a transform `type`.")
    data = datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    if len(data) == 0:
        need = method.context_length + method.gen_len
        raise DataError(
            f"no document is long enough for strided EBFT: a row needs at least {need} real "
            f"tokens (ebft.context_length {method.context_length} + generate_max_len "
            f"{method.gen_len}, past the prompt for prompt/completion rows) ({report}). Use "
            "longer documents or lower those keys."
        )
    splits = {"train": data}
    test = []
    for i, entry in enumerate(getattr(config, "test_datasets", None) or []):
        rows = transform_rows(method, entry, i, "test_datasets", config, tokenizer, source)
        test.append(rows[0])
    if test:
        splits["test"] = datasets.concatenate_datasets(test) if len(test) > 1 else test[0]
    elif config.val_set_size:
        size = config.val_set_size
        split = data.train_test_split(
            test_size=size if size < 1 else int(size), seed=config.seed, shuffle=True
        )
        splits = {"train": split["train"], "test": split["test"]}
    identity = {
        "datasets": [e.model_dump(mode="json") for e in config.datasets],
        "tokenizer": tokenizer_identity(tokenizer),
        "sequence_len": config.sequence_len,
        "ebft": {k: method.settings[k] for k in ("context_length", "generate_max_len")},
    }
    fp = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    stats = {
        "fingerprint": f"ebft-{fp[:16]}",
        "rows": {name: len(ds) for name, ds in splits.items()},
        "total_tokens": int(sum(len(x) for x in data["input_ids"])),
        "datasets": report,
    }
    path = Path(config.dataset_prepared_path) / stats["fingerprint"]
    return PreparedData(path, datasets.DatasetDict(splits), stats, reused=False)
