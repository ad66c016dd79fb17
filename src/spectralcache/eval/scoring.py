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
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Sequence

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
