"""The bad-input matrix: every public constructor argument of every public class of
``litplug.callbacks``, ``litplug.modules`` and ``litplug.datamodules`` against wrong types, NaN,
+-inf, zero, negative and out-of-range values.

The rows come from each argument's annotation (``inspect.signature`` + ``typing.get_type_hints``):

* type rows (a string number, a bool, ``None`` where the annotation has no ``None``, a float for an
  int, a string for a module or callable) must raise ``TypeError`` naming the argument;
* value rows (NaN, +-inf, 0, -1, just outside ``SPEC``'s range, an unknown choice, an empty string
  or list, a bad list element) must raise ``ValueError`` naming the argument, unless ``SPEC``
  marks the row accepted, with the reason it is meaningful.

``SPEC`` holds one entry per argument, keyed by the class that defines the ``__init__``;
``test_every_public_argument_has_a_row`` fails when an argument is added without one.
``COMBINATIONS`` holds the bad values no generated row reaches: a range set by another argument or
by the data, a structured value (an optimizer, a transition matrix), a required pairing.
Constructors only: nothing is fitted. This file is the one place that checks bad constructor
arguments of the public classes.
"""

from __future__ import annotations

import collections.abc
import inspect
import math
import types
import typing
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import pytest
import torch
from torch import nn

import litplug.callbacks
import litplug.datamodules
import litplug.modules

SEED = "any int seeds a torch.Generator (negative ones too)"


