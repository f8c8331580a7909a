"""The closure machinery shared by litplug's sharpness penalties (SAM/ASAM, IGNITE).

The optimizer step's closure is wrapped so that, after Lightning's own pass (training_step,
backward; gradients possibly scaled by a GradScaler and accumulated over micro-batches), the
callback re-runs the step's micro-batches at perturbed weights with logging muted and BatchNorm
statistics frozen, combines the gradients in ``param.grad``, and copies the weights back before
returning. Lightning then unscales, calls every ``on_before_optimizer_step`` hook once, clips and
steps on the final gradient. The all-reduce of DDP (or FSDP2's reduce-scatter) is left to the last
backward of the step, on the already combined gradient, so it happens once.
"""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.signature_utils import is_param_in_hook_signature
from torch import Tensor, nn
from typing_extensions import override

from ..board import write_charts
from ..plumbing import grad_scaler, is_sharded, local, loss_scale, refuse_flat_strategies
from ..plumbing.loss import loss_of
from ..plumbing.storage import swap_, writable
from ..plumbing.third_party_private import muted, no_grad_sync, wrap_optimizer_step
from ..validation import check_bool, check_int, check_list, check_str

__all__ = ["PerturbedWeights"]


class PerturbedWeights:
    """Perturbed weights ``w + alpha * d`` in buffers allocated once (one like each parameter) and
    swapped in (:func:`litplug.plumbing.storage.swap_`): per perturbation one fused pass (``torch.add(w, d,
    alpha=alpha, out=buffer)``, or ``addcmul`` for a tensor ``alpha``) and no copy, neither of the
    weights nor back, since :meth:`restore_` swaps the original storage in again (bit-exact, and
    the parameter is again a view of the same memory, e.g. of an EMA's flat buffer). Each swap
    bumps the parameter's version counter, as an in-place write would. Memory: the buffers, one
    copy of the perturbed parameters, held until :meth:`release`.

    Sharded parameters (FSDP2 DTensors, whose local storage FSDP2 owns) are not swapped: the buffer
    holds a copy of the local shard, the shard is perturbed in place and copied back.

    Example:
        >>> w = nn.Parameter(torch.ones(2))
        >>> perturbed = PerturbedWeights()
        >>> perturbed.apply_([w], [torch.tensor([1.0, 2.0])], alpha=0.5); w.data
        tensor([1.5000, 2.0000])
        >>> perturbed.restore_(); w.data
        tensor([1., 1.])
    """

    def __init__(self) -> None:
        # id(parameter) -> (weak reference to it, its buffer): the buffers do not keep the model alive
        self._buffers: dict[int, tuple[weakref.ref[nn.Parameter], Tensor]] = {}
        self._applied: list[tuple[nn.Parameter, Tensor]] = []  # (parameter, its own data or its backup)

    def _buffer(self, p: nn.Parameter) -> Tensor:
        shard = local(p)
        held = self._buffers.get(id(p))
        if held is None or held[0]() is not p or held[1].shape != shard.shape or held[1].dtype != shard.dtype:
            held = (weakref.ref(p), torch.empty_like(shard))
            self._buffers[id(p)] = held
        return held[1]

    @torch.no_grad()
    def apply_(self, params: Sequence[nn.Parameter], direction: Sequence[Tensor], alpha: float | Tensor = 1.0) -> None:
        """Put ``w + alpha * d`` (``d``: local shards for DTensors) into ``params``. ``alpha`` is a
        number or a 0-dim tensor (e.g. computed on the GPU: no host read)."""
        if self._applied:
            raise RuntimeError("PerturbedWeights.apply_ called twice without restore_")
        for p, d in zip(params, direction):
            buffer = self._buffer(p)
            if is_sharded(p):
                shard = writable(p)
                buffer.copy_(shard)
                _add_scaled(shard, d, alpha, out=shard)
                self._applied.append((p, buffer))
            else:
                _add_scaled(p, d, alpha, out=buffer)
                self._applied.append((p, swap_(p, buffer)))

    @torch.no_grad()
    def restore_(self) -> None:
        """Put the weights of the last :meth:`apply_` back, bit-exact."""
        for p, saved in self._applied:
            if is_sharded(p):
                writable(p).copy_(saved)
            else:
                swap_(p, saved)
        self._applied = []

    def release(self) -> None:
        """Free the buffers (after :meth:`restore_`)."""
        self.restore_()
        self._buffers.clear()

    def nbytes(self) -> int:
        """Bytes held in the buffers."""
        return sum(b.numel() * b.element_size() for _, b in self._buffers.values())


def _add_scaled(w: Tensor, d: Tensor, alpha: float | Tensor, out: Tensor) -> None:
    # One fused pass either way; a tensor alpha enters as a broadcast factor of addcmul.
    if isinstance(alpha, Tensor):
        torch.addcmul(w, d, alpha, out=out)
    else:
        torch.add(w, d, alpha=alpha, out=out)


