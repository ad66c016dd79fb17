"""The scorer against RULER's definitions (scripts/eval/synthetic/constants.py, evaluate.py)."""

from __future__ import annotations

import math
import random
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralcache.eval.scoring import (
    METRICS,
    aggregate,
    paired_comparison,
    postprocess_prediction,
    score,
    score_sample,
    sign_test_p,
    string_match_all,
    string_match_part,
)


# RULER's list-level formulas, transcribed as the reference the per-sample scorer must match
def ruler_all(preds, refs):
    return round(
        sum(
            sum(1.0 if r.lower() in p.lower() else 0.0 for r in ref) / len(ref) for p, ref in zip(preds, refs)
        )
        / len(preds)
        * 100,
        2,
    )


def ruler_part(preds, refs):
    return round(
        sum(max(1.0 if r.lower() in p.lower() else 0.0 for r in ref) for p, ref in zip(preds, refs))
        / len(preds)
        * 100,
        2,
    )


def ruler_postprocess(s):
    s = s.strip()
    return re.sub(r"[\x00-\x1f]", "\n", s).strip()


def test_string_match_all_cases():
    assert string_match_all("The special magic number is 1234567.", ["1234567"]) == 1.0
    assert string_match_all("1234567 and 7654321", ["1234567", "7654321"]) == 1.0
    assert string_match_all("only 1234567", ["1234567", "7654321"]) == 0.5
    assert string_match_all("GTZQG CYGWL", ["GTZQG", "CYGWL", "UHULX", "QDLUC"]) == 0.5
    assert string_match_all("", ["1234567"]) == 0.0
    assert string_match_all("123456", ["1234567"]) == 0.0  # a prefix is not a match
    assert string_match_all("Tidy-Shovel", ["tidy-SHOVEL"]) == 1.0  # case-insensitive both ways
    assert string_match_all("x12345678x", ["1234567"]) == 1.0  # substring, as in RULER


def test_string_match_part_cases():
    assert string_match_part("Paris is the capital", ["paris", "Lyon"]) == 1.0
    assert string_match_part("Marseille", ["paris", "Lyon"]) == 0.0
    assert string_match_part("LYON and PARIS", ["paris", "Lyon"]) == 1.0


def test_postprocess_like_ruler():
    assert postprocess_prediction("  1234567\n") == "1234567"
    assert postprocess_prediction("a\tb\x00c\x1fd") == "a\nb\nc\nd"
    assert postprocess_prediction("\x07 ok \x07") == "ok"
    assert postprocess_prediction("é ü 数字 \x7f") == "é ü 数字 \x7f"  # only \x00-\x1f are touched


def test_score_applies_postprocessing_and_metric():
    assert score("string_match_all", " 1234\t567 ", ["1234567"]) == 0.0  # tab -> newline splits it
    assert score("string_match_all", " 1234567\n", ["1234567", "42"]) == 0.5
    assert score("string_match_part", "\n42", ["1234567", "42"]) == 1.0
    sample = {"metric": "string_match_all", "answers": ["ABC", "DEF"]}
    assert score_sample(sample, "abc def") == 1.0
    assert set(METRICS) == {"string_match_all", "string_match_part"}


def test_bad_inputs():
    with pytest.raises(ValueError, match="unknown metric 'exact'"):
        score("exact", "x", ["x"])
    with pytest.raises(ValueError, match="must not be empty"):
        string_match_all("x", [])
    with pytest.raises(TypeError, match="list of str"):
        string_match_all("x", "x")
    with pytest.raises(TypeError, match="every answer must be a str"):
        string_match_part("x", [1])
    with pytest.raises(TypeError, match="prediction must be a str"):
        score("string_match_all", None, ["x"])
    with pytest.raises(ValueError, match="empty"):
        aggregate([])
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        aggregate([0.5, 1.5])


text = st.text(alphabet=st.sampled_from("abAB12 \n\t\x00-"), max_size=12)
refs = st.lists(st.text(alphabet=st.sampled_from("abAB12-"), min_size=1, max_size=3), min_size=1, max_size=4)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(text, refs), min_size=1, max_size=6))
def test_matches_ruler_on_random_cases(cases):
    raw = [p for p, _ in cases]
    answers = [r for _, r in cases]
    preds = [ruler_postprocess(p) for p in raw]
    assert aggregate(score("string_match_all", p, r) for p, r in zip(raw, answers)) == ruler_all(
        preds, answers
    )
    assert aggregate(score("string_match_part", p, r) for p, r in zip(raw, answers)) == ruler_part(
        preds, answers
    )
    for p in raw:
        assert postprocess_prediction(p) == ruler_postprocess(p)


