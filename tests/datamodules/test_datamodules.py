"""Digits, synthetic data, and MNIST/CIFAR-10 read from tiny files in torchvision's on-disk format."""

import pickle

import numpy as np
import pytest
import torch
from harness import write_idx
from torchdata.stateful_dataloader import StatefulDataLoader

from litplug.datamodules import CIFAR10, MNIST, Digits, SyntheticClassification
from litplug.datamodules.base import EpochShuffle


def _all(loader):
    xs, ys = zip(*loader)
    return torch.cat(xs), torch.cat(ys)


def test_digits_split_is_fixed_and_in_unit_range():
    dm = Digits(batch_size=500)
    dm.setup()
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val + n_test == 1797
    assert n_test == round(0.2 * 1797)
    x, y = _all(dm.test_dataloader())
    assert x.shape[1:] == (1, 8, 8) and x.min() >= 0 and x.max() <= 1
    other = Digits(batch_size=500, seed=7)  # another seed shuffles differently but tests on the same images
    other.setup()
    x2, _ = _all(other.test_dataloader())
    assert torch.equal(x, x2)
    assert (dm.num_classes, dm.input_shape, dm.mean, dm.std, dm.pixel_range) == (
        10,
        (1, 8, 8),
        (0.0,),
        (1.0,),
        (0.0, 1.0),
    )


def test_digits_label_noise_flips_exactly_that_fraction_of_training_labels():
    clean, noisy = Digits(), Digits(label_noise=0.4)
    clean.setup(), noisy.setup()
    flipped = (clean.train_set.y != noisy.train_set.y).float().mean().item()
    assert flipped == pytest.approx(0.4, abs=1 / len(clean.train_set.y))
    assert torch.equal(clean.val_set.y, noisy.val_set.y) and torch.equal(clean.test_set.y, noisy.test_set.y)


def test_training_order_depends_only_on_seed_and_epoch():
    dm = Digits()
    dm.setup()
    sampler = dm.train_dataloader().sampler
    sampler.set_epoch(3)
    first = list(sampler)
    sampler.set_epoch(0)
    assert list(sampler) != first
    fresh = Digits().train_dataloader().sampler
    fresh.set_epoch(3)
    assert list(fresh) == first


