"""Regression around any backbone: the surrogate model of offline optimisation.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.datamodules import OfflineDesigns
    >>> from litplug.modules import MLP, Regressor
    >>> model = Regressor(MLP(input_shape=[8], num_outputs=1, hidden=[64, 64]))
    >>> trainer = Trainer(max_epochs=5, logger=False, enable_progress_bar=False)  # doctest: +SKIP
    >>> trainer.fit(model, OfflineDesigns("sphere"))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanSquaredError, SpearmanCorrCoef
from typing_extensions import override

from ..validation import check_choice
from .base import TrainingModule

_LOSSES = {"mse": F.mse_loss, "l1": F.l1_loss, "huber": F.huber_loss}


class Regressor(TrainingModule):
    """A regressor: ``backbone`` fit to real-valued targets.

    Fit ``backbone`` to real-valued targets; logs ``train/loss``, ``{val,test}/loss``,
    ``{val,test}/mse`` and ``{val,test}/spearman`` (rank correlation of predictions and targets,
    what matters when the model ranks designs; torchmetrics, gathered over ranks).

    Targets ``y`` of shape ``[B]`` pair with backbone outputs ``[B, 1]`` (``num_outputs=1``);
    targets ``[B, k]`` with outputs ``[B, k]``.

    Args:
        backbone: network mapping inputs to predictions.
        loss: ``mse``, ``l1`` or ``huber`` (delta 1).
        optimizer: optimizer callable (default Adam, lr 1e-3).
        lr_scheduler: optional scheduler callable.
    """

    def __init__(
        self,
        backbone: nn.Module,
        loss: Literal["mse", "l1", "huber"] = "mse",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_choice("loss", loss, sorted(_LOSSES))
        super().__init__(backbone, optimizer, lr_scheduler)
        self.loss_name = loss
        self.val_mse, self.test_mse = MeanSquaredError(), MeanSquaredError()
        self.val_spearman, self.test_spearman = SpearmanCorrCoef(), SpearmanCorrCoef()

    def predict(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Predictions for ``x`` in the shape of ``y``, as float32."""
        pred = self(x)
        if pred.numel() != y.numel():
            raise ValueError(
                f"backbone outputs shape {tuple(pred.shape)} for targets of shape {tuple(y.shape)}; "
                "set its `num_outputs` to match"
            )
        return pred.reshape(y.shape).float()

    def loss(self, pred: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _LOSSES[self.loss_name](pred, y.float())

    def batch_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean ``loss`` on an ``(x, y)`` batch: the training objective
        (:class:`litplug.protocols.HasBatchLoss`)."""
        x, y = batch
        return self.loss(self.predict(x, y), y)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(
        self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, mse: MeanSquaredError, spearman: SpearmanCorrCoef
    ) -> None:
        x, y = batch
        pred = self.predict(x, y)
        mse.update(pred, y.float())
        spearman.update(pred, y.float())
        self.log(f"{stage}/loss", self.loss(pred, y), sync_dist=True)
        self.log(f"{stage}/mse", mse)
        self.log(f"{stage}/spearman", spearman, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_mse, self.val_spearman)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_mse, self.test_spearman)

    @override
    def predict_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        return self(batch[0])
