"""Hand-derived checks for rlhfkit.rl.estimators and rlhfkit.rl.policy_losses.

Everything exact is float64 with tolerances of 1e-12 (a few roundings of O(1) numbers);
expected values come from the equations in the comments, never from the code under test.
"""

from __future__ import annotations

import math

import pytest
import torch

from rlhfkit.rl import (
    ADVANTAGE_ESTIMATORS,
    GROUP_ADVANTAGE_ESTIMATORS,
    KL_LOSS_ESTIMATORS,
    LOSS_AGGREGATIONS,
    PPOLoss,
    aggregate_loss,
    check_group_layout,
    clipped_policy_loss,
    discounted_returns,
    dr_grpo_advantages,
    grpo_advantages,
    kl_loss,
    masked_mean,
    masked_var,
    reinforce_plus_plus_advantages,
    reinforce_plus_plus_baseline_advantages,
    rloo_advantages,
)

F64 = torch.float64
EXACT = dict(atol=1e-12, rtol=0)


def lengths_mask(lengths: list[int], width: int) -> torch.Tensor:
    """``(n, width)`` bool mask with the first ``lengths[i]`` positions of row i kept."""
    return torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]


def broadcast_rows(values: list[float], lengths: list[int], width: int) -> torch.Tensor:
    """Expected ``(n, width)`` tensor: ``values[i]`` on row i's first ``lengths[i]`` tokens, 0 after."""
    return torch.tensor(
        [[v if j < length else 0.0 for j in range(width)] for v, length in zip(values, lengths)], dtype=F64
    )


# Two prompts, G = 3. Group 0: [1, 2, 6] -> mean 3, deviations [-2, -1, 3],
#   unbiased var (4 + 1 + 9) / 2 = 7, std sqrt(7).
# Group 1: [4, 4, 4] -> deviations 0, std 0.
SCORES = torch.tensor([1.0, 2.0, 6.0, 4.0, 4.0, 4.0], dtype=F64)
LENGTHS = [3, 1, 2, 2, 3, 1]
MASK = lengths_mask(LENGTHS, 3)


# ---------------------------------------------------------------- GRPO / Dr. GRPO


def test_grpo_group_scale_several_groups_ragged():
    adv = grpo_advantages(SCORES, MASK, group_size=3, scale="group", eps=1e-4)
    s = math.sqrt(7.0) + 1e-4
    expected = broadcast_rows([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0], LENGTHS, 3)
    torch.testing.assert_close(adv, expected, **EXACT)
    assert adv.dtype == F64 and adv.shape == (6, 3)


def test_grpo_group_of_two_uses_unbiased_std():
    # [3, 1]: deviations [1, -1]; unbiased std = |3 - 1| / sqrt(2) = sqrt(2) (the biased one would be 1)
    mask = lengths_mask([2, 1], 2)
    adv = grpo_advantages(torch.tensor([3.0, 1.0], dtype=F64), mask, group_size=2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([[1 / math.sqrt(2), 1 / math.sqrt(2)], [-1 / math.sqrt(2), 0.0]],
                                                 dtype=F64), **EXACT)


def test_grpo_batch_scale():
    # Mean still per group: centred [-2, -1, 3, 0, 0, 0].
    # Batch std over all 6 scores: mean 21/6 = 3.5, deviations [-2.5, -1.5, 2.5, .5, .5, .5],
    #   sum of squares 6.25 + 2.25 + 6.25 + 3 * 0.25 = 15.5, unbiased var 15.5 / 5 = 3.1.
    adv = grpo_advantages(SCORES, MASK, group_size=3, scale="batch", eps=1e-4)
    s = math.sqrt(3.1) + 1e-4
    expected = broadcast_rows([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0], LENGTHS, 3)
    torch.testing.assert_close(adv, expected, **EXACT)


