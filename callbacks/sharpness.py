"""Sharpness penalties as callbacks on an unchanged, automatically optimised LightningModule.

Method card:
    * ``SharpnessAwareMinimization`` (``SAM``): SAM (Foret et al. 2021, arXiv:2010.01412), adaptive
      SAM (Kwon et al. 2021, arXiv:2102.11600) and the finite-difference gradient-norm penalty
      (Zhao et al. 2022, arXiv:2202.03599). Cost: one extra forward/backward per perturbed step.
    * ``SurrogateSharpness``: IGNITE's constraint on the sharpness of a surrogate's mean
      prediction, enforced with a Lagrange multiplier (offline model-based optimisation). Cost:
      two extra forward/backward passes of the model on the step's inputs.
    * ``SharpnessMonitor``: first-order sharpness of the whole model and of every layer on held
      batches, logged to TensorBoard without touching training.

Both penalties share one mechanism (``_ExtraPasses``): the optimizer step's closure is wrapped so
that, after Lightning's own pass (training_step, backward; gradients possibly scaled by a
GradScaler and accumulated over micro-batches), the callback re-runs the step's micro-batches at
perturbed weights with logging muted and BatchNorm statistics frozen, combines the gradients in
``param.grad``, and copies the weights back before returning. Lightning then unscales, calls every
``on_before_optimizer_step`` hook once, clips and steps on the final gradient. The all-reduce of
DDP (or FSDP2's reduce-scatter) is left to the last backward of the step, on the already combined
gradient, so it happens once.

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

import fnmatch
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from typing_extensions import override

from litplug.validation import check_bool, check_list, check_number, check_positive_int, check_str
from ..protocols import module_loss, require_loss

__all__ = [
    "SAM",
    "SharpnessAwareMinimization",
    "SharpnessMonitor",
    "SurrogateSharpness",
    "dual_ascent",
    "global_norm",
    "ignite_gradient",
    "sam_gradient",
    "sam_perturbation",
]

EPS = 1e-12


# --------------------------------------------------------------------------------------------
# Functional core (pure torch)
# --------------------------------------------------------------------------------------------


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2 parameters and gradients), the tensor itself otherwise."""
    return t.to_local() if hasattr(t, "to_local") else t


def global_norm(tensors: Sequence[Tensor]) -> Tensor:
    """L2 norm of all ``tensors`` taken together. DTensors (FSDP2 shards) give the norm of the full
    tensors: one all-reduce of a scalar; plain tensors need no collective."""
    if not tensors:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(tensors, norm_type=2.0)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def sam_perturbation(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    rho: float,
    adaptive: bool = False,
    eps: float = EPS,
    inplace: bool = False,
    eta: float = 0.0,
    scaled: Sequence[bool] | None = None,
) -> tuple[list[Tensor], Tensor]:
    """``e = rho * T^2 g / (||T g|| + eps)`` with ``T = 1`` (SAM) or, for adaptive SAM,
    ``T = |w| + eta`` on the parameters flagged in ``scaled`` (all when None) and ``T = 1`` on the
    others.

    The norm is global over all ``params``; ``e`` is scale-invariant in ``g`` (up to ``eps``), so
    loss-scaled fp16 gradients give the same perturbation.

    Args:
        inplace: for SAM (not adaptive), write ``e`` into ``grads`` (no allocation; when ``g`` is
            not needed afterwards).
        eta: added to ``|w|`` in adaptive SAM's ``T``.
        scaled: per parameter, whether adaptive SAM scales it by ``|w| + eta``.

    Returns:
        ``(e, ||T g||)``; for DTensors, ``e`` holds the local shards.

    Example:
        >>> e, n = sam_perturbation([torch.ones(2)], [torch.tensor([3.0, 4.0])], rho=0.5)
        >>> e[0], n
        (tensor([0.3000, 0.4000]), tensor(5.))
    """
    flags = [True] * len(params) if scaled is None else list(scaled)
    t = [p.abs() + eta if adaptive and f else None for p, f in zip(params, flags)]
    tg = [g if ti is None else ti * g for ti, g in zip(t, grads)]
    norm = global_norm(tg)
    scale = rho / (norm + eps)
    if adaptive:
        e = [_local(x).clone() if ti is None else _local(x) * _local(ti) for x, ti in zip(tg, t)]
    else:
        e = [_local(g) if inplace else _local(g).clone() for g in grads]
    torch._foreach_mul_(e, scale.to(e[0].device) if e else scale)
    return e, norm


