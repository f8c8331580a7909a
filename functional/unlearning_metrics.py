"""Unlearning metrics as the field computes them (TOFU, MUSE; the definitions of open-unlearning).

Every function takes what a causal LM returns and its labels: ``logits [B, T, V]`` and
``labels [B, T]`` aligned with ``input_ids`` (``labels[:, t]`` is the token at position ``t``;
``-100`` marks a position that is not scored, e.g. the question or padding). The shift is done
inside: position ``t``'s logits predict ``labels[:, t + 1]``.

Per-sample quantities (one value per row):

- :func:`answer_loss`: the mean NLL of the scored tokens (open-unlearning's ``avg_loss``: the
  summed NLL of the shifted labels over the number of scored labels);
- :func:`exact_memorization`: the fraction of scored tokens the model predicts by argmax;
- :func:`extraction_strength`: ``1 - k / n`` for the smallest ``k`` from which the rest of the
  answer is predicted exactly by argmax (Carlini et al. 2021, as in open-unlearning);
- membership scores (higher = looks less like training data): :func:`loss_score`,
  :func:`zlib_score` (loss over the zlib-compressed length of the text), :func:`min_k_score`
  (Min-K%: minus the mean of the lowest ``k`` fraction of token log-probabilities, Shi et al.
  2024), :func:`min_k_plus_plus_score` (Min-K%++: the same on log-probabilities standardised by
  the mean and variance of the vocabulary distribution, Zhang et al. 2024), :func:`reference_score`
  (the target's loss minus a reference model's).

As in open-unlearning, the token-wise scores (exact memorisation, extraction strength, Min-K%,
Min-K%++) leave out the last scored token (the end-of-sequence position); the losses include it.

Rows with nothing to score are refused with a ``ValueError`` naming ``labels`` and the rows, where
open-unlearning gives a value: a row scoring no token after the first position has no loss
(open-unlearning's ``avg_loss`` is 0/0 = NaN, which makes its mean probability NaN), and a row
scoring fewer than two has no token-wise position (open-unlearning marks its exact memorisation
``None`` and leaves it out of the mean, and scores extraction strength, Min-K% and Min-K%++ 0, i.e.
"not extracted" and "looks most like training data"). A value there would either change the mean
silently or bias it; the fix is in the data (score each answer's end-of-sequence token).

Aggregates: :func:`truth_ratio` (wrong over correct answer probability from length-normalised
losses, TOFU) with :func:`closer_to_one` and :func:`true_better`; :func:`forget_quality` (the KS-test
p-value between the truth ratios of the unlearned and the retain model on the forget split);
:func:`mia_auc` (forget vs held-out; 1 when forget data looks far more like training data);
:func:`privleak` (MUSE: ``((1 - auc) - (1 - auc_retain)) / (1 - auc_retain) * 100``, so a model
that leaks more than the retain model scores negative and the retain model scores 0);
:func:`model_utility` (the harmonic mean of utility values, TOFU).

Example:
    >>> import torch
    >>> logits = torch.zeros(1, 4, 5); logits[0, [0, 1, 2], [1, 2, 3]] = 10.0
    >>> labels = torch.tensor([[-100, 1, 2, 3]])
    >>> exact_memorization(logits, labels)
    tensor([1.])
    >>> answer_loss(logits, labels) < 0.01
    tensor([True])
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
EPS = 1e-10


def _shifted(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"`logits` must be [B, T, V] and `labels` [B, T] with the same B and T, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}"
        )
    return logits[:, :-1].float(), labels[:, 1:]


def _check_scored(labels: torch.Tensor, minimum: int, offset: int = 0) -> None:
    """Refuse rows of ``labels`` scoring fewer than ``minimum`` tokens after the first position (the
    first has no prediction); ``offset`` is added to the row numbers in the message."""
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(-1)
    bad = (counts < minimum).nonzero().flatten()
    if not len(bad):
        return
    rows = (bad[:8] + offset).tolist()
    rows_said = f"{rows}{f' and {len(bad) - 8} more' if len(bad) > 8 else ''}"
    if minimum == 1:
        raise ValueError(
            f"`labels` rows {rows_said} score no token after the first position (every label is -100), so they "
            "have no answer loss (it would be 0/0); score at least each answer's end-of-sequence token"
        )
    raise ValueError(
        f"`labels` rows {rows_said} score fewer than {minimum} tokens after the first position: the token-wise "
        "scores (exact memorisation, extraction strength, Min-K%, Min-K%++) leave the last scored token (the end "
        "of sequence) out, so these rows have none to score; end each answer's labels with its end-of-sequence token"
    )


def answer_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample mean NLL of the scored tokens ``[B]``: the summed NLL of the predicted positions
    over the number of scored labels (open-unlearning's ``avg_loss``). A row scoring no token after
    the first position raises ``ValueError`` (open-unlearning: NaN)."""
    shifted_logits, shifted = _shifted(logits, labels)
    _check_scored(labels, 1)
    nll = F.cross_entropy(shifted_logits.transpose(1, 2), shifted, ignore_index=IGNORE_INDEX, reduction="none")
    count = (labels != IGNORE_INDEX).sum(-1)
    return nll.sum(-1) / count


