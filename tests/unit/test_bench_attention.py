"""``spectralcache bench attention`` on tiny shapes (CPU): JSON schema, finite results, every
method ran or says why not, and the harness's handling of a kernel that is right, wrong or raising."""

from __future__ import annotations

import json
import math

import pytest
import torch

from spectralcache.attention.reference import spectral_attention
from spectralcache.bench import attention as bench
from spectralcache.cli import main

SMALL = ["--device", "cpu", "--q-heads", "4", "--kv-heads", "2", "--head-dim", "64", "--repeats", "2",
         "--step-repeats", "2", "--presets", "default,aggressive"]  # fmt: skip


def _run(tmp_path, *extra: str) -> dict:
    rc = main(["bench", "attention", *SMALL, "--out", str(tmp_path), "--tag", "t", *extra])
    assert rc == 0
    return json.loads((tmp_path / "bench_attention_t.json").read_text())


def test_bench_attention_json_schema_and_finite_results(tmp_path):
    data = _run(tmp_path, "--contexts", "1100", "--batches", "1,2")
    meta = data["meta"]
    for key in ("command", "date_utc", "torch", "device", "device_name", "copy_bandwidth", "shape", "dtype"):
        assert meta[key] not in (None, ""), key
    assert meta["copy_bandwidth"]["copy_checked"] and meta["copy_bandwidth"]["gbps"] > 0
    rows = data["results"]
    # per batch: sdpa (eager, graphed) + 5 spectral methods x 2 presets
    assert len(rows) == 2 * (2 + 5 * 2)
    for r in rows:
        assert r["context"] == 1100 and r["batch"] in (1, 2)
        if r["method"] in bench.GRAPHED:  # CUDA graphs: n/a on the CPU, saying so
            assert r["status"] == "n/a" and "CUDA" in r["reason"] and "median_ms" not in r
            continue
        if r["method"] in ("kernel", "dispatch") and r["status"] == "n/a":
            # no CUDA here (or no Triton / no attend()): the column says why, the run goes on
            assert r["reason"]
            continue
        if r["method"] in ("kernel", "dispatch"):  # ran (Triton interpreter / torch fallback)
            assert r["rel_err_vs_torch"] < 2e-2
        assert r["status"] == "ok", r
        assert math.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert r["p20_ms"] <= r["median_ms"] <= r["p80_ms"]
        assert r["bytes_read"] > 0 and math.isfinite(r["gbps"]) and r["gbps"] > 0
        if r["method"] != "sdpa":
            # the compressed state reads fewer bytes than dense K/V
            assert r["byte_ratio"] > 1 and r["held_bytes"] > 0 and r["num_blocks"] >= 1
            assert r["bytes_read"] == r["bytes_read_by_tensor"]["total"]
            assert r["speedup_vs_sdpa"] > 0
    by = {(r["batch"], r.get("preset"), r["method"]): r for r in rows}
    for b in (1, 2):
        dense = by[(b, None, "sdpa")]["bytes_read"]
        assert dense == 2 * b * 2 * 1100 * 64 * 4  # K+V, float32
        for preset in ("default", "aggressive"):
            r = by[(b, preset, "torch")]
            assert r["byte_ratio"] == pytest.approx(dense / r["bytes_read"])
    assert by[(1, "default", "step")]["out_finite"]
    assert (tmp_path / "bench_attention_t.png").stat().st_size > 1000
    table = bench.markdown(data).splitlines()
    assert table[2].startswith("| 1100, 1 | ") and table[3].startswith("| 1100, 2 | ") and "GB/s" in table[2]
    assert table[-1].startswith("Compressing one layer") and "default" in table[-1]


def test_state_bytes_and_clone_state_match_the_layer_state():
    case = bench.build_case("default", 1, 1300, 4, 2, 64, torch.float32, torch.device("cpu"), seed=3)
    sizes = bench.state_bytes(case.state)
    st = case.state
    assert (
        sizes["hot_keys"] == st.hot_keys.numel() * 4
        and sizes["cold.key_coeffs"] == st.cold.key_coeffs.numel()
    )
    assert sizes["total"] == sum(v for k, v in sizes.items() if k != "total")
    copy = bench.clone_state(st)
    assert copy.cold.key_coeffs.data_ptr() != st.cold.key_coeffs.data_ptr()
    assert torch.equal(copy.cold.key_coeffs, st.cold.key_coeffs) and copy.seq_len == st.seq_len == 1300
    # the decode token is the state's current chunk: attention reads it exactly
    assert st.chunk_keys is not None and st.chunk_keys.shape[-2] == 1 and st.chunk_start == 1299
    a = spectral_attention(case.query, st, None)
    b = spectral_attention(case.query, copy, None)
    assert torch.equal(a, b) and torch.isfinite(a).all()


