"""The pure-torch cores of litplug's methods, usable without a Trainer.

litplug's cores are this package and two siblings: :mod:`litplug.bounds` (bound propagation as an
operator table and an fx engine) and :mod:`litplug.merging` (alignment and merge rules). Nothing
here imports Lightning, ``litplug.callbacks`` or ``litplug.modules``; the callbacks and modules
are thin wrappers over these names.

* weight averaging: :func:`ema_decay`, :func:`average_update_`, :func:`update_bn_`;
* sharpness: :func:`sam_perturbation`, :func:`sam_gradient_`, :func:`ignite_gradient_`,
  :func:`dual_ascent`, :func:`global_norm`;
* weight masks: :func:`topk_masks`, :func:`iter_topk_masks`, :func:`kth_largest_key`,
  :func:`saliency_scores`, :func:`attribution_scores`, :func:`pack_mask`, :func:`unpack_mask`,
  :func:`count_selected`, :func:`frozen_entries_are_zero`, :func:`frozen_values`,
  :func:`enforce_masked_grads_`, :func:`restore_frozen_`;
* noisy labels: :func:`elr_update`, :func:`elr_regularizer`, :func:`elr_logit_grad`,
  :func:`pskd_alpha`, :func:`pskd_targets`, :func:`pskd_logit_grad`;
* certified training: :func:`eps_schedule`, :func:`ibp_init_`, :func:`pgd_attack`,
  :func:`linearized_tightness`;
* offline optimisation: :func:`gradient_ascent`, :func:`starting_designs`;
* unlearning: :func:`npo_loss`, :func:`simnpo_loss`, :func:`rmu_loss`, :func:`rmu_direction`,
  :func:`random_other_labels`, :func:`l1_alpha`, :func:`mia_efficacy`, :func:`loss_mia_auc`;
* model soups: :func:`uniform_soup`, :func:`greedy_soup`;
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
from .certified import eps_schedule, ibp_init_, linearized_tightness, pgd_attack
from .masks import (
    attribution_scores,
    count_selected,
    enforce_masked_grads_,
    frozen_entries_are_zero,
    frozen_values,
    iter_topk_masks,
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
from .offline import gradient_ascent, starting_designs
from .pruning import el2n_scores, forgetting_events, forgetting_scores, grand_scores
from .sharpness import dual_ascent, global_norm, ignite_gradient_, sam_gradient_, sam_perturbation
from .soup import greedy_soup, uniform_soup
from .unlearning import (
    l1_alpha,
    loss_mia_auc,
    mia_efficacy,
    npo_loss,
    random_other_labels,
    rmu_direction,
    rmu_loss,
    simnpo_loss,
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
    "count_selected",
    "dual_ascent",
    "ema_decay",
    "enforce_masked_grads_",
    "eps_schedule",
    "frozen_entries_are_zero",
    "frozen_values",
    "global_norm",
    "gradient_ascent",
    "greedy_soup",
    "ibp_init_",
    "ignite_gradient_",
    "iter_topk_masks",
    "kth_largest_key",
    "l1_alpha",
    "linearized_tightness",
    "loss_mia_auc",
    "mia_efficacy",
    "npo_loss",
    "rmu_direction",
    "rmu_loss",
    "simnpo_loss",
    "pack_mask",
    "pgd_attack",
    "random_other_labels",
    "restore_frozen_",
    "saliency_scores",
    "sam_gradient_",
    "sam_perturbation",
    "starting_designs",
    "topk_masks",
    "uniform_soup",
    "unpack_mask",
    "update_bn_",
]
