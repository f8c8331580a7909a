"""Unit tests of the interval bound engine (litplug.bounds)."""

import copy
import gc
import math
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from litplug.bounds import (
    BoundedNetwork,
    UnsupportedOperationError,
    input_box,
    interval_bounds,
    margin_bounds,
    margin_spec,
    warmup_regularizers,
)
from litplug.modules import CNN7, MLP, ConvNet


class Residual(nn.Module):
    """Exercises the functional ops: residual add, concat, reshape, pooling, activations."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.block = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(0.1), nn.Conv2d(4, 4, 1))
        self.pool = nn.MaxPool2d(2)
        self.avg = nn.AvgPool2d(2)
        self.adapt = nn.AdaptiveAvgPool2d(2)
        self.conv1d = nn.Conv1d(8, 3, 2)
        self.head = nn.Sequential(nn.Dropout(0.3), nn.Identity(), nn.Linear(64 + 16 + 24, 5))

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        h = h + self.block(h)
        h = torch.tanh(h) - 0.5 * torch.sigmoid(h)
        a = self.pool(h).flatten(1)
        b = self.adapt(self.avg(h) * 2.0).reshape(x.size(0), -1)
        c = F.relu(self.conv1d(h.view(x.size(0), 8, 32)[:, :, :9])).flatten(1)
        return self.head(torch.cat([a, b, c], dim=1))


def _nets():
    torch.manual_seed(0)
    return {
        "mlp": MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32, 16], batch_norm=True),
        "convnet": ConvNet(input_shape=[1, 8, 8], num_outputs=10, channels=[4, 8], hidden=16),
        "cnn7": CNN7(input_shape=[1, 8, 8], num_outputs=10, width=4, linear_size=16),
        "sigmoid": MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16], activation="sigmoid"),
    }


def _warm_bn(net, x):
    net.train()
    with torch.no_grad():
        net(x)
    return net.eval()


@pytest.mark.parametrize("name", ["mlp", "convnet", "cnn7", "sigmoid"])
def test_sound_and_exact_at_zero(name):
    net = _warm_bn(_nets()[name], torch.rand(64, 1, 8, 8))
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        lower, upper = interval_bounds(net, x, x)
        torch.testing.assert_close(lower, net(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(upper, net(x), rtol=0, atol=1e-5)
        lower, upper = interval_bounds(net, x - 0.05, x + 0.05)
        for i in range(100):
            noise = torch.rand_like(x) * 2 - 1
            z = net(x + 0.05 * (noise.sign() if i % 2 else noise))  # box vertices and interior points
            assert (z >= lower - 1e-5).all() and (z <= upper + 1e-5).all()


def test_functional_ops_sound_in_train_mode_with_clean_batch():
    torch.manual_seed(1)
    net = Residual().train()
    x = torch.rand(16, 2, 8, 8)
    engine = BoundedNetwork(net)
    torch.manual_seed(5)
    result = engine(x - 0.02, x + 0.02, clean=x)
    # Train-mode BN uses the clean batch's statistics: the same affine map for every perturbation.
    bn = net.bn
    with torch.no_grad():
        h = net.conv(x)
        scale = bn.weight / torch.sqrt(h.var((0, 2, 3), unbiased=False) + bn.eps)
        shift = bn.bias - h.mean((0, 2, 3)) * scale

        def fixed(inp):  # the network with BN frozen to the clean batch's affine map, same dropout mask
            saved, net.bn = net.bn, _Affine(scale, shift)
            torch.manual_seed(5)
            out = net(inp)
            net.bn = saved
            return out

        ref = fixed(x)
        torch.testing.assert_close(result.clean, ref, rtol=1e-4, atol=1e-5)
        for _ in range(100):
            z = fixed(x + (torch.rand_like(x) * 2 - 1) * 0.02)
            assert (z >= result.lower - 1e-5).all() and (z <= result.upper + 1e-5).all()


class _Affine(nn.Module):
    def __init__(self, scale, shift):
        super().__init__()
        self.scale, self.shift = scale, shift

    def forward(self, x):
        return x * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)


def test_bounds_widen_monotonically_with_eps():
    net = _warm_bn(_nets()["cnn7"], torch.rand(64, 1, 8, 8))
    x = torch.rand(4, 1, 8, 8)
    widths = []
    with torch.no_grad():
        for eps in [0.0, 0.01, 0.02, 0.05, 0.1]:
            lower, upper = interval_bounds(net, x - eps, x + eps)
            widths.append(upper - lower)
    for a, b in zip(widths, widths[1:]):
        assert (b >= a - 1e-6).all()
    assert (widths[-1] > widths[1]).any()


def test_closed_form_linear_network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 4), nn.Linear(4, 3))
    x = torch.randn(6, 5)
    eps = torch.rand(6, 5) * 0.3
    lower, upper = interval_bounds(net, x - eps, x + eps)
    w1, b1, w2, b2 = net[0].weight, net[0].bias, net[1].weight, net[1].bias
    centre = (x @ w1.T + b1) @ w2.T + b2
    radius = eps @ w1.abs().T @ w2.abs().T  # IBP is layer-wise, not |W2 W1|
    torch.testing.assert_close(lower, centre - radius)
    torch.testing.assert_close(upper, centre + radius)


@pytest.mark.parametrize("name", ["mlp", "cnn7"])
def test_elided_margins_tighter_than_naive_and_sound(name):
    net = _warm_bn(_nets()[name], torch.rand(64, 1, 8, 8))
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


def test_margin_spec_rows():
    spec = margin_spec(torch.tensor([1]), 3)
    assert spec.tolist() == [[[-1.0, 1.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, -1.0]]]


def test_unsupported_ops_are_named():
    with pytest.raises(UnsupportedOperationError, match=r"GELU at module '1'"):
        BoundedNetwork(nn.Sequential(nn.Linear(2, 2), nn.GELU()))

    class Softmaxed(nn.Module):
        def forward(self, x):
            return torch.softmax(x, -1)

    with pytest.raises(UnsupportedOperationError, match="softmax"):
        BoundedNetwork(Softmaxed())

    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x

    with pytest.raises(UnsupportedOperationError, match="torch.fx"):
        BoundedNetwork(Branchy())


def test_bound_cache_does_not_keep_the_model_alive():
    net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    x = torch.rand(2, 4)
    interval_bounds(net, x - 0.1, x + 0.1)
    margin_bounds(net, x, torch.tensor([0, 1]), 0.1)
    ref = weakref.ref(net)
    del net
    gc.collect()
    assert ref() is None


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


class Functional(nn.Module):
    """F.conv2d / F.linear on parameters (what tracing a custom layer yields), elided at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(3, 4))
        self.b = nn.Parameter(torch.randn(3))
        self.c = nn.Parameter(torch.randn(2, 1, 3, 3))

    def forward(self, x):
        h = F.relu(F.conv2d(x, self.c, padding=1)).flatten(1)[:, :4]
        return F.linear(h, self.w, bias=self.b)