def test_grpo_none_scale_is_dr_grpo():
    expected = broadcast_rows([-2.0, -1.0, 3.0, 0.0, 0.0, 0.0], LENGTHS, 3)
    torch.testing.assert_close(grpo_advantages(SCORES, MASK, 3, scale="none"), expected, **EXACT)
    torch.testing.assert_close(dr_grpo_advantages(SCORES, MASK, 3), expected, **EXACT)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_equal_group_gives_exact_zero_without_nan(scale):
    # 0.1 is not representable: a plain mean of [.1, .1, .1] is 0.10000000000000002, not 0.1.
    scores = torch.tensor([0.1, 0.1, 0.1, 0.1, 0.1, 0.1], dtype=F64)
    mask = torch.ones(6, 2, dtype=torch.bool)
    for estimator in (
        lambda: grpo_advantages(scores, mask, 3, scale=scale, eps=0.0),
        lambda: grpo_advantages(scores, mask, 3, scale=scale),
        lambda: rloo_advantages(scores, mask, 3),
    ):
        adv = estimator()
        assert torch.isfinite(adv).all()
        assert (adv == 0).all()


def test_float32_scores_keep_dtype():
    adv = grpo_advantages(SCORES.float(), MASK, 3)
    assert adv.dtype == torch.float32
    s = math.sqrt(7.0) + 1e-4
    expected = broadcast_rows([-2 / s, -1 / s, 3 / s, 0.0, 0.0, 0.0], LENGTHS, 3).float()
    torch.testing.assert_close(adv, expected, atol=1e-6, rtol=0)  # O(1) values, a handful of float32 roundings


def test_non_contiguous_scores():
    strided = torch.stack([SCORES, -SCORES], dim=1)[:, 0]  # same values, stride 2
    assert not strided.is_contiguous()
    torch.testing.assert_close(grpo_advantages(strided, MASK, 3), grpo_advantages(SCORES, MASK, 3), **EXACT)
    torch.testing.assert_close(rloo_advantages(strided, MASK, 3), rloo_advantages(SCORES, MASK, 3), **EXACT)


# ---------------------------------------------------------------- RLOO


def test_rloo_several_groups_ragged():
    # Group 0: a_0 = 1 - (2 + 6)/2 = -3; a_1 = 2 - (1 + 6)/2 = -1.5; a_2 = 6 - (1 + 2)/2 = 4.5
    #   (= G/(G-1) * deviation = 1.5 * [-2, -1, 3]). Group 1: all 4 -> 0.
    adv = rloo_advantages(SCORES, MASK, group_size=3)
    torch.testing.assert_close(adv, broadcast_rows([-3.0, -1.5, 4.5, 0.0, 0.0, 0.0], LENGTHS, 3), **EXACT)


def test_rloo_group_of_two_is_the_difference():
    # a_1 = r_1 - r_2 = 3 - 1.5 = 1.5, a_2 = -1.5; second group: 0 - 2 = -2, 2
    scores = torch.tensor([3.0, 1.5, 0.0, 2.0], dtype=F64)
    lengths = [1, 2, 2, 0]  # the last response is empty: all padding
    adv = rloo_advantages(scores, lengths_mask(lengths, 2), group_size=2)
    torch.testing.assert_close(adv, broadcast_rows([1.5, -1.5, -2.0, 2.0], lengths, 2), **EXACT)


# ---------------------------------------------------------------- validation and registry


@pytest.mark.parametrize(
    "fn", [grpo_advantages, dr_grpo_advantages, rloo_advantages, reinforce_plus_plus_baseline_advantages]
)
def test_group_estimators_validate_layout(fn):
    with pytest.raises(ValueError, match=r"5 rows .*group_size=2.*multiple of 2"):
        fn(torch.zeros(5), torch.ones(5, 2), 2)
    with pytest.raises(ValueError, match=r"integer >= 2.*got 1"):
        fn(torch.zeros(4), torch.ones(4, 2), 1)
    with pytest.raises(ValueError, match=r"response_mask must be \(n, t\) with n = len\(scores\) = 4"):
        fn(torch.zeros(4), torch.ones(6, 2), 2)
    with pytest.raises(ValueError, match="1-D"):
        fn(torch.zeros(4, 1), torch.ones(4, 2), 2)


