"""Evaluate a causal LM's unlearning against its retain model, as TOFU/MUSE/open-unlearning do."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, ClassVar

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from ..functional.unlearning_metrics import classifier_suite, suite_from_statistics, suite_statistics
from ..loading import load_json, load_weights
from ..validation import check_bool, check_path, check_positive_int

__all__ = ["UnlearningEvaluation"]


def _evaluation_sets(datamodule: Any) -> Any:
    """The ``evaluation_sets`` method of ``datamodule`` or of the datamodule it wraps, or None for a
    classifier's ``ForgetRetain`` (forget/retain loaders and held-out data)."""
    for candidate in (datamodule, getattr(datamodule, "datamodule", None)):
        method = getattr(candidate, "evaluation_sets", None)
        if callable(method):
            return method
    if all(callable(getattr(datamodule, m, None)) for m in ("forget_dataloader", "retain_dataloader")):
        batch = next(iter(datamodule.forget_dataloader()), None)
        if (
            isinstance(batch, (tuple, list))
            and len(batch) >= 2
            and batch[1].dim() == 1
            and not batch[1].is_floating_point()
        ):
            return None
    raise TypeError(
        f"UnlearningEvaluation needs a datamodule with `evaluation_sets()` (e.g. FictitiousQA, or ForgetRetain "
        f"around it) or a classifier's ForgetRetain, got {type(datamodule).__name__}"
    )


CORPUS_SETTINGS = ("num_entities", "seed", "forget_percent")


def _check_corpus(checkpoint: str, datamodule: Any) -> None:
    """Refuse a retain model whose oracle settings file (``retain05.json`` beside ``retain05.pt``,
    written by :mod:`litplug.oracle`) names another corpus than the datamodule's; warn when a
    question-answering corpus's retain model has no such file (its corpus cannot be checked)."""
    record = Path(checkpoint).with_suffix(".json")
    corpus = next(
        (
            c
            for c in (datamodule, getattr(datamodule, "datamodule", None))
            if callable(getattr(c, "evaluation_sets", None))
        ),
        None,
    )
    if not Path(checkpoint).is_file():
        return
    if not record.is_file():
        if corpus is not None:
            rank_zero_warn(
                f"`retain_checkpoint` {checkpoint!r} has no settings file {record.name!r} beside it, so the corpus it "
                "was trained on (num_entities, seed, forget_percent) is not checked against the datamodule's; "
                "`python -m litplug.oracle` writes one"
            )
        return
    settings = load_json(record)
    if settings.get("kind") not in ("target", "retain"):
        return  # not an oracle record
    differing = [
        f"{k}: {settings[k]!r} there, {getattr(corpus, k)!r} here"
        for k in CORPUS_SETTINGS
        if k in settings and hasattr(corpus, k) and getattr(corpus, k) != settings[k]
    ]
    if differing:
        raise ValueError(
            f"`retain_checkpoint` {checkpoint!r} was trained on another corpus than the datamodule's "
            f"({'; '.join(differing)}, from {record.name}): scoring against it would compare other people"
        )


def _same_sets(a: dict[str, Any], b: dict[str, Any]) -> bool:
    return a.keys() == b.keys() and all(
        len(a[k]) == len(b[k])
        and all(x.shape == y.shape and torch.equal(x, y.to(x.device)) for x, y in zip(a[k], b[k]))
        for k in a
    )


