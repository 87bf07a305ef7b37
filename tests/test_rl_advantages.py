"""Hand-derived checks for rlhfkit.rl.advantages.compute_gae."""

from __future__ import annotations

import torch

from conftest import float32_tolerance
from rlhfkit.rl import compute_gae

F64 = torch.float64
REWARDS = torch.tensor([[1.0, 0.0, 2.0]], dtype=F64)
VALUES = torch.tensor([[0.5, 1.0, 1.5]], dtype=F64)
FULL = torch.ones(1, 3, dtype=torch.bool)


def test_gae_gamma1_lam1_is_monte_carlo():
    # V after the last token is 0 (episode ends).
    # delta2 = 2 + 0 - 1.5 = 0.5; delta1 = 0 + 1.5 - 1.0 = 0.5; delta0 = 1 + 1.0 - 0.5 = 1.5
    # A2 = 0.5; A1 = 0.5 + 0.5 = 1.0; A0 = 1.5 + 1.0 = 2.5   (= reward-to-go [3, 2, 2] - V)
    # returns = A + V = [3, 2, 2]
    adv, ret = compute_gae(REWARDS, VALUES, FULL, gamma=1.0, lam=1.0)
    torch.testing.assert_close(adv, torch.tensor([[2.5, 1.0, 0.5]], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[3.0, 2.0, 2.0]], dtype=F64), atol=1e-12, rtol=0)


def test_gae_gamma09_lam05():
    # gamma*lam = 0.45
    # delta2 = 2 + 0.9*0 - 1.5 = 0.5; delta1 = 0 + 0.9*1.5 - 1.0 = 0.35; delta0 = 1 + 0.9*1.0 - 0.5 = 1.4
    # A2 = 0.5; A1 = 0.35 + 0.45*0.5 = 0.575; A0 = 1.4 + 0.45*0.575 = 1.65875
    # returns = A + V = [2.15875, 1.575, 2.0]
    adv, ret = compute_gae(REWARDS, VALUES, FULL, gamma=0.9, lam=0.5)
    torch.testing.assert_close(adv, torch.tensor([[1.65875, 0.575, 0.5]], dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, torch.tensor([[2.15875, 1.575, 2.0]], dtype=F64), atol=1e-12, rtol=0)


def test_gae_ignores_padding_and_batches_rows():
    # Row 1 has 2 of 3 tokens; its padding holds garbage (r=99, V=7) that must be ignored.
    # gamma 0.9, lam 0.5: V after token 1 is 0.
    # delta1 = 2 + 0 - 1.0 = 1.0; delta0 = 1 + 0.9*1.0 - 0.5 = 1.4
    # A1 = 1.0; A0 = 1.4 + 0.45*1.0 = 1.85; A2 = 0 (padding); returns = [2.35, 2.0, 0]
    rewards = torch.tensor([[1.0, 0.0, 2.0], [1.0, 2.0, 99.0]], dtype=F64)
    values = torch.tensor([[0.5, 1.0, 1.5], [0.5, 1.0, 7.0]], dtype=F64)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
    adv, ret = compute_gae(rewards, values, mask, gamma=0.9, lam=0.5)
    expected_adv = torch.tensor([[1.65875, 0.575, 0.5], [1.85, 1.0, 0.0]], dtype=F64)
    expected_ret = torch.tensor([[2.15875, 1.575, 2.0], [2.35, 2.0, 0.0]], dtype=F64)
    torch.testing.assert_close(adv, expected_adv, atol=1e-12, rtol=0)
    torch.testing.assert_close(ret, expected_ret, atol=1e-12, rtol=0)


def test_gae_float32_tolerance():
    adv, _ = compute_gae(REWARDS.float(), VALUES.float(), FULL, gamma=0.9, lam=0.5)
    assert adv.dtype == torch.float32
    expected = torch.tensor([[1.65875, 0.575, 0.5]], dtype=F64)
    # float32 rounding of a recursion over 3 steps, relative to the advantages' size
    torch.testing.assert_close(adv.double(), expected, atol=float32_tolerance(expected, 3), rtol=0)
