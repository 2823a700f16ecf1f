"""EBFT shared math: exact values on hand-built tensors against the direct formulas."""

from __future__ import annotations

import math

import pytest
import torch

from newtune.train.methods import ebft_core as core


def test_layer_indices_are_fractions_of_depth():
    assert core.layer_indices(16, [0.25, 0.5, 0.75]) == [4, 8, 12]
    assert core.layer_indices(2, [0.0, 0.5, 1.0]) == [0, 1, 2]
    assert core.layer_indices(28, [0.25, 0.5, 0.75]) == [7, 14, 21]
    with pytest.raises(ValueError, match="outside"):
        core.layer_indices(4, [1.5])


def test_layer_features_normalise_each_layer_then_concatenate():
    h0 = torch.tensor([[[3.0, 4.0], [0.0, 2.0]]])
    h1 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    h2 = torch.tensor([[[5.0, 5.0], [6.0, 8.0]]])
    out = core.layer_features((h0, h1, h2), [0, 2])
    r = 1 / math.sqrt(2)
    expected = torch.tensor([[[0.6, 0.8, r, r], [0.0, 1.0, 0.6, 0.8]]])
    torch.testing.assert_close(out, expected)


def test_pool_methods_with_right_padding():
    feats = torch.arange(2 * 5 * 2, dtype=torch.float32).reshape(2, 5, 2)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    last = core.pool(feats, "last_token", mask)
    torch.testing.assert_close(last, torch.stack([feats[0, 4], feats[1, 2]]))
    mean = core.pool(feats, "mean_pooling", mask)
    torch.testing.assert_close(mean, torch.stack([feats[0].mean(0), feats[1, :3].mean(0)]))
    cat = core.pool(feats, "concat", mask)  # len 5: 1, 2, 3; len 3: 0, 1, 2
    torch.testing.assert_close(
        cat,
        torch.stack(
            [
                torch.cat([feats[0, 1], feats[0, 2], feats[0, 3]]),
                torch.cat([feats[1, 0], feats[1, 1], feats[1, 2]]),
            ]
        ),
    )
    comp = core.pool(feats, "completion_mean", mask, prompt_lengths=torch.tensor([3, 1]))
    torch.testing.assert_close(comp, torch.stack([feats[0, 3:].mean(0), feats[1, 1:3].mean(0)]))
    # no mask: every token; leading dims are batch dims
    blocks = feats.reshape(1, 2, 5, 2)
    torch.testing.assert_close(core.pool(blocks, "last_token"), blocks[:, :, -1])
    with pytest.raises(ValueError, match="embed_method"):
        core.pool(feats, "max")


def test_whitening_matches_the_pseudo_inverse_formula():
    torch.manual_seed(0)
    gen = torch.randn(3, 6)  # n=3 samples, D=6
    gt = torch.randn(6)
    gen_w, gt_w = core.whiten(gen, gt)
    u, s, _ = torch.linalg.svd(gen.T, full_matrices=False)
    w = u @ torch.diag(1 / s) @ u.T
    torch.testing.assert_close(gen_w, gen @ w)
    torch.testing.assert_close(gt_w, gt @ w)
    # full rank n <= D: the whitened samples are orthonormal (gen_w gen_w^T = I)
    torch.testing.assert_close(gen_w @ gen_w.T, torch.eye(3), atol=1e-5, rtol=0)
    # batched groups give the per-group result; a (.., n, D) gt is whitened row by row
    batch = torch.randn(2, 4, 3, 6)
    gts = torch.randn(2, 4, 3, 6)
    bw, gw = core.whiten(batch, gts)
    one_w, one_gt = core.whiten(batch[1, 2], gts[1, 2])
    torch.testing.assert_close(bw[1, 2], one_w)
    torch.testing.assert_close(gw[1, 2], one_gt)


def test_whitening_drops_tiny_singular_values():
    gen = torch.tensor([[1.0, 0.0, 0.0], [2.0, 0.0, 0.0]])  # rank 1
    gt = torch.tensor([1.0, 1.0, 0.0])
    gen_w, gt_w = core.whiten(gen, gt)
    s = math.sqrt(5.0)  # the one singular value, direction e0
    torch.testing.assert_close(gen_w, torch.tensor([[1 / s, 0, 0], [2 / s, 0, 0]]))
    torch.testing.assert_close(gt_w, torch.tensor([1 / s, 0, 0]))


