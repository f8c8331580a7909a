"""The unlearning metrics equal their definitions written out here, sample by sample, on hand-made
logits with padding and ``-100`` labels (the definitions of open-unlearning's evaluation code)."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from scipy.stats import ks_2samp
from sklearn.metrics import roc_auc_score

from litplug.functional import unlearning_metrics as um

V = 7


@pytest.fixture
def batch():
    """Three rows: a question of 2 tokens then a 4-token answer; a 3-token answer then padding
    (-100); a row whose answer the logits predict exactly (argmax)."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, V, generator=gen, dtype=torch.float64) * 2
    ids = torch.randint(0, V, (3, 8), generator=gen)
    labels = ids.clone()
    labels[0, :2] = -100
    labels[0, 6:] = -100
    labels[1, :3] = -100
    labels[1, 6:] = -100
    labels[2, :1] = -100
    for t in range(1, 8):  # row 2: position t - 1 predicts token t exactly
        logits[2, t - 1, ids[2, t]] = 20.0
    return logits, labels


def scored(row: torch.Tensor) -> list[int]:
    return [j for j in range(len(row)) if int(row[j]) != -100]


def log_softmax_at(logits: torch.Tensor, i: int, t: int) -> torch.Tensor:
    return logits[i, t] - torch.logsumexp(logits[i, t], -1)


def test_answer_loss_is_the_mean_nll_of_the_scored_tokens(batch):
    logits, labels = batch
    for i in range(3):
        js = [j for j in scored(labels[i]) if j > 0]
        nll = [-float(log_softmax_at(logits, i, j - 1)[labels[i, j]]) for j in js]
        assert float(um.answer_loss(logits, labels)[i]) == pytest.approx(sum(nll) / len(scored(labels[i])), abs=1e-6)


def token_scored(labels_row: torch.Tensor) -> list[int]:
    return scored(labels_row)[:-1]  # the end-of-sequence position is left out


def test_exact_memorization_and_extraction_strength(batch):
    logits, labels = batch
    em = um.exact_memorization(logits, labels)
    es = um.extraction_strength(logits, labels)
    for i in range(3):
        js = token_scored(labels[i])
        hits = [int(logits[i, j - 1].argmax()) == int(labels[i, j]) for j in js]
        assert float(em[i]) == pytest.approx(sum(hits) / len(hits), abs=1e-6)
        n = len(hits)
        k = next((k for k in range(n) if all(hits[k:])), n - 1)
        assert float(es[i]) == pytest.approx(1 - k / n, abs=1e-6)
    assert float(em[2]) == 1.0 and float(es[2]) == 1.0


def test_min_k_and_min_k_plus_plus(batch):
    logits, labels = batch
    for k in (0.2, 0.5, 1.0):
        mk = um.min_k_score(logits, labels, k)
        mkpp = um.min_k_plus_plus_score(logits, labels, k)
        for i in range(3):
            js = token_scored(labels[i])
            lps = [float(log_softmax_at(logits, i, j - 1)[labels[i, j]]) for j in js]
            num = max(1, int(len(lps) * k))
            assert float(mk[i]) == pytest.approx(-sum(sorted(lps)[:num]) / num, abs=1e-6)
            z = []
            for j, lp in zip(js, lps):
                dist = log_softmax_at(logits, i, j - 1)
                mu = float((dist.exp() * dist).sum())
                var = max(float((dist.exp() * dist**2).sum()) - mu**2, 1e-6)
                z.append((lp - mu) / math.sqrt(var))
            assert float(mkpp[i]) == pytest.approx(-sum(sorted(z)[:num]) / num, abs=1e-5)
    with pytest.raises(ValueError, match="`k`"):
        um.min_k_score(logits, labels, 0.0)


def test_zlib_and_reference_scores(batch):
    logits, labels = batch
    texts = ["the answer is one", "two two two two", "x"]
    loss = um.answer_loss(logits, labels)
    z = um.zlib_score(logits, labels, texts)
    for i, text in enumerate(texts):
        assert float(z[i]) == pytest.approx(float(loss[i]) / len(zlib.compress(text.encode())), abs=1e-6)
    assert torch.equal(um.reference_score(loss, loss * 0.5), loss - loss * 0.5)
    with pytest.raises(ValueError, match="one string per sample"):
        um.zlib_score(logits, labels, texts[:2])


