"""Structured energy-based fine-tuning (`rl: ebft`, arXiv 2603.12248) on TRL's GRPOTrainer.

Rows are a `prompt` (text or chat messages) and its `ground_truth` completion. For each prompt
TRL samples `trl.num_generations` completions; the reward of each is the feature-matching
reward of `train.methods.ebft_core` (paper eq. 7): the frozen feature network (the policy at
init: the PEFT base with the adapter off, or a frozen copy) embeds prompt + completion and
prompt + ground truth (hidden states at `ebft.feature_layers` depths, L2-normalised per layer,
concatenated, pooled by `ebft.embed_method`); without whitening the pooled embeddings are
L2-normalised as Axolotl's structured trainer does, with `use_whitening` they are SVD-whitened
per prompt group instead. reward = alignment_coef * 2 cos(gen, gt) - diversity_coef * 2 x mean
dot product with the group's other samples. TRL turns the rewards into group advantages and
the clipped policy loss (`trl.loss_type`, `trl.epsilon`, `trl.scale_rewards`).

`ebft.ce_coef > 0` adds the cross-entropy of the ground-truth tokens given the prompt to the
loss (the paper's mixed objective). `ebft.adaptive_max_tokens` caps each generation batch at
`gt_length_multiplier` x its longest ground truth in tokens (at least 64, at most
`trl.max_completion_length`). Metrics: ebft/alignment, ebft/diversity, ebft/cfm_loss,
ebft/reward (and ebft/ce_loss), as Axolotl names them.

Sequences are tokenized as TRL renders prompts (chat template with `trl.chat_template_kwargs`)
followed by the exact generated tokens (trailing EOS/padding left out, as Axolotl's decoded
text leaves them out) or the ground truth's tokens; both are cut at `sequence_len` +
`trl.max_completion_length` tokens (the longest prompt plus the longest completion).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from newtune.config.schema.online import ebft_block
from newtune.errors import ConfigError, DataError
from newtune.train.methods import ebft_core as core
from newtune.train.methods.grpo import OnlineMethod, add_stop_tokens

log = logging.getLogger(__name__)

METRICS = ("ebft/alignment", "ebft/diversity", "ebft/cfm_loss", "ebft/reward")
MIN_ADAPTIVE_TOKENS = 64  # Axolotl's floor of the adaptive completion cap
IGNORE_INDEX = -100


def group_embeddings(
    gen: torch.Tensor, gt: torch.Tensor, num_generations: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(P * n, D) generated and (P, D) ground-truth embeddings as (P, n, D) and (P, D)."""
    rows = gen.shape[0]
    if rows % num_generations or rows // num_generations != gt.shape[0]:
        raise ValueError(
            f"{rows} completions do not form {gt.shape[0]} groups of {num_generations}"
        )
    return gen.view(gt.shape[0], num_generations, -1), gt


def structured_rewards(
    gen: torch.Tensor,
    gt: torch.Tensor,
    num_generations: int,
    alignment_coef: float = 1.0,
    diversity_coef: float = 1.0,
    use_whitening: bool = False,
) -> core.Rewards:
    """Rewards of (P * n, D) pooled completion embeddings against their (P, D) ground truths.

    Completions are grouped n at a time in order (TRL repeats each prompt n times in a row).
    Without whitening both sides are L2-normalised first (Axolotl's structured trainer), so
    the diversity term is a mean cosine; with whitening each group is whitened as is.
    """
    gen, gt = group_embeddings(gen.float(), gt.float(), num_generations)
    if not use_whitening:
        gen, gt = F.normalize(gen, p=2, dim=-1), F.normalize(gt, p=2, dim=-1)
    return core.feature_rewards(gen, gt, alignment_coef, diversity_coef, use_whitening)


def strip_end(ids: list[int], drop: set[int]) -> list[int]:
    """`ids` without the trailing tokens in `drop` (EOS, padding)."""
    end = len(ids)
    while end > 0 and ids[end - 1] in drop:
        end -= 1
    return list(ids[:end])


