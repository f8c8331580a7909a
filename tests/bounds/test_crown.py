"""CROWN and CROWN-IBP (litplug.bounds.crown): soundness on sampled points and box corners, the
ordering IBP <= CROWN-IBP <= CROWN <= exact against an exact MILP verifier, parity with
auto_LiRPA 0.3 (optional peer), every operator of the relaxation table, and the errors."""

from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path

import numpy as np
import pytest
import torch
from bound_networks import Mixed, networks, samples
from scipy.optimize import Bounds, LinearConstraint, milp
from torch import nn

from litplug.bounds import (
    UnsupportedOperationError,
    crown_bounds,
    interval_bounds,
    linear_bounds,
    margin_bounds,
    margin_spec,
)
from litplug.bounds import bounded as litplug_bounded
from litplug.bounds.fused import ReLURelaxation
from litplug.bounds.relaxation import conv_transpose, conv_transpose_offset


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "residual"])
@pytest.mark.parametrize("eps", [0.01, 0.1])
def test_sound_on_10000_points_including_corners(name: str, eps: float) -> None:
    net = networks()[name]
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 8, 8, generator=g, dtype=torch.float64)
    lower, upper = x - eps, x + eps
    bounds = {m: crown_bounds(net, lower, upper, method=m) for m in ("crown", "crown-ibp")}
    for i in range(len(x)):
        points = samples(lower[i], upper[i], 10_000, g)
        with torch.no_grad():
            out = net(points)
        for method, (lo, up) in bounds.items():
            assert (out >= lo[i] - 1e-10).all() and (out <= up[i] + 1e-10).all(), (method, name, eps)
    ibp_lo, ibp_up = interval_bounds(net, lower, upper)
    assert (bounds["crown"][1] - bounds["crown"][0]).mean() < (ibp_up - ibp_lo).mean()


def test_every_operator_of_the_table_is_sound_and_exact_at_zero_width() -> None:
    torch.manual_seed(0)
    net = Mixed().eval().double()
    net.bn.running_mean.uniform_(-0.5, 0.5)
    x = torch.rand(3, 8, dtype=torch.float64)
    for method in ("crown", "crown-ibp"):
        lo, up = crown_bounds(net, x, x, method=method)
        torch.testing.assert_close(lo, net(x).detach(), rtol=0, atol=1e-12)
        torch.testing.assert_close(up, net(x).detach(), rtol=0, atol=1e-12)
        lo, up = crown_bounds(net, x - 0.05, x + 0.05, method=method)
        points = samples(x[0] - 0.05, x[0] + 0.05, 4000, torch.Generator().manual_seed(0))
        out = net(points).detach()
        assert (out >= lo[0] - 1e-10).all() and (out <= up[0] + 1e-10).all()


def test_spec_bounds_and_gradients() -> None:
    net = networks()["mlp"]
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([1, 2, 3, 4])
    spec = margin_spec(y, 10).double()
    lo, up = crown_bounds(net, x - 0.02, x + 0.02, spec=spec)
    assert lo.shape == up.shape == (4, 10) and not lo.requires_grad
    full_lo, full_up = crown_bounds(net, x - 0.02, x + 0.02)
    # the spec folded into the backward pass is never looser than subtracting output bounds
    naive = full_lo.gather(1, y[:, None]) - full_up
    assert (lo >= naive - 1e-12).all()
    lo, _ = crown_bounds(net, x - 0.02, x + 0.02, spec=spec, grad=True)
    lo.sum().backward()
    assert net[1].weight.grad is not None and net[1].weight.grad.abs().sum() > 0


def test_margin_bounds_methods() -> None:
    net = networks()["cnn_bn"].float()
    x, y = torch.rand(5, 1, 8, 8), torch.randint(0, 10, (5,))
    ibp = margin_bounds(net, x, y, 0.05)
    crown = margin_bounds(net, x, y, 0.05, method="crown")
    assert crown.shape == ibp.shape and (crown >= ibp - 1e-5).float().mean() > 0.95
    with pytest.raises(ValueError, match="`eps` must be >= 0"):
        margin_bounds(net, x, y, -0.1, method="crown")


# -- exact verification (MILP) -------------------------------------------------------------------


