"""First-order sharpness of the whole model and of every layer on held batches, logged to
TensorBoard without touching training."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from lightning.fabric.utilities.apply_func import apply_to_collection
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from ..board import log_figure, write_charts
from ..figures import bar_chart
from ..functional.sharpness import EPS, global_norm
from ..plumbing import local, training_mode
from ..plumbing.loss import module_loss, require_loss
from ..plumbing.third_party_private import muted
from ..validation import check_bool, check_number, check_positive_int
from .passes import PerturbedWeights

__all__ = ["SharpnessMonitor"]

LAYER = "sharpness/layer/"


class SharpnessMonitor(Callback):
    """Log first-order sharpness ``L(w + e) - L(w)``, ``e = rho g / ||g||``, on held batches.

    Measured every ``every_n_epochs`` at the end of a training epoch for the whole model
    (``sharpness/model``) and, with ``layerwise``, for every layer owning parameters alone
    (``sharpness/layer/<NN>_<Type>_<path>``, e.g. ``sharpness/layer/02_Linear_backbone.2``: only
    that layer perturbed, along its own gradient; numbered input to output), which shows
    the "straggler" layers of "In Search of the Successful Interpolation". The held batches are
    the first ``num_batches`` training batches of the run (kept in the callback state, so a resumed
    run measures the same ones). The loss is the module's own (:func:`litplug.plumbing.loss.module_loss`:
    its ``batch_loss`` if it has one, else its ``training_step`` with logging muted), in eval mode
    and full precision; the monitor never steps an optimizer. Manual optimisation needs
    ``batch_loss`` (its ``training_step`` steps optimizers) and is refused at setup without it.
    Weights, gradients, RNG state, buffers and optimizer state are restored, so training is
    unchanged. A non-finite loss or gradient on the held batches is logged as it is (NaN/inf)
    and still leaves the weights bit-exact.

    Distributed: each rank measures on its own held batches with its own gradient (DDP; no
    collective besides the logged mean) or the reduce-scattered gradient (FSDP2: one backward and
    ``1 + layers`` forwards, all collective, on every rank).

    Args:
        every_n_epochs: measure every k-th epoch (>= 1).
        rho: perturbation radius (> 0).
        layerwise: also measure every layer alone.
        num_batches: number of held batches (>= 1).

    Example:
        >>> trainer = Trainer(callbacks=[SharpnessMonitor(rho=0.05)])  # doctest: +SKIP
    """

    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "sharpness": {"sharpness: whole model and every layer": ["^sharpness/"]},
    }

    def __init__(
        self, every_n_epochs: int = 1, rho: float = 0.05, layerwise: bool = True, num_batches: int = 1
    ) -> None:
        super().__init__()
        check_positive_int("every_n_epochs", every_n_epochs)
        check_number("rho", rho, low=0, low_open=True)
        check_bool("layerwise", layerwise)
        check_positive_int("num_batches", num_batches)
        self.every_n_epochs = every_n_epochs
        self.rho = rho
        self.layerwise = layerwise
        self.num_batches = num_batches
        self._held: list[Any] = []

    @property
    def held(self) -> list[Any]:
        """The held batches the sharpness is measured on (the first ``num_batches`` of the run)."""
        return self._held

    @held.setter
    def held(self, batches: list[Any]) -> None:
        self._held = list(batches)

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if len(self._held) < self.num_batches:
            self._held.append(_clone(batch))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            require_loss(pl_module, "SharpnessMonitor")

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        write_charts(trainer)

    @override
    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # The logged (reduced over ranks) values of the last measurement, one bar per layer.
        layers = {k[len(LAYER) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(LAYER)}
        if layers:
            log_figure(
                trainer,
                "sharpness/layers",
                lambda: bar_chart(layers, f"per-layer sharpness (rho={self.rho:g})", "L(w + e) - L(w)"),
            )

    def _loss(self, pl_module: LightningModule) -> Tensor:
        losses = [module_loss(pl_module, batch, i).float() for i, batch in enumerate(self._held)]
        return torch.stack(losses).mean()

    @override
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0 or not self._held:
            return
        device = pl_module.device
        self._held = [_to(b, device) for b in self._held]
        values = self.measure(pl_module)
        for key, value in values.items():
            pl_module.log(f"sharpness/{key}", value, on_step=False, on_epoch=True, sync_dist=True, batch_size=1)

    @torch.no_grad()
    def measure(self, pl_module: LightningModule) -> dict[str, Tensor]:
        """``{"model": ..., "layer/<name>": ...}`` on the held batches; restores everything."""
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        params = [p for _, p in named]
        saved_grads = [p.grad for p in params]
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        out: dict[str, Tensor] = {}
        perturbed = PerturbedWeights()  # w + e swapped in and out, bit-exact; freed before returning
        with (
            torch.random.fork_rng(devices=devices),
            muted(pl_module, None, freeze_bn_stats=False),
            training_mode(pl_module, False),
        ):
            try:
                for p in params:
                    p.grad = None
                with torch.enable_grad():
                    base = self._loss(pl_module)
                    base.backward()
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                base = base.detach()
                groups: dict[str, list[int]] = {"model": list(range(len(params)))}
                if self.layerwise:
                    keys: dict[str, str] = {}  # module path -> its key, numbered in parameter order
                    for i, (name, _) in enumerate(named):
                        path = name.rsplit(".", 1)[0] if "." in name else ""
                        key = keys.setdefault(path, _layer_key(pl_module, path, len(keys)))
                        groups.setdefault(key, []).append(i)
                for key, idx in groups.items():
                    ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
                    alpha = self.rho / (global_norm(gs) + EPS)  # e = rho g / ||g||, never materialised
                    perturbed.apply_(ps, [local(g) for g in gs], alpha)
                    try:
                        out[key] = self._loss(pl_module).detach() - base
                    finally:
                        perturbed.restore_()
            finally:
                perturbed.release()
                for p, g in zip(params, saved_grads):
                    p.grad = g
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"held": [_to(b, "cpu") for b in self._held]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._held = list(state_dict["held"])


def _layer_key(pl_module: LightningModule, path: str, index: int) -> str:
    """``layer/<NN>_<Type>_<path>`` for the module at ``path``: ``NN`` (``index``) its position in
    parameter order (so TensorBoard lists layers input to output, not ``.10`` before ``.2``), then
    its class and its path, e.g. ``layer/02_Linear_backbone.2``."""
    kind = type(pl_module.get_submodule(path)).__name__ if path else type(pl_module).__name__
    return f"layer/{index:02d}_{kind}_{path or 'module'}"


def _clone(batch: Any) -> Any:
    return _map(batch, lambda t: t.detach().clone())


def _to(batch: Any, device: Any) -> Any:
    return _map(batch, lambda t: t.to(device))


def _map(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    return apply_to_collection(batch, Tensor, fn)
