"""Indexed: the index of every training sample travels with it, the module sees the wrapped
datamodule's batches unchanged (its own batch hooks still run), KeptSampler restricts any sampler,
iterable datasets are refused."""

import warnings

import pytest
import torch
from harness import fast_trainer
from lightning.pytorch import Callback, LightningDataModule
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler, TensorDataset

from litplug.datamodules import Digits, Indexed, NoisyLabels
from litplug.datamodules.base import EpochShuffle
from litplug.datamodules.indexed import KeptSampler, KeptShuffle
from litplug.modules import MLP, Classifier


class Check(Callback):
    def __init__(self):
        self.batches = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        dm = trainer.datamodule
        x, y = batch
        for row, i in enumerate(dm.batch_index.tolist()):
            xi, yi = dm.train_dataset[i]
            assert torch.equal(x[row], xi) and int(y[row]) == int(yi)
        self.batches += 1


class Tagged(Classifier):
    """A module with its own on_before_batch_transfer (it doubles the inputs)."""

    def on_before_batch_transfer(self, batch, dataloader_idx):
        self.seen = batch
        return batch[0] * 2, batch[1]


def test_the_index_travels_with_every_sample(tmp_path):
    dm, check = Indexed(Digits(batch_size=32)), Check()
    model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10), 10)
    fast_trainer(tmp_path, max_epochs=2, limit_train_batches=3, callbacks=[check]).fit(model, dm)
    assert check.batches == 6 and dm.num_examples == len(dm.datamodule.train_set)
    assert torch.equal(dm.labels(), dm.datamodule.train_set.y)


def test_the_modules_own_batch_hook_still_runs(tmp_path):
    dm = Indexed(Digits(batch_size=8))
    model = Tagged(MLP(input_shape=[1, 8, 8], num_outputs=10), 10)
    fast_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(model, dm)
    x, _ = model.seen
    assert isinstance(model.seen, (list, tuple)) and x.shape == (8, 1, 8, 8)  # the index is off already


def test_kept_sampler_restricts_any_sampler():
    kept = torch.tensor([7, 2, 5])
    assert list(KeptSampler(SequentialSampler(range(10)), kept, 10)) == [2, 5, 7]
    shuffled = KeptSampler(RandomSampler(range(10)), kept, 10, seed=1)
    first = list(shuffled)
    assert sorted(first) == [2, 5, 7] and list(shuffled) == first  # seeded by (seed, epoch)
    orders = set()
    for epoch in range(6):
        shuffled.set_epoch(epoch)
        orders.add(tuple(shuffled))
    assert len(orders) > 1
    base = EpochShuffle(10, seed=0)
    filtered = KeptShuffle(EpochShuffle(10, seed=0), kept)
    filtered.set_epoch(3)
    base.set_epoch(3)
    assert list(filtered) == [i for i in base if i in {2, 5, 7}] and len(filtered) == 3
    it = iter(filtered)
    first = next(it)
    resumed = KeptShuffle(EpochShuffle(10, seed=0), kept)
    resumed.load_state_dict(filtered.state_dict())
    resumed.set_epoch(3)
    assert [first, *resumed] == list(filtered)  # resumable in the middle of an epoch
    with pytest.raises(TypeError, match="use KeptShuffle"):
        KeptSampler(base, kept, 10)
    data = TensorDataset(torch.arange(10))
    ranks = [list(KeptSampler(DistributedSampler(data, 2, r, shuffle=True, seed=4), kept, 10)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 2 and sorted(set(ranks[0] + ranks[1])) == [2, 5, 7]  # one padded
    cut = [KeptSampler(DistributedSampler(data, 2, r, shuffle=False, drop_last=True), kept, 10) for r in range(2)]
    assert [list(s) for s in cut] == [[2], [5]] and len(cut[0]) == 1


class Custom(LightningDataModule):
    def train_dataloader(self):
        data = TensorDataset(torch.randn(12, 6), torch.randint(0, 3, (12,)))
        return DataLoader(data, batch_size=5, shuffle=True, drop_last=True, collate_fn=lambda s: tuple(zip(*s)))


def test_the_wrapped_loader_keeps_its_settings():
    dm = Indexed(Custom())
    loader = dm.train_dataloader()
    assert isinstance(loader.sampler, RandomSampler) and loader.drop_last and len(loader) == 2
    batch = dm.on_before_batch_transfer(next(iter(loader)), 0)
    assert isinstance(batch, tuple) and len(batch[0]) == 5 and len(dm.batch_index) == 5
    dm.keep(torch.tensor([0, 1, 2, 3, 4, 5]))
    assert len(dm.train_dataloader()) == 1


def test_an_unknown_datamodule_type_is_refused():
    with pytest.raises(TypeError, match="`datamodule` must be a LightningDataModule"):
        Indexed(TensorDataset(torch.zeros(2)))


def _resume_warnings(caught):
    return [str(w.message) for w in caught if "mid-epoch resume" in str(w.message)]


def test_a_sampler_that_cannot_resume_mid_epoch_is_warned_about_once():
    dm = Indexed(Custom())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loader = dm.train_dataloader()
        dm.train_dataloader()
    (message,) = _resume_warnings(caught)
    assert "Indexed: the training sampler of Custom (RandomSampler) does not restore its order" in message
    assert "EpochShuffle" in message and "docs/long_runs.md" in message
    # what it warns about: the loader's state skips the samples served, but in a fresh draw of the order
    torch.manual_seed(0)
    it = iter(loader)
    next(it)
    state = loader.state_dict()
    rest = next(it).index
    torch.manual_seed(1)
    resumed = dm.train_dataloader()
    resumed.load_state_dict(state)
    assert not torch.equal(next(iter(resumed)).index, rest)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Indexed(NoisyLabels(Custom(), num_classes=3)).train_dataloader()  # one sampler, one warning
        Indexed(Digits(batch_size=4)).train_dataloader()  # EpochShuffle: exact
        kept = Indexed(Custom())
        kept.keep(torch.arange(6))
        kept.train_dataloader()  # KeptSampler: the kept shuffle is drawn from (seed, epoch)
    assert [m.split(":")[0] for m in _resume_warnings(caught)] == ["NoisyLabels"]
