"""litplug.merging against its equations: weight matching (permutation spec from fx, exact
recovery of a hand-permuted model, function preservation), task arithmetic, TIES, barrier, MAP."""

import math

import pytest
import torch
from harness import read_scalars
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from litplug.merging import (
    align,
    apply_permutations,
    barrier,
    breadcrumbs,
    dare,
    della,
    fit_quadratic,
    grid_pareto_front,
    interpolate,
    linear,
    map_pareto_front,
    model_stock,
    pareto_mask,
    permutation_spec,
    slerp,
    task_arithmetic,
    ties_merge,
    weight_matching,
)
from litplug.modules import MLP, ConvNet


class Residual(nn.Module):
    """Conv stem, a residual block (conv-BN-ReLU-conv added to its input), pooling, flatten, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1)
        self.block = nn.Sequential(
            nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(), nn.Conv2d(5, 6, 3, padding=1)
        )
        self.bn = nn.BatchNorm2d(6)
        self.head = nn.Linear(6 * 16, 10)

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(self.bn(h + self.block(h)))
        return self.head(nn.functional.max_pool2d(h, 2).flatten(1))


MODELS = {
    "mlp_batchnorm": lambda: MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[12, 9], batch_norm=True),
    "convnet_flatten": lambda: ConvNet(input_shape=[1, 8, 8], num_outputs=10, channels=[4, 6], hidden=7),
    "residual": Residual,
}


def make(kind: str, seed: int) -> nn.Module:
    """A float64 model with non-trivial BatchNorm statistics and affine parameters."""
    torch.manual_seed(seed)
    model = MODELS[kind]().double()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
    return model.eval()


X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def test_spec_groups_follow_the_graph():
    spec = permutation_spec(make("residual", 0), X)
    # the stem's and the block's last conv outputs are added: one permutation; the block's inner conv its own
    assert sorted(spec.sources) == [["block.0"], ["stem", "block.3"]]
    residual = spec.groups[spec.sources.index(["stem", "block.3"])]
    names = {(a.name, a.axis, a.block) for a in residual}
    assert {
        ("bn.running_mean", 0, 1),
        ("bn.running_var", 0, 1),
        ("head.weight", 1, 16),
        ("block.0.weight", 1, 1),
    } <= names
    spec = permutation_spec(make("convnet_flatten", 0), X)
    assert spec.sizes == [4, 6, 7]  # the output layer is never permuted
    assert ("2.1.weight", 1, 16) in {
        (a.name, a.axis, a.block) for a in spec.groups[1]
    }  # 6 channels of 4x4 after Flatten


@pytest.mark.parametrize("kind", list(MODELS))
def test_hand_permuted_model_is_aligned_back_exactly_and_functions_are_preserved(kind):
    reference = make(kind, 0)
    spec = permutation_spec(reference, X)
    gen = torch.Generator().manual_seed(1)
    perms = [torch.randperm(n, generator=gen) for n in spec.sizes]
    permuted = make(kind, 0)
    permuted.load_state_dict(apply_permutations(reference.state_dict(), spec, perms))
    assert any(not torch.equal(v, permuted.state_dict()[k]) for k, v in reference.state_dict().items())
    torch.testing.assert_close(permuted(X), reference(X), rtol=1e-12, atol=1e-12)
    back = align(reference, permuted, X)
    for name, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    # an independently initialised model: same function after alignment, closer to the reference
    other = make(kind, 2)
    aligned = align(reference, other, X)
    torch.testing.assert_close(aligned(X), other(X), rtol=1e-12, atol=1e-12)
    dist = lambda m: sum((p - q).pow(2).sum() for p, q in zip(reference.parameters(), m.parameters()))  # noqa: E731
    assert dist(aligned) < dist(other)


def test_weight_matching_solves_a_single_assignment():
    """One hidden layer: the objective is sum_i <w_ref_i, w_other_perm(i)> over both layers, so
    the matched permutation maximises it among all 4! permutations."""
    import itertools

    torch.manual_seed(0)
    ref = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    other = nn.Sequential(nn.Flatten(), nn.Linear(64, 4), nn.ReLU(), nn.Linear(4, 3)).double()
    spec = permutation_spec(ref, X)
    (perm,) = weight_matching(ref.state_dict(), other.state_dict(), spec)
    sa, sb = ref.state_dict(), other.state_dict()

    def score(p):
        p = list(p)
        return float(
            (sa["1.weight"] * sb["1.weight"][p]).sum()
            + (sa["1.bias"] * sb["1.bias"][p]).sum()
            + (sa["3.weight"] * sb["3.weight"][:, p]).sum()
        )

    best = max(itertools.permutations(range(4)), key=score)
    assert perm.tolist() == list(best)


class Concat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.out = nn.Linear(64, 4), nn.Linear(64, 4), nn.Linear(8, 2)

    def forward(self, x):
        x = x.flatten(1)
        return self.out(torch.cat([self.a(x), self.b(x)], 1))


class Shared(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.mid, self.out = nn.Linear(64, 4), nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.mid(self.mid(self.inp(x.flatten(1)))))


@pytest.mark.parametrize(
    ("model", "match"),
    [
        (lambda: nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.LayerNorm(8), nn.Linear(8, 2)), "LayerNorm"),
        (Concat, "cat"),
        (Shared, "`mid` \\(Linear\\) is called twice"),
        (
            lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(64, 2)),
            "groups=2",
        ),
    ],
)
def test_unsupported_structures_are_refused_by_name(model, match):
    with pytest.raises(ValueError, match=match):
        permutation_spec(model().double(), X)


class EfficientNetLike(nn.Module):
    """Reads shapes the way timm's efficientnet / mobilenetv3 do: ``BatchNormAct2d`` asserts
    ``x.ndim == 4``, squeeze-excite scales by a shape-derived constant, the head flattens with
    ``x.size(0)`` and checks ``x.dim()``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_stem = nn.Conv2d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv = nn.Conv2d(6, 5, 3, padding=1)
        self.classifier = nn.Linear(5 * 16, 10)

    def forward(self, x):
        x = self.conv_stem(x)
        torch._assert(x.ndim == 4, "expected a 4-d input")
        x = torch.relu(self.bn1(x))
        x = self.conv(x) * x.shape[1] ** -0.5
        torch._assert(x.dim() == 4, "expected a 4-d input")
        x = nn.functional.max_pool2d(x, 2)
        return self.classifier(x.reshape(x.size(0), -1))