# ------------------------------------------------------------------ paired comparison
def _brute_sign_p(wins: int, losses: int) -> float:
    m = wins + losses
    if m == 0:
        return 1.0
    gap = abs(wins - losses)
    hits = sum(math.comb(m, k) for k in range(m + 1) if abs(k - (m - k)) >= gap)
    return min(1.0, hits / 2.0**m)


@given(st.integers(0, 40), st.integers(0, 40))
def test_sign_test_matches_enumeration(wins, losses):
    assert sign_test_p(wins, losses) == pytest.approx(_brute_sign_p(wins, losses), rel=1e-12)
    assert sign_test_p(wins, losses) == sign_test_p(losses, wins)


def test_sign_test_known_values():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(0, 2) == 0.5
    assert sign_test_p(5, 0) == 0.0625
    with pytest.raises(ValueError, match="wins and losses"):
        sign_test_p(-1, 2)


def test_paired_comparison_worked_example():
    # 30 samples, the method loses 2 the reference answers and wins none (the default's 4K
    # multikey cell of stop 19): Agresti-Min by hand, centre (0.5 - 2.5) / 32, half-width
    # 1.96 * sqrt(3 - 4 / 32) / 32
    method = [1] * 22 + [0, 0] + [0] * 6
    reference = [1] * 22 + [1, 1] + [0] * 6
    c = paired_comparison(method, reference)
    assert (c.n, c.wins, c.losses) == (30, 0, 2)
    assert c.method == pytest.approx(100 * 22 / 30) and c.reference == pytest.approx(80.0)
    assert c.difference == pytest.approx(-100 * 2 / 30)
    centre, half = -2 / 32, 1.959963984540054 * math.sqrt(3 - 4 / 32) / 32
    assert c.ci_low == pytest.approx(100 * (centre - half))
    assert c.ci_high == pytest.approx(100 * (centre + half))
    assert c.p_value == 0.5


@given(st.lists(st.tuples(st.sampled_from([0.0, 1.0]), st.sampled_from([0.0, 1.0])), min_size=1, max_size=60))
def test_paired_comparison_is_antisymmetric(pairs):
    a, b = [x for x, _ in pairs], [y for _, y in pairs]
    ab, ba = paired_comparison(a, b), paired_comparison(b, a)
    assert ab.difference == pytest.approx(-ba.difference, abs=1e-9)
    assert ab.ci_low == pytest.approx(-ba.ci_high, abs=1e-9)
    assert (ab.wins, ab.losses) == (ba.losses, ba.wins)
    assert ab.p_value == ba.p_value
    assert ab.ci_low <= ab.ci_high
    # identical answers: no evidence either way, yet a real interval (Agresti-Min never collapses)
    same = paired_comparison(a, a)
    assert same.difference == 0 and same.p_value == 1.0 and same.ci_low < 0 < same.ci_high


def test_paired_comparison_fractional_scores_use_the_normal_interval():
    a, b = [1.0, 0.5, 0.25, 1.0], [0.5, 0.5, 0.75, 0.0]
    d = [0.5, 0.0, -0.5, 1.0]
    mean = sum(d) / 4
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 3)
    c = paired_comparison(a, b)
    assert (c.wins, c.losses) == (2, 1)
    assert c.difference == pytest.approx(100 * mean)
    assert c.ci_low == pytest.approx(100 * (mean - 1.959963984540054 * sd / 2))
    assert c.ci_high == pytest.approx(100 * (mean + 1.959963984540054 * sd / 2))


def test_paired_interval_covers_the_true_difference():
    # simulated paired binary outcomes with a known difference of -5 points at n = 30: the 95 %
    # interval must contain it in close to 95 % of draws
    rng = random.Random(0)
    trials, hits = 2000, 0
    for _ in range(trials):
        a, b = [], []
        for _ in range(30):
            u = rng.random()  # cells: both right .70, only reference .10, only method .05, none .15
            a.append(1 if u < 0.70 or 0.80 <= u < 0.85 else 0)
            b.append(1 if u < 0.80 else 0)
        c = paired_comparison(a, b)
        hits += c.ci_low <= -5.0 <= c.ci_high
    # (measured: 0.967; the plain Wald interval 0.923, a variance off by 2x 0.64)
    assert 0.935 <= hits / trials <= 0.985


def test_paired_comparison_refuses_bad_input():
    with pytest.raises(ValueError, match="equal lengths"):
        paired_comparison([1, 0], [1])
    with pytest.raises(ValueError, match="empty"):
        paired_comparison([], [])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        paired_comparison([1.5], [1])