def test_feature_rewards_equal_paper_eq7_without_whitening():
    gen = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]]])  # one group, n=3
    gt = torch.tensor([[1.0, 0.0]])
    out = core.feature_rewards(gen, gt, alignment_coef=1.5, diversity_coef=0.5)
    cos = torch.tensor([1.0, 0.0, 1 / math.sqrt(2)])
    # dots: g0.g1=0, g0.g2=1, g1.g2=2
    div = torch.tensor([(0 + 1) / 2, (0 + 2) / 2, (1 + 2) / 2])
    torch.testing.assert_close(out.alignment, 2 * cos.unsqueeze(0))
    torch.testing.assert_close(out.diversity, 2 * div.unsqueeze(0))
    torch.testing.assert_close(out.rewards, (1.5 * 2 * cos - 0.5 * 2 * div).unsqueeze(0))
    mean = gen[0].mean(0)
    torch.testing.assert_close(out.cfm, ((mean - gt[0]) ** 2).sum().unsqueeze(0))


def test_feature_rewards_with_whitening_use_the_whitened_embeddings():
    torch.manual_seed(1)
    gen = torch.randn(2, 4, 8)
    gt = torch.randn(2, 8)
    out = core.feature_rewards(gen, gt, use_whitening=True)
    gw, tw = core.whiten(gen, gt)
    cos = torch.nn.functional.cosine_similarity(gw, tw.unsqueeze(1), dim=-1)
    torch.testing.assert_close(out.alignment, 2 * cos)
    # whitened samples are orthonormal: no diversity penalty
    torch.testing.assert_close(out.diversity, torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cfm, ((gw.mean(1) - tw) ** 2).sum(-1))


def test_one_sample_has_no_diversity():
    gen = torch.tensor([[[3.0, 4.0]]])
    out = core.feature_rewards(gen, torch.tensor([[0.0, 1.0]]))
    torch.testing.assert_close(out.diversity, torch.zeros(1, 1))
    torch.testing.assert_close(out.rewards, torch.tensor([[1.6]]))


def test_advantage_estimators():
    r = torch.tensor([[1.0, 2.0, 4.0, 5.0]])
    rloo = core.advantages(r, "rloo")
    expected = torch.tensor([[1 - 11 / 3, 2 - 10 / 3, 4 - 8 / 3, 5 - 7 / 3]])
    torch.testing.assert_close(rloo, expected)
    norm = core.advantages(r, "group_norm")
    std = torch.tensor([1.0, 2.0, 4.0, 5.0]).std()  # unbiased
    torch.testing.assert_close(norm, (r - 3.0) / (std + 1e-8))
    torch.testing.assert_close(core.advantages(r, "reinforce"), r)
    one = torch.tensor([[0.7]])
    torch.testing.assert_close(core.advantages(one, "rloo"), one)
    with pytest.raises(ValueError, match="advantage_estimator"):
        core.advantages(r, "ppo")


def test_policy_gradient_loss_is_a_masked_token_mean_with_detached_advantages():
    logps = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    adv = torch.tensor([[0.5, -1.0, 2.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    loss = core.policy_gradient_loss(logps, adv, mask)
    torch.testing.assert_close(loss, torch.tensor((0.5 * 1 + -1.0 * 2) / 2))
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[-0.25, 0.5, 0.0]]))
    assert adv.grad is None


def _tiny_llama(layers: int = 4):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


def test_feature_network_is_a_frozen_copy_of_the_policy_at_init():
    policy = _tiny_llama().train()
    net = core.FeatureNetwork(policy)
    assert net.kind == "copy" and net.model is not policy
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    idx = core.layer_indices(core.num_layers_of(policy), [0.25, 0.5, 1.0])
    assert idx == [1, 2, 4]
    before = net.features(ids, idx)
    with torch.no_grad():
        ref = policy.eval()(ids, output_hidden_states=True).hidden_states
    torch.testing.assert_close(before, core.layer_features(ref, idx))
    assert before.shape == (1, 5, 48) and not before.requires_grad
    with torch.no_grad():  # training the policy leaves the features alone
        for p in policy.parameters():
            p.add_(0.1)
    torch.testing.assert_close(net.features(ids, idx), before)
    assert not any(p.requires_grad for p in net.model.parameters())


def test_feature_network_of_a_peft_policy_is_the_base_with_the_adapter_off():
    from peft import LoraConfig, get_peft_model

    base = _tiny_llama()
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    idx = [1, 3]
    with torch.no_grad():
        plain = core.layer_features(base(ids, output_hidden_states=True).hidden_states, idx)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    policy = get_peft_model(base, lora).train()
    net = core.FeatureNetwork(policy)
    assert net.kind == "adapter"
    torch.testing.assert_close(net.features(ids, idx), plain)
    assert policy.training  # mode restored
    with torch.no_grad():
        on = core.layer_features(policy.eval()(ids, output_hidden_states=True).hidden_states, idx)
    assert not torch.allclose(on, plain)  # the adapter does change the policy
