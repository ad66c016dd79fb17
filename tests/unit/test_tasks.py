"""Task generators on the real Gemma 3 270M tokenizer: length, determinism, placement."""

from __future__ import annotations

import gzip
import json
import math
import re
import time

import pytest

from spectralcache.eval import haystack as hs
from spectralcache.eval import tasks as T
from spectralcache.eval.tasks import (
    SAMPLE_KEYS,
    TASKS,
    generate_samples,
    read_task_file,
    stored_task_file,
    task_file_stem,
    verify_sample,
    write_task_file,
)

REQUIRED = [
    "niah_single_1",
    "niah_single_1_plural",
    "niah_multikey_1",
    "niah_multikey_3",
    "niah_multivalue",
    "niah_multiquery",
    "vt",
    "cwe",
    "fwe",
]
# uuid needles are ~60 tokens each: 2% of 1K is finer than one unit, so they start at 2K
LENGTH_FOR = {name: (2048 if name == "niah_multikey_3" else 1024) for name in TASKS}
NIAH = [n for n, t in TASKS.items() if isinstance(t, T.NiahTask)]


def test_registry_has_the_tasks_of_the_issue():
    for name in REQUIRED:
        assert name in TASKS
    for name, task in TASKS.items():
        assert task.name == name
        assert task.metric in T.METRICS
        assert task.max_new_tokens > 0


@pytest.fixture(scope="module")
def generated(gemma_tokenizer):
    """Three samples per task (seed 0) plus a second run, so tests share the work."""
    out = {}
    for name in TASKS:
        a = generate_samples(name, tokenizer=gemma_tokenizer, length=LENGTH_FOR[name], num_samples=3, seed=0)
        b = generate_samples(name, tokenizer=gemma_tokenizer, length=LENGTH_FOR[name], num_samples=3, seed=0)
        c = generate_samples(name, tokenizer=gemma_tokenizer, length=LENGTH_FOR[name], num_samples=3, seed=1)
        out[name] = (a, b, c)
    return out


@pytest.mark.parametrize("name", list(TASKS))
def test_length_fields_and_invariants(name, generated, gemma_tokenizer):
    samples, _, _ = generated[name]
    assert len(samples) == 3
    for s in samples:
        assert set(SAMPLE_KEYS) <= set(s)
        json.dumps(s)  # JSON-serialisable
        prompt = s["context"] + s["question"] + s["answer_prefix"]
        n = len(gemma_tokenizer(prompt).input_ids)
        assert n == s["prompt_tokens"]
        assert abs(n - s["target_length"]) <= 0.02 * s["target_length"], (n, s["target_length"])
        assert s["context_tokens"] == len(gemma_tokenizer(s["context"]).input_ids)
        assert s["task"] == name and s["seed"] == 0
        verify_sample(s)
    assert len({s["id"] for s in samples}) == 3


@pytest.mark.parametrize("name", list(TASKS))
def test_deterministic_and_seed_dependent(name, generated):
    a, b, c = generated[name]
    assert a == b
    for x, y in zip(a, c):
        assert x["context"] != y["context"]
        assert x["answers"] != y["answers"]
    # samples within one run differ too
    assert len({s["context"] for s in a}) == 3


@pytest.mark.parametrize("name", [n for n in TASKS if n != "cwe"])
def test_context_is_question_free(name, generated):
    for s in generated[name][0]:
        assert s["question"].strip() not in s["context"]
        for a in s["answers"]:
            assert a not in s["question"] and a not in s["answer_prefix"]


def test_cwe_question_only_in_its_worked_example(generated):
    # RULER's cwe prompt carries one solved example; its question is the fixed generic one
    for s in generated["cwe"][0]:
        assert s["context"].count(s["question"].strip()) == 1
        example_end = s["context"].index(s["question"].strip())
        for a in s["answers"]:
            assert a not in s["context"][:example_end]


