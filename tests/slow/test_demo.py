"""``spectralcache demo`` end to end on the real Gemma 3 270M (CPU, float32).

This is the README's main job; it must answer the ~4K-token needle question correctly
with the plain cache and with the default SpectralCache, and show a measured
compression. About 1.5 min of CPU on 2 cores once the weights are cached (the shared
``gemma`` fixture's load is not counted twice).
"""

from __future__ import annotations

import io

import pytest


@pytest.mark.slow
def test_demo_end_to_end(gemma, monkeypatch):
    pytest.importorskip("rich")
    from rich.console import Console

    from spectralcache.eval import demo as demo_mod
    from spectralcache.eval import model as model_mod

    model, tok = gemma

    def cached(*args, return_info=False, **kw):  # the session's model; load_model itself is the fixture's
        info = model_mod.LoadInfo(source="cache", seconds=0.0, cache_dir="(session fixture)")
        return (model, tok, info) if return_info else (model, tok)

    monkeypatch.setattr(model_mod, "load_model", cached)
    buf = io.StringIO()
    rows = demo_mod.demo(console=Console(file=buf, width=140))
    out = buf.getvalue()
    assert [r["method"] for r in rows] == ["baseline", "spectral:default"]
    assert all(r["correct"] for r in rows), rows
    base, spec = rows
    assert base["ratio"] == pytest.approx(1.0)
    # measured, not a formula: the compressed layers hold well under half of DynamicCache's bytes
    assert spec["ratio_full"] > 2.5 and spec["kv_bytes"] < base["kv_bytes"]
    assert "Needle in a" in out and "yes" in out and "SpectralCache (default)" in out