def test_grpo_validates_scale_and_eps():
    with pytest.raises(ValueError, match="group, batch, none"):
        grpo_advantages(SCORES, MASK, 3, scale="std")
    with pytest.raises(ValueError, match="eps"):
        grpo_advantages(SCORES, MASK, 3, eps=-1.0)


def test_registry():
    assert ADVANTAGE_ESTIMATORS == (
        "gae", "grpo", "dr_grpo", "rloo", "reinforce_plus_plus", "reinforce_plus_plus_baseline"
    )
    assert set(GROUP_ADVANTAGE_ESTIMATORS) == {"grpo", "dr_grpo", "rloo", "reinforce_plus_plus_baseline"}
    assert set(GROUP_ADVANTAGE_ESTIMATORS) < set(ADVANTAGE_ESTIMATORS)
    check_group_layout(8, 4)  # no error


# ---------------------------------------------------------------- REINFORCE++

# Row 0 (3 tokens): rewards [0, 0, 4];  gamma 0.5 -> G2 = 4, G1 = 0 + 2 = 2, G0 = 0 + 1 = 1
# Row 1 (2 tokens): rewards [-1.5, 3, pad 99] -> G1 = 3, G0 = -1.5 + 1.5 = 0; padding ignored
TOKEN_REWARDS = torch.tensor([[0.0, 0.0, 4.0], [-1.5, 3.0, 99.0]], dtype=F64)
RPP_MASK = lengths_mask([3, 2], 3)


def test_discounted_returns():
    torch.testing.assert_close(
        discounted_returns(TOKEN_REWARDS, RPP_MASK, gamma=0.5),
        torch.tensor([[1.0, 2.0, 4.0], [0.0, 3.0, 0.0]], dtype=F64), **EXACT,
    )
    # gamma 1: reward-to-go [4, 4, 4] and [1.5, 3]
    torch.testing.assert_close(
        discounted_returns(TOKEN_REWARDS, RPP_MASK, gamma=1.0),
        torch.tensor([[4.0, 4.0, 4.0], [1.5, 3.0, 0.0]], dtype=F64), **EXACT,
    )


def test_reinforce_plus_plus_hand_numbers():
    # Token returns {1, 2, 4, 0, 3}: mean 2, deviations [-1, 0, 2, -2, 1], sum of squares 10,
    # unbiased var 10 / 4 = 2.5 -> A = deviation / sqrt(2.5 + 1e-8)
    adv = reinforce_plus_plus_advantages(TOKEN_REWARDS, RPP_MASK, gamma=0.5)
    d = math.sqrt(2.5 + 1e-8)
    expected = torch.tensor([[-1 / d, 0.0, 2 / d], [-2 / d, 1 / d, 0.0]], dtype=F64)
    torch.testing.assert_close(adv, expected, **EXACT)


def test_reinforce_plus_plus_baseline_without_kl():
    # G = 2: scores [1, 3 | 2, 2] -> centred [-1, 1 | 0, 0], each on all tokens of its row (gamma 1).
    # Lengths [3, 3, 1, 2]: 9 tokens, three -1, three +1, three 0 -> mean 0, sum of squares 6,
    # unbiased var 6 / 8 = 0.75 -> A = centred / sqrt(0.75 + 1e-8)
    lengths = [3, 3, 1, 2]
    adv = reinforce_plus_plus_baseline_advantages(
        torch.tensor([1.0, 3.0, 2.0, 2.0], dtype=F64), lengths_mask(lengths, 3), group_size=2
    )
    d = math.sqrt(0.75 + 1e-8)
    torch.testing.assert_close(adv, broadcast_rows([-1 / d, 1 / d, 0.0, 0.0], lengths, 3), **EXACT)


