"""Preference losses, log-probs and metrics equal TRL 1.16's trainers (the oracle) to 1e-5, and
packed per-sequence log-probs equal the unpadded ones."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from newtune.errors import ConfigError
from newtune.train.methods.base import forward_stats
from newtune.train.methods.pack import (
    PairPackCollator,
    PairPadCollator,
    pack_sequences,
    pack_shared_pairs,
)
from newtune.train.methods.pairs import PairCollator
from newtune.train.methods.preference import (
    DPO_LOSS_TYPES,
    DPOSettings,
    SequenceStats,
    cpo_loss,
    dpo_loss,
    kto_loss,
    orpo_loss,
    packed_sequence_logps,
    reward_loss,
    sequence_end_index,
    sequence_logps,
    token_nll,
)

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

TOL = 1e-5
PAIRS = [
    {"prompt": "The capital of France is", "chosen": " Paris.", "rejected": " Brintmoor."},
    {"prompt": "Name a color.", "chosen": " Blue", "rejected": " red, green and the lazy dog."},
    {"prompt": "What is the answer?", "chosen": " 0123456789", "rejected": " I am fine."},
    {"prompt": "Translate to French.", "chosen": " Hello there!", "rejected": " Blue."},
]
UNPAIRED = [
    {"prompt": "The capital of France is", "completion": " Paris.", "label": True},
    {"prompt": "Name a color.", "completion": " the quick brown fox", "label": False},
    {"prompt": "What is the answer?", "completion": " Blue, red, green.", "label": True},
    {"prompt": "Translate to French.", "completion": " I am fine.", "label": False},
    {"prompt": "Hello there!", "completion": " How are you?", "label": True},
]


def _model(model_dir, seed: int | None = None, attn: str = "sdpa"):
    """The tiny Llama in float32; `seed` adds small noise so policy and reference differ."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation=attn
    )
    model.config.use_cache = False
    if seed is not None:
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


def _common_args(tmp_path) -> dict:
    return {
        "output_dir": str(tmp_path),
        "report_to": [],
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "save_strategy": "no",
    }


def _close(a, b, tol: float = TOL) -> bool:
    a, b = (float(x.detach()) if isinstance(x, torch.Tensor) else float(x) for x in (a, b))
    return abs(a - b) <= tol * max(1.0, abs(b))


def _assert_metrics(ours: dict, theirs: dict, skip: tuple[str, ...] = ()) -> None:
    names = {k for k in theirs if k not in skip}
    assert names <= set(ours), sorted(names - set(ours))
    for name in names:
        assert _close(ours[name], theirs[name]), (name, float(ours[name]), theirs[name])


def _forward_stats(model, batch, labels, extras=True) -> SequenceStats:
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    return sequence_logps(logits, labels, extras=extras)


# ------------------------------------------------------------------ DPO


@pytest.fixture(scope="module")
def dpo(model_dir, chat_tokenizer, tmp_path_factory):
    """TRL's DPOTrainer on the tiny policy and a different reference, and one collated batch."""
    from trl import DPOConfig, DPOTrainer

    policy, ref = _model(model_dir), _model(model_dir, seed=1)
    args = DPOConfig(
        **_common_args(tmp_path_factory.mktemp("dpo")),
        per_device_train_batch_size=len(PAIRS),
        max_length=None,
        use_weighting=True,  # makes the fused head also compute WPO's term; toggled per test
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=datasets.Dataset.from_list(PAIRS),
            processing_class=chat_tokenizer,
        )
    rows = [trainer.train_dataset[i] for i in range(len(PAIRS))]
    return trainer, policy, ref, rows


def _trl_dpo(trainer, rows, **attrs) -> tuple[torch.Tensor, dict]:
    """TRL's own `_compute_loss` on the batch, with the trainer's loss settings set to `attrs`."""
    defaults = {
        "loss_types": ["sigmoid"],
        "loss_weights": [1.0],
        "beta": 0.1,
        "label_smoothing": 0.0,
        "use_weighting": False,
        "f_divergence_type": "reverse_kl",
        "f_alpha_divergence_coef": 1.0,
    }
    for key, value in {**defaults, **attrs}.items():
        setattr(trainer, key, value)
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    batch = trainer.data_collator(rows)
    loss = trainer.compute_loss(trainer.model, batch)
    metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    return loss, metrics


