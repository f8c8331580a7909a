"""ForgetRetain: deterministic forget/retain splits, loaders, saved indices, bad input."""

import pytest
import torch
from harness import fast_trainer
from lightning.pytorch import LightningDataModule, LightningModule
from torch.utils.data import ConcatDataset, DataLoader, Dataset, TensorDataset

from litplug.callbacks import UnlearningMask
from litplug.datamodules import Digits, ForgetRetain


def _labels(subset):
    return torch.stack([subset.dataset.y[i] for i in subset.indices])


def test_class_split_and_loaders():
    dm = ForgetRetain(Digits(batch_size=32), scenario="class", forget_classes=[2, 5])
    dm.setup()
    n = len(dm.datamodule.train_set)
    assert sorted(dm.forget_indices.tolist() + dm.retain_indices.tolist()) == list(range(n))
    assert set(_labels(dm.forget_set).tolist()) == {2, 5}
    assert not set(_labels(dm.retain_set).tolist()) & {2, 5}
    batch, _, _ = next(iter(dm.train_dataloader()))  # CombinedLoader yields (batch, idx, loader idx)
    assert set(batch) == {"forget", "retain"} and len(batch["retain"][1]) == 32
    # max_size_cycle: one epoch is one pass over the (larger) retain set
    train = dm.train_dataloader()
    iter(train)
    assert len(train) == len(dm.retain_dataloader())
    for loaders in (dm.val_dataloader(), dm.test_dataloader()):
        assert list(loaders) == dm.eval_names == ["forget", "retain", "test", "forget_test"]
        test_y = torch.cat([y for _, y in loaders["test"]])
        forgotten_y = torch.cat([y for _, y in loaders["forget_test"]])
        assert not set(test_y.tolist()) & {2, 5} and set(forgotten_y.tolist()) == {2, 5}
    assert len(dm.test_dataloader()["test"].dataset) + len(dm.test_dataloader()["forget_test"].dataset) == len(
        dm.datamodule.test_set
    )


def test_random_split_is_seeded_and_saved():
    a = ForgetRetain(Digits(), scenario="random", forget_fraction=0.1, seed=3)
    b = ForgetRetain(Digits(), scenario="random", forget_fraction=0.1, seed=3)
    c = ForgetRetain(Digits(), scenario="random", forget_fraction=0.1, seed=4)
    for dm in (a, b, c):
        dm.setup()
    n = len(a.datamodule.train_set)
    assert len(a.forget_indices) == int(0.1 * n) and len(a.retain_indices) == n - int(0.1 * n)
    assert torch.equal(a.forget_indices, b.forget_indices)
    assert not torch.equal(a.forget_indices, c.forget_indices)
    assert a.eval_names == ["forget", "retain", "test"]
    restored = ForgetRetain(Digits(), scenario="random", forget_fraction=0.1, seed=99)
    restored.load_state_dict(a.state_dict())
    restored.setup()  # saved indices win over a re-split
    assert torch.equal(restored.forget_indices, a.forget_indices)


def test_fraction_leaving_an_empty_split():
    dm = ForgetRetain(Digits(), scenario="random", forget_fraction=1e-4)
    with pytest.raises(ValueError, match="forget_fraction.*empty split"):
        dm.setup()


class Pairs(Dataset):
    """A plain map-style dataset of (x, y) pairs, with no label attribute."""

    def __init__(self, n, offset=0):
        self.n, self.offset = n, offset

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        i = i + self.offset
        return torch.full((3,), float(i)), i % 4


class WithTargets(Pairs):
    def __init__(self, n, offset=0):
        super().__init__(n, offset)
        self.targets = [(i + offset) % 4 for i in range(n)]


def _ids(loader):
    return sorted(int(x[0]) for xs, _ in loader for x in xs)


def test_plain_dataset_random_and_class_with_label_fn_or_targets():
    data, held_out = Pairs(40), Pairs(12, offset=100)
    dm = ForgetRetain(data, scenario="random", forget_fraction=0.25, seed=1, held_out=held_out, batch_size=5)
    dm.setup()
    assert sorted(_ids(dm.forget_dataloader()) + _ids(dm.retain_dataloader())) == list(range(40))
    assert len(dm.forget_indices) == 10 and dm.eval_names == ["forget", "retain", "test"]
    assert _ids(dm.val_dataloader()["test"]) == _ids(dm.test_dataloader()["test"]) == list(range(100, 112))
    batch, _, _ = next(iter(dm.train_dataloader()))
    assert len(batch["forget"][0]) == len(batch["retain"][0]) == 5
    with pytest.raises(ValueError, match="no `targets` or `labels` attribute; pass `label_fn`.*scenario='random'"):
        ForgetRetain(data, scenario="class", forget_classes=[1]).setup()
    for dm in (
        ForgetRetain(data, scenario="class", forget_classes=[1], label_fn=lambda sample: sample[1], held_out=held_out),
        ForgetRetain(WithTargets(40), scenario="class", forget_classes=[1], held_out=WithTargets(12, offset=100)),
    ):
        dm.setup()
        assert _ids(dm.forget_dataloader()) == [i for i in range(40) if i % 4 == 1]
        assert _ids(dm.test_dataloader()["forget_test"]) == [i for i in range(100, 112) if i % 4 == 1]
        assert dm.eval_names == ["forget", "retain", "test", "forget_test"]
    no_held_out = ForgetRetain(data, scenario="random")
    assert list(no_held_out.val_dataloader()) == no_held_out.eval_names == ["forget", "retain"]