def pad_right(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and their 0/1 attention mask."""
    width = max(1, max(len(s) for s in seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, : len(seq)] = 1
    return ids, mask


class StructuredEBFTMethod(OnlineMethod):
    """`rl: ebft` structured mode: GRPO with the feature-matching reward."""

    name = "ebft"
    columns = ("prompt", "ground_truth")

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.ebft = ebft_block(config)
        self.max_length = int(config.sequence_len) + int(self.trl.max_completion_length or 512)

    def check_rows(self, data: Any) -> None:
        """Multi-turn rows (Axolotl's `remaining_turns`, sequential rollouts) are refused."""
        for split, ds in data.items():
            if "remaining_turns" in ds.column_names:
                raise DataError(
                    f"the `{split}` rows have a `remaining_turns` column: Axolotl's multi-turn "
                    "EBFT rolls out each later assistant turn with vLLM, which newtune does not "
                    "do. Give one (prompt, ground_truth) row per assistant turn instead (the "
                    "conversation so far as the prompt)."
                )

    def reward_funcs(self) -> list[Any]:
        """None here: the trainer passes its own feature-matching reward to TRL."""
        return []

    def build_trainer(
        self, model: Any, args: Any, data: Any, tokenizer: Any, callbacks: list[Any]
    ) -> Any:
        """The EBFT trainer; each rank must generate whole groups (diversity is per group)."""
        per_rank = args.per_device_train_batch_size * args.steps_per_generation
        if per_rank % args.num_generations:
            raise ConfigError(
                f"`rl: ebft` compares each completion with the other completions of its prompt "
                f"on the same GPU, but each GPU generates {per_rank} completions per round "
                f"(micro_batch_size x gradient_accumulation_steps), not a multiple of "
                f"trl.num_generations = {args.num_generations}; make it one (or set "
                "trl.generation_batch_size to a multiple of num_generations x the GPU count)."
            )
        return super().build_trainer(model, args, data, tokenizer, callbacks)

    def trainer_class(self) -> type:
        """TRL's GRPOTrainer with the EBFT reward, CE term and adaptive completion cap."""
        return ebft_trainer_class()


class FeatureReward:
    """The TRL reward function of a trainer: feature matching against `ground_truth`."""

    __name__ = "ebft"

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def __call__(
        self,
        prompts: list[Any],
        completions: list[Any],
        completion_ids: list[list[int]],
        ground_truth: list[str] | None = None,
        **kwargs: Any,
    ) -> list[float]:
        """One reward per completion; metrics go to the trainer's log."""
        trainer = self.trainer
        if ground_truth is None:
            raise DataError(
                "`rl: ebft` rewards completions against the `ground_truth` column, which the "
                "rows lack; make the dataset transform return it."
            )
        bad = next((i for i, g in enumerate(ground_truth) if not isinstance(g, str)), None)
        if bad is not None:
            raise DataError(
                f"`rl: ebft`: a row's `ground_truth` is {type(ground_truth[bad]).__name__}, not "
                "text; make the dataset transform return the reference completion as a string."
            )
        training = trainer.model.training
        n = trainer.num_generations if training else trainer.num_generations_eval
        check_groups(prompts, ground_truth, n)
        return trainer.ebft_rewards(prompts, completion_ids, ground_truth, n, training)


def check_groups(prompts: list[Any], ground_truth: list[str], n: int) -> None:
    """Completions come in whole groups of n per prompt (TRL's sampler order)."""
    if len(prompts) % n:
        raise DataError(
            f"`rl: ebft` got {len(prompts)} completions, not whole groups of "
            f"trl.num_generations = {n}; make micro_batch_size x gradient_accumulation_steps "
            "per GPU a multiple of it."
        )
    for start in range(0, len(prompts), n):
        group = range(start, start + n)
        if any(
            prompts[i] != prompts[start] or ground_truth[i] != ground_truth[start] for i in group
        ):
            raise DataError(
                "`rl: ebft`: a group of trl.num_generations completions mixes prompts (the "
                "per-GPU batch splits groups); make micro_batch_size x gradient_accumulation_steps "
                "per GPU a multiple of trl.num_generations."
            )


def ebft_trainer_class() -> type:
    """The EBFT GRPOTrainer subclass (built on use: trl is imported lazily)."""
    from trl import GRPOTrainer

    class EBFTTrainer(GRPOTrainer):
        """GRPOTrainer whose reward is EBFT's feature matching."""

        def __init__(self, *args: Any, method: StructuredEBFTMethod, **kwargs: Any) -> None:
            self.method = method
            self.ebft = method.ebft
            kwargs["reward_funcs"] = [FeatureReward(self)]
            super().__init__(*args, **kwargs)
            add_stop_tokens(self, method.trl)
            self.feature_network = core.FeatureNetwork(self.model)
            self.feature_layers = core.layer_indices(
                core.num_layers_of(self.model), self.ebft.feature_layers
            )
            self._gt_rows: list[list[int]] | None = None
            self._gt_prompt_lengths: list[int] | None = None
            log.info(
                "ebft: feature network %s, layers %s, embed_method %s, whitening %s",
                "shares the PEFT base (adapter off)"
                if self.feature_network.kind == "adapter"
                else "is a frozen copy",
                self.feature_layers,
                self.ebft.embed_method,
                self.ebft.use_whitening,
            )

        # -- rewards --------------------------------------------------------------------

        def ebft_rewards(
            self,
            prompts: list[Any],
            completion_ids: list[list[int]],
            ground_truth: list[str],
            n: int,
            training: bool,
        ) -> list[float]:
            """Feature-matching rewards of the completions (grouped n per prompt)."""
            tok = self.processing_class
            heads = prompts[::n]
            prompt_ids = [list(p) for p in self._tokenize_prompts(heads)[0]]
            drop = {*self.eos_token_ids, tok.pad_token_id}
            limit = self.method.max_length
            gen = [
                (prompt_ids[i // n] + strip_end(list(c), drop))[:limit]
                for i, c in enumerate(completion_ids)
            ]
            answers = tok(list(ground_truth[::n]), add_special_tokens=False)["input_ids"]
            gt = [(p + list(a))[:limit] for p, a in zip(prompt_ids, answers, strict=True)]
            lengths = [min(len(p), limit) for p in prompt_ids]
            gen_emb = self._embed(gen, [lengths[i // n] for i in range(len(gen))])
            gt_emb = self._embed(gt, lengths)
            parts = structured_rewards(
                gen_emb,
                gt_emb,
                n,
                self.ebft.alignment_coef,
                self.ebft.diversity_coef,
                self.ebft.use_whitening,
            )
            mode = "train" if training else "eval"
            values = {
                "ebft/alignment": parts.alignment.mean().item(),
                "ebft/diversity": parts.diversity.mean().item(),
                "ebft/cfm_loss": parts.cfm.mean().item(),
                "ebft/reward": parts.rewards.mean().item(),
            }
            for name, value in values.items():
                self._metrics[mode][name].append(value)
            log.debug("ebft reward %s", values)
            self._gt_rows = [gt[i // n] for i in range(len(gen))]
            self._gt_prompt_lengths = [lengths[i // n] for i in range(len(gen))]
            return parts.rewards.reshape(-1).tolist()

        def _embed(self, seqs: list[list[int]], prompt_lengths: list[int]) -> torch.Tensor:
            """(len(seqs), D) pooled features, in chunks of the micro-batch size."""
            chunk = max(1, int(self.args.per_device_train_batch_size))
            device = self.accelerator.device
            pad = self.processing_class.pad_token_id
            out = []
            for start in range(0, len(seqs), chunk):
                ids, mask = pad_right(seqs[start : start + chunk], pad)
                ids, mask = ids.to(device), mask.to(device)
                feats = self.feature_network.features(ids, self.feature_layers, mask)
                plens = torch.tensor(prompt_lengths[start : start + chunk], device=device)
                out.append(core.pool(feats, self.ebft.embed_method, mask, plens))
            return torch.cat(out, 0)

        # -- generation cap and the batch ------------------------------------------------

        @contextlib.contextmanager
        def _completion_cap(self, inputs: list[dict[str, Any]]) -> Iterator[None]:
            """adaptive_max_tokens: the batch's completion cap from its longest ground truth."""
            if not self.ebft.adaptive_max_tokens or not inputs:
                yield
                return
            answers = [x.get("ground_truth") or "" for x in inputs]
            counts = self.processing_class(answers, add_special_tokens=False)["input_ids"]
            cap = max(int(len(c) * self.ebft.gt_length_multiplier) for c in counts)
            cap = min(max(cap, MIN_ADAPTIVE_TOKENS), self.max_completion_length)
            if self.use_vllm:
                target, attr = self.vllm_generation, "max_completion_length"
            else:
                target, attr = self.generation_config, "max_new_tokens"
            before = getattr(target, attr)
            setattr(target, attr, cap)
            try:
                yield
            finally:
                setattr(target, attr, before)

        def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, Any]:
            """TRL's generation and scoring; the rows' ground-truth ids ride along for CE."""
            with self._completion_cap(inputs):
                out = super()._generate_and_score_completions(inputs)
            if self.ebft.ce_coef > 0 and self._gt_rows is not None:
                out["ebft_gt_ids"] = self._gt_rows
                out["ebft_gt_prompt_len"] = torch.tensor(self._gt_prompt_lengths)
            self._gt_rows = self._gt_prompt_lengths = None
            return out

        # -- loss ------------------------------------------------------------------------

        def compute_loss(
            self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any
        ) -> torch.Tensor:
            """TRL's policy loss, plus ce_coef x the ground truth's cross-entropy."""
            loss = super().compute_loss(model, inputs, return_outputs, **kwargs)
            rows = inputs.get("ebft_gt_ids")
            if self.ebft.ce_coef <= 0 or not rows:
                return loss
            ce = self._ground_truth_ce(model, rows, inputs["ebft_gt_prompt_len"].tolist())
            mode = "train" if self.model.training else "eval"
            self._metrics[mode]["ebft/ce_loss"].append(ce.item())
            scale = self.current_gradient_accumulation_steps if mode == "train" else 1
            return loss + self.ebft.ce_coef * ce / scale

        def _ground_truth_ce(
            self, model: Any, rows: list[list[int]], prompt_lengths: list[int]
        ) -> torch.Tensor:
            """Mean cross-entropy of the ground-truth tokens given their prompt."""
            ids, mask = pad_right(rows, self.processing_class.pad_token_id)
            labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
            for i, plen in enumerate(prompt_lengths):
                labels[i, :plen] = IGNORE_INDEX
            if not (labels[:, 1:] != IGNORE_INDEX).any():  # every ground truth cut off
                return torch.zeros((), device=self.accelerator.device)
            device = self.accelerator.device
            out = model(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                labels=labels.to(device),
                use_cache=False,
            )
            return out.loss

    return EBFTTrainer