def test_shape_reads_pass_through():
    torch.manual_seed(0)
    reference = EfficientNetLike().double().eval()
    spec = permutation_spec(reference, X)
    assert sorted(spec.sizes) == [5, 6]
    permuted = EfficientNetLike().double().eval()
    perms = [torch.randperm(n, generator=torch.Generator().manual_seed(3)) for n in spec.sizes]
    permuted.load_state_dict(apply_permutations(reference.state_dict(), spec, perms))
    back = align(reference, permuted, X)
    for name, value in reference.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name
    other = EfficientNetLike().double().eval()
    torch.testing.assert_close(align(reference, other, X)(X), other(X), rtol=1e-12, atol=1e-12)


class Concatenating(nn.Module):
    def forward(self, x):
        return torch.cat([x, x], 1)


class Normed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x)


@pytest.mark.parametrize(
    ("block", "words"),
    [
        (Concatenating, "the concatenation torch.cat in module `blocks.0` (Concatenating.forward)"),
        (Normed, "the LayerNorm layer in module `blocks.0.norm`"),
    ],
)
def test_refusals_name_the_module_path_and_the_operation(block, words):
    model = nn.Sequential()
    model.add_module("flat", nn.Flatten())
    model.add_module("hidden", nn.Linear(64, 8))
    model.add_module("blocks", nn.Sequential(block()))
    model.add_module("head", nn.LazyLinear(2))
    model(X.float())
    with pytest.raises(ValueError) as err:
        permutation_spec(model.double(), X)
    assert words in str(err.value)


def test_unsupported_operation_on_the_output_is_accepted():
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 8), nn.ReLU(), nn.Linear(8, 3), nn.LogSoftmax(-1)).double()
    assert permutation_spec(model, X).sizes == [8]


def test_interpolate_and_task_arithmetic_closed_forms():
    base = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(4)}
    ft = [{"w": torch.tensor([2.0, 2.0]), "n": torch.tensor(9)}, {"w": torch.tensor([1.0, 5.0]), "n": torch.tensor(9)}]
    mid = interpolate(base, ft[0], 0.25)
    assert torch.equal(mid["w"], torch.tensor([1.25, 2.0])) and mid["n"] == 4
    merged = task_arithmetic(base, ft, 0.5)  # base + 0.5 * ([1, 0] + [0, 3])
    assert torch.equal(merged["w"], torch.tensor([1.5, 3.5])) and merged["n"] == 4
    merged = task_arithmetic(base, ft, [2.0, -1.0])
    assert torch.equal(merged["w"], torch.tensor([3.0, -1.0]))
    with pytest.raises(ValueError, match="one value per fine-tune"):
        task_arithmetic(base, ft, [1.0])
    with pytest.raises(ValueError, match="`scale` must be a finite number, got nan"):
        task_arithmetic(base, ft, float("nan"))