def sam_gradient(grad: Sequence[Tensor], grad_perturbed: Sequence[Tensor], penalty_weight: float) -> list[Tensor]:
    """Final gradient ``(1 - a) g + a grad L(w + e)``: SAM for ``a = 1``, the gradient-norm penalty
    of Zhao et al. for ``0 < a < 1``."""
    a = penalty_weight
    return [(1 - a) * g + a * gp for g, gp in zip(grad, grad_perturbed)]


def ignite_gradient(
    grad_loss: Sequence[Tensor],
    grad_g: Sequence[Tensor],
    grad_g_hat: Sequence[Tensor],
    lam: float | Tensor,
    rho: float,
    radius: float,
) -> list[Tensor]:
    """IGNITE's final gradient ``grad L(b) + (lambda rho / radius) (grad G(b_hat) - grad G(b))``."""
    c = lam * rho / radius
    return [gl + c * (gh - gg) for gl, gg, gh in zip(grad_loss, grad_g, grad_g_hat)]


def dual_ascent(lam: Tensor, grad_norm: Tensor, rho: float, epsilon: float, lr: float) -> Tensor:
    """``max(0, lambda + lr (rho ||grad G|| - epsilon))``; ``lambda`` is kept when the norm is not
    finite (an fp16 step the GradScaler skips)."""
    new = torch.clamp(lam + lr * (rho * grad_norm - epsilon), min=0.0)
    return torch.where(torch.isfinite(grad_norm), new, lam)


# --------------------------------------------------------------------------------------------
# Shared Lightning mechanism
# --------------------------------------------------------------------------------------------


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


def _loss_of(output: Any) -> Tensor:
    loss = output.get("loss") if isinstance(output, Mapping) else output
    if not isinstance(loss, Tensor):
        raise RuntimeError("`training_step` must return a loss tensor (or a dict with 'loss') for a sharpness callback")
    return loss


@contextmanager
def _muted(pl_module: LightningModule, objective: Callable[..., Tensor] | None, freeze_bn_stats: bool) -> Iterator[None]:
    """Mute ``self.log``/``self.log_dict``, optionally swap ``training_step`` for ``objective``, put
    torchmetrics states back (a train metric updated in ``training_step`` counts the batch once)
    and (``freeze_bn_stats``) the running statistics of normalisation layers."""
    norms = [
        m for m in pl_module.modules() if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
    ]
    saved = [[b.clone() for b in m.buffers(recurse=False)] for m in norms] if freeze_bn_stats else []
    metrics = [m for m in pl_module.modules() if isinstance(getattr(m, "metric_state", None), dict)]
    metric_states = [
        ({k: v.clone() if isinstance(v, Tensor) else list(v) for k, v in m.metric_state.items()}, m._update_count, m._computed)
        for m in metrics
    ]
    patched: dict[str, Any] = {"log": _no_log, "log_dict": _no_log}
    if objective is not None:
        patched["training_step"] = objective
    previous = {k: pl_module.__dict__[k] for k in patched if k in pl_module.__dict__}
    pl_module.__dict__.update(patched)
    try:
        yield
    finally:
        for key in patched:
            if key in previous:
                pl_module.__dict__[key] = previous[key]
            else:
                del pl_module.__dict__[key]
        for m, (states, count, computed) in zip(metrics, metric_states):
            for k, v in states.items():
                setattr(m, k, v)
            m._update_count, m._computed = count, computed
        with torch.no_grad():
            for m, buffers in zip(norms, saved):
                for b, s in zip(m.buffers(recurse=False), buffers):
                    b.copy_(s)


