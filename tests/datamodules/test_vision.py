"""MNIST and CIFAR-10 (litplug.datamodules.vision) read from tiny files written in the real on-disk
formats; missing files name the path."""

import pickle

import numpy as np
import pytest
import torch
from harness import concatenated, write_idx

from litplug.datamodules import CIFAR10, MNIST


@pytest.mark.parametrize("compress", [False, True])
def test_mnist_reads_idx_files(tmp_path, compress):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = {"train": rng.integers(0, 256, (24, 28, 28)), "t10k": rng.integers(0, 256, (6, 28, 28))}
    labels = {"train": np.arange(24) % 10, "t10k": np.arange(6) % 10}
    for split in ("train", "t10k"):
        write_idx(raw / f"{split}-images-idx3-ubyte", images[split], compress)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels[split], compress)
    dm = MNIST(root=str(tmp_path), batch_size=6, val_fraction=0.25)
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (18, 6, 6)
    x, y = concatenated(dm.test_dataloader())
    expected = (torch.tensor(images["t10k"], dtype=torch.float32) / 255 - 0.1307) / 0.3081
    torch.testing.assert_close(x[:, 0], expected)
    assert y.tolist() == labels["t10k"].tolist()


def test_cifar10_reads_pickled_batches(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batches[name] = {
            "data": rng.integers(0, 256, (4, 3072)).astype(np.uint8),
            "labels": rng.integers(0, 10, 4).tolist(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(batches[name], f)
    dm = CIFAR10(root=str(tmp_path), batch_size=4, val_fraction=0.2)
    dm.setup()
    assert len(dm.train_set) + len(dm.val_set) == 20 and len(dm.test_set) == 4
    x, y = concatenated(dm.test_dataloader())
    raw = torch.tensor(batches["test_batch"]["data"], dtype=torch.float32).view(4, 3, 32, 32) / 255
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    assert y.tolist() == batches["test_batch"]["labels"]


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        MNIST(root=str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10(root=str(tmp_path)).setup()
