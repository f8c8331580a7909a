"""litplug.merging.arithmetic: interpolation and task arithmetic against closed forms."""

import pytest
import torch

from litplug.merging import (
    interpolate,
    task_arithmetic,
)


def test_interpolate_and_task_arithmetic_closed_forms():
    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    ft = [{"w": torch.tensor([2.0, 2.0]), "n": torch.tensor(9)}, {"w": torch.tensor([1.0, 5.0]), "n": torch.tensor(9)}]
    mid = interpolate(base, ft[0], 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.25, 2.0])) and mid["n"] == 4
    merged = task_arithmetic(base, ft, 0.5)  # base + 0.5 * ([1, 0] + [0, 3])
    assert torch.equal(merged["w"], torch.tensor([1.5, 3.5])) and merged["n"] == 4
    merged = task_arithmetic(base, ft, [2.0, -1.0])
    assert torch.equal(merged["w"], torch.tensor([3.0, -1.0]))
    with pytest.raises(ValueError, match="one value per fine-tune"):
        task_arithmetic(base, ft, [1.0])
    with pytest.raises(ValueError, match="`scale` must be a finite number, got nan"):
        task_arithmetic(base, ft, float("nan"))
