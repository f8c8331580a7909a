"""What the per-example callbacks (``DataPruning``, ``ELR``, ``PSKD``) share: the indexed
datamodule they need, a check that the module is classifier-like before training, and the
capture of the logits the module's own forward returns inside ``training_step``."""

from __future__ import annotations

from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from ..plumbing import loss_scale, refuse_flat_strategies, training_mode
from ..protocols import IndexedData, missing_members


def indexed_data(trainer: Trainer, who: str) -> Any:
    """The trainer's datamodule if it satisfies :class:`IndexedData`, else a ``TypeError`` that
    says how to get one."""
    dm = trainer.datamodule
    missing = missing_members(dm, IndexedData)
    if dm is None or missing:
        got = "no datamodule (dataloaders passed to fit)" if dm is None else f"{type(dm).__name__} lacks {missing}"
        raise TypeError(
            f"{who} needs per-example indices: the datamodule must satisfy IndexedData (litplug.protocols); {got}. "
            "Wrap it: `litplug.datamodules.Indexed(datamodule)`"
        )
    return dm


def to_module(trainer: Trainer, pl_module: LightningModule, batch: Any) -> Any:
    """``batch`` in the module's precision (``64-true`` doubles floats) on its device."""
    return move_data_to_device(trainer.precision_plugin.convert_input(batch), pl_module.device)


def check_classifier(trainer: Trainer, pl_module: LightningModule, dm: Any, who: str) -> int:
    """Run the module's forward on the first training sample (eval mode, no grad) and return the
    number of classes; a ``ValueError`` unless samples are ``(inputs, class)`` and
    ``forward(inputs)`` returns logits ``[batch, classes]``."""
    batch = next(iter(dm.subset_loader([0], 1)))
    what = (
        f"{who} needs a classifier-like module: training batches (inputs, targets) with class targets [batch], and "
        "forward(inputs) returning logits [batch, classes]"
    )
    if not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[1], Tensor):
        raise ValueError(f"{what}; the training batches are {type(batch).__name__}s, not (inputs, targets)")
    x, y = to_module(trainer, pl_module, batch)
    if y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"{what}; the targets have shape {tuple(y.shape)} and dtype {y.dtype}")
    try:
        with torch.no_grad(), training_mode(pl_module, False), trainer.precision_plugin.forward_context():
            out = pl_module(x)
    except Exception as err:  # noqa: BLE001  the module's own error, said in our terms
        raise ValueError(f"{what}; {type(pl_module).__name__}(inputs) raised {type(err).__name__}: {err}") from err
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != 1 or out.shape[1] < 2:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"{what}; forward returned {got} for one sample")
    return int(out.shape[1])