def test_ties_merge_hand_computed():
    """Two tensors, d = 5, density 0.6 -> keep k = 3 entries per task over the whole model.
    tau_1 = [3, -1, 2 | 0.2, 0]     -> trimmed [3, -1, 2 | 0, 0]
    tau_2 = [-1, -2, -2 | -0.4, 4]  -> trimmed [0, -2, -2 | 0, 4]
    sum = [3, -3, 0 | 0, 4] -> sign [+, -, 0 | 0, +]; zeros take sign(sum of signs) = +
    disjoint mean: [3, (-1-2)/2, 2 (only tau_1 agrees) | 0, 4] = [3, -1.5, 2 | 0, 4]; scale 0.5."""
    base = {"a": torch.zeros(3), "b": torch.ones(2), "n": torch.tensor(5)}
    ft1 = {"a": torch.tensor([3.0, -1.0, 2.0]), "b": torch.tensor([1.2, 1.0]), "n": torch.tensor(7)}
    ft2 = {"a": torch.tensor([-1.0, -2.0, -2.0]), "b": torch.tensor([0.6, 5.0]), "n": torch.tensor(9)}
    merged = ties_merge(base, [ft1, ft2], density=0.6, scale=0.5)
    assert torch.equal(merged["a"], torch.tensor([1.5, -0.75, 1.0]))
    assert torch.equal(merged["b"], torch.tensor([1.0, 3.0]))
    assert merged["n"] == 5 and merged["n"].dtype == torch.int64
    # density 1 keeps everything: entry-wise mean of the agreeing task-vector entries
    merged = ties_merge(base, [ft1, ft2], density=1.0)
    torch.testing.assert_close(merged["b"], torch.tensor([0.6, 5.0]))  # 0.2 - 0.4 < 0: only tau_2's -0.4 agrees
    with pytest.raises(ValueError, match=r"`density` must be in \(0, 1\], got 0"):
        ties_merge(base, [ft1], density=0)


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


def test_map_quadratic_fit_is_exact_on_a_quadratic_and_fronts_agree():
    def metrics(c):
        c1, c2 = c
        return [1 - (c1 - 0.8) ** 2 - 0.5 * c2**2 + 0.1 * c1 * c2, 1 - (c2 - 0.7) ** 2 - 0.3 * c1**2]

    coeffs = torch.rand(8, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    fit = fit_quadratic(coeffs, torch.tensor([metrics(c.tolist())[0] for c in coeffs]))
    probe = torch.rand(50, 2, dtype=torch.float64)
    torch.testing.assert_close(fit(probe), torch.tensor([metrics(c.tolist())[0] for c in probe], dtype=torch.float64))
    assert fit.r2 == pytest.approx(1.0)
    with pytest.raises(ValueError, match="needs >= 6 evaluations, got 5"):
        fit_quadratic(coeffs[:5], torch.zeros(5))

    calls = []
    counted = lambda c: calls.append(c) or metrics(c)  # noqa: E731
    front = map_pareto_front(counted, 2, num_evaluations=6, candidates=500)
    assert front.evaluations == len(calls) == 6
    # every predicted front point is exact and non-dominated among the grid's measured points
    measured = torch.tensor([metrics(c.tolist()) for c in front.coefficients], dtype=torch.float64)
    torch.testing.assert_close(front.values, measured)
    grid = grid_pareto_front(metrics, 2, points=11)
    assert grid.evaluations == 121
    both = torch.cat([measured, grid.values])
    assert pareto_mask(both)[: len(measured)].float().mean() > 0.9


def test_pareto_mask():
    v = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [0.4, 0.4], [1.0, 0.0]])
    assert pareto_mask(v).tolist() == [True, True, True, False, True]
    assert pareto_mask(v, maximize=False).tolist() == [True, True, False, True, True]


