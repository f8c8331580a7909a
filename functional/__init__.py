"""The pure-torch cores of litplug's methods, usable without a Trainer.

* weight averaging: :func:`ema_decay`, :func:`average_update_`, :func:`update_bn_`;
* sharpness: :func:`sam_perturbation`, :func:`sam_gradient` (``sam_gradient_``),
  :func:`ignite_gradient` (``ignite_gradient_``), :func:`dual_ascent`, :func:`global_norm`;
* weight masks: :func:`topk_masks`, :func:`kth_largest_key`, :func:`saliency_scores`,
  :func:`attribution_scores`, :func:`pack_mask`, :func:`unpack_mask`, :func:`frozen_values`,
  :func:`enforce_masked_grads_`, :func:`restore_frozen_`;
* noisy labels: :func:`elr_update`, :func:`elr_regularizer`, :func:`elr_logit_grad`,
  :func:`pskd_alpha`, :func:`pskd_targets`, :func:`pskd_logit_grad`;
* data scores: :func:`el2n_scores`, :func:`grand_scores`, :func:`forgetting_events`,
  :func:`forgetting_scores`.

Example:
    >>> import torch
    >>> from litplug.functional import average_update_
    >>> avg = [torch.zeros(2)]
    >>> average_update_(avg, [torch.ones(2)], 0.5); avg
    [tensor([0.5000, 0.5000])]
"""

from .averaging import average_update_, ema_decay, update_bn_
from .masks import (
    attribution_scores,
    enforce_masked_grads_,
    frozen_values,
    kth_largest_key,
    pack_mask,
    restore_frozen_,
    saliency_scores,
    topk_masks,
    unpack_mask,
)
from .noisy_labels import (
    elr_logit_grad,
    elr_regularizer,
    elr_update,
    pskd_alpha,
    pskd_logit_grad,
    pskd_targets,
)
from .pruning import el2n_scores, forgetting_events, forgetting_scores, grand_scores
from .sharpness import (
    dual_ascent,
    global_norm,
    ignite_gradient,
    ignite_gradient_,
    sam_gradient,
    sam_gradient_,
    sam_perturbation,
)

__all__ = [
    "elr_logit_grad",
    "elr_regularizer",
    "elr_update",
    "pskd_alpha",
    "pskd_logit_grad",
    "pskd_targets",
    "el2n_scores",
    "forgetting_events",
    "forgetting_scores",
    "grand_scores",
    "attribution_scores",
    "average_update_",
    "dual_ascent",
    "ema_decay",
    "enforce_masked_grads_",
    "frozen_values",
    "global_norm",
    "ignite_gradient",
    "ignite_gradient_",
    "pack_mask",
    "unpack_mask",
    "kth_largest_key",
    "restore_frozen_",
    "saliency_scores",
    "sam_gradient",
    "sam_gradient_",
    "sam_perturbation",
    "topk_masks",
    "update_bn_",
]