def exact_lower(net: nn.Sequential, lower: np.ndarray, upper: np.ndarray, c: np.ndarray) -> float:
    """``min c . net(x)`` over the box, exactly: a mixed-integer program with one binary per
    unstable ReLU and big-M constraints from interval bounds (Tjeng et al. 2019)."""
    layers = [m for m in net if isinstance(m, nn.Linear)]
    n_in = lower.size
    rows_lo: list[float] = []
    rows_hi: list[float] = []
    var_lo, var_hi, integer = list(lower), list(upper), [0] * n_in
    box_lo, box_hi = torch.tensor(lower)[None], torch.tensor(upper)[None]
    prev, size = 0, n_in
    count = n_in

    def new(k: int, lo: list[float], hi: list[float], kind: int) -> int:
        nonlocal count
        start = count
        count += k
        var_lo.extend(lo)
        var_hi.extend(hi)
        integer.extend([kind] * k)
        return start

    constraints: list[tuple[dict[int, float], float, float]] = []
    for i, layer in enumerate(layers):
        w, b = layer.weight.detach().double().numpy(), layer.bias.detach().double().numpy()
        sub = nn.Sequential(*list(net)[: list(net).index(layer) + 1])
        z_lo, z_hi = (t[0].numpy() for t in interval_bounds(sub, box_lo, box_hi))
        z = new(len(b), list(z_lo - 1e-9), list(z_hi + 1e-9), 0)
        for j in range(len(b)):  # z_j - W_j h = b_j
            constraints.append(({z + j: 1.0, **{prev + k: -w[j, k] for k in range(size)}}, b[j], b[j]))
        if i == len(layers) - 1:
            out = z
            break
        h = new(len(b), [0.0] * len(b), list(np.maximum(z_hi, 0)), 0)
        for j in range(len(b)):
            lo_j, hi_j = z_lo[j], z_hi[j]
            if lo_j >= 0:
                constraints.append(({h + j: 1.0, z + j: -1.0}, 0.0, 0.0))
            elif hi_j <= 0:
                constraints.append(({h + j: 1.0}, 0.0, 0.0))
            else:
                a = new(1, [0.0], [1.0], 1)
                constraints.append(({h + j: 1.0, z + j: -1.0}, 0.0, np.inf))  # h >= z
                constraints.append(({h + j: 1.0, z + j: -1.0, a: -lo_j}, -np.inf, -lo_j))  # h <= z - l (1 - a)
                constraints.append(({h + j: 1.0, a: -hi_j}, -np.inf, 0.0))  # h <= u a
        prev, size = h, len(b)
    matrix = np.zeros((len(constraints), count))
    for r, (coeffs, lo, hi) in enumerate(constraints):
        for k, v in coeffs.items():
            matrix[r, k] += v
        rows_lo.append(lo)
        rows_hi.append(hi)
    objective = np.zeros(count)
    objective[out : out + len(c)] = c
    res = milp(
        objective,
        constraints=LinearConstraint(matrix, rows_lo, rows_hi),
        integrality=np.array(integer),
        bounds=Bounds(var_lo, var_hi),
        options={"mip_rel_gap": 0.0},
    )
    assert res.status == 0, res.message
    return float(res.fun)


@torch.no_grad()
def test_ordering_against_exact_milp() -> None:
    """No bound is ever above the exact minimum, tightened or not, and the tightened bounds of
    :func:`crown_bounds` keep IBP <= CROWN-IBP <= CROWN <= exact on every lower margin bound. The
    papers' bounds (``tighten=False``) need not: neither of the first two relations is a theorem
    (the adaptive lower slope is a heuristic; CROWN's intermediate bounds are not always inside
    IBP's); on 144 margins (12 seeds) they are in order on 96.5%."""
    rows, above = [], 0
    for seed, eps in itertools.product(range(4), (0.05, 0.15)):
        torch.manual_seed(seed)
        net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
        x = torch.rand(3, 4, dtype=torch.float64)
        y = net(x).argmax(1)
        spec = margin_spec(y, 3).double()
        lower, upper = x - eps, x + eps
        ibp = margin_bounds(net, x, y, eps)
        crown_ibp = crown_bounds(net, lower, upper, "crown-ibp", spec)[0]
        crown = crown_bounds(net, lower, upper, "crown", spec)[0]
        raw = [linear_bounds(litplug_bounded(net), lower, upper, m, spec).lower for m in ("crown-ibp", "crown")]
        for i, j in itertools.product(range(3), range(3)):
            if j == y[i]:
                continue
            exact = exact_lower(net, lower[i].numpy(), upper[i].numpy(), spec[i, j].numpy())
            values = [float(ibp[i, j]), float(crown_ibp[i, j]), float(crown[i, j]), exact]
            above += sum(v > exact + 1e-6 for v in values[:3] + [float(r[i, j]) for r in raw])
            rows.append(all(a <= b + 1e-9 for a, b in itertools.pairwise(values)))
    assert above == 0
    assert all(rows), np.mean(rows)


# -- peer: auto_LiRPA 0.3 ------------------------------------------------------------------------


