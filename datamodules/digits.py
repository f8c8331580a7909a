"""scikit-learn's bundled 8x8 handwritten digits: the embedded default dataset (no download).

Example:
    >>> dm = Digits(batch_size=32)
    >>> dm.setup()
    >>> x, y = next(iter(dm.train_dataloader()))
    >>> x.shape, float(x.min()) >= 0.0, float(x.max()) <= 1.0
    (torch.Size([32, 1, 8, 8]), True, True)
"""

from __future__ import annotations

import torch

from ..validation import check_fraction
from .base import TensorDataModule


class Digits(TensorDataModule):
    """1,797 8x8 grey-level digits (10 classes) as ``1x8x8`` tensors in [0, 1].

    A fixed seeded split: ``test_fraction`` of the images for test, then ``val_fraction`` of the
    rest for validation. ``label_noise`` flips that fraction of *training* labels to another class
    (validation and test stay clean), for robustness experiments.

    Args:
        batch_size: samples per batch.
        val_fraction: fraction of the non-test images held out for validation.
        test_fraction: fraction of all images held out for test.
        label_noise: fraction of training labels flipped, in [0, 1).
        seed: seed of the split, the label noise and the shuffling.
        num_workers: DataLoader workers.
    """

    num_classes = 10
    input_shape = (1, 8, 8)
    mean = (0.0,)
    std = (1.0,)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        label_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, label_noise, seed, num_workers)
        check_fraction("test_fraction", test_fraction, low_open=True)
        self.test_fraction = test_fraction

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        from sklearn.datasets import load_digits

        data = load_digits()
        x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1)
        y = torch.tensor(data.target, dtype=torch.long)
        # The split seed is fixed (not `seed`) so every run and every label-noise level is scored
        # on the same test images.
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1234))
        n_test = int(round(self.test_fraction * len(y)))
        test_idx, train_idx = perm[:n_test], perm[n_test:]
        return x[train_idx], y[train_idx], x[test_idx], y[test_idx], 1.0 / 16.0
