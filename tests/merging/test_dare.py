"""litplug.merging.dare: drop-and-rescale is seeded, unbiased and keeps the density."""

import pytest
import torch

from litplug.merging import (
    dare,
)


def test_dare_is_seeded_unbiased_and_keeps_the_density():
    base = {"w": torch.zeros(20_000)}
    ft = {"w": torch.linspace(-1, 1, 20_000)}
    one, same = dare(base, [ft], 0.3, seed=1), dare(base, [ft], 0.3, seed=1)
    assert torch.equal(one["w"], same["w"]) and not torch.equal(one["w"], dare(base, [ft], 0.3, seed=2)["w"])
    kept = one["w"] != 0
    assert abs(kept.float().mean().item() - 0.3) < 5 * (0.21 / 20_000) ** 0.5
    torch.testing.assert_close(one["w"][kept], ft["w"][kept] / 0.3)
    means = torch.stack([dare(base, [ft], 0.3, seed=s)["w"] for s in range(200)]).mean(0)
    assert (means - ft["w"]).abs().mean() < 0.1  # E[merge] = base + tau
    with pytest.raises(TypeError, match="`seed` must be an int"):
        dare(base, [ft], 0.3, seed=None)
