"""A TOFU-like question/answer corpus about fictitious people, generated from a seed (nothing is
downloaded), tokenised by its own word-level vocabulary.

Each of ``num_entities`` people has a one-word name (a fact hangs on one token) and seven
attributes (birthplace, birth year, genre, book, award, parent's occupation, favourite colour)
drawn from fixed value lists. Each attribute gives one question and an answer; for evaluation each
answer also has a paraphrase (another sentence with the same fact) and ``num_perturbed`` perturbed
answers (the same sentence with a wrong value); :meth:`FictitiousQA.evaluation_sets` scores the
truth ratio on the answer's own phrasing. The people and their split are drawn from ``seed``; as in
TOFU they are split into

- ``forget``: ``forget_percent`` percent of the people (1, 5 or 10), rounded down to whole people
  (``num_entities * forget_percent // 100``), trained on, then unlearned; the forget people of 1%
  are among those of 5%, and those of 5% among those of 10%. A forget set that would round down to
  nobody (1% of fewer than 100 people) raises ``ValueError``: one person there would be another
  forget size (1% and 5% of 20 people would be the same person), reported under the wrong name;
- ``retain``: the other trained-on people;
- ``holdout``: as many people as ``forget``, never trained on (the non-members of the
  membership attacks), taken from 10% of the people that are never trained on at any forget size.

So the trained people (forget and retain) are the same at every forget size, in the same order:
one target model serves the three sizes.

A sample is ``{"input_ids": [T], "labels": [T]}``: ``<bos> question <sep> answer <eos>`` padded to
``max_len`` with ``<pad>``; ``labels`` equals ``input_ids`` on the answer and ``<eos>`` and is -100
elsewhere (the question is given, not scored). ``train_set.targets`` is 1 for a sample about a
forget person and 0 otherwise, so ``ForgetRetain(FictitiousQA(), "class", forget_classes=[1])``
gives the forget/retain split; ``FictitiousQA(exclude_forget=True)`` trains the retain model.

Example:
    >>> dm = FictitiousQA(num_entities=100, forget_percent=5, batch_size=4)
    >>> dm.setup()
    >>> len(dm.people("forget")), len(dm.people("holdout")), len(dm.people("retain"))
    (5, 5, 85)
    >>> batch = next(iter(dm.train_dataloader()))
    >>> sorted(batch), batch["input_ids"].shape == batch["labels"].shape
    (['input_ids', 'labels'], True)
    >>> dm.decode(dm.question_answer("forget")[0]["input_ids"]).split(" <sep> ")[0]  # doctest: +ELLIPSIS
    '<bos> where was ... born ?'
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from typing import Literal

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset
from torchdata.stateful_dataloader import StatefulDataLoader

from ..plumbing import mix_seed
from ..validation import check_bool, check_choice, check_int
from .base import EpochShuffle

Split = Literal["forget", "retain", "holdout"]
FORGET_PERCENTS = (1, 5, 10)
IGNORE_INDEX = -100
SPECIALS = ("<pad>", "<bos>", "<sep>", "<eos>")

FIRST = (
    "ala bren cor dav eli fen gor hal iri jon kai lem mor nia osk pim quin rho sel tam uma vik wen xan yor zel".split()
)
LAST = "ash berg crane dale ember frost glen holt ivy jarr kell lark moss north oak pike reed stone thorn vale".split()
NAMES = [first + last for first in FIRST for last in LAST]  # one word each: a fact hangs on one token
VALUES: dict[str, list[str]] = {
    "city": "paris lima oslo cairo quito dakar hanoi perth riga sofia tunis accra".split(),
    "year": [str(y) for y in range(1940, 1990, 4)],
    "genre": "mystery fantasy romance horror poetry satire thriller memoir fable drama".split(),
    "book": "river lantern orchard harbor meadow compass ember willow citadel glacier".split(),
    "award": "golden silver crystal laurel beacon summit".split(),
    "job": "baker sailor doctor farmer painter teacher miner tailor pilot judge".split(),
    "color": "red blue green amber violet gray teal ivory".split(),
}
# attribute -> (question, answer, paraphrase); {n} is the person's name, {v} the value.
TEMPLATES: dict[str, tuple[str, str, str]] = {
    "city": ("where was {n} born ?", "{n} was born in {v} .", "the birthplace of {n} is {v} ."),
    "year": ("when was {n} born ?", "{n} was born in the year {v} .", "the birth year of {n} is {v} ."),
    "genre": ("what does {n} write ?", "{n} writes {v} novels .", "the genre of {n} is {v} ."),
    "book": ("what is the best book of {n} ?", "the best book of {n} is the {v} .", "{n} is best known for the {v} ."),
    "award": ("which award did {n} win ?", "{n} won the {v} prize .", "the prize {n} received is the {v} prize ."),
    "job": ("what was the parent of {n} ?", "the parent of {n} was a {v} .", "{n} grew up with a {v} as a parent ."),
    "color": ("what colour does {n} like ?", "{n} likes the colour {v} .", "the favourite colour of {n} is {v} ."),
}


class QADataset(Dataset):
    """Tokenised question/answer samples: ``input_ids`` and ``labels`` ``[N, T]``, ``targets``
    ``[N]`` (1 = about a forget person)."""

    def __init__(self, input_ids: torch.Tensor, labels: torch.Tensor, targets: torch.Tensor) -> None:
        self.input_ids, self.labels, self.targets = input_ids, labels, targets

    def __len__(self) -> int:
        return len(self.input_ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "labels": self.labels[i]}


class FictitiousQA(LightningDataModule):
    """Question/answer pairs about fictitious people with TOFU's forget/retain/holdout splits.

    Args:
        num_entities: number of people (20 to 520; names are unique).
        forget_percent: percent of the people to forget: 1, 5 or 10, rounded down to whole people;
            1% needs at least 100 people (the forget set may not be empty).
        num_perturbed: perturbed (wrong) answers per question for the truth ratio (>= 1).
        exclude_forget: train without the forget people (the retain model of the oracle).
        batch_size: samples per batch.
        seed: seed of the people, the split and the shuffling.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        num_entities: int = 200,
        forget_percent: int = 5,
        num_perturbed: int = 3,
        exclude_forget: bool = False,
        batch_size: int = 32,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        check_int("num_entities", num_entities, low=20, high=len(NAMES))
        check_int("forget_percent", forget_percent)
        check_choice("forget_percent", forget_percent, FORGET_PERCENTS)
        if num_entities * forget_percent // 100 == 0:
            raise ValueError(
                f"`forget_percent`={forget_percent} of `num_entities`={num_entities} people is "
                f"{num_entities * forget_percent / 100:g} of a person: the forget set would be empty; use "
                f"num_entities >= {-(-100 // forget_percent)} for forget_percent={forget_percent}"
            )
        check_int("num_perturbed", num_perturbed, low=1, high=min(len(v) for v in VALUES.values()) - 1)
        check_bool("exclude_forget", exclude_forget)
        check_int("batch_size", batch_size, low=1)
        check_int("seed", seed)
        check_int("num_workers", num_workers, low=0)
        self.num_entities, self.forget_percent, self.num_perturbed = num_entities, forget_percent, num_perturbed
        self.exclude_forget, self.batch_size, self.seed, self.num_workers = (
            exclude_forget,
            batch_size,
            seed,
            num_workers,
        )
        words = sorted({w for t in TEMPLATES.values() for s in t for w in s.split() if w not in ("{n}", "{v}")})
        words += sorted(set(NAMES + [v for vs in VALUES.values() for v in vs]) - set(words))
        self.vocab: list[str] = list(SPECIALS) + words
        self.index = {w: i for i, w in enumerate(self.vocab)}
        lengths = [len(q.split()) + max(len(a.split()), len(p.split())) for q, a, p in TEMPLATES.values()]
        self.max_len = max(lengths) + 3  # <bos> <sep> <eos>
        self._people: dict[str, list[dict[str, str]]] | None = None
        self.train_set: QADataset | None = None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    @property
    def pad_id(self) -> int:
        return 0

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The words of ``ids`` (``<pad>`` dropped)."""
        return " ".join(self.vocab[int(i)] for i in ids if int(i) != self.pad_id)

    def setup(self, stage: str | None = None) -> None:
        if self._people is not None:
            return
        gen = torch.Generator().manual_seed(mix_seed(self.seed, 0, prime=7919))
        names = torch.randperm(len(NAMES), generator=gen)[: self.num_entities].tolist()
        people = []
        for k in names:
            person = {"name": NAMES[k]}
            for attribute, values in VALUES.items():
                person[attribute] = values[int(torch.randint(len(values), (1,), generator=gen))]
            people.append(person)
        n_forget = self.num_entities * self.forget_percent // 100  # >= 1, checked in __init__
        n_pool = self.num_entities * max(FORGET_PERCENTS) // 100  # never trained on, at any forget size
        trained = people[n_pool:]
        self._people = {
            "forget": trained[:n_forget],  # nested: the forget people of 1% are among those of 5% and 10%
            "holdout": people[:n_forget],
            "retain": trained[n_forget:],
        }
        if self.exclude_forget:
            trained = self._people["retain"]
        ids, labels = self._encode([self._pair(p, a, answer=1) for p in trained for a in TEMPLATES])
        forget = {p["name"] for p in self._people["forget"]}
        targets = torch.tensor([int(p["name"] in forget) for p in trained]).repeat_interleave(len(TEMPLATES))
        self.train_set = QADataset(ids, labels, targets)

    def people(self, split: Split) -> list[dict[str, str]]:
        """The people of ``split`` (each a dict: ``name`` and the seven attributes)."""
        check_choice("split", split, ("forget", "retain", "holdout"))
        self.setup()
        return self._people[split]

    def _pair(self, person: dict[str, str], attribute: str, answer: int, value: str | None = None) -> tuple[str, str]:
        question, *answers = TEMPLATES[attribute]
        v = person[attribute] if value is None else value
        return question.format(n=person["name"]), answers[answer - 1].format(n=person["name"], v=v)

    def _encode(self, pairs: list[tuple[str, str]]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(pairs), self.max_len), self.pad_id, dtype=torch.long)
        labels = torch.full_like(ids, IGNORE_INDEX)
        for row, (question, answer) in enumerate(pairs):
            prompt = ["<bos>", *question.split(), "<sep>"]
            target = [*answer.split(), "<eos>"]
            tokens = [self.index[w] for w in prompt + target]
            ids[row, : len(tokens)] = torch.tensor(tokens)
            labels[row, len(prompt) : len(tokens)] = torch.tensor(tokens[len(prompt) :])
        return ids, labels

    def question_answer(self, split: Split, kind: Literal["answer", "paraphrase", "perturbed"] = "answer") -> QADataset:
        """Every question about the people of ``split``, with the correct ``answer``, its
        ``paraphrase`` or, for ``perturbed``, ``num_perturbed`` wrong answers per question (sample
        ``i * num_perturbed + j`` is the j-th wrong answer to question ``i``), people in the order
        of :meth:`people`, attributes in a fixed order."""
        check_choice("kind", kind, ("answer", "paraphrase", "perturbed"))
        pairs = []
        for person in self.people(split):
            for attribute, values in VALUES.items():
                if kind != "perturbed":
                    pairs.append(self._pair(person, attribute, answer=1 if kind == "answer" else 2))
                    continue
                wrong = [v for v in values if v != person[attribute]]
                key = zlib.crc32(f"{person['name']}/{attribute}".encode())
                gen = torch.Generator().manual_seed(mix_seed(self.seed, key))
                for j in torch.randperm(len(wrong), generator=gen)[: self.num_perturbed].tolist():
                    pairs.append(self._pair(person, attribute, answer=1, value=wrong[j]))
        ids, labels = self._encode(pairs)
        return QADataset(ids, labels, torch.full((len(pairs),), int(split == "forget")))

    def evaluation_sets(self) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], dict[str, list[str]]]:
        """The ``data`` and ``texts`` of :func:`litplug.functional.unlearning_metrics.unlearning_suite`:
        forget and retain questions with their answers and perturbed answers, and the held-out
        questions; the answer texts of the forget and held-out questions.

        The truth ratio compares the perturbed answers with the correct answer in the same,
        trained phrasing: ``forget_paraphrase`` and ``retain_paraphrase`` hold the answers
        themselves, not :meth:`question_answer`'s paraphrases. TOFU scores a paraphrase against
        perturbed paraphrases, which measures knowledge where the model transfers facts across
        phrasings (a pretrained LLM); a network trained from scratch on this corpus does not (its
        target model's truth ratios on the paraphrase are those of the retain model), so the
        ratio is taken where the fact was learnt."""
        data = {}
        for split in ("forget", "retain"):
            answers = self.question_answer(split, "answer")
            perturbed = self.question_answer(split, "perturbed")
            data[split] = data[split + "_paraphrase"] = (answers.input_ids, answers.labels)
            data[split + "_perturbed"] = (perturbed.input_ids, perturbed.labels)
        holdout = self.question_answer("holdout")
        data["holdout"] = (holdout.input_ids, holdout.labels)
        texts = {k: [self.decode(row[row != IGNORE_INDEX]) for row in data[k][1]] for k in ("forget", "holdout")}
        return data, texts

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        sampler = EpochShuffle(len(dataset), self.seed) if shuffle else None
        # Training loaders are StatefulDataLoaders: Lightning saves their position in checkpoints.
        loader = StatefulDataLoader if shuffle else DataLoader
        return loader(dataset, batch_size=self.batch_size, sampler=sampler, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.question_answer("holdout"))

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.question_answer("holdout"))