@pytest.mark.parametrize("name", NIAH)
def test_niah_answers_exactly_once_and_needle_text(name, generated):
    for s in generated[name][0]:
        for a in s["answers"]:
            assert s["context"].count(a) == 1
            kind = TASKS[name].value_type
            assert re.search(rf"One of the special magic {kind} for \S+ is: {re.escape(a)}\.", s["context"])


def test_ruler_singular_rewrite_and_plural_variant(generated):
    ruler = generated["niah_single_1"][0][0]
    plural = generated["niah_single_1_plural"][0][0]
    assert ruler["context"].startswith("A special magic number is hidden within the following text.")
    assert ruler["question"].startswith("\nWhat is the special magic number for ")
    assert ruler["answer_prefix"].endswith("mentioned in the provided text is")
    assert plural["context"].startswith("Some special magic numbers are hidden within the following text.")
    assert plural["question"].startswith("\nWhat are all the special magic numbers for ")
    assert plural["answer_prefix"].endswith("mentioned in the provided text are")
    # same needle, same haystack: only the phrasing differs
    assert ruler["answers"] == plural["answers"]
    assert ruler["context"].split("\n", 1)[1] == plural["context"].split("\n", 1)[1]
    multi = generated["niah_multivalue"][0][0]
    assert multi["context"].startswith("Some special magic numbers are hidden")
    assert len(multi["answers"]) == 4


def test_noise_haystack_is_rulers_sentence(generated):
    s = generated["niah_single_1"][0][0]
    lines = s["context"].split("\n")[1:]
    needles = [ln for ln in lines if ln != hs.NOISE]
    assert len(needles) == 1 and needles[0].startswith("One of the special magic numbers for ")
    assert len(lines) > 30


def test_multikey_distractors(generated):
    s = generated["niah_multikey_1"][0][0]
    assert s["context"].count("One of the special magic numbers for ") == 4
    s = generated["niah_multikey_3"][0][0]
    uuid = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"
    lines = s["context"].split("\n")[1:]
    assert all(re.fullmatch(rf"One of the special magic uuids for {uuid} is: {uuid}\.", ln) for ln in lines)
    query = s["question"].split(" for ")[1].split(" mentioned")[0]
    assert s["context"].count(query) == 1


def test_multiquery_asks_for_four_keys(generated):
    s = generated["niah_multiquery"][0][0]
    assert len(s["answers"]) == 4 and ", and " in s["question"]
    assert s["source"].startswith("pydoc_data.topics")


def test_vt_chain_resolves_to_the_answers(generated):
    for s in generated["vt"][0]:
        ctx = s["context"]
        main = ctx[ctx.rindex(T.VariableTrackingTask.INSTR) :]
        assign = dict(re.findall(r"VAR ([A-Z]+) = (VAR [A-Z]+|\d+)", main))
        value = s["answer_prefix"].split("the value ")[1].split(",")[0]

        def resolve(v, assign=assign):
            rhs = assign[v]
            return resolve(rhs[4:]) if rhs.startswith("VAR ") else rhs

        holders = sorted(v for v in assign if resolve(v) == value)
        assert holders == sorted(s["answers"])
        # the worked example is a different chain with its answer written out
        assert " ".join(s["example_answers"]) in ctx


def test_cwe_and_fwe_counts(generated):
    s = generated["cwe"][0][0]
    assert (s["freq_common"], s["freq_uncommon"]) == (6, 1)  # RULER's short-context setting
    s = generated["fwe"][0][0]
    words = s["context"][len(T.FrequentWordsTask.INSTR) :].split()
    counts = {w: words.count(w) for w in set(words)}
    ranked = sorted(counts, key=counts.get, reverse=True)
    assert ranked[0] == "..." and ranked[1:4] == s["answers"]


