"""Early-learning regularisation (Liu et al. 2020) for any classifier-like module.

Example:
    >>> from lightning.pytorch import Trainer
    >>> from litplug.callbacks import ELR
    >>> from litplug.datamodules import Digits, Indexed, NoisyLabels
    >>> from litplug.modules import MLP, Classifier
    >>> model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10), num_classes=10)
    >>> data = Indexed(NoisyLabels(Digits(), rate=0.4))
    >>> Trainer(max_epochs=30, callbacks=[ELR(beta=0.7, lam=3.0)]).fit(model, data)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import ClassVar

import torch
from lightning.pytorch import Trainer
from torch import Tensor

from ..functional import elr_logit_grad, elr_regularizer, elr_update
from ..validation import check_number
from .per_example import LogitTerm


class ELR(LogitTerm):
    """Early-learning regularization (ELR) for training on noisy labels.

    Add ``lam * mean_i log(1 - <p_i, t_i>)`` to the module's loss, ``p`` the (clamped) softmax of
    the logits and ``t_i <- beta t_i + (1 - beta) p_i / sum(p_i)`` a per-example moving average of
    the predictions, updated with the batch's logits before the term is taken (as the reference
    code does). Early in training the model fits the clean labels; the term pulls the prediction
    toward its own earlier predictions, which keeps it from memorising the noisy ones.

    The module keeps its own loss (cross-entropy for ``Classifier``); the term is added to it through
    the logits' gradient (see :class:`litplug.callbacks.per_example.LogitTerm` for the seam): the
    module is not edited, ``training_step`` must call ``self(inputs)``. Needs the datamodule wrapped
    in ``litplug.datamodules.Indexed``. Logs ``elr/term`` (the regulariser, before ``lam``).
    Memory: one float32 (float64 in a float64 run) per example per class (the targets ``t``, in
    ``state_dict``). Under DDP one ``all_gather`` of the batch's new targets per step.

    Args:
        beta: momentum of the targets' moving average, in [0, 1) (the paper's CIFAR-10 value: 0.7).
        lam: weight of the regulariser, > 0 (CIFAR-10: 3).
    """

    logged = "elr/term"
    litplug_charts: ClassVar[dict[str, dict[str, list[str]]]] = {"data": {"ELR regulariser": ["^elr/term"]}}

    def __init__(self, beta: float = 0.7, lam: float = 3.0) -> None:
        super().__init__()
        self.beta = check_number("beta", beta, 0, 1, high_open=True)
        self.lam = check_number("lam", lam, 0, low_open=True)

    def init_state(self, n: int, num_classes: int) -> Tensor:
        return torch.zeros(n, num_classes)

    def batch_term(self, trainer: Trainer, logits: Tensor, index: Tensor, targets: Tensor) -> Tensor:
        rows = elr_update(self.state[index].to(logits), logits, self.beta)
        self.state[index] = rows.to(self.state)
        self._value = elr_regularizer(logits, rows)
        return self.lam * elr_logit_grad(logits, rows)
