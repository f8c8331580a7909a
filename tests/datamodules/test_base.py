"""The datamodule base (litplug.datamodules.base): the epoch-seeded shuffle, split across ranks
and resumed; stateful training loaders."""

import pytest
import torch
from torchdata.stateful_dataloader import StatefulDataLoader

from litplug.datamodules import Digits
from litplug.datamodules.base import EpochShuffle


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
