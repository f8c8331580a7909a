"""Seeded Gaussian-blob classification data for fast tests.

Example:
    >>> dm = SyntheticClassification(num_samples=256, input_shape=[8], num_classes=3)
    >>> dm.setup()
    >>> next(iter(dm.train_dataloader()))[0].shape
    torch.Size([64, 8])
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..validation import check_fraction, check_int, check_list, check_number, check_positive_int
from .base import TensorDataModule


class SyntheticClassification(TensorDataModule):
    """Gaussian blobs, one per class: a synthetic classification task.

    ``num_classes`` Gaussian blobs in ``prod(input_shape)`` dimensions, reshaped to
    ``input_shape``. Class centres are drawn with ``seed``; ``separation`` scales them against
    unit noise, so larger values give an easier problem.

    Args:
        num_samples: total samples (train + val + test).
        input_shape: shape of one sample, e.g. ``[16]`` or ``[1, 8, 8]``.
        num_classes: number of blobs (>= 2).
        separation: distance scale of the class centres.
        batch_size, val_fraction, test_fraction, label_noise, seed, num_workers: as in ``Digits``.
    """

    mean = (0.0,)
    std = (1.0,)
    pixel_range = (-math.inf, math.inf)

    def __init__(
        self,
        num_samples: int = 1024,
        input_shape: Sequence[int] = (16,),
        num_classes: int = 4,
        separation: float = 2.0,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        label_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, label_noise, seed, num_workers)
        check_int("num_classes", num_classes, low=2)
        check_int("num_samples", num_samples, low=4 * num_classes)  # at least 4 samples per class
        check_list("input_shape", input_shape, check_positive_int, nonempty=True)
        check_number("separation", separation, low=0)
        check_fraction("test_fraction", test_fraction, low_open=True)
        self.num_samples = num_samples
        self.input_shape = tuple(input_shape)
        self.num_classes = num_classes
        self.separation = separation
        self.test_fraction = test_fraction

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        gen = torch.Generator().manual_seed(self.seed)
        dim = math.prod(self.input_shape)
        centres = torch.randn(self.num_classes, dim, generator=gen) * self.separation
        y = torch.randint(0, self.num_classes, (self.num_samples,), generator=gen)
        x = (centres[y] + torch.randn(self.num_samples, dim, generator=gen)).view(-1, *self.input_shape)
        n_test = int(round(self.test_fraction * self.num_samples))
        return x[n_test:], y[n_test:], x[:n_test], y[:n_test], 1.0
