"""litplug.merging.ties: TIES merging against hand computations, exact top-k with ties."""

import pytest
import torch

from litplug.merging import (
    ties_merge,
)


def test_ties_merge_hand_computed():
    """Two tensors, d = 5, density 0.6 -> keep k = 3 entries per task over the whole model.
    tau_1 = [3, -1, 2 | 0.2, 0]     -> trimmed [3, -1, 2 | 0, 0]
    tau_2 = [-1, -2, -2 | -0.4, 4]  -> trimmed [0, -2, -2 | 0, 4]
    sum = [3, -3, 0 | 0, 4] -> sign [+, -, 0 | 0, +]; zeros take sign(sum of signs) = +
    disjoint mean: [3, (-1-2)/2, 2 (only tau_1 agrees) | 0, 4] = [3, -1.5, 2 | 0, 4]; scale 0.5."""
    base = {"a": torch.zeros(3), "b": torch.ones(2), "n": torch.tensor(5)}
    ft1 = {"a": torch.tensor([3.0, -1.0, 2.0]), "b": torch.tensor([1.2, 1.0]), "n": torch.tensor(7)}
    ft2 = {"a": torch.tensor([-1.0, -2.0, -2.0]), "b": torch.tensor([0.6, 5.0]), "n": torch.tensor(9)}
    merged = ties_merge(base, [ft1, ft2], density=0.6, scale=0.5)
    assert torch.equal(merged["a"], torch.tensor([1.5, -0.75, 1.0]))
    assert torch.equal(merged["b"], torch.tensor([1.0, 3.0]))
    assert merged["n"] == 5 and merged["n"].dtype == torch.int64
    # density 1 keeps everything: entry-wise mean of the agreeing task-vector entries
    merged = ties_merge(base, [ft1, ft2], density=1.0)
    torch.testing.assert_close(merged["b"], torch.tensor([0.6, 5.0]))  # 0.2 - 0.4 < 0: only tau_2's -0.4 agrees
    with pytest.raises(ValueError, match=r"`density` must be in \(0, 1\], got 0"):
        ties_merge(base, [ft1], density=0)


def test_ties_keeps_exactly_k_entries_of_quantised_task_vectors():
    """bf16-quantised task vectors have many equal magnitudes: each task keeps exactly
    int(density * d) entries, the earliest among those tied with the k-th largest."""
    gen = torch.Generator().manual_seed(0)
    d = 875
    base = {"a": torch.zeros(500), "b": torch.zeros(25, 15)}
    fts = [
        {k: (torch.randn(v.shape, generator=gen) * 4).round() / 4 for k, v in base.items()} for _ in range(2)
    ]  # 0.25-steps: ~30 distinct magnitudes
    for density in (0.5, 0.3):
        k = int(density * d)
        for trim in ("model", "tensor"):
            for ft in fts:
                # a single task: the merge is the trimmed task vector itself
                merged = ties_merge(base, [ft], density=density, trim=trim)
                kept = {n: merged[n] != 0 for n in base}
                nonzero = sum(int((ft[n] != 0).sum()) for n in base)
                if trim == "model":
                    assert sum(int(m.sum()) for m in kept.values()) == min(k, nonzero)
                    flat = torch.cat([ft[n].flatten() for n in base]).abs()
                else:
                    for n, v in base.items():
                        assert int(kept[n].sum()) == min(int(density * v.numel()), int((ft[n] != 0).sum()))
                    flat = ft["a"].abs()
                    k = int(density * 500)
                # the kept set: every magnitude above the k-th largest, then the earliest ties
                threshold = flat.sort(descending=True).values[k - 1]
                mask = torch.cat([kept[n].flatten() for n in base])[: flat.numel()]
                assert bool(mask[flat > threshold].all())
                tied = (flat == threshold).nonzero().flatten()
                n_tied = int(mask[tied].sum())
                assert mask[tied[:n_tied]].all() and not mask[tied[n_tied:]].any()
                k = int(density * d)


def test_ties_trim_per_tensor_differs_from_whole_model():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    ft = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    assert torch.equal(ties_merge(base, [ft], 0.5)["b"], torch.zeros(4))  # the 4 largest are all in `a`
    assert torch.equal(ties_merge(base, [ft], 0.5, trim="tensor")["b"], torch.tensor([0.0, 0.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="`trim` must be one of"):
        ties_merge(base, [ft], 0.5, trim="layer")