def _auto_lirpa(monkeypatch: pytest.MonkeyPatch):
    if importlib.util.find_spec("auto_LiRPA") is None:
        pytest.skip(
            "auto_LiRPA 0.3 is not installed (pip install --no-deps auto_LiRPA==0.3, see benchmarks/certified.py)"
        )
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "certified.py"
    spec = importlib.util.spec_from_file_location("litplug_benchmark_certified", path)
    assert spec is not None and spec.loader is not None
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    benchmark._torch_compat_for_auto_lirpa()
    import auto_LiRPA
    from auto_LiRPA.perturbations import PerturbationLpNorm

    # auto_LiRPA 0.3 overrides nn.Module._named_members without the remove_duplicate argument of
    # later torch; accept and drop it
    members = auto_LiRPA.BoundedModule._named_members
    monkeypatch.setattr(
        auto_LiRPA.BoundedModule,
        "_named_members",
        lambda self, fn, prefix="", recurse=True, **_: members(self, fn, prefix, recurse),
    )
    return auto_LiRPA, PerturbationLpNorm


@pytest.mark.parametrize("name", ["mlp", "cnn_bn", "residual_nopool"])
def test_equal_to_auto_lirpa(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    auto_lirpa, perturbation = _auto_lirpa(monkeypatch)
    net = networks()[name]
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    k = 5 if name.startswith("residual") else 10
    spec = margin_spec(torch.tensor([0, 3, 4]), k).double()
    # auto_LiRPA by default keeps the IBP bounds of neurons that IBP finds stable when at most 90%
    # of a Linear/Conv layer is unstable (a speed heuristic that makes its CROWN depend on IBP);
    # litplug's CROWN bounds every neuron by CROWN: compared with that heuristic off.
    opts = {"sparse_intermediate_bounds": False}
    bounded = auto_lirpa.BoundedModule(net, torch.zeros_like(x), bound_opts=opts, device="cpu")
    box = auto_lirpa.BoundedTensor(x, perturbation(norm=float("inf"), x_L=x - 0.05, x_U=x + 0.05))
    for ours, theirs in (("crown", "backward"), ("crown-ibp", "CROWN-IBP")):
        for c in (None, spec):
            expected = bounded.compute_bounds(x=(box,), method=theirs, C=c)
            with torch.no_grad():  # the papers' bounds: tighten=False
                raw = linear_bounds(litplug_bounded(net), x - 0.05, x + 0.05, ours, c)
            torch.testing.assert_close((raw.lower, raw.upper), expected, rtol=0, atol=1e-5)
            # crown_bounds tightens (intersections, the tighter of the final bounds): never looser
            lo, up = crown_bounds(net, x - 0.05, x + 0.05, method=ours, spec=c)
            assert (lo >= expected[0] - 1e-12).all() and (up <= expected[1] + 1e-12).all()


# -- errors ----------------------------------------------------------------------------------------


def test_errors_name_the_argument_or_the_node() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(18, 3))
    x = torch.rand(2, 1, 8, 8)
    with pytest.raises(UnsupportedOperationError, match=r"MaxPool2d at module '2' has no linear relaxation"):
        crown_bounds(net, x, x)
    mlp = nn.Sequential(nn.Linear(4, 3))
    x = torch.rand(2, 4)
    with pytest.raises(ValueError, match="`method` must be one of"):
        crown_bounds(mlp, x, x, method="ibp")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"`spec` must have shape \[batch, rows, outputs\] = \[2, S, 3\]"):
        crown_bounds(mlp, x, x, spec=torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="`lower` must be <= `upper`"):
        crown_bounds(mlp, x + 1, x)
    with pytest.raises(ValueError, match="same shape"):
        crown_bounds(mlp, x, x[:1])
    dropout = nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.5))
    with pytest.raises(UnsupportedOperationError, match="dropout in train mode"):
        crown_bounds(dropout, x, x)
    lo, up = crown_bounds(dropout.eval(), x, x)
    torch.testing.assert_close(lo, dropout(x).detach())


# -- the fused pieces of the backward pass --------------------------------------------------------


