"""MNIST and CIFAR-10, read from torchvision's on-disk layout.

The files are parsed here (idx for MNIST; for CIFAR-10, pickled batches read by
:func:`litplug.loading.load_data_pickle`, which rebuilds only dicts, lists, strings, ints and numpy
arrays, so a crafted batch file runs no code) rather than through ``torchvision.datasets``
because reading must not depend on a torchvision build that matches the installed torch;
torchvision is used only for ``download=True`` and is not an extra of litplug: install the
torchvision built for your torch yourself (a plain ``pip install torchvision`` may replace torch).
A folder downloaded by torchvision works as is:

    root/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]
    root/cifar-10-batches-py/{data_batch_1..5,test_batch}

Example:
    >>> dm = MNIST(root="data", download=False)  # doctest: +SKIP
    >>> dm.mean, dm.std, dm.pixel_range  # doctest: +SKIP
    ((0.1307,), (0.3081,), (0.0, 1.0))
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from ..loading import load_data_pickle
from ..validation import check_bool, check_path
from .base import TensorDataModule


def _download(dataset: str, root: Path) -> None:
    try:
        import torchvision.datasets as tvd
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "`download=True` needs torchvision: install the build matching your torch (check with "
            f"`pip install --dry-run torchvision` that it keeps torch), or place the files under `root` ({err})"
        ) from err
    getattr(tvd, dataset)(str(root), train=True, download=True)
    getattr(tvd, dataset)(str(root), train=False, download=True)


def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (MNIST's format: magic, dims as big-endian int32, then uint8 data)."""
    candidates = [path, path.with_name(path.name + ".gz")]
    for candidate in candidates:
        if candidate.exists():
            opener = gzip.open if candidate.suffix == ".gz" else open
            with opener(candidate, "rb") as f:
                data = f.read()
            break
    else:
        raise FileNotFoundError(f"MNIST file not found: {path} (or .gz); pass `download=True` or fix `root`")
    magic = int.from_bytes(data[0:4], "big")
    if magic >> 8 != 0x08:  # 0x08 = unsigned byte
        raise ValueError(f"{path} is not an unsigned-byte idx file (magic {magic:#x})")
    ndim = magic & 0xFF
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class _FolderDataModule(TensorDataModule):
    """A dataset read from ``root`` in torchvision's layout; ``marker`` is a file it must hold."""

    marker: str

    def __init__(
        self,
        root: str = "data",
        download: bool = False,
        batch_size: int = 128,
        val_fraction: float = 0.1,
        label_noise: float = 0.0,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, val_fraction, label_noise, seed, num_workers)
        check_path("root", root)
        check_bool("download", download)
        self.root = Path(root)
        self.download = download

    def prepare_data(self) -> None:
        if self.download and not (self.root / self.marker).exists():
            _download(type(self).__name__, self.root)


class MNIST(_FolderDataModule):
    """MNIST (28x28 grey, 10 classes), normalised with the usual mean/std.

    Args:
        root: folder holding ``MNIST/raw`` (torchvision's layout).
        download: fetch the files with torchvision if missing.
        batch_size, val_fraction, label_noise, seed, num_workers: as in ``Digits``; validation
            is carved from the 60k training images (10%).
    """

    num_classes = 10
    input_shape = (1, 28, 28)
    mean = (0.1307,)
    std = (0.3081,)

    marker = "MNIST/raw/t10k-labels-idx1-ubyte"

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        raw = self.root / "MNIST" / "raw"
        arrays = [
            read_idx(raw / f"{split}-{kind}")
            for split in ("train", "t10k")
            for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
        ]
        x_tr, y_tr, x_te, y_te = (torch.from_numpy(a.copy()) for a in arrays)
        return x_tr.unsqueeze(1), y_tr.long(), x_te.unsqueeze(1), y_te.long(), 1.0 / 255.0


class CIFAR10(_FolderDataModule):
    """CIFAR-10 (3x32x32, 10 classes), normalised with the usual per-channel mean/std.

    Args:
        root: folder holding ``cifar-10-batches-py`` (torchvision's layout).
        download: fetch the files with torchvision if missing.
        batch_size, val_fraction, label_noise, seed, num_workers: as in ``Digits``.
    """

    num_classes = 10
    input_shape = (3, 32, 32)
    mean = (0.4914, 0.4822, 0.4465)
    std = (0.2470, 0.2435, 0.2616)

    marker = "cifar-10-batches-py/test_batch"

    def _read(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        folder = self.root / "cifar-10-batches-py"
        xs, ys = [], []
        for name in names:
            path = folder / name
            if not path.exists():
                raise FileNotFoundError(f"CIFAR-10 file not found: {path}; pass `download=True` or fix `root`")
            batch = load_data_pickle(path)  # dicts, lists, str/bytes, ints and numpy arrays only
            xs.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(batch["labels"], dtype=np.int64))
        return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))

    def load(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
        x_tr, y_tr = self._read([f"data_batch_{i}" for i in range(1, 6)])
        x_te, y_te = self._read(["test_batch"])
        return x_tr, y_tr, x_te, y_te, 1.0 / 255.0
