"""Certified (IBP) training of a classifier: :class:`CertifiedClassifier`.

Method card: Gowal et al. 2018 (IBP training) with the loss of Shi et al. 2021. The robust loss is
the cross-entropy of the negated margin lower bounds, ``CE(-m, y)`` with
``m_j <= z_y - z_j`` over the pixel-space L-inf ball of radius ``eps_t`` (``m_y = 0``), computed
by :mod:`litplug.bounds` with last-layer elision. The training loss is
``kappa * CE(z, y) + (1 - kappa) * CE(-m, y)`` with ``kappa = 1 - (1 - kappa_final) * eps_t / eps``,
so a scheduled ``eps_t = 0`` is natural training. Cost: about two forward/backward passes of the
network per step while ``eps_t > 0`` (centre and radius), none extra at ``eps_t = 0``; verification
(:meth:`CertifiedClassifier.certify`) about two forward passes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torchmetrics import MeanMetric
from typing_extensions import override

from ..board import has_tensorboard, log_figure
from ..bounds import BoundResult, bounded, input_box, linear_bounds, margin_spec, warmup_regularizers
from ..figures import bar_chart, line_chart
from ..functional.certified import linearized_tightness, pgd_attack
from ..plumbing import training_mode
from ..validation import check_choice, check_int, check_list, check_number
from .classifier import Classifier

Batch = tuple[torch.Tensor, torch.Tensor]


class CertifiedClassifier(Classifier):
    """A classifier trained to be verifiably robust with interval bound propagation.

    It implements the *certified interface* driven by :class:`litplug.callbacks.IBPWarmup`
    (``eps``, ``current_eps``, ``regularizer_weight``, ``regularizer_tolerance``, ``backbone``).
    Without that callback it trains at ``current_eps = eps`` from the first step.

    Logs ``train/loss``, ``certified/eps``, ``certified/kappa``, ``certified/robust_loss``,
    ``certified/unstable_relu`` (fraction of ReLUs whose bounds straddle 0),
    ``certified/reg_tightness`` and ``certified/reg_relu`` (when the warmup regularizers are on),
    ``certified/beta`` (``bound="crown-ibp"``, while ``beta > 0``);
    on validation/test ``{val,test}/acc`` (clean), ``{val,test}/verified_acc`` (all margin lower
    bounds > 0 at ``eps``), ``{val,test}/pgd_acc`` (when ``pgd_steps > 0``),
    ``certified/verified_acc`` (validation) and, every ``tightness_every_n_epochs``,
    ``certified/tightness`` on the first validation batch.

    The pixel-space ``eps`` is mapped through ``mean``/``std`` and clamped to ``pixel_range``;
    left as ``None`` they are read from ``trainer.datamodule`` at setup (litplug datamodules
    carry them) and saved in checkpoints.

    ``training_step`` is a pure function of (weights, batch, ``current_eps``,
    ``regularizer_weight``): the schedule moves in the callback's batch-start hook, so a callback
    that re-runs the step (SAM) sees the same objective twice.

    Distributed: DDP adds no collective beyond the gradient all-reduce; bounds are per rank and
    batch norm uses the rank's clean batch (use no BN for results identical to one process on the
    global batch). FSDP2 (ModelParallelStrategy) is rejected at setup: the bound engine reads full
    weights. Verified accuracy is computed in float32 with autocast off, so mixed precision never
    inflates it.

    Args:
        backbone: ``torch.fx``-traceable network (checked at construction).
        num_classes: number of classes (>= 2).
        eps: target L-inf radius in pixel space (>= 0).
        kappa_final: weight of the clean loss once ``current_eps`` reaches ``eps``, in [0, 1].
        pgd_steps: PGD steps for ``pgd_acc`` in validation/test (0 disables the attack).
        mean, std, pixel_range: input normalisation; ``None`` reads them from the datamodule.
        tightness_every_n_epochs: how often to log ``certified/tightness`` (0 disables it).
        bound: the margin bounds of the robust loss: ``"ibp"``, or ``"crown-ibp"`` (Zhang et al.
            2020): ``m = beta * m_CROWN-IBP + (1 - beta) * m_IBP`` with ``beta = 1 - eps_t / eps``
            (1 to 0 over the eps ramp of :class:`~litplug.callbacks.IBPWarmup`; pure IBP, at IBP's
            cost, once ``eps_t = eps``). One interval pass gives both bounds and the
            intermediate bounds; the CROWN pass runs backwards with the margin specification
            folded into the last linear layer (one row per class).
        optimizer, lr_scheduler: as in :class:`~litplug.modules.Classifier`.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> from litplug.callbacks import IBPWarmup
        >>> from litplug.datamodules import Digits
        >>> from litplug.modules import MLP, CertifiedClassifier
        >>> model = CertifiedClassifier(MLP(input_shape=[1, 8, 8], num_outputs=10), num_classes=10, eps=0.1)
        >>> Trainer(max_epochs=10, callbacks=[IBPWarmup(ramp_epochs=5)]).fit(model, Digits())  # doctest: +SKIP
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        **Classifier.litplug_charts,
        "certified": {
            "accuracy: clean vs verified vs PGD (validation)": ["^val/acc$", "^val/verified_acc$", "^val/pgd_acc$"],
            "eps ramp and clean-loss weight kappa": ["^certified/eps$", "^certified/kappa$"],
            "losses: robust vs train": ["^certified/robust_loss$", "^train/loss$"],
            "unstable ReLUs and tightness": ["^certified/unstable_relu$", "^certified/tightness$"],
        },
    }

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int = 10,
        eps: float = 0.1,
        kappa_final: float = 0.0,
        pgd_steps: int = 0,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        pixel_range: tuple[float, float] | None = None,
        tightness_every_n_epochs: int = 1,
        bound: Literal["ibp", "crown-ibp"] = "ibp",
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        check_number("eps", eps, low=0)
        check_choice("bound", bound, ("ibp", "crown-ibp"))
        check_number("kappa_final", kappa_final, 0, 1)
        check_int("pgd_steps", pgd_steps, low=0)
        check_int("tightness_every_n_epochs", tightness_every_n_epochs, low=0)
        if mean is not None:
            check_list("mean", mean, check_number, nonempty=True)
        if std is not None:
            check_list("std", std, lambda n, v: check_number(n, v, low=0, low_open=True), nonempty=True)
        if pixel_range is not None:
            ends = check_list("pixel_range", pixel_range, lambda n, v: check_number(n, v, allow_inf=True))
            if len(ends) != 2 or not ends[0] < ends[1]:
                raise ValueError(f"`pixel_range` must be [low, high] with low < high, got {list(pixel_range)!r}")
        super().__init__(backbone, num_classes, optimizer, lr_scheduler)
        bounded(backbone)  # raises UnsupportedOperationError naming the op before training starts
        self.eps = float(eps)
        self.kappa_final = kappa_final
        self.pgd_steps = pgd_steps
        self.tightness_every_n_epochs = tightness_every_n_epochs
        self.bound = bound
        self.normalization: dict[str, Any] | None = None
        if mean is not None or std is not None or pixel_range is not None:
            self.normalization = {
                "mean": tuple(mean if mean is not None else (0.0,)),
                "std": tuple(std if std is not None else (1.0,)),
                "pixel_range": tuple(pixel_range if pixel_range is not None else (-math.inf, math.inf)),
            }
        # The certified interface (set by IBPWarmup at every batch start).
        self.current_eps = self.eps
        self.regularizer_weight = 0.0
        self.regularizer_tolerance = 0.5
        self.val_verified, self.test_verified = MeanMetric(), MeanMetric()
        self.val_pgd, self.test_pgd = MeanMetric(), MeanMetric()

    @property
    def kappa(self) -> float:
        """Weight of the clean loss at the current eps: 1 at ``eps_t = 0``, ``kappa_final`` at ``eps``."""
        progress = min(self.current_eps / self.eps, 1.0) if self.eps > 0 else 1.0
        return 1.0 - (1.0 - self.kappa_final) * progress

    @property
    def beta(self) -> float:
        """Weight of the CROWN-IBP bound in the robust loss (``bound="crown-ibp"``): 1 at
        ``eps_t = 0``, 0 at ``eps`` (Zhang et al. 2020); always 0 with ``bound="ibp"``."""
        if self.bound == "ibp" or self.eps == 0:
            return 0.0
        return 1.0 - min(self.current_eps / self.eps, 1.0)

    @override
    def setup(self, stage: str) -> None:
        if self.normalization is None:
            dm = getattr(self.trainer, "datamodule", None)
            if dm is None or not all(hasattr(dm, a) for a in ("mean", "std", "pixel_range")):
                raise ValueError(
                    "CertifiedClassifier needs the input normalisation to map the pixel-space `eps`: "
                    "pass `mean`, `std` and `pixel_range`, or use a datamodule that has these attributes"
                )
            self.normalization = {"mean": tuple(dm.mean), "std": tuple(dm.std), "pixel_range": tuple(dm.pixel_range)}

    @override
    def configure_model(self) -> None:
        if self.device_mesh is not None:
            raise ValueError(
                "CertifiedClassifier does not support ModelParallelStrategy (FSDP2): the interval bound engine needs "
                "full weights; use strategy='ddp'"
            )
        super().configure_model()

    def box(self, x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised input box of the pixel-space ``eps`` ball around the normalised batch ``x``."""
        assert self.normalization is not None, "setup() has not run: pass mean/std/pixel_range"
        return input_box(x, eps, **self.normalization)

    def robust_terms(
        self, x: torch.Tensor, y: torch.Tensor, eps: float, record_relu: bool = False, clean_output: bool = True
    ) -> Any:
        """Bounds on the margins of ``(x, y)`` at ``eps`` (see :class:`~litplug.bounds.BoundResult`).

        ``clean_output=False``: the clean batch is carried along only where the bounds depend on it
        (batch norm with batch statistics), so ``result.clean`` may be None; this saves a third
        of the affine layers' work (the centre pass runs on ``n``, not ``2n``, samples)."""
        lower, upper = self.box(x, eps)
        engine = bounded(self.backbone)
        clean = x if clean_output or engine.uses_batch_statistics() else None
        return engine(lower, upper, clean=clean, spec=margin_spec(y, self.num_classes), record_relu=record_relu)

    @override
    def batch_loss(self, batch: Batch) -> torch.Tensor:
        """The training objective at ``current_eps`` on an ``(x, y)`` batch
        (:class:`litplug.protocols.HasBatchLoss`): what ``training_step`` returns, without its logs."""
        return self._objective(batch)[0]

    def _objective(self, batch: Batch) -> tuple[torch.Tensor, dict[str, Any]]:
        """The loss and the values ``training_step`` logs: ``{name: (value, sync_dist)}``."""
        x, y = batch
        eps, kappa = self.current_eps, self.kappa
        logs: dict[str, Any] = {"certified/eps": (eps, False), "certified/kappa": (kappa, False)}
        if eps == 0:
            return self.loss(self(x), y), logs
        beta = self.beta
        if beta > 0:
            lower, upper = self.box(x, eps)
            spec = margin_spec(y, self.num_classes)
            both = linear_bounds(bounded(self.backbone), lower, upper, "crown-ibp", spec, x, False, True)
            margins = beta * both.lower + (1 - beta) * both.ibp_lower
            result = BoundResult(margins, margins, both.clean, both.ibp_relu)
            logs["certified/beta"] = (beta, False)
        else:
            result = self.robust_terms(x, y, eps, record_relu=True)
        robust = F.cross_entropy(-result.lower, y)
        loss = kappa * F.cross_entropy(result.clean, y) + (1 - kappa) * robust
        if self.regularizer_weight > 0:
            lower, upper = self.box(x, eps)
            tight, relu = warmup_regularizers(result.relu, (upper - lower) / 2, self.regularizer_tolerance)
            loss = loss + self.regularizer_weight * (tight + relu)
            logs["certified/reg_tightness"] = (tight, False)
            logs["certified/reg_relu"] = (relu, False)
        if result.relu:
            with torch.no_grad():  # count_nonzero: no int64 copy of the masks, as .sum() makes
                unstable = sum(torch.count_nonzero((lo < 0) & (up > 0)) for lo, up in result.relu)
            total = sum(lo.numel() for lo, _ in result.relu)
            logs["certified/unstable_relu"] = (unstable.float() / total, True)
        logs["certified/robust_loss"] = (robust, True)
        return loss, logs

    @override
    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        loss, logs = self._objective(batch)
        for name, (value, sync) in logs.items():
            self.log(name, value, sync_dist=sync)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def certify(self, x: torch.Tensor, y: torch.Tensor, method: str = "ibp") -> dict[str, torch.Tensor]:
        """Per-sample ``verified`` (all margins > 0 at ``eps``, float32, autocast off) and, with
        ``pgd_steps > 0``, ``pgd_correct``. ``method``: the verifier, ``"ibp"``, ``"crown-ibp"``
        or ``"crown"`` (:func:`litplug.bounds.crown_bounds`; tighter, slower: in eval mode it runs
        on the samples that CROWN-IBP does not verify and that are classified correctly, the others
        being decided already).

        Cost (eval mode, gradients off): about two forward passes of the backbone (centre and
        radius; the clean batch is not carried along unless batch norm is in train mode), i.e.
        about 0.5x the plain forward's throughput. ``|W|`` of every conv/linear weight is kept
        between calls (one copy of those weights, freed with the model) and recomputed after any
        in-place change of the weight (optimizer step, ``load_state_dict``); a write through
        ``weight.data`` is not seen by autograd's version counter: write under ``torch.no_grad()``.
        """
        check_choice("method", method, ("ibp", "crown-ibp", "crown"))
        out: dict[str, torch.Tensor] = {}
        with torch.autocast(x.device.type, enabled=False):
            x32 = x.float()
            others = torch.ones(len(y), self.num_classes, dtype=torch.bool, device=y.device)
            others.scatter_(1, y[:, None], False)
            if method == "ibp":
                margins = self.robust_terms(x32, y, self.eps, clean_output=False).lower
                out["verified"] = ((margins > 0) | ~others).all(1)
            else:
                lower, upper = self.box(x32, self.eps)
                engine, spec = bounded(self.backbone), margin_spec(y, self.num_classes)
                first = method if engine.uses_batch_statistics() else "crown-ibp"
                margins = linear_bounds(engine, lower, upper, first, spec, None, False, tighten=True).lower
                verified = ((margins > 0) | ~others).all(1)
                if method != first:
                    # CROWN's tightened bound is never below CROWN-IBP's, and no bound verifies a
                    # sample misclassified at its clean input (inside the box): CROWN runs on the
                    # rest only (bounds are per sample: no batch statistics)
                    todo = (~verified & (self.backbone(x32).argmax(1) == y)).nonzero()[:, 0]
                    if len(todo):
                        box = lower[todo], upper[todo]
                        bounds = linear_bounds(engine, *box, "crown", spec[todo], None, False, tighten=True).lower
                        verified[todo] = ((bounds > 0) | ~others[todo]).all(1)
                out["verified"] = verified
            if self.pgd_steps > 0:
                lower, upper = self.box(x32, self.eps)
                adv = pgd_attack(self.backbone, x32, y, lower, upper, self.pgd_steps)
                out["pgd_correct"] = self(adv).argmax(1) == y
        return out

    def _evaluate(self, batch: Batch, stage: str, metric: Any) -> None:  # type: ignore[override]
        super()._evaluate(batch, stage, metric)
        x, y = batch
        result = self.certify(x, y)
        verified = self.val_verified if stage == "val" else self.test_verified
        verified.update(result["verified"].float())
        self.log(f"{stage}/verified_acc", verified)
        if stage == "val":
            self.log("certified/verified_acc", verified)
        if "pgd_correct" in result:
            pgd = self.val_pgd if stage == "val" else self.test_pgd
            pgd.update(result["pgd_correct"].float())
            self.log(f"{stage}/pgd_acc", pgd)

    @override
    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        super().validation_step(batch, batch_idx)
        every = self.tightness_every_n_epochs
        if batch_idx == 0 and every > 0 and self.current_epoch % every == 0 and self.eps > 0:
            x = batch[0].float()
            lower, upper = self.box(x, self.eps)
            self.log("certified/tightness", linearized_tightness(self.backbone, x, (upper - lower) / 2), sync_dist=True)

    @override
    def on_fit_end(self) -> None:
        loader = self.trainer.val_dataloaders
        if self.eps == 0 or not loader or not has_tensorboard(self.trainer):
            return
        batch = next(iter(loader[0] if isinstance(loader, (list, tuple)) else loader))
        x, y = self.trainer.strategy.batch_to_device(batch)
        profile = self.bound_profile(x, y)
        title = f"on the first validation batch, eps={self.eps:g}"
        width, unstable = profile["bound_width"], profile["unstable_relu"]
        log_figure(self.trainer, "certified/layer_bound_width", lambda: bar_chart(width, title, "mean u - l"))
        log_figure(self.trainer, "certified/layer_unstable_relu", lambda: bar_chart(unstable, title, "fraction"))
        log_figure(
            self.trainer,
            "certified/verified_vs_eps",
            lambda: line_chart(profile["eps"], {"verified": profile["verified_acc"]}, title, "eps", "accuracy"),
        )

    @torch.no_grad()
    def bound_profile(self, x: torch.Tensor, y: torch.Tensor, points: int = 7) -> dict[str, Any]:
        """The numbers behind the certified figures, in eval mode and float32: per ReLU layer the
        mean pre-activation bound width ``u - l`` and the fraction of unstable ReLUs (``l < 0 < u``)
        at ``eps``, and the verified accuracy of ``(x, y)`` at ``points`` radii from 0 to
        ``1.5 eps``. Under DDP every rank takes part; the values are the mean over ranks."""
        radii = [1.5 * self.eps * i / (points - 1) for i in range(points)]
        x = x.float()
        with torch.autocast(x.device.type, enabled=False), training_mode(self, False):
            relu = self.robust_terms(x, y, self.eps, record_relu=True, clean_output=False).relu
            others = torch.ones(len(y), self.num_classes, dtype=torch.bool, device=x.device)
            others.scatter_(1, y[:, None], False)
            verified = [
                ((self.robust_terms(x, y, e, clean_output=False).lower > 0) | ~others).all(1).float().mean()
                for e in radii
            ]
        stats = torch.stack(
            [
                *((up - lo).mean() for lo, up in relu),
                *(((lo < 0) & (up > 0)).float().mean() for lo, up in relu),
                *verified,
            ]
        )
        stats = self.trainer.strategy.reduce(stats, reduce_op="mean").tolist()
        names = [f"relu {i + 1}" for i in range(len(relu))]
        return {
            "bound_width": dict(zip(names, stats[: len(relu)])),
            "unstable_relu": dict(zip(names, stats[len(relu) : 2 * len(relu)])),
            "eps": radii,
            "verified_acc": stats[2 * len(relu) :],
        }

    @override
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["certified_normalization"] = self.normalization

    @override
    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.normalization = checkpoint.get("certified_normalization", self.normalization)