@dataclass(frozen=True)
class Arg:
    """Accepted range of one argument (numbers: ``[low, high]``, ends open as flagged) and the
    value rows that are accepted, each with the reason the value is meaningful."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    ok: dict[str, str] = field(default_factory=dict)


UNIT_OPEN = Arg(0, 1, low_open=True, high_open=True)
FRACTION = Arg(0, 1, low_open=True, high_open=True)
POSITIVE = Arg(0, low_open=True)
COUNT = Arg(1)
ANY = Arg()
NUM_WORKERS = Arg(0, ok={"zero": "0 loads data in the main process"})
LABEL_NOISE = Arg(0, 1, high_open=True, ok={"zero": "0 keeps the labels clean"})
CLASSES = Arg(2)
SEED_ARG = Arg(ok={"zero": SEED, "negative": SEED})

SPEC: dict[str, dict[str, Arg]] = {
    "DataPruning": {
        "score": ANY,
        "keep": Arg(0, 1, low_open=True),
        "score_epoch": Arg(0, ok={"zero": "0 scores after the first epoch"}),
        "offset": Arg(0, 0.5, ok={"zero": "0 keeps the hardest samples"}),  # [0, 1 - keep], keep=0.5
        "batch_size": COUNT,
        "seeds": COUNT,
    },
    "ELR": {"beta": Arg(0, 1, high_open=True, ok={"zero": "0 makes the targets the last prediction"}), "lam": POSITIVE},
    "PSKD": {"alpha": Arg(0, 1, low_open=True), "end_epoch": COUNT},
    "EMA": {
        "decay": UNIT_OPEN,
        "warmup": ANY,
        "warmup_gamma": POSITIVE,
        "warmup_power": POSITIVE,
        "start_step": Arg(0, ok={"zero": "0 updates from the first optimizer step"}),
        "every_n_steps": COUNT,
        "dtype": ANY,
        "device": ANY,
        "evaluate_with": ANY,
        "final_weights": ANY,
        "export_path": ANY,
    },
    "CheckpointSoup": {"k": COUNT, "final_weights": ANY},
    "WiSEFT": {
        "alpha": Arg(
            ok={
                "zero": "0 is the starting weights",
                "negative": "extrapolation beyond the start (the paper's appendix)",
                "item_zero": "0 among the candidates is the starting weights",
                "item_negative": "a negative candidate extrapolates",
            }
        )
    },
    "SWA": {
        "start_epoch": Arg(0, 1, high_open=True, ok={"zero": "0.0 averages from the first epoch"}),
        "every_n_epochs": COUNT,
        "update_bn": ANY,
        "swa_lrs": POSITIVE,
        "annealing_epochs": Arg(0, ok={"zero": "0 switches to swa_lrs at once, as SWALR(anneal_epochs=0)"}),
        "annealing_strategy": ANY,
        "dtype": ANY,
        "device": ANY,
        "evaluate_with": ANY,
        "final_weights": ANY,
        "export_path": ANY,
    },
    "BoundTightness": {"every_n_epochs": COUNT, "num_samples": COUNT},
    "IBPWarmup": {
        "start_epoch": Arg(0, ok={"zero": "0 starts the ramp at once, without natural epochs"}),
        "ramp_epochs": COUNT,
        "schedule": ANY,
        "mid": UNIT_OPEN,
        "beta": Arg(1),
        "ibp_init": ANY,
        "regularizer_weight": Arg(0, ok={"zero": "0 disables the warmup regularizers"}),
        "regularizer_tolerance": Arg(0, 1, low_open=True),
    },
    "GradientAscentSearch": {
        "num_designs": COUNT,
        "steps": Arg(0, ok={"zero": "0 steps scores the starting designs"}),
        "step_size": POSITIVE,
        "init": ANY,
        "seed": SEED_ARG,
    },
    "SAM": {
        "rho": POSITIVE,
        "adaptive": ANY,
        "penalty_weight": Arg(0, 1, low_open=True),
        "every_n_steps": COUNT,
        "start_step": Arg(0, ok={"zero": "0 perturbs from the first training step"}),
        "sync_first_pass": ANY,
        "exclude": Arg(ok={"empty": "no pattern: every parameter is perturbed"}),
        "freeze_bn_stats": ANY,
        "eta": Arg(0, ok={"zero": "eta 0 is T = |w| (pytorch_optimizer's adaptive rule)"}),
    },
    "SurrogateSharpness": {
        "rho": POSITIVE,
        "radius": POSITIVE,
        "epsilon": Arg(0, ok={"zero": "0 allows no sharpness (the strictest constraint)"}),
        "lambda_init": Arg(0, ok={"zero": "0 starts without the penalty"}),
        "lambda_lr": Arg(0, ok={"zero": "0 keeps the multiplier at lambda_init"}),
        "adaptive_lambda": ANY,
        "input_index": Arg(
            ok={
                "zero": "0 is the first element of a tuple batch",
                "negative": "-1 counts from the end, as Python indexing does",
                "empty": "a str is a key of a dict batch; any str can be one",
            }
        ),
        "start_step": Arg(0, ok={"zero": "0 constrains from the first training step"}),
    },
    "SharpnessMonitor": {"every_n_epochs": COUNT, "rho": POSITIVE, "layerwise": ANY, "num_batches": COUNT},
    "UnlearningMask": {
        "criterion": ANY,
        "ratio": Arg(0, 1, low_open=True),
        "scope": ANY,
        "mu": POSITIVE,
        "num_batches": COUNT,
        "seed": SEED_ARG,
    },
    "TrainingModule": {"backbone": ANY, "optimizer": ANY, "lr_scheduler": ANY},
    "Classifier": {"backbone": ANY, "num_classes": CLASSES, "optimizer": ANY, "lr_scheduler": ANY},
    "CertifiedClassifier": {
        "backbone": ANY,
        "num_classes": CLASSES,
        "eps": Arg(0, ok={"zero": "eps 0 is natural training with the certified metrics logged"}),
        "kappa_final": Arg(0, 1, ok={"zero": "0 trains on the robust loss alone at full eps"}),
        "pgd_steps": Arg(0, ok={"zero": "0 disables the PGD attack"}),
        "mean": Arg(
            ok={
                "item_zero": "a channel mean of 0 leaves the channel uncentred",
                "item_negative": "a mean may be negative",
            }
        ),
        "std": ANY,
        "pixel_range": ANY,
        "tightness_every_n_epochs": Arg(0, ok={"zero": "0 disables the tightness log"}),
        "bound": ANY,  # a choice: tests/modules/test_certified.py::test_crown_ibp_objective
        "optimizer": ANY,
        "lr_scheduler": ANY,
    },
    "MLP": {
        "input_shape": ANY,
        "num_outputs": COUNT,
        "hidden": Arg(ok={"empty": "no hidden layer: a linear model"}),
        "activation": ANY,
        "batch_norm": ANY,
        "dropout": Arg(0, 1, high_open=True, ok={"zero": "0 disables dropout"}),
    },
    "ConvNet": {
        "input_shape": ANY,
        "num_outputs": COUNT,
        "channels": ANY,
        "hidden": COUNT,
        "activation": ANY,
        "batch_norm": ANY,
    },
    "CNN7": {"input_shape": ANY, "num_outputs": COUNT, "width": COUNT, "linear_size": COUNT},
    "Regressor": {"backbone": ANY, "loss": ANY, "optimizer": ANY, "lr_scheduler": ANY},
    "ModelMerge": {
        "backbone": ANY,
        "checkpoints": ANY,
        "recipe": ANY,
        "base": ANY,
        "scale": Arg(
            ok={
                "zero": "scale 0 returns the base",
                "negative": "a negative scale subtracts task vectors (negation)",
                "item_zero": "a 0 in the searched scales is the base",
                "item_negative": "a negative searched scale is task negation",
            }
        ),
        "density": Arg(0, 1, low_open=True),
        "gamma": Arg(0, 1, high_open=True, ok={"zero": "0 drops no large magnitudes"}),
        "seed": SEED_ARG,
        "align": ANY,
        "metric": ANY,
        "num_classes": CLASSES,
        "output_path": ANY,
    },
    "ModelSoup": {
        "backbone": ANY,
        "checkpoints": ANY,
        "recipe": ANY,
        "metric": ANY,
        "num_classes": CLASSES,
        "output_path": ANY,
    },
    "Unlearner": {
        "backbone": ANY,
        "checkpoint": ANY,
        "method": ANY,
        "num_classes": CLASSES,
        "gamma": Arg(0, ok={"zero": "0 drops the retain term"}),
        "beta": POSITIVE,
        "alpha": Arg(0, ok={"zero": "0 drops the L1 term"}),
        "seed": SEED_ARG,
        "optimizer": ANY,
        "lr_scheduler": ANY,
        "objective": ANY,
        "trust_checkpoint": ANY,
        "delta": Arg(0, ok={"zero": "0 is SimNPO's margin-free default"}),
        "layer": ANY,
        "steering": POSITIVE,
        "rmu_modules": ANY,
    },
    "CausalTransformer": {
        "vocab_size": Arg(2),
        "max_len": Arg(2),
        "dim": COUNT,
        "depth": COUNT,
        "heads": COUNT,
        "mlp_ratio": COUNT,
        "dropout": Arg(0, 1, high_open=True, ok={"zero": "0 disables dropout"}),
    },
    "LanguageModel": {"backbone": ANY, "optimizer": ANY, "lr_scheduler": ANY},
    "FictitiousQA": {
        "num_entities": Arg(20, 520),
        "forget_percent": Arg(1, 10),
        "num_perturbed": Arg(1, 5),
        "exclude_forget": ANY,
        "batch_size": COUNT,
        "seed": SEED_ARG,
        "num_workers": NUM_WORKERS,
    },
    "SISA": {
        "make_module": ANY,
        "dataset": ANY,
        "num_shards": COUNT,
        "seed": SEED_ARG,
        "batch_size": COUNT,
        "max_epochs": COUNT,
        "accelerator": ANY,
    },
    "UnlearningEvaluation": {
        "retain_checkpoint": ANY,
        "every_n_epochs": COUNT,
        "on_validation": ANY,
        "batch_size": COUNT,
    },
    "MarkovText": {
        "vocab_size": Arg(2),
        "seq_len": Arg(2),
        "num_train": Arg(2),
        "num_val": COUNT,
        "num_test": COUNT,
        "num_marked": Arg(1, 255),  # below the default num_train=256
        "marked_repeats": COUNT,
        "sharpness": POSITIVE,
        "batch_size": COUNT,
        "seed": SEED_ARG,
        "num_workers": NUM_WORKERS,
    },
    "TensorDataModule": {
        "batch_size": COUNT,
        "val_fraction": FRACTION,
        "label_noise": LABEL_NOISE,
        "seed": SEED_ARG,
        "num_workers": NUM_WORKERS,
    },
    "Digits": {
        "batch_size": COUNT,
        "val_fraction": FRACTION,
        "test_fraction": FRACTION,
        "label_noise": LABEL_NOISE,
        "seed": SEED_ARG,
        "num_workers": NUM_WORKERS,
    },
    "DigitsTasks": {
        "tasks": ANY,
        "train_task": Arg(0, 1, ok={"zero": "task 0 is the first of `tasks`"}),  # two tasks by default
        "batch_size": COUNT,
        "val_fraction": FRACTION,
        "test_fraction": FRACTION,
        "seed": SEED_ARG,
        "num_workers": NUM_WORKERS,
    },
    "ForgetRetain": {
        "datamodule": ANY,
        "scenario": ANY,
        "forget_classes": Arg(ok={"item_zero": "class 0 exists in every dataset"}),
        "forget_fraction": FRACTION,
        "seed": SEED_ARG,
        "label_fn": ANY,
        "held_out": ANY,
        "batch_size": COUNT,
    },
    "Indexed": {"datamodule": ANY, "seed": SEED_ARG},
    "NoisyLabels": {
        "datamodule": ANY,
        "rate": LABEL_NOISE,
        "kind": ANY,
        "num_classes": CLASSES,
        "seed": SEED_ARG,
        "transition": ANY,
    },
    "OfflineDesigns": {
        "task": ANY,
        "dim": COUNT,
        "num_samples": Arg(20),
        "keep_percentile": Arg(0, 100, low_open=True, high_open=True),
        "val_fraction": FRACTION,
        "batch_size": COUNT,
        "seed": SEED_ARG,
        "num_workers": NUM_WORKERS,
    },
    "SyntheticClassification": {
        "num_samples": Arg(16),  # 4 samples per class of the default num_classes=4
        "input_shape": ANY,
        "num_classes": CLASSES,
        "separation": Arg(0, ok={"zero": "0 puts every class on one centre: a chance-level control"}),
        "batch_size": COUNT,
        "val_fraction": FRACTION,
        "test_fraction": FRACTION,
        "label_noise": LABEL_NOISE,
        "seed": SEED_ARG,
        "num_workers": NUM_WORKERS,
    },
    "_FolderDataModule": {
        "root": ANY,
        "download": ANY,
        "batch_size": COUNT,
        "val_fraction": FRACTION,
        "label_noise": LABEL_NOISE,
        "seed": SEED_ARG,
        "num_workers": NUM_WORKERS,
    },
}


def public_classes() -> list[type]:
    found = []
    for package in (litplug.callbacks, litplug.modules, litplug.datamodules):
        for name in package.__all__:
            obj = getattr(package, name)
            if inspect.isclass(obj):
                found.append(obj)
    return found


def owner(cls: type) -> str:
    """The class whose ``__init__`` ``cls`` uses (a subclass without its own ``__init__`` uses its parent's)."""
    return cls.__init__.__qualname__.split(".")[0]


def public_arguments(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls.__init__)
    params = inspect.signature(cls.__init__).parameters.values()
    return {
        p.name: hints[p.name]
        for p in params
        if p.name != "self" and not p.name.startswith("_") and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }


# ------------------------------------------------------------------------------ row generation
def _members(annotation: Any) -> tuple[list[Any], bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return [a for a in args if a is not type(None)], type(None) in args
    return [annotation], False


def _accepts_type(value: Any, member: Any) -> bool:
    origin = typing.get_origin(member)
    if member is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if member is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if member is bool or member is str:
        return type(value) is member
    if origin is typing.Literal:
        return any(type(value) is type(c) for c in typing.get_args(member))
    if origin in (list, tuple, collections.abc.Sequence):
        return isinstance(value, (list, tuple))
    if origin is collections.abc.Callable or member is collections.abc.Callable:
        return callable(value)
    if inspect.isclass(member):
        return isinstance(value, member)
    raise AssertionError(f"no rows for the annotation {member!r}: extend test_bad_inputs.py")


def _item_type(member: Any) -> Any:
    args = typing.get_args(member)
    return args[0] if args else Any


def rows(annotation: Any, spec: Arg) -> list[tuple[str, Any, type | None]]:
    """``(label, value, expected)`` with ``expected`` TypeError, ValueError or None (accepted)."""
    members, optional = _members(annotation)
    out: list[tuple[str, Any, type | None]] = []
    for label, value in (("string_number", "1"), ("bool", True), ("none", None), ("float_for_int", 1.5)):
        if value is None and optional:
            out.append(("none", None, None))  # the annotation's documented "not set"
        elif not any(_accepts_type(value, m) for m in members):
            out.append((label, value, TypeError))
    value_rows: list[tuple[str, Any]] = []
    numeric = [m for m in members if m in (int, float)]
    if numeric:
        is_float = float in numeric
        one = 1.0 if is_float else 1
        if is_float:
            value_rows += [("nan", math.nan), ("+inf", math.inf), ("-inf", -math.inf)]
        value_rows += [("zero", 0 * one), ("negative", -one)]
        if spec.low is not None:
            value_rows.append(("below", spec.low - (0.5 if is_float else 1)))
            if spec.low_open:
                value_rows.append(("at_low", spec.low * one))
        if spec.high is not None:
            value_rows.append(("above", spec.high + one))
            if spec.high_open:
                value_rows.append(("at_high", spec.high * one))
    for m in members:
        origin = typing.get_origin(m)
        if origin is typing.Literal:
            value_rows.append(("unknown_choice", "no_such_choice"))
        elif m is str:
            value_rows.append(("empty", ""))
        elif origin in (list, tuple, collections.abc.Sequence):
            item = _item_type(m)
            value_rows += [("empty", []), ("item_type", [object()])]
            if item is float:
                value_rows += [
                    ("item_nan", [math.nan]),
                    ("item_inf", [math.inf]),
                    ("item_zero", [0.0]),
                    ("item_negative", [-1.0]),
                ]
            elif item is int:
                value_rows += [("item_zero", [0]), ("item_negative", [-1])]
            elif item is str:
                value_rows.append(("item_empty", [""]))
    seen: list[Any] = []
    for label, value in value_rows:
        if any(type(value) is type(v) and (value == v or (value != value and v != v)) for v in seen):
            continue  # e.g. "below" 0 for ints >= 1 repeats "zero"
        # 0 and -1 may lie inside the accepted range (then they need a reason); the rest never do.
        inside = label in ("zero", "negative") and _in_spec(value, spec)
        seen.append(value)
        if label in spec.ok:
            out.append((label, value, None))
        else:
            assert not inside, f"row {label}={value!r} lies in the range of {spec}: mark it accepted with a reason"
            out.append((label, value, TypeError if label == "item_type" else ValueError))
    return out


def _in_spec(value: float, spec: Arg) -> bool:
    if spec.low is not None and (value <= spec.low if spec.low_open else value < spec.low):
        return False
    if spec.high is not None and (value >= spec.high if spec.high_open else value > spec.high):
        return False
    return True


# ------------------------------------------------------------------------------ construction
def _backbone() -> nn.Module:
    return litplug.modules.MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8])