def test_cwe_uses_rulers_long_frequencies(gemma_tokenizer):
    (s,) = generate_samples("cwe", tokenizer=gemma_tokenizer, length=4096, num_samples=1, seed=3)
    assert (s["freq_common"], s["freq_uncommon"]) == (30, 3)
    verify_sample(s)


def test_depth_controls_needle_position(gemma_tokenizer):
    for depth in (0.0, 0.25, 0.5, 1.0):
        (s,) = generate_samples(
            "niah_single_1", tokenizer=gemma_tokenizer, length=2048, num_samples=1, seed=5, depth=depth
        )
        assert abs(s["depth"] - depth) < 0.02
        pos = s["context"].index(s["answers"][0]) / len(s["context"])
        assert abs(pos - depth) < 0.05, (depth, pos)
        assert s["id"].endswith(f"-d{depth:g}")


def test_same_needle_across_lengths_and_depths(gemma_tokenizer):
    a = generate_samples("niah_multikey_1", tokenizer=gemma_tokenizer, length=1024, num_samples=2, seed=9)
    b = generate_samples(
        "niah_multikey_1", tokenizer=gemma_tokenizer, length=2048, num_samples=2, seed=9, depth=0.5
    )
    assert [s["answers"] for s in a] == [s["answers"] for s in b]
    assert [s["question"] for s in a] == [s["question"] for s in b]


