"""Hand-derived checks for rlhfkit.rl.stats."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import float64_tolerance
from rlhfkit.rl import (
    RunningMoments,
    explained_variance,
    masked_mean,
    masked_sum,
    masked_var,
    masked_whiten,
)

F64 = torch.float64


def test_masked_sum_mean_with_dim_and_float_mask():
    values = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    # rows: 1+2 = 3 over 2 tokens; 4 over 1 token; all: 1+2+4 = 7 over 3.
    torch.testing.assert_close(masked_sum(values, mask, dim=1), torch.tensor([3.0, 4.0], dtype=F64))
    torch.testing.assert_close(masked_mean(values, mask, dim=1), torch.tensor([1.5, 4.0], dtype=F64))
    assert masked_mean(values, mask).item() == pytest.approx(7 / 3, abs=1e-12)
    assert masked_mean(values, mask.float()).item() == pytest.approx(7 / 3, abs=1e-12)
    assert masked_sum(values, mask).item() == pytest.approx(7.0, abs=1e-12)


def test_masked_var():
    values = torch.tensor([1.0, 2.0, 3.0, 100.0], dtype=F64)
    mask = torch.tensor([1, 1, 1, 0])
    # mean 2, squared deviations 1 + 0 + 1 = 2: biased 2/3, unbiased 2/2 = 1.
    assert masked_var(values, mask).item() == pytest.approx(1.0, abs=1e-12)
    assert masked_var(values, mask, unbiased=False).item() == pytest.approx(2 / 3, abs=1e-12)
    # a single element: no Bessel correction possible -> 0, not NaN.
    assert masked_var(values, torch.tensor([0, 1, 0, 0])).item() == 0.0


def test_whiten_hand_case_and_keep_mean():
    values = torch.tensor([[1.0, 2.0, 3.0, 100.0]], dtype=F64)
    mask = torch.tensor([[True, True, True, False]])
    # masked mean 2, unbiased var 1 -> (v - 2) / sqrt(1 + 1e-8), padding -> 0.
    scale = 1.0 / math.sqrt(1.0 + 1e-8)
    atol = float64_tolerance(3.0, 3)  # float64 sums of the 3 masked values (up to 3)
    torch.testing.assert_close(
        masked_whiten(values, mask), torch.tensor([[-scale, 0.0, scale, 0.0]], dtype=F64), atol=atol, rtol=0
    )
    # keep_mean adds the mean 2 back: [2 - s, 2, 2 + s], padding still 0.
    torch.testing.assert_close(
        masked_whiten(values, mask, keep_mean=True),
        torch.tensor([[2.0 - scale, 2.0, 2.0 + scale, 0.0]], dtype=F64),
        atol=atol,
        rtol=0,
    )
    # the padded value does not matter
    other = values.clone()
    other[0, 3] = -5.0
    torch.testing.assert_close(masked_whiten(other, mask), masked_whiten(values, mask))


def test_whiten_ragged_mask_moments():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(4, 6, generator=gen, dtype=F64) * 3 + 5
    lengths = torch.tensor([6, 2, 4, 1])
    mask = torch.arange(6)[None, :] < lengths[:, None]
    values[~mask] = 1e6  # garbage in padding must not leak in
    out = masked_whiten(values, mask)
    # By definition the whitened values have mean 0 and std sqrt(var / (var + 1e-8)), var the
    # unbiased variance of the 13 real values; float64 sums of 13 terms of their size.
    var = values[mask].var().item()
    atol = float64_tolerance(values[mask], 13)
    assert out[mask].mean().item() == pytest.approx(0.0, abs=atol)
    assert out[mask].std().item() == pytest.approx(math.sqrt(var / (var + 1e-8)), abs=atol)
    assert (out[~mask] == 0).all()
    kept = masked_whiten(values, mask, keep_mean=True)
    assert kept[mask].mean().item() == pytest.approx(values[mask].mean().item(), abs=atol)


def test_explained_variance_hand_case():
    returns = torch.tensor([[1.0, 2.0, 3.0, 4.0, 50.0]], dtype=F64)
    values = torch.tensor([[1.0, 2.0, 3.0, 5.0, -7.0]], dtype=F64)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # residual = returns - values = [0, 0, 0, -1]: mean -1/4, sum sq dev = 3/16 + 9/16 = 3/4 -> var 3/4 / 3 = 1/4
    # returns [1,2,3,4]: mean 2.5, sum sq dev = 2.25+0.25+0.25+2.25 = 5 -> var 5/3
    # ev = 1 - (1/4) / (5/3) = 1 - 3/20 = 0.85
    ev = explained_variance(values, returns, mask)
    assert ev.dim() == 0 and ev.is_floating_point()
    assert ev.item() == pytest.approx(0.85, abs=1e-12)
    # perfect predictions -> 1
    assert explained_variance(returns, returns, mask).item() == pytest.approx(1.0, abs=1e-12)


def test_running_moments_merges_two_batches():
    rm = RunningMoments()
    # batch a = [1, 2, 3, 4]: mean 2.5, population var (2.25+0.25+0.25+2.25)/4 = 1.25
    mean_a, std_a = rm.update(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert mean_a == pytest.approx(2.5, abs=1e-12) and std_a == pytest.approx(math.sqrt(1.25), abs=1e-12)
    # batch b = [10, 20]: mean 15, population var 25 -> std 5
    mean_b, std_b = rm.update(torch.tensor([10.0, 20.0]))
    assert mean_b == pytest.approx(15.0, abs=1e-12) and std_b == pytest.approx(5.0, abs=1e-12)
    # concatenation [1,2,3,4,10,20]: mean 40/6 = 20/3; E[x^2] = 530/6 = 265/3;
    # var = 265/3 - 400/9 = 395/9.
    # (Chan: delta 12.5, mean 2.5 + 12.5*2/6 = 20/3; M2 = 1.25*4 + 25*2 + 12.5^2*4*2/6 = 790/3; /6 = 395/9.)
    assert rm.count == 6
    assert rm.mean == pytest.approx(20 / 3, abs=1e-12)
    assert rm.std == pytest.approx(math.sqrt(395) / 3, abs=1e-12)


def test_running_moments_from_moments_and_state_dict():
    rm = RunningMoments()
    rm.update_from_moments(2.5, 1.25, 4)
    rm.update_from_moments(0.0, 0.0, 0)  # empty batch: no-op
    rm.update_from_moments(15.0, 25.0, 2)
    assert rm.mean == pytest.approx(20 / 3, abs=1e-12)
    assert rm.std == pytest.approx(math.sqrt(395) / 3, abs=1e-12)

    state = rm.state_dict()
    assert type(state["mean"]) is float and type(state["var"]) is float and type(state["count"]) is int
    restored = RunningMoments()
    restored.load_state_dict(state)
    assert (restored.mean, restored.std, restored.count) == (rm.mean, rm.std, rm.count)
    # continuing from the restored state gives the same result
    rm.update(torch.tensor([0.0]))
    restored.update(torch.tensor([0.0]))
    assert restored.state_dict() == rm.state_dict()
