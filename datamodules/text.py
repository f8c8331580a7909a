"""A synthetic text corpus drawn from a seeded random Markov chain, with marked sequences that a
model sees many times (to be memorised, then unlearned). Embedded: nothing is downloaded.

Example:
    >>> dm = MarkovText(vocab_size=16, seq_len=24, batch_size=8)
    >>> dm.setup()
    >>> next(iter(dm.train_dataloader())).shape
    torch.Size([8, 24])
    >>> int(dm.train_set.targets.sum()) == dm.num_marked
    True
"""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler
from torchdata.stateful_dataloader import StatefulDataLoader

from ..validation import check_int, check_number
from .base import EpochShuffle


class TokenSequences(Dataset):
    """Token-id sequences ``[N, T]``; one item is a ``[T]`` long tensor. ``targets`` marks the
    sequences (1 marked, 0 not) for ``ForgetRetain(scenario="class", forget_classes=[1])``."""

    def __init__(self, tokens: torch.Tensor, targets: torch.Tensor) -> None:
        self.tokens, self.targets = tokens, targets

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.tokens[i]


class RepeatShuffle(EpochShuffle):
    """Every index once, plus ``repeats - 1`` more times each index of ``repeated``, shuffled as
    :class:`~litplug.datamodules.base.EpochShuffle` shuffles (per epoch, per rank, resumable)."""

    def __init__(self, n: int, repeated: torch.Tensor, repeats: int, seed: int) -> None:
        super().__init__(torch.cat([torch.arange(n), repeated.repeat(repeats - 1)]), seed)


def markov_chain(vocab_size: int, sharpness: float, generator: torch.Generator) -> torch.Tensor:
    """A random transition matrix ``[V, V]``: row ``v`` is ``softmax(sharpness * z_v)`` with
    ``z_v`` standard normal (larger ``sharpness``: fewer likely successors, a lower entropy rate)."""
    return (sharpness * torch.randn(vocab_size, vocab_size, generator=generator)).softmax(1)


def sample_sequences(transition: torch.Tensor, num: int, length: int, generator: torch.Generator) -> torch.Tensor:
    """``num`` sequences of ``length`` tokens: a uniform first token, then the chain."""
    tokens = torch.empty(num, length, dtype=torch.long)
    tokens[:, 0] = torch.randint(0, transition.shape[0], (num,), generator=generator)
    for t in range(1, length):
        tokens[:, t] = torch.multinomial(transition[tokens[:, t - 1]], 1, generator=generator).squeeze(1)
    return tokens


def entropy_rate(transition: torch.Tensor) -> float:
    """Entropy per token (nats) of the chain in its stationary distribution: the loss floor of a
    model that knows the chain but memorised nothing."""
    eigvals, eigvecs = torch.linalg.eig(transition.double().T)
    pi = eigvecs[:, eigvals.real.argmax()].real
    pi = pi / pi.sum()
    p = transition.double()
    return float(-(pi[:, None] * p * p.clamp_min(1e-300).log()).sum())


class MarkovText(LightningDataModule):
    """Token sequences of a seeded random Markov chain.

    Sequences of a seeded random Markov chain over ``vocab_size`` tokens, split into training,
    validation and test sets of ``num_train``, ``num_val`` and ``num_test`` sequences (all
    distinct draws of the same distribution).

    The first ``num_marked`` training sequences are *marked* (``train_set.targets == 1``); the
    training loader shows each of them ``marked_repeats`` times per epoch (each other sequence
    once), so a model memorises them well beyond the rest: the forget set of the language-model
    unlearning recipe, ``ForgetRetain(MarkovText(), "class", forget_classes=[1])``. Batches are
    ``[batch_size, seq_len]`` token ids.

    Args:
        vocab_size: number of tokens (>= 2).
        seq_len: tokens per sequence (>= 2).
        num_train, num_val, num_test: sequences per split (>= 1).
        num_marked: marked training sequences (in [1, num_train)).
        marked_repeats: times a marked sequence is seen per training epoch (>= 1).
        sharpness: scale of the transition logits (> 0; see ``markov_chain``).
        batch_size: sequences per batch.
        seed: seed of the chain, the sequences and the shuffling.
        num_workers: DataLoader workers.
    """

    num_classes = 2  # marked or not

    def __init__(
        self,
        vocab_size: int = 16,
        seq_len: int = 24,
        num_train: int = 256,
        num_val: int = 128,
        num_test: int = 128,
        num_marked: int = 32,
        marked_repeats: int = 8,
        sharpness: float = 2.0,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        for name, value, low in (
            ("vocab_size", vocab_size, 2), ("seq_len", seq_len, 2), ("num_train", num_train, 2),
            ("num_val", num_val, 1), ("num_test", num_test, 1), ("marked_repeats", marked_repeats, 1),
            ("batch_size", batch_size, 1), ("num_workers", num_workers, 0),
        ):  # fmt: skip
            check_int(name, value, low=low)
        check_int("num_marked", num_marked, low=1, high=num_train - 1)
        check_number("sharpness", sharpness, low=0, low_open=True)
        check_int("seed", seed)
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.num_marked, self.marked_repeats, self.sharpness = num_marked, marked_repeats, sharpness
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.transition: torch.Tensor | None = None
        self.train_set: TokenSequences | None = None
        self.val_set: TokenSequences | None = None
        self.test_set: TokenSequences | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        gen = torch.Generator().manual_seed(self.seed)
        self.transition = markov_chain(self.vocab_size, self.sharpness, gen)
        tokens = sample_sequences(self.transition, self.num_train + self.num_val + self.num_test, self.seq_len, gen)
        train, val, test = tokens.split([self.num_train, self.num_val, self.num_test])
        targets = (torch.arange(self.num_train) < self.num_marked).long()
        self.train_set = TokenSequences(train, targets)
        self.val_set = TokenSequences(val, torch.zeros(self.num_val, dtype=torch.long))
        self.test_set = TokenSequences(test, torch.zeros(self.num_test, dtype=torch.long))

    @property
    def entropy_rate(self) -> float:
        """Entropy per token (nats) of the chain: the held-out loss floor."""
        self.setup()
        return entropy_rate(self.transition)

    def _loader(self, dataset: Dataset, sampler: Sampler | None = None) -> DataLoader:
        # Training loaders are StatefulDataLoaders: Lightning saves their position in checkpoints.
        return (DataLoader if sampler is None else StatefulDataLoader)(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        self.setup()
        marked = self.train_set.targets.nonzero().flatten()
        return self._loader(self.train_set, RepeatShuffle(len(self.train_set), marked, self.marked_repeats, self.seed))

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.test_set)
