"""EAFT (Axolotl's `use_eaft`): the entropy-weighted token loss, exact against a direct
computation, reaching the Trainer, training through the CLI, and refused where it cannot apply."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import write_jsonl
from test_cli import CHATS, cli, make_config
from test_training_options import config
from transformers import LlamaForCausalLM

from newtune.config.compat4 import compat4_rules
from newtune.train.eaft import eaft_loss, loss_func


def direct(logits: torch.Tensor, labels: torch.Tensor, alpha: float, k: int, n=None) -> float:
    """EAFT by hand, one position at a time, in float64."""
    total, count = 0.0, 0
    for b in range(labels.shape[0]):
        for p in range(labels.shape[1] - 1):
            target = int(labels[b, p + 1])
            if target == -100:
                continue
            row = logits[b, p].double()
            logp = row - torch.logsumexp(row, 0)
            top = torch.topk(row, k).values
            q = torch.softmax(top, 0)
            entropy = float(-(q * q.log()).sum())
            total += -float(logp[target]) * entropy**alpha
            count += 1
    return total / (count if n is None else n)


def batch(vocab: int = 50):
    torch.manual_seed(0)
    logits = torch.randn(2, 6, vocab) * 3
    labels = torch.randint(0, vocab, (2, 6))
    labels[0, :2] = -100  # a prompt
    labels[1, 4:] = -100  # padding
    return logits, labels


@pytest.mark.parametrize(("alpha", "k"), [(1.0, 20), (0.5, 5), (2.0, 50)])
def test_loss_equals_a_direct_computation(alpha, k):
    logits, labels = batch()
    out = {"logits": logits}
    assert eaft_loss(out, labels, alpha=alpha, k=k).item() == pytest.approx(
        direct(logits, labels, alpha, k), rel=1e-5
    )
    # with the step's token count (gradient accumulation): summed, divided by the count
    assert eaft_loss(out, labels, num_items_in_batch=13, alpha=alpha, k=k).item() == (
        pytest.approx(direct(logits, labels, alpha, k, n=13), rel=1e-5)
    )


def test_alpha_zero_is_the_models_own_loss(model_dir):
    model = LlamaForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([[1, 5, 9, 3, 7, 2, 4, 8]])
    labels = ids.clone()
    labels[0, :3] = -100
    out = model(input_ids=ids)
    plain = model(input_ids=ids, labels=labels).loss
    torch.testing.assert_close(eaft_loss(out, labels, alpha=0.0), plain, atol=1e-6, rtol=1e-6)


def test_the_weight_carries_no_gradient():
    logits, labels = batch()
    logits.requires_grad_(True)
    eaft_loss({"logits": logits}, labels, num_items_in_batch=10, alpha=1.0, k=20).backward()
    expected = torch.zeros_like(logits)
    with torch.no_grad():
        for b in range(2):
            for p in range(5):
                t = int(labels[b, p + 1])
                if t == -100:
                    continue
                row = logits[b, p]
                q = torch.softmax(torch.topk(row, 20).values, 0)
                weight = float(-(q * q.log()).sum())
                grad = torch.softmax(row, 0)
                grad[t] -= 1
                expected[b, p] = grad * weight / 10
    torch.testing.assert_close(logits.grad, expected, atol=1e-6, rtol=1e-5)


def test_the_keys_reach_the_trainer(tmp_path, model_dir):
    assert loss_func(config(tmp_path)) is None
    func = loss_func(config(tmp_path, use_eaft=True))
    assert func.func is eaft_loss and func.keywords == {"alpha": 1.0, "k": 20}  # Axolotl's
    func = loss_func(config(tmp_path, use_eaft=True, eaft_alpha=0.5, eaft_k=8))
    assert func.keywords == {"alpha": 0.5, "k": 8}


@pytest.mark.parametrize(
    ("keys", "expected"),
    [
        ({"eaft_k": 8}, "`eaft_k` set without `use_eaft: true`"),
        ({"use_eaft": True, "rl": "dpo"}, "`use_eaft: true` weights the next-token loss of SFT"),
        (
            {"use_eaft": True, "liger_fused_linear_cross_entropy": True},
            "`use_eaft: true` with `liger_fused_linear_cross_entropy: true`",
        ),
        ({"use_eaft": True, "cut_cross_entropy": True}, "with `cut_cross_entropy: true`"),
    ],
)
def test_misuse_is_refused(tmp_path, keys, expected):
    errors = " ".join(compat4_rules(config(tmp_path, **keys)))
    assert expected in errors


@pytest.mark.slow
def test_cli_trains_with_eaft_and_logs_plain_eval_loss(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "chat.jsonl", CHATS)
    common = {"max_steps": 2, "learning_rate": 1e-12, "val_set_size": 0.25, "eval_steps": 2}
    runs = {}
    for name, keys in {"plain": {}, "eaft": {"use_eaft": True, "eaft_k": 8}}.items():
        (tmp_path / name).mkdir()
        cfg = make_config(tmp_path / name, model_dir, data, "chat_template", **common, **keys)
        proc = cli("-m", "newtune.cli.main", "train", str(cfg))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = json.loads((tmp_path / name / "out" / "log_history.json").read_text())
    train = {n: [h["loss"] for h in r if "loss" in h] for n, r in runs.items()}
    evals = {n: [h["eval_loss"] for h in r if "eval_loss" in h] for n, r in runs.items()}
    assert all(math.isfinite(x) for x in train["eaft"]) and len(train["eaft"]) == 2
    assert train["eaft"][0] != pytest.approx(train["plain"][0], rel=1e-3)  # a different loss
    assert evals["eaft"] == pytest.approx(evals["plain"], rel=1e-6)  # lr ~0: same model, plain CE