def test_functional_layers_and_elision_through_f_linear():
    torch.manual_seed(0)
    net, x, y = Functional(), torch.rand(6, 1, 4, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        lower, upper = interval_bounds(net, x, x)
        torch.testing.assert_close(lower, net(x))
        margins = margin_bounds(net, x, y, 0.1)
        lo, up = interval_bounds(net, x - 0.1, x + 0.1)
        for _ in range(100):
            z = net(x + (torch.rand_like(x) * 2 - 1) * 0.1)
            assert (z >= lo - 1e-5).all() and (z <= up + 1e-5).all()
            assert (z.gather(1, y[:, None]) - z >= margins - 1e-5).all()


@pytest.mark.parametrize("momentum", [0.1, None])
def test_train_mode_batch_norm_updates_running_stats_as_the_module(momentum):
    # The engine computes the clean batch's statistics once and updates the running statistics
    # itself: the same result as calling the module on the clean batch.
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3),
        nn.BatchNorm2d(4, momentum=momentum),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64, 8),
        nn.BatchNorm1d(8, momentum=momentum),
    )
    ref = copy.deepcopy(net)
    x = torch.randn(5, 2, 6, 6)
    for _ in range(2):
        clean = BoundedNetwork(net)(x - 0.1, x + 0.1, clean=x).clean
        torch.testing.assert_close(clean, ref(x), rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(net.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=name)


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
    net = (Residual() if name == "residual" else _nets()[name]).double().train()
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


def test_an_operator_is_one_table_entry(monkeypatch):
    # ELU has no entry: refused at construction, naming the module; one monotone entry makes it
    # boundable, and its bounds contain the outputs of sampled inputs.
    from litplug.bounds import OPERATORS, Op
    from litplug.bounds.ops import monotone_module

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ELU(), nn.Linear(6, 3))
    with pytest.raises(UnsupportedOperationError, match=r"ELU at module '1'"):
        BoundedNetwork(net)
    monkeypatch.setitem(OPERATORS, nn.ELU, Op(monotone_module))
    x = torch.rand(8, 4)
    with torch.no_grad():
        lower, upper = BoundedNetwork(net)(x - 0.1, x + 0.1)[:2]
        for _ in range(50):
            out = net(x + (torch.rand_like(x) * 2 - 1) * 0.1)
            assert (lower <= out + 1e-6).all() and (out <= upper + 1e-6).all()