class _ExtraPasses(Callback):
    """Re-run the step's micro-batches at perturbed weights inside the optimizer closure.

    Subclasses implement ``_should_perturb`` and ``_combine`` (called after Lightning's pass with
    the gradient in ``param.grad``) using ``_params``, ``_rerun`` and ``_perturbed`` (a
    :class:`PerturbedWeights`). The first ``start_step`` training steps are plain steps: manual
    optimisation is refused, so ``trainer.global_step`` (restored on resume) counts training steps.
    """

    _prefix = ""
    _sync_first_pass = True

    def __init__(self, freeze_bn_stats: bool = True, exclude: Sequence[str] = (), start_step: int = 0) -> None:
        super().__init__()
        check_bool("freeze_bn_stats", freeze_bn_stats)
        check_list("exclude", exclude, check_str)
        check_int("start_step", start_step, low=0)
        self.freeze_bn_stats = freeze_bn_stats
        self.start_step = start_step
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
        self._perturbed = PerturbedWeights()

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
        refuse_flat_strategies(trainer, name)
        if trainer.strategy.handles_gradient_accumulation:
            raise ValueError(
                f"{name} does not support {type(trainer.strategy).__name__} (it accumulates gradients itself); use"
                " single-device, DDP or ModelParallelStrategy (FSDP2)."
            )
        others = [cb for cb in trainer.callbacks if isinstance(cb, _ExtraPasses) and cb is not self]
        if others:
            raise ValueError(f"Only one sharpness penalty per Trainer; found {name} and {type(others[0]).__name__}.")
        self._step_takes_batch_idx = is_param_in_hook_signature(pl_module.training_step, "batch_idx", min_args=2)
        self._unpatch = wrap_optimizer_step(
            trainer.strategy, lambda closure: partial(self._closure, trainer, closure) if self._active else closure
        )

    @override
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        write_charts(trainer)
        named = [(n, p) for n, p in pl_module.named_parameters() if p.requires_grad]
        for pattern in self.exclude:
            if not any(fnmatch.fnmatchcase(n, pattern) for n, _ in named):
                raise ValueError(
                    f"`exclude` pattern {pattern!r} matches no trainable parameter; "
                    f"names look like {[n for n, _ in named[:4]]}"
                )
        self._params = [(n, p) for n, p in named if not any(fnmatch.fnmatchcase(n, pat) for pat in self.exclude)]

    @override
    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._unpatch is not None:
            self._unpatch()
            self._unpatch = None
        self._perturbed.release()
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
            self._active = trainer.global_step >= self.start_step and self._should_perturb(trainer)
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
    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        for key, value in self._logs.items():
            pl_module.log(
                f"{self._prefix}/{key}", value, on_step=True, on_epoch=False, sync_dist=self._sync_logs, batch_size=1
            )
        self._logs = {}

    def _closure(self, trainer: Trainer, closure: Callable[[], Any]) -> Any:
        self._in_closure = True
        try:
            with no_grad_sync(trainer.strategy, block=not self._sync_first_pass):
                result = closure()
        finally:
            self._in_closure = False
        if result is not None:  # None: training_step returned None and Lightning skipped backward
            self._combine(trainer, trainer.lightning_module)
        return result

    # -- tools for subclasses ----------------------------------------------------------------

    def state_bytes(self) -> int:
        """Bytes the callback holds between steps: the buffers of the perturbed weights (one copy of
        the perturbed parameters, allocated at the first perturbed step)."""
        return self._perturbed.nbytes()

    def _first_loss(self, trainer: Trainer) -> Tensor:
        """L(w) of Lightning's pass: the sum of the micro-batch losses it backpropagated, unscaled."""
        total = torch.stack([loss.float() for loss in self._first_losses]).sum()
        return total / loss_scale(trainer, total)

    def _grads(self, params: Sequence[nn.Parameter] | None = None) -> tuple[list[nn.Parameter], list[Tensor]]:
        params = [p for _, p in self._params] if params is None else params
        with_grad = [p for p in params if p.grad is not None]
        return with_grad, [p.grad for p in with_grad]

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
        scaler = grad_scaler(trainer)
        k = trainer.accumulate_grad_batches
        values = []
        with muted(pl_module, objective, self.freeze_bn_stats), torch.enable_grad():
            for i, (batch, batch_idx) in enumerate(self._batches):
                last = i == len(self._batches) - 1
                args = (batch, batch_idx) if self._step_takes_batch_idx or objective is not None else (batch,)
                with no_grad_sync(strategy, block=not last):
                    value = loss_of(strategy.training_step(*args)) / k
                    loss = value * weight
                    if scaler is not None:
                        loss = scaler.scale(loss)
                    pl_module.backward(loss)
                values.append(value.detach().float())
        return torch.stack(values).sum()
