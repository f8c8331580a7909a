"""Every public callback of ``litplug.callbacks`` with a small setup to run it in: used by
tests/test_registry.py (runs under ddp, survives a checkpoint resume). A method family adds its
callbacks to ``CASES`` when it adds them to ``litplug.callbacks.__all__``; a test fails if one is
missing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule

from litplug.callbacks import IBPWarmup
from litplug.datamodules import Digits
from litplug.modules import MLP, CertifiedClassifier, Classifier


def small_classifier() -> LightningModule:
    return Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32], batch_norm=True), num_classes=10)


def digits() -> LightningDataModule:
    return Digits(batch_size=32)


@dataclass
class Case:
    """How to run one callback: ``callback()`` in ``Trainer(callbacks=...)`` with ``model()`` on
    ``data()``. ``trainer`` adds Trainer arguments (e.g. ``gradient_clip_val``)."""

    callback: Callable[[], Callback]
    model: Callable[[], LightningModule] = small_classifier
    data: Callable[[], LightningDataModule] = digits
    trainer: dict[str, Any] = field(default_factory=dict)


CASES: dict[str, Case] = {}


def certified_classifier() -> LightningModule:
    backbone = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32], batch_norm=True)
    return CertifiedClassifier(backbone, num_classes=10, eps=0.1)


# Epoch 0 natural, epoch 1 the eps ramp with regularizers: resume restores the schedule position.
CASES["IBPWarmup"] = Case(callback=lambda: IBPWarmup(start_epoch=1, ramp_epochs=1), model=certified_classifier)
