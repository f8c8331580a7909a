"""Every public callback of ``litplug.callbacks`` with a small setup to run it in: used by
tests/test_registry.py (runs under ddp, survives a checkpoint resume). A method family adds its
callbacks to ``CASES`` when it adds them to ``litplug.callbacks.__all__``; a test fails if one is
missing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule

from litplug.callbacks import UnlearningMask
from litplug.datamodules import Digits, ForgetRetain
from litplug.modules import MLP, Classifier, Unlearner


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


def small_unlearner() -> LightningModule:
    return Unlearner(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32], batch_norm=True), None, "gradient_difference")


def forget_digits() -> LightningDataModule:
    return ForgetRetain(Digits(batch_size=32), scenario="class", forget_classes=[0])


CASES["UnlearningMask"] = Case(
    callback=lambda: UnlearningMask("saliency", ratio=0.5, num_batches=2),
    model=small_unlearner,
    data=forget_digits,
    trainer={"gradient_clip_val": 1.0},
)
