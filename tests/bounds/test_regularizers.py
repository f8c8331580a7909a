"""The warmup regularizers (litplug.bounds.regularizers) against their closed form."""

import math

import torch

from litplug.bounds import (
    warmup_regularizers,
)


def test_warmup_regularizers_closed_form():
    r0 = torch.full((4,), 0.1)
    # radius 0.4 -> ratio 0.25 < tau 0.5: tightness = (0.5 - 0.25) / 0.5
    lower = torch.tensor([[-0.4, 0.1, -0.5, -0.3]])
    upper = lower + 0.8
    tight, relu = warmup_regularizers([(lower, upper)], r0, 0.5)
    assert math.isclose(float(tight), 0.5, rel_tol=1e-5)
    # one active neuron (l = 0.1 > 0), no inactive one (u < 0 never): the balance term is 0
    assert float(relu) == 0.0
    lower2 = torch.tensor([[0.2, 0.1, -1.2, -0.9]])
    upper2 = lower2 + 0.1
    _, relu2 = warmup_regularizers([(lower2, upper2)], r0, 0.5)
    centre = (lower2 + upper2) / 2
    act, inact = centre * (lower2 > 0), centre * (upper2 < 0)
    mean_ratio = act.mean() / -inact.mean()
    spread = (centre - centre.mean()) ** 2
    var_ratio = (spread * (lower2 > 0)).sum() / (spread * (upper2 < 0)).sum()
    fold = lambda r: min(float(r), 1 / float(r))  # noqa: E731
    expected = (max(0.5 - fold(mean_ratio), 0) + max(0.5 - fold(var_ratio), 0)) / 0.5
    assert math.isclose(float(relu2), expected, rel_tol=1e-5)
    # An empty group gives a finite gradient.
    centre_param = torch.zeros(1, 4, requires_grad=True)
    _, relu3 = warmup_regularizers([(centre_param + lower, centre_param + upper)], r0, 0.5)
    relu3.backward()
    assert torch.isfinite(centre_param.grad).all()