def _newtune_dpo(policy, ref, rows, settings: DPOSettings, pad_id: int):
    batch = PairPadCollator(pad_id)(rows)
    chosen, rejected = _forward_stats(policy, batch, batch["labels"]).halves()
    with torch.no_grad():
        ref_chosen, ref_rejected = _forward_stats(ref, batch, batch["labels"], False).halves()
    return dpo_loss(chosen, rejected, ref_chosen.logps, ref_rejected.logps, settings)


def test_pad_collator_is_trls_preference_layout(dpo):
    trainer, _, _, rows = dpo
    ours = PairPadCollator(trainer.processing_class.pad_token_id)(rows)
    theirs = trainer.data_collator(rows)
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    expected = theirs["input_ids"].masked_fill(theirs["completion_mask"] == 0, -100)
    assert torch.equal(ours["labels"], expected)


def test_sequence_logps_equal_trls_per_sequence_logps(dpo):
    trainer, policy, ref, rows = dpo
    batch = PairPadCollator(trainer.processing_class.pad_token_id)(rows)
    trl_batch = trainer.data_collator(rows)
    with torch.no_grad():
        for model in (policy, ref):
            stats = _forward_stats(model, batch, batch["labels"])
            theirs = torch.cat(trainer.compute_ref_log_probs(model, trl_batch))
            assert torch.allclose(stats.logps, theirs, atol=TOL, rtol=0)
            expected = trl_batch["completion_mask"][:, 1:].sum(1)
            assert stats.counts.tolist() == expected.tolist()
            assert (stats.logps < 0).all()


