"""The value types of the engine: a box (:class:`Interval`), the result of one bound computation
(:class:`BoundResult`), the state of one computation (:class:`Pass`) and the error raised for a
network the engine cannot bound."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import fx, nn


class UnsupportedOperationError(ValueError):
    """A network contains an operation the interval engine cannot bound."""


class Interval:
    """A batch of boxes in centre/radius form, and optionally the clean (unperturbed) batch.

    Centre and clean batch are stored stacked along the batch dimension, ``stack = [centre;
    clean]``, so that every affine layer and batch norm runs once on both without a copy.
    """

    __slots__ = ("stack", "radius", "tracked")

    def __init__(self, stack: torch.Tensor, radius: torch.Tensor, tracked: bool = False) -> None:
        self.stack, self.radius, self.tracked = stack, radius, tracked

    @classmethod
    def of(cls, centre: torch.Tensor, radius: torch.Tensor, clean: torch.Tensor | None = None) -> Interval:
        return cls(centre if clean is None else torch.cat([centre, clean]), radius, clean is not None)

    @classmethod
    def input(cls, lower: torch.Tensor, upper: torch.Tensor, clean: torch.Tensor | None = None) -> Interval:
        """The box ``[lower, upper]`` (and the clean batch) as the engine's input. An image batch
        (4-d) is laid out channels-last: convolutions (oneDNN on CPU) and the elementwise rules
        after them then run in that layout, in the forward and backward passes alike
        (``benchmarks/certified.py``: the IBP training step of CNN7)."""
        centre, radius = (upper + lower) / 2, (upper - lower) / 2
        if radius.dim() == 4:
            last = torch.channels_last
            centre, radius = centre.contiguous(memory_format=last), radius.contiguous(memory_format=last)
            clean = clean.contiguous(memory_format=last) if clean is not None else None
        return cls.of(centre, radius, clean)

    @property
    def centre(self) -> torch.Tensor:
        return self.stack[: self.radius.shape[0]] if self.tracked else self.stack

    @property
    def clean(self) -> torch.Tensor | None:
        return self.stack[self.radius.shape[0] :] if self.tracked else None

    @property
    def lower(self) -> torch.Tensor:
        return self.centre - self.radius

    @property
    def upper(self) -> torch.Tensor:
        return self.centre + self.radius

    def pairs(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` of centre and clean batch, applied to each separately and stacked again (for
        maps that may mix the batch dimension, e.g. ``view(n, -1)`` with ``n`` read off the centre)."""
        return torch.cat([fn(self.centre), fn(self.clean)]) if self.tracked else fn(self.stack)

    def broadcast(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn`` (elementwise with a constant that may carry the batch dimension) of centre and
        clean batch in one call: the stack is viewed as ``[2, n, ...]``."""
        if not self.tracked:
            return fn(self.stack)
        return fn(self.stack.unflatten(0, (2, self.radius.shape[0]))).flatten(0, 1)


class BoundResult(NamedTuple):
    """``lower``/``upper``: bounds of the output (of ``spec @ output`` when a spec is given);
    ``clean``: the output on the clean batch (or None); ``relu``: pre-activation ``(lower, upper)``
    of every ReLU when recorded."""

    lower: torch.Tensor
    upper: torch.Tensor
    clean: torch.Tensor | None
    relu: list[tuple[torch.Tensor, torch.Tensor]]


class Pass:
    """Everything one bound computation needs besides the boxes, handed to every interval rule
    (the engine itself keeps no state between calls).

    Attributes:
        model: the network being bounded.
        fused: whether rules may use their fused autograd variant.
        linearize: propagate through each activation linearised at the clean input instead of
            its interval (the tightness metric of Mao et al. 2023).
        relu: where the ReLU rules append their pre-activation ``(lower, upper)``, or None.
        owned: set by the engine before each rule: the rule's input box was computed fresh by the
            node before it and is used nowhere else, so without gradients a rule may overwrite it
            (saves an activation-sized allocation per layer in evaluation).
    """

    __slots__ = ("model", "fused", "linearize", "relu", "owned")

    def __init__(
        self, model: nn.Module, fused: bool, linearize: bool, relu: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> None:
        self.model, self.fused, self.linearize, self.relu = model, fused, linearize, relu
        self.owned = False


def name_of(target: Any) -> str:
    """A readable name of a function or module type, for error messages."""
    return getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or str(target)


def where(node: fx.Node) -> str:
    """Where a node occurs: its module path for modules, else its graph node name."""
    return f"module {node.target!r}" if node.op == "call_module" else f"node {node.name!r}"