class _ExtraPasses(Callback):
    """Re-run the step's micro-batches at perturbed weights inside the optimizer closure.

    Subclasses implement ``_should_perturb`` and ``_combine`` (called after Lightning's pass with
    the gradient in ``param.grad``) using ``_params``, ``_rerun``, ``_perturb`` and ``_restore``.
    """

    _prefix = ""
    _sync_first_pass = True

    def __init__(self, freeze_bn_stats: bool = True, exclude: Sequence[str] = ()) -> None:
        super().__init__()
        check_bool("freeze_bn_stats", freeze_bn_stats)
        check_list("exclude", exclude, check_str)
        self.freeze_bn_stats = freeze_bn_stats
        self.exclude = list(exclude)
        self._batches: list[tuple[Any, int]] = []
        self._first_losses: list[Tensor] = []
        self._active = False
        self._in_closure = False
        self._outside = 0  # backward passes of this step that ran outside the optimizer closure
        self._params: list[tuple[str, nn.Parameter]] = []
        self._step_takes_batch_idx = True
        self._unpatch: Callable[[], None] | None = None
        self._logs: dict[str, Tensor] = {}
        self._sync_logs = True

    # -- set-up ------------------------------------------------------------------------------

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        if not pl_module.automatic_optimization:
            raise ValueError(
                f"{name} does not support manual optimisation (it wraps the optimizer closure Lightning builds in"
                f" automatic optimisation); {type(pl_module).__name__} sets `automatic_optimization = False`."
                " Let Lightning optimise (return the loss from `training_step`), or call `pytorch_optimizer.SAM`'s"
                " first_step/second_step yourself in manual optimization."
            )
        if isinstance(trainer.strategy, (DeepSpeedStrategy, FSDPStrategy)) or trainer.strategy.handles_gradient_accumulation:
            raise ValueError(
                f"{name} does not support {type(trainer.strategy).__name__}; use single-device, DDP or"
                " ModelParallelStrategy (FSDP2)."
            )
        others = [cb for cb in trainer.callbacks if isinstance(cb, _ExtraPasses) and cb is not self]
        if others:
            raise ValueError(f"Only one sharpness penalty per Trainer; found {name} and {type(others[0]).__name__}.")
        self._step_takes_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        strategy = trainer.strategy
        original = strategy.optimizer_step

        def optimizer_step(optimizer: Any, closure: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
            if self._active:
                closure = partial(self._closure, trainer, closure)
            return original(optimizer, closure, *args, **kwargs)

        strategy.optimizer_step = optimizer_step  # type: ignore[method-assign]
        self._unpatch = lambda: strategy.__dict__.pop("optimizer_step", None)

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        for pattern in self.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                raise ValueError(
                    f"`exclude` pattern {pattern!r} matches no trainable parameter; names look like {[n for n, _ in named[:4]]}"
                )
        self._params = [(n, p) for n, p in named if not any(fnmatch.fnmatchcase(n, pat) for pat in self.exclude)]

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._unpatch is not None:
            self._unpatch()
            self._unpatch = None
        self._batches.clear()
        self._first_losses.clear()

    # -- per step ----------------------------------------------------------------------------

    def _should_perturb(self, trainer: Trainer) -> bool:
        return True

    def _combine(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise NotImplementedError

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % trainer.accumulate_grad_batches == 0:  # first micro-batch of an optimizer step
            self._batches.clear()
            self._first_losses.clear()
            self._active = self._should_perturb(trainer)
            self._outside = 0
        if self._active:
            self._batches.append((batch, batch_idx))

    @override
    def on_before_backward(self, trainer: Trainer, pl_module: LightningModule, loss: Tensor) -> None:
        if self._active:
            self._first_losses.append(loss.detach())
            self._outside += not self._in_closure

    @override
    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        if self._active and self._outside and self._outside >= len(self._batches):
            raise RuntimeError(
                f"{type(self).__name__} found an optimizer step whose closure did not run inside `optimizer.step`:"
                " an `optimizer_step` override must pass `closure=optimizer_closure` to `optimizer.step`."
            )
        self._batches.clear()  # let the step's batches go before the next ones are loaded
        self._first_losses.clear()

    @override
    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        for key, value in self._logs.items():
            pl_module.log(f"{self._prefix}/{key}", value, on_step=True, on_epoch=False, sync_dist=self._sync_logs, batch_size=1)
        self._logs = {}

    def _closure(self, trainer: Trainer, closure: Callable[[], Any]) -> Any:
        self._in_closure = True
        try:
            with _block_parallel_sync_behavior(trainer.strategy, block=not self._sync_first_pass):
                result = closure()
        finally:
            self._in_closure = False
        if result is not None:  # None: training_step returned None and Lightning skipped backward
            self._combine(trainer, trainer.lightning_module)
        return result

    # -- tools for subclasses ----------------------------------------------------------------

    @staticmethod
    def _loss_scale(trainer: Trainer, like: Tensor) -> Tensor:
        """The GradScaler's current scale as a tensor (no host sync), 1 without a scaler."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        one = torch.ones((), device=like.device, dtype=torch.float32)
        return scaler.scale(one) if scaler is not None else one

    def _first_loss(self, trainer: Trainer) -> Tensor:
        """L(w) of Lightning's pass: the sum of the micro-batch losses it backpropagated, unscaled."""
        total = torch.stack([loss.float() for loss in self._first_losses]).sum()
        return total / self._loss_scale(trainer, total)

    def _grads(self, params: Sequence[nn.Parameter] | None = None) -> tuple[list[nn.Parameter], list[Tensor]]:
        params = [p for _, p in self._params] if params is None else params
        with_grad = [p for p in params if p.grad is not None]
        return with_grad, [p.grad for p in with_grad]

    @staticmethod
    @torch.no_grad()
    def _perturb(params: Sequence[nn.Parameter], delta: Sequence[Tensor]) -> list[Tensor]:
        """Add ``delta`` (local shards) to ``params``; return copies of the weights to restore."""
        local = [_local(p) for p in params]
        backup = [t.clone() for t in local]
        if local:
            torch._foreach_add_(local, list(delta))
        return backup

    @staticmethod
    @torch.no_grad()
    def _restore(params: Sequence[nn.Parameter], backup: Sequence[Tensor]) -> None:
        """Copy the weights back: bit-exact, unlike subtracting the perturbation."""
        local = [_local(p) for p in params]
        if local:
            torch._foreach_copy_(local, list(backup))

    def _rerun(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        weight: float | Tensor = 1.0,
        objective: Callable[..., Tensor] | None = None,
    ) -> Tensor:
        """Re-run every micro-batch of the step through the strategy (DDP wrapper, autocast) and
        backpropagate ``weight * value / accumulate_grad_batches`` (loss-scaled like Lightning's
        pass) into ``param.grad``. Only the last backward synchronises gradients across ranks.

        ``objective(batch, *rest)`` replaces ``training_step`` when given. Returns the sum of the
        unweighted, normalised values (no hooks of other callbacks are called)."""
        strategy = trainer.strategy
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        k = trainer.accumulate_grad_batches
        values = []
        with _muted(pl_module, objective, self.freeze_bn_stats), torch.enable_grad():
            for i, (batch, batch_idx) in enumerate(self._batches):
                last = i == len(self._batches) - 1
                args = (batch, batch_idx) if self._step_takes_batch_idx or objective is not None else (batch,)
                with _block_parallel_sync_behavior(strategy, block=not last):
                    value = _loss_of(strategy.training_step(*args)) / k
                    loss = value * weight
                    if scaler is not None:
                        loss = scaler.scale(loss)
                    pl_module.backward(loss)
                values.append(value.detach().float())
        return torch.stack(values).sum()


# --------------------------------------------------------------------------------------------
# SAM / adaptive SAM / gradient-norm penalty
# --------------------------------------------------------------------------------------------


class SharpnessAwareMinimization(_ExtraPasses):
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
    (``freeze_bn_stats``). Weights are copied back before the optimizer step, so the optimizer,
    its state and the LR schedule are the base optimizer's. Gradient clipping, the GradScaler's
    unscale and inf check, and other callbacks' ``on_before_optimizer_step`` see the final
    gradient once. Cost per perturbed step: one more forward/backward (every_n_steps=k: ~1 + 1/k).

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

    Logs ``sam/sharpness`` (L(w + e) - L(w)), ``sam/grad_norm`` (``||T g||``),
    ``sam/perturbation_norm`` (``||e||``) on perturbed steps (with ``every_n_steps > 1``,
    Lightning's step logging repeats the latest value on the plain steps in between).

    Args:
        rho: radius of the perturbation, > 0.
        adaptive: scale the perturbation by ``|w| + eta`` (adaptive SAM).
        eta: ASAM's offset in ``T = |w| + eta``, >= 0 (used with ``adaptive``).
        penalty_weight: ``a`` in (0, 1].
        every_n_steps: perturb every k-th optimizer step, plain steps in between.
        sync_first_pass: all-reduce the first pass's gradient under DDP.
        exclude: ``fnmatch`` patterns of parameter names not perturbed, e.g. ``["*.bias"]``;
            each must match a parameter.
        freeze_bn_stats: keep BatchNorm running statistics from the second pass out.

    Example:
        >>> from lightning.pytorch import Trainer
        >>> trainer = Trainer(callbacks=[SharpnessAwareMinimization(rho=0.05, adaptive=True)])  # doctest: +SKIP
    """

    _prefix = "sam"

    def __init__(
        self,
        rho: float = 0.05,
        adaptive: bool = False,
        penalty_weight: float = 1.0,
        every_n_steps: int = 1,
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
        super().__init__(freeze_bn_stats=freeze_bn_stats, exclude=exclude)
        self.rho = rho
        self.adaptive = adaptive
        self.eta = eta
        self.penalty_weight = penalty_weight
        self.every_n_steps = every_n_steps
        self.sync_first_pass = sync_first_pass
        self._sync_first_pass = sync_first_pass

    @override
    def _should_perturb(self, trainer: Trainer) -> bool:
        return trainer.global_step % self.every_n_steps == 0

    @override
    def _combine(self, trainer: Trainer, pl_module: LightningModule) -> None:
        params, grads = self._grads()
        if not params:
            return
        a = self.penalty_weight
        scaled = None
        if self.adaptive:  # ASAM's rule: T = |w| + eta on parameters named *weight*, 1 elsewhere
            named_weight = {id(p) for n, p in self._params if "weight" in n}
            scaled = [id(p) in named_weight for p in params]
            t2g = [(p.abs() + self.eta).square() * g if s else g for p, g, s in zip(params, grads, scaled)]
            e_norm = self.rho * global_norm(t2g)
            del t2g
        # With a = 1, g is not needed after the perturbation: e is built in the gradient buffers.
        e, norm = sam_perturbation(params, grads, self.rho, self.adaptive, inplace=a == 1.0, eta=self.eta, scaled=scaled)
        e_norm = e_norm / (norm + EPS) if self.adaptive else self.rho * norm / (norm + EPS)
        if not bool(torch.isfinite(norm)):  # a non-finite gradient: no direction to perturb along
            warnings.warn(
                f"{type(self).__name__}: the gradient norm is not finite ({float(norm)}) at step {trainer.global_step}; "
                "the weights are not perturbed in this step (the second pass runs at the unperturbed weights)",
                stacklevel=1,
            )
            torch._foreach_zero_(e)
            e_norm = torch.zeros_like(e_norm)
        scale = self._loss_scale(trainer, norm)
        backup = self._perturb(params, e)
        del e, grads
        for _, p in pl_module.named_parameters():
            if p.grad is not None:
                if a == 1.0:
                    p.grad = None
                else:
                    p.grad.mul_(1.0 - a)
        perturbed_loss = self._rerun(trainer, pl_module, weight=a)
        self._restore(params, backup)
        self._logs = {
            "sharpness": (perturbed_loss - self._first_loss(trainer)).detach(),
            "grad_norm": (norm / scale).detach(),
            "perturbation_norm": e_norm.detach(),
        }


class SAM(SharpnessAwareMinimization):
    """Short name of :class:`SharpnessAwareMinimization` (a subclass, not an alias, so that
    ``class_path: SAM`` resolves in YAML)."""


# --------------------------------------------------------------------------------------------
# IGNITE: surrogate sharpness constraint
# --------------------------------------------------------------------------------------------


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
    state. Weights are copied
    back before the optimizer step; the optimizer and its state are the base optimizer's.
    Cost: two extra forward/backward passes of the model per step (all micro-batches).

    Distributed: under DDP the loss gradient's all-reduce is deferred to the last backward (on the
    combined gradient) and ``grad G(b)`` is all-reduced once, so ``b_hat``, ``lambda`` and the
    final gradient are identical on all ranks: two gradient all-reduces per step. Under FSDP2 each
    of the three backwards reduce-scatters; ``||grad G||`` is the global norm.

    Logs ``ignite/lambda`` (the multiplier used in the step) and ``ignite/output_grad_norm``
    (``||grad G(b)||``).

    Defaults: the IGNITE authors' code (cuong-dm/IGNITE) sets its per-task values in Python
    scripts (``scripts/IGNITE/*.py``, called by the repository's shell scripts) that were not
    available when the defaults were chosen, nor was a statement of them in the paper, so the
    defaults are litplug's: ``rho = radius = 0.05``, ``epsilon = 0.1``, ``lambda_init = 1e-3`` and
    ``lambda_lr = 0.1``. The dual step is the one that enforces the constraint within a short
    run: with ``1e-3`` the multiplier stays below ~0.06 over 540 steps while ``rho ||grad G||``
    stays at twice ``epsilon`` (no measurable effect on any offline task); with ``0.1`` it binds
    (README, offline results: +20% on Ackley, -7.5% on Hartmann).

    Args:
        rho: sharpness radius in the constraint, > 0.
        radius: finite-difference step, > 0.
        epsilon: allowed sharpness, >= 0.
        lambda_init: initial multiplier, >= 0.
        lambda_lr: dual ascent step, >= 0.
        adaptive_lambda: update ``lambda`` by dual ascent (else fixed at ``lambda_init``).
        input_index: index (or key) of the inputs in a batch (a batch that is one tensor is the
            inputs). The module's ``forward`` must take the inputs alone (checked at setup).

    Example:
        >>> trainer = Trainer(callbacks=[SurrogateSharpness(rho=0.05, epsilon=0.1)])  # doctest: +SKIP
    """

    _prefix = "ignite"
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
    ) -> None:
        check_number("rho", rho, low=0, low_open=True)
        check_number("radius", radius, low=0, low_open=True)
        check_number("epsilon", epsilon, low=0)
        check_number("lambda_init", lambda_init, low=0)
        check_number("lambda_lr", lambda_lr, low=0)
        check_bool("adaptive_lambda", adaptive_lambda)
        if isinstance(input_index, bool) or not isinstance(input_index, (int, str)):
            raise TypeError(f"`input_index` must be an int (a position in the batch) or a str (a key), got {input_index!r} ({type(input_index).__name__})")
        super().__init__(freeze_bn_stats=True)
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
        import inspect

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
        params, grad_loss = self._grads()
        if not params:
            return
        # Copies: under DDP with gradient_as_bucket_view the gradients can be views of the buckets
        # that the next synchronised backward overwrites.
        all_grads = {id(p): p.grad.clone() for _, p in pl_module.named_parameters() if p.grad is not None}
        for _, p in pl_module.named_parameters():
            p.grad = None
        objective = self._objective(pl_module)
        self._rerun(trainer, pl_module, objective=objective)  # grad G(b), all-reduced
        grad_g = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        norm = global_norm(grad_g)
        scale = self._loss_scale(trainer, norm)
        lam = self._lambda.to(device=norm.device, dtype=torch.float32)
        c = lam * self.rho / self.radius
        step = self.radius / (norm + EPS)
        delta = torch._foreach_mul([_local(g) for g in grad_g], step.to(_local(grad_g[0]).device))
        backup = self._perturb(params, delta)
        del delta
        # Preload grad L(b) - c grad G(b); the last backward adds c grad G(b_hat) and synchronises.
        for _, p in pl_module.named_parameters():
            p.grad = all_grads.get(id(p))
        for p, gg in zip(params, grad_g):
            _local(p.grad).sub_(_local(gg) * c.to(_local(gg).device))
        self._rerun(trainer, pl_module, weight=c, objective=objective)
        self._restore(params, backup)
        grad_norm = (norm / scale).detach()
        self._logs = {"lambda": lam.detach().clone(), "output_grad_norm": grad_norm}
        if self.adaptive_lambda:
            self._lambda = dual_ascent(lam, grad_norm.float(), self.rho, self.epsilon, self.lambda_lr)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"lambda": self._lambda.detach().cpu().clone()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._lambda = state_dict["lambda"].clone().float()


# --------------------------------------------------------------------------------------------
# Monitor
# --------------------------------------------------------------------------------------------


class SharpnessMonitor(Callback):
    """Log first-order sharpness ``L(w + e) - L(w)``, ``e = rho g / ||g||``, on held batches.

    Measured every ``every_n_epochs`` at the end of a training epoch for the whole model
    (``sharpness/model``) and, with ``layerwise``, for every layer owning parameters alone
    (``sharpness/layer/<name>``: only that layer perturbed, along its own gradient), which shows
    the "straggler" layers of "In Search of the Successful Interpolation". The held batches are
    the first ``num_batches`` training batches of the run (kept in the callback state, so a resumed
    run measures the same ones). The loss is the module's own (:func:`litplug.protocols.module_loss`:
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

    def __init__(self, every_n_epochs: int = 1, rho: float = 0.05, layerwise: bool = True, num_batches: int = 1) -> None:
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

    @override
    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if len(self._held) < self.num_batches:
            self._held.append(_clone(batch))

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            require_loss(pl_module, "SharpnessMonitor")

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
        modes = {m: m.training for m in pl_module.modules()}
        devices = [pl_module.device] if pl_module.device.type == "cuda" else []
        out: dict[str, Tensor] = {}
        with torch.random.fork_rng(devices=devices), _muted(pl_module, None, freeze_bn_stats=False):
            pl_module.eval()
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
                    for i, (name, _) in enumerate(named):
                        groups.setdefault("layer/" + name.rsplit(".", 1)[0], []).append(i)
                for key, idx in groups.items():
                    ps, gs = [params[i] for i in idx], [grads[i] for i in idx]
                    e, _ = sam_perturbation(ps, gs, self.rho)
                    backup = _ExtraPasses._perturb(ps, e)
                    out[key] = self._loss(pl_module).detach() - base
                    _ExtraPasses._restore(ps, backup)
            finally:
                for p, g in zip(params, saved_grads):
                    p.grad = g
                for m, mode in modes.items():
                    m.training = mode
        return out

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"held": [_to(b, "cpu") for b in self._held]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._held = list(state_dict["held"])


def _clone(batch: Any) -> Any:
    return _map(batch, lambda t: t.detach().clone())


def _to(batch: Any, device: Any) -> Any:
    return _map(batch, lambda t: t.to(device))


def _map(batch: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    from lightning.fabric.utilities.apply_func import apply_to_collection

    return apply_to_collection(batch, Tensor, fn)
