"""Every public callback of ``litplug.callbacks`` with a small setup to run it in: used by
tests/test_registry.py (runs under ddp, survives a checkpoint resume). A method family adds its
callbacks to ``CASES`` when it adds them to ``litplug.callbacks.__all__``; a test fails if one is
missing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule

from litplug.callbacks import GradientAscentSearch
from litplug.datamodules import Digits, OfflineDesigns
from litplug.modules import MLP, Classifier, Regressor


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


def small_regressor() -> LightningModule:
    return Regressor(MLP(input_shape=[4], num_outputs=1, hidden=[32], batch_norm=True))


def offline_sphere() -> LightningDataModule:
    return OfflineDesigns("sphere", dim=4, num_samples=600, batch_size=32)


CASES["GradientAscentSearch"] = Case(lambda: GradientAscentSearch(num_designs=16, steps=10), model=small_regressor, data=offline_sphere)
