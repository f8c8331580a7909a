"""Input specifications (litplug.bounds.specs): the pixel-space box, margin rows, elided margins."""

import pytest
import torch
from bound_networks import engine_networks, warm_bn

from litplug.bounds import (
    input_box,
    interval_bounds,
    margin_bounds,
    margin_spec,
)


@pytest.mark.parametrize("name", ["mlp", "cnn7"])
def test_elided_margins_tighter_than_naive_and_sound(name):
    net = warm_bn(engine_networks()[name], torch.rand(64, 1, 8, 8))
    x, y = torch.rand(32, 1, 8, 8), torch.randint(0, 10, (32,))
    with torch.no_grad():
        margins = margin_bounds(net, x, y, eps=0.03, pixel_range=(0.0, 1.0))
        lo, up = interval_bounds(net, *input_box(x, 0.03, pixel_range=(0.0, 1.0)))
        naive = lo.gather(1, y[:, None]) - up
        others = torch.ones_like(margins, dtype=torch.bool).scatter_(1, y[:, None], False)
        assert (margins[others] >= naive[others] - 1e-5).all()
        assert (margins[others] > naive[others] + 1e-4).any()
        assert (margins.gather(1, y[:, None]) == 0).all()
        for _ in range(100):
            z = net((x + (torch.rand_like(x) * 2 - 1) * 0.03).clamp(0, 1))
            assert (z.gather(1, y[:, None]) - z >= margins - 1e-4).all()


def test_input_box_maps_pixel_eps_through_mean_std_and_clamps():
    mean, std = (0.5, 0.2, -1.0), (0.25, 2.0, 0.5)
    pixels = torch.tensor([0.0, 0.5, 1.0]).view(1, 3, 1, 1).repeat(2, 1, 2, 2)
    m, s = torch.tensor(mean).view(1, 3, 1, 1), torch.tensor(std).view(1, 3, 1, 1)
    x = (pixels - m) / s
    lower, upper = input_box(x, 0.1, mean, std, (0.0, 1.0))
    expected_low = (torch.tensor([0.0, 0.4, 0.9]).view(1, 3, 1, 1) - m) / s
    expected_high = (torch.tensor([0.1, 0.6, 1.0]).view(1, 3, 1, 1) - m) / s
    torch.testing.assert_close(lower, expected_low.expand_as(x))
    torch.testing.assert_close(upper, expected_high.expand_as(x))
    with pytest.raises(ValueError, match="eps"):
        input_box(x, -0.1)
    with pytest.raises(ValueError, match=r"`std` must hold one value or one per channel \(3\), got 2"):
        input_box(x, 0.1, mean, std[:2])


def test_margin_spec_rows():
    spec = margin_spec(torch.tensor([1]), 3)
    assert spec.tolist() == [[[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, -1.0]]]


@pytest.mark.parametrize("method", ["ibp", "crown", "crown-ibp"])
def test_margin_bounds_refuses_labels_that_do_not_fit_the_batch_or_the_outputs(method):
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    x = torch.rand(2, 4)
    for y, error, message in [
        (torch.tensor([0, 3]), ValueError, r"`y` must hold class indices in \[0, 3\), got values in \[0, 3\]"),
        (torch.tensor([0, -1]), ValueError, r"`y` must hold class indices in \[0, 3\), got values in \[-1, 0\]"),
        (torch.tensor([0, 1, 2]), ValueError, r"`y` must have shape \[batch\] = \[2\], got \(3,\)"),
        (torch.tensor([0]), ValueError, r"`y` must have shape \[batch\] = \[2\], got \(1,\)"),
        (torch.tensor([[0], [1]]), ValueError, r"`y` must have shape \[batch\] = \[2\], got \(2, 1\)"),
        (torch.tensor([0.0, 1.0]), TypeError, "`y` must be an integer tensor of class indices, got a torch.float32"),
        ([0, 1], TypeError, "`y` must be an integer tensor of class indices, got list"),
    ]:
        with pytest.raises(error, match=message):
            margin_bounds(net, x, y, 0.1, method=method)
    with pytest.raises(ValueError, match="`num_classes` must equal the network's 3 outputs, got 2"):
        margin_bounds(net, x, torch.tensor([0, 1]), 0.1, num_classes=2, method=method)
    with pytest.raises(ValueError, match=r"`x` must be finite \(no NaN or infinity\)"):
        margin_bounds(net, x * float("nan"), torch.tensor([0, 1]), 0.1, method=method)
    with pytest.raises(ValueError, match="the box around `x` is empty"):
        margin_bounds(net, x + 2, torch.tensor([0, 1]), 0.1, pixel_range=(0.0, 1.0), method=method)
    for kwargs, message in [
        ({"eps": float("nan")}, "`eps` must be a finite number >= 0, got nan"),
        ({"std": (0.0,)}, "`std` must be > 0, got 0.0"),
        ({"mean": (float("inf"),)}, "`mean` must be a finite number, got inf"),
        ({"pixel_range": (1.0, 0.0)}, r"`pixel_range` must be \(low, high\) with low <= high"),
        ({"method": "CROWN"}, "`method` must be one of 'ibp', 'crown', 'crown-ibp', got 'CROWN'"),
    ]:
        with pytest.raises(ValueError, match=message):
            margin_bounds(net, x, torch.tensor([0, 1]), **{"eps": 0.1, "method": method, **kwargs})
    assert margin_bounds(net, x, torch.tensor([0, 2]), 0.1, num_classes=3, method=method).shape == (2, 3)
