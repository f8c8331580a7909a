"""litplug.merging.states: every merge takes modules or state dicts and returns the kind
given; bad inputs name the argument or the key."""

import pytest
import torch
from torch import nn

from litplug.merging import (
    align,
    apply_permutations,
    barrier,
    breadcrumbs,
    dare,
    della,
    interpolate,
    linear,
    model_stock,
    permutation_spec,
    slerp,
    task_arithmetic,
    ties_merge,
)
from litplug.merging.states import check_states

X = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


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
    (lambda b, f: task_arithmetic(b, [{"v": f["w"]}]), ValueError, r"`states`\[1\]: 'w' \(shape \(4,\)\) is missing"),
    (
        lambda b, f: ties_merge(b, [{"w": torch.zeros(5)}]),
        ValueError,
        r"\[1\]: 'w' has shape \(5,\), expected \(4,\)",
    ),
    (lambda b, f: task_arithmetic(b, f), TypeError, "`finetuned` must be a list of modules or state dicts"),
    (lambda b, f: interpolate(b, [1], 0.5), TypeError, "`b` must be an nn.Module or a state dict"),
]


@pytest.mark.parametrize(("call", "error", "match"), BAD_INPUTS)
def test_bad_inputs_name_the_argument_or_key(call, error, match):
    with pytest.raises(error, match=match):
        call({"w": torch.zeros(4)}, {"w": torch.ones(4)})


def test_check_states_names_the_state_and_the_first_difference():
    ref = {"a.weight": torch.zeros(2, 3), "b.bias": torch.zeros(2)}
    labels = ["the backbone", "checkpoint x.pt"]
    with pytest.raises(ValueError, match=r"^checkpoint x.pt: 'a.weight' has shape \(3, 3\), expected \(2, 3\)"):
        check_states([ref, {"a.weight": torch.zeros(3, 3), "b.bias": torch.zeros(2)}], labels=labels)
    with pytest.raises(ValueError, match=r"'b.bias' \(shape \(2,\)\) is missing; the backbone has it"):
        check_states([ref, {"a.weight": torch.zeros(2, 3)}], labels=labels)
    with pytest.raises(ValueError, match=r"unexpected 'c' \(shape \(1,\)\), not in the backbone"):
        check_states([ref, {**ref, "c": torch.zeros(1)}], labels=labels)
    with pytest.raises(ValueError, match=r"^`models`\[2\]: 'b.bias' has shape"):
        check_states([ref, ref, {**ref, "b.bias": torch.zeros(3)}], "models")
