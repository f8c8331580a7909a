"""SISA: deleting samples retrains only their shards, and each retrained shard is bit-identical to
training that shard from scratch without them; untouched shards keep their weights."""

from __future__ import annotations

import pytest
import torch

from litplug.datamodules import Digits
from litplug.modules import MLP, Classifier
from litplug.modules.sisa import SISA


def make() -> Classifier:
    return Classifier(MLP(input_shape=[1, 8, 8], num_outputs=10, hidden=[16]), num_classes=10)


@pytest.fixture(scope="module")
def data():
    dm = Digits(batch_size=64)
    dm.setup()
    return torch.utils.data.Subset(dm.train_set, range(240))


def weights(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_delete_retrains_only_the_shards_that_held_the_samples_bit_exactly(data):
    sisa = SISA(make, data, num_shards=3, seed=1, batch_size=32, max_epochs=2)
    sisa.fit()
    before = [weights(m) for m in sisa.modules]
    assert sorted(i for s in sisa.shards for i in s) == list(range(240))  # a partition
    doomed = [sisa.shards[1][0], sisa.shards[1][5]]
    assert sisa.delete(doomed) == [1]
    assert all(torch.equal(before[0][k], v) for k, v in weights(sisa.modules[0]).items())
    assert not all(torch.equal(before[1][k], v) for k, v in weights(sisa.modules[1]).items())
    fresh = sisa.train_shard(1, [i for i in SISA(make, data, 3, seed=1).shards[1] if i not in doomed])
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in weights(sisa.modules[1]).items())
    x = torch.stack([data[i][0] for i in range(8)])
    p = sisa.predict_proba(x)
    assert p.shape == (8, 10) and torch.allclose(p.sum(-1), torch.ones(8))


def test_bad_deletions_and_predictions_before_fit(data):
    sisa = SISA(make, data, num_shards=2, seed=0, max_epochs=1)
    with pytest.raises(ValueError, match="not in the training set"):
        sisa.delete([10_000])
    with pytest.raises(RuntimeError, match="before fit"):
        sisa.predict_proba(torch.zeros(1, 1, 8, 8))
