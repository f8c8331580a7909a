"""litplug.plumbing.storage: the contract every write to a parameter's storage keeps."""

import torch
from torch import nn

from litplug.callbacks.passes import PerturbedWeights
from litplug.plumbing.storage import flatten_, swap_, writable


def test_flatten_keeps_objects_and_values_and_makes_views():
    a, b = nn.Parameter(torch.randn(2, 3)), nn.Parameter(torch.randn(4))
    before = [a.detach().clone(), b.detach().clone()]
    optimizer = torch.optim.SGD([a, b], lr=0.1)
    flat = flatten_([a, b])
    assert optimizer.param_groups[0]["params"][0] is a
    assert torch.equal(a, before[0]) and torch.equal(b, before[1])
    assert a.data_ptr() == flat.data_ptr() and b.data_ptr() == flat[6:].data_ptr()
    with torch.no_grad():
        flat.zero_()
    assert not a.any() and not b.any()


def test_a_swap_and_its_undo_keep_the_flat_layout_and_count_as_writes():
    a, b = nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(3))
    flat = flatten_([a, b])
    version = a._version
    own = swap_(a, torch.full((2,), 5.0))
    assert torch.equal(a.detach(), torch.full((2,), 5.0)) and a._version > version
    swap_(a, own)
    assert a.data_ptr() == flat.data_ptr()
    # PerturbedWeights (SAM, IGNITE, the monitor) goes through the same swap: EMA's layout survives it.
    perturbed = PerturbedWeights()
    perturbed.apply_([a, b], [torch.ones(2), torch.ones(3)], alpha=0.5)
    assert torch.equal(flat, torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0]))  # the perturbation is elsewhere
    perturbed.restore_()
    assert a.data_ptr() == flat.data_ptr() and b.data_ptr() == flat[2:].data_ptr()


def test_writable_is_the_parameter_itself_when_plain():
    p = nn.Parameter(torch.ones(2))
    assert writable(p) is p