def _token_positions(labels: torch.Tensor) -> list[torch.Tensor]:
    """Per row, the shifted positions scored by the token-wise metrics (the last one left out)."""
    out = []
    for row in labels:
        scored = (row != IGNORE_INDEX).nonzero(as_tuple=True)[0][:-1]
        out.append(scored[scored > 0] - 1)
    return out


def _token_log_probs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    shifted_logits, shifted = _shifted(logits, labels)
    _check_scored(labels, 2)
    return shifted_logits.log_softmax(-1), _token_positions(labels)


def exact_memorization(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample fraction of scored tokens predicted by argmax ``[B]``, the last scored token left
    out. A row scoring fewer than two tokens after the first position raises ``ValueError``
    (open-unlearning: ``None``, left out of the mean)."""
    log_probs, positions = _token_log_probs(logits, labels)
    shifted = labels[:, 1:]
    out = [(log_probs[i, pos].argmax(-1) == shifted[i, pos]).double().mean() for i, pos in enumerate(positions)]
    return torch.stack(out).to(torch.float32) if out else torch.zeros(0)


def extraction_strength(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Per-sample ``1 - k / n``: ``k`` the first position from which every remaining scored token
    is the argmax prediction (``n`` if none is), ``n`` the number of scored tokens (the last left
    out). A row scoring fewer than two tokens after the first position raises ``ValueError``
    (open-unlearning: 0)."""
    log_probs, positions = _token_log_probs(logits, labels)
    shifted = labels[:, 1:]
    out = []
    for i, pos in enumerate(positions):
        n = len(pos)
        hit = (log_probs[i, pos].argmax(-1) == shifted[i, pos]).tolist()
        k = n - 1  # the last suffix is checked last; without a match k stays n - 1, as open-unlearning's loop
        for start in range(n):
            if all(hit[start:]):
                k = start
                break
        out.append(1.0 - k / n)
    return torch.tensor(out, dtype=torch.float32)


def loss_score(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """LOSS attack (Yeom et al. 2018): the per-sample :func:`answer_loss`."""
    return answer_loss(logits, labels)


def zlib_score(logits: torch.Tensor, labels: torch.Tensor, texts: Sequence[str]) -> torch.Tensor:
    """zlib attack (Carlini et al. 2021): the per-sample loss over ``len(zlib.compress(text))``."""
    if len(texts) != labels.shape[0]:
        raise ValueError(f"`texts` must hold one string per sample ({labels.shape[0]}), got {len(texts)}")
    sizes = torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts], dtype=torch.float32)
    return answer_loss(logits, labels) / sizes


