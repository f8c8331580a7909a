"""IGNITE's surrogate sharpness constraint as a callback (offline model-based optimisation): the
sharpness of a surrogate's mean prediction, bounded with a Lagrange multiplier. Cost: two extra
forward/backward passes of the model on the step's inputs.

The formulas are :func:`litplug.functional.ignite_gradient_` and
:func:`litplug.functional.dual_ascent`; the closure machinery is
:class:`litplug.callbacks.passes._ExtraPasses`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from typing_extensions import override

from ..functional.sharpness import EPS, dual_ascent, global_norm, ignite_gradient_
from ..plumbing import local, loss_scale
from ..validation import check_bool, check_number
from .passes import _ExtraPasses

__all__ = ["SurrogateSharpness"]


class SurrogateSharpness(_ExtraPasses):
    """IGNITE: constrain the sharpness of a surrogate's mean prediction with a Lagrange multiplier.

    ``G(b) = mean over the batch of f_b(x)`` on the step's clean inputs ``x = batch[input_index]``
    (the mean over all outputs for a multi-output model). The constraint ``rho ||grad_b G|| <=
    epsilon`` enters the loss's gradient through a finite difference::

        b_hat = b + radius * grad G(b) / ||grad G(b)||                  (global norm)
        final = grad L(b) + (lambda rho / radius) (grad G(b_hat) - grad G(b))

    with ``lambda`` the current multiplier, then (``adaptive_lambda``) dual ascent
    ``lambda <- max(0, lambda + lambda_lr (rho ||grad G(b)|| - epsilon))``. The clamp at 0 keeps
    ``lambda`` a valid multiplier (the reference code omits it); a non-finite norm (a skipped fp16
    step, or a non-finite model output) leaves ``lambda`` unchanged; the loss itself never enters
    the dual step, so a NaN/inf loss cannot poison ``lambda``. ``lambda`` is saved in the callback
    state. The original weights are put back (bit-exact) before the optimizer step; the optimizer
    and its state are the base optimizer's.
    Cost: two extra forward/backward passes of the model per step (all micro-batches). Memory: a
    copy of the loss gradient and ``grad G(b)`` while ``b_hat`` is built, and the buffer of the
    perturbed weights (:class:`~litplug.callbacks.passes.PerturbedWeights`, kept between steps):
    2x the parameter bytes over plain training at the peak.

    Distributed: under DDP the loss gradient's all-reduce is deferred to the last backward (on the
    combined gradient) and ``grad G(b)`` is all-reduced once, so ``b_hat``, ``lambda`` and the
    final gradient are identical on all ranks: two gradient all-reduces per step. Under FSDP2 each
    of the three backwards reduce-scatters; ``||grad G||`` is the global norm.

    Logs ``ignite/lambda`` (the multiplier used in the step) and ``ignite/output_grad_norm``
    (``||grad G(b)||``).

    Defaults: the IGNITE authors' code (cuong-dm/IGNITE) sets its per-task values in Python
    scripts (``scripts/IGNITE/*.py``, called by the repository's shell scripts) that litplug could
    not consult, and the paper does not state them, so the defaults are litplug's:
    ``rho = radius = 0.05``, ``epsilon = 0.1``, ``lambda_init = 1e-3`` and ``lambda_lr = 0.1``.
    The dual step is the one that enforces the constraint within a short run: with ``1e-3`` the
    multiplier stays below ~0.06 over 540 steps while ``rho ||grad G||`` stays at twice
    ``epsilon`` (no measurable effect on any offline task); with ``0.1`` it binds
    (benchmarks/RESULTS.md, offline optimisation: +20% on Ackley, -7.5% on Hartmann).

    Args:
        rho: sharpness radius in the constraint, > 0.
        radius: finite-difference step, > 0.
        epsilon: allowed sharpness, >= 0.
        lambda_init: initial multiplier, >= 0.
        lambda_lr: dual ascent step, >= 0.
        adaptive_lambda: update ``lambda`` by dual ascent (else fixed at ``lambda_init``).
        input_index: index (or key) of the inputs in a batch (a batch that is one tensor is the
            inputs). The module's ``forward`` must take the inputs alone (checked at setup).
        start_step: plain training steps before the constraint begins (>= 0; ``lambda`` stays at
            ``lambda_init`` until then).

    Example:
        >>> trainer = Trainer(callbacks=[SurrogateSharpness(rho=0.05, epsilon=0.1)])  # doctest: +SKIP
    """

    _prefix = "ignite"
    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "ignite": {
            "multiplier lambda and the constrained ||grad G||": ["^ignite/lambda$", "^ignite/output_grad_norm$"],
            "loss": ["^train/loss$", "^val/loss$"],
        },
    }
    _sync_first_pass = False

    def __init__(
        self,
        rho: float = 0.05,
        radius: float = 0.05,
        epsilon: float = 0.1,
        lambda_init: float = 1e-3,
        lambda_lr: float = 0.1,
        adaptive_lambda: bool = True,
        input_index: int | str = 0,
        start_step: int = 0,
    ) -> None:
        check_number("rho", rho, low=0, low_open=True)
        check_number("radius", radius, low=0, low_open=True)
        check_number("epsilon", epsilon, low=0)
        check_number("lambda_init", lambda_init, low=0)
        check_number("lambda_lr", lambda_lr, low=0)
        check_bool("adaptive_lambda", adaptive_lambda)
        if isinstance(input_index, bool) or not isinstance(input_index, (int, str)):
            raise TypeError(
                "`input_index` must be an int (a position in the batch) or a str (a key), "
                f"got {input_index!r} ({type(input_index).__name__})"
            )
        super().__init__(freeze_bn_stats=True, start_step=start_step)
        self.rho = rho
        self.radius = radius
        self.epsilon = epsilon
        self.lambda_init = lambda_init
        self.lambda_lr = lambda_lr
        self.adaptive_lambda = adaptive_lambda
        self.input_index = input_index
        self._lambda = torch.tensor(float(lambda_init))
        self._sync_logs = False  # lambda and ||grad G|| are the same on every rank

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        required = [
            p.name
            for p in inspect.signature(pl_module.forward).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
        if len(required) > 1:
            raise ValueError(
                f"SurrogateSharpness needs a surrogate whose forward maps the inputs alone to predictions; "
                f"{type(pl_module).__name__}.forward requires {required}"
            )
        super().setup(trainer, pl_module, stage)

    def _objective(self, pl_module: LightningModule) -> Callable[..., Tensor]:
        def mean_prediction(batch: Any, *rest: Any) -> Tensor:
            inputs = batch if isinstance(batch, Tensor) else batch[self.input_index]
            pred = pl_module(inputs)
            return (pred if pred.dtype == torch.float64 else pred.float()).mean()  # fp16/bf16: a float32 mean

        return mean_prediction

    @override
    def _combine(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params = self._grads()[0]
        if not params:
            return
        # Copies: under DDP with gradient_as_bucket_view the gradients can be views of the buckets
        # that the next synchronised backward overwrites. The originals are dropped right away.
        named = [p for _, p in pl_module.named_parameters() if p.grad is not None]
        grad_loss = {id(p): p.grad.clone() for p in named}
        for p in named:
            p.grad = None
        objective = self._objective(pl_module)
        self._rerun(trainer, pl_module, objective=objective)  # grad G(b), all-reduced
        grad_g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = global_norm(grad_g)
        scale = loss_scale(trainer, norm)
        lam = self._lambda.to(device=norm.device, dtype=torch.float32)
        # Preload grad L(b) - c grad G(b); the last backward adds c grad G(b_hat) and synchronises.
        for _, p in pl_module.named_parameters():
            p.grad = grad_loss.pop(id(p), None)
        c = ignite_gradient_([p.grad for p in params], grad_g, lam, self.rho, self.radius)
        # b_hat = b + radius * grad G(b) / ||grad G(b)||, one fused pass; grad G(b) is freed after it.
        self._perturbed.apply_(params, [local(g) for g in grad_g], self.radius / (norm + EPS))  # no host read
        del grad_g
        try:
            self._rerun(trainer, pl_module, weight=c, objective=objective)
        finally:
            self._perturbed.restore_()
        grad_norm = (norm / scale).detach()
        self._logs = {"lambda": lam.detach().clone(), "output_grad_norm": grad_norm}
        if self.adaptive_lambda:
            self._lambda = dual_ascent(lam, grad_norm.float(), self.rho, self.epsilon, self.lambda_lr)

    @property
    def multiplier(self) -> float:
        """The current Lagrange multiplier ``lambda`` (the one the next step uses)."""
        return float(self._lambda)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self._lambda.detach().cpu().clone()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._lambda = state_dict["lambda"].clone().float()
