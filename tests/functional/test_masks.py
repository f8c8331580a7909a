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


_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}


def _random_bits(shape, dtype, gen):
    """A float tensor of ``dtype`` with uniformly random bit patterns: every sign, subnormals,
    +-0.0, +-inf and NaN with all payloads occur; plus some exact inf, NaN and -0.0."""
    width = _INT[torch.finfo(dtype).bits // 8]
    info = torch.iinfo(width)
    bits = torch.randint(info.min, info.max, shape, generator=gen, dtype=torch.int64).to(width)
    t = bits.view(dtype)
    flat = t.view(-1)
    for i, v in zip(range(0, flat.numel(), 5), [float("inf"), float("nan"), -0.0, float("-inf")] * flat.numel()):
        flat[i] = v
    return t


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("chunk, block", [(1 << 20, 1 << 17), (16, 16), (16, 5), (24, 8)])
def test_kernels_match_the_definitions_bit_for_bit(dtype, chunk, block, monkeypatch):
    # enforce: frozen entries become +0.0 (all bits 0) whatever they held; free entries keep their bits.
    # restore: frozen entries get the saved bits back; free entries keep theirs. Compared on the
    # integer bits against where(), for every float width, sizes that are not multiples of 8 or 2,
    # several blocks per saved chunk and partial last blocks.
    import litplug.functional.masks as masks

    monkeypatch.setattr(masks, "CHUNK", chunk)
    monkeypatch.setattr(masks, "CPU_BLOCK", block)
    gen = torch.Generator().manual_seed(0)
    width = _INT[torch.finfo(dtype).bits // 8]
    for shape in [(1,), (7,), (9,), (3, 11), (5, 13), (2, 3, 17), (100,)]:
        for ratio in (0.0, 0.3, 1.0):
            mask = torch.rand(shape, generator=gen) < ratio
            packed = pack_mask(mask)
            grad = _random_bits(shape, dtype, gen)
            expected = torch.where(mask, grad.view(width), 0)
            enforce_masked_grads_([grad], [packed])
            assert torch.equal(grad.view(width), expected), (shape, ratio)

            original = _random_bits(shape, dtype, gen)
            values = frozen_values(original, packed)
            assert sum(v.numel() for v in values) == int((~mask).sum())
            moved = _random_bits(shape, dtype, gen)
            expected = torch.where(mask, moved.view(width), original.view(width))
            restore_frozen_([moved], [values], [packed])
            assert torch.equal(moved.view(width), expected), (shape, ratio)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float64])
def test_enforce_on_non_contiguous_gradients(dtype, monkeypatch):
    # Transposed, channels_last and strided gradients: the mask follows the row-major order of the
    # logical shape; blocks of rows may start inside a byte of the packed mask.
    import litplug.functional.masks as masks

    monkeypatch.setattr(masks, "CPU_BLOCK", 12)
    gen = torch.Generator().manual_seed(1)
    width = _INT[torch.finfo(dtype).bits // 8]
    grads = [
        _random_bits((7, 5), dtype, gen).t(),
        _random_bits((3, 5, 4, 2), dtype, gen).to(memory_format=torch.channels_last),
        _random_bits((9, 6), dtype, gen)[:, ::2],
        _random_bits((2, 33), dtype, gen)[:, 1:],
    ]
    for grad in grads:
        assert not grad.is_contiguous()
        mask = torch.rand(grad.shape, generator=gen) < 0.5
        expected = torch.where(mask, grad.view(width), 0)
        enforce_masked_grads_([grad], [pack_mask(mask)])
        assert torch.equal(grad.view(width), expected), grad.shape


def test_restore_on_non_contiguous_parameters():
    # channels_last and transposed weights: frozen entries get their saved values back, bit-exact,
    # at the positions of the row-major order the mask and the saved values follow
    gen = torch.Generator().manual_seed(2)
    for weight in [
        torch.randn(3, 5, 4, 2, generator=gen).to(memory_format=torch.channels_last),
        torch.randn(7, 5, generator=gen).t(),
    ]:
        assert not weight.is_contiguous()
        mask = torch.rand(weight.shape, generator=gen) < 0.5
        packed = pack_mask(mask)
        values = frozen_values(weight, packed)
        moved = weight.clone(memory_format=torch.preserve_format).add_(1.0)
        assert moved.stride() == weight.stride()
        restore_frozen_([moved], [values], [packed])
        assert moved.stride() == weight.stride()
        assert torch.equal(moved[~mask].view(torch.int32), weight[~mask].view(torch.int32))
        assert torch.equal(moved[mask], weight[mask] + 1.0)
