"""Causal language modelling: a small decoder-only transformer, per-sequence log-likelihoods, and
a LightningModule that trains any causal LM (litplug's or a Hugging Face ``*ForCausalLM``) by
next-token prediction.

Example:
    >>> import torch
    >>> net = CausalTransformer(vocab_size=16, max_len=32, dim=32, depth=2, heads=2)
    >>> tokens = torch.randint(0, 16, (4, 32))
    >>> logits = net(tokens)
    >>> logits.shape
    torch.Size([4, 32, 16])
    >>> logp, count = sequence_log_likelihood(logits, tokens)
    >>> logp.shape, count.tolist()
    (torch.Size([4]), [31, 31, 31, 31])
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from typing_extensions import override

from ..validation import check_fraction, check_int
from .base import TrainingModule


def logits_of(output: Any) -> torch.Tensor:
    """The logits of a model's output: the tensor itself, or its ``logits`` (Hugging Face
    ``ModelOutput``)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if logits is None and isinstance(output, Mapping):
        logits = output.get("logits")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(
            f"the backbone returned {type(output).__name__}: expected a tensor of logits or an output with `logits`"
        )
    return logits


def tokens_of(batch: Any) -> torch.Tensor:
    """The token ids of a language-model batch: a ``[B, T]`` tensor, the first element of a
    tuple/list, or the ``input_ids`` of a mapping (Hugging Face style)."""
    if isinstance(batch, Mapping):
        batch = batch["input_ids"]
    elif isinstance(batch, Sequence) and not isinstance(batch, torch.Tensor):
        batch = batch[0]
    if not isinstance(batch, torch.Tensor) or batch.dim() != 2 or batch.is_floating_point():
        raise TypeError(
            f"a language-model batch must hold integer token ids of shape [batch, length], got {batch!r:.80}"
        )
    return batch


def labels_of(batch: Any) -> torch.Tensor | None:
    """The ``labels`` of a mapping batch (Hugging Face style: aligned with ``input_ids``, -100 where
    a token is not scored), else None (every token after the first is scored)."""
    return batch.get("labels") if isinstance(batch, Mapping) else None


def sequence_log_likelihood(
    logits: torch.Tensor, tokens: torch.Tensor, labels: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence log-likelihood of ``tokens`` ([B, T]) under next-token ``logits`` ([B, T, V],
    position t predicts token t + 1): ``(sum_t log p(x_{t+1} | x_{<=t}), T - 1)`` for each of the
    B sequences. The first token is given, not predicted. With ``labels`` ([B, T], -100 = not
    scored) only the scored positions count: ``(sum over scored t, number scored)``. Computed in
    float32 at least (half precision logits are upcast, float64 ones kept)."""
    logits = logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32))
    if labels is None:
        logp = -F.cross_entropy(logits.transpose(1, 2), tokens[:, 1:], reduction="none")  # [B, T-1]
        count = torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device, dtype=torch.long)
        return logp.sum(1), count
    target = labels[:, 1:]
    logp = -F.cross_entropy(logits.transpose(1, 2), target, ignore_index=-100, reduction="none")
    return logp.sum(1), (target != -100).sum(1)


class CausalTransformer(nn.Module):
    """A decoder-only (GPT-style) transformer language model from ``torch.nn`` layers.

    Token and learned position embeddings, ``depth`` pre-norm blocks of causal self-attention
    (``nn.TransformerEncoderLayer`` under a causal mask: position t attends to positions <= t
    only) and a GELU MLP, a final LayerNorm and a linear head to ``vocab_size`` logits. Randomly
    initialised (normal, std 0.02, as GPT-2); no dropout by default.

    Args:
        vocab_size: number of token ids (>= 2).
        max_len: longest sequence (>= 2).
        dim: embedding width (divisible by ``heads``).
        depth: number of blocks (>= 1).
        heads: attention heads per block (>= 1).
        mlp_ratio: MLP hidden width / ``dim`` (>= 1).
        dropout: dropout probability in the blocks.

    Example:
        >>> net = CausalTransformer(vocab_size=8, max_len=16, dim=16, depth=1, heads=2)
        >>> net(torch.zeros(2, 5, dtype=torch.long)).shape
        torch.Size([2, 5, 8])
    """

    def __init__(
        self,
        vocab_size: int = 16,
        max_len: int = 24,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("vocab_size", vocab_size, 2),
            ("max_len", max_len, 2),
            ("dim", dim, 1),
            ("depth", depth, 1),
            ("heads", heads, 1),
            ("mlp_ratio", mlp_ratio, 1),
        ):
            check_int(name, value, low=low)
        if dim % heads:
            raise ValueError(f"`dim` must be divisible by `heads`={heads}, got {dim}")
        check_fraction("dropout", dropout)
        self.vocab_size, self.max_len = vocab_size, max_len
        self.embed = nn.Embedding(vocab_size, dim)
        self.position = nn.Embedding(max_len, dim)
        layer = nn.TransformerEncoderLayer(
            dim, heads, mlp_ratio * dim, dropout, activation="gelu", batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence length {length} exceeds `max_len`={self.max_len}")
        positions = torch.arange(length, device=tokens.device)
        h = self.embed(tokens) + self.position(positions)
        mask = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device, dtype=h.dtype)
        h = self.blocks(h, mask=mask, is_causal=True)
        return self.head(self.norm(h))


class LanguageModel(TrainingModule):
    """Train a causal language model by next-token prediction (the mean token-level NLL).

    The backbone maps token ids ``[B, T]`` to logits ``[B, T, V]`` (a tensor, or an output with
    ``logits`` as Hugging Face models return). Batches are token ids: a ``[B, T]`` tensor, a
    tuple whose first element it is, or a mapping with ``input_ids``. Logs ``train/loss``,
    ``val/loss`` and ``test/loss`` (per-token NLL in nats, averaged over batches).

    Args:
        backbone: the causal LM (e.g. ``CausalTransformer``, ``transformers.GPT2LMHeadModel``).
        optimizer: optimizer callable (default Adam, lr 1e-3).
        lr_scheduler: optional scheduler callable.

    Example:
        >>> from litplug.datamodules import MarkovText
        >>> model = LanguageModel(CausalTransformer(vocab_size=16, max_len=24))
        >>> Trainer(max_epochs=1).fit(model, MarkovText())  # doctest: +SKIP
    """

    def __init__(
        self,
        backbone: nn.Module,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__(backbone, optimizer, lr_scheduler)

    @override
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return logits_of(self.backbone(tokens))

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """Mean token-level NLL of the batch's scored tokens (every scored token weighs the same; a
        mapping batch with ``labels`` scores only the positions not marked -100)."""
        tokens = tokens_of(batch)
        logp, count = sequence_log_likelihood(self(tokens), tokens, labels_of(batch))
        return -logp.sum() / count.sum()

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.batch_loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: Any, stage: str) -> None:
        self.log(f"{stage}/loss", self.batch_loss(batch), sync_dist=True, prog_bar=stage == "val")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._evaluate(batch, "test")
