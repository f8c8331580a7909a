"""Stochastic weight averaging (SWA; Izmailov et al. 2018, "Averaging Weights Leads to Wider
Optima"): the uniform mean of one snapshot per epoch from ``start`` on,
``avg <- avg + (w - avg) / (n + 1)``; BatchNorm statistics are recomputed for the averaged weights
with one pass over the training data.

The formulas are :func:`litplug.functional.average_update_` and :func:`litplug.functional.update_bn_`;
the shared machinery is :class:`litplug.callbacks.weight_averaging._WeightAveraging`.

Example:
    >>> from litplug.callbacks import SWA
    >>> swa = SWA(start=0.75, update_bn=True)
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar

import lightning.pytorch as pl
from torch import nn
from typing_extensions import override

from ..functional.averaging import update_bn_
from ..validation import check_bool, check_fraction, check_int, check_positive_int
from .hooks import logs_now
from .weight_averaging import DType, Which, _WeightAveraging

__all__ = ["SWA"]


class SWA(_WeightAveraging):
    """Stochastic weight averaging: the uniform mean of one snapshot per ``every_n_epochs``
    epochs from epoch ``start`` on, taken after the epoch's last optimizer step (before its
    validation), then BatchNorm statistics recomputed for the averaged weights at the end of
    ``fit`` with one pass over the training data (``limit_train_batches`` respected).

    Floating parameters and buffers are averaged, integer buffers copied, paired by name. Before
    the first snapshot, validation uses the live weights. Use a constant or cyclic learning rate
    over the averaging phase (e.g. ``SWALR``) as in the paper. A snapshot whose weights are not
    finite is skipped with a warning (as in :class:`EMA`).

    Distributed: DDP and FSDP2 add no communication to the snapshots (FSDP2 keeps the average
    per local shard). The BatchNorm pass runs on each rank's share of the data, then averages the
    BatchNorm buffers over ranks with one all-reduce so the replicas agree.

    Data without a length (an ``IterableDataset``): the snapshot is taken when the epoch ends,
    after its validation (which still sees the previous average).

    Args:
        start: first averaged epoch: an epoch index (int >= 0; works with a ``max_steps``-only
            Trainer) or a fraction of ``max_epochs`` (float in [0, 1)); must lie before
            ``max_epochs`` when that is set (checked at setup).
        every_n_epochs: snapshot every n-th epoch from ``start`` (>= 1).
        update_bn: recompute BatchNorm statistics for the final averaged weights.
        dtype, device, evaluate_with, final_weights, export_path: as in :class:`EMA`.

    Example:
        >>> swa = SWA(start=0.75, update_bn=True)
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "averaging": {
            "loss: train vs validation (evaluated on the average)": ["^train/loss$", "^val/loss$"],
            "SWA snapshot weight": ["^swa/weight$"],
        },
    }

    def __init__(
        self,
        start: int | float = 0.75,
        every_n_epochs: int = 1,
        update_bn: bool = True,
        dtype: DType | None = None,
        device: str | None = None,
        evaluate_with: Which = "average",
        final_weights: Which = "average",
        export_path: str | None = None,
    ) -> None:
        if isinstance(start, float):
            check_fraction("start", start)  # a fraction of max_epochs
        elif not isinstance(start, bool) and isinstance(start, int):
            check_int("start", start, low=0)  # an epoch index
        else:
            raise TypeError(
                "`start` must be an epoch index (an int >= 0) or a fraction of max_epochs (a float in [0, 1)), "
                f"got {start!r} ({type(start).__name__})"
            )
        check_positive_int("every_n_epochs", every_n_epochs)
        check_bool("update_bn", update_bn)
        super().__init__(dtype, device, evaluate_with, final_weights, export_path)
        self.start = start
        self.every_n_epochs = every_n_epochs
        self.update_bn = update_bn
        self._start_epoch = start if isinstance(start, int) else 0

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 1 else None
        if isinstance(self.start, float):
            if max_epochs is None:
                raise ValueError(
                    f"SWA(start={self.start}) is a fraction of `max_epochs`, which the Trainer does not set "
                    f"(max_epochs={trainer.max_epochs}); give `start` as an epoch index (int) or set `max_epochs`"
                )
            self._start_epoch = int(self.start * max_epochs)
        else:
            self._start_epoch = self.start
        if max_epochs is not None and self._start_epoch >= max_epochs:
            raise ValueError(
                f"`start` = {self.start} is epoch {self._start_epoch}, beyond the last epoch {max_epochs - 1} "
                f"(max_epochs={max_epochs})"
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 == trainer.num_training_batches:  # the epoch's last batch (data with a length)
            self._snapshot(trainer, pl_module, on_step=True)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not math.isfinite(trainer.num_training_batches):  # data without a length: the epoch has ended
            self._snapshot(trainer, pl_module, on_step=False)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        epoch = trainer.current_epoch
        if epoch < self._start_epoch or (epoch - self._start_epoch) % self.every_n_epochs or epoch == self._last_step:
            return
        weight = 1.0 / (self.updates + 1)
        self._update(pl_module, weight)
        self._last_step = epoch  # for SWA the counter is the epoch of the last snapshot
        if logs_now(trainer) or not on_step:
            pl_module.log_dict(
                {"swa/weight": weight, "swa/updates": float(self.updates)}, on_step=on_step, on_epoch=not on_step
            )

    def _finalize(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.update_bn:
            return
        limit = trainer.num_training_batches
        loader = trainer.train_dataloader

        def batches() -> Iterable[Any]:
            for i, batch in enumerate(loader):
                if i >= limit:
                    break
                yield trainer.strategy.batch_to_device(batch)

        if not update_bn_(pl_module, batches()):
            return
        stats = {}
        for prefix, m in pl_module.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats:
                for name, buf in m.named_buffers(recurse=False):
                    if trainer.world_size > 1 and buf.is_floating_point():
                        buf.copy_(trainer.strategy.reduce(buf.clone(), reduce_op="mean"))
                    stats[f"{prefix}.{name}" if prefix else name] = buf
        assert self._groups is not None
        for g in self._groups:  # the recomputed statistics become part of the average
            for name, avg in zip(g.names, g.average):
                if name in stats:
                    avg.copy_(stats[name])
