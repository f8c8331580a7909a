"""litplug.functional.soup: the uniform soup is the mean, the greedy soup keeps only strict improvements."""

import torch

from litplug.functional import greedy_soup, uniform_soup


def test_uniform_soup_is_the_mean_and_copies_integers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(7)}
    soup = uniform_soup([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0])) and soup["n"] == 3


def test_greedy_soup_adds_only_strict_improvements():
    target = torch.tensor([1.0, 1.0])
    states = [{"w": torch.tensor(v)} for v in ([0.0, 2.0], [2.0, 0.0], [5.0, 5.0], [0.0, 2.0])]
    score = lambda s: -float((s["w"] - target).norm())  # noqa: E731
    soup, kept, scores = greedy_soup(states, score)
    assert kept == [0, 1]  # [0,2] (first of the tied best), then [2,0] averages to the target
    assert torch.equal(soup["w"], target)
    assert scores[2] < scores[0]  # [5, 5] is never added: it would make the soup worse
    _, kept_min, _ = greedy_soup(states, lambda s: -score(s), maximize=False)
    assert kept_min == [0, 1]
    trials = []
    greedy_soup(states, score, on_trial=lambda i, s, kept: trials.append((i, round(s, 4), kept)))
    # in the order tried (ties in index order): the best alone, then each candidate soup's score
    assert trials == [(0, -1.4142, True), (1, 0.0, True), (3, -0.4714, False), (2, -1.8856, False)]