def test_truth_ratio_aggregates_and_forget_quality():
    correct = torch.tensor([[0.5, 0.7], [1.0, 1.2], [2.0, 2.0]])  # two paraphrases
    wrong = torch.tensor([[1.0, 2.0, 3.0], [0.9, 1.1, 1.0], [1.0, 1.0, 1.0]])  # three perturbations
    tr = um.truth_ratio(correct, wrong)
    expected = [
        math.exp(-sum(w) / 3) / (math.exp(-sum(c) / 2) + 1e-10) for c, w in zip(correct.tolist(), wrong.tolist())
    ]
    assert tr.tolist() == pytest.approx(expected, abs=1e-9)
    assert um.closer_to_one(tr) == pytest.approx(sum(min(r, 1 / (r + 1e-10)) for r in expected) / 3, abs=1e-9)
    assert um.true_better(tr) == pytest.approx(sum(max(0, 1 - r) for r in expected) / 3, abs=1e-9)
    a, b = torch.rand(40, generator=torch.Generator().manual_seed(1)), torch.rand(30) + 0.3
    assert um.forget_quality(a, b) == pytest.approx(ks_2samp(a.numpy(), b.numpy()).pvalue, abs=1e-12)


def test_mia_auc_matches_sklearn_and_privleak_follows_muse():
    gen = torch.Generator().manual_seed(2)
    forget, holdout = torch.randn(50, generator=gen), torch.randn(40, generator=gen) + 0.5
    forget[:5] = holdout[:5]  # ties count half, as in the ROC area
    expected = roc_auc_score([0] * 50 + [1] * 40, torch.cat([forget, holdout]).numpy())
    assert um.mia_auc(forget, holdout) == pytest.approx(expected, abs=1e-12)
    assert um.privleak(0.7, 0.7) == pytest.approx(0.0)
    assert um.privleak(0.9, 0.5) == pytest.approx(((1 - 0.9) - 0.5) / 0.5 * 100)
    with pytest.raises(ValueError, match="forget and held-out"):
        um.mia_auc(torch.zeros(0), holdout)


TOKEN_WISE = (um.exact_memorization, um.extraction_strength, um.min_k_score, um.min_k_plus_plus_score)


def test_rows_with_nothing_to_score_are_refused_by_every_per_sample_metric(batch):
    """open-unlearning gives NaN (loss), None (EM, left out of the mean) or 0 (ES, Min-K%, Min-K%++)
    there; litplug names the rows instead."""
    logits, labels = batch
    blank = labels.clone()
    blank[1] = -100  # no scored token: 0/0
    blank[2, 1:] = -100
    blank[2, 0] = 5  # position 0 has no prediction: nothing scored either
    for metric in (um.answer_loss, um.loss_score, *TOKEN_WISE):
        with pytest.raises(ValueError, match=r"`labels` rows \[1, 2\] score"):
            metric(logits, blank)
    with pytest.raises(ValueError, match=r"`labels` rows \[1, 2\] score no token after the first position"):
        um.zlib_score(logits, blank, ["a", "b", "c"])
    one = labels.clone()
    one[1, :] = -100
    one[1, 4] = 3  # a one-token answer: the loss has it, the token-wise scores leave it out
    assert torch.isfinite(um.answer_loss(logits, one)).all()
    for metric in TOKEN_WISE:
        with pytest.raises(ValueError, match=r"`labels` rows \[1\] score fewer than 2 tokens.*end-of-sequence"):
            metric(logits, one)
    model = lambda ids: logits[: len(ids)]  # noqa: E731
    assert set(um.answer_statistics(model, torch.zeros(3, 8, dtype=torch.long), one, statistics=["loss"])) == {"loss"}
    with pytest.raises(ValueError, match=r"rows \[1\] score fewer than 2"):  # refused before any forward pass
        um.answer_statistics(lambda ids: pytest.fail("ran"), torch.zeros(3, 8, dtype=torch.long), one)