@pytest.fixture(scope="module")
def ingredient(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("soup") / "ingredient.pt"
    torch.save(_backbone().state_dict(), path)
    return str(path)


def base_kwargs(cls: type, ingredient: str) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    names = public_arguments(cls)
    if "backbone" in names:
        kwargs["backbone"] = _backbone()
    if "checkpoints" in names:
        kwargs["checkpoints"] = [ingredient]
    if "datamodule" in names:
        kwargs["datamodule"] = litplug.datamodules.Digits()
    if "retain_checkpoint" in names:
        kwargs["retain_checkpoint"] = ingredient
    if "make_module" in names:
        kwargs["make_module"] = lambda: litplug.modules.Classifier(_backbone(), num_classes=10)
        kwargs["dataset"] = torch.utils.data.TensorDataset(torch.zeros(8, 1, 8, 8), torch.zeros(8, dtype=torch.long))
    return kwargs


ARGUMENTS = [
    pytest.param(cls, name, annotation, id=f"{cls.__name__}-{name}")
    for cls in public_classes()
    for name, annotation in public_arguments(cls).items()
    if name in SPEC.get(owner(cls), {})
]


@pytest.mark.parametrize(("cls", "name", "annotation"), ARGUMENTS)
def test_bad_inputs(cls, name, annotation, ingredient):
    """All rows of one argument (one test per argument keeps the ~1,000 rows fast)."""
    failures = []
    for label, value, expected in rows(annotation, SPEC[owner(cls)][name]):
        kwargs = {**base_kwargs(cls, ingredient), name: value}
        try:
            cls(**kwargs)
        except (TypeError, ValueError) as err:
            if expected is None:
                failures.append(
                    f"{label}: {name}={value!r} is meaningful ({SPEC[owner(cls)][name].ok[label]}) but raised {err!r}"
                )
            elif type(err) is not expected and not isinstance(err, expected):
                failures.append(
                    f"{label}: {name}={value!r} raised {type(err).__name__}, expected {expected.__name__}: {err}"
                )
            elif f"`{name}" not in str(err):
                failures.append(f"{label}: {name}={value!r} raised without naming `{name}`: {err}")
        else:
            if expected is not None:
                failures.append(f"{label}: {name}={value!r} was accepted, expected {expected.__name__}")
    assert not failures, f"{cls.__name__}:\n" + "\n".join(failures)


def test_every_public_argument_has_a_row():
    missing, stale = [], []
    for cls in public_classes():
        args = public_arguments(cls)
        spec = SPEC.get(owner(cls), {})
        missing += [f"{owner(cls)}.{name}" for name in args if name not in spec]
        stale += [f"{owner(cls)}.{name}" for name in spec if name not in args]
        for name, annotation in args.items():
            if name in spec:
                labels = {label for label, _, _ in rows(annotation, spec[name])}
                stale += [f"{owner(cls)}.{name} ok[{label!r}]" for label in spec[name].ok if label not in labels]
    assert not missing, f"public arguments without rows in SPEC: {sorted(set(missing))}"
    assert not stale, f"SPEC entries that match no argument or row: {sorted(set(stale))}"


def test_the_matrix_covers_every_public_class():
    names = {cls.__name__ for cls in public_classes()}
    assert {"EMA", "SAM", "UnlearningMask", "CertifiedClassifier", "Digits", "ForgetRetain", "MNIST"} <= names
    rows_total = sum(
        len(rows(annotation, SPEC[owner(cls)][name])) for cls, name, annotation in (p.values for p in ARGUMENTS)
    )
    assert len(ARGUMENTS) > 100 and rows_total > 900


# ------------------------------------------------------------------------------ combinations
TRANSITION = [[0.6, 0.3, 0.1], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]]


