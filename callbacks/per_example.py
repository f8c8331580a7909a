"""What the per-example callbacks (``DataPruning``, ``ELR``, ``PSKD``) share: the indexed
datamodule they need, a check that the module is classifier-like before training, and the
capture of the logits the module's own forward returns inside ``training_step``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..plumbing import training_mode
from ..protocols import IndexedData, missing_members


def indexed_data(trainer: Trainer, who: str) -> Any:
    """The trainer's datamodule if it satisfies :class:`IndexedData`, else a ``ValueError`` that
    says how to get one."""
    dm = trainer.datamodule
    missing = missing_members(dm, IndexedData)
    if dm is None or missing:
        got = "no datamodule (dataloaders passed to fit)" if dm is None else f"{type(dm).__name__} lacks {missing}"
        raise ValueError(
            f"{who} needs per-example indices: the datamodule must satisfy IndexedData (litplug.protocols); {got}. "
            "Wrap it: `litplug.datamodules.Indexed(datamodule)`"
        )
    return dm


def to_module(trainer: Trainer, pl_module: LightningModule, batch: Any) -> Any:
    """``batch`` in the module's precision (``64-true`` doubles floats) on its device."""
    return move_data_to_device(trainer.precision_plugin.convert_input(batch), pl_module.device)


def check_classifier(trainer: Trainer, pl_module: LightningModule, dm: Any, who: str) -> int:
    """Run the module's forward on the first training sample (eval mode, no grad) and return the
    number of classes; a ``ValueError`` unless samples are ``(inputs, class)`` and
    ``forward(inputs)`` returns logits ``[batch, classes]``."""
    batch = next(iter(dm.subset_loader([0], 1)))
    what = (
        f"{who} needs a classifier-like module: training batches (inputs, targets) with class targets [batch], and "
        "forward(inputs) returning logits [batch, classes]"
    )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], Tensor):
        raise ValueError(f"{what}; the training batches are {type(batch).__name__}s, not (inputs, targets)")
    x, y = to_module(trainer, pl_module, batch)
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"{what}; the targets have shape {tuple(y.shape)} and dtype {y.dtype}")
    try:
        with torch.no_grad(), training_mode(pl_module, False), trainer.precision_plugin.forward_context():
            out = pl_module(x)
    except Exception as err:  # noqa: BLE001  the module's own error, said in our terms
        raise ValueError(f"{what}; {type(pl_module).__name__}(inputs) raised {type(err).__name__}: {err}") from err
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{what}; forward returned {got} for one sample")
    return int(out.shape[1])


class LogitsCapture:
    """A forward hook on the module that keeps the first output of shape ``[batch, classes]`` of
    every training batch (the logits its ``training_step`` computes through ``self(inputs)``),
    with its graph. ``open(batch_size)`` at batch start, ``close()`` at batch end; ``on_logits``
    (if set) is called with every such output while open (once per pass: SAM's second pass too)."""

    def __init__(self, pl_module: LightningModule, num_classes: int, on_logits: Any = None) -> None:
        self.num_classes, self.on_logits = num_classes, on_logits
        self.batch_size: int | None = None
        self.logits: Tensor | None = None
        self.handle: RemovableHandle | None = pl_module.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, out: Any) -> None:
        if self.batch_size is None or not isinstance(out, Tensor):
            return
        if out.dim() == 2 and out.shape == (self.batch_size, self.num_classes):
            if self.logits is None:
                self.logits = out
            if self.on_logits is not None and out.requires_grad:
                self.on_logits(out)

    def open(self, batch_size: int) -> None:
        self.batch_size, self.logits = batch_size, None

    def close(self) -> None:
        self.batch_size, self.logits = None, None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None
