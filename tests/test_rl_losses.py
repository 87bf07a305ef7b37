"""Hand-derived checks for rlhfkit.rl.losses.PPOLoss."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import float64_tolerance
from rlhfkit.rl import PPOLoss

F64 = torch.float64


def _hand_batch():
    """One row, 4 real tokens + 1 padded token (garbage values) with cliprange 0.2.

    token | ratio | A  | -A*r  | -A*clip(r) | max   | clipped?
      0   | 1.1   | 1  | -1.1  | -1.1       | -1.1  | no  (inside range)
      1   | 1.5   | 2  | -3.0  | -2.4       | -2.4  | yes (above, A > 0)
      2   | 0.5   | -1 |  0.5  |  0.8       |  0.8  | yes (below, A < 0)
      3   | 1.5   | -1 |  1.5  |  1.2       |  1.5  | no  (above but A < 0)
    policy_loss = (-1.1 - 2.4 + 0.8 + 1.5) / 4 = -1.2 / 4 = -0.3; clipfrac = 2/4

    token | V   | V_old | R   | V_clip | (V-R)^2 | (Vc-R)^2 | 0.5*max | clipped?
      0   | 1.0 | 1.0   | 2.0 | 1.0    | 1.0     | 1.0      | 0.5     | no (equal)
      1   | 1.5 | 1.0   | 2.0 | 1.2    | 0.25    | 0.64     | 0.32    | yes
      2   | 1.5 | 1.0   | 1.0 | 1.2    | 0.25    | 0.04     | 0.125   | no
      3   | 0.5 | 1.0   | 0.0 | 0.8    | 0.25    | 0.64     | 0.32    | yes
    value_loss = (0.5 + 0.32 + 0.125 + 0.32) / 4 = 1.265 / 4 = 0.31625; clipfrac = 2/4
    """
    ratios = [1.1, 1.5, 0.5, 1.5, 50.0]
    logprobs = torch.tensor([[math.log(r) for r in ratios]], dtype=F64, requires_grad=True)
    old_logprobs = torch.zeros(1, 5, dtype=F64)
    advantages = torch.tensor([[1.0, 2.0, -1.0, -1.0, 100.0]], dtype=F64)
    values = torch.tensor([[1.0, 1.5, 1.5, 0.5, 9.0]], dtype=F64, requires_grad=True)
    old_values = torch.tensor([[1.0, 1.0, 1.0, 1.0, -9.0]], dtype=F64)
    returns = torch.tensor([[2.0, 2.0, 1.0, 0.0, 30.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, True, False]])
    entropy = torch.tensor([[1.0, 2.0, 3.0, 2.0, 40.0]], dtype=F64)
    return logprobs, old_logprobs, advantages, values, old_values, returns, mask, entropy


def test_ppo_loss_hand_numbers_and_stats():
    lp, old_lp, adv, v, old_v, ret, mask, ent = _hand_batch()
    loss_fn = PPOLoss(cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, entropy_coef=0.01)
    loss, stats = loss_fn(lp, old_lp, adv, v, old_v, ret, mask, entropy=ent)
    # entropy mean = (1 + 2 + 3 + 2) / 4 = 2
    # loss = -0.3 + 0.1 * 0.31625 - 0.01 * 2 = -0.3 + 0.031625 - 0.02 = -0.288375
    assert loss.item() == pytest.approx(-0.288375, abs=1e-12)
    assert stats["policy_loss"].item() == pytest.approx(-0.3, abs=1e-12)
    assert stats["value_loss"].item() == pytest.approx(0.31625, abs=1e-12)
    assert stats["entropy"].item() == pytest.approx(2.0, abs=1e-12)
    assert stats["policy_clipfrac"].item() == pytest.approx(0.5, abs=1e-12)
    assert stats["value_clipfrac"].item() == pytest.approx(0.5, abs=1e-12)
    # ratio_mean = (1.1 + 1.5 + 0.5 + 1.5) / 4 = 1.15
    assert stats["ratio_mean"].item() == pytest.approx(1.15, abs=1e-12)
    # approx_kl = 0.5 * mean(log r^2) = 0.5 * (ln1.1^2 + 2 ln1.5^2 + ln0.5^2) / 4 ~= 0.1022926
    hand_kl = 0.5 * (math.log(1.1) ** 2 + 2 * math.log(1.5) ** 2 + math.log(0.5) ** 2) / 4
    assert stats["approx_kl"].item() == pytest.approx(hand_kl, abs=1e-12)
    assert all(not s.requires_grad and s.dim() == 0 for s in stats.values())

    # Gradients: d/dlogp of -A*r/4 is -A*r/4 on unclipped tokens, 0 on clipped ones and padding.
    #   token0: -1*1.1/4 = -0.275; token3: 1*1.5/4 = 0.375
    # d/dV of 0.1 * 0.5*(V-R)^2 / 4 = 0.025*(V-R) on tokens whose unclipped term is active:
    #   token0 (tie; V = V_old is inside the clip, so both branches have the same V-grad): 0.025*(1-2) = -0.025
    #   token2: 0.025*(1.5-1) = 0.0125; tokens 1, 3 clipped (V_clip is constant there) -> 0; padding 0.
    loss.backward()
    torch.testing.assert_close(
        lp.grad, torch.tensor([[-0.275, 0.0, 0.0, 0.375, 0.0]], dtype=F64), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(
        v.grad, torch.tensor([[-0.025, 0.0, 0.0125, 0.0, 0.0]], dtype=F64), atol=1e-12, rtol=0
    )


def test_ppo_loss_normaliser_and_no_entropy():
    lp, old_lp, adv, v, old_v, ret, mask, _ = _hand_batch()
    loss, stats = PPOLoss(vf_coef=0.1)(lp, old_lp, adv, v, old_v, ret, mask, normaliser=8.0)
    # masked sums: policy -1.2, value 1.265 -> -1.2/8 + 0.1 * 1.265/8 = -0.15 + 0.0158125 = -0.1341875
    assert loss.item() == pytest.approx(-0.1341875, abs=1e-12)
    assert "entropy" not in stats
    # stats stay micro-batch masked means regardless of the normaliser
    assert stats["policy_loss"].item() == pytest.approx(-0.3, abs=1e-12)


def test_grad_accumulation_with_normaliser_matches_full_batch():
    gen = torch.Generator().manual_seed(0)
    b, t = 4, 5
    lengths = torch.tensor([5, 2, 4, 1])
    mask = torch.arange(t)[None, :] < lengths[:, None]  # 12 response tokens
    old_lp = -torch.rand(b, t, generator=gen, dtype=F64) * 3
    lp_data = old_lp + 0.4 * torch.randn(b, t, generator=gen, dtype=F64)  # some ratios get clipped
    adv = torch.randn(b, t, generator=gen, dtype=F64)
    old_v = torch.randn(b, t, generator=gen, dtype=F64)
    v_data = old_v + 0.3 * torch.randn(b, t, generator=gen, dtype=F64)
    ret = torch.randn(b, t, generator=gen, dtype=F64)
    ent_data = torch.rand(b, t, generator=gen, dtype=F64) * 2
    loss_fn = PPOLoss(cliprange=0.2, cliprange_value=0.2, vf_coef=0.5, entropy_coef=0.01)

    def leaves():
        return [x.clone().requires_grad_(True) for x in (lp_data, v_data, ent_data)]

    lp, v, ent = leaves()
    full_loss, full_stats = loss_fn(lp, old_lp, adv, v, old_v, ret, mask, entropy=ent)
    full_loss.backward()
    # both branches of each max() are exercised
    assert 0 < full_stats["policy_clipfrac"] < 1 and 0 < full_stats["value_clipfrac"] < 1

    lp_acc, v_acc, ent_acc = leaves()
    total_tokens = float(mask.sum())  # 12
    accumulated = 0.0
    for rows in (slice(0, 2), slice(2, 4)):  # micro-batches with 7 and 5 tokens
        micro_loss, _ = loss_fn(
            lp_acc[rows], old_lp[rows], adv[rows], v_acc[rows], old_v[rows], ret[rows], mask[rows],
            entropy=ent_acc[rows], normaliser=total_tokens,
        )
        micro_loss.backward()
        accumulated += micro_loss.item()

    # float64 sums over the 12 tokens in another grouping, relative to the per-token terms' size
    scale = max(float(x.abs().max()) for x in (lp_data, old_lp, adv, v_data, old_v, ret, ent_data))
    atol = float64_tolerance(scale, int(total_tokens))
    assert accumulated == pytest.approx(full_loss.item(), abs=atol)
    for full, acc in ((lp, lp_acc), (v, v_acc), (ent, ent_acc)):
        torch.testing.assert_close(acc.grad, full.grad, atol=atol, rtol=0)
    assert lp.grad.abs().sum() > 0 and v.grad.abs().sum() > 0