class ForeignDataModule(LightningDataModule):
    """A datamodule litplug did not write: its own collate function, a test split only."""

    def __init__(self):
        super().__init__()
        self.stages = []

    def setup(self, stage):
        self.stages.append(stage)
        self.train, self.test = WithTargets(32), WithTargets(8, offset=100)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=4, shuffle=True, collate_fn=self.collate)

    def test_dataloader(self):
        return DataLoader(self.test, batch_size=4, collate_fn=self.collate)

    @staticmethod
    def collate(samples):
        return {"x": torch.stack([x for x, _ in samples]), "y": torch.tensor([y for _, y in samples])}


def test_foreign_datamodule():
    dm = ForgetRetain(ForeignDataModule(), scenario="class", forget_classes=[0, 3])
    dm.setup()
    forget = next(iter(dm.forget_dataloader()))
    assert sorted(forget) == ["x", "y"] and len(forget["y"]) == 4 and set(forget["y"].tolist()) <= {0, 3}
    assert sorted(int(i) for b in dm.retain_dataloader() for i in b["x"][:, 0]) == [
        i for i in range(32) if i % 4 in (1, 2)
    ]
    assert dm.eval_names == ["forget", "retain"]  # no val_dataloader: no held-out validation data
    tests = dm.test_dataloader()
    assert list(tests) == dm.loader_names("test") == ["forget", "retain", "test", "forget_test"]
    assert sorted(int(i) for b in tests["forget_test"] for i in b["x"][:, 0]) == [100, 103, 104, 107]
    with pytest.raises(ValueError, match="forget_classes"):
        ForgetRetain(ForeignDataModule(), scenario="class", forget_classes=[-1])


def test_forget_retain_over_mnist_and_cifar10_files(tmp_path):
    # ForgetRetain wraps the file-backed datamodules as it wraps Digits; an Unlearner with a
    # saliency mask runs on the tiny real-format MNIST files end to end.
    import pickle

    import numpy as np
    from harness import fast_trainer, write_idx

    from litplug.callbacks import UnlearningMask
    from litplug.datamodules import CIFAR10, MNIST
    from litplug.modules import MLP, Unlearner

    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 40), ("t10k", 20)):
        write_idx(raw / f"{split}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)), False)
        write_idx(raw / f"{split}-labels-idx1-ubyte", np.arange(n) % 10, False)
    dm = ForgetRetain(MNIST(root=str(tmp_path), batch_size=8, val_fraction=0.25), scenario="class", forget_classes=[3])
    dm.setup()
    assert {int(y) for _, ys in dm.forget_dataloader() for y in ys} == {3}
    assert 3 not in {int(y) for _, ys in dm.retain_dataloader() for y in ys}
    assert {int(y) for _, ys in dm.test_dataloader()["forget_test"] for y in ys} == {3}
    mask = UnlearningMask("saliency", ratio=0.5)
    model = Unlearner(MLP(input_shape=[1, 28, 28], num_outputs=10, hidden=[16]), None, "random_label")
    fast_trainer(tmp_path, max_epochs=1, callbacks=[mask]).fit(model, dm)
    assert mask.num_selected == int(mask.num_entries * 0.5)

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (10, 3072)).astype(np.uint8), "labels": list(range(10))}, f)
    dm = ForgetRetain(
        CIFAR10(root=str(tmp_path), batch_size=8, val_fraction=0.2), scenario="random", forget_fraction=0.25, seed=1
    )
    dm.setup()
    n = len(dm.datamodule.train_set)
    assert len(dm.forget_indices) == int(n * 0.25) and len(dm.forget_indices) + len(dm.retain_indices) == n


class _PlainClassifier(LightningModule):
    """A user's module: (x, y) batches, one validation loader."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(64, 10)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.cross_entropy(self.net(x.flatten(1)), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _UserData(LightningDataModule):
    """A user's datamodule, without the loaders the mask reads."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x, y = torch.randn(48, 1, 8, 8, generator=g), torch.randint(0, 10, (48,), generator=g)
        self.forget_set, self.retain_set = TensorDataset(x[:16], y[:16]), TensorDataset(x[16:], y[16:])
        self.batch_size = 8

    def train_dataloader(self):
        return DataLoader(ConcatDataset([self.forget_set, self.retain_set]), batch_size=self.batch_size)


class _UserSplitData(_UserData):
    """The same datamodule with the two loaders a user adds for the mask."""

    def forget_dataloader(self):
        return DataLoader(self.forget_set, batch_size=self.batch_size)

    def retain_dataloader(self):
        return DataLoader(self.retain_set, batch_size=self.batch_size)


def test_forget_retain_refuses_a_plain_module_saying_what_to_add(tmp_path):
    dm = ForgetRetain(Digits(batch_size=32), scenario="class", forget_classes=[0])
    with pytest.raises(TypeError, match=r"(?s)validation_step` needs a `dataloader_idx`.*def forget_dataloader"):
        fast_trainer(tmp_path, max_steps=1).fit(_PlainClassifier(), dm)


def test_mask_on_a_user_module_needs_only_the_two_loaders(tmp_path):
    with pytest.raises(
        TypeError, match=r"(?s)lacks \['forget_dataloader', 'retain_dataloader'\].*def forget_dataloader"
    ):
        trainer = fast_trainer(tmp_path, max_steps=1, callbacks=[UnlearningMask("saliency", ratio=0.5)])
        trainer.fit(_PlainClassifier(), _UserData())
    mask = UnlearningMask("saliency", ratio=0.5, num_batches=1)
    model = _PlainClassifier()
    fast_trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[mask]).fit(model, _UserSplitData())
    assert mask.num_selected == sum(int(m.sum()) for m in mask.masks.values()) > 0
