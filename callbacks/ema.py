"""Exponential moving average of the weights (EMA; Polyak & Juditsky 1992, the warmup rule of timm /
ema-pytorch): after optimizer steps ``avg <- decay_t * avg + (1 - decay_t) * w``, with
``decay_t = min(decay, 1 - (1 + t / gamma) ** -power)`` under warmup, ``t`` the number of updates
done before this one. The first update copies the weights (``decay_0 = 0``).

The formulas are :func:`litplug.functional.ema_decay` and :func:`litplug.functional.average_update_`;
the shared machinery is :class:`litplug.callbacks.weight_averaging._WeightAveraging`.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.callbacks import EMA
    >>> from litplug.datamodules import Digits
    >>> from litplug.modules import MLP, Classifier
    >>> ema = EMA(decay=0.99, warmup=True)
    >>> model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10))
    >>> Trainer(max_epochs=2, callbacks=[ema], logger=False).fit(model, Digits())  # doctest: +SKIP
    >>> model.load_state_dict(ema.averaged_state_dict())  # doctest: +SKIP
    >>> model.backbone.load_state_dict(ema.averaged_state_dict("backbone."))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any, ClassVar

import lightning.pytorch as pl
from typing_extensions import override

from ..functional.averaging import ema_decay
from ..plumbing.third_party_private import logs_now
from ..validation import check_bool, check_int, check_number, check_positive_int
from .weight_averaging import DType, Which, _WeightAveraging

__all__ = ["EMA"]


class EMA(_WeightAveraging):
    """Exponential moving average of the weights, updated after optimizer steps.

    ``avg <- decay_t * avg + (1 - decay_t) * w`` over all floating parameters and buffers of the
    LightningModule (integer buffers such as ``num_batches_tracked`` are copied), paired by name.
    The first update copies the weights; before it, validation uses the live weights.

    Schedule, in training steps (batches that reached an optimizer step: one per batch however
    many optimizers a manual module steps, so not ``trainer.global_step``; docs/schedules.md): the
    update follows the training step with 0-based index ``i`` when ``i >= start_step`` and
    ``i % every_n_steps == 0``, i.e. after steps 1, n + 1, 2n + 1, ... (1-based) from step
    ``start_step + 1`` on, the rule of Lightning's
    ``EMAWeightAveraging(update_every_n_steps=n, update_starting_at_step=start_step)`` for a
    module with one optimizer. The phase is that of the step count, not of ``start_step``
    (as in Lightning): with ``start_step=2, every_n_steps=3`` the updates follow steps 4,
    7, 10, ...

    Non-finite weights (after a NaN/inf loss, or a step that overflowed) never enter the
    average: such an update is skipped with a warning and counted in ``skipped``; the average
    keeps its last finite value (the check costs one summing pass over the weights and one host
    read per update).

    Distributed: DDP adds no communication (every rank updates its identical replica). FSDP2
    (``ModelParallelStrategy``): the average is kept per local shard (``p.to_local()``), no
    all-gather in the update or the swap; ``state_dict`` (checkpoints) and the export gather full
    tensors, once per checkpoint.

    Args:
        decay: EMA decay in (0, 1).
        warmup: use ``decay_t = min(decay, 1 - (1 + t / warmup_gamma) ** -warmup_power)``.
        warmup_gamma: > 0, the ``gamma`` of the warmup rule.
        warmup_power: > 0, the ``power`` of the warmup rule (2/3 for short runs, 3/4 for long).
        start_step: training steps taken before updates begin (>= 0; none in the first ``start_step``).
        every_n_steps: update after training steps 1, n + 1, 2n + 1, ... (>= 1; see Schedule).
        dtype: dtype of the average of floating tensors (``"float32"`` for a bf16 model, so small
            updates are not rounded away); ``None`` keeps the model's dtype.
        device: where the average lives (``"cpu"`` offloads it); ``None`` = beside the weights.
        evaluate_with: weights used for validation and test: ``"average"`` or ``"live"``.
        final_weights: weights the model holds after ``fit``: ``"average"`` or ``"live"``.
        export_path: if set, ``fit`` ends by writing the averaged backbone's state dict there
            (``torch.save``; read back with ``litplug.loading.load_weights(backbone, path)``).

    Example:
        >>> ema = EMA(decay=0.999, warmup=True, dtype="float32", export_path="runs/ema.pt")
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "averaging": {
            "loss: train vs validation (evaluated on the average)": ["^train/loss$", "^val/loss$"],
            "EMA decay and updates": ["^ema/decay$"],
        },
    }

    def __init__(
        self,
        decay: float = 0.999,
        warmup: bool = False,
        warmup_gamma: float = 1.0,
        warmup_power: float = 2 / 3,
        start_step: int = 0,
        every_n_steps: int = 1,
        dtype: DType | None = None,
        device: str | None = None,
        evaluate_with: Which = "average",
        final_weights: Which = "average",
        export_path: str | None = None,
    ) -> None:
        check_number("decay", decay, 0, 1, low_open=True, high_open=True)
        check_bool("warmup", warmup)
        check_number("warmup_gamma", warmup_gamma, low=0, low_open=True)
        check_number("warmup_power", warmup_power, low=0, low_open=True)
        check_int("start_step", start_step, low=0)
        check_positive_int("every_n_steps", every_n_steps)
        super().__init__(dtype, device, evaluate_with, final_weights, export_path)
        self.decay = decay
        self.warmup = warmup
        self.warmup_gamma = warmup_gamma
        self.warmup_power = warmup_power
        self.start_step = start_step
        self.every_n_steps = every_n_steps
        self.steps = 0  # training steps so far
        self._global_step_before = -1  # trainer.global_step when the batch began

    def current_decay(self) -> float:
        """Decay of the next update."""
        return ema_decay(self.updates, self.decay, self.warmup, self.warmup_gamma, self.warmup_power)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "steps": self.steps}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self.steps = int(state_dict["steps"])

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._global_step_before = trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts every optimizer's step: it is unchanged on accumulation batches and
        # grows by the number of optimizers a manual module steps; a training step is one batch.
        if trainer.global_step == self._global_step_before:
            return
        self.steps += 1
        index = self.steps - 1  # 0-based index of the step just taken, as in Lightning's WeightAveraging
        if index < self.start_step or index % self.every_n_steps:
            return
        decay = self.current_decay()
        self._update(pl_module, 1.0 - decay)
        self._last_step = self.steps
        if logs_now(trainer):
            pl_module.log_dict({"ema/decay": decay, "ema/updates": float(self.updates)}, on_step=True, on_epoch=False)
