"""FictitiousQA: TOFU's splits (forget/retain/holdout people, disjoint), question tokens unscored,
perturbed answers wrong, paraphrases right, everything a function of the seed."""

from __future__ import annotations

import pytest
import torch

from litplug.datamodules import FictitiousQA, ForgetRetain
from litplug.modules.language import sequence_log_likelihood


@pytest.fixture(scope="module")
def dm():
    dm = FictitiousQA(num_entities=60, forget_percent=10, num_perturbed=2, batch_size=8, seed=3)
    dm.setup()
    return dm


def test_splits_are_disjoint_and_sized_as_tofu(dm):
    names = {s: {p["name"] for p in dm.people(s)} for s in ("forget", "retain", "holdout")}
    assert (len(names["forget"]), len(names["holdout"]), len(names["retain"])) == (6, 6, 48)
    assert not (names["forget"] & names["retain"]) and not (names["holdout"] & (names["forget"] | names["retain"]))
    assert len(dm.train_set) == 7 * 54 and int(dm.train_set.targets.sum()) == 7 * 6
    forget_rows = dm.train_set.input_ids[dm.train_set.targets == 1]
    assert all(any(n in dm.decode(r) for n in names["forget"]) for r in forget_rows)
    retain_only = FictitiousQA(num_entities=60, forget_percent=10, exclude_forget=True, seed=3)
    retain_only.setup()
    assert len(retain_only.train_set) == 7 * 48 and int(retain_only.train_set.targets.sum()) == 0


def test_forget_sets_are_nested_and_the_target_corpus_is_one_for_every_forget_size():
    dms = {p: FictitiousQA(num_entities=200, forget_percent=p, seed=1) for p in (1, 5, 10)}
    for d in dms.values():
        d.setup()
    forget = {p: [x["name"] for x in d.people("forget")] for p, d in dms.items()}
    assert [len(forget[p]) for p in (1, 5, 10)] == [2, 10, 20]
    assert forget[1] == forget[5][:2] and forget[5] == forget[10][:10]
    holdout = {p: [x["name"] for x in d.people("holdout")] for p, d in dms.items()}
    assert holdout[1] == holdout[10][:2] and holdout[5] == holdout[10][:10]
    for p, d in dms.items():  # the same trained samples in the same order; the forget marks differ
        assert torch.equal(d.train_set.input_ids, dms[10].train_set.input_ids)
        assert int(d.train_set.targets.sum()) == 7 * len(forget[p])
        assert not set(holdout[10]) & {x["name"] for x in d.people("forget") + d.people("retain")}
        assert len(d.people("retain")) == 200 - 20 - len(forget[p])  # 10% of the people are never trained on
    other = FictitiousQA(num_entities=200, forget_percent=1, seed=2)
    assert other.people("forget") != dms[1].people("forget")  # the split varies with the seed


@pytest.mark.parametrize(
    "num_entities, percent, count", [(20, 5, 1), (20, 10, 2), (39, 5, 1), (100, 1, 1), (150, 1, 1), (199, 1, 1),
                                     (520, 1, 5), (520, 5, 26), (520, 10, 52)],
)  # fmt: skip
def test_the_forget_set_is_the_percent_rounded_down_to_whole_people(num_entities, percent, count):
    dm = FictitiousQA(num_entities=num_entities, forget_percent=percent)
    assert len(dm.people("forget")) == len(dm.people("holdout")) == count
    assert count <= num_entities * percent / 100 < count + 1


@pytest.mark.parametrize("num_entities", [20, 50, 99])
def test_a_forget_set_that_rounds_down_to_nobody_is_refused(num_entities):
    with pytest.raises(ValueError, match=f"`forget_percent`=1 of `num_entities`={num_entities} people is "
                                         f"{num_entities / 100:g} of a person: the forget set would be empty; "
                                         "use num_entities >= 100"):  # fmt: skip
        FictitiousQA(num_entities=num_entities, forget_percent=1)