def test_ties_keeps_exactly_k_entries_of_quantised_task_vectors():
    """bf16-quantised task vectors have many equal magnitudes: each task keeps exactly
    int(density * d) entries, the earliest among those tied with the k-th largest."""
    gen = torch.Generator().manual_seed(0)
    d = 875
    base = {"a": torch.zeros(500), "b": torch.zeros(25, 15)}
    fts = [
        {k: (torch.randn(v.shape, generator=gen) * 4).round() / 4 for k, v in base.items()} for _ in range(2)
    ]  # 0.25-steps: ~30 distinct magnitudes
    for density in (0.5, 0.3):
        k = int(density * d)
        for trim in ("model", "tensor"):
            for ft in fts:
                # a single task: the merge is the trimmed task vector itself
                merged = ties_merge(base, [ft], density=density, trim=trim)
                kept = {n: merged[n] != 0 for n in base}
                nonzero = sum(int((ft[n] != 0).sum()) for n in base)
                if trim == "model":
                    assert sum(int(m.sum()) for m in kept.values()) == min(k, nonzero)
                    flat = torch.cat([ft[n].flatten() for n in base]).abs()
                else:
                    for n, v in base.items():
                        assert int(kept[n].sum()) == min(int(density * v.numel()), int((ft[n] != 0).sum()))
                    flat = ft["a"].abs()
                    k = int(density * 500)
                # the kept set: every magnitude above the k-th largest, then the earliest ties
                threshold = flat.sort(descending=True).values[k - 1]
                mask = torch.cat([kept[n].flatten() for n in base])[: flat.numel()]
                assert bool(mask[flat > threshold].all())
                tied = (flat == threshold).nonzero().flatten()
                n_tied = int(mask[tied].sum())
                assert mask[tied[:n_tied]].all() and not mask[tied[n_tied:]].any()
                k = int(density * d)


def test_ties_trim_per_tensor_differs_from_whole_model():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    ft = {"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    assert torch.equal(ties_merge(base, [ft], 0.5)["b"], torch.zeros(4))  # the 4 largest are all in `a`
    assert torch.equal(ties_merge(base, [ft], 0.5, trim="tensor")["b"], torch.tensor([0.0, 0.0, 3.0, 4.0]))
    with pytest.raises(ValueError, match="`trim` must be one of"):
        ties_merge(base, [ft], 0.5, trim="layer")


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 6), nn.BatchNorm1d(6), nn.ReLU(), nn.Linear(6, 3)).double()


MERGES = {
    "interpolate": lambda a, b, c: interpolate(a, b, 0.3),
    "linear": lambda a, b, c: linear([a, b, c], [1.0, 2.0, 3.0]),
    "task_arithmetic": lambda a, b, c: task_arithmetic(a, [b, c], 0.5),
    "ties_merge": lambda a, b, c: ties_merge(a, [b, c], 0.5),
    "apply_permutations": lambda a, b, c: apply_permutations(a, permutation_spec(_mlp(0), X), [torch.arange(6)]),
    "align": lambda a, b, c: align(_mlp(1), a, X),  # the kind of `other`
}


@pytest.mark.parametrize("merge", list(MERGES))
def test_merges_take_modules_or_state_dicts_and_return_the_kind_given(merge):
    modules = [_mlp(s) for s in range(3)]
    for m in modules:
        m[2].running_mean.normal_()
    states = [m.state_dict() for m in modules]
    from_states = MERGES[merge](*states)
    assert isinstance(from_states, dict)
    from_modules = MERGES[merge](*modules)
    assert isinstance(from_modules, nn.Sequential) and from_modules is not modules[0]
    for name, value in from_states.items():
        assert torch.equal(from_modules.state_dict()[name], value), name
    mixed = MERGES[merge](states[0], *modules[1:])  # the first argument decides the kind
    assert isinstance(mixed, dict)
    for module, state in zip(modules, [m.state_dict() for m in [_mlp(s) for s in range(3)]]):
        assert torch.equal(module[1].weight, state["1.weight"])  # inputs unchanged


def test_align_and_barrier_need_one_module():
    a, b = _mlp(0).state_dict(), _mlp(1).state_dict()
    with pytest.raises(TypeError, match="pass `reference` or `other` as an nn.Module"):
        align(a, b, X)
    with pytest.raises(TypeError, match="`other` must be an nn.Module or a state dict"):
        align(_mlp(0), [1, 2], X)
    data = [(X, torch.zeros(16, dtype=torch.long))]
    r = barrier(a, _mlp(1), data, alphas=3)
    assert r.loss[-1] == pytest.approx(barrier(_mlp(0), _mlp(1), data, alphas=3).loss[-1])
    with pytest.raises(TypeError, match="pass `model_a` or `model_b` as an nn.Module"):
        barrier(a, b, data)


