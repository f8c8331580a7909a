"""SyntheticClassification (litplug.datamodules.synthetic): seeded and shaped."""

import pytest
import torch
from harness import concatenated

from litplug.datamodules import SyntheticClassification


def test_synthetic_is_seeded_and_shaped():
    a = SyntheticClassification(num_samples=200, input_shape=[1, 4, 4], num_classes=3, seed=1)
    b = SyntheticClassification(num_samples=200, input_shape=[1, 4, 4], num_classes=3, seed=1)
    a.setup(), b.setup()
    xa, ya = concatenated(a.test_dataloader())
    xb, yb = concatenated(b.test_dataloader())
    assert xa.shape[1:] == (1, 4, 4) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert set(ya.tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticClassification(num_classes=1)