def test_fit_matches_exhaustive_search(gemma_tokenizer):
    """The secant/bisection fit is as good as trying every size (up to its early stop)."""
    count = T.token_counter(gemma_tokenizer)
    for name, target in (("niah_single_1", 700), ("fwe", 600), ("niah_single_2", 400)):
        task = TASKS[name]
        key = task.rng_key(4, 0)
        _, n_fit, tok_fit, _ = T._fit(task, key, target, None, count, None)
        best = None
        for n in range(task.min_units, 3 * n_fit // 2 + 2):
            t = count(task.draft(key, n, None, target).prompt)
            cand = (abs(t - target), t > target, n)
            best = cand if best is None or cand < best else best
        # the fit stops early once within max(2 tokens, 0.25%); otherwise it is the optimum
        assert abs(tok_fit - target) <= max(best[0], T._good_enough(target)), (name, n_fit, best)
        if abs(tok_fit - target) > T._good_enough(target):
            assert abs(tok_fit - target) == best[0]


def test_twenty_samples_at_8k_take_seconds(gemma_tokenizer):
    t0 = time.perf_counter()
    s = generate_samples("niah_single_1", tokenizer=gemma_tokenizer, length=8192, num_samples=20, seed=0)
    dt = time.perf_counter() - t0
    assert len(s) == 20 and dt < 20, dt


def test_jsonl_roundtrip(generated, tmp_path):
    samples = generated["niah_single_1"][0] + generated["vt"][0]
    path = write_task_file(tmp_path / "sub" / "tasks.jsonl", samples)
    assert read_task_file(path) == samples
    assert len(path.read_text().splitlines()) == len(samples)


def test_gzipped_task_files_read_as_the_plain_ones(generated, tmp_path):
    """Published results keep task files as ``<stem>.jsonl.gz``: written reproducibly (the same
    bytes twice), read back equal, and found under the plain name when only the gzip exists."""
    samples = generated["niah_single_1"][0] + generated["vt"][0]
    plain = tmp_path / "tasks" / "niah_single_1_4096.jsonl"
    packed = write_task_file(tmp_path / "tasks" / "niah_single_1_4096.jsonl.gz", samples)
    first = packed.read_bytes()
    assert gzip.decompress(first).decode("utf-8").count("\n") == len(samples)
    assert write_task_file(packed, samples).read_bytes() == first  # no time in the header
    assert read_task_file(packed) == samples
    assert stored_task_file(plain) == packed and read_task_file(plain) == samples
    assert task_file_stem(packed) == task_file_stem(plain) == "niah_single_1_4096"
    write_task_file(plain, samples[:1])  # a plain file, where one exists, is the one read
    assert stored_task_file(plain) == plain and len(read_task_file(plain)) == 1
    with pytest.raises(FileNotFoundError):
        read_task_file(tmp_path / "tasks" / "missing.jsonl")


def test_read_task_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: sample lacks keys"):
        read_task_file(bad)
    bad.write_text("\n{not json\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        read_task_file(bad)
    with pytest.raises(ValueError, match="lacks keys"):
        write_task_file(tmp_path / "x.jsonl", [{"id": "a"}])


def test_verify_sample_catches_broken_samples(generated):
    s = dict(generated["niah_single_1"][0][0])
    s["context"] = s["context"] + " " + s["answers"][0]
    with pytest.raises(ValueError, match="occurs 2 times"):
        verify_sample(s)
    s = dict(generated["vt"][0][0])
    s["answers"] = [*s["answers"][:-1], "ZZZZZ"]
    with pytest.raises(ValueError, match="assigned 0 times"):
        verify_sample(s)
    s = dict(generated["fwe"][0][0])
    s["answers"] = [*s["answers"][:2], "qqqqqq"]
    with pytest.raises(ValueError, match="three most frequent"):
        verify_sample(s)
    s = dict(generated["cwe"][0][0])
    del s["metric"]
    with pytest.raises(ValueError, match="lacks keys"):
        verify_sample(s)


def test_invalid_arguments(gemma_tokenizer):
    kw = {"tokenizer": gemma_tokenizer, "num_samples": 1, "seed": 0}
    with pytest.raises(ValueError, match=r"unknown task 'niah_single_9'.*known tasks: niah_single_1"):
        generate_samples("niah_single_9", length=1024, **kw)
    with pytest.raises(ValueError, match="too short"):
        generate_samples("niah_single_1", length=20, **kw)
    with pytest.raises(ValueError, match="too coarse"):
        generate_samples("niah_multikey_3", length=300, **kw)
    with pytest.raises(TypeError, match="length must be an int"):
        generate_samples("niah_single_1", length=1024.0, **kw)
    with pytest.raises(ValueError, match="length must be >= 1"):
        generate_samples("niah_single_1", length=0, **kw)
    with pytest.raises(ValueError, match=r"depth must be in \[0, 1\]"):
        generate_samples("niah_single_1", length=1024, depth=1.5, **kw)
    with pytest.raises(ValueError, match="takes no depth"):
        generate_samples("cwe", length=1024, depth=0.5, **kw)
    with pytest.raises(ValueError, match="num_samples must be >= 0"):
        generate_samples("vt", length=1024, tokenizer=gemma_tokenizer, num_samples=-1, seed=0)
    with pytest.raises(TypeError, match="tokenizer must be"):
        generate_samples("vt", length=1024, tokenizer="gemma", num_samples=1, seed=0)
    with pytest.raises(TypeError, match="task must be a task name"):
        generate_samples(3, length=1024, **kw)
    assert generate_samples("vt", length=1024, tokenizer=gemma_tokenizer, num_samples=0, seed=0) == []


def test_haystack_sources():
    assert math.isclose(T._zeta(2.0), math.pi**2 / 6, rel_tol=1e-9)
    pw = hs.pseudo_words(500)
    assert len(set(pw)) == 500 and hs.pseudo_words(10) == pw[:10]
    pool = hs.word_pool(600)
    assert len(set(pool)) == 600 and pool[: len(hs.english_words())] == list(hs.english_words())
    groups = hs.prose_words(7, 250)
    assert sum(len(g) for g in groups) == 250
    assert " ".join(groups[0]) == hs.prose_sentences()[7]
    assert hs.prose_source().startswith("pydoc_data.topics (Python 3.")
    import random

    words = hs.coded_words(random.Random(0), 300)
    assert len(set(words)) == 300 and all(len(w) == 6 and w.isalpha() for w in words)