def test_slerp_closed_form_and_near_parallel_fallback():
    a, b = {"w": torch.tensor([2.0, 0.0]), "n": torch.tensor(1)}, {"w": torch.tensor([0.0, 1.0]), "n": torch.tensor(2)}
    # orthogonal: theta = pi/2, coefficients sin((1-t) pi/2) and sin(t pi/2) on the unnormalised tensors
    out = slerp(a, b, 1 / 3)
    torch.testing.assert_close(out["w"], torch.tensor([2 * math.cos(math.pi / 6), math.sin(math.pi / 6)]))
    assert out["n"] == 1
    near = {"w": torch.tensor([2.0, 0.01]), "n": torch.tensor(3)}  # cos = 0.99999: linear interpolation
    torch.testing.assert_close(slerp(a, near, 0.25)["w"], torch.lerp(a["w"], near["w"], 0.25))
    for t in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="`t` must"):
            slerp(a, b, t)


def test_model_stock_ratio():
    """Two offsets at 60 degrees: cos = 0.5, t = 2 * 0.5 / (1 + 0.5) = 2/3 of the way to their mean."""
    base = {"w": torch.zeros(2)}
    fts = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([0.5, math.sqrt(3) / 2])}]
    torch.testing.assert_close(model_stock(base, fts)["w"], 2 / 3 * (fts[0]["w"] + fts[1]["w"]) / 2)
    with pytest.raises(ValueError, match="at least two models for model stock, got 1"):
        model_stock(base, fts[:1])


def test_dare_is_seeded_unbiased_and_keeps_the_density():
    base = {"w": torch.zeros(20_000)}
    ft = {"w": torch.linspace(-1, 1, 20_000)}
    one, same = dare(base, [ft], 0.3, seed=1), dare(base, [ft], 0.3, seed=1)
    assert torch.equal(one["w"], same["w"]) and not torch.equal(one["w"], dare(base, [ft], 0.3, seed=2)["w"])
    kept = one["w"] != 0
    assert abs(kept.float().mean().item() - 0.3) < 5 * (0.21 / 20_000) ** 0.5
    torch.testing.assert_close(one["w"][kept], ft["w"][kept] / 0.3)
    means = torch.stack([dare(base, [ft], 0.3, seed=s)["w"] for s in range(200)]).mean(0)
    assert (means - ft["w"]).abs().mean() < 0.1  # E[merge] = base + tau
    with pytest.raises(TypeError, match="`seed` must be an int"):
        dare(base, [ft], 0.3, seed=None)


def test_breadcrumbs_drops_outliers_and_small_entries():
    base = {"w": torch.zeros(10)}
    ft = {"w": torch.arange(1.0, 11.0)}
    out = breadcrumbs(base, [ft], density=0.5, gamma=0.2)["w"]  # drop 10, 9; keep 8..4; drop 3..1
    assert torch.equal(out, torch.tensor([0.0, 0, 0, 4, 5, 6, 7, 8, 0, 0]))


BAD_INPUTS = [
    (lambda b, f: ties_merge(b, [f], density=0.0), ValueError, r"`density` must be in \(0, 1\], got 0.0"),
    (lambda b, f: ties_merge(b, [f], density=1.5), ValueError, r"`density` must be in \(0, 1\]"),
    (lambda b, f: dare(b, [f], density=0.0, seed=0), ValueError, r"`density` must be in \(0, 1\]"),
    (lambda b, f: breadcrumbs(b, [f], density=2.0), ValueError, r"`density` must be in \(0, 1\]"),
    (lambda b, f: breadcrumbs(b, [f], gamma=1.0), ValueError, r"`gamma` must be in \[0, 1\)"),
    (lambda b, f: della(b, [f], 0.5, 0.6, seed=0), ValueError, "`epsilon` must keep"),
    (lambda b, f: slerp(b, f, 2.0), ValueError, r"`t` must be in \[0, 1\], got 2.0"),
    (lambda b, f: model_stock(b, [f]), ValueError, "at least two models"),
    (lambda b, f: task_arithmetic(b, [], 1.0), ValueError, "`finetuned` must hold at least one"),
    (lambda b, f: linear([b, f], [1.0]), ValueError, "one value per model"),
    (lambda b, f: task_arithmetic(b, [{"v": f["w"]}]), ValueError, "'v' is in one only|'w' is in one only"),
    (lambda b, f: ties_merge(b, [{"w": torch.zeros(5)}]), ValueError, r"\['w'\] has shape \(5,\), expected \(4,\)"),
    (lambda b, f: task_arithmetic(b, f), TypeError, "`finetuned` must be a list of modules or state dicts"),
    (lambda b, f: interpolate(b, [1], 0.5), TypeError, "`b` must be an nn.Module or a state dict"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUTS)
def test_bad_inputs_name_the_argument_or_key(call, error, match):
    with pytest.raises(error, match=match):
        call({"w": torch.zeros(4)}, {"w": torch.ones(4)})