class UnlearningEvaluation(Callback):
    """Score an unlearned model against a retain model with the unlearning metrics.

    Score the model against a retain model (trained without the forget data) with the whole
    suite of :func:`litplug.functional.unlearning_metrics.unlearning_suite`: forget quality (TOFU's
    KS-test p-value on truth ratios), truth ratios, exact memorisation, extraction strength, the MIA
    suite (LOSS, zlib, Min-K%, Min-K%++, reference) and privleak, and model utility.

    At the end of every ``every_n_epochs``-th validation epoch (and of ``test``), both models run
    over the datamodule's ``evaluation_sets()`` (:class:`litplug.datamodules.FictitiousQA`, also
    through ``ForgetRetain``), and each value is logged as ``unlearn/suite/<name>``; the last
    report is in :attr:`results`. On a classifier's ``ForgetRetain`` (``(inputs, targets)`` batches)
    the same language is spoken by :func:`~litplug.functional.unlearning_metrics.classifier_suite`:
    forget quality on the per-sample losses, accuracies, the LOSS attack and privleak, with the
    held-out data of the ``test`` loader (of the validation or test loaders; a datamodule of one's
    own with ``forget_dataloader()``/``retain_dataloader()`` gives its validation loader).

    The retain model has the module's backbone architecture: a copy
    of ``pl_module.backbone`` (or of ``pl_module`` without one) with the weights of
    ``retain_checkpoint``, read through :mod:`litplug.loading` (a Lightning checkpoint of any module
    holding it, a state dict, safetensors or a ``save_pretrained`` folder); a checkpoint of another
    architecture or vocabulary, a missing file, or a model of :mod:`litplug.oracle` whose settings file
    names another corpus (``num_entities``, ``seed``, ``forget_percent``) than the datamodule's, is
    refused at setup, before training. The retain
    model stays off the optimizer and out of the checkpoint; its per-sample statistics on the
    language-model sets are computed at the first evaluation and reused while the sets, the device
    and the precision stay the same.

    Distributed: every rank evaluates the same full sets (no collective; the values agree).

    Args:
        retain_checkpoint: the retain model's weights (a file or a ``save_pretrained`` folder).
        every_n_epochs: evaluate every k-th validation epoch (>= 1).
        on_validation: evaluate at validation end (``test`` always evaluates).
        batch_size: samples per forward pass (>= 1).

    Example:
        >>> UnlearningEvaluation("runs/qa/seed0/retain05.pt")  # doctest: +SKIP
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "unlearning": {
            "forget quality and privleak": ["^unlearn/suite/forget_quality$", "^unlearn/suite/privleak$"],
            "membership AUC (forget vs held-out)": ["^unlearn/suite/mia_"],
            "memorisation and utility": [
                "^unlearn/suite/forget_(em|es|prob|truth_ratio)$",
                "^unlearn/suite/model_utility$",
            ],
        }
    }

    def __init__(
        self, retain_checkpoint: str, every_n_epochs: int = 1, on_validation: bool = True, batch_size: int = 256
    ) -> None:
        check_path("retain_checkpoint", retain_checkpoint)
        check_positive_int("every_n_epochs", every_n_epochs)
        check_bool("on_validation", on_validation)
        check_positive_int("batch_size", batch_size)
        self.retain_checkpoint, self.every_n_epochs = retain_checkpoint, every_n_epochs
        self.on_validation, self.batch_size = on_validation, batch_size
        self.results: dict[str, float] = {}
        self._retain: list[nn.Module] = []  # a list keeps it out of any module's parameters
        self._retain_statistics: tuple[Any, dict[str, Any], dict[str, Any]] | None = None  # (key, sets, statistics)

    @staticmethod
    def _network(pl_module: LightningModule) -> nn.Module:
        return getattr(pl_module, "backbone", pl_module)

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        _evaluation_sets(trainer.datamodule)
        _check_corpus(self.retain_checkpoint, trainer.datamodule)
        if self._retain:
            return
        if not os.path.exists(self.retain_checkpoint):
            raise ValueError(
                f"`retain_checkpoint` {self.retain_checkpoint!r} does not exist: train the retain model first "
                "(python -m litplug.oracle)"
            )
        retain = copy.deepcopy(self._network(pl_module)).cpu()
        try:
            load_weights(retain, self.retain_checkpoint)
        except ValueError as err:
            raise ValueError(
                f"`retain_checkpoint` {self.retain_checkpoint!r} does not fit the model being unlearned (another "
                f"architecture or vocabulary?): {err}"
            ) from err
        self._retain.append(retain.eval().requires_grad_(False))

    def _evaluate(self, trainer: Trainer, pl_module: LightningModule) -> None:
        sets = _evaluation_sets(trainer.datamodule)
        network = self._network(pl_module)
        reference = next(network.parameters(), None)
        dtype = reference.dtype if reference is not None and reference.is_floating_point() else None
        retain = self._retain[0].to(device=pl_module.device, dtype=dtype)  # the precision the module runs in
        was_training = network.training
        network.eval()
        try:
            if sets is not None:
                data, texts = sets()
                statistics = suite_statistics(network, data, batch_size=self.batch_size)
                self.results = suite_from_statistics(statistics, self._statistics_of(retain, data), texts)
            else:
                dm = trainer.datamodule
                loaders = dm.test_dataloader() if trainer.testing else dm.val_dataloader()
                holdout = loaders.get("test", []) if isinstance(loaders, dict) else loaders
                self.results = classifier_suite(
                    network, retain, dm.forget_dataloader(), dm.retain_dataloader(), holdout
                )
        finally:
            network.train(was_training)
        for name, value in self.results.items():
            pl_module.log(f"unlearn/suite/{name}", value)

    def _statistics_of(self, retain: nn.Module, data: dict[str, Any]) -> dict[str, Any]:
        """The retain model's per-sample statistics on ``data``: computed once, and again only when
        the evaluation sets, the device or the precision change (the retain model never does)."""
        key = (str(next(retain.parameters()).device), next(retain.parameters()).dtype)
        cached = self._retain_statistics
        if cached is not None and cached[0] == key and _same_sets(cached[1], data):
            return cached[2]
        statistics = suite_statistics(retain, data, batch_size=self.batch_size)
        self._retain_statistics = (key, {k: tuple(t.clone() for t in v) for k, v in data.items()}, statistics)
        return statistics

    @override
    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.on_validation or trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        self._evaluate(trainer, pl_module)

    @override
    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._evaluate(trainer, pl_module)