def test_reinforce_plus_plus_baseline_with_kl_penalty():
    # scores [0, 4] -> centred [-2, 2]. kl_token_penalty (beta * KL, subtracted):
    #   row 0 [-1, 0]: rewards [1, 0 - 2] = [1, -2] -> returns (gamma 1) [-1, -2]
    #   row 1 [ 1, 0]: rewards [-1, 0 + 2] = [-1, 2] -> returns [1, 2]
    # tokens {-1, -2, 1, 2}: mean 0, sum of squares 10, unbiased var 10 / 3
    penalty = torch.tensor([[-1.0, 0.0], [1.0, 0.0]], dtype=F64)
    adv = reinforce_plus_plus_baseline_advantages(
        torch.tensor([0.0, 4.0], dtype=F64), torch.ones(2, 2, dtype=torch.bool), 2, kl_token_penalty=penalty
    )
    d = math.sqrt(10 / 3 + 1e-8)
    torch.testing.assert_close(adv, torch.tensor([[-1 / d, -2 / d], [1 / d, 2 / d]], dtype=F64), **EXACT)
    with pytest.raises(ValueError, match="kl_token_penalty"):
        reinforce_plus_plus_baseline_advantages(torch.zeros(2), torch.ones(2, 2), 2, kl_token_penalty=torch.zeros(2, 3))


def test_reinforce_plus_plus_estimators_are_whitened():
    gen = torch.Generator().manual_seed(0)
    n, t = 12, 7
    mask = lengths_mask(torch.randint(1, t + 1, (n,), generator=gen).tolist(), t)
    scores = torch.randn(n, generator=gen, dtype=F64)
    penalty = 0.1 * torch.rand(n, t, generator=gen, dtype=F64)
    token_rewards = torch.randn(n, t, generator=gen, dtype=F64)
    for adv in (
        reinforce_plus_plus_advantages(token_rewards, mask, gamma=0.9),
        reinforce_plus_plus_baseline_advantages(scores, mask, 4, kl_token_penalty=penalty),
    ):
        assert masked_mean(adv, mask).abs() < 1e-12
        # var / (var + 1e-8) with var = O(1): within 1e-7 of 1
        assert masked_var(adv, mask).item() == pytest.approx(1.0, abs=1e-7)
        assert (adv[~mask] == 0).all()


# ---------------------------------------------------------------- aggregate_loss

# Row 0: 3 tokens [1, 2, 3]; row 1: 1 token [4] (padding holds 99); row 2: no token.
PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0], [4.0, 99.0, 99.0], [99.0, 99.0, 99.0]], dtype=F64)
AGG_MASK = lengths_mask([3, 1, 0], 3)


def test_aggregate_loss_hand_numbers():
    # token_mean: (1 + 2 + 3 + 4) / 4 = 2.5; with normaliser 8: 10 / 8 = 1.25
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "token_mean").item() == pytest.approx(2.5, abs=1e-12)
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "token_mean", normaliser=8).item() == pytest.approx(1.25, abs=1e-12)
    # seq_mean_token_mean: row means [2, 4, 0 (empty)] over N = 3 -> 2
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "seq_mean_token_mean").item() == pytest.approx(2.0, abs=1e-12)
    # seq_mean_token_sum: row sums [6, 4, 0] / 3 = 10 / 3
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "seq_mean_token_sum").item() == pytest.approx(10 / 3, abs=1e-12)
    # seq_mean_token_sum_norm: 10 / (3 rows * t=3) = 10 / 9; with max_length 5: 10 / 15; with normaliser 4: 10 / 20
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "seq_mean_token_sum_norm").item() == pytest.approx(10 / 9, abs=1e-12)
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "seq_mean_token_sum_norm", max_length=5).item() == pytest.approx(
        10 / 15, abs=1e-12)
    assert aggregate_loss(PER_TOKEN, AGG_MASK, "seq_mean_token_sum_norm", normaliser=4, max_length=5).item() == (
        pytest.approx(0.5, abs=1e-12))


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_loss_empty_mask_is_zero(mode):
    out = aggregate_loss(PER_TOKEN, torch.zeros(3, 3, dtype=torch.bool), mode)
    assert out.item() == 0.0


