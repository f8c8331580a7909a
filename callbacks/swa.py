"""Stochastic weight averaging (SWA; Izmailov et al. 2018, "Averaging Weights Leads to Wider
Optima"): the uniform mean of one snapshot per epoch from ``start_epoch`` on,
``avg <- avg + (w - avg) / (n + 1)``, under the SWA learning rate (``swa_lrs``: from ``start_epoch`` on,
torch's ``SWALR`` anneals each parameter group's rate to its SWA value and holds it there);
BatchNorm statistics are recomputed for the averaged weights with one pass over the training data.

The formulas are :func:`litplug.functional.average_update_` and :func:`litplug.functional.update_bn_`;
the shared machinery is :class:`litplug.callbacks.weight_averaging._WeightAveraging`.

Example:
    >>> from litplug.callbacks import SWA
    >>> swa = SWA(start_epoch=0.75, swa_lrs=0.05, annealing_epochs=5, annealing_strategy="cos")
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.types import LRSchedulerConfig
from torch.optim.swa_utils import SWALR
from typing_extensions import override

from ..functional.averaging import update_bn_
from ..plumbing.third_party_private import BatchNorm, logs_now
from ..validation import (
    check_bool,
    check_choice,
    check_fraction,
    check_int,
    check_list,
    check_number,
    check_positive_int,
)
from .weight_averaging import DType, Which, _WeightAveraging

__all__ = ["SWA"]

_STRATEGIES = ("cos", "linear")


class SWA(_WeightAveraging):
    """Stochastic weight averaging (Izmailov et al. 2018) of epoch-end snapshots.

    Stochastic weight averaging: the uniform mean of one snapshot per ``every_n_epochs``
    epochs from epoch ``start_epoch`` on, taken after the epoch's last optimizer step (before its
    validation), then BatchNorm statistics recomputed for the averaged weights at the end of
    ``fit`` with one pass over the training data (``limit_train_batches`` respected).

    The SWA learning rate (``swa_lrs`` set): at the start of epoch ``start_epoch`` the callback replaces
    the optimizer's schedulers with ``torch.optim.swa_utils.SWALR`` stepped at every epoch end (as
    Lightning's ``StochasticWeightAveraging`` does): epoch ``start_epoch`` keeps the rate it has, and over
    the next ``annealing_epochs`` epochs each parameter group's rate moves to its SWA value,
    ``lr_t = swa_lr * a(t) + lr_0 * (1 - a(t))`` with ``t = min(1, k / annealing_epochs)`` after
    the k-th epoch and ``a(t) = (1 - cos(pi t)) / 2`` (``"cos"``) or ``t`` (``"linear"``), then
    stays there. The scheduler's state is checkpointed: a resumed run continues the same schedule.
    With ``swa_lrs=None`` the user's schedule keeps running.

    Floating parameters and buffers are averaged, integer buffers copied, paired by name. Before
    the first snapshot, validation uses the live weights. A snapshot whose weights are not finite
    is skipped with a warning (as in :class:`EMA`).

    Distributed: DDP and FSDP2 add no communication to the snapshots (FSDP2 keeps the average
    per local shard); every rank builds the same ``SWALR``. The BatchNorm pass runs on each rank's
    share of the data, then averages the BatchNorm buffers over ranks with one all-reduce so the
    replicas agree.

    Data without a length (an ``IterableDataset``): the snapshot is taken when the epoch ends,
    after its validation (which still sees the previous average).

    Args:
        start_epoch: first averaged epoch: an epoch index (int >= 0; works with a ``max_steps``-only
            Trainer) or a fraction of ``max_epochs`` (float in [0, 1)); must lie before
            ``max_epochs`` when that is set (checked at setup).
        every_n_epochs: snapshot every n-th epoch from ``start_epoch`` (>= 1).
        update_bn: recompute BatchNorm statistics for the final averaged weights.
        swa_lrs: the SWA learning rate: one positive number for every parameter group, a list
            with one per group (its length is checked against the optimizer at the start of
            ``fit``), or ``None`` to keep the user's schedule. Needs automatic optimisation and
            one optimizer.
        annealing_epochs: epochs over which the rate moves to ``swa_lrs`` (int >= 0; 0 switches
            at once, so epoch ``start_epoch`` already runs at ``swa_lrs``).
        annealing_strategy: ``"cos"`` or ``"linear"``.
        dtype, device, evaluate_with, final_weights, export_path: as in :class:`EMA`.

    Example:
        >>> swa = SWA(start_epoch=0.75, swa_lrs=0.05, annealing_epochs=5, update_bn=True)
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "averaging": {
            "loss: train vs validation (evaluated on the average)": ["^train/loss$", "^val/loss$"],
            "SWA snapshot weight": ["^swa/weight$"],
            "SWA learning rate (swa_lrs), per parameter group": ["^swa/lr"],
        },
    }

    def __init__(
        self,
        start_epoch: int | float = 0.75,
        every_n_epochs: int = 1,
        update_bn: bool = True,
        swa_lrs: float | list[float] | None = None,
        annealing_epochs: int = 10,
        annealing_strategy: Literal["cos", "linear"] = "cos",
        dtype: DType | None = None,
        device: str | None = None,
        evaluate_with: Which = "average",
        final_weights: Which = "average",
        export_path: str | None = None,
    ) -> None:
        if isinstance(start_epoch, float):
            check_fraction("start_epoch", start_epoch)  # a fraction of max_epochs
        elif not isinstance(start_epoch, bool) and isinstance(start_epoch, int):
            check_int("start_epoch", start_epoch, low=0)  # an epoch index
        else:
            raise TypeError(
                "`start_epoch` must be an epoch index (an int >= 0) or a fraction of max_epochs (a float in [0, 1)), "
                f"got {start_epoch!r} ({type(start_epoch).__name__})"
            )
        check_positive_int("every_n_epochs", every_n_epochs)
        check_bool("update_bn", update_bn)
        if swa_lrs is not None and not isinstance(swa_lrs, (list, tuple)):
            swa_lrs = check_number("swa_lrs", swa_lrs, low=0, low_open=True)
        elif swa_lrs is not None:
            swa_lrs = check_list(
                "swa_lrs", swa_lrs, lambda n, v: check_number(n, v, low=0, low_open=True), nonempty=True
            )
        check_int("annealing_epochs", annealing_epochs, low=0)
        check_choice("annealing_strategy", annealing_strategy, _STRATEGIES)
        super().__init__(dtype, device, evaluate_with, final_weights, export_path)
        self.start_epoch = start_epoch
        self.every_n_epochs = every_n_epochs
        self.update_bn = update_bn
        self.swa_lrs = swa_lrs
        self.annealing_epochs = annealing_epochs
        self.annealing_strategy = annealing_strategy
        self._first_epoch = start_epoch if isinstance(start_epoch, int) else 0
        self._scheduler: SWALR | None = None
        self._scheduler_state: dict[str, Any] | None = None  # restored from a checkpoint, loaded at fit start

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        max_epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs >= 1 else None
        if isinstance(self.start_epoch, float):
            if max_epochs is None:
                raise ValueError(
                    f"SWA(start_epoch={self.start_epoch}) is a fraction of `max_epochs`, which the Trainer does not "
                    f"set (max_epochs={trainer.max_epochs}); give `start_epoch` as an epoch index (int) or set "
                    "`max_epochs`"
                )
            self._first_epoch = int(self.start_epoch * max_epochs)
        else:
            self._first_epoch = self.start_epoch
        if max_epochs is not None and self._first_epoch >= max_epochs:
            raise ValueError(
                f"`start_epoch` = {self.start_epoch} is epoch {self._first_epoch}, beyond the last epoch "
                f"{max_epochs - 1} (max_epochs={max_epochs})"
            )
        if self.swa_lrs is not None and not pl_module.automatic_optimization:
            raise ValueError(
                f"SWA(swa_lrs={self.swa_lrs}) hands the learning rate to a SWALR scheduler that Lightning steps at "
                "every epoch end, which it does only under automatic optimisation; this module sets "
                "`automatic_optimization = False`: set `swa_lrs=None` and step a "
                "`torch.optim.swa_utils.SWALR` in the module's own loop"
            )

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        super().on_fit_start(trainer, pl_module)
        self._scheduler = None
        if self.swa_lrs is None:
            return
        if len(trainer.optimizers) != 1:
            raise ValueError(
                f"SWA(swa_lrs=...) sets the learning rate of one optimizer, the module has {len(trainer.optimizers)}"
            )
        groups = len(trainer.optimizers[0].param_groups)
        if isinstance(self.swa_lrs, list) and len(self.swa_lrs) != groups:
            raise ValueError(
                f"`swa_lrs` has {len(self.swa_lrs)} learning rates ({self.swa_lrs}), the optimizer {groups} "
                "parameter groups: give one per group, or one number for all"
            )
        if self._scheduler_state is not None:
            # Resuming after the swap: SWALR takes the scheduler's place before Lightning restores the
            # checkpoint's scheduler states (which hold SWALR's), so they never reach the user's scheduler.
            self._use_swalr(trainer, self._scheduler_state)
            self._scheduler_state = None

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.swa_lrs is None or trainer.current_epoch < self._first_epoch:
            return
        if self._scheduler is None:
            if trainer.current_epoch > self._first_epoch:
                rank_zero_warn(
                    f"SWA: the SWA learning rate begins at epoch {trainer.current_epoch}, after `start_epoch` (epoch "
                    f"{self._first_epoch}), since the run resumed from a checkpoint without SWA's scheduler state; "
                    "the annealing starts from here"
                )
            self._use_swalr(trainer, None)
        groups = trainer.optimizers[0].param_groups  # the rate this epoch runs at
        names = ["swa/lr"] if len(groups) == 1 else [f"swa/lr_{i}" for i in range(len(groups))]
        pl_module.log_dict({n: float(g["lr"]) for n, g in zip(names, groups)}, on_step=False, on_epoch=True)

    def _use_swalr(self, trainer: pl.Trainer, state: dict[str, Any] | None) -> None:
        """Replace every scheduler of the (single) optimizer with ``SWALR``, stepped every epoch."""
        optimizer = trainer.optimizers[0]
        lrs = self.swa_lrs if isinstance(self.swa_lrs, list) else [self.swa_lrs] * len(optimizer.param_groups)
        self._scheduler = SWALR(
            optimizer, swa_lr=lrs, anneal_epochs=self.annealing_epochs, anneal_strategy=self.annealing_strategy
        )
        if state is not None:
            self._scheduler.load_state_dict(state)
        configs = trainer.lr_scheduler_configs
        if configs and state is None:
            replaced = ", ".join(
                f"{type(c.scheduler).__name__}(interval={c.interval!r}, frequency={c.frequency})" for c in configs
            )
            rank_zero_warn(
                f"SWA: from epoch {trainer.current_epoch} the learning rate follows SWALR(swa_lr={lrs}, "
                f"anneal_epochs={self.annealing_epochs}, anneal_strategy={self.annealing_strategy!r}), stepped at "
                f"every epoch end; it replaces {'the' if len(configs) == 1 else f'all {len(configs)}'} scheduler"
                f"{'' if len(configs) == 1 else 's'} of the optimizer: {replaced}"
            )
        configs.clear()
        configs.append(LRSchedulerConfig(self._scheduler))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 == trainer.num_training_batches:  # the epoch's last batch (data with a length)
            self._snapshot(trainer, pl_module, on_step=True)

    def _snapshot(self, trainer: pl.Trainer, pl_module: pl.LightningModule, on_step: bool) -> None:
        epoch = trainer.current_epoch
        if epoch < self._first_epoch or (epoch - self._first_epoch) % self.every_n_epochs or epoch == self._last_step:
            return
        weight = 1.0 / (self.updates + 1)
        self._update(pl_module, weight)
        self._last_step = epoch  # for SWA the counter is the epoch of the last snapshot
        if logs_now(trainer) or not on_step:
            pl_module.log_dict(
                {"swa/weight": weight, "swa/updates": float(self.updates)}, on_step=on_step, on_epoch=not on_step
            )

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not math.isfinite(trainer.num_training_batches):  # data without a length: the epoch has ended
            self._snapshot(trainer, pl_module, on_step=False)

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
            if isinstance(m, BatchNorm) and m.track_running_stats:
                for name, buf in m.named_buffers(recurse=False):
                    if trainer.world_size > 1 and buf.is_floating_point():
                        buf.copy_(trainer.strategy.reduce(buf.clone(), reduce_op="mean"))
                    stats[f"{prefix}.{name}" if prefix else name] = buf
        assert self._groups is not None
        for g in self._groups:  # the recomputed statistics become part of the average
            for name, avg in zip(g.names, g.average):
                if name in stats:
                    avg.copy_(stats[name])

    @override
    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["scheduler"] = self._scheduler.state_dict() if self._scheduler is not None else self._scheduler_state
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._scheduler_state = state_dict.get("scheduler")
