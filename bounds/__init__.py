"""Interval bound propagation (IBP) for any ``torch.fx``-traceable network.

Method card: Gowal et al. 2018, "On the Effectiveness of Interval Bound Propagation for Training
Verifiably Robust Models". An input box ``[l, u]`` is carried through the network in centre/radius
form ``(c, r) = ((u + l) / 2, (u - l) / 2)``: an affine layer maps it to ``(W c + b, |W| r)``, a
monotone activation ``f`` to the box of ``[f(c - r), f(c + r)]``. The result contains the output of
every input inside the box. One batched pass computes centre and radius (two matmuls per layer, no
per-sample loop); optionally the clean batch is carried along (batch-norm statistics in train mode),
stacked with the centres in one tensor so that each affine layer runs once on both. With gradients
on, ``Linear``, ``ReLU`` and train-mode batch norm run fused autograd functions (hand-written
backward passes, checked against plain autograd in the tests) that avoid the weight-sized and
activation-sized temporaries autograd would create.

Cost without gradients (evaluation, ``CertifiedClassifier.certify``): two affine passes per layer
(``W c + b`` and ``|W| r``), so about half the throughput of the network's own forward is the
floor (CNN7: see ``benchmarks/scaling.py``, variant ``certify``). What keeps it there: ``|W|`` is
kept per weight and recomputed only when the weight changes (:func:`~litplug.bounds.fused.cached_abs`:
one extra copy of the conv/linear weights in memory); the clean batch is left out unless batch
norm uses batch statistics (``robust_terms(..., clean_output=False)``); batch norm and ReLU
overwrite a box that the layer before computed for them alone (``Pass.owned``), so a layer
allocates what the plain forward does; the ReLU box is ``(max(c, h), min(r, h))`` with
``h = relu(c + r) / 2``.

Backward linear bounds (CROWN, Zhang et al. 2018; CROWN-IBP, Zhang et al. 2020):
:func:`crown_bounds` (:mod:`litplug.bounds.crown`), with one linear relaxation per operator in the
same table (:mod:`litplug.bounds.relaxation`): Linear, Conv1d/Conv2d, batch norm, ReLU (adaptive
lower slope), Flatten and reshapes, average pooling, ``+``/``-``, scaling by constants, slicing,
``torch.cat``, dropout in eval mode. Operators without one (max-pooling, sigmoid, tanh, leaky
ReLU) are refused by name, module path or graph node. Equal to auto_LiRPA 0.3's ``backward`` and
``CROWN-IBP`` bounds to about 1e-16 in float64 (tests/bounds/test_crown.py).

Margins ``z_y - z_j`` are bounded with last-layer elision: the specification matrix ``C`` (rows
``e_y - e_j``) is folded into the last linear layer, ``(C W) h + C b``, which is never looser than
subtracting the output intervals because ``|C W| <= |C| |W|``.

Supported (the table ``OPERATORS`` in :mod:`litplug.bounds.ops`): ``Linear``, ``Conv1d``/``Conv2d``
(zero padding), ``BatchNorm1d``/``BatchNorm2d``, ``ReLU``, ``LeakyReLU``, ``Sigmoid``, ``Tanh``,
``Flatten``, ``AvgPool2d``, ``AdaptiveAvgPool2d``, ``MaxPool2d``, ``Dropout``, ``Identity``, residual
``+``/``-``, multiplication by constants, ``torch.cat``, ``view``/``reshape``/``flatten`` and their
functional forms. Anything else raises :class:`UnsupportedOperationError` when the network is
traced, naming the operation and the node where it occurs.

Batch norm: in train mode the affine map uses the statistics of the clean batch passed as
``clean`` (the auto_LiRPA / CTBench convention; without ``clean`` those of the box centres), in
eval mode the running statistics.

Distributed: pure per-sample computation on local tensors, no collectives. The engine reads full
weights, so FSDP2-sharded (DTensor) parameters are not supported.

Files: ``interval.py`` (the box type, the result, the per-call state ``Pass``), ``ops.py`` (the
operator table and the interval rules), ``fused.py`` (the hand-written autograd functions),
``engine.py`` (tracing, checks, the stateless interpreter, the weakly keyed cache), ``specs.py``
(input boxes, margin specification and bounds), ``regularizers.py`` (warmup regularizers).

Adding an operator: one entry in ``OPERATORS`` (:mod:`litplug.bounds.ops`) and its test.

1. Key: the module type (exact; e.g. ``nn.ELU``), the function (``F.elu``) or ``"Tensor.<name>"``
   for a tensor method: how it appears in ``torch.fx.symbolic_trace(net).graph``.
2. ``rule(p, target, args, kwargs) -> Interval``: the box of the output given the boxes in
   ``args`` (an :class:`Interval` wherever the input is perturbed, plain values elsewhere; for a
   module ``args == (x,)`` and ``target`` is the module). Build it from the helpers of
   :mod:`~litplug.bounds.ops`: ``monotone`` (any monotone elementwise map; honours
   ``p.linearize`` and ``p.relu``), ``affine`` (``W x + b``), ``same`` (linear maps with
   non-negative weights: reshapes, pooling), ``shift``/``scale`` (a constant added/multiplied).
   A monotone activation is one line: ``nn.ELU: Op(monotone_module)``.
3. ``check(target, node, perturbed)`` (optional): runs when a network is traced and raises
   :class:`UnsupportedOperationError` naming the node for arguments the rule cannot bound (for
   modules: on every call of the module; for functions and methods: when the node is perturbed,
   ``perturbed`` holding every node that depends on the input).
4. ``fused(p, target, args, kwargs)`` (optional): the same rule through a hand-written
   ``torch.autograd.Function`` (:mod:`litplug.bounds.fused`), returning None where it does not
   apply. ``BoundedNetwork(net)(..., fused=False)`` runs the plain rules; a test compares both.
5. The test: bounds contain the outputs of sampled inputs in the box, are exact for a zero-width
   box, and (for a fused variant) equal the plain rule's values and gradients in float64
   (``tests/bounds/test_engine.py``, ``tests/bounds/test_fused.py``).

Example:
    >>> import torch
    >>> from torch import nn
    >>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    >>> x = torch.rand(5, 4)
    >>> lower, upper = interval_bounds(net, x - 0.1, x + 0.1)
    >>> bool((lower <= net(x)).all() and (net(x) <= upper).all())
    True
"""

from __future__ import annotations

from .crown import crown_bounds, linear_bounds
from .engine import BoundedNetwork, bounded, interval_bounds
from .interval import BoundResult, Interval, Pass, UnsupportedOperationError
from .lipschitz import local_lipschitz
from .ops import OPERATORS, Op
from .regularizers import warmup_regularizers
from .specs import input_box, margin_bounds, margin_spec

__all__ = [
    "OPERATORS",
    "BoundResult",
    "BoundedNetwork",
    "Interval",
    "Op",
    "Pass",
    "UnsupportedOperationError",
    "bounded",
    "crown_bounds",
    "input_box",
    "interval_bounds",
    "linear_bounds",
    "local_lipschitz",
    "margin_bounds",
    "margin_spec",
    "warmup_regularizers",
]