class LogitsCapture:
    """A forward hook on the module that keeps the first output of shape ``[batch, classes]`` of
    every training batch (the logits its ``training_step`` computes through ``self(inputs)``),
    with its graph. ``open(batch_size)`` at batch start, ``close()`` at batch end; ``on_logits``
    (if set) is called with every such output while open (once per pass: SAM's second pass too)."""

    def __init__(self, pl_module: LightningModule, num_classes: int, on_logits: Any = None) -> None:
        self.num_classes, self.on_logits = num_classes, on_logits
        self.batch_size: int | None = None
        self.logits: Tensor | None = None
        self.handle: RemovableHandle | None = pl_module.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, out: Any) -> None:
        if self.batch_size is None or not isinstance(out, Tensor):
            return
        if out.dim() == 2 and out.shape == (self.batch_size, self.num_classes):
            if self.logits is None:
                self.logits = out
            if self.on_logits is not None and out.requires_grad:
                self.on_logits(out)

    def open(self, batch_size: int) -> None:
        self.batch_size, self.logits = batch_size, None

    def close(self) -> None:
        self.batch_size, self.logits = None, None

    def remove(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


class LogitTerm(Callback):
    """Base of callbacks that add a term ``T(z)`` of the logits ``z`` to the module's own loss,
    with per-example state ``[N, classes]`` (``ELR``, ``PSKD``), on any classifier-like module.

    The seam: a forward hook on the module catches the logits its ``training_step`` computes
    (``self(inputs)``), and a tensor hook on them adds ``c dT/dz`` to their gradient during the
    module's own backward, ``c`` the scale Lightning applies to the loss (``1/accumulate_grad_batches``
    in automatic optimisation, the GradScaler's scale in ``16-mixed``). The sum is the gradient of
    ``loss + T``; nothing is run twice, the module is not edited. Under DDP each rank updates the
    rows of its own samples, and at the end of every training batch one ``all_gather`` of the
    batch's indices and new rows (one ``[batch, classes + 1]`` float64 tensor per rank, after one
    of the batch sizes) writes every rank's rows into every rank's state: the state is equal on
    every rank at every step, so a checkpoint saved from rank 0 at any step holds all of it. A row
    two ranks update in the same step (a padded sample) takes the mean of their rows.

    Subclasses set ``logged`` and implement :meth:`batch_term` (called on the first capture of a
    batch: update the state rows, return ``dT/dz``) and :meth:`init_state`."""

    logged = "term"  # the tag of the value each batch logs

    def __init__(self) -> None:
        super().__init__()
        self.state: Tensor | None = None
        self._dm: Any = None
        self._capture: LogitsCapture | None = None
        self._index: Tensor | None = None
        self._grad: Tensor | None = None
        self._targets: Tensor | None = None
        self._value: Tensor | None = None

    def init_state(self, n: int, num_classes: int) -> Tensor:
        raise NotImplementedError

    def batch_term(self, trainer: Trainer, logits: Tensor, index: Tensor, targets: Tensor) -> Tensor:
        raise NotImplementedError

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":
            name = type(self).__name__
            refuse_flat_strategies(trainer, name)
            self._dm = indexed_data(trainer, name)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        num_classes = check_classifier(trainer, pl_module, self._dm, type(self).__name__)
        n = self._dm.num_examples
        if self.state is None or self.state.shape != (n, num_classes):
            # float32 (float64 for a float64 module: its trajectory is then exact)
            dtype = torch.float64 if pl_module.dtype == torch.float64 else torch.float32
            self.state = self.init_state(n, num_classes).to(dtype)
        self._capture = LogitsCapture(pl_module, num_classes, on_logits=lambda z: self._on_logits(trainer, z))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._grad, self._targets = None, batch[1]
        self._capture.open(len(self._dm.batch_index))

    def _on_logits(self, trainer: Trainer, z: Tensor) -> None:
        if self._grad is None:  # the first pass of the batch updates the state
            index = self._dm.batch_index
            self._grad = self.batch_term(trainer, z.detach(), index, self._targets).to(z.dtype)
            self._index = index
        automatic = trainer.lightning_module.automatic_optimization
        scale = loss_scale(trainer, z).to(z.dtype) / (trainer.accumulate_grad_batches if automatic else 1)
        grad = self._grad
        z.register_hook(lambda g: g + scale * grad)

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._capture.logits is None:
            raise ValueError(
                f"{type(self).__name__} adds its term through the logits of the module's training forward, but "
                f"{type(pl_module).__name__}.training_step did not call the module (self(inputs)) on the batch"
            )
        self._capture.close()
        if self._value is not None:
            pl_module.log(self.logged, self._value.float(), on_step=True, on_epoch=False)
        if trainer.world_size > 1:
            self._share_rows(trainer)

    def _share_rows(self, trainer: Trainer) -> None:
        """Write the rows every rank updated in this batch into this rank's state (same on all ranks)."""
        device = trainer.strategy.root_device
        index = self._index.to(self.state.device)
        sizes = trainer.strategy.all_gather(torch.tensor([len(index)], device=device)).flatten()
        # float64 holds the indices and float32 or float64 rows exactly; -1: padding to the largest batch
        packed = torch.full((int(sizes.max()), self.state.shape[1] + 1), -1.0, dtype=torch.float64, device=device)
        packed[: len(index), 0] = index.to(device, torch.float64)
        packed[: len(index), 1:] = self.state[index].to(device, torch.float64)
        gathered = trainer.strategy.all_gather(packed).reshape(-1, packed.shape[1]).cpu()
        gathered = gathered[gathered[:, 0] >= 0]
        rows, where = torch.unique(gathered[:, 0].long(), return_inverse=True)
        total = torch.zeros(len(rows), gathered.shape[1] - 1, dtype=torch.float64).index_add_(0, where, gathered[:, 1:])
        count = torch.zeros(len(rows), dtype=torch.float64).index_add_(
            0, where, torch.ones(len(where), dtype=torch.float64)
        )
        self.state[rows.to(self.state.device)] = (total / count[:, None]).to(self.state)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self._capture is not None:
            self._capture.remove()
            self._capture = None

    def state_dict(self) -> dict[str, Any]:
        return {"state": self.state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = state_dict["state"]
