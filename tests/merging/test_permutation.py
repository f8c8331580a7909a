"""litplug.merging.permutation: the permutation spec read from fx, exact recovery of a
hand-permuted model, function preservation, weight matching, and refusals by name."""

import pytest
import torch
from torch import nn

from litplug.merging import (
    align,
    apply_permutations,
    permutation_spec,
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
