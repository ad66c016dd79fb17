"""RULER's scoring, per sample: case-insensitive substring match of the reference answers.

Definitions follow RULER (``scripts/eval/synthetic/constants.py`` and
``scripts/eval/evaluate.py``); RULER computes them over a list of predictions and
reports ``round(100 * mean, 2)``; here they act on one prediction and return a fraction
in [0, 1], and :func:`aggregate` gives RULER's percentage over many samples:

* ``string_match_all``: the fraction of references contained in the prediction
  (``sum(r.lower() in pred.lower() for r in refs) / len(refs)``) — niah, vt, cwe, fwe.
* ``string_match_part``: 1 if any reference is contained, else 0 (``max``) — QA tasks.
* Before matching, a prediction is post-processed like RULER's ``postprocess_pred``:
  strip, replace every control character ``\\x00-\\x1f`` (newline and tab included) by a
  newline, strip again. Matching is on the whole decoded continuation; nothing is cut
  at the first newline, exactly as RULER does.

Every method and peer (kvpress in its own venv) is scored by this module on the same
task files, so a difference in scores is a difference in predictions.

:func:`paired_comparison` reads two methods' scores on the *same* samples the way a paired
design allows: at 30 samples one answer is 3.3 points, so a bar such as "within 2 points of the
plain cache" needs the samples each side won and lost and an interval on the difference, not two
accuracies side by side.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

_CONTROL = re.compile(r"[\x00-\x1f]")


def postprocess_prediction(prediction: str) -> str:
    """RULER's ``postprocess_pred``: strip, control characters -> newline, strip."""
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    return _CONTROL.sub("\n", prediction.strip()).strip()


def _check_answers(answers: Sequence[str]) -> list[str]:
    if isinstance(answers, str) or not isinstance(answers, Sequence):
        raise TypeError(f"answers must be a list of str, got {type(answers).__name__}")
    if len(answers) == 0:
        raise ValueError("answers must not be empty")
    for a in answers:
        if not isinstance(a, str):
            raise TypeError(f"every answer must be a str, got {type(a).__name__}")
    return list(answers)


def string_match_all(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of ``answers`` found (case-insensitively) as substrings of ``prediction``."""
    refs = _check_answers(answers)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    pred = prediction.lower()
    return sum(1.0 if r.lower() in pred else 0.0 for r in refs) / len(refs)


def string_match_part(prediction: str, answers: Sequence[str]) -> float:
    """1.0 if any of ``answers`` is (case-insensitively) a substring of ``prediction``."""
    refs = _check_answers(answers)
    if not isinstance(prediction, str):
        raise TypeError(f"prediction must be a str, got {type(prediction).__name__}")
    pred = prediction.lower()
    return max(1.0 if r.lower() in pred else 0.0 for r in refs)


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}


def score(metric: str, prediction: str, answers: Sequence[str]) -> float:
    """Score one raw model continuation: RULER post-processing, then ``metric``."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; expected one of {sorted(METRICS)}")
    return METRICS[metric](postprocess_prediction(prediction), answers)


def score_sample(sample: dict, prediction: str) -> float:
    """Score a prediction against a task sample dict (uses its ``metric`` and ``answers``)."""
    return score(sample["metric"], prediction, sample["answers"])


def aggregate(scores: Iterable[float]) -> float:
    """RULER's task score: ``round(100 * mean, 2)`` over per-sample scores."""
    values = list(scores)
    if not values:
        raise ValueError("cannot aggregate an empty list of scores")
    for v in values:
        if not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"per-sample scores must be in [0, 1], got {v!r}")
    return round(100.0 * sum(values) / len(values), 2)


_Z95 = 1.959963984540054  # standard normal 97.5 % quantile


@dataclass(frozen=True)
class PairedComparison:
    """A method against a reference (the plain cache) on the same ``n`` samples; points are
    percentage points of RULER's score.

    ``difference`` = method mean - reference mean; ``ci_low`` / ``ci_high`` its 95 % interval;
    ``wins`` / ``losses`` the samples the method scored above / below the reference; ``p_value``
    the two-sided exact sign test of wins against losses (McNemar's exact test when scores are
    0 / 1): how often a method no better or worse than the reference would split its discordant
    samples at least this unevenly."""

    n: int
    method: float
    reference: float
    difference: float
    ci_low: float
    ci_high: float
    wins: int
    losses: int
    p_value: float


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: ``P(|W - L| >= |wins - losses|)`` for ``W + L = wins + losses``
    fair coin flips (1.0 when there is no discordant sample)."""
    if wins < 0 or losses < 0:
        raise ValueError(f"wins and losses must be >= 0, got {wins}, {losses}")
    m = wins + losses
    if m == 0:
        return 1.0
    tail = sum(math.comb(m, k) for k in range(min(wins, losses) + 1)) / 2.0**m
    return min(1.0, 2.0 * tail)


def paired_comparison(method_scores: Sequence[float], reference_scores: Sequence[float]) -> PairedComparison:
    """Compare per-sample scores in [0, 1] of a method and a reference, sample ``i`` with sample ``i``.

    Interval: with every score 0 or 1, Agresti and Min's (2005) adjusted Wald interval for a
    difference of paired proportions (half a pseudo-sample added to each discordant cell: the plain
    Wald interval collapses to a point when no sample is discordant, and undercovers at small n);
    otherwise the normal interval on the mean per-sample difference."""
    a, b = list(method_scores), list(reference_scores)
    if len(a) != len(b):
        raise ValueError(f"paired scores need equal lengths, got {len(a)} and {len(b)}")
    if not a:
        raise ValueError("cannot compare empty score lists")
    for v in (*a, *b):
        if not isinstance(v, (int, float)) or math.isnan(v) or not 0.0 <= v <= 1.0:
            raise ValueError(f"per-sample scores must be in [0, 1], got {v!r}")
    n = len(a)
    diffs = [x - y for x, y in zip(a, b)]
    wins = sum(d > 0 for d in diffs)
    losses = sum(d < 0 for d in diffs)
    mean = sum(diffs) / n
    if all(v in (0, 1) for v in (*a, *b)):
        w, lo_, nn = wins + 0.5, losses + 0.5, n + 2
        centre = (w - lo_) / nn
        half = _Z95 * math.sqrt(max((w + lo_) - (w - lo_) ** 2 / nn, 0.0)) / nn
    else:
        centre = mean
        var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
        half = _Z95 * math.sqrt(var / n)
    return PairedComparison(
        n=n,
        method=100.0 * sum(a) / n,
        reference=100.0 * sum(b) / n,
        difference=100.0 * mean,
        ci_low=100.0 * max(centre - half, -1.0),
        ci_high=100.0 * min(centre + half, 1.0),
        wins=wins,
        losses=losses,
        p_value=sign_test_p(wins, losses),
    )
