"""Every public callback of ``litplug.callbacks`` with a small setup to run it in: used by
tests/test_registry.py (runs under ddp, survives a checkpoint resume). A method family adds its
callbacks to ``CASES`` when it adds them to ``litplug.callbacks.__all__``; a test fails if one is
missing."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import Callback, LightningDataModule, LightningModule

from litplug.callbacks import (
    ELR,
    EMA,
    PSKD,
    SAM,
    SWA,
    BoundTightness,
    CheckpointSoup,
    DataPruning,
    GradientAscentSearch,
    IBPWarmup,
    SharpnessMonitor,
    SurrogateSharpness,
    UnlearningEvaluation,
    UnlearningMask,
    WiSEFT,
)
from litplug.datamodules import Digits, FictitiousQA, ForgetRetain, Indexed, OfflineDesigns
from litplug.modules import MLP, CertifiedClassifier, Classifier, Regressor, Unlearner


def small_classifier() -> LightningModule:
    return Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32], batch_norm=True), num_classes=10)


def digits() -> LightningDataModule:
    return Digits(batch_size=32)


@dataclass
class Case:
    """How to run one callback (or several together): ``callback()`` in ``Trainer(callbacks=...)``
    with ``model()`` on ``data()``. ``trainer`` adds Trainer arguments (e.g. ``gradient_clip_val``)."""

    callback: Callable[[], Callback | list[Callback]]
    model: Callable[[], LightningModule] = small_classifier
    data: Callable[[], LightningDataModule] = digits
    trainer: dict[str, Any] = field(default_factory=dict)

    def callbacks(self) -> list[Callback]:
        made = self.callback()
        return made if isinstance(made, list) else [made]


CASES: dict[str, Case] = {}

# Sharpness (callbacks/sam.py, ignite.py, monitor.py).
CASES["SAM"] = Case(lambda: SAM(rho=0.05, every_n_steps=2), trainer={"gradient_clip_val": 1.0})
CASES["SurrogateSharpness"] = Case(lambda: SurrogateSharpness(rho=0.05, epsilon=0.01, lambda_init=0.1, lambda_lr=0.1))
CASES["SharpnessMonitor"] = Case(lambda: SharpnessMonitor(rho=0.05))

# Weight averaging (callbacks/ema.py, swa.py). SWA snapshots from epoch 0 so both epochs update, under SWALR.
CASES["EMA"] = Case(lambda: EMA(decay=0.9, warmup=True))
CASES["SWA"] = Case(lambda: SWA(start_epoch=0, swa_lrs=0.05, annealing_epochs=1))

# Merges inside training (callbacks/checkpoint_soup.py, callbacks/wise_ft.py): chosen on the
# validation batches at fit end, rank zero's merge broadcast.
CASES["CheckpointSoup"] = Case(lambda: CheckpointSoup(k=2))
CASES["WiSEFT"] = Case(lambda: WiSEFT(alpha=[0.5, 1.0]))


# Unlearning (callbacks/unlearning.py): the mask needs forget data and an Unlearner.
def small_unlearner() -> LightningModule:
    return Unlearner(
        MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32], batch_norm=True), None, "gradient_difference"
    )


def forget_digits() -> LightningDataModule:
    return ForgetRetain(Digits(batch_size=32), scenario="class", forget_classes=[0])


CASES["UnlearningMask"] = Case(
    callback=lambda: UnlearningMask("saliency", ratio=0.5, num_batches=2),
    model=small_unlearner,
    data=forget_digits,
    trainer={"gradient_clip_val": 1.0},
)


# Unlearning evaluation (callbacks/unlearning_evaluation.py): an Unlearner on the QA corpus, scored
# against a retain model (an untrained network written once per machine: the callback's mechanics,
# not the metrics' values, are what the registry checks).
def qa_corpus() -> LightningDataModule:
    return ForgetRetain(FictitiousQA(num_entities=20, forget_percent=10, batch_size=16), "class", [1])


def qa_unlearner() -> LightningModule:
    from litplug.oracle import backbone

    return Unlearner(backbone(qa_corpus().datamodule), None, "gradient_difference", objective="causal_lm")


def qa_retain_checkpoint() -> str:
    import os
    import tempfile
    from pathlib import Path

    import torch

    with torch.random.fork_rng():
        torch.manual_seed(0)
        state = qa_unlearner().backbone.state_dict()
    # named by the vocabulary and length, so a file written for another corpus is never picked up
    vocab, length = state["embed.weight"].shape[0], state["position.weight"].shape[0]
    path = Path(tempfile.gettempdir()) / f"litplug_registry_qa_retain_{vocab}x{length}.pt"
    if not path.exists():
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        tmp.replace(path)
    return str(path)


CASES["UnlearningEvaluation"] = Case(
    callback=lambda: UnlearningEvaluation(qa_retain_checkpoint()), model=qa_unlearner, data=qa_corpus
)


# Certified training (callbacks/certified.py).
def certified_classifier() -> LightningModule:
    backbone = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32], batch_norm=True)
    return CertifiedClassifier(backbone, num_classes=10, eps=0.1)


# Epoch 0 natural, epoch 1 the eps ramp with regularizers: resume restores the schedule position.
CASES["IBPWarmup"] = Case(callback=lambda: IBPWarmup(start_epoch=1, ramp_epochs=1), model=certified_classifier)


def crown_ibp_classifier() -> LightningModule:
    backbone = MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[32], batch_norm=True)
    return CertifiedClassifier(backbone, num_classes=10, eps=0.1, bound="crown-ibp")


# The tightness monitor (CROWN / IBP widths) beside the warmup: stateless, the same on every rank.
CASES["BoundTightness"] = Case(
    callback=lambda: [IBPWarmup(start_epoch=0, ramp_epochs=1), BoundTightness(num_samples=8)],
    model=certified_classifier,
)

# CROWN-IBP training (beta from 1 to 0 over the ramp) with the warmup regularizers.
CASES["IBPWarmup(crown-ibp)"] = Case(
    callback=lambda: IBPWarmup(start_epoch=1, ramp_epochs=1), model=crown_ibp_classifier
)

# Families combined in one run (SAM + EMA + IBP; the mask under SAM and EMA), held to
# the same bar: identical ranks under ddp, bit-identical resume.
CASES["IBPWarmup+SAM+EMA"] = Case(
    callback=lambda: [IBPWarmup(start_epoch=1, ramp_epochs=1), SAM(rho=0.05), EMA(decay=0.9)],
    model=certified_classifier,
    trainer={"gradient_clip_val": 10.0},
)
CASES["UnlearningMask+SAM+EMA"] = Case(
    callback=lambda: [
        UnlearningMask("attribution", ratio=0.3, num_batches=2),
        SAM(rho=0.05, adaptive=True),
        EMA(decay=0.9),
    ],
    model=small_unlearner,
    data=forget_digits,
)


# Offline optimisation (callbacks/offline.py): a surrogate on the built-in sphere task.
def small_regressor() -> LightningModule:
    return Regressor(MLP(input_shape=[4], num_outputs=1, hidden=[32], batch_norm=True))


def offline_sphere() -> LightningDataModule:
    return OfflineDesigns("sphere", dim=4, num_samples=600, batch_size=32)


CASES["GradientAscentSearch"] = Case(
    lambda: GradientAscentSearch(num_designs=16, steps=10), model=small_regressor, data=offline_sphere
)
# The offline workflow with IGNITE training the surrogate.
CASES["GradientAscentSearch+SurrogateSharpness"] = Case(
    callback=lambda: [
        SurrogateSharpness(lambda_init=0.1, lambda_lr=0.1),
        GradientAscentSearch(num_designs=16, steps=10),
    ],
    model=small_regressor,
    data=offline_sphere,
)


# Data pruning (callbacks/pruning.py): scored at the end of epoch 0, pruned in epoch 1, so the
# resumed run starts from a checkpoint holding the kept set and the forgetting counts.
def indexed_digits() -> LightningDataModule:
    return Indexed(digits())


CASES["DataPruning"] = Case(lambda: DataPruning("forgetting", keep=0.5, score_epoch=0), data=indexed_digits)
CASES["DataPruning+SAM+EMA"] = Case(
    callback=lambda: [DataPruning("grand", keep=0.3, score_epoch=0), SAM(rho=0.05), EMA(decay=0.9)],
    data=indexed_digits,
)

# Noisy labels (callbacks/elr.py, callbacks/pskd.py): per-example state synchronised at epoch end.
CASES["ELR"] = Case(lambda: ELR(beta=0.7, lam=3.0), data=indexed_digits)
CASES["PSKD"] = Case(lambda: PSKD(alpha=0.8), data=indexed_digits)
# scores averaged with a re-initialised copy: the copy leaves ELR's hook on the module alone
CASES["ELR+DataPruning+SAM"] = Case(
    callback=lambda: [ELR(), DataPruning("el2n", keep=0.5, score_epoch=0, seeds=2), SAM(rho=0.05)], data=indexed_digits
)


# --- Foreign modules (tests/foreign.py): every public callback x these columns, in
# test_registry.py's foreign-module matrix. Each column is a module litplug did not write, its data
# (with forget/retain loaders where the module is a classifier or an LM) and Trainer arguments.
@dataclass
class Column:
    model: Callable[[], LightningModule]
    data: Callable[[], LightningDataModule]
    trainer: dict[str, Any] = field(default_factory=dict)


def _foreign_columns() -> dict[str, Column]:
    import foreign

    return {
        "boring": Column(foreign.boring, foreign.boring_data),
        "lm": Column(foreign.lm, foreign.tokens),
        "handwritten": Column(
            foreign.Handwritten, foreign.features, {"accumulate_grad_batches": 2, "gradient_clip_val": 0.5}
        ),
        "manual": Column(foreign.Manual, foreign.features),
        "two_optimizers": Column(foreign.TwoOptimizers, foreign.features),
    }


COLUMNS: dict[str, Column] = _foreign_columns()