LOSS_CASES = [(t, {}) for t in DPO_LOSS_TYPES if t not in ("robust", "exo_pair", "aot")] + [
    ("robust", {"label_smoothing": 0.1}),
    ("exo_pair", {"label_smoothing": 1e-3}),
    ("aot", {"label_smoothing": 0.2}),
    ("aot_unpaired", {"label_smoothing": 0.2}),
    ("sigmoid", {"beta": 0.5, "use_weighting": True}),
    ("ipo", {"beta": 0.5, "use_weighting": True}),
    ("sigmoid", {"f_divergence_type": "forward_kl"}),
    ("sigmoid", {"f_divergence_type": "js_divergence"}),
    ("hinge", {"f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 0.5}),
]


@pytest.mark.parametrize(("loss_type", "extra"), LOSS_CASES)
def test_dpo_loss_and_metrics_equal_trl(dpo, loss_type, extra):
    trainer, policy, ref, rows = dpo
    settings = DPOSettings(loss_types=(loss_type,), **extra)
    theirs, trl_metrics = _trl_dpo(trainer, rows, loss_types=[loss_type], **extra)
    ours, metrics = _newtune_dpo(policy, ref, rows, settings, trainer.processing_class.pad_token_id)
    assert _close(ours, theirs), (float(ours), float(theirs))
    assert ours.requires_grad
    _assert_metrics(metrics, trl_metrics, skip=("num_tokens",))
    assert 0.0 < float(metrics["rewards/accuracies"]) < 1.0  # the batch is not one-sided


def test_weighted_sum_of_loss_types_equals_trl(dpo):
    trainer, policy, ref, rows = dpo
    types, weights = ("sigmoid", "bco_pair", "sft"), (0.8, 0.2, 1.0)
    theirs, trl_metrics = _trl_dpo(
        trainer, rows, loss_types=list(types), loss_weights=list(weights), beta=0.3
    )
    settings = DPOSettings(loss_types=types, loss_weights=weights, beta=0.3)
    ours, metrics = _newtune_dpo(policy, ref, rows, settings, trainer.processing_class.pad_token_id)
    assert _close(ours, theirs)
    _assert_metrics(metrics, trl_metrics, skip=("num_tokens",))


def test_gradients_equal_trl(dpo):
    trainer, policy, ref, rows = dpo
    theirs, _ = _trl_dpo(trainer, rows, loss_types=["ipo"], beta=0.2)
    policy.zero_grad()
    theirs.backward()
    expected = {n: p.grad.clone() for n, p in policy.named_parameters()}
    policy.zero_grad()
    settings = DPOSettings(loss_types=("ipo",), beta=0.2)
    ours, _ = _newtune_dpo(policy, ref, rows, settings, trainer.processing_class.pad_token_id)
    ours.backward()
    for name, p in policy.named_parameters():
        assert torch.allclose(p.grad, expected[name], atol=1e-6, rtol=1e-4), name
    policy.zero_grad()


def test_policy_equal_to_reference_gives_ln2_for_sigmoid_and_ipo_target(dpo):
    trainer, policy, _, rows = dpo
    batch = PairPadCollator(trainer.processing_class.pad_token_id)(rows)
    chosen, rejected = _forward_stats(policy, batch, batch["labels"]).halves()
    ref_c, ref_r = chosen.logps.detach(), rejected.logps.detach()
    loss, metrics = dpo_loss(chosen, rejected, ref_c, ref_r, DPOSettings(beta=0.1))
    assert float(loss) == pytest.approx(math.log(2), abs=1e-7)
    assert float(metrics["rewards/margins"]) == 0.0
    assert float(metrics["rewards/accuracies"]) == 0.0
    beta = 0.25
    loss, _ = dpo_loss(chosen, rejected, ref_c, ref_r, DPOSettings(("ipo",), beta=beta))
    assert float(loss) == pytest.approx((1 / (2 * beta)) ** 2, abs=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"loss_types": ("sigmoid", "dpop")}, "dpo_loss_type"),
        ({"loss_types": ()}, "dpo_loss_type"),
        ({"loss_types": ("sigmoid", "ipo"), "loss_weights": (1.0,)}, "dpo_loss_weights"),
        ({"loss_types": ("exo_pair",)}, "dpo_label_smoothing"),
        ({"loss_types": ("aot",), "use_weighting": True}, "dpo_use_weighting"),
        ({"loss_types": ("bco_pair",), "f_divergence_type": "forward_kl"}, "f_divergence_type"),
    ],
)
def test_dpo_settings_refuse_what_trl_refuses(kwargs, key):
    with pytest.raises(ConfigError, match=key):
        DPOSettings(**kwargs)


def test_sequence_logps_on_known_logits():
    logits = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    labels = torch.tensor([[-100, 0, 1]])
    stats = sequence_logps(logits, labels)
    p = torch.softmax(logits[0, :2], -1)
    expected = torch.log(p[0, 0]) + torch.log(p[1, 1])
    assert stats.counts.tolist() == [2]
    assert torch.allclose(stats.logps, expected.reshape(1))
    assert stats.top1.tolist() == [1.0]  # a tie picks the first maximum (token 0), as TRL
    entropy = -(p * p.log()).sum()
    assert torch.allclose(stats.entropy, entropy.reshape(1))
    assert torch.allclose(stats.mean_logits, torch.tensor([2.0 / 3]))
    wpo = expected - torch.log((p**2).sum(-1)).sum()
    assert torch.allclose(stats.wpo, wpo.reshape(1))


def test_sequence_logps_without_trained_tokens_are_zero():
    stats = sequence_logps(torch.randn(2, 3, 5), torch.full((2, 3), -100))
    assert stats.counts.tolist() == [0, 0]
    for values in (stats.logps, stats.entropy, stats.mean_logits, stats.top1, stats.wpo):
        assert values.tolist() == [0.0, 0.0]


