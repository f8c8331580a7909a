"""litplug.merging.model_stock: the interpolation ratio from the angle between offsets."""

import math

import pytest
import torch

from litplug.merging import (
    model_stock,
)


def test_model_stock_ratio():
    """Two offsets at 60 degrees: cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3 of the way to their mean."""
    base = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.5, math.sqrt(3) / 2])}]
    torch.testing.assert_close(model_stock(base, fts)["w"], 2 / 3 * (fts[0]["w"] + fts[1]["w"]) / 2)
    with pytest.raises(ValueError, match="at least two models for model stock, got 1"):
        model_stock(base, fts[:1])
