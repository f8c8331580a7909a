"""MarkovText: seeded corpus, marked sequences repeated in training, entropy rate, bad input."""

import math
from collections import Counter

import pytest
import torch

from litplug.datamodules import ForgetRetain, MarkovText


def test_corpus_is_seeded_and_marked_sequences_repeat():
    a, b, c = MarkovText(seed=1), MarkovText(seed=1), MarkovText(seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.train_set.tokens, b.train_set.tokens) and not torch.equal(
        a.train_set.tokens, c.train_set.tokens
    )
    assert a.train_set.tokens.shape == (256, 24) and a.test_set.tokens.shape == (128, 24)
    assert a.train_set.targets.tolist() == [1] * 32 + [0] * 224 and a.test_set.targets.sum() == 0
    seen = Counter(tuple(s.tolist()) for batch in a.train_dataloader() for s in batch)
    marked = {tuple(s.tolist()) for s in a.train_set.tokens[:32]}
    assert all(seen[s] == 8 for s in marked) and sum(seen.values()) == 256 + 32 * 7
    forget = ForgetRetain(MarkovText(seed=1), "class", [1])
    forget.setup()
    assert forget.forget_indices.tolist() == list(range(32)) and forget.eval_names == ["forget", "retain", "test"]


def test_entropy_rate_is_the_loss_of_the_true_chain():
    dm = MarkovText(vocab_size=5, seq_len=400, num_train=64, num_marked=1, num_val=1, num_test=1, seed=0)
    dm.setup()
    tokens = dm.train_set.tokens[:, 100:]  # near the stationary distribution
    nll = -dm.transition[tokens[:, :-1], tokens[:, 1:]].log().mean().item()
    assert nll == pytest.approx(dm.entropy_rate, rel=0.03)
    assert 0 < dm.entropy_rate < math.log(5)
