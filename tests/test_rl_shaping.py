"""Hand-derived checks for rlhfkit.rl.shaping."""

from __future__ import annotations

import torch

from rlhfkit.rl import apply_missing_eos_penalty, last_token_index, shape_rewards, truncate_after_stop

EOS, EOT, PAD = 2, 3, 0


def test_truncate_after_stop():
    response_ids = torch.tensor(
        [
            [5, 7, EOS, 9, 0],  # EOS in the middle, junk after it
            [5, 6, 7, 8, 9],  # never stopped
            [EOT, 4, EOS, 4, 4],  # second stop id at position 0; only the first stop counts
            [6, PAD, 6, EOS, PAD],  # pad before EOS is kept as generated
        ]
    )
    ids, mask, ended = truncate_after_stop(response_ids, [EOS, EOT], PAD)
    expected_ids = torch.tensor(
        [[5, 7, EOS, PAD, PAD], [5, 6, 7, 8, 9], [EOT, PAD, PAD, PAD, PAD], [6, PAD, 6, EOS, PAD]]
    )
    expected_mask = torch.tensor(
        [
            [True, True, True, False, False],
            [True, True, True, True, True],
            [True, False, False, False, False],
            [True, True, True, True, False],
        ]
    )
    assert torch.equal(ids, expected_ids)
    assert mask.dtype == torch.bool and torch.equal(mask, expected_mask)
    assert torch.equal(ended, torch.tensor([True, False, True, True]))
    assert response_ids[0, 3] == 9  # input not modified in place


def test_last_token_index():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]])
    assert torch.equal(last_token_index(mask), torch.tensor([2, 4, 0, 0]))
    assert torch.equal(last_token_index(mask.bool()), torch.tensor([2, 4, 0, 0]))
    assert last_token_index(mask).dtype == torch.long


def test_missing_eos_penalty():
    scores = torch.tensor([1.0, 2.0, -1.0])
    ended = torch.tensor([True, False, False])
    # rows 1 and 2 did not stop: 2 - 0.5 = 1.5, -1 - 0.5 = -1.5 (halves: exact in float32)
    assert torch.equal(apply_missing_eos_penalty(scores, ended, 0.5), torch.tensor([1.0, 1.5, -1.5]))
    unchanged = apply_missing_eos_penalty(scores, ended, None)
    assert torch.equal(unchanged, scores)
    assert unchanged.data_ptr() != scores.data_ptr()


def test_score_placement_with_truncation_and_no_stop():
    response_ids = torch.tensor([[5, 7, EOS, 9, 9], [5, 6, 7, 8, 9]])
    _, mask, ended = truncate_after_stop(response_ids, [EOS], PAD)
    scores = apply_missing_eos_penalty(torch.tensor([1.0, 2.0], dtype=torch.float64), ended, 0.5)  # [1, 1.5]
    kl = torch.tensor([[0.1, 0.2, 0.3, 5.0, 5.0], [0.2, 0.0, -0.2, 0.4, 0.1]], dtype=torch.float64)
    rewards = shape_rewards(scores, kl, mask, kl_coef=0.5)
    # row 0: -0.5*kl on kept [0.1, 0.2, 0.3] = [-0.05, -0.1, -0.15]; score 1 at index 2 -> 0.85; rest 0
    # row 1: -0.5*kl = [-0.1, 0, 0.1, -0.2, -0.05]; score 2 - 0.5 = 1.5 at index 4 -> 1.45
    expected = torch.tensor(
        [[-0.05, -0.1, 0.85, 0.0, 0.0], [-0.1, 0.0, 0.1, -0.2, 1.45]], dtype=torch.float64
    )
    torch.testing.assert_close(rewards, expected, atol=1e-12, rtol=0)


def test_shape_rewards_empty_row_gets_nothing():
    rewards = shape_rewards(torch.tensor([3.0]), torch.ones(1, 3), torch.zeros(1, 3), kl_coef=0.1)
    assert torch.equal(rewards, torch.zeros(1, 3))
