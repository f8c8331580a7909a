"""Progressive self-knowledge distillation (PS-KD, Kim et al. 2021) for any classifier-like module.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.callbacks import PSKD
    >>> from litplug.datamodules import Digits, Indexed
    >>> from litplug.modules import MLP, Classifier
    >>> model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10), num_classes=10)
    >>> Trainer(max_epochs=30, callbacks=[PSKD(alpha=0.8)]).fit(model, Indexed(Digits()))  # doctest: +SKIP
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from lightning.pytorch import Trainer
from torch import Tensor

from ..functional import pskd_alpha, pskd_logit_grad
from ..validation import check_int, check_number
from .per_example import LogitTerm


class PSKD(LogitTerm):
    """Progressive self-knowledge distillation (PS-KD): soft targets from the model itself.

    Train on ``(1 - a_t) y + a_t P`` with ``P`` the model's softmax for the sample at its last
    presentation (the previous epoch) and ``a_t = alpha (t + 1) / T`` (epochs 0-based, ``T`` the
    last epoch + 1), as the reference code does; at the first presentation ``P`` is the one-hot
    label (no change to the loss).

    Cross-entropy with that soft target is ``CE(z, y) + a_t (CE(z, P) - CE(z, y))``; the callback
    adds the second term to the module's own loss through the logits' gradient
    ``a_t (onehot(y) - P) / B`` (see :class:`litplug.callbacks.per_example.LogitTerm`), so the total
    is PS-KD's loss exactly when the module's loss is the mean cross-entropy of its logits
    (``Classifier``), and that loss plus the distillation correction otherwise. Needs the datamodule
    wrapped in ``litplug.datamodules.Indexed``. Logs ``pskd/alpha``. Memory: one float32 (float64 in a
    float64 run) per example per class (``P``, in ``state_dict``; rows of -1: not presented yet).

    Args:
        alpha: ``alpha_T``, the weight of the model's own predictions at the last epoch, in (0, 1]
            (the paper: 0.8).
        end_epoch: ``T`` (None: the Trainer's ``max_epochs``).
    """

    logged = "pskd/alpha"
    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {"data": {"PS-KD alpha": ["^pskd/alpha"]}}

    def __init__(self, alpha: float = 0.8, end_epoch: int | None = None) -> None:
        super().__init__()
        self.alpha = check_number("alpha", alpha, 0, 1, low_open=True)
        self.end_epoch = check_int("end_epoch", end_epoch, low=1, allow_none=True)

    def init_state(self, n: int, num_classes: int) -> Tensor:
        return torch.full((n, num_classes), -1.0)  # -1 rows: not presented yet

    def batch_term(self, trainer: Trainer, logits: Tensor, index: Tensor, targets: Tensor) -> Tensor:
        end = self.end_epoch or trainer.max_epochs
        if end is None or end < 1:
            raise ValueError("PSKD needs `end_epoch` when the Trainer has no max_epochs")
        alpha = pskd_alpha(trainer.current_epoch, self.alpha, end)
        previous = self.state[index].to(logits)
        fresh = previous[:, 0] < 0
        previous[fresh] = F.one_hot(targets[fresh], logits.shape[-1]).to(previous)
        self.state[index] = logits.softmax(-1).to(self.state)
        self._value = torch.tensor(alpha)
        return pskd_logit_grad(targets, previous, alpha)
