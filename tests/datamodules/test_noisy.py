"""NoisyLabels: exact seeded noise of each kind, clean labels and held-out data untouched."""

import pytest
import torch

from litplug.datamodules import Digits, NoisyLabels


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
