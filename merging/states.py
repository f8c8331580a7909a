"""What every merge function accepts: modules or state dicts alike, returned as the kind given,
and the shared checks (same keys and shapes, finite numbers)."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping, Sequence
from typing import TypeVar, Union

import torch
from torch import Tensor, nn

State = dict[str, Tensor]
AnyWeights = Union[nn.Module, Mapping[str, Tensor]]
# a merge returns the kind of its first model argument: a module (a deep copy holding the merged
# weights) for a module, a plain state dict for a mapping
Weights = TypeVar("Weights", nn.Module, Mapping[str, Tensor])


def state_of(weights: AnyWeights, what: str) -> Mapping[str, Tensor]:
    """``weights.state_dict()`` for a module, ``weights`` itself for a mapping of tensors."""
    if isinstance(weights, nn.Module):
        return weights.state_dict()
    if isinstance(weights, Mapping):
        for name, value in weights.items():
            if not isinstance(value, Tensor):
                raise TypeError(f"`{what}`[{name!r}] must be a tensor, got {type(value).__name__}")
        return weights
    raise TypeError(
        f"`{what}` must be an nn.Module or a state dict (a mapping of names to tensors), got {type(weights).__name__}"
    )


def states_of(models: Sequence[AnyWeights], what: str) -> list[Mapping[str, Tensor]]:
    if isinstance(models, (nn.Module, Mapping)) or not isinstance(models, Sequence):
        raise TypeError(f"`{what}` must be a list of modules or state dicts, got {type(models).__name__}")
    return [state_of(m, f"{what}[{i}]") for i, m in enumerate(models)]


def returned_as(template: AnyWeights, state: Mapping[str, Tensor]) -> AnyWeights:
    """``state`` as the kind of ``template``: a deep copy of a module with ``state`` loaded, or
    the state dict itself."""
    if isinstance(template, nn.Module):
        out = copy.deepcopy(template)
        out.load_state_dict(state)
        return out
    return dict(state)


def check_states(
    states: Sequence[Mapping[str, Tensor]], what: str = "states", labels: Sequence[str] | None = None
) -> None:
    """Every state has the first one's keys and shapes; the error names the state and the key.

    ``labels`` name the states in the message (default: ``` `what`[i] ```), e.g. their files."""
    labels = list(labels) if labels is not None else [f"`{what}`[{i}]" for i in range(len(states))]
    first = states[0]
    for label, state in zip(labels[1:], states[1:]):
        for name, ref in first.items():
            if name not in state:
                raise ValueError(f"{label}: {name!r} (shape {tuple(ref.shape)}) is missing; {labels[0]} has it")
            if state[name].shape != ref.shape:
                raise ValueError(
                    f"{label}: {name!r} has shape {tuple(state[name].shape)}, expected {tuple(ref.shape)} "
                    f"(as in {labels[0]})"
                )
        extra = [k for k in state if k not in first]
        if extra:
            raise ValueError(
                f"{label}: unexpected {extra[0]!r} (shape {tuple(state[extra[0]].shape)}), not in {labels[0]}"
            )


def check_finite(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value!r}")


def check_density(density: float) -> None:
    check_finite("density", density)
    if not 0.0 < density <= 1.0:
        raise ValueError(f"`density` must be in (0, 1], got {density}")


def work_dtype(t: Tensor) -> torch.dtype:
    """The dtype merges compute in: float64 for float64 tensors, float32 otherwise (as mergekit,
    so that float32 results agree bit for bit)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32