def _ranks(sampler_of, world):
    """The samplers of ``world`` ranks (the process group's layout, set by hand)."""
    samplers = []
    for rank in range(world):
        sampler = sampler_of()
        sampler.num_replicas, sampler.rank = world, rank
        sampler.num_samples = -(-len(sampler.items) // world)
        sampler.total_size = sampler.num_samples * world
        samplers.append(sampler)
    return samplers


def test_epoch_shuffle_splits_the_global_order_across_ranks():
    one = EpochShuffle(10, seed=3)
    one.set_epoch(2)
    order = list(one)
    r0, r1 = _ranks(lambda: EpochShuffle(10, seed=3), 2)
    for r in (r0, r1):
        r.set_epoch(2)
    # batch 2 per rank = batch 4 on one process, batch after batch
    assert list(r0) == order[0::2] and list(r1) == order[1::2] and len(r0) == 5
    odd = _ranks(lambda: EpochShuffle(5, seed=3), 2)
    assert [len(list(r)) for r in odd] == [3, 3]  # padded with the order's head, as DistributedSampler


def test_epoch_shuffle_resumes_in_the_same_epoch_only():
    sampler = EpochShuffle(10, seed=0)
    sampler.set_epoch(1)
    it = iter(sampler)
    served = [next(it) for _ in range(4)]
    state = sampler.state_dict()
    assert state == {"epoch": 1, "samples": 4}
    rest = list(it)

    resumed = EpochShuffle(10, seed=0)
    resumed.load_state_dict(state)
    it = iter(resumed)
    resumed.set_epoch(1)  # Lightning sets the epoch after building the iterator, before the first batch
    assert served + list(it) == served + rest
    assert resumed.state_dict() == {"epoch": 1, "samples": 10}

    next_epoch = EpochShuffle(10, seed=0)
    next_epoch.load_state_dict(state)  # an epoch-end checkpoint of epoch 1 (a limited epoch)
    it = iter(next_epoch)
    next_epoch.set_epoch(2)
    fresh = EpochShuffle(10, seed=0)
    fresh.set_epoch(2)
    assert list(it) == list(fresh)

    r0, r1 = _ranks(lambda: EpochShuffle(10, seed=0), 2)
    r0.load_state_dict({"epoch": 0, "samples": 4})  # 4 samples of all ranks: 2 of each
    r0.set_epoch(0)
    assert list(r0) == list(_ranks(lambda: EpochShuffle(10, seed=0), 2)[0])[2:]


@pytest.mark.parametrize(("args", "error", "name"), [((0, 1), ValueError, "items"), ((3, 1.5), TypeError, "seed")])
def test_epoch_shuffle_bad_arguments(args, error, name):
    with pytest.raises(error, match=f"`{name}`"):
        EpochShuffle(*args)


def test_training_loaders_are_stateful():
    loader = Digits(batch_size=4).train_dataloader()
    assert isinstance(loader, StatefulDataLoader) and isinstance(loader.sampler, EpochShuffle)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    rest = [next(it)[1] for _ in range(2)]
    again = Digits(batch_size=4).train_dataloader()
    again.load_state_dict(state)
    it = iter(again)
    assert all(torch.equal(next(it)[1], y) for y in rest)


def test_a_loader_without_state_warns_at_a_mid_epoch_resume(tmp_path):
    """Lightning's own warning, the README's rule for datamodules without a resumable loader."""
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.demos.boring_classes import BoringModel
    from lightning.pytorch.utilities.warnings import PossibleUserWarning

    def trainer(**kwargs):
        return Trainer(
            default_root_dir=tmp_path, accelerator="cpu", limit_train_batches=4, limit_val_batches=0, logger=False,
            enable_progress_bar=False, enable_model_summary=False, **kwargs,
        )  # fmt: skip

    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)
    trainer(max_steps=6, callbacks=[ckpt]).fit(BoringModel())
    with pytest.warns(PossibleUserWarning, match="not resumable"):
        trainer(max_epochs=2).fit(BoringModel(), ckpt_path=str(tmp_path / "ckpt/epoch=1-step=6.ckpt"))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"label_noise": 1.0}, "label_noise"),
        ({"batch_size": 0}, "batch_size"),
        ({"val_fraction": 0.0}, "val_fraction"),
        ({"test_fraction": 1.5}, "test_fraction"),
    ],
)
def test_digits_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Digits(**kwargs)


def test_synthetic_is_seeded_and_shaped():
    a = SyntheticClassification(num_samples=200, input_shape=[1, 4, 4], num_classes=3, seed=1)
    b = SyntheticClassification(num_samples=200, input_shape=[1, 4, 4], num_classes=3, seed=1)
    a.setup(), b.setup()
    xa, ya = _all(a.test_dataloader())
    xb, yb = _all(b.test_dataloader())
    assert xa.shape[1:] == (1, 4, 4) and torch.equal(xa, xb) and torch.equal(ya, yb)
    assert set(ya.tolist()) <= {0, 1, 2}
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticClassification(num_classes=1)


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
    x, y = _all(dm.test_dataloader())
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
    x, y = _all(dm.test_dataloader())
    raw = torch.tensor(batches["test_batch"]["data"], dtype=torch.float32).view(4, 3, 32, 32) / 255
    mean, std = torch.tensor(dm.mean).view(3, 1, 1), torch.tensor(dm.std).view(3, 1, 1)
    torch.testing.assert_close(x, (raw - mean) / std)
    assert y.tolist() == batches["test_batch"]["labels"]


def test_missing_files_name_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="download=True"):
        MNIST(root=str(tmp_path)).setup()
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        CIFAR10(root=str(tmp_path)).setup()