# ------------------------------------------------------------------ packing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_sequence_logps_equal_unpadded_ones(model_dir, dpo, attn):
    trainer, _, _, rows = dpo
    model = _model(model_dir, seed=2, attn=attn)
    pad = trainer.processing_class.pad_token_id
    capacity = max(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows) + 12
    batch = PairPackCollator(pad, capacity)(rows)
    assert batch["input_ids"].shape[0] < 2 * len(rows)  # sequences really share rows
    assert (batch["sequence_index"] == -1).any()  # and some row has padding
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
        packed = packed_sequence_logps(
            logits, batch["labels"], batch["position_ids"], batch["sequence_index"], 2 * len(rows)
        )
        sequences = [(r["prompt_ids"] + r["chosen_ids"], len(r["prompt_ids"])) for r in rows] + [
            (r["prompt_ids"] + r["rejected_ids"], len(r["prompt_ids"])) for r in rows
        ]
        for i, (ids, prompt_len) in enumerate(sequences):
            alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits
            labels = torch.tensor([[-100] * prompt_len + ids[prompt_len:]])
            one = sequence_logps(alone, labels)
            assert abs(float(packed.logps[i] - one.logps[0])) <= TOL, i
            assert int(packed.counts[i]) == int(one.counts[0]) == len(ids) - prompt_len
            for field in ("entropy", "mean_logits", "top1", "wpo"):
                assert abs(float(getattr(packed, field)[i] - getattr(one, field)[0])) <= 1e-4


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("head_skip", [True, False])
def test_shared_prompt_logps_equal_unpadded_ones(model_dir, dpo, attn, head_skip, monkeypatch):
    """Each pair's prompt runs once: every sequence's log-probs and extras equal its own run."""
    trainer, _, _, rows = dpo
    model = _model(model_dir, seed=2, attn=attn)
    if not head_skip:
        monkeypatch.setattr("newtune.train.methods.base.head_can_skip", lambda m: False)
    pad = trainer.processing_class.pad_token_id
    capacity = max(len(r["prompt_ids"]) + len(r["chosen_ids"]) for r in rows) + 40
    batch = PairCollator(pad, capacity, share_prompt=True)(rows)
    assert "label_sequence" in batch and batch["attention_mask"].dim() == 4
    prompt_tokens = sum(len(r["prompt_ids"]) for r in rows)
    unshared = sum(
        2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows
    )
    assert int((batch["input_ids"] != pad).sum()) <= unshared - prompt_tokens + len(rows)
    with torch.no_grad():
        shared = forward_stats(model, batch)
        padded = PairPadCollator(pad)(rows)
        alone = _forward_stats(model, padded, padded["labels"])
    assert torch.equal(shared.counts, alone.counts)
    assert torch.allclose(shared.logps, alone.logps, atol=TOL, rtol=0)
    for field in ("entropy", "mean_logits", "top1", "wpo"):
        assert torch.allclose(getattr(shared, field), getattr(alone, field), atol=1e-4), field


@pytest.mark.parametrize("layout", ["packed", "shared"])
def test_packed_dpo_loss_and_gradients_equal_padded(model_dir, dpo, layout):
    """Packed sequences (and pairs packed around one prompt) give the padded loss, metrics and
    gradients; the reference scores the same batch."""
    trainer, _, ref, rows = dpo
    pad = trainer.processing_class.pad_token_id
    settings = DPOSettings(loss_types=("sigmoid", "ipo"), beta=0.3, use_weighting=True)
    if layout == "packed":
        packed = PairPackCollator(pad, 40)
    else:
        packed = PairCollator(pad, 48, share_prompt=True)
    results = []
    for collate in (PairPadCollator(pad), packed):
        model = _model(model_dir, seed=3)
        batch = collate(rows)
        stats = forward_stats(model, batch)
        with torch.no_grad():
            ref_stats = forward_stats(ref, batch, extras=False)
        chosen, rejected = stats.halves()
        ref_c, ref_r = ref_stats.halves()
        loss, metrics = dpo_loss(chosen, rejected, ref_c.logps, ref_r.logps, settings)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((loss, metrics, grads))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    assert abs(float(loss_a - loss_b)) <= 1e-6
    _assert_metrics(metrics_b, {k: float(v) for k, v in metrics_a.items()})
    for name, grad in grads_a.items():
        assert torch.allclose(grads_b[name], grad, atol=1e-6, rtol=1e-4), name


