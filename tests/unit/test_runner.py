"""Runner, method parsing and measured KV bytes, on tiny random-weight models.

The task generator needs a real tokenizer (target lengths are counted in its tokens), so
these tests use the session's Gemma tokenizer with a tiny random Gemma 3 whose
vocabulary matches it. Answers are then gibberish, which is fine: what is tested is the
bookkeeping (resume, pairing, determinism, bytes, ratios, error rows).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from spectralcache.eval import runner
from spectralcache.eval.methods import (
    Method,
    full_attention_layers,
    kv_bytes_by_layer,
    measure_kv_bytes,
    parse_methods,
    with_baseline_first,
)
from spectralcache.eval.runner import RunOptions, read_rows, run_eval

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tiny_models import tiny_config

VOCAB = 262144  # Gemma 3's tokenizer


def _tiny(name: str, **kw) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config(name, **kw)).eval()


@pytest.fixture(scope="module")
def tiny_gemma():
    return _tiny("gemma3", vocab_size=VOCAB, hidden_size=32, intermediate_size=64)


# ------------------------------------------------------------------ method parsing
def test_parse_methods_examples():
    ms = parse_methods(
        "baseline,spectral:default,spectral:rank_keys=16,rank_values=32,quantized:int4,streaming:sinks=4,window=1024"
    )
    assert [m.kind for m in ms] == ["baseline", "spectral", "spectral", "quantized", "streaming"]
    assert ms[2].preset == "default" and ms[2].options == {"rank_keys": 16, "rank_values": 32}
    assert ms[2].name == "spectral:default,rank_keys=16,rank_values=32"
    assert ms[4].options == {"sinks": 4, "window": 1024}
    assert len({m.slug for m in ms}) == len(ms)
    assert all("/" not in m.slug and ":" not in m.slug for m in ms)
    # a list of strings is joined
    assert [m.name for m in parse_methods(["baseline", "spectral:aggressive"])] == [
        "baseline",
        "spectral:aggressive",
    ]


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("frobnicate", "unknown method kind"),
        ("spectral:nope", "unknown SpectralConfig preset"),
        ("spectral:rank_kyes=3", "rank_kyes"),
        ("spectral:rank_keys=0", "rank_keys"),
        ("quantized", "bit width"),
        ("quantized:int3", "unknown preset"),
        ("quantized:int4,bits=4", "unknown option"),
        ("streaming:sinks=4", "window"),
        ("streaming:window=-5", "positive integer"),
        ("baseline,,spectral", "empty method"),
        ("window=5", "cannot parse"),
        ("baseline,baseline", "given twice"),
        ("spectral:default,hot_size=3,hot_size=4", "given twice"),
        ("baseline:fast", "unknown preset"),
        ("", "empty method"),
    ],
)
def test_parse_methods_errors(spec, needle):
    with pytest.raises(ValueError, match=needle):
        parse_methods(spec)


def test_parse_methods_type_error():
    with pytest.raises(TypeError):
        parse_methods(42)  # type: ignore[arg-type]


def test_baseline_always_first():
    ms = with_baseline_first(parse_methods("spectral:default,baseline,streaming:window=8"))
    assert [m.name for m in ms] == ["baseline", "spectral:default", "streaming:window=8"]
    assert with_baseline_first(parse_methods("spectral:default"))[0].is_baseline


# ------------------------------------------------------------------ measured bytes
@torch.inference_mode()
def test_dynamic_cache_bytes_equal_kv_nbytes():
    model = _tiny("llama")
    cache = DynamicCache(config=model.config)
    ids = torch.randint(3, 200, (2, 37))
    model(input_ids=ids, past_key_values=cache, use_cache=True)
    model(input_ids=ids[:, :1], past_key_values=cache, use_cache=True)
    expect = sum(lay_.keys.nbytes + lay_.values.nbytes for lay_ in cache.layers)
    assert expect == 2 * len(cache.layers) * 2 * 2 * 38 * 32 * 4  # 2 tensors, B, H_kv, T, D, fp32
    assert measure_kv_bytes(cache) == expect
    assert kv_bytes_by_layer(cache) == [lay_.keys.nbytes + lay_.values.nbytes for lay_ in cache.layers]


@torch.inference_mode()
def test_bytes_count_storages_not_views_and_shared_once():
    model = _tiny("gemma3", vocab_size=256)
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.randint(3, 200, (1, 100)), past_key_values=cache, use_cache=True)
    sliding = [lay_ for lay_ in cache.layers if getattr(lay_, "is_sliding", False)]
    assert sliding
    # Right after a 100-token prefill the sliding layer keeps a 63-token *view* of the whole
    # prefill: the whole storage is still allocated, so it is what we charge.
    lay = sliding[0]
    assert lay.keys.shape[-2] == model.config.sliding_window - 1
    assert kv_bytes_by_layer(cache)[0] >= 2 * 100 * 64 * 4 > lay.keys.nbytes + lay.values.nbytes
    # after one decode step the storage is only window + 1 tokens again
    model(input_ids=torch.tensor([[5]]), past_key_values=cache, use_cache=True)
    per = kv_bytes_by_layer(cache)
    storage0 = lay.keys.untyped_storage().nbytes() + lay.values.untyped_storage().nbytes()
    assert lay.keys.untyped_storage().nbytes() == model.config.sliding_window * 64 * 4
    assert per[0] == storage0 + lay._sliding_window_tensor.untyped_storage().nbytes()
    # a storage shared by two layers is counted once
    cache.layers[1].keys = cache.layers[0].keys
    assert measure_kv_bytes(cache) == sum(kv_bytes_by_layer(cache))
    assert kv_bytes_by_layer(cache)[1] == cache.layers[1].values.untyped_storage().nbytes()
    assert full_attention_layers(model.config) == [1, 3]


@torch.inference_mode()
def test_spectral_bytes_come_from_memory_report(tiny_gemma):
    pytest.importorskip("spectralcache.cache.cache")
    m = parse_methods(
        "spectral:default,block_size=32,rank_keys=8,rank_values=8,landmarks=4,hot_size=8,outliers_per_block=2"
    )[0]
    cache = m.make_cache(tiny_gemma)
    tiny_gemma(input_ids=torch.randint(3, 5000, (1, 200)), past_key_values=cache, use_cache=True)
    report = cache.memory_report()
    assert measure_kv_bytes(cache) == report["all_layers"]["held_bytes"] > 0


# ------------------------------------------------------------------ rows io
def test_read_rows_drops_and_repairs_partial_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text(json.dumps({"id": "a"}) + "\n" + '{"id": "b", "predi')
    assert [r["id"] for r in read_rows(p)] == ["a"]
    assert p.read_text().endswith('"predi')  # untouched without repair
    assert [r["id"] for r in read_rows(p, repair=True)] == ["a"]
    assert p.read_text() == json.dumps({"id": "a"}) + "\n"
    p.write_text("not json\n")
    with pytest.raises(ValueError, match="not a JSON row"):
        read_rows(p)


# ------------------------------------------------------------------ the run
def _opts(out: Path, samples: int) -> RunOptions:
    return RunOptions(out=out, samples=samples, seed=3, progress=False, max_new_tokens=4)


def _rows(out: Path, slug: str, stem: str) -> dict[str, dict]:
    return runner.latest_rows(read_rows(runner.predictions_path(out, slug, stem)))


_VOLATILE = ("prefill_s", "question_s", "decode_s")


def _stable(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in _VOLATILE}


def test_run_resume_pairing_and_determinism(tiny_gemma, gemma_tokenizer, tmp_path, monkeypatch):
    methods = parse_methods("streaming:sinks=2,window=32")
    calls: list[str] = []
    real_answer = runner.answer

    def counting_answer(*a, **kw):
        calls.append("x")
        return real_answer(*a, **kw)

    monkeypatch.setattr(runner, "answer", counting_answer)
    out = tmp_path / "run"
    summaries = run_eval(
        ["niah_single_1"], [400], methods, _opts(out, 2), model=tiny_gemma, tokenizer=gemma_tokenizer
    )
    stem = "niah_single_1_400"
    assert len(calls) == 4  # 2 samples x (baseline + streaming)
    base = _rows(out, "baseline", stem)
    stream = _rows(out, methods[0].slug, stem)
    assert base.keys() == stream.keys() and len(base) == 2
    for sid, r in stream.items():
        assert r["error"] is None and r["kv_bytes"] > 0
        assert r["baseline_kv_bytes"] == base[sid]["kv_bytes"]
        assert r["compression_ratio"] == pytest.approx(base[sid]["kv_bytes"] / r["kv_bytes"])
        assert r["compression_ratio"] > 1.0  # 400 tokens vs a 2 + 32 window on the full layers
        assert base[sid]["compression_ratio"] == 1.0
    assert {s["method"] for s in summaries} == {"baseline", methods[0].name}
    assert json.loads((out / "summary.json").read_text()) == summaries
    assert "| niah_single_1 | 400 |" in (out / "summary.md").read_text()

    # rerun: nothing to do
    calls.clear()
    run_eval(["niah_single_1"], [400], methods, _opts(out, 2), model=tiny_gemma, tokenizer=gemma_tokenizer)
    assert calls == []

    # a killed run: last row half-written -> only that sample is redone, with identical output
    p = runner.predictions_path(out, methods[0].slug, stem)
    lines = p.read_text().splitlines(keepends=True)
    p.write_text(lines[0] + lines[1][: len(lines[1]) // 2])
    calls.clear()
    run_eval(["niah_single_1"], [400], methods, _opts(out, 2), model=tiny_gemma, tokenizer=gemma_tokenizer)
    assert len(calls) == 1
    again = _rows(out, methods[0].slug, stem)
    assert {k: _stable(v) for k, v in again.items()} == {k: _stable(v) for k, v in stream.items()}

    # more samples than the task file holds is a clear error, not a silent regeneration
    with pytest.raises(ValueError, match="holds 2 samples"):
        run_eval(
            ["niah_single_1"], [400], methods, _opts(out, 3), model=tiny_gemma, tokenizer=gemma_tokenizer
        )


def test_a_gzipped_task_file_is_run_and_summarized_as_the_plain_one(tiny_gemma, gemma_tokenizer, tmp_path):
    """A published folder holds ``tasks/<stem>.jsonl.gz`` only: a rerun reuses it (nothing is
    regenerated), writes predictions under the plain stem, and the summary finds the file."""
    from spectralcache.eval.tasks import read_task_file, write_task_file

    methods = parse_methods("streaming:sinks=2,window=32")
    plain_dir, packed_dir = tmp_path / "plain", tmp_path / "packed"
    run_eval(
        ["niah_single_1"], [400], methods, _opts(plain_dir, 2), model=tiny_gemma, tokenizer=gemma_tokenizer
    )
    stem = "niah_single_1_400"
    samples = read_task_file(plain_dir / "tasks" / f"{stem}.jsonl")
    write_task_file(packed_dir / "tasks" / f"{stem}.jsonl.gz", samples)
    summaries = run_eval(
        ["niah_single_1"], [400], methods, RunOptions(out=packed_dir, samples=2, seed=99, progress=False, max_new_tokens=4),
        model=tiny_gemma, tokenizer=gemma_tokenizer,
    )  # fmt: skip
    assert not (packed_dir / "tasks" / f"{stem}.jsonl").exists()  # seed 99 would have made other samples
    for slug in ("baseline", methods[0].slug):
        a, b = _rows(plain_dir, slug, stem), _rows(packed_dir, slug, stem)
        # the rows record the run's --seed (99 here); everything else is the same samples' answers
        assert {k: {**_stable(v), "seed": 3} for k, v in b.items()} == {k: _stable(v) for k, v in a.items()}
    assert {(s["method"], s["n"]) for s in summaries} == {("baseline", 2), (methods[0].name, 2)}


def test_failing_method_is_recorded_then_retried(tiny_gemma, gemma_tokenizer, tmp_path):
    pytest.importorskip("spectralcache.cache.cache")
    bad = Method(
        name="spectral:lowrank,rank_keys=999", kind="spectral", preset="lowrank", options={"rank_keys": 999}
    )
    out = tmp_path / "run"
    run_eval(["niah_single_1"], [400], [bad], _opts(out, 1), model=tiny_gemma, tokenizer=gemma_tokenizer)
    rows = read_rows(runner.predictions_path(out, bad.slug, "niah_single_1_400"))
    assert len(rows) == 1 and rows[0]["error"] and "rank" in rows[0]["error"] and rows[0]["score"] is None
    summ = json.loads((out / "predictions" / bad.slug / "niah_single_1_400.summary.json").read_text())
    assert summ["n"] == 0 and summ["n_errors"] == 1 and summ["first_error"] == rows[0]["error"]
    # the error row does not count as finished: a rerun tries again (and fails again)
    run_eval(["niah_single_1"], [400], [bad], _opts(out, 1), model=tiny_gemma, tokenizer=gemma_tokenizer)
    assert len(read_rows(runner.predictions_path(out, bad.slug, "niah_single_1_400"))) == 2


def test_unknown_task_and_bad_samples(tiny_gemma, gemma_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        run_eval(["nope"], [400], [], _opts(tmp_path, 1), model=tiny_gemma, tokenizer=gemma_tokenizer)
    with pytest.raises(ValueError, match="samples"):
        run_eval(["vt"], [400], [], _opts(tmp_path, 0), model=tiny_gemma, tokenizer=gemma_tokenizer)
    with pytest.raises(ValueError, match="depth"):
        runner.task_stem("niah_single_1", 1024, 1.5)


@torch.inference_mode()
def test_answer_protocol_matches_generate(tiny_gemma, gemma_tokenizer):
    """The runner's prefill + question + greedy loop equals transformers' generate on the
    concatenated prompt (the reference path), token for token."""
    tok = gemma_tokenizer
    context, question = "The grass is green. " * 30 + "The key is 12345.", " What is the key? Answer:"
    a = runner.answer(tiny_gemma, tok, None, context, question, max_new_tokens=6, stop_newline=False)
    ids = torch.cat(
        [
            tok(context, return_tensors="pt").input_ids,
            tok(question, return_tensors="pt", add_special_tokens=False).input_ids,
        ],
        dim=1,
    )
    ref = tiny_gemma.generate(
        ids, max_new_tokens=6, do_sample=False, eos_token_id=list(runner.eos_ids(tiny_gemma, tok))
    )
    ref_text = tok.decode(ref[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert a.text == ref_text
    assert a.context_tokens == tok(context, return_tensors="pt").input_ids.shape[1]
    # chunked prefill through a DynamicCache is the same computation
    b = runner.answer(
        tiny_gemma, tok, None, context, question, max_new_tokens=6, stop_newline=False, prefill_chunk=37
    )
    assert b.text == a.text
    # so is the one-call protocol (context and question in one forward)
    c = runner.answer(
        tiny_gemma, tok, None, context, question, max_new_tokens=6, stop_newline=False, one_call=True
    )
    assert c.text == a.text and c.question_s == 0.0 and c.context_tokens == a.context_tokens
    with pytest.raises(ValueError, match=r"one_call.*prefill_chunk"):
        runner.answer(
            tiny_gemma, tok, None, context, question, max_new_tokens=6, one_call=True, prefill_chunk=37
        )


def test_peer_rows_are_rescored_and_keep_their_own_baseline(gemma_tokenizer, tmp_path):
    """A peer driver (benchmarks/peers) writes rows in the documented format into
    DIR/predictions/<slug>/<stem>.jsonl; summarize() re-scores them from the task file and
    uses the baseline the peer measured in its own environment."""
    from spectralcache.eval.tasks import generate_samples, write_task_file

    samples = generate_samples("niah_single_1", tokenizer=gemma_tokenizer, length=400, num_samples=2, seed=1)
    stem = "niah_single_1_400"
    write_task_file(runner.task_path(tmp_path, "niah_single_1", 400), samples)
    rows = [
        {"id": samples[0]["id"], "method": "kvpress:snapkv,ratio=0.5", "prediction": f"it is {samples[0]['answers'][0]}.",
         "kv_bytes": 100, "kv_bytes_full": 10, "baseline_kv_bytes": 300, "baseline_kv_bytes_full": 40,
         "score": 0.0, "error": None},
        {"id": samples[1]["id"], "method": "kvpress:snapkv,ratio=0.5", "prediction": "no idea",
         "kv_bytes": 100, "kv_bytes_full": 10, "baseline_kv_bytes": 200, "baseline_kv_bytes_full": 20, "error": None},
    ]  # fmt: skip
    for r in rows:
        runner.append_row(runner.predictions_path(tmp_path, "kvpress-snapkv_ratio=0.5", stem), r)
    (summary,) = runner.summarize(tmp_path)
    assert summary["method"] == "kvpress:snapkv,ratio=0.5" and summary["n"] == 2
    assert summary["score"] == pytest.approx(50.0)  # the peer's own "score": 0.0 is not trusted
    assert summary["compression_ratio"] == pytest.approx(2.5) and summary[
        "compression_ratio_full"
    ] == pytest.approx(3.0)
    with pytest.raises(ValueError, match="unknown sample id"):
        runner.append_row(runner.predictions_path(tmp_path, "x", stem), dict(rows[0], id="nope"))
        runner.summarize(tmp_path)