def _backward_names(t):
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names.add(type(fn).__name__)
        todo.extend(f for f, _ in fn.next_functions)
    return names


def test_engine_is_stateless_and_fused_is_an_argument():
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).eval()
    x = torch.rand(5, 4)
    engine = BoundedNetwork(net)
    before = dict(vars(engine))
    fused = engine(x - 0.1, x + 0.1, clean=x, record_relu=True)
    plain = engine(x - 0.1, x + 0.1, clean=x, fused=False)
    engine.linearized_radius(x, torch.full_like(x, 0.1))
    assert vars(engine).keys() == before.keys() and all(vars(engine)[k] is v for k, v in before.items())
    assert len(fused.relu) == 1 and plain.relu == []
    assert {"IntervalLinearBackward", "IntervalReLUBackward"} <= _backward_names(fused.upper)
    assert not any(name.startswith("Interval") for name in _backward_names(plain.upper))
    torch.testing.assert_close(fused.upper, plain.upper)


def _plain_bounds(engine, lower, upper, **kwargs):
    """The reference: the plain rules with gradients on (``weight.abs()`` each call, no box overwritten)."""
    with torch.enable_grad():
        out = engine(lower, upper, fused=False, **kwargs)
    return out.lower.detach(), out.upper.detach(), None if out.clean is None else out.clean.detach()


class Shared(nn.Module):
    """A convolution's output read by two modules that could overwrite an owned input."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.relu = nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU()
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(108, 10))

    def forward(self, x):
        h = self.conv(x)
        return self.head(self.relu(h) + self.bn(h))


@pytest.mark.parametrize("name", ["residual", "cnn7", "mlp", "shared"])
def test_no_grad_bounds_match_the_plain_rules(name):
    # Without gradients the engine reuses |W| across calls, overwrites the boxes it owns (batch
    # norm and ReLU after a convolution or linear layer) and takes the ReLU box as max(c, h),
    # min(r, h): the bounds are those of the plain rules up to rounding, with or without the clean
    # batch carried along (eval-mode batch norm does not read it).
    torch.manual_seed(0)
    net = {"residual": Residual, "shared": Shared}.get(name, lambda: _nets()[name])().double()
    shape = (2, 8, 8) if name == "residual" else (1, 8, 8)
    classes = 5 if name == "residual" else 10
    x = torch.rand(6, *shape, dtype=torch.float64)
    for m in net.modules():  # running statistics far from the initial (0, 1)
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2.0)
    net.eval()
    y = torch.randint(0, classes, (6,))
    engine = BoundedNetwork(net)
    assert not engine.uses_batch_statistics()
    for spec in (None, margin_spec(y, classes).double()):
        lower, upper, clean = _plain_bounds(engine, x - 0.05, x + 0.05, clean=x, spec=spec)
        with torch.no_grad():
            for carried in (x, None):
                fast = engine(x - 0.05, x + 0.05, clean=carried, spec=spec)
                torch.testing.assert_close(fast.lower, lower, rtol=1e-12, atol=1e-12)
                torch.testing.assert_close(fast.upper, upper, rtol=1e-12, atol=1e-12)
                if carried is not None:
                    torch.testing.assert_close(fast.clean, clean, rtol=1e-12, atol=1e-12)
                    torch.testing.assert_close(fast.clean, net(x), rtol=1e-12, atol=1e-12)
            again = engine(x - 0.05, x + 0.05, spec=spec)  # the cached |W|: the same values
            assert torch.equal(again.lower, fast.lower) and torch.equal(again.upper, fast.upper)
    net.train()
    assert engine.uses_batch_statistics()


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
        torch.testing.assert_close(upper, _plain_bounds(engine, x - 0.1, x + 0.1)[1], rtol=1e-12, atol=1e-12)
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


def test_bounds_in_inference_mode_then_training():
    # The |W| buffer allocated in inference mode (a validation loop) is a normal tensor: the next
    # training step writes into it.
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.rand(5, 4)
    with torch.inference_mode():
        before = interval_bounds(net, x - 0.1, x + 0.1)[1]
    out = BoundedNetwork(net)(x - 0.1, x + 0.1, clean=x)
    out.upper.sum().backward()
    torch.testing.assert_close(out.upper.detach(), before)
    assert all(p.grad is not None for p in net.parameters())
