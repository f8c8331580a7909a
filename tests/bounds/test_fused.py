"""The fused autograd functions (litplug.bounds.fused): gradcheck, parity with plain autograd,
the cached |W| and the ReLU statistics."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from bound_networks import FunctionalOps, engine_networks, plain_bounds
from torch import nn

from litplug.bounds import (
    BoundedNetwork,
    interval_bounds,
    margin_bounds,
    margin_spec,
    warmup_regularizers,
)


def test_fused_functions_gradcheck():
    from litplug.bounds.fused import IntervalBatchNorm, IntervalLinear, IntervalReLU, ReLUStatistics

    torch.manual_seed(0)

    def t(*shape, positive=False):
        v = torch.rand(*shape, dtype=torch.float64) if positive else torch.randn(*shape, dtype=torch.float64)
        return v.requires_grad_(True)

    check = lambda fn, inputs: torch.autograd.gradcheck(fn, inputs, fast_mode=True)  # noqa: E731
    assert check(IntervalLinear.apply, (t(6, 5), t(3, 5, positive=True), t(4, 5), t(4)))
    assert check(IntervalLinear.apply, (t(4, 2, 5), t(2, 2, 5, positive=True), t(3, 5), None))
    for tracked in (True, False):
        n = 2 if tracked else 4
        assert check(lambda s, r, tracked=tracked: IntervalReLU.apply(s, r, tracked), (t(4, 5), t(n, 5, positive=True)))
        for shape in ((4, 2, 3, 3), (4, 3), (4, 2, 5)):
            stack, radius = t(*shape), t(n, *shape[1:], positive=True)
            gamma, beta = t(shape[1]), t(shape[1])
            bn = lambda s, r, g, b, tracked=tracked: IntervalBatchNorm.apply(s, r, g, b, 1e-5, tracked)[:2]  # noqa: E731
            assert check(bn, (stack, radius, gamma, beta))
            assert check(lambda s, r, bn=bn: bn(s, r, None, None), (stack, radius))
    lower = torch.randn(3, 2, 4, dtype=torch.float64)
    upper = lower + torch.rand_like(lower)
    assert (lower > 0).any() and (upper < 0).any()
    stats = lambda lo, up: ReLUStatistics.apply(lo, up)[0]  # noqa: E731
    assert check(stats, (lower.requires_grad_(True), upper.requires_grad_(True)))


@pytest.mark.parametrize("name", ["residual", "cnn7", "mlp"])
def test_fused_engine_matches_plain_autograd(name):
    # The fused Linear/ReLU/BatchNorm functions are an optimisation only: bounds, clean output,
    # ReLU bounds and every gradient equal those of autograd on the plain formulas.
    torch.manual_seed(0)
    net = (FunctionalOps() if name == "residual" else engine_networks()[name]).double().train()
    shape = (2, 8, 8) if name == "residual" else (1, 8, 8)
    x = torch.rand(6, *shape, dtype=torch.float64)
    y = torch.randint(0, 5 if name == "residual" else 10, (6,))
    results = []
    for fused in (True, False):
        net.zero_grad()
        torch.manual_seed(3)  # the same dropout mask
        engine = BoundedNetwork(net)
        out = engine(
            x - 0.05,
            x + 0.05,
            clean=x,
            spec=margin_spec(y, 5 if name == "residual" else 10).double(),
            record_relu=True,
            fused=fused,
        )
        tight, balance = warmup_regularizers(out.relu, torch.full_like(x, 0.05), 0.5, fused=fused)
        loss = F.cross_entropy(-out.lower, y) + F.cross_entropy(out.clean, y) + tight + balance
        loss = loss + sum(lo.square().mean() + up.mean() for lo, up in out.relu)  # gradients into the ReLU bounds
        loss.backward()
        results.append((out, loss.detach(), [p.grad.clone() for p in net.parameters()]))
    (a, loss_a, grads_a), (b, loss_b, grads_b) = results
    torch.testing.assert_close(a.lower, b.lower, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(a.clean, b.clean, rtol=1e-10, atol=1e-10)
    for (la, ua), (lb, ub) in zip(a.relu, b.relu):
        torch.testing.assert_close(la, lb, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(ua, ub, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-10, atol=1e-10)
    scale = max(float(g.abs().max()) for g in grads_b)  # biases before batch norm: true gradient 0
    for (pname, _), ga, gb in zip(net.named_parameters(), grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-8, atol=1e-10 * scale, msg=pname)


def test_fused_linear_detects_weight_modified_before_backward():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(5, 4)
    out = BoundedNetwork(net)(x - 0.1, x + 0.1, clean=x)
    with torch.no_grad():
        net[0].weight.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (out.lower.sum() + out.upper.sum()).backward()
    # two bound computations before one backward share the scratch |W| correctly
    net.zero_grad()
    a, b = BoundedNetwork(net)(x - 0.1, x + 0.1), BoundedNetwork(net)(x - 0.2, x + 0.2)
    (a.upper.sum() + b.upper.sum()).backward()
    grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    BoundedNetwork(net)(x - 0.1, x + 0.1).upper.sum().backward()
    BoundedNetwork(net)(x - 0.2, x + 0.2).upper.sum().backward()
    for g, p in zip(grads, net.parameters()):
        torch.testing.assert_close(g, p.grad)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_fused_relu_statistics_match_autograd(memory_format):
    # The warmup regularizers' fused statistics equal autograd's on the same formulas, values and
    # gradients, for contiguous and channels-last boxes.
    from litplug.bounds.fused import ReLUStatistics, relu_statistics

    torch.manual_seed(0)
    lower = torch.randn(4, 3, 5, 5, dtype=torch.float64).to(memory_format=memory_format)
    upper = lower + torch.rand_like(lower)
    results = []
    for statistics in (ReLUStatistics.apply, relu_statistics):
        lo, up = lower.clone().requires_grad_(True), upper.clone().requires_grad_(True)
        stats, counts = statistics(lo, up)
        (stats * torch.arange(1.0, 6.0, dtype=stats.dtype)).sum().backward()
        results.append((stats.detach(), counts, lo.grad, up.grad))
    for fused, plain in zip(*results):
        torch.testing.assert_close(fused, plain, rtol=1e-10, atol=1e-12)


def test_relu_box_is_the_interval_relu_box():
    from litplug.bounds.fused import IntervalReLU, relu_box

    torch.manual_seed(0)
    centre, radius = torch.randn(4000, dtype=torch.float64), torch.rand(4000, dtype=torch.float64)
    clean = torch.randn(3000, dtype=torch.float64)
    stable = centre - radius >= 0
    assert stable.any() and (centre + radius <= 0).any() and (~stable & (centre + radius > 0)).any()
    for tracked in (False, True):
        stack = torch.cat([centre, clean]) if tracked else centre
        ref_stack, ref_radius, _, _ = IntervalReLU.apply(stack, radius, tracked)
        out_stack, out_radius = relu_box(stack, radius, tracked)
        torch.testing.assert_close(out_stack, ref_stack, rtol=0, atol=1e-15)
        torch.testing.assert_close(out_radius, ref_radius, rtol=0, atol=1e-15)
        # an active ReLU passes the box through unchanged (no rounding of (relu(u) - relu(l)) / 2)
        assert torch.equal(out_stack[: len(centre)][stable], centre[stable])
        assert torch.equal(out_radius[stable], radius[stable])
        if tracked:
            assert torch.equal(out_stack[len(centre) :], clean.clamp_min(0))
        own_stack, own_radius = stack.clone(), radius.clone()
        in_stack, in_radius = relu_box(own_stack, own_radius, tracked, inplace=True)
        assert in_stack is own_stack and in_radius is own_radius
        assert torch.equal(in_stack, out_stack) and torch.equal(in_radius, out_radius)


def test_cached_abs_weight_follows_every_change_of_the_weights():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(144, 8), nn.ReLU(), nn.Linear(8, 3)
    ).double()
    net.eval()
    x = torch.rand(5, 1, 8, 8, dtype=torch.float64)
    engine = BoundedNetwork(net)

    def check() -> torch.Tensor:
        with torch.no_grad():
            upper = engine(x - 0.1, x + 0.1).upper
        torch.testing.assert_close(upper, plain_bounds(engine, x - 0.1, x + 0.1)[1], rtol=1e-12, atol=1e-12)
        return upper

    def step() -> None:  # an optimizer step: in-place updates of the parameters
        optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
        with torch.enable_grad():
            net(x).square().sum().backward()
        optimizer.step()

    other = copy.deepcopy(net)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-2)

    def replace_data() -> None:  # a new storage behind the same Parameter, version unchanged
        net[4].weight.data = torch.randn_like(net[4].weight)

    def in_place() -> None:
        with torch.no_grad():
            net[0].weight.neg_()

    def new_parameter() -> None:
        net[4].weight = nn.Parameter(torch.randn_like(net[4].weight))

    def to_float() -> None:
        net.float()
        nonlocal x
        x = x.float()

    previous = check()
    for change in (step, lambda: net.load_state_dict(other.state_dict()), replace_data, in_place, new_parameter):
        change()
        current = check()
        assert not torch.equal(current, previous)  # a stale |W| would give the previous bounds
        previous = current
    to_float()
    with torch.no_grad():
        upper = engine(x - 0.1, x + 0.1).upper
    assert upper.dtype == torch.float32
    torch.testing.assert_close(upper.double(), previous, rtol=1e-4, atol=1e-4)


def test_cached_abs_weight_is_freed_with_the_model():
    from litplug.bounds import fused

    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3)).eval()
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        interval_bounds(net, x - 0.1, x + 0.1)
        margin_bounds(net, x, torch.tensor([0, 1]), 0.1)
    keys = [id(net[0].weight), id(net[3].weight)]
    assert all(k in fused._SCRATCH for k in keys)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None
    assert not any(k in fused._SCRATCH for k in keys)


@pytest.mark.parametrize("train", [True, False])
def test_an_image_box_runs_channels_last_with_the_bounds_and_gradients_of_row_major(train, monkeypatch):
    # Interval.input lays a 4-d box out channels-last; the fused functions take gradients in either
    # layout (a Flatten hands the last ReLU a row-major one). Everything equals the row-major run.
    from litplug.bounds import Interval
    from litplug.modules import CNN7

    torch.manual_seed(0)
    net = CNN7(input_shape=[3, 8, 8], num_outputs=10, width=4, linear_size=16).double().train(train)
    x = torch.rand(6, 3, 8, 8, dtype=torch.float64)
    spec = margin_spec(torch.arange(6) % 10, 10).double()

    def run():
        net.zero_grad()
        out = BoundedNetwork(net)(x - 0.05, x + 0.05, clean=x, spec=spec, record_relu=True)
        tight, relu = warmup_regularizers(out.relu, torch.full_like(x, 0.05), 0.5)
        (out.lower.sum() + out.clean.square().sum() + tight + relu).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        return [out.lower, out.clean, *[t for pair in out.relu for t in pair], tight, relu, *grads], out.relu[0][0]

    channels_last, first = run()
    assert first.is_contiguous(memory_format=torch.channels_last) and not first.is_contiguous()
    row_major = classmethod(
        lambda cls, lower, upper, clean=None: cls.of((upper + lower) / 2, (upper - lower) / 2, clean)
    )
    monkeypatch.setattr(Interval, "input", row_major)
    reference, first = run()
    assert first.is_contiguous()
    # to float64 rounding of each value; gradients relative to the largest (a conv bias before
    # train-mode batch norm has a zero gradient up to rounding)
    values, grads = len(channels_last) - len(list(net.parameters())), list(net.parameters())
    largest = max(float(g.grad.abs().max()) for g in grads)
    for i, (a, b) in enumerate(zip(channels_last, reference)):
        scale = float(b.abs().max()) if i < values else largest
        assert float((a - b).abs().max()) <= 1e-13 * max(scale, 1.0), i
