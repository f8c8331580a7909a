"""Every private attribute of another library (Lightning, torchmetrics, torch) that litplug uses.

Each function names why it is needed and the public hook whose arrival upstream would remove it.
Nothing else in litplug touches a private attribute of another library.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.utils import _pytree

if TYPE_CHECKING:  # importing this file imports no Lightning: the bound engine reads `version`
    from lightning.pytorch import LightningModule, Trainer

__all__ = [
    "BatchNorm",
    "adaptive_avg_pool2d_backward",
    "foreach_add_",
    "foreach_copy_",
    "foreach_lerp_",
    "foreach_mul_",
    "foreach_norm",
    "tree_flatten",
    "tree_leaves",
    "tree_unflatten",
    "is_muted",
    "logs_hparams",
    "logs_now",
    "module_copy",
    "muted",
    "no_grad_sync",
    "no_hparams_session",
    "subcommand_defaults",
    "version",
    "wrap_optimizer_step",
]


def wrap_optimizer_step(
    strategy: Any, wrap_closure: Callable[[Callable[[], Any]], Callable[[], Any]]
) -> Callable[[], None]:
    """Replace ``strategy.optimizer_step`` on this instance so that the closure Lightning builds
    (training_step, backward) is passed through ``wrap_closure`` first; returns the undo.

    Why: SAM and IGNITE must run their extra passes after Lightning's backward and before
    ``on_before_optimizer_step``/clipping/the step, inside the optimizer closure. Missing upstream:
    a callback hook that may wrap the optimizer closure (e.g. ``Callback.wrap_closure``)."""
    original = strategy.optimizer_step

    def optimizer_step(optimizer: Any, closure: Callable[[], Any], *args: Any, **kwargs: Any) -> Any:
        return original(optimizer, wrap_closure(closure), *args, **kwargs)

    strategy.optimizer_step = optimizer_step  # type: ignore[method-assign]
    return lambda: strategy.__dict__.pop("optimizer_step", None)


def no_grad_sync(strategy: Any, block: bool) -> AbstractContextManager[Any]:
    """Skip DDP's gradient all-reduce in the backwards of the block (``block=True``).

    Why: the extra passes must all-reduce once, on the combined gradient. Missing upstream: a public
    form of ``lightning.pytorch.loops.utilities._block_parallel_sync_behavior`` (Fabric has
    ``Fabric.no_backward_sync``; the Trainer has none)."""
    from lightning.pytorch.loops.utilities import _block_parallel_sync_behavior

    return _block_parallel_sync_behavior(strategy, block=block)


def logs_now(trainer: Trainer) -> bool:
    """Whether a value logged on this step will be written (every ``log_every_n_steps``).

    Why: a step value logged when the Trainer does not write logs is overwritten unseen, and
    ``self.log`` costs more than an EMA update of a small model. Missing upstream: a public
    ``Trainer.should_update_logs`` (today ``trainer._logger_connector.should_update_logs``)."""
    return bool(getattr(trainer._logger_connector, "should_update_logs", True))


def _no_log(*args: Any, **kwargs: Any) -> None:
    return None


@contextmanager
def muted(pl_module: LightningModule, objective: Callable[..., Tensor] | None, freeze_bn_stats: bool) -> Iterator[None]:
    """Mute ``self.log``/``self.log_dict``, optionally swap ``training_step`` for ``objective``, put
    torchmetrics states back (a train metric updated in ``training_step`` counts the batch once)
    and (``freeze_bn_stats``) the running statistics of normalisation layers.

    Why: a sharpness pass re-runs the module's own ``training_step``, which must not log, update
    metrics or normalisation statistics a second time. The instance's ``__dict__`` is patched
    (``log``, ``log_dict``, ``training_step``) because the strategy calls them by attribute, and
    torchmetrics' ``_update_count``/``_computed`` are saved and put back with the metric states.
    Missing upstream: a Lightning context that runs ``training_step`` without side effects (no
    logging, no metric updates), and a public ``Metric`` state snapshot/restore in torchmetrics
    (``metric_state`` is public; the update counter and cached result are not)."""
    norms = [
        m for m in pl_module.modules()
        if getattr(m, "track_running_stats", False) and getattr(m, "running_mean", None) is not None
    ]  # fmt: skip
    saved = [[b.clone() for b in m.buffers(recurse=False)] for m in norms] if freeze_bn_stats else []
    metrics = [m for m in pl_module.modules() if isinstance(getattr(m, "metric_state", None), dict)]
    metric_states = [
        (
            {k: v.clone() if isinstance(v, Tensor) else list(v) for k, v in m.metric_state.items()},
            m._update_count,
            m._computed,
        )
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


def is_muted(pl_module: Any) -> bool:
    """Whether ``pl_module`` runs inside :func:`muted` (its ``log`` is the muted one), so that a
    nested caller does not snapshot and put back the metric states a second time."""
    return pl_module.__dict__.get("log") is _no_log


def version(t: Tensor) -> int:
    """The in-place write counter of ``t`` (autograd's version counter).

    Why: UnlearningMask skips a second masking pass over a gradient that nothing wrote to since the
    first one, and the bound engine keeps ``|W|`` while the weight is unchanged. Missing upstream: a
    public accessor of the counter (torch exposes ``Tensor._version``)."""
    return t._version


def subcommand_defaults(cli: Any, subcommand: str | None) -> dict[str, Any]:
    """The defaults of a LightningCLI subcommand's parser (the Trainer's arguments with
    ``trainer_defaults``, ``ckpt_path``, ...), as a dict; without a subcommand (``run=False``) the
    one parser holds them.

    Why: the run's hparams are the config values that differ from these defaults. Missing upstream:
    a public accessor of the subcommand parsers (LightningCLI keeps them in ``_subcommand_parsers``)."""
    parsers = getattr(cli, "_subcommand_parsers", None) if subcommand else None
    return (parsers[subcommand] if parsers else cli.parser).get_defaults().as_dict()


def logs_hparams(obj: Any) -> bool:
    """Whether Lightning sends the saved hyper-parameters of ``obj`` (a LightningModule or
    LightningDataModule) to the loggers: ``save_hyperparameters(logger=False)`` keeps them out.

    Why: the run's hparams session holds what Lightning would log. Missing upstream: a public
    accessor of the flag (``HyperparametersMixin._log_hyperparams``)."""
    return bool(getattr(obj, "_log_hyperparams", False))


def no_hparams_session(logger: Any) -> None:
    """Make a ``TensorBoardLogger``'s ``log_hyperparams`` (called by the Trainer at every run's
    start) write no hparams summaries to the event file, keeping what it does besides: the
    ``hparams.yaml`` of the log folder. ``log_hyperparams`` writes the experiment summary, the
    session start and end exactly when it has metrics, and without metrics given it has only the
    ``hp_metric`` placeholder of ``default_hp_metric=True``.

    Why: litplug writes the run's one session; Lightning's second session in the folder brings an
    experiment summary, which TensorBoard's HPARAMS table takes as its columns for every run under
    the log directory. Missing upstream: a public switch of a built logger (the constructor's
    ``default_hp_metric``, kept as ``_default_hp_metric``)."""
    logger._default_hp_metric = False


def module_copy(module: torch.nn.Module, tensors: dict[int, Tensor] | None = None) -> torch.nn.Module:
    """A copy of ``module`` with its own parameters, buffers, tensor attributes and submodules
    (clones, or ``tensors[id(original)]`` where given: e.g. full tensors for FSDP2's sharded
    parameters), no hooks and no trainer; an FSDP2 module's copy is of its original class. Every
    other attribute (optimizer factories, configuration, references to a CLI) is shared with the
    original, not copied.

    Why: ``deepcopy`` refuses FSDP2 modules, follows a CLI-built module's optimizer factory to the
    CLI, the trainer and its live data-loader iterators (which cannot be copied), and copies the
    hooks others registered on the original (litplug's logits captures, a user's), which would
    fire on the copy's forwards and act on the original's state. This builds the copy from each
    module's ``__dict__``: ``_parameters``, ``_buffers``, ``_modules`` and the hook dictionaries are
    torch's private layout. Missing upstream: a public ``Module`` copy of the tensors and structure
    without hooks (and one for FSDP2 modules with full parameters)."""
    import types

    from torch.distributed.fsdp import FSDPModule

    memo: dict[int, Any] = dict(tensors or {})

    def tensor(t: Any) -> Any:
        if not isinstance(t, Tensor):
            return t
        if id(t) not in memo:
            clone = t.detach().clone()
            memo[id(t)] = torch.nn.Parameter(clone, t.requires_grad) if isinstance(t, torch.nn.Parameter) else clone
        return memo[id(t)]

    def copy(m: torch.nn.Module) -> torch.nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        cls = type(m).__mro__[2] if isinstance(m, FSDPModule) else type(m)  # FSDPModule.__new__'s rule
        new = cls.__new__(cls)
        memo[id(m)] = new
        state: dict[str, Any] = {}
        for key, value in vars(m).items():
            if key in ("_parameters", "_buffers"):
                value = {k: tensor(v) for k, v in value.items()}
            elif key == "_modules":
                value = {k: None if c is None else copy(c) for k, c in value.items()}
            elif key.endswith("hooks") or "_hooks_" in key:
                value = type(value)()
            elif key == "_non_persistent_buffers_set":
                value = set(value)
            elif key == "_trainer":
                value = None
            elif isinstance(value, Tensor):
                value = tensor(value)
            elif isinstance(value, list) and any(isinstance(v, Tensor) for v in value):
                value = [tensor(v) for v in value]
            elif isinstance(value, types.MethodType) and isinstance(value.__self__, torch.nn.Module):
                # a method patched onto the instance (e.g. by a strategy): bound to the copy
                value = types.MethodType(value.__func__, copy(value.__self__))
            state[key] = value
        new.__dict__.update(state)
        return new

    return copy(module)


# -- torch ------------------------------------------------------------------------------------

BatchNorm = nn.modules.batchnorm._BatchNorm
"""The base class of BatchNorm1d/2d/3d, their lazy forms and SyncBatchNorm, for one ``isinstance``
check. Missing upstream: a public base class of the batch-norm layers."""

tree_leaves = _pytree.tree_leaves
tree_flatten = _pytree.tree_flatten
tree_unflatten = _pytree.tree_unflatten
"""The leaves of an fx node's nested ``args``/``kwargs``, and putting new leaves back. Missing
upstream: a public pytree module (``torch.utils._pytree`` is what ``torch.fx`` and
``torch.export`` use themselves)."""

foreach_copy_ = torch._foreach_copy_
foreach_lerp_ = torch._foreach_lerp_
foreach_mul_ = torch._foreach_mul_
foreach_add_ = torch._foreach_add_
foreach_norm = torch._foreach_norm
"""One kernel launch per list of tensors for the averages' updates and swaps and the
perturbation's scaling. Missing upstream: a public foreach API (``torch.optim`` calls these
private ops itself)."""


def adaptive_avg_pool2d_backward(grad: Tensor, like: Tensor) -> Tensor:
    """The transpose of ``adaptive_avg_pool2d`` applied to ``grad``, for an input shaped like
    ``like`` (CROWN's backward step through adaptive average pooling), in one kernel. Missing
    upstream: a public adjoint of adaptive pooling (``avg_pool2d_backward`` is public in
    ``torch.ops.aten``, its adaptive counterpart is not)."""
    return torch.ops.aten._adaptive_avg_pool2d_backward(grad, like)
