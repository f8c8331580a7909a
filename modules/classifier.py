"""Cross-entropy classifier around any backbone.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.datamodules import Digits
    >>> from litplug.modules import MLP, Classifier
    >>> model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10), num_classes=10)
    >>> Trainer(max_epochs=1, logger=False, enable_progress_bar=False).fit(model, Digits())  # doctest: +SKIP
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from ..validation import check_int
from .base import TrainingModule


class Classifier(TrainingModule):
    """A classifier: ``backbone`` trained with cross-entropy.

    Train ``backbone`` with cross-entropy; logs ``train/loss``, ``val/loss``, ``val/acc``,
    ``test/loss`` and ``test/acc`` (accuracy in [0, 1], via torchmetrics).

    Args:
        backbone: network mapping a batch of inputs to ``num_classes`` logits.
        num_classes: number of classes (>= 2).
        optimizer: optimizer callable (default Adam, lr 1e-3).
        lr_scheduler: optional scheduler callable.
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "training": {
            "loss: train vs validation": ["^train/loss$", "^val/loss$"],
            "accuracy: validation vs test": ["^val/acc$", "^test/acc$"],
        },
    }

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_int("num_classes", num_classes, low=2)
        super().__init__(backbone, optimizer, lr_scheduler)
        self.num_classes = num_classes
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def loss(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits, y)

    def batch_loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy on an ``(x, y)`` batch: the training objective
        (:class:`litplug.protocols.HasBatchLoss`)."""
        x, y = batch
        return self.loss(self(x), y)

    @override
    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str, metric: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        metric.update(logits, y)
        self.log(f"{stage}/loss", self.loss(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", metric, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    @override
    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    @override
    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=-1)