def _bottom_k_mean(values: torch.Tensor, k: float) -> torch.Tensor:
    num = max(1, int(len(values) * k))
    return -values.double().sort().values[:num].mean()


def _check_k(k: float) -> None:
    if not 0 < k <= 1:
        raise ValueError(f"`k` must be in (0, 1], got {k!r}")


def min_k_score(logits: torch.Tensor, labels: torch.Tensor, k: float = 0.2) -> torch.Tensor:
    """Min-K% (Shi et al. 2024): minus the mean of the lowest ``k`` fraction (at least one) of the
    scored tokens' log-probabilities (the last left out). A row scoring fewer than two tokens after
    the first position raises ``ValueError`` (open-unlearning: 0)."""
    _check_k(k)
    log_probs, positions = _token_log_probs(logits, labels)
    shifted = labels[:, 1:]
    out = [
        _bottom_k_mean(log_probs[i, pos].gather(-1, shifted[i, pos, None]).squeeze(-1), k)
        for i, pos in enumerate(positions)
    ]
    return torch.stack(out).float()


def min_k_plus_plus_score(logits: torch.Tensor, labels: torch.Tensor, k: float = 0.2) -> torch.Tensor:
    """Min-K%++ (Zhang et al. 2024): Min-K% on ``(log p(x_t) - mu_t) / sigma_t``, with ``mu_t`` and
    ``sigma_t^2`` the mean and variance of the log-probability under the model's own next-token
    distribution (variance floored at 1e-6), the last scored token left out. A row scoring fewer
    than two tokens after the first position raises ``ValueError`` (open-unlearning: 0)."""
    _check_k(k)
    log_probs, positions = _token_log_probs(logits, labels)
    shifted = labels[:, 1:]
    out = []
    for i, pos in enumerate(positions):
        lp = log_probs[i, pos]
        p = lp.exp()
        mu = (p * lp).sum(-1)
        sigma = ((p * lp.square()).sum(-1) - mu.square()).clamp_min(1e-6).sqrt()
        target = lp.gather(-1, shifted[i, pos, None]).squeeze(-1)
        out.append(_bottom_k_mean((target - mu) / sigma, k))
    return torch.stack(out).float()


def reference_score(target_loss: torch.Tensor, reference_loss: torch.Tensor) -> torch.Tensor:
    """Reference-model attack (Carlini et al. 2022): the target's per-sample loss minus a reference
    model's (e.g. the retain model) on the same samples."""
    if target_loss.shape != reference_loss.shape:
        raise ValueError(f"`target_loss` {tuple(target_loss.shape)} and `reference_loss` "
                         f"{tuple(reference_loss.shape)} must have the same shape")  # fmt: skip
    return target_loss - reference_loss


def mia_auc(forget_scores: torch.Tensor, holdout_scores: torch.Tensor) -> float:
    """The area under the ROC curve separating forget (label 0) from held-out (label 1) samples by
    a membership score (higher = less like training data): 1 when every forget sample looks more
    like training data than every held-out one, 0.5 at chance (ties count half). A NaN score raises
    ``ValueError`` naming its argument (compared with nothing, it would count as neither below nor
    tied and move the area silently); +-inf are ordered as numbers."""
    f = torch.as_tensor(forget_scores).double().flatten()
    h = torch.as_tensor(holdout_scores).double().flatten()
    if len(f) == 0 or len(h) == 0:
        raise ValueError(f"`mia_auc` needs forget and held-out scores, got {len(f)} and {len(h)}")
    for name, scores in (("forget_scores", f), ("holdout_scores", h)):
        nan = int(scores.isnan().sum())
        if nan:
            raise ValueError(f"`{name}` holds {nan} NaN of {len(scores)} scores; an AUC needs ordered scores")
    below = (f[:, None] < h[None, :]).double().mean()
    ties = (f[:, None] == h[None, :]).double().mean()
    return float(below + 0.5 * ties)