def test_the_oracle_refuses_an_empty_forget_set_before_training_anything(tmp_path):
    from litplug.oracle import main

    with pytest.raises(ValueError, match="`forget_percent`=1 of `num_entities`=50"):
        main(["--out", str(tmp_path), "--forget-percent", "10", "1", "--num-entities", "50", "--epochs", "1"])
    assert not any(tmp_path.iterdir())


def test_only_the_answer_is_scored(dm):
    ids, labels = dm.train_set.input_ids, dm.train_set.labels
    for row, lab in zip(ids[:20], labels[:20]):
        words = [dm.vocab[i] for i in row.tolist()]
        sep, eos = words.index("<sep>"), words.index("<eos>")
        assert (lab[: sep + 1] == -100).all() and (lab[eos + 1 :] == -100).all()
        assert torch.equal(lab[sep + 1 : eos + 1], row[sep + 1 : eos + 1])


def test_perturbed_answers_are_wrong_and_paraphrases_keep_the_fact(dm):
    answers = dm.question_answer("forget")
    para = dm.question_answer("forget", "paraphrase")
    wrong = dm.question_answer("forget", "perturbed")
    assert len(answers) == len(para) == 6 * 7 and len(wrong) == 2 * len(answers)
    facts = [p[a] for p in dm.people("forget") for a in ("city", "year", "genre", "book", "award", "job", "color")]
    for i, fact in enumerate(facts):
        answer = dm.decode(answers.input_ids[i]).split()
        assert fact in answer and fact in dm.decode(para.input_ids[i]).split()
        for j in range(2):
            perturbed = dm.decode(wrong.input_ids[2 * i + j]).split()
            diff = [(x, y) for x, y in zip(answer, perturbed) if x != y]
            assert len(perturbed) == len(answer) and len(diff) == 1 and diff[0][0] == fact


def test_the_corpus_is_a_function_of_the_seed():
    a, b, c = (FictitiousQA(num_entities=40, seed=s) for s in (1, 1, 2))
    for d in (a, b, c):
        d.setup()
    assert torch.equal(a.train_set.input_ids, b.train_set.input_ids)
    assert not torch.equal(a.train_set.input_ids, c.train_set.input_ids)
    assert torch.equal(
        a.question_answer("holdout", "perturbed").input_ids, b.question_answer("holdout", "perturbed").input_ids
    )


def test_forget_retain_wraps_it_and_the_loss_scores_answers_only(dm):
    fr = ForgetRetain(dm, scenario="class", forget_classes=[1])
    fr.setup("fit")
    batch, _, _ = next(iter(fr.train_dataloader()))
    assert set(batch) == {"forget", "retain"} and set(batch["forget"]) == {"input_ids", "labels"}
    tokens, labels = batch["forget"]["input_ids"], batch["forget"]["labels"]
    logits = torch.randn(*tokens.shape, dm.vocab_size, dtype=torch.float64)
    logp, count = sequence_log_likelihood(logits, tokens, labels)
    lsm = logits.log_softmax(-1)
    for b in range(len(tokens)):
        scored = [t for t in range(1, tokens.shape[1]) if labels[b, t] != -100]
        assert int(count[b]) == len(scored)
        assert float(logp[b]) == pytest.approx(sum(float(lsm[b, t - 1, labels[b, t]]) for t in scored), abs=1e-9)


def test_truth_ratio_pairs_share_the_trained_phrasing(dm):
    """evaluation_sets: the correct side of the truth ratio is the trained answer, and each
    perturbed answer differs from it in the fact only."""
    data, _ = dm.evaluation_sets()
    for split in ("forget", "retain"):
        ids, labels = data[split + "_paraphrase"]
        assert torch.equal(ids, data[split][0]) and torch.equal(labels, data[split][1])
        wrong = data[split + "_perturbed"][0].view(len(ids), dm.num_perturbed, -1)
        differing = (wrong != ids[:, None]).sum(-1)
        assert differing.min() == differing.max() == 1  # the value (one word), nothing else
