"""Sharpness-aware minimization as a callback: SAM (Foret et al. 2021, arXiv:2010.01412), adaptive
SAM (Kwon et al. 2021, arXiv:2102.11600) and the finite-difference gradient-norm penalty (Zhao et
al. 2022, arXiv:2202.03599). Cost: one extra forward/backward per perturbed step.

The formulas are :func:`litplug.functional.sam_perturbation` and
:func:`litplug.functional.sam_gradient_`; the closure machinery is
:class:`litplug.callbacks.passes._ExtraPasses`.

Example:
    >>> import torch
    >>> from lightning.pytorch import Trainer
    >>> from litplug.callbacks import SAM
    >>> from litplug.datamodules import Digits
    >>> from litplug.modules import MLP, Classifier
    >>> model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10), optimizer=torch.optim.SGD)  # doctest: +SKIP
    >>> Trainer(max_epochs=1, callbacks=[SAM(rho=0.05)]).fit(model, Digits())  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
from lightning.pytorch import LightningModule, Trainer
from typing_extensions import override

from ..functional.sharpness import EPS, global_norm, sam_gradient_, sam_perturbation
from ..plumbing import local, loss_scale, warn
from ..validation import check_bool, check_number, check_positive_int
from .passes import _ExtraPasses

__all__ = ["SAM"]


class SAM(_ExtraPasses):
    """Sharpness-aware minimization as a callback (SAM, adaptive SAM, gradient-norm penalty).

    With ``g`` the gradient of the loss at ``w`` (after accumulation) and
    ``e = rho T^2 g / (||T g|| + 1e-12)`` (``T = 1``; with ``adaptive``, ``T = |w| + eta`` for
    parameters whose name contains ``weight`` and ``T = 1`` for the others; the norm is global over
    the perturbed parameters), the optimizer steps from ``w`` with::

        (1 - a) * g + a * grad L(w + e),      a = penalty_weight

    ``a = 1`` is SAM (Foret et al. 2021), adaptive SAM with ``adaptive=True`` (Kwon et al. 2021);
    ``0 < a < 1`` is the finite-difference gradient-norm penalty (Zhao et al. 2022). The second
    pass re-runs the module's own ``training_step`` on the same (micro-)batches, so any loss is
    penalised unchanged; its ``self.log`` calls are muted and BatchNorm statistics are put back
    (``freeze_bn_stats``). The original weights are put back (bit-exact) before the optimizer
    step, so the optimizer, its state and the LR schedule are the base optimizer's. Gradient
    clipping, the GradScaler's unscale and inf check, and other callbacks'
    ``on_before_optimizer_step`` see the final gradient once. Cost per perturbed step: one more
    forward/backward (every_n_steps=k: ~1 + 1/k), one norm of the gradient and one fused
    ``w + alpha g`` pass into a buffer that is swapped in and out through ``param.data``
    (:class:`~litplug.callbacks.passes.PerturbedWeights`; adaptive SAM also builds ``e``). Memory:
    that buffer, one copy of the perturbed parameters, kept between steps.

    Distributed: under DDP with ``sync_first_pass=False`` the first backward skips the all-reduce
    (each rank perturbs with its local gradient: m-sharpness) and the second backward all-reduces
    the combined gradient: one gradient all-reduce per step, identical final gradients on all
    ranks. ``sync_first_pass=True`` all-reduces both passes (perturbation from the global
    gradient). FSDP2 (ModelParallelStrategy) always reduce-scatters each backward, so ``e`` comes
    from the global gradient and ``||T g||`` is the global norm (one scalar all-reduce). The three
    logged values are averaged over ranks (``sync_dist``). FSDP1 and DeepSpeed are rejected at setup.

    Adaptive SAM follows the ASAM authors' code (SamsungLabs/ASAM, ``asam.py``): ``T = |w| + eta``
    (``eta = 0.01``, their default) on parameters whose name in ``pl_module.named_parameters()``
    contains ``weight`` (so BatchNorm/LayerNorm scales too; a module attribute named ``*weight*``
    puts all its parameters there), ``T = 1`` on biases and the rest; their CIFAR example uses
    ``rho = 0.5`` on CIFAR-10 and ``1.0`` on CIFAR-100 (``configs/callbacks/asam.yaml``: 0.5; that
    script's command-line default is ``eta = 0``, against ``0.01`` in ``asam.py``).
    ``pytorch_optimizer.SAM(adaptive=True)`` instead uses ``T = |w|`` on every parameter, so a
    zero-initialised bias is never perturbed; litplug equals it with ``eta=0`` on a model whose
    trainable parameters are all named ``*weight*``.

    A non-finite gradient norm (a NaN/inf loss, an fp16 overflow) gives no direction: the step is
    then not perturbed (with a warning); the second pass still runs, at the unperturbed weights, so
    that every rank makes the same collectives, and the final gradient is the plain one (which a
    GradScaler then skips as usual). Checking costs one scalar host read per perturbed step.

    Logs ``sam/loss_increase`` (``L(w + e) - L(w)`` on the training batch, along SAM's own
    direction; :class:`SharpnessMonitor`'s ``sharpness/model`` is measured on held batches
    instead), ``sam/grad_norm`` (``||T g||``) and, with ``adaptive``, ``sam/perturbation_norm``
    (``||e||``, which plain SAM keeps at ``rho``) on perturbed steps (with ``every_n_steps > 1``,
    Lightning's step logging repeats the latest value on the plain steps in between).

    Args:
        rho: radius of the perturbation, > 0.
        adaptive: scale the perturbation by ``|w| + eta`` (adaptive SAM).
        eta: ASAM's offset in ``T = |w| + eta``, >= 0 (used with ``adaptive``).
        penalty_weight: ``a`` in (0, 1].
        every_n_steps: perturb the training step with 0-based index ``i`` when ``i % k == 0`` (steps
            1, k + 1, ... counted 1-based), plain steps in between.
        start_step: plain training steps before SAM begins (>= 0): step ``i`` is perturbed only
            when ``i >= start_step``; the phase of ``every_n_steps`` is that of the step count,
            as in :class:`EMA`.
        sync_first_pass: all-reduce the first pass's gradient under DDP.
        exclude: ``fnmatch`` patterns of parameter names not perturbed, e.g. ``["*.bias"]``;
            each must match a parameter.
        freeze_bn_stats: keep BatchNorm running statistics from the second pass out.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SAM(rho=0.05, adaptive=True)])  # doctest: +SKIP
    """

    _prefix = "sam"
    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {
        "sam": {
            "loss: clean L(w) and its increase L(w + e) - L(w)": ["^train/loss$", "^sam/loss_increase$"],
            "gradient and perturbation norms": ["^sam/grad_norm$", "^sam/perturbation_norm$"],
        },
    }

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        penalty_weight: float = 1.0,
        every_n_steps: int = 1,
        start_step: int = 0,
        sync_first_pass: bool = False,
        exclude: Sequence[str] = (),
        freeze_bn_stats: bool = True,
        eta: float = 0.01,
    ) -> None:
        check_number("rho", rho, low=0, low_open=True)
        check_bool("adaptive", adaptive)
        check_number("penalty_weight", penalty_weight, 0, 1, low_open=True)
        check_positive_int("every_n_steps", every_n_steps)
        check_bool("sync_first_pass", sync_first_pass)
        check_number("eta", eta, low=0)
        super().__init__(freeze_bn_stats=freeze_bn_stats, exclude=exclude, start_step=start_step)
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta
        self.penalty_weight = penalty_weight
        self.every_n_steps = every_n_steps
        self.sync_first_pass = sync_first_pass
        self._sync_first_pass = sync_first_pass

    @override
    def _should_perturb(self, trainer: Trainer) -> bool:
        # Automatic optimisation (manual is refused): one optimizer, so global_step counts training steps;
        # the base class checks start_step.
        return trainer.global_step % self.every_n_steps == 0

    @override
    def _combine(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params, grads = self._grads()
        if not params:
            return
        a = self.penalty_weight
        if self.adaptive:  # ASAM's rule: T = |w| + eta on parameters named *weight*, 1 elsewhere
            named_weight = {id(p) for n, p in self._params if "weight" in n}
            scaled = [id(p) in named_weight for p in params]
            direction, norm = sam_perturbation(params, grads, self.rho, True, eta=self.eta, scaled=scaled)
            e_norm = global_norm(direction)
            alpha = 1.0
        else:  # e = (rho / (||g|| + eps)) g, added to the weights in one fused pass (never materialised)
            norm = global_norm(grads)
            direction = [local(g) for g in grads]
            e_norm = self.rho * norm / (norm + EPS)
            alpha = float(self.rho / (norm + EPS))
        finite = bool(torch.isfinite(norm))
        if not finite:  # a non-finite gradient: no direction to perturb along
            warn(
                f"{type(self).__name__}: the gradient norm is not finite ({float(norm)}) "
                f"at step {trainer.global_step}; "
                "the weights are not perturbed in this step (the second pass runs at the unperturbed weights)"
            )
            e_norm = torch.zeros_like(e_norm)
        scale = loss_scale(trainer, norm)
        if finite:
            self._perturbed.apply_(params, direction, alpha)
        del direction, grads
        try:
            # (1 - a) g + a grad L(w + e): g is scaled in place (or dropped for a = 1) and the second
            # pass accumulates a grad L(w + e) into the same buffers (one all-reduce, on the sum).
            named = [p for _, p in pl_module.named_parameters() if p.grad is not None]
            buffers, a = sam_gradient_([p.grad for p in named], a)
            for p, buf in zip(named, buffers):
                p.grad = buf
            perturbed_loss = self._rerun(trainer, pl_module, weight=a)
        finally:
            self._perturbed.restore_()
        self._logs = {
            "loss_increase": (perturbed_loss - self._first_loss(trainer)).detach(),
            "grad_norm": (norm / scale).detach(),
        }
        if self.adaptive:  # plain SAM's ||e|| is rho (up to EPS): nothing to log
            self._logs["perturbation_norm"] = e_norm.detach()