def privleak(auc: float, retain_auc: float) -> float:
    """MUSE's privleak in percent: ``((1 - auc) - (1 - retain_auc)) / (1 - retain_auc) * 100``
    (open-unlearning's convention): 0 for the retain model, negative when the forget set is easier to
    recognise as trained on than for the retain model (under-unlearning), positive beyond it.

    The denominator is ``(1 - retain_auc) + 1e-10``, open-unlearning's epsilon, kept on purpose so the
    values compare with theirs: a retain model whose AUC is 1 gives ``privleak(0.5, 1.0) == 5e11``
    (no division by zero, and no cap), a huge value that says the reference has no room to leak.

    Example:
        >>> round(privleak(0.5, 1.0))
        500000000000
    """
    score, ref = 1.0 - auc, 1.0 - retain_auc
    return (score - ref) / (ref + EPS) * 100.0


def truth_ratio(correct_loss: torch.Tensor, wrong_loss: torch.Tensor) -> torch.Tensor:
    """TOFU's truth ratio per sample: ``exp(-wrong) / exp(-correct)``, with ``correct_loss`` the
    answer losses of the correct (paraphrased) answers ``[N]`` or ``[N, P]`` and ``wrong_loss`` those
    of the perturbed answers ``[N]`` or ``[N, K]``; several answers are averaged in loss first."""
    correct = torch.as_tensor(correct_loss).double()
    wrong = torch.as_tensor(wrong_loss).double()
    correct = correct.reshape(len(correct), -1).mean(-1)
    wrong = wrong.reshape(len(wrong), -1).mean(-1)
    if correct.shape != wrong.shape:
        raise ValueError(f"`correct_loss` and `wrong_loss` must have one row per sample, got {len(correct)} and "
                         f"{len(wrong)}")  # fmt: skip
    return torch.exp(-wrong) / (torch.exp(-correct) + EPS)


def closer_to_one(ratios: torch.Tensor) -> float:
    """Truth-ratio aggregate for forget data: ``mean(min(r, 1 / r))`` (1 = a wrong and the correct
    answer are equally likely)."""
    r = torch.as_tensor(ratios).double()
    return float(torch.minimum(r, 1.0 / (r + EPS)).mean())


def true_better(ratios: torch.Tensor) -> float:
    """Truth-ratio aggregate for retained data: ``mean(max(0, 1 - r))`` (1 = the correct answer is
    far likelier than the wrong ones)."""
    return float((1.0 - torch.as_tensor(ratios).double()).clamp_min(0).mean())


def forget_quality(unlearned_ratios: torch.Tensor, retain_ratios: torch.Tensor) -> float:
    """TOFU's forget quality: the p-value of the two-sample Kolmogorov-Smirnov test between the
    truth ratios of the unlearned model and of the retain model on the forget split (high: the two
    cannot be told apart)."""
    from scipy.stats import ks_2samp

    a = torch.as_tensor(unlearned_ratios).double().cpu().numpy()
    b = torch.as_tensor(retain_ratios).double().cpu().numpy()
    if len(a) == 0 or len(b) == 0:
        raise ValueError(f"`forget_quality` needs truth ratios of both models, got {len(a)} and {len(b)}")
    return float(ks_2samp(a, b).pvalue)


