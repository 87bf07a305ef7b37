"""Hand-derived checks for rlhfkit.rl.kl."""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rl import KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_penalty


def test_k1_and_k3_hand_numbers():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-2.0, -1.0, -0.5]], dtype=torch.float64)
    # k1 = logp - ref = [1, -1, 0]
    torch.testing.assert_close(
        kl_penalty(logprobs, ref_logprobs, "k1"), torch.tensor([[1.0, -1.0, 0.0]], dtype=torch.float64)
    )
    # k3 with d = ref - logp = [-1, 1, 0]: exp(d) - 1 - d
    #   d=-1: e^-1 - 1 + 1 = e^-1;  d=1: e - 1 - 1 = e - 2;  d=0: 1 - 1 - 0 = 0
    expected_k3 = torch.tensor([[math.exp(-1.0), math.e - 2.0, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k3"), expected_k3, atol=1e-12, rtol=0)
    # default estimator is k1: the same subtraction, so equal to the bit
    assert torch.equal(kl_penalty(logprobs, ref_logprobs), logprobs - ref_logprobs)


def test_k3_is_non_negative():
    gen = torch.Generator().manual_seed(0)
    logprobs = -torch.rand(64, 16, generator=gen) * 5
    ref_logprobs = -torch.rand(64, 16, generator=gen) * 5
    assert (kl_penalty(logprobs, ref_logprobs, "k3") >= 0).all()


def test_unknown_estimator_names_allowed_values():
    assert KL_ESTIMATORS == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(torch.zeros(1, 1), torch.zeros(1, 1), "k4")


def test_k2_is_half_the_squared_log_ratio():
    logprobs = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64)
    ref_logprobs = torch.tensor([[-2.0, -1.0, -0.5]], dtype=torch.float64)  # log ratio ref - lp = [-1, 1, 0]
    expected = torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64)
    torch.testing.assert_close(kl_penalty(logprobs, ref_logprobs, "k2"), expected, atol=0, rtol=0)


def test_adaptive_kl_two_steps():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # step 1: kl 9 -> 9/6 - 1 = 0.5 -> clipped to 0.2; value = 0.2 * (1 + 0.2*256/10000) = 0.2 * 1.00512 = 0.201024
    ctl.update(9.0, 256)
    assert ctl.value == pytest.approx(0.201024, abs=1e-12)
    # step 2: kl 5.4 -> 0.9 - 1 = -0.1 (inside clip); value = 0.201024 * (1 - 0.1*256/10000)
    #       = 0.201024 * 0.99744 = 0.201024 - 0.00051462144 = 0.20050937856
    ctl.update(5.4, 256)
    assert ctl.value == pytest.approx(0.20050937856, abs=1e-12)


def test_adaptive_kl_lower_clip_and_state_dict():
    ctl = AdaptiveKLController(init_kl_coef=0.2, target=6.0, horizon=10000)
    # kl 0 -> error -1 -> clipped to -0.2; value = 0.2 * (1 - 0.2 * 1000/10000) = 0.2 * 0.98 = 0.196
    ctl.update(0.0, 1000)
    assert ctl.value == pytest.approx(0.196, abs=1e-12)
    state = ctl.state_dict()
    assert all(isinstance(v, float) for v in state.values())
    other = AdaptiveKLController(init_kl_coef=1.0, target=6.0, horizon=10000)
    other.load_state_dict(state)
    assert other.value == ctl.value


def test_fixed_kl_controller():
    ctl = FixedKLController(0.05)
    ctl.update(100.0, 1000)
    assert ctl.value == 0.05
    other = FixedKLController(1.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05
