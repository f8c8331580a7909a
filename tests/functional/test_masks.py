"""Mask selection and exact enforcement against their definitions: the top-k selection equals a
stable sort with ties to the lower index, radix select on float bits, WAGLE's attribution, and
frozen entries set to +0.0 / put back bit-exactly whatever they hold."""

import pytest
import torch

from litplug.functional import (
    attribution_scores,
    enforce_masked_grads_,
    frozen_values,
    kth_largest_key,
    pack_mask,
    restore_frozen_,
    topk_masks,
)


def _reference_topk(scores, k):
    flat = torch.cat([s.flatten().float().abs().nan_to_num(nan=0.0) for s in scores])
    order = torch.argsort(flat, descending=True, stable=True)  # ties: lower index first
    chosen = torch.zeros_like(flat, dtype=torch.bool)
    chosen[order[:k]] = True
    return list(torch.split(chosen, [s.numel() for s in scores]))


@pytest.mark.parametrize("seed", range(4))
def test_topk_matches_stable_sort_with_ties(seed):
    gen = torch.Generator().manual_seed(seed)
    # few distinct values -> many ties at the threshold; plus tiny and huge magnitudes
    scores = [
        torch.randint(0, 5, (7, 3), generator=gen).float() * 1e-3,
        torch.randint(0, 5, (11,), generator=gen).float(),
    ]
    scores[0][0, 0] = float("inf")
    scores[1][2] = float("nan")
    n = sum(s.numel() for s in scores)
    for k in (0, 1, 5, n // 2, n - 1, n):
        masks = topk_masks(scores, k)
        assert sum(int(m.sum()) for m in masks) == k
        for m, ref in zip(masks, _reference_topk(scores, k)):
            assert torch.equal(m.flatten(), ref)


def test_topk_all_equal_takes_lowest_indices():
    masks = topk_masks([torch.ones(2, 2), torch.ones(3)], 5)
    assert [m.flatten().tolist() for m in masks] == [[True] * 4, [True, False, False]]


def test_kth_largest_key_on_float_bits():
    values = torch.tensor([0.5, 2.0, 2.0, 1e-30, 7.0])
    keys = values.view(torch.int32)
    t, need = kth_largest_key([keys], 3)
    assert t == int(torch.tensor(2.0).view(torch.int32)) and need == 2
    t, need = kth_largest_key([keys], 2)
    assert t == int(torch.tensor(2.0).view(torch.int32)) and need == 1


def test_attribution_closed_form():
    theta, gf, gr = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 1.0]), torch.tensor([0.1, -0.3])
    (score,) = attribution_scores([theta], [gf], [gr], mu=0.1)
    torch.testing.assert_close(score, torch.tensor([abs((1 - 1.0) * 0.5), abs((-2 + 3.0) * 1.0)]))


def test_enforce_and_restore_are_bit_exact():
    # enforce: frozen entries become +0.0 whatever they hold (inf, NaN, -0.0); free ones keep their bits.
    # restore: a copy of the saved frozen values puts the original bits back at frozen entries.
    mask = torch.tensor([True, False, False, True, False])
    original = torch.tensor([1.5, -0.0, 2.0, 3.0, float("nan")])
    keep = pack_mask(mask)
    grad = torch.tensor([float("inf"), float("nan"), -0.0, -1.0, float("inf")])
    enforce_masked_grads_([grad, None], [keep, keep])
    assert grad[0] == float("inf") and grad[3] == -1.0
    assert grad[[1, 2, 4]].view(torch.int32).eq(0).all()  # +0.0 exactly
    p = torch.tensor([9.0, 9.0, 9.0, 9.0, 9.0])
    restore_frozen_([p], [frozen_values(original, keep)], [keep])
    expected = torch.where(mask, torch.tensor(9.0), original)
    assert torch.equal(p.view(torch.int32), expected.view(torch.int32))
