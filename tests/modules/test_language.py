"""Causal language modelling: the decoder-only transformer is causal, per-sequence log-likelihoods
equal a hand computation, LanguageModel trains on token batches, bad input."""

import pytest
import torch
from harness import fast_trainer

from litplug.modules import CausalTransformer, LanguageModel
from litplug.modules.language import logits_of, sequence_log_likelihood, tokens_of


def test_causal_transformer_is_causal():
    torch.manual_seed(0)
    net = CausalTransformer(vocab_size=11, max_len=12, dim=16, depth=2, heads=2).eval()
    tokens = torch.randint(0, 11, (3, 12))
    logits = net(tokens)
    assert logits.shape == (3, 12, 11)
    for t in (0, 5, 11):
        changed = tokens.clone()
        changed[:, t] = (changed[:, t] + 1) % 11
        other = net(changed)
        # positions before t cannot see token t; t and later can
        torch.testing.assert_close(other[:, :t], logits[:, :t], atol=1e-6, rtol=0)
        assert ((other[:, t:] - logits[:, t:]).abs().amax(-1) > 1e-4).all()
    torch.testing.assert_close(
        net(tokens[:, :7]), logits[:, :7], atol=1e-6, rtol=0
    )  # a prefix scores as in the full sequence


def test_sequence_log_likelihood_by_hand():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=gen, dtype=torch.float64)
    tokens = torch.randint(0, 7, (2, 5), generator=gen)
    logp, count = sequence_log_likelihood(logits, tokens)
    for b in range(2):
        by_hand = sum(float(logits[b, t].log_softmax(-1)[tokens[b, t + 1]]) for t in range(4))
        assert logp[b].item() == pytest.approx(by_hand, rel=1e-6)
    assert count.tolist() == [4, 4]


def test_batch_forms_and_outputs():
    tokens = torch.zeros(2, 3, dtype=torch.long)
    assert (
        tokens_of(tokens) is tokens and tokens_of((tokens, 1)) is tokens and tokens_of({"input_ids": tokens}) is tokens
    )
    with pytest.raises(TypeError, match="token ids"):
        tokens_of(torch.zeros(2, 3))
    logits = torch.zeros(2, 3, 4)
    assert logits_of({"logits": logits}) is logits
    with pytest.raises(TypeError, match="logits"):
        logits_of((logits,))


def test_language_model_trains(tmp_path):
    torch.manual_seed(0)
    tokens = torch.arange(8).repeat(16, 2)[:, :10]  # one deterministic sequence pattern
    loader = torch.utils.data.DataLoader(tokens, batch_size=8)
    model = LanguageModel(
        CausalTransformer(8, 10, dim=16, depth=1, heads=2), optimizer=lambda p: torch.optim.Adam(p, lr=1e-2)
    )
    start = model.batch_loss(tokens).item()
    fast_trainer(tmp_path, max_epochs=15).fit(model, loader)
    assert start > 1.5 and model.batch_loss(tokens).item() < 0.1


def test_inputs_longer_than_max_len_are_refused():
    with pytest.raises(ValueError, match="max_len"):
        CausalTransformer(8, 4, dim=8, heads=2)(torch.zeros(1, 5, dtype=torch.long))