def model_utility(values: Sequence[float]) -> float:
    """TOFU's model utility: the harmonic mean of utility values in [0, 1] (0 if any is 0)."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0 or np.any(v < 0) or not np.all(np.isfinite(v)):
        raise ValueError(f"`model_utility` needs finite values >= 0, got {v.tolist()}")
    return 0.0 if np.any(v == 0) else float(len(v) / np.sum(1.0 / v))


STATISTICS = ("loss", "exact_memorization", "extraction_strength", "min_k", "min_k_plus_plus")
_STATISTIC_FUNCTIONS = {
    "loss": answer_loss,
    "exact_memorization": exact_memorization,
    "extraction_strength": extraction_strength,
    "min_k": min_k_score,
    "min_k_plus_plus": min_k_plus_plus_score,
}


@torch.no_grad()
def answer_statistics(
    model: Callable[[torch.Tensor], Any],
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    batch_size: int = 256,
    statistics: Sequence[str] = STATISTICS,
) -> dict[str, torch.Tensor]:
    """Run ``model`` (token ids -> logits, or an output with ``logits``) over ``input_ids`` in
    batches and return the per-sample ``statistics`` (any of ``loss``, ``exact_memorization``,
    ``extraction_strength``, ``min_k`` and ``min_k_plus_plus`` with k = 0.2; all by default) on CPU,
    in sample order."""
    unknown = [k for k in statistics if k not in STATISTICS]
    if unknown:
        raise ValueError(f"`statistics` must be among {list(STATISTICS)}, got {unknown}")
    if labels.dim() == 2:
        _check_scored(labels, 2 if any(k != "loss" for k in statistics) else 1)
    out: dict[str, list[torch.Tensor]] = {k: [] for k in statistics}
    device = next((p.device for p in getattr(model, "parameters", list)()), torch.device("cpu"))
    for start in range(0, len(input_ids), batch_size):
        output = model(input_ids[start : start + batch_size].to(device))
        logits = (output if isinstance(output, torch.Tensor) else output.logits).cpu()
        lab = labels[start : start + batch_size].cpu()
        for k in statistics:
            out[k].append(_STATISTIC_FUNCTIONS[k](logits, lab))
    return {k: torch.cat(v) if v else torch.zeros(0) for k, v in out.items()}


SUITE_SETS = ("forget", "forget_paraphrase", "forget_perturbed", "retain", "retain_paraphrase", "retain_perturbed",
              "holdout")  # fmt: skip
_TOKEN_SETS = ("forget", "holdout")  # the sets whose token-wise statistics the suite reads; elsewhere the loss


def _check_sets(data: Mapping[str, Any]) -> None:
    missing = [k for k in SUITE_SETS if k not in data]
    if missing:
        raise ValueError(f"`data` lacks {missing}; it needs {list(SUITE_SETS)}")


def suite_statistics(
    model: Callable[[torch.Tensor], Any], data: Mapping[str, tuple[torch.Tensor, torch.Tensor]], batch_size: int = 256
) -> dict[str, dict[str, torch.Tensor]]:
    """The per-sample statistics of ``model`` that :func:`suite_from_statistics` reads, per set of
    ``data`` (see :func:`unlearning_suite`): every statistic on ``forget`` and ``holdout``, the loss
    on the others. A set held in the same tensors as another (e.g. ``forget_paraphrase`` when it is
    ``forget``) is run once. Compute it once for a model that does not change (the retain model)."""
    _check_sets(data)
    needs: dict[tuple[int, int], set[str]] = {}
    for k in SUITE_SETS:
        key = (id(data[k][0]), id(data[k][1]))
        needs.setdefault(key, set()).update(STATISTICS if k in _TOKEN_SETS else ("loss",))
    runs: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    out = {}
    for k in SUITE_SETS:
        key = (id(data[k][0]), id(data[k][1]))
        if key not in runs:
            wanted = [s for s in STATISTICS if s in needs[key]]
            runs[key] = answer_statistics(model, *data[k], batch_size=batch_size, statistics=wanted)
        out[k] = runs[key]
    return out


def _auc(forget_scores: torch.Tensor, holdout_scores: torch.Tensor) -> float:
    """:func:`mia_auc`, NaN when a score is NaN (a model whose outputs are NaN has no AUC)."""
    if torch.as_tensor(forget_scores).isnan().any() or torch.as_tensor(holdout_scores).isnan().any():
        return float("nan")
    return mia_auc(forget_scores, holdout_scores)


def _utility(values: Sequence[float]) -> float:
    """:func:`model_utility`, NaN when a value is NaN."""
    return float("nan") if any(math.isnan(v) for v in values) else model_utility(values)


def suite_from_statistics(
    model_statistics: Mapping[str, Mapping[str, torch.Tensor]],
    retain_statistics: Mapping[str, Mapping[str, torch.Tensor]],
    texts: Mapping[str, Sequence[str]],
) -> dict[str, float]:
    """:func:`unlearning_suite` from the :func:`suite_statistics` of the model and of the retain
    model. A model with NaN statistics (one that diverged) gets NaN where they enter (membership
    AUCs, privleak, model utility, ...) rather than a refusal, so a run that diverges logs NaN and
    goes on."""
    stats = {(who, k): s[k] for who, s in (("model", model_statistics), ("retain", retain_statistics)) for k in s}
    _check_sets(model_statistics)
    _check_sets(retain_statistics)

    def ratios(who: str, split: str) -> torch.Tensor:
        correct = stats[who, f"{split}_paraphrase"]["loss"]
        return truth_ratio(correct, stats[who, f"{split}_perturbed"]["loss"].view(len(correct), -1))

    forget_tr, retain_tr = ratios("model", "forget"), ratios("model", "retain")
    retain_prob = float(torch.exp(-stats["model", "retain"]["loss"]).mean())
    report = {
        "forget_quality": forget_quality(forget_tr, ratios("retain", "forget")),
        "forget_truth_ratio": closer_to_one(forget_tr),
        "forget_em": float(stats["model", "forget"]["exact_memorization"].mean()),
        "forget_es": float(stats["model", "forget"]["extraction_strength"].mean()),
        "forget_prob": float(torch.exp(-stats["model", "forget"]["loss"]).mean()),
        "retain_truth_ratio": true_better(retain_tr),
        "retain_prob": retain_prob,
        "model_utility": _utility([retain_prob, true_better(retain_tr)]),
    }
    sizes = {k: torch.tensor([len(zlib.compress(t.encode("utf-8"))) for t in texts[k]]) for k in ("forget", "holdout")}
    for who, prefix in (("model", "mia"), ("retain", "retain_mia")):
        f, h = stats[who, "forget"], stats[who, "holdout"]
        report[f"{prefix}_loss"] = _auc(f["loss"], h["loss"])
        report[f"{prefix}_min_k"] = _auc(f["min_k"], h["min_k"])
        report[f"{prefix}_min_k_plus_plus"] = _auc(f["min_k_plus_plus"], h["min_k_plus_plus"])
        report[f"{prefix}_zlib"] = _auc(f["loss"] / sizes["forget"], h["loss"] / sizes["holdout"])
    report["mia_reference"] = _auc(
        reference_score(stats["model", "forget"]["loss"], stats["retain", "forget"]["loss"]),
        reference_score(stats["model", "holdout"]["loss"], stats["retain", "holdout"]["loss"]),
    )
    report["privleak"] = privleak(report["mia_min_k"], report["retain_mia_min_k"])
    return report


def unlearning_suite(
    model: Callable[[torch.Tensor], Any],
    retain_model: Callable[[torch.Tensor], Any],
    data: Mapping[str, tuple[torch.Tensor, torch.Tensor]],
    texts: Mapping[str, Sequence[str]],
    batch_size: int = 256,
) -> dict[str, float]:
    """The whole evaluation of an unlearned ``model`` against the ``retain_model`` (trained without
    the forget data), as TOFU/MUSE/open-unlearning report it.

    ``data`` maps each of ``SUITE_SETS`` to ``(input_ids, labels)``: the forget questions with their
    answers, paraphrased answers and perturbed answers (``forget_perturbed`` holds ``K`` rows per
    question, question-major), the same for retained data, and the held-out questions (never trained
    on). ``texts`` maps ``forget`` and ``holdout`` to the answer texts (for the zlib attack).

    Returns ``forget_quality``, ``forget_truth_ratio`` (closer-to-one aggregate), ``forget_em``,
    ``forget_es``, ``forget_prob`` (mean ``exp(-loss)``), ``retain_truth_ratio`` (true-better),
    ``retain_prob``, ``model_utility`` (harmonic mean of retain prob and retain truth ratio),
    ``mia_<attack>`` AUCs (forget vs held-out) for ``loss``, ``zlib``, ``min_k``, ``min_k_plus_plus``
    and ``reference`` (the retain model as the reference), and ``privleak`` (Min-K% AUC against the
    retain model's). Both models are evaluated; :func:`suite_statistics` and
    :func:`suite_from_statistics` split the two steps, so the retain model's statistics can be
    computed once for many models.
    """
    _check_sets(data)
    return suite_from_statistics(
        suite_statistics(model, data, batch_size), suite_statistics(retain_model, data, batch_size), texts
    )


@torch.no_grad()
def classifier_losses(
    model: Callable[[torch.Tensor], Any], batches: Iterable[Any]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample cross-entropy and correctness of ``model`` (inputs -> class logits) over
    ``(inputs, targets)`` batches, on CPU in batch order (inputs moved to the model's device and
    floating dtype)."""
    losses, correct = [], []
    first = next(iter(getattr(model, "parameters", list)()), None)
    device = first.device if first is not None else torch.device("cpu")
    dtype = first.dtype if first is not None and first.is_floating_point() else None
    for x, y, *_ in batches:
        output = model(x.to(device=device, dtype=dtype if x.is_floating_point() else None))
        logits = (output if isinstance(output, torch.Tensor) else output.logits).float().cpu()
        losses.append(F.cross_entropy(logits, y.cpu(), reduction="none"))
        correct.append((logits.argmax(-1) == y.cpu()).float())
    return (torch.cat(losses), torch.cat(correct)) if losses else (torch.zeros(0), torch.zeros(0))


def classifier_suite(
    model: Callable[[torch.Tensor], Any],
    retain_model: Callable[[torch.Tensor], Any],
    forget: Iterable[Any],
    retain: Iterable[Any],
    holdout: Iterable[Any],
) -> dict[str, float]:
    """The suite for a classifier, in the same language as :func:`unlearning_suite`: the
    per-sample loss takes the place of the truth ratio.

    Returns ``forget_quality`` (KS-test p-value between the per-sample losses of the model and of
    the retain model on the forget set), ``forget_acc``, ``retain_acc``, ``holdout_acc`` (in
    [0, 1]), ``mia_loss`` and ``retain_mia_loss`` (the LOSS attack's AUC, forget vs held-out, for
    each model) and ``privleak`` (of ``mia_loss`` against ``retain_mia_loss``). ``forget``,
    ``retain`` and ``holdout`` are iterables of ``(inputs, targets)`` batches (re-iterated once per
    model)."""
    out: dict[str, float] = {}
    stats = {}
    for who, m in (("model", model), ("retain", retain_model)):
        for name, batches in (("forget", forget), ("retain", retain), ("holdout", holdout)):
            stats[who, name] = classifier_losses(m, batches)
    for name in ("forget", "retain", "holdout"):
        out[f"{name}_acc"] = float(stats["model", name][1].mean()) if len(stats["model", name][1]) else float("nan")
    out["forget_quality"] = forget_quality(stats["model", "forget"][0], stats["retain", "forget"][0])
    out["mia_loss"] = _auc(stats["model", "forget"][0], stats["model", "holdout"][0])
    out["retain_mia_loss"] = _auc(stats["retain", "forget"][0], stats["retain", "holdout"][0])
    out["privleak"] = privleak(out["mia_loss"], out["retain_mia_loss"])
    return out
