"""The scorer against RULER's definitions (scripts/eval/synthetic/constants.py, evaluate.py)."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from spectralcache.eval.scoring import (
    METRICS,
    aggregate,
    postprocess_prediction,
    score,
    score_sample,
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
