"""Digits (litplug.datamodules.digits): a fixed split in the unit range, exact label noise, an
order that depends only on the seed and the epoch."""

import pytest
import torch
from harness import concatenated

from litplug.datamodules import Digits, DigitsTasks


def test_digits_split_is_fixed_and_in_unit_range():
    dm = Digits(batch_size=500)
    dm.setup()
    n_train, n_val, n_test = len(dm.train_set), len(dm.val_set), len(dm.test_set)
    assert n_train + n_val + n_test == 1797
    assert n_test == round(0.2 * 1797)
    x, y = concatenated(dm.test_dataloader())
    assert x.shape[1:] == (1, 8, 8) and x.min() >= 0 and x.max() <= 1
    other = Digits(batch_size=500, seed=7)  # another seed shuffles differently but tests on the same images
    other.setup()
    x2, _ = concatenated(other.test_dataloader())
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


def test_digits_tasks_split_by_class_over_the_images_of_digits():
    tasks = [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    whole, merged = Digits(batch_size=500), DigitsTasks(tasks, batch_size=500)
    whole.setup()
    vals = merged.val_dataloader()
    assert len(vals) == 2
    x_all, y_all = concatenated(whole.val_dataloader())
    for task, loader in zip(tasks, vals):
        x, y = concatenated(loader)
        keep = torch.isin(y_all, torch.tensor(task))
        assert torch.equal(x, x_all[keep]) and torch.equal(y, y_all[keep])
    for t, task in enumerate(tasks):
        fine_tune = DigitsTasks(tasks, train_task=t, batch_size=500)
        for loader in (fine_tune.train_dataloader(), fine_tune.val_dataloader(), fine_tune.test_dataloader()):
            _, y = concatenated(loader)
            assert set(y.tolist()) == set(task)
    one = DigitsTasks([[3], [7]], batch_size=500)
    assert set(concatenated(one.train_dataloader())[1].tolist()) == {3, 7}