def test_aggregate_loss_validation():
    with pytest.raises(ValueError, match="token_mean, seq_mean_token_mean"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "mean")
    with pytest.raises(ValueError, match="normaliser must be > 0"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "token_mean", normaliser=0)
    with pytest.raises(ValueError, match="only used by seq_mean_token_sum_norm"):
        aggregate_loss(PER_TOKEN, AGG_MASK, "token_mean", max_length=8)


@pytest.mark.parametrize("mode", LOSS_AGGREGATIONS)
def test_aggregate_loss_micro_batches_add_up_exactly(mode):
    gen = torch.Generator().manual_seed(1)
    n, t = 5, 6
    mask = lengths_mask([6, 2, 5, 1, 3], t)  # micro-batches of rows [0, 1] and [2, 3, 4]: 8 and 9 tokens
    data = torch.randn(n, t, generator=gen, dtype=F64)
    kwargs = {"max_length": 10} if mode == "seq_mean_token_sum_norm" else {}

    full_leaf = data.clone().requires_grad_(True)
    full = aggregate_loss(full_leaf, mask, mode, **kwargs)
    full.backward()

    normaliser = float(mask.sum()) if mode == "token_mean" else float(n)
    acc_leaf = data.clone().requires_grad_(True)
    total = 0.0
    for rows in (slice(0, 2), slice(2, 5)):
        micro = aggregate_loss(acc_leaf[rows], mask[rows], mode, normaliser=normaliser, **kwargs)
        micro.backward()
        total += micro.item()
    assert total == pytest.approx(full.item(), abs=1e-12)
    torch.testing.assert_close(acc_leaf.grad, full_leaf.grad, **EXACT)
    assert (full_leaf.grad[~mask] == 0).all()


# ---------------------------------------------------------------- kl_loss

# d = ref - logp = [-1, 1, 0] on the 3 real tokens; the 4th is padding with values that would overflow exp().
KL_LOGPROBS = [-1.0, -2.0, -0.5, 5.0]
KL_REF = torch.tensor([[-2.0, -1.0, -0.5, -1000.0]], dtype=F64)
KL_MASK = torch.tensor([[True, True, True, False]])


@pytest.mark.parametrize(
    "estimator, value, grad",
    [
        # k1 = -d = [1, -1, 0]; d(k1)/d(logp) = 1 on every real token
        ("k1", [1.0, -1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.0]),
        # k2 = d^2 / 2 = [.5, .5, 0]; gradient -d = logp - ref = [1, -1, 0]
        ("k2", [0.5, 0.5, 0.0, 0.0], [1.0, -1.0, 0.0, 0.0]),
        # k3 = e^d - d - 1 = [e^-1, e - 2, 0]; gradient 1 - e^d = [1 - e^-1, 1 - e, 0]
        ("k3", [math.exp(-1), math.e - 2, 0.0, 0.0], [1 - math.exp(-1), 1 - math.e, 0.0, 0.0]),
    ],
)
def test_kl_loss_values_and_gradients(estimator, value, grad):
    logprobs = torch.tensor([KL_LOGPROBS], dtype=F64, requires_grad=True)
    per_token = kl_loss(logprobs, KL_REF, KL_MASK, estimator)
    torch.testing.assert_close(per_token, torch.tensor([value], dtype=F64), **EXACT)
    per_token.sum().backward()
    torch.testing.assert_close(logprobs.grad, torch.tensor([grad], dtype=F64), **EXACT)


def test_kl_loss_unknown_estimator():
    assert KL_LOSS_ESTIMATORS == ("k1", "k2", "k3")
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "k4")


# ---------------------------------------------------------------- clipped_policy_loss


def _policy_batch():
    """ratios [1.1, 1.5, 0.5, 1.5, 1.25, pad 50], A [1, 2, -1, -1, 1, pad 100]."""
    ratios = [1.1, 1.5, 0.5, 1.5, 1.25, 50.0]
    logprobs = torch.tensor([[math.log(r) for r in ratios]], dtype=F64, requires_grad=True)
    old_logprobs = torch.zeros(1, 6, dtype=F64)
    advantages = torch.tensor([[1.0, 2.0, -1.0, -1.0, 1.0, 100.0]], dtype=F64)
    mask = torch.tensor([[True] * 5 + [False]])
    return logprobs, old_logprobs, advantages, mask


