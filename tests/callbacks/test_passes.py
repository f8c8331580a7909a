"""litplug.callbacks.passes: the perturbed-weight buffers swapped in through ``param.data``."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from litplug.bounds.fused import cached_abs
from litplug.callbacks.passes import PerturbedWeights


def test_perturbed_weights_swaps_count_as_writes():
    """Swapping a reused buffer in is a write of the parameter: a cache keyed on its version (the
    certified bounds' |W|) recomputes, and a graph that saved the old weights refuses to run. The
    buffers do not keep the parameter alive."""
    w = torch.nn.Parameter(torch.tensor([[1.0, -2.0], [0.5, 3.0]]))
    own = w.detach().clone()
    d = [torch.tensor([[-3.0, 1.0], [-2.0, -4.0]])]
    perturbed = PerturbedWeights()
    with torch.no_grad():
        # the same buffer, new values, no |W| taken between the two; a number or a 0-dim tensor
        for alpha in (1.0, torch.tensor(2.0)):
            perturbed.apply_([w], d, alpha)
            assert torch.equal(cached_abs(w), (own + alpha * d[0]).abs())
            perturbed.restore_()
        assert torch.equal(w, own) and torch.equal(cached_abs(w), own.abs())
    loss = (w * w).sum()
    perturbed.apply_([w], d, 1.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    perturbed.restore_()
    alive = weakref.ref(w)
    del w, loss
    gc.collect()
    assert alive() is None and perturbed.nbytes() > 0  # the buffers hold no reference to the parameter