def test_mia_auc_refuses_nan_and_orders_inf_and_the_suite_reports_nan_for_a_diverged_model():
    nan, inf = float("nan"), float("inf")
    with pytest.raises(ValueError, match="`forget_scores` holds 1 NaN of 3 scores"):
        um.mia_auc(torch.tensor([0.1, nan, 0.3]), torch.tensor([1.0]))
    with pytest.raises(ValueError, match="`holdout_scores` holds 2 NaN of 2 scores"):
        um.mia_auc(torch.tensor([0.1]), torch.tensor([nan, nan]))
    assert um.mia_auc(torch.tensor([-inf, 0.0]), torch.tensor([inf, inf])) == 1.0
    assert um.mia_auc(torch.tensor([inf]), torch.tensor([inf, 0.0])) == pytest.approx(0.25)  # inf ties inf

    def stats(scale):
        t = torch.tensor([0.5, 1.0, 1.5]) * scale
        sets = {k: {"loss": t} for k in um.SUITE_SETS}
        for k in ("forget", "holdout"):
            sets[k] = {s: t + 2 * (k == "holdout") for s in um.STATISTICS}
        sets["forget_perturbed"] = sets["retain_perturbed"] = {"loss": t.repeat_interleave(2)}
        return sets

    texts = {"forget": ["a", "b", "c"], "holdout": ["d", "e", "f"]}
    diverged = um.suite_from_statistics(stats(float("nan")), stats(1.0), texts)
    assert all(math.isnan(v) for k, v in diverged.items() if not k.startswith("retain_mia"))
    assert diverged["retain_mia_loss"] == 1.0  # the retain model's side is still scored


def test_privleak_keeps_open_unlearnings_epsilon():
    assert um.privleak(0.5, 1.0) == pytest.approx(0.5 / 1e-10 * 100)  # 5e11, as open-unlearning
    assert "1e-10" in um.privleak.__doc__ and "5e11" in um.privleak.__doc__


def test_model_utility_is_the_harmonic_mean():
    assert um.model_utility([0.5, 0.25]) == pytest.approx(2 / (2 + 4))
    assert um.model_utility([0.5, 0.0]) == 0.0
    with pytest.raises(ValueError, match="finite values"):
        um.model_utility([float("nan")])


def test_shapes_are_checked():
    with pytest.raises(ValueError, match=r"\[B, T, V\]"):
        um.answer_loss(torch.zeros(2, 3, 4), torch.zeros(2, 4, dtype=torch.long))


def test_the_suite_on_a_corpus_scores_a_model_against_itself_as_indistinguishable():
    from litplug.datamodules import FictitiousQA
    from litplug.modules import CausalTransformer

    dm = FictitiousQA(num_entities=40, forget_percent=10, num_perturbed=2)
    data, texts = dm.evaluation_sets()
    torch.manual_seed(0)
    a = CausalTransformer(vocab_size=dm.vocab_size, max_len=dm.max_len, dim=16, depth=1, heads=2).eval()
    b = CausalTransformer(vocab_size=dm.vocab_size, max_len=dm.max_len, dim=16, depth=1, heads=2).eval()
    same = um.unlearning_suite(a, a, data, texts)
    assert same["forget_quality"] == pytest.approx(1.0) and same["privleak"] == pytest.approx(0.0, abs=1e-6)
    assert same["mia_reference"] == pytest.approx(0.5)  # the reference score is 0 for every sample
    assert same["mia_loss"] == same["retain_mia_loss"]
    other = um.unlearning_suite(a, b, data, texts)
    assert other["forget_truth_ratio"] == same["forget_truth_ratio"] and 0 <= other["forget_quality"] <= 1
    assert set(same) == set(other) and all(math.isfinite(v) for v in same.values())
    loss = um.answer_loss(a(data["forget"][0]), data["forget"][1])
    assert same["forget_prob"] == pytest.approx(float(torch.exp(-loss).mean()), abs=1e-6)
    with pytest.raises(ValueError, match="lacks"):
        um.unlearning_suite(a, a, {"forget": data["forget"]}, texts)
    # the two steps: the retain model's statistics once, for any model; each distinct set run once
    calls = []
    counted = lambda ids: (calls.append(len(ids)), a(ids))[1]  # noqa: E731
    stats_a = um.suite_statistics(counted, data)
    assert um.suite_from_statistics(stats_a, um.suite_statistics(b, data), texts) == other
    distinct = {id(data[k][0]) for k in um.SUITE_SETS}
    assert sum(calls) == sum(len(data[k][0]) for k in um.SUITE_SETS if id(data[k][0]) in distinct and
                             not distinct.discard(id(data[k][0])))  # fmt: skip
    assert set(stats_a["forget"]) == set(um.STATISTICS) and set(stats_a["retain_perturbed"]) == {"loss"}
    full = um.answer_statistics(a, *data["holdout"])
    assert torch.equal(um.answer_statistics(a, *data["holdout"], statistics=["min_k"])["min_k"], full["min_k"])
    with pytest.raises(ValueError, match="`statistics` must be among"):
        um.answer_statistics(a, *data["holdout"], statistics=["auc"])
