"""litplug.merging.breadcrumbs: outliers and small entries are dropped."""

import torch

from litplug.merging import (
    breadcrumbs,
)


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = {"w": torch.zeros(10)}
    ft = {"w": torch.arange(1.0, 11.0)}
    out = breadcrumbs(base, [ft], density=0.5, gamma=0.2)["w"]  # drop 10, 9; keep 8..4; drop 3..1
    assert torch.equal(out, torch.tensor([0.0, 0, 0, 4, 5, 6, 7, 8, 0, 0]))