def _noisy(**kwargs: Any) -> Any:
    data = litplug.datamodules.SyntheticClassification(num_classes=3)
    return litplug.datamodules.NoisyLabels(data, **kwargs)


def _sgd(**kwargs: Any) -> Any:
    return litplug.modules.Classifier(_backbone(), num_classes=10, optimizer=partial(torch.optim.SGD, **kwargs))


COMBINATIONS = {
    "CausalTransformer-dim_not_divisible_by_heads": (
        lambda p: litplug.modules.CausalTransformer(vocab_size=8, max_len=8, dim=10, heads=4),
        ValueError,
        "dim",
    ),
    "ConvNet-input_shape_without_channels": (
        lambda p: litplug.modules.ConvNet(input_shape=[8, 8]),
        ValueError,
        "input_shape",
    ),
    "Classifier-optimizer_negative_lr": (lambda p: _sgd(lr=-0.1), ValueError, "lr=-0.1"),
    "Classifier-optimizer_negative_momentum": (lambda p: _sgd(lr=0.1, momentum=-1), ValueError, "momentum"),
    "Regressor-optimizer_negative_lr": (
        lambda p: litplug.modules.Regressor(_backbone(), optimizer=lambda ps: torch.optim.Adam(ps, lr=-1.0)),
        ValueError,
        "optimizer",
    ),
    "FictitiousQA-forget_percent_not_1_5_or_10": (
        lambda p: litplug.datamodules.FictitiousQA(forget_percent=3),
        ValueError,
        "forget_percent",
    ),
    "FictitiousQA-forget_percent_of_too_few_people": (
        lambda p: litplug.datamodules.FictitiousQA(num_entities=20, forget_percent=1),
        ValueError,
        "`forget_percent`=1 of `num_entities`=20 people",
    ),
    "DigitsTasks-tasks_overlap": (
        lambda p: litplug.datamodules.DigitsTasks([[0, 1], [1, 2]]),
        ValueError,
        "`tasks` must be disjoint",
    ),
    "DigitsTasks-tasks_class_beyond_the_digits": (
        lambda p: litplug.datamodules.DigitsTasks([[0, 1], [2, 10]]),
        ValueError,
        r"`tasks\[1\]\[1\]` must be",
    ),
    "ForgetRetain-forget_classes_beyond_the_data": (
        lambda p: litplug.datamodules.ForgetRetain(litplug.datamodules.Digits(), "class", forget_classes=[10]),
        ValueError,
        "forget_classes",
    ),
    "ForgetRetain-forget_classes_all_of_them": (
        lambda p: litplug.datamodules.ForgetRetain(
            litplug.datamodules.Digits(), "class", forget_classes=list(range(10))
        ),
        ValueError,
        "forget_classes",
    ),
    "ModelMerge-base_required_by_the_recipe": (
        lambda p: litplug.modules.ModelMerge(_backbone(), [p], recipe="ties"),
        ValueError,
        "`base` .* is required by recipe 'ties'",
    ),
    "ModelMerge-map_needs_two_fine_tunes": (
        lambda p: litplug.modules.ModelMerge(_backbone(), [p], recipe="map", base=p),
        ValueError,
        "checkpoints",
    ),
    "ModelMerge-base_unused_by_the_recipe": (
        lambda p: litplug.modules.ModelMerge(_backbone(), [p], recipe="uniform", base=p),
        ValueError,
        "`base` is only used by",
    ),
    "NoisyLabels-transition_missing": (
        lambda p: _noisy(kind="transition"),
        ValueError,
        "`transition` must be a C x C matrix.*got None",
    ),
    "NoisyLabels-transition_without_its_kind": (
        lambda p: _noisy(transition=TRANSITION),
        ValueError,
        "`transition` is only used with kind='transition'",
    ),
    "NoisyLabels-rate_with_a_transition": (
        lambda p: _noisy(kind="transition", transition=TRANSITION, rate=0.2),
        ValueError,
        "`rate` must be None",
    ),
    "NoisyLabels-transition_row_sum": (
        lambda p: _noisy(kind="transition", transition=[[0.5, 0.5], [0.2, 0.7]]),
        ValueError,
        "row 1 sums to 0.9",
    ),
    "NoisyLabels-transition_not_square": (
        lambda p: _noisy(kind="transition", transition=[[0.5, 0.5], [1.0]]),
        ValueError,
        "must be square",
    ),
    "NoisyLabels-transition_entry_outside_0_1": (
        lambda p: _noisy(kind="transition", transition=[[1.5, -0.5], [0, 1]]),
        ValueError,
        r"`transition\[0\]\[0\]`",
    ),
    "NoisyLabels-transition_one_class": (
        lambda p: _noisy(kind="transition", transition=[[1.0]]),
        ValueError,
        "C >= 2",
    ),
    "NoisyLabels-transition_entry_type": (
        lambda p: _noisy(kind="transition", transition=[["a", 1], [0, 1]]),
        TypeError,
        r"`transition\[0\]\[0\]`",
    ),
    "NoisyLabels-labels_outside_num_classes": (
        lambda p: _noisy(rate=0.2, num_classes=2).train_dataloader(),
        ValueError,
        r"`num_classes` is 2 but SyntheticClassification's training labels span \[0, 2\]",
    ),
    "NoisyLabels-transition_size_against_num_classes": (
        lambda p: _noisy(kind="transition", transition=TRANSITION, num_classes=4),
        ValueError,
        "4 x 4 matrix",
    ),
}


@pytest.mark.parametrize("case", list(COMBINATIONS))
def test_combinations(case, ingredient):
    factory, error, match = COMBINATIONS[case]
    with pytest.raises(error, match=match):
        factory(ingredient)