def test_pack_shared_pairs_layout():
    rows = [
        {"prompt_ids": [1, 2], "chosen_ids": [3, 4], "rejected_ids": [5]},
        {"prompt_ids": [], "chosen_ids": [6, 7], "rejected_ids": [8, 9]},
    ]
    out = pack_shared_pairs(rows, pad_id=0, capacity=16)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 2, 5, 6, 7, 8, 9]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 1, 2, 0, 1, 0, 1]]
    assert out["labels"].tolist() == [[-100, -100, 3, 4, -100, 5, -100, 7, -100, 9]]
    # sequences: 0, 1 = chosen of rows 0, 1; 2, 3 = their rejected
    assert out["label_sequence"].tolist() == [[-1, -1, 0, 0, -1, 2, -1, 1, -1, 3]]
    assert out["sequence_index"].tolist() == [0, 1, 2, 3]
    mask = out["attention_mask"][0, 0].int()
    assert mask[4].tolist() == [1, 0, 0, 0, 1, 0, 0, 0, 0, 0]  # bridge: prompt[:-1] and itself
    assert mask[5].tolist() == [1, 0, 0, 0, 1, 1, 0, 0, 0, 0]  # rejected never sees chosen
    assert mask[3].tolist() == [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    assert mask[8].tolist() == [0, 0, 0, 0, 0, 0, 0, 0, 1, 0]  # empty prompt: starts over
    padded = pack_shared_pairs(rows[:1], pad_id=0, capacity=8, pad_to_capacity=True)
    assert padded["input_ids"].tolist() == [[1, 2, 3, 4, 2, 5, 0, 0]]
    assert padded["attention_mask"][0, 0, 7].int().tolist() == [0] * 6 + [1, 1]


def test_pack_sequences_layout():
    out = pack_sequences([([5, 6, 7], 1), ([8, 9], 1), ([1, 2, 3, 4], 2)], pad_id=0, capacity=6)
    assert out["input_ids"].tolist() == [[1, 2, 3, 4, 8, 9], [5, 6, 7, 0, 0, 0]]
    assert out["labels"].tolist() == [[-100, -100, 3, 4, -100, 9], [-100, 6, 7, -100, -100, -100]]
    assert out["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]
    assert out["sequence_index"].tolist() == [2, 1, 0, -1]
    assert sequence_end_index(out["position_ids"], out["sequence_index"], 3).tolist() == [8, 5, 3]


def test_packed_logps_refuse_a_scored_first_token():
    positions = torch.tensor([[0, 1, 0, 1]])
    labels = torch.tensor([[-100, 3, 4, 5]])
    with pytest.raises(ValueError, match="first label"):
        packed_sequence_logps(torch.zeros(1, 4, 8), labels, positions, torch.tensor([0, 1]), 2)


# ------------------------------------------------------------------ CPO / SimPO and ORPO


def _legacy_batch(trainer, rows_key="train_dataset"):
    """A collated batch of the legacy (CPO/ORPO) trainers and its concatenated tensors."""
    ds = getattr(trainer, rows_key)
    batch = trainer.data_collator([ds[i] for i in range(len(ds))])
    cat = trainer.concatenated_inputs(batch, padding_value=trainer.processing_class.pad_token_id)
    return batch, cat


@pytest.fixture(scope="module")
def cpo(model_dir, chat_tokenizer, tmp_path_factory):
    """TRL's experimental CPOTrainer (SimPO is its loss_type simpo) on the tiny policy."""
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    policy = _model(model_dir, seed=4)
    args = CPOConfig(**_common_args(tmp_path_factory.mktemp("cpo")), max_length=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = CPOTrainer(
            model=policy,
            args=args,
            train_dataset=datasets.Dataset.from_list(PAIRS),
            processing_class=chat_tokenizer,
        )
    return trainer, policy


@pytest.mark.parametrize(
    "kw",
    [
        {"loss_type": "sigmoid", "beta": 0.1, "cpo_alpha": 1.0, "label_smoothing": 0.1},
        {"loss_type": "hinge", "beta": 0.1, "cpo_alpha": 0.5},
        {"loss_type": "ipo", "beta": 0.5, "cpo_alpha": 1.0},
        {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0, "simpo_gamma": 0.5},
        {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.3, "simpo_gamma": 1.2},
        {"loss_type": "simpo", "beta": 2.0, "cpo_alpha": 0.0, "alpha": 0.25},
    ],
)
def test_cpo_and_simpo_equal_trl(cpo, kw):
    trainer, policy = cpo
    settings = {"label_smoothing": 0.0, "simpo_gamma": 0.5, "alpha": 0.0, **kw}
    for key, value in settings.items():
        setattr(trainer, key, value)
    batch, cat = _legacy_batch(trainer)
    theirs, trl_metrics = trainer.get_batch_loss_metrics(policy, batch)
    logits = policy(
        cat["concatenated_input_ids"], attention_mask=cat["concatenated_attention_mask"]
    ).logits
    chosen, rejected = sequence_logps(logits, cat["concatenated_labels"]).halves()
    ours, metrics = cpo_loss(chosen, rejected, **settings)
    assert _close(ours, theirs), (float(ours), float(theirs))
    _assert_metrics(metrics, trl_metrics, skip=("logits/chosen", "logits/rejected"))


@pytest.fixture(scope="module")
def orpo(model_dir, chat_tokenizer, tmp_path_factory):
    """TRL's experimental ORPOTrainer on the tiny policy."""
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    policy = _model(model_dir, seed=5)
    args = ORPOConfig(**_common_args(tmp_path_factory.mktemp("orpo")), max_length=128)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = ORPOTrainer(
            model=policy,
            args=args,
            train_dataset=datasets.Dataset.from_list(PAIRS),
            processing_class=chat_tokenizer,
        )
    return trainer, policy


@pytest.mark.parametrize("beta", [0.1, 0.8])
def test_orpo_equals_trl(orpo, beta):
    trainer, policy = orpo
    trainer.beta = beta
    batch, cat = _legacy_batch(trainer)
    theirs, trl_metrics = trainer.get_batch_loss_metrics(policy, batch)
    ids, mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
    logits = policy(ids, attention_mask=mask).logits
    chosen, rejected = sequence_logps(logits, cat["concatenated_labels"]).halves()
    n = len(chosen)
    whole = ids.masked_fill(mask == 0, -100)[:n]  # TRL's ORPO NLL scores the prompt as well
    nll = token_nll(sequence_logps(logits[:n], whole, extras=False))
    ours, metrics = orpo_loss(chosen, rejected, nll, beta=beta)
    assert _close(ours, theirs), (float(ours), float(theirs))
    _assert_metrics(metrics, trl_metrics, skip=("logits/chosen", "logits/rejected"))


# ------------------------------------------------------------------ KTO


@pytest.fixture(scope="module")
def kto(model_dir, chat_tokenizer, tmp_path_factory):
    """TRL's KTOTrainer; one batch holds the whole dataset, so KL completions rotate within it."""
    from trl import KTOConfig, KTOTrainer

    policy, ref = _model(model_dir, seed=7), _model(model_dir, seed=6)
    args = KTOConfig(
        **_common_args(tmp_path_factory.mktemp("kto")),
        per_device_train_batch_size=len(UNPAIRED),
        max_length=None,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = KTOTrainer(
            model=policy,
            ref_model=ref,
            args=args,
            train_dataset=datasets.Dataset.from_list(UNPAIRED),
            processing_class=chat_tokenizer,
        )
    rows = [trainer.train_dataset[i] for i in range(len(UNPAIRED))]
    return trainer, policy, ref, rows


@pytest.mark.parametrize(
    "kw",
    [
        {"loss_type": "kto", "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0},
        {"loss_type": "kto", "beta": 0.5, "desirable_weight": 1.33, "undesirable_weight": 0.7},
        {"loss_type": "apo_zero_unpaired", "beta": 0.3, "desirable_weight": 1.0,
         "undesirable_weight": 2.0},
    ],
)  # fmt: skip
def test_kto_equals_trl(kto, kw):
    trainer, policy, ref, rows = kto
    for key, value in kw.items():
        setattr(trainer, key, value)
    trainer.calculate_KL = kw["loss_type"] == "kto"
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    batch = trainer.data_collator(rows)
    theirs = trainer.compute_loss(policy, batch)
    trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}

    def run(model, prefix: str, extras: bool) -> SequenceStats:
        part = {k[len(prefix) :]: v for k, v in batch.items() if k.startswith(prefix)}
        labels = part["input_ids"].masked_fill(part["completion_mask"] == 0, -100)
        return _forward_stats(model, part, labels, extras)

    stats = run(policy, "", True)
    with torch.no_grad():
        ref_logps = run(ref, "", False).logps
        kl = run(policy, "KL_", False).logps if trainer.calculate_KL else None
        ref_kl = run(ref, "KL_", False).logps if trainer.calculate_KL else None
    ours, metrics = kto_loss(stats, ref_logps, batch["label"], kl, ref_kl, **kw)
    assert _close(ours, theirs), (float(ours), float(theirs))
    _assert_metrics(metrics, trl_metrics, skip=("num_tokens",))
    if trainer.calculate_KL:
        assert float(metrics["kl"]) > 0  # the test exercises the KL term


# ------------------------------------------------------------------ reward model


@pytest.fixture(scope="module")
def reward(model_dir, chat_tokenizer, tmp_path_factory):
    """TRL's RewardTrainer on the tiny Llama with a one-label score head."""
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    torch.manual_seed(8)
    model = AutoModelForSequenceClassification.from_pretrained(
        model_dir, num_labels=1, dtype=torch.float32
    ).eval()
    args = RewardConfig(**_common_args(tmp_path_factory.mktemp("reward")), max_length=None)
    rows = [{**p, "margin": m} for p, m in zip(PAIRS, (0.5, 0.0, 1.0, -0.25), strict=True)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = RewardTrainer(
            model=model,
            args=args,
            train_dataset=datasets.Dataset.from_list(rows),
            processing_class=chat_tokenizer,
        )
    rows = [trainer.train_dataset[i] for i in range(len(rows))]
    return trainer, model, rows


@pytest.mark.parametrize(("use_margin", "center"), [(False, None), (True, 0.01), (False, 0.5)])
def test_reward_loss_equals_trl(reward, use_margin, center):
    trainer, model, rows = reward
    trainer.args.center_rewards_coefficient = center
    given = rows if use_margin else [{k: v for k, v in r.items() if k != "margin"} for r in rows]
    mode = "train" if trainer.model.training else "eval"
    trainer._metrics[mode].clear()
    batch = trainer.data_collator(given)
    theirs = trainer.compute_loss(model, dict(batch))
    trl_metrics = {k: v[-1] for k, v in trainer._metrics[mode].items()}
    rewards = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    chosen, rejected = rewards.squeeze(-1).chunk(2)
    ours, metrics = reward_loss(
        chosen, rejected, margin=batch.get("margin"), center_rewards_coefficient=center
    )
    assert _close(ours, theirs), (float(ours), float(theirs))
    _assert_metrics(metrics, trl_metrics, skip=("num_tokens",))
    assert 0.0 < float(metrics["accuracy"]) < 1.0


def test_packed_rewards_equal_padded(reward):
    trainer, model, rows = reward
    seqs = [(r["chosen_ids"], 0) for r in rows] + [(r["rejected_ids"], 0) for r in rows]
    packed = pack_sequences(seqs, trainer.processing_class.pad_token_id, capacity=40)
    assert packed["input_ids"].shape[0] < len(seqs)
    with torch.no_grad():
        hidden = model.model(
            input_ids=packed["input_ids"], position_ids=packed["position_ids"]
        ).last_hidden_state
        ends = sequence_end_index(packed["position_ids"], packed["sequence_index"], len(seqs))
        rewards = model.score(hidden.flatten(0, 1)[ends]).squeeze(-1)
        batch = trainer.data_collator(rows)
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert torch.allclose(rewards, padded.logits.squeeze(-1), atol=TOL, rtol=0)
