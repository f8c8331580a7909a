"""litplug.merging.barrier: the loss barrier's definition and its TensorBoard scalars."""

import pytest
import torch
from harness import read_scalars
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from litplug.merging import (
    barrier,
    interpolate,
)


def test_barrier_definition_and_tensorboard(tmp_path):
    """A 1-d linear model with loss known at each alpha: the barrier is the largest rise above the
    line between the end points' losses."""
    torch.manual_seed(0)
    a, b = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    data = [(x[:16], y[:16]), (x[16:], y[16:])]
    logger = TensorBoardLogger(tmp_path)
    r = barrier(a, b, data, alphas=5, logger=logger)
    logger.finalize("success")
    assert r.alphas == [0.0, 0.25, 0.5, 0.75, 1.0]
    probe = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    expected = []
    for alpha in r.alphas:
        probe.load_state_dict(interpolate(a.state_dict(), b.state_dict(), alpha))
        with torch.no_grad():
            expected.append(float(nn.functional.cross_entropy(probe(x), y)))
    assert r.loss == pytest.approx(expected, rel=1e-5)
    rise = [loss - ((1 - t) * expected[0] + t * expected[-1]) for t, loss in zip(r.alphas, expected)]
    assert r.loss_barrier == pytest.approx(max(rise), rel=1e-4, abs=1e-6)
    assert r.midpoint_loss_barrier == pytest.approx(rise[2], rel=1e-4, abs=1e-6)
    scalars = read_scalars(tmp_path)
    assert [s for s, _ in scalars["merge/barrier/loss"]] == [0, 250, 500, 750, 1000]
    assert [v for _, v in scalars["merge/barrier/loss"]] == pytest.approx(r.loss, rel=1e-6)
    assert scalars["merge/barrier/loss_barrier"][0][1] == pytest.approx(r.loss_barrier, rel=1e-6)
    # after alignment the end points are the same functions, so their losses are unchanged
    aligned = barrier(a, b, data, alphas=[0.0, 0.5, 1.0], align_first=True)
    assert aligned.loss[0] == pytest.approx(r.loss[0]) and aligned.loss[-1] == pytest.approx(r.loss[-1], rel=1e-6)