@pytest.mark.parametrize("channels_last", [False, True])
def test_relu_relaxation_equals_the_plain_formula_and_passes_gradcheck(channels_last: bool) -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 2, 2, 3, 2, generator=g, dtype=torch.float64)
    if channels_last:  # the layout of coefficients after a transposed convolution
        a = a.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (3, 2))
    a.requires_grad_()
    s_pos, s_neg, b = (torch.rand(2, 2, 3, 2, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    for lower in (True, False):
        out, const = ReLURelaxation.apply(a, s_pos, s_neg, b, lower)
        pos, neg = a.clamp(min=0), a.clamp(max=0)
        torch.testing.assert_close(out, pos * s_pos + neg * s_neg, rtol=0, atol=1e-15)
        torch.testing.assert_close(const, ((neg if lower else pos) * b).flatten(2).sum(2), rtol=1e-13, atol=0)
        assert torch.autograd.gradcheck(lambda *t, side=lower: ReLURelaxation.apply(*t, side), (a, s_pos, s_neg, b))
        # at A = 0 (a stably inactive neuron's coefficient) the gradient takes s_pos and, for a lower
        # bound, no intercept: autograd's choice for the plain formula with masks (A < 0)
        zero = a.detach().clone().index_fill_(4, torch.tensor([0]), 0.0).requires_grad_()
        g_out, g_const = torch.randn(3, 2, 2, 3, 2, generator=g, dtype=torch.float64), torch.randn(3, 2, generator=g)
        got = torch.autograd.grad(
            ReLURelaxation.apply(zero, s_pos, s_neg, b, lower), (zero, s_pos, s_neg, b), (g_out, g_const.double())
        )
        ref = zero.detach().clone().requires_grad_()
        negative = (ref < 0).double()
        picked = negative if lower else (ref > 0).double()
        plain = ref * (s_pos + negative * (s_neg - s_pos))
        plain_const = (ref * picked * b).flatten(2).sum(2)
        expected = torch.autograd.grad((plain, plain_const), (ref, s_pos, s_neg, b), (g_out, g_const.double()))
        for x, y in zip(got, expected):
            torch.testing.assert_close(x, y, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(2, 4, 3, stride=2, padding=1),
        nn.Conv2d(2, 4, (3, 2), stride=(2, 3), padding=(0, 1), dilation=(1, 2)),
        nn.Conv2d(2, 4, 3, padding="same", groups=2),
        nn.Conv2d(2, 4, 3, padding="valid"),
        nn.Conv1d(2, 4, 4, stride=3, padding=2),
        nn.Conv2d(2, 4, (3, 2), padding=(1, 0), dilation=(2, 1)),
        nn.Conv2d(4, 6, 3, padding=1, groups=2),
        nn.Conv2d(2, 4, 3, padding=(3, 1)),
        nn.Conv1d(2, 4, 3, padding=1),
    ],
)
def test_conv_transpose_is_the_adjoint_of_the_convolution(conv: nn.Module) -> None:
    conv = conv.double()
    x = torch.randn(2, conv.in_channels, *([9, 10] if isinstance(conv, nn.Conv2d) else [11]), dtype=torch.float64)
    out = conv(x)
    a = torch.randn(3, *out.shape, dtype=torch.float64)
    _, expected = torch.autograd.functional.vjp(lambda t: conv(t) - conv.bias.view(-1, *[1] * (x.dim() - 2)), x, a[1])
    got = conv_transpose(conv, conv.weight, a, x.shape)
    assert got.shape == (3, *x.shape)
    torch.testing.assert_close(got[1], expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "conv", [nn.Conv2d(2, 4, 3, stride=2, padding=1), nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Conv1d(2, 4, 3)]
)
def test_conv_transpose_offset_equals_its_two_parts_and_passes_gradcheck(conv: nn.Module) -> None:
    """The fused crossing of a conv (batch norm folded in) and its constant ``<A, shift>``."""
    conv = conv.double()
    x = torch.randn(2, conv.in_channels, *([5, 4] if isinstance(conv, nn.Conv2d) else [7]), dtype=torch.float64)
    a = torch.randn(2, *conv(x).shape, dtype=torch.float64, requires_grad=True)
    weight = conv.weight.detach().clone().requires_grad_()
    shift = torch.randn(conv.out_channels, dtype=torch.float64, requires_grad=True)
    moved, const = conv_transpose_offset(conv, weight, a, x.shape, shift)
    torch.testing.assert_close(moved, conv_transpose(conv, weight, a, x.shape), rtol=0, atol=1e-12)
    expected = (a * shift.view(-1, *[1] * (a.dim() - 3))).flatten(2).sum(2)
    torch.testing.assert_close(const, expected, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(
        lambda *t: conv_transpose_offset(conv, t[1], t[0], x.shape, t[2]), (a, weight, shift)
    )


def test_crown_ibp_gradients_through_train_mode_batch_norm_pass_gradcheck() -> None:
    """The backward pass as training differentiates it (batch norm folded into the conv, train-mode
    statistics of the clean batch, the fused ReLU relaxation), against finite differences."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(),
        nn.Linear(8, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 3),
    ).double()  # fmt: skip
    x = torch.rand(2, 1, 4, 4, dtype=torch.float64)
    spec = margin_spec(torch.tensor([0, 2]), 3).double()
    params = tuple(net.get_parameter(n) for n in ("0.weight", "1.weight", "4.weight", "5.weight", "7.weight"))

    def lower(*_: torch.Tensor) -> torch.Tensor:  # gradcheck perturbs the parameters in place
        return linear_bounds(litplug_bounded(net), x - 0.1, x + 0.1, "crown-ibp", spec, x, False).lower

    assert torch.autograd.gradcheck(lower, params)
