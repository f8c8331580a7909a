"""Per-example data scores for pruning: EL2N and GraNd (Paul et al. 2021, "Deep Learning on a Data
Diet") and forgetting events (Toneva et al. 2019, "An Empirical Study of Example Forgetting").

* ``el2n_scores(model, loader)``: ``||softmax(f(x)) - onehot(y)||_2`` per sample (one forward);
* ``grand_scores(model, loader)``: ``||grad_w loss(f(x), y)||_2`` per sample over every trainable
  parameter, in closed form from one forward and a backward to the layers' outputs per batch for
  linear, convolution, embedding and normalisation layers, else with ``torch.func`` (``vmap`` of
  ``grad`` over the batch);
* ``forgetting_events(previous, correct)``: which samples were classified correctly at their last
  presentation and are not now (one event each); ``forgetting_scores`` turns counts into scores.

Batches are ``(inputs, targets)`` on the model's device; scores come in loader order. Both score
functions run the model as it is (call ``model.eval()`` first for scores free of dropout and
batch statistics) and leave its parameters and buffers untouched.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from litplug.functional import el2n_scores, grand_scores
    >>> model = nn.Linear(3, 2)
    >>> loader = [(torch.randn(4, 3), torch.tensor([0, 1, 1, 0]))]
    >>> el2n_scores(model, loader).shape, grand_scores(model, loader).shape
    (torch.Size([4]), torch.Size([4]))
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..validation import check_int

__all__ = ["el2n_scores", "forgetting_events", "forgetting_scores", "grand_scores"]

Loss = Callable[[Tensor, Tensor], Tensor]


def _no_autocast(model: nn.Module) -> torch.autocast:
    """Autocast off on the model's device: scores in the model's own dtype."""
    parameter = next(model.parameters(), None)
    return torch.autocast(parameter.device.type if parameter is not None else "cpu", enabled=False)


def _batches(loader: Iterable[Any]) -> Iterable[tuple[Tensor, Tensor]]:
    for batch in loader:
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(
                f"data scores need (inputs, targets) batches, got a {type(batch).__name__}"
                + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            )
        yield batch[0], batch[1]


def _logits(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    out = model(x)
    _check_logits(out, y)
    return out


def _check_classes(y: Tensor, classes: int | None) -> None:
    """Class targets: integers in ``[0, classes)`` (``classes`` None: only not negative)."""
    if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
        raise ValueError(
            f"data scores need integer class targets, got {y.dtype} targets (grand_scores takes others with a loss)"
        )
    if y.numel():
        low, high = (int(t) for t in torch.aminmax(y))
        if low < 0 or (classes is not None and high >= classes):
            bound = f"in [0, {classes})" if classes is not None else "not negative"
            raise ValueError(f"data scores need class targets {bound}, got targets from {low} to {high}")


def _check_logits(out: Any, y: Tensor) -> None:
    if not isinstance(out, Tensor) or out.dim() != 2 or out.shape[0] != y.shape[0] or y.dim() != 1:
        got = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(
            f"data scores need a model mapping inputs to logits [batch, classes] and class targets [batch]; "
            f"got output {got} for targets {tuple(y.shape)}"
        )


@torch.no_grad()
def el2n_scores(model: nn.Module, loader: Iterable[Any]) -> Tensor:
    """EL2N: the L2 norm of the error ``softmax(f(x)) - onehot(y)`` of every sample, in loader
    order (float64 on the model's output device)."""
    scores = []
    with _no_autocast(model):
        for x, y in _batches(loader):
            logits = _logits(model, x, y)
            _check_classes(y, logits.shape[1])
            p = logits.double().softmax(-1)
            p[torch.arange(len(y), device=p.device), y] -= 1.0
            scores.append(p.norm(dim=-1))
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


def grand_scores(
    model: nn.Module, loader: Iterable[Any], loss: Loss | None = None, max_memory: int = 256 * 2**20
) -> Tensor:
    """GraNd: the L2 norm of the gradient of the per-sample loss (``loss(logits, targets)`` on a
    batch of one, mean cross-entropy unless given) with respect to every parameter that requires
    grad, in loader order (float64).

    One forward and one backward per batch, no graph kept after it. When the model is in eval mode
    and every trainable parameter belongs to a layer with a closed form (``nn.Linear``;
    ``nn.Conv1d``/``2d``/``3d``, any groups and padding mode; ``nn.Embedding`` without
    ``max_norm`` or ``scale_grad_by_freq``; the affine parameters of ``nn.LayerNorm``,
    ``nn.GroupNorm`` and ``BatchNorm`` with running statistics), the backward goes to the layers'
    outputs only (no parameter gradient) and the per-sample norms come from the layers' inputs and
    output gradients. A linear or convolution weight's per-sample gradient is
    ``sum_t g_it a_it^T`` over the output positions ``t`` (``a_it`` the input patch; per group):
    its squared norm is ``||g_i||^2 ||a_i||^2`` for one position, else
    ``sum_ts (g_it . g_is)(a_it . a_is)`` (``T^2 (in + out)`` flops) or the formed ``[out, in]``
    gradient (``T in out`` flops), whichever takes fewer; bias ``||sum_t g_it||^2``; an
    embedding's ``sum_r ||sum_{t: row r} g_it||^2`` over the rows looked up; a normalisation
    layer's weight ``||sum_t g_it * xhat_it||^2`` and bias ``||sum_t g_it||^2``. A layer called
    several times adds up its calls (positions of all calls together). On CPU, after the first
    batch, a strided convolution's input gradient is the adjoint of its patch gather (one matrix
    product and one ``index_add_``, about half of oneDNN's time there). On the first batch the
    parameters' batch gradient is checked against these terms summed over the batch (on a fixed
    probe vector for matrix weights), so a parameter also used outside its layer falls back to the
    general path. Any other model (train mode, other layers, shared parameters): ``torch.func``
    (``vmap`` of ``grad`` over the batch, one norm per parameter tensor, never a concatenated
    gradient). Both paths work in chunks of samples holding at most ``max_memory`` bytes of
    per-sample tensors. Buffers are read, not updated; BatchNorm in train mode (batch statistics)
    is refused: call ``model.eval()`` first. Autocast is off inside (scores in the model's dtype);
    the norms of a half or bfloat16 model are summed in float32."""
    check_int("max_memory", max_memory, low=1)
    classes = loss is None  # the default cross-entropy takes class targets
    loss = loss or F.cross_entropy
    for name, module in model.named_modules():
        if isinstance(module, (*_BATCH_NORMS, nn.SyncBatchNorm)) and module.training:
            raise ValueError(
                f"grand_scores: the BatchNorm layer {name or type(module).__name__!r} is in train mode, where a "
                "sample's gradient depends on the batch statistics; call model.eval() first"
            )
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("grand_scores needs a model with parameters that require grad")
    layers = _closed_form_layers(model)
    ghost = _GhostNorms(model, layers, loss, max_memory, classes) if layers is not None else None
    general = None
    scores = []
    with _no_autocast(model):
        try:
            for x, y in _batches(loader):
                got = ghost(x, y) if ghost is not None else None  # it checks the targets against the logits
                if got is None:
                    if ghost is not None:  # the general path for the rest of the loader
                        ghost.remove()
                        ghost = None
                    if classes and y.dim() == 1:  # other shapes: the logits check names them
                        _check_classes(y, None)
                    general = general or _per_sample_norms(model, trainable, loss, max_memory)
                    got = general(x, y)
                scores.append(got)
        finally:
            if ghost is not None:
                ghost.remove()
    return torch.cat(scores) if scores else torch.zeros(0, dtype=torch.float64)


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_MATRICES = (nn.Linear, *_CONVS, nn.Embedding)  # layers whose weight the first-batch check probes


def _has_closed_form(module: nn.Module) -> bool:
    cls = type(module)
    for base in (nn.Linear, *_CONVS, nn.LayerNorm, nn.GroupNorm):
        if isinstance(module, base):
            return cls.forward is base.forward
    if isinstance(module, nn.Embedding):
        return cls.forward is nn.Embedding.forward and module.max_norm is None and not module.scale_grad_by_freq
    if isinstance(module, _BATCH_NORMS):
        return cls.forward is nn.BatchNorm1d.forward and module.running_mean is not None  # the shared forward
    return False


def _closed_form_layers(model: nn.Module) -> list[nn.Module] | None:
    """The layers holding every trainable parameter, or None where the closed form does not apply:
    a module in train mode, a trainable parameter elsewhere or shared, a layer without a closed
    form (see ``_has_closed_form``), a subclass with its own forward."""
    if any(m.training for m in model.modules()):
        return None
    layers = []
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if not own:
            continue
        if not _has_closed_form(module):
            return None
        layers.append(module)
    counted = [p for _, p in model.named_parameters(remove_duplicate=False) if p.requires_grad]
    return layers if len({id(p) for p in counted}) == len(counted) else None


def _trainable(module: nn.Module) -> list[Tensor]:
    """A closed-form layer's trainable parameters, weight first."""
    return [p for p in (module.weight, getattr(module, "bias", None)) if p is not None and p.requires_grad]


def _batched(module: nn.Module, x: Tensor, batch: int) -> bool:
    """Whether a layer's input has the batch first and the rank its closed form handles."""
    if x.dim() == 0 or x.shape[0] != batch:
        return False
    if isinstance(module, _CONVS):
        return x.dim() == 2 + len(module.kernel_size)
    if isinstance(module, nn.BatchNorm1d):
        return x.dim() in (2, 3)
    if isinstance(module, _BATCH_NORMS):
        return x.dim() == (4 if isinstance(module, nn.BatchNorm2d) else 5)
    if isinstance(module, nn.LayerNorm):
        return x.dim() > len(module.normalized_shape)
    return x.dim() >= (1 if isinstance(module, nn.Embedding) else 2)


def _patch_index(
    spatial: tuple[int, ...],
    kernel: tuple[int, ...],
    stride: tuple[int, ...],
    dilation: tuple[int, ...],
    padding: str | tuple[int, ...],
    mode: str,
    device: torch.device,
) -> Tensor:
    """For every output position of a convolution and every kernel offset (both row-major), the flat
    input position it reads, padding mapped back into the input (``reflect``, ``replicate``,
    ``circular``) or to the extra zero position ``prod(spatial)`` (``zeros``)."""
    index = torch.zeros((), dtype=torch.long)
    outside = torch.zeros((), dtype=torch.bool)
    n = len(spatial)
    for d, (size, k, s, dil) in enumerate(zip(spatial, kernel, stride, dilation)):
        if isinstance(padding, str):
            total = dil * (k - 1) if padding == "same" else 0
            left = total // 2  # an odd total: the extra zero on the right
        else:
            total, left = 2 * padding[d], padding[d]
        positions = (size + total - dil * (k - 1) - 1) // s + 1
        c = (torch.arange(positions) * s - left).unsqueeze(1) + torch.arange(k) * dil  # [positions, k]
        if mode == "zeros":
            outside = outside | ((c < 0) | (c >= size)).view(_axes(n, d, positions, k))
        elif mode == "reflect":
            c = c.abs()
            c = torch.where(c >= size, 2 * (size - 1) - c, c)
        elif mode == "replicate":
            c = c.clamp(0, size - 1)
        else:  # circular
            c = c % size
        index = index * size + c.clamp(0, size - 1).view(_axes(n, d, positions, k))
    return index.masked_fill(outside, math.prod(spatial)).flatten().to(device)


def _axes(n: int, d: int, positions: int, k: int) -> list[int]:
    """The view putting dimension ``d``'s positions and kernel offsets on axes ``d`` and ``n + d``."""
    shape = [1] * (2 * n)
    shape[d], shape[n + d] = positions, k
    return shape


def _patches(module: nn.Module, x: Tensor) -> Tensor:
    """The input rows ``a_t`` of a linear layer or the input patches of a convolution, per group:
    ``[batch, groups, positions, in]``, a patch ordered (kernel offset, channel). The input goes
    channels-last beside one zero position, and one gather of contiguous channel runs reads the
    patches (padding is a map to the zero position or back into the input)."""
    if isinstance(module, nn.Linear):
        return x.reshape(x.shape[0], 1, -1, x.shape[-1])
    (b, c), spatial, groups = x.shape[:2], tuple(x.shape[2:]), module.groups
    index = _patch_index_of(module, spatial, x.device)
    flat = x.new_empty(b, math.prod(spatial) + 1, c)
    flat[:, :-1] = x.flatten(2).mT
    flat[:, -1] = 0
    kernel = math.prod(module.kernel_size)
    a = flat.index_select(1, index).view(b, -1, kernel, groups, c // groups)  # [batch, positions, kernel, ...]
    if groups == 1:
        return a.view(b, 1, -1, kernel * c)
    return a.movedim(3, 1).reshape(b, groups, -1, kernel * (c // groups))


_cached_patch_index = functools.lru_cache(maxsize=64)(_patch_index)


def _patch_index_of(conv: nn.Module, spatial: tuple[int, ...], device: torch.device) -> Tensor:
    """``_patch_index`` of a convolution on inputs of size ``spatial``, built once per layout."""
    padding = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
    return _cached_patch_index(
        spatial, conv.kernel_size, conv.stride, conv.dilation, padding, conv.padding_mode, device
    )


def _wide(t: Tensor) -> Tensor:
    """Half and bfloat16 tensors in float32 (the per-sample norms' sums), others as they are."""
    return t.float() if t.is_floating_point() and t.element_size() < 4 else t


def _probed(module: nn.Module, p: Tensor, g: Tensor) -> Tensor:
    """What the first-batch check compares of a parameter's gradient ``g``: a matrix weight times a
    fixed vector over its input, any other parameter flat."""
    if p is not module.weight or not isinstance(module, _MATRICES):
        return g.flatten()
    return g.flatten(1) @ _probe(module)


def _probe(module: nn.Module, patches: bool = False) -> Tensor:
    """A fixed vector over a matrix weight's input (``weight.flatten(1)``'s columns), for a
    convolution ordered like ``_patches`` when ``patches``."""
    w = module.weight
    dtype = torch.promote_types(w.dtype, torch.float32)
    probe = torch.linspace(-1, 1, w[0].numel(), dtype=dtype, device=w.device).cos()
    return probe.view(w.shape[1:]).movedim(0, -1).flatten() if patches and isinstance(module, _CONVS) else probe


def _gathered_input_gradient(module: nn.Module, x: Tensor) -> bool:
    """Whether a layer's input gradient comes from ``_InputGradient``: a strided convolution on CPU
    whose input needs a gradient (there oneDNN's input gradient of a strided convolution takes 2-3x
    its forward, and the adjoint of the patch gather, one matrix product and one ``index_add_``,
    about its forward)."""
    return isinstance(module, _CONVS) and x.requires_grad and x.device.type == "cpu" and max(module.stride) > 1


class _InputGradient(torch.autograd.Function):
    """A convolution's output whose backward gives the input's gradient only, as the adjoint of
    ``_patches``: the patch gradients ``g_t W`` added into the input positions they were read from.
    No weight or bias gradient (the per-sample norms come from the layers' output gradients)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, out: Tensor, module: nn.Module) -> Tensor:
        ctx.module, ctx.shape = module, x.shape
        return out.view_as(out)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        m, shape = ctx.module, ctx.shape
        (b, c), spatial, groups = shape[:2], tuple(shape[2:]), m.groups
        kernel = math.prod(m.kernel_size)
        # weight [out, in/groups, *kernel] -> [groups, out/groups, kernel x in/groups], ordered like a patch
        w = m.weight.detach().unflatten(0, (groups, -1)).movedim(2, -1).reshape(groups, -1, kernel * (c // groups))
        # [groups, batch x positions, out]: one matrix product per group
        g = g.flatten(2).unflatten(1, (groups, -1)).permute(1, 0, 3, 2).flatten(1, 2)
        patch_grads = (g @ w).unflatten(1, (b, -1)).unflatten(-1, (kernel, c // groups))
        patch_grads = patch_grads.permute(1, 2, 3, 0, 4).reshape(b, -1, c)  # [batch, positions x kernel, in]
        index = _patch_index_of(m, spatial, g.device)
        dx = g.new_zeros(b, math.prod(spatial) + 1, c).index_add_(1, index, patch_grads)
        return dx[:, :-1].mT.reshape(shape).contiguous(), None, None


class _GhostNorms:
    """Per-sample gradient norms of a model whose trainable parameters are all in layers with a
    closed form, from one forward and one backward to the layers' outputs (no parameter gradient,
    no per-sample gradient of the whole model). A layer called several times adds up its calls.
    The first batch also takes the parameters' batch gradient and checks it against the per-sample
    terms summed over the batch: a parameter used outside its layer returns None (the caller falls
    back)."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], loss: Loss, max_memory: int, classes: bool) -> None:
        self.model, self.layers, self.loss, self.max_memory, self.classes = model, layers, loss, max_memory, classes
        self.checked = self.clone = False
        self.calls: list[list[tuple[Tensor, Tensor, int]]] = [[] for _ in layers]
        self.handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(layers)]

    def _hook(self, i: int) -> Callable[..., Tensor | None]:
        def keep(module: nn.Module, args: tuple[Any, ...], out: Tensor) -> Tensor | None:
            x = args[0]
            if self.checked and _gathered_input_gradient(module, x):
                out = _InputGradient.apply(x, out.detach(), module)
            self.calls[i].append((x.detach(), out, out._version))
            return out.clone() if self.clone else out  # a clone: an in-place op after the layer edits the clone

        return keep

    def remove(self) -> None:
        for h in self.handles:
            h.remove()

    def __call__(self, x: Tensor, y: Tensor) -> Tensor | None:
        with torch.enable_grad():
            logits = _logits(self.model, x, y)
            if self.classes:
                _check_classes(y, logits.shape[1])
            total = _summed_loss(self.loss, logits, y)
        calls, self.calls = self.calls, [[] for _ in self.layers]  # the graph goes with the last reference
        batch = y.shape[0]
        if any(not _batched(m, a, batch) for m, c in zip(self.layers, calls) for a, _, _ in c):
            return None
        if not self.clone and any(out._version != v for c in calls for _, out, v in c):
            self.clone = True  # a layer's output was edited in place: run again on clones of the outputs
            return self(x, y)
        outs = [out for c in calls for _, out, _ in c]
        params = [] if self.checked else [(m, p) for m in self.layers for p in _trainable(m)]
        grads = torch.autograd.grad(total, outs + [p for _, p in params], allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(outs, grads)] + list(grads[len(outs) :])
        squares: list[Tensor] = []
        want: list[Tensor] = []
        at, check = 0, bool(params)
        for m, c in zip(self.layers, calls):
            inputs, out_grads = [_wide(a) for a, _, _ in c], [_wide(g) for g in grads[at : at + len(c)]]
            at += len(c)
            weight = m.weight is not None and m.weight.requires_grad
            bias = getattr(m, "bias", None) is not None and m.bias.requires_grad
            if not c:  # not called: no gradient
                want += [_probed(m, p, torch.zeros_like(p)) for p in _trainable(m)] if check else []
                continue
            if isinstance(m, (nn.Linear, *_CONVS)):
                square, terms = self._outer(m, inputs, out_grads, weight, bias, check)
            elif isinstance(m, nn.Embedding):
                square, terms = _embedding(m, inputs, out_grads, check)
            else:
                square, terms = _normalisation(m, inputs, out_grads, weight, bias, check)
            squares.append(square)
            want += terms
        if check:
            got = [
                _probed(m, p, _wide(torch.zeros_like(p) if g is None else g))
                for (m, p), g in zip(params, grads[len(outs) :])
            ]
            got_all, want_all = torch.cat(got), torch.cat(want)
            rtol = max(1e-4, 8 * max(torch.finfo(p.dtype).eps for _, p in params))  # bfloat16: 0.06
            if not torch.allclose(got_all, want_all, rtol=rtol, atol=1e-2 * rtol * float(want_all.abs().max())):
                return None  # a parameter is also used outside its layer's forward
            self.checked = True
        if not squares:
            return torch.zeros(batch, dtype=torch.float64, device=logits.device)
        if len({t.dtype for t in squares}) > 1:
            return sum(t.double() for t in squares).sqrt()
        return torch.stack(squares).double().sum(0).sqrt()

    def _outer(
        self, m: nn.Module, inputs: list[Tensor], out_grads: list[Tensor], weight: bool, bias: bool, check: bool
    ) -> tuple[Tensor, list[Tensor]]:
        """Linear layers and convolutions, per sample and group: the weight's gradient
        ``sum_t g_t a_t^T`` and the bias's ``sum_t g_t``, in chunks of samples."""
        if len(inputs) == 1 and inputs[0].dim() == 2:  # one row per sample: ||g||^2 (||a||^2 + 1)
            a, g = inputs[0], out_grads[0]
            g2 = torch.linalg.vecdot(g, g)
            square = (g2 * torch.linalg.vecdot(a, a) + g2 if bias else g2 * torch.linalg.vecdot(a, a)) if weight else g2
            terms = [g.mT @ (a @ _probe(m))] if weight and check else []
            return square, terms + ([g.sum(0)] if bias and check else [])
        groups = getattr(m, "groups", 1)
        gs = [
            g.reshape(g.shape[0], 1, -1, g.shape[-1])
            if isinstance(m, nn.Linear)
            else g.flatten(2).unflatten(1, (groups, -1)).transpose(2, 3)
            for g in out_grads
        ]
        g = gs[0] if len(gs) == 1 else torch.cat(gs, 2)  # [batch, groups, positions, out]
        batch, _, positions, n_out = g.shape
        n_in = m.weight[0].numel()
        ghost = positions * (n_in + n_out) <= n_in * n_out  # fewer flops, and then less memory too
        per_sample = groups * (positions * n_in + (2 * positions**2 if ghost else n_in * n_out))
        chunk = max(1, self.max_memory // (per_sample * g.element_size()))
        probe = _probe(m, patches=True) if weight and check else None
        squares, probed = [], []
        for s in range(0, batch, chunk):
            gc = g[s : s + chunk]
            square = None
            if weight:
                parts = [_patches(m, a[s : s + chunk]) for a in inputs]
                a = parts[0] if len(parts) == 1 else torch.cat(parts, 2)
                if probe is not None:
                    probed.append(((a @ probe).unsqueeze(-1) * gc).sum((0, 2)).flatten())
                if positions == 1:
                    g2 = torch.linalg.vecdot(gc, gc)
                    square = (g2 * (torch.linalg.vecdot(a, a) + 1) if bias else g2 * torch.linalg.vecdot(a, a)).sum(
                        (1, 2)
                    )
                    squares.append(square)
                    continue
                if ghost:
                    square = torch.linalg.vecdot((gc @ gc.mT).flatten(1), (a @ a.mT).flatten(1))
                else:
                    w = gc.mT @ a
                    square = torch.linalg.vecdot(w.flatten(1), w.flatten(1))
            if bias:
                b = gc.sum(2).flatten(1)
                square = torch.linalg.vecdot(b, b) if square is None else square + torch.linalg.vecdot(b, b)
            squares.append(square)
        terms = [sum(probed)] if probe is not None else []
        if bias and check:
            terms.append(g.sum((0, 2)).flatten())
        return (squares[0] if len(squares) == 1 else torch.cat(squares)), terms


def _embedding(
    m: nn.Embedding, inputs: list[Tensor], out_grads: list[Tensor], check: bool
) -> tuple[Tensor, list[Tensor]]:
    """An embedding's per-sample gradient: the output gradients added up per row looked up (the
    padding row has none), one row sum per (sample, row) pair."""
    batch, dim, rows = inputs[0].shape[0], m.embedding_dim, m.num_embeddings
    index = torch.cat([i.reshape(batch, -1) for i in inputs], 1)
    g = torch.cat([g.reshape(batch, -1, dim) for g in out_grads], 1)
    if m.padding_idx is not None:
        g = g * (index != m.padding_idx).unsqueeze(-1)
    keys = index + rows * torch.arange(batch, device=index.device).unsqueeze(1)
    unique, inverse = torch.unique(keys.flatten(), return_inverse=True)
    sums = g.new_zeros(len(unique), dim).index_add_(0, inverse, g.reshape(-1, dim))
    square = g.new_zeros(batch).index_add_(0, unique // rows, torch.linalg.vecdot(sums, sums))
    if not check:
        return square, []
    return square, [g.new_zeros(rows).index_add_(0, index.flatten(), g.reshape(-1, dim) @ _probe(m))]


def _normalisation(
    m: nn.Module, inputs: list[Tensor], out_grads: list[Tensor], weight: bool, bias: bool, check: bool
) -> tuple[Tensor, list[Tensor]]:
    """BatchNorm with running statistics, LayerNorm, GroupNorm: per sample, the affine weight's
    gradient ``sum_t g_t xhat_t`` and the bias's ``sum_t g_t`` over the positions sharing a
    parameter (``xhat`` the normalised input)."""
    w_sum = b_sum = None
    for x, g in zip(inputs, out_grads):
        batch = x.shape[0]
        if isinstance(m, nn.LayerNorm):
            features = math.prod(m.normalized_shape)
            w_t = (
                (g * F.layer_norm(x, m.normalized_shape, eps=m.eps)).reshape(batch, -1, features).sum(1)
                if weight
                else None
            )
            b_t = g.reshape(batch, -1, features).sum(1) if bias else None
        else:
            g = g.reshape(batch, x.shape[1], -1)  # [batch, channels, positions]
            if not weight:
                w_t = None
            elif isinstance(m, nn.GroupNorm):
                w_t = torch.linalg.vecdot(g, F.group_norm(x, m.num_groups, eps=m.eps).reshape(g.shape))
            else:
                centred = x.reshape(g.shape) - m.running_mean.unsqueeze(-1)
                w_t = torch.linalg.vecdot(g, centred) * torch.rsqrt(m.running_var + m.eps)
            b_t = g.sum(2) if bias else None
        w_sum = w_t if w_sum is None else w_sum + w_t
        b_sum = b_t if b_sum is None else b_sum + b_t
    parts = [t for t in (w_sum, b_sum) if t is not None]
    square = sum(torch.linalg.vecdot(t, t) for t in parts)
    return square, [t.sum(0) for t in parts] if check else []


def _summed_loss(loss: Loss, logits: Tensor, y: Tensor) -> Tensor:
    """The sum over the batch of ``loss`` on each sample as a batch of one."""
    if loss is F.cross_entropy:
        return F.cross_entropy(logits, y, reduction="sum")
    from torch.func import vmap

    try:
        return vmap(lambda z, t: loss(z.unsqueeze(0), t.unsqueeze(0)))(logits, y).sum()
    except RuntimeError:  # a loss vmap cannot batch (data-dependent control flow)
        return sum(loss(logits[i : i + 1], y[i : i + 1]) for i in range(len(y)))


def _per_sample_norms(
    model: nn.Module, trainable: list[tuple[str, Tensor]], loss: Loss, max_memory: int
) -> Callable[[Tensor, Tensor], Tensor]:
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in trainable}
    frozen = {n: p.detach() for n, p in model.named_parameters() if not p.requires_grad}
    buffers = {n: b.detach() for n, b in model.named_buffers()}
    size = sum(p.numel() * p.element_size() for p in params.values())
    chunk = max(1, max_memory // size)

    def one(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, (p, frozen, buffers), (x.unsqueeze(0),))
        _check_logits(out, y.unsqueeze(0))
        return loss(out, y.unsqueeze(0))

    per_sample = vmap(grad(one), in_dims=(None, 0, 0), randomness="different")

    def norms(x: Tensor, y: Tensor) -> Tensor:
        out = []
        for start in range(0, y.shape[0], chunk):  # per-sample gradients of `chunk` samples at a time
            grads = per_sample(params, x[start : start + chunk], y[start : start + chunk]).values()
            out.append(sum(torch.linalg.vector_norm(g.reshape(len(g), -1), dim=1).double().square() for g in grads))
        return torch.cat(out).sqrt()

    return norms


def forgetting_events(previous: Tensor, correct: Tensor) -> Tensor:
    """Forgetting events of one presentation: ``previous`` holds each sample's correctness at its
    last presentation (1 correct, 0 wrong, -1 never presented), ``correct`` the correctness now
    (bool). An event is a sample correct before and wrong now (Toneva et al.'s definition).

    Example:
        >>> import torch
        >>> forgetting_events(torch.tensor([1, 1, 0, -1]), torch.tensor([False, True, False, False]))
        tensor([ True, False, False, False])
    """
    return (previous == 1) & ~correct.bool()


def forgetting_scores(counts: Tensor, learned: Tensor) -> Tensor:
    """Scores from forgetting counts: the number of events of each sample, ``inf`` for samples
    never classified correctly (Toneva et al. count them as forgotten infinitely often).

    Example:
        >>> import torch
        >>> forgetting_scores(torch.tensor([0, 2, 0]), torch.tensor([True, True, False]))
        tensor([0., 2., inf], dtype=torch.float64)
    """
    scores = counts.double().clone()
    scores[~learned.bool()] = float("inf")
    return scores
