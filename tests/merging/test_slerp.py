"""litplug.merging.slerp: spherical interpolation's closed form and its near-parallel fallback."""

import math

import pytest
import torch

from litplug.merging import (
    slerp,
)


def test_slerp_closed_form_and_near_parallel_fallback():
    a, b = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(1)}, {"w": torch.tensor([0.0, 1.0]), "n": torch.tensor(2)}
    # orthogonal: theta = pi/2, coefficients sin((1-t) pi/2) and sin(t pi/2) on the unnormalised tensors
    out = slerp(a, b, 1 / 3)
    torch.testing.assert_close(out["w"], torch.tensor([2 * math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    assert out["n"] == 1
    near = {"w": torch.tensor([2.0, 0.01]), "n": torch.tensor(3)}  # cos = 0.99999: linear interpolation
    torch.testing.assert_close(slerp(a, near, 0.25)["w"], torch.lerp(a["w"], near["w"], 0.25))
    for t in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`t` must"):
            slerp(a, b, t)