def test_clone_state_keeps_every_tensors_layout():
    """The copies the bench rotates through must be laid out as the cache's own state: 1300 tokens
    give compress_tail blocks of 607 tokens, whose tokens-contiguous value rows are padded to 608 (a
    view that skips memory, which ``Tensor.clone`` would make contiguous)."""
    case = bench.build_case("default", 2, 1300, 4, 2, 64, torch.float32, torch.device("cpu"), seed=3)
    st = case.state
    vc = st.cold.value_coeffs
    assert vc.shape[-2] % 16 and vc.stride(-2) == 1 and vc.stride(-1) % 16 == 0  # padded rows
    copy = bench.clone_state(st)
    pairs = list(zip(bench._tensors(st), bench._tensors(copy)))
    assert len(pairs) > 10
    for (name, x), (name2, y) in pairs:
        assert name == name2 and y.stride() == x.stride() and torch.equal(x, y), name
        assert x.numel() == 0 or y.untyped_storage().data_ptr() != x.untyped_storage().data_ptr(), name


@pytest.mark.parametrize("behaviour", ["right", "wrong", "raises"])
def test_kernel_column_right_wrong_or_raising(tmp_path, monkeypatch, behaviour):
    def kernel(query, state, mask, scaling, softcap):
        if behaviour == "raises":
            raise NotImplementedError("mode not supported yet")
        out = spectral_attention(query, state, mask, scaling=scaling, softcap=softcap)
        return out if behaviour == "right" else out + 1.0

    monkeypatch.setattr(bench, "load_kernel", lambda: (kernel, ""))
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the harness call a kernel on CPU
    data = _run(tmp_path, "--contexts", "900", "--batches", "1", "--presets", "default",
                "--methods", "torch,kernel", "--no-plot")  # fmt: skip
    row = next(r for r in data["results"] if r["method"] == "kernel")
    if behaviour == "right":
        assert row["status"] == "ok" and row["rel_err_vs_torch"] < 1e-6 and row["median_ms"] > 0
    elif behaviour == "wrong":
        assert (
            row["status"] == "wrong" and row["rel_err_vs_torch"] > 0.02 and "relative error" in row["reason"]
        )
    else:
        assert row["status"] == "n/a" and "mode not supported yet" in row["reason"]


def test_bench_attention_bad_arguments_are_clear(tmp_path):
    with pytest.raises(SystemExit, match="unknown method"):
        _run(tmp_path, "--contexts", "600", "--methods", "sdpa,nope")
    with pytest.raises(SystemExit, match="bad context"):
        _run(tmp_path, "--contexts", "4x")
    with pytest.raises(SystemExit, match="multiple of"):
        main(
            [
                "bench",
                "attention",
                "--device",
                "cpu",
                "--q-heads",
                "6",
                "--kv-heads",
                "4",
                "--out",
                str(tmp_path),
            ]
        )
    with pytest.raises(SystemExit, match="post-RoPE"):
        _run(tmp_path, "--contexts", "600", "--presets", "pre_rope")


def test_graph_column_alone_loads_the_kernel(tmp_path, monkeypatch):
    """``--methods sdpa_graph,kernel_graph`` (without ``kernel``) still loads the kernel: its rows say
    why they did not run (no CUDA here), never "not requested"."""
    calls = []
    real = bench.load_kernel
    monkeypatch.setattr(bench, "load_kernel", lambda: calls.append(1) or real())
    data = _run(
        tmp_path, "--contexts", "600", "--batches", "1", "--methods", "sdpa_graph,kernel_graph", "--no-plot"
    )
    assert calls == [1]
    rows = [r for r in data["results"] if r["method"] == "kernel_graph"]
    assert rows and all(r["status"] == "n/a" and "not requested" not in r["reason"] for r in rows)
