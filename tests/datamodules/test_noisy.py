"""NoisyLabels: exact seeded noise of each kind (a transition matrix against its empirical
frequencies), clean labels and held-out data untouched, bad matrices named."""

import warnings

import pytest
import torch
from harness import cut_and_resume, fast_trainer, state_of
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from torch.utils.data import DataLoader, TensorDataset

from litplug.datamodules import Digits, NoisyLabels
from litplug.modules import MLP, Classifier


@pytest.mark.parametrize("kind", ["symmetric", "pair"])
def test_noise_is_seeded_exact_and_keeps_the_clean_labels(kind):
    dm = NoisyLabels(Digits(), rate=0.3, kind=kind, seed=5)
    loader = dm.train_dataloader()
    clean = dm.datamodule.train_set.y
    assert torch.equal(dm.clean_labels, clean)
    noisy = dm.is_noisy
    assert int(noisy.sum()) == round(0.3 * len(clean))
    if kind == "pair":
        assert torch.equal(dm.noisy_labels[noisy], (clean[noisy] + 1) % 10)
    labels = torch.cat([y for _, y in loader])
    order = list(loader.sampler)
    assert torch.equal(labels, dm.noisy_labels[order])
    again = NoisyLabels(Digits(), rate=0.3, kind=kind, seed=5)
    again.train_dataloader()
    assert torch.equal(again.noisy_labels, dm.noisy_labels)
    other = NoisyLabels(Digits(), rate=0.3, kind=kind, seed=6)
    other.train_dataloader()
    assert not torch.equal(other.noisy_labels, dm.noisy_labels)
    val = torch.cat([y for _, y in dm.val_dataloader()])
    assert torch.equal(val, dm.datamodule.val_set.y)  # held-out data is the wrapped one's, clean


class _Labels(LightningDataModule):
    """Many labels, balanced over 3 classes: empirical frequencies close to the probabilities."""

    def __init__(self, n=30_000):
        super().__init__()
        self.data = TensorDataset(torch.zeros(n, 1), torch.arange(n) % 3)

    def train_dataloader(self):
        return DataLoader(self.data, batch_size=1000)


TRANSITION = [[0.6, 0.3, 0.1], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5]]


def test_a_transition_matrix_gives_its_empirical_frequencies():
    dm = NoisyLabels(_Labels(), kind="transition", transition=TRANSITION, seed=3)
    loader = dm.train_dataloader()
    clean, noisy = dm.clean_labels, dm.noisy_labels
    assert torch.equal(clean, torch.arange(30_000) % 3) and torch.equal(torch.cat([y for _, y in loader]), noisy)
    counts = torch.zeros(3, 3)
    counts.index_put_((clean, noisy), torch.ones(len(clean)), accumulate=True)
    p = torch.tensor(TRANSITION)
    freq = counts / counts.sum(1, keepdim=True)
    sd = (p * (1 - p) / 10_000).sqrt()  # binomial standard deviation, 10,000 samples per class
    assert ((freq - p).abs() <= 4 * sd + 1e-12).all(), freq
    assert torch.equal(freq[1], torch.tensor([0.0, 1.0, 0.0]))  # probability 0 never drawn
    again = NoisyLabels(_Labels(), kind="transition", transition=TRANSITION, seed=3)
    again.train_dataloader()
    assert torch.equal(again.noisy_labels, noisy)
    other = NoisyLabels(_Labels(), kind="transition", transition=TRANSITION, seed=4)
    other.train_dataloader()
    assert not torch.equal(other.noisy_labels, noisy)


def test_labels_outside_the_matrix_are_refused():
    dm = NoisyLabels(_Labels(), kind="transition", transition=[[0.9, 0.1], [0.1, 0.9]])
    with pytest.raises(ValueError, match="2 x 2 matrix but _Labels's training labels span"):
        dm.train_dataloader()


def test_labels_outside_num_classes_are_refused():
    dm = NoisyLabels(_Labels(n=30), rate=0.2, num_classes=2)
    with pytest.raises(ValueError, match=r"`num_classes` is 2 but _Labels's training labels span \[0, 2\]"):
        dm.train_dataloader()


class _DictSamples(TensorDataset):
    def __getitem__(self, i):
        x, y = super().__getitem__(i)
        return {"x": x, "y": y}


class _DictData(LightningDataModule):
    def train_dataloader(self):
        data = _DictSamples(torch.randn(6, 2), torch.arange(6) % 2)
        data.targets = data.tensors[1]
        return DataLoader(data, batch_size=2)


def test_dict_samples_are_refused_naming_the_sample_form():
    with pytest.raises(TypeError, match=r"needs \(input, label\) samples .* of _DictData, got a dict"):
        NoisyLabels(_DictData(), rate=0.5, num_classes=2).train_dataloader()


def test_a_run_resumes_mid_epoch_exactly(tmp_path):
    """The loader is a StatefulDataLoader over the wrapped EpochShuffle: a run cut after a mid-epoch
    checkpoint ends with the uninterrupted run's weights, bit for bit, and Lightning does not warn."""
    from lightning.pytorch import seed_everything

    def build(tmp_dir, **kwargs):
        seed_everything(0)
        model = Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[8]), 10)
        data = NoisyLabels(Digits(batch_size=256), rate=0.3, kind="pair")  # 6 steps an epoch
        return fast_trainer(tmp_dir, max_epochs=2, limit_val_batches=0, **kwargs), model, data, None

    with warnings.catch_warnings():
        warnings.simplefilter("error", PossibleUserWarning)
        (full, _), (resumed, _) = cut_and_resume(build, tmp_path, step=8)  # the middle of epoch 1
    for key, value in state_of(full).items():
        assert torch.equal(state_of(resumed)[key], value), key
