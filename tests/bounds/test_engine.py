"""The interval bound engine (litplug.bounds.engine): sound and exact at eps 0, monotone in
eps, closed forms, train-mode batch norm, statelessness, refusals by name."""

import copy
import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from bound_networks import FunctionalOps, engine_networks, plain_bounds, warm_bn
from torch import nn

from litplug.bounds import (
    BoundedNetwork,
    UnsupportedOperationError,
    crown_bounds,
    interval_bounds,
    local_lipschitz,
    margin_bounds,
    margin_spec,
)


@pytest.mark.parametrize("name", ["mlp", "convnet", "cnn7", "sigmoid"])
def test_sound_and_exact_at_zero(name):
    net = warm_bn(engine_networks()[name], torch.rand(64, 1, 8, 8))
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
    net = FunctionalOps().train()
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
    net = warm_bn(engine_networks()["cnn7"], torch.rand(64, 1, 8, 8))
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
    net = {"residual": FunctionalOps, "shared": Shared}.get(name, lambda: engine_networks()[name])().double()
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
        lower, upper, clean = plain_bounds(engine, x - 0.05, x + 0.05, clean=x, spec=spec)
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


def test_a_box_that_is_empty_misshaped_or_nan_is_refused() -> None:
    net = nn.Sequential(nn.Linear(4, 3))
    x = torch.rand(2, 4)
    with pytest.raises(ValueError, match="`lower` must be <= `upper`"):
        interval_bounds(net, x + 0.1, x - 0.1)
    with pytest.raises(ValueError, match="same shape"):
        interval_bounds(net, x, x[:1])
    with pytest.raises(ValueError, match="must be finite"):
        interval_bounds(net, x * float("nan"), x)
    for bounds in (interval_bounds, crown_bounds, local_lipschitz):
        with pytest.raises(ValueError, match=r"must be finite \(no NaN or infinity\)"):
            bounds(net, torch.cat([x[:1], torch.full((1, 4), -float("inf"))]), x + 1)
        with pytest.raises(ValueError, match="must hold at least one sample, got a batch of 0"):
            bounds(net, x[:0], x[:0])


def test_torch_add_with_alpha_is_refused_not_bounded_without_it() -> None:
    class Scaled(nn.Module):
        def forward(self, x):
            return torch.add(x, x, alpha=2.0)

    for bounds in (interval_bounds, crown_bounds):
        with pytest.raises(UnsupportedOperationError, match=r"unsupported argument alpha.*a \+ alpha \* b"):
            bounds(Scaled(), torch.zeros(1, 2), torch.ones(1, 2))


BOX_FUNCTIONS = {
    "interval_bounds": interval_bounds,
    "crown_bounds": crown_bounds,
    "local_lipschitz": local_lipschitz,
    "margin_bounds": lambda net, lower, upper: margin_bounds(
        net, lower, torch.zeros(len(lower), dtype=torch.long), 0.1
    ),
}


@pytest.mark.parametrize("name", list(BOX_FUNCTIONS))
def test_a_box_unbatched_or_of_another_dtype_or_device_is_refused_by_name_before_computing(name):
    bound = BOX_FUNCTIONS[name]
    what = "`x`" if name == "margin_bounds" else "`lower` and `upper`"
    mlp = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    cnn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    x, image = torch.rand(2, 4), torch.rand(2, 1, 8, 8)
    with pytest.raises(ValueError, match=rf"{what} must be batched like the network's input, \[batch, \.\.\., 4\] "):
        bound(mlp, x[0], x[0])
    with pytest.raises(ValueError, match=r"\[batch, 1, \*, \*\] for the input of module '0', got shape \(1, 8, 8\)"):
        bound(cnn, image[0], image[0])
    with pytest.raises(ValueError, match=r"\[batch, \.\.\., 4\] for the input of module '0', got shape \(2, 5\)"):
        bound(mlp, torch.rand(2, 5), torch.rand(2, 5))
    with pytest.raises(ValueError, match=rf"{what} must have the network's dtype torch.float32, got torch.float64"):
        bound(mlp, x.double(), x.double())
    with pytest.raises(ValueError, match=rf"{what} must have the network's dtype torch.float64, got torch.float32"):
        bound(copy.deepcopy(cnn).double(), image, image)
    with pytest.raises(ValueError, match=rf"{what} must be on the network's device meta, got cpu"):
        bound(copy.deepcopy(mlp).to("meta"), x, x)
    if name != "margin_bounds":
        with pytest.raises(ValueError, match="`lower` and `upper` must have the same dtype, got torch.float64 and"):
            bound(mlp, x.double(), x)
        with pytest.raises(TypeError, match="`upper` must be a torch.Tensor, got ndarray"):
            bound(mlp, x, x.numpy())
    lower, upper = bound(mlp.double(), x.double(), x.double() + 0.1)[:2]  # the same dtype is bounded
    assert lower.dtype == torch.float64


def test_sizes_read_from_shape_are_plain_values() -> None:
    """``h.view(h.shape[0], -1)`` bounds as ``h.view(h.size(0), -1)``; another attribute of a
    perturbed tensor is refused."""

    class Net(nn.Module):
        def __init__(self, by_shape: bool) -> None:
            super().__init__()
            torch.manual_seed(0)
            self.conv, self.fc, self.by_shape = nn.Conv2d(1, 2, 3), nn.Linear(72, 3), by_shape

        def forward(self, x):
            h = torch.relu(self.conv(x))
            return self.fc(h.view(h.shape[0] if self.by_shape else h.size(0), -1))

    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    nets = [Net(by_shape).double().eval() for by_shape in (True, False)]
    for bounds in (interval_bounds, crown_bounds, local_lipschitz):
        got, want = (bounds(net, x - 0.05, x + 0.05) for net in nets)
        for a, b in zip(got if isinstance(got, tuple) else [got], want if isinstance(want, tuple) else [want]):
            torch.testing.assert_close(a, b, rtol=0, atol=0)

    class Transposed(nn.Module):
        def forward(self, x):
            return x.T

    with pytest.raises(UnsupportedOperationError, match="unsupported attribute 'T' of a perturbed tensor"):
        interval_bounds(Transposed(), torch.zeros(2, 3), torch.ones(2, 3))