def test_clip_higher_hand_numbers():
    # low 0.2, high 0.28: clip range [0.8, 1.28]
    # token | r    | A  | -A*r  | -A*clip(r) | max   | clipped?
    #   0   | 1.1  | 1  | -1.1  | -1.1       | -1.1  | no
    #   1   | 1.5  | 2  | -3.0  | -2.56      | -2.56 | yes
    #   2   | 0.5  | -1 |  0.5  |  0.8       |  0.8  | yes
    #   3   | 1.5  | -1 |  1.5  |  1.28      |  1.5  | no
    #   4   | 1.25 | 1  | -1.25 | -1.25      | -1.25 | no  (inside 1.28; symmetric 0.2 would clip it)
    lp, old_lp, adv, mask = _policy_batch()
    per_token, clipfrac = clipped_policy_loss(lp, old_lp, adv, mask, cliprange_low=0.2, cliprange_high=0.28)
    torch.testing.assert_close(
        per_token, torch.tensor([[-1.1, -2.56, 0.8, 1.5, -1.25, 0.0]], dtype=F64), **EXACT
    )
    assert clipfrac.item() == pytest.approx(2 / 5, abs=1e-12) and not clipfrac.requires_grad
    # d(-A*r)/d(logp) = -A*r on unclipped tokens, 0 on clipped ones and padding
    per_token.sum().backward()
    torch.testing.assert_close(lp.grad, torch.tensor([[-1.1, 0.0, 0.0, 1.5, -1.25, 0.0]], dtype=F64), **EXACT)


def test_symmetric_clip_hand_numbers():
    # cliprange 0.2: token 1 -> -2 * 1.2 = -2.4 (clipped), token 4 -> -1.2 (clipped now)
    lp, old_lp, adv, mask = _policy_batch()
    per_token, clipfrac = clipped_policy_loss(lp, old_lp, adv, mask, cliprange_low=0.2)
    torch.testing.assert_close(per_token, torch.tensor([[-1.1, -2.4, 0.8, 1.5, -1.2, 0.0]], dtype=F64), **EXACT)
    assert clipfrac.item() == pytest.approx(3 / 5, abs=1e-12)


def test_equal_ranges_reproduce_ppo_loss_policy_term():
    gen = torch.Generator().manual_seed(0)
    n, t = 4, 5
    mask = lengths_mask([5, 2, 4, 1], t)
    old_lp = -torch.rand(n, t, generator=gen, dtype=F64) * 3
    lp_data = old_lp + 0.4 * torch.randn(n, t, generator=gen, dtype=F64)  # some ratios get clipped
    adv = torch.randn(n, t, generator=gen, dtype=F64)
    zeros = torch.zeros(n, t, dtype=F64)

    lp_ppo = lp_data.clone().requires_grad_(True)
    ppo_loss, stats = PPOLoss(cliprange=0.2, vf_coef=0.0)(lp_ppo, old_lp, adv, zeros, zeros, zeros, mask)
    ppo_loss.backward()

    lp_new = lp_data.clone().requires_grad_(True)
    per_token, clipfrac = clipped_policy_loss(lp_new, old_lp, adv, mask, cliprange_low=0.2, cliprange_high=0.2)
    new_loss = aggregate_loss(per_token, mask, "token_mean")
    new_loss.backward()

    assert 0 < clipfrac < 1  # both branches exercised
    assert new_loss.item() == pytest.approx(ppo_loss.item(), abs=1e-12)
    assert clipfrac.item() == pytest.approx(stats["policy_clipfrac"].item(), abs=1e-12)
    torch.testing.assert_close(lp_new.grad, lp_ppo.grad, **EXACT)


def test_clipped_policy_loss_validation():
    lp, old_lp, adv, mask = _policy_batch()
    with pytest.raises(ValueError, match="cliprange_low"):
        clipped_policy_loss(lp, old_lp, adv, mask, cliprange_low=1.0)
