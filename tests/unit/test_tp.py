"""SpectralCache under transformers' tensor parallelism: a real 2-process run.

The test saves a tiny random-weight Llama (GQA: 8 query / 4 KV heads, head_dim 64) and
launches this very file under ``torch.distributed.run`` with 2 processes. Each rank loads
the model with transformers' own ``tp_plan="auto"`` (gloo on CPU, NCCL on CUDA): q/k/v are
split column-wise by heads, o_proj / down_proj row-wise with an all-reduce, so each rank
attends over 4 query and 2 KV heads and caches only those. Per rank it checks:

* the cache takes the local KV head count (2) from the sharded model, not the config (4);
* lossless SpectralCache greedy output == DynamicCache greedy output under TP (full-rank,
  unquantized blocks of 128 tokens: ~9 compressed blocks per layer are read by decode);
* the default preset compresses per rank, and ``gather_memory_report`` totals the ranks.

The parent then compares with one unsharded process: TP output matches the unsharded model
(so each rank really cached its own heads), and each rank holds half the bytes an unsharded
SpectralCache holds for the same prompt, at the same compression ratio.

Run on 2 GPUs (NCCL) with ``SPECTRALCACHE_TP_DEVICE=cuda`` (see the README, "Several GPUs");
``SPECTRALCACHE_TP_RESULTS=DIR`` keeps each rank's measured results there.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

WORLD = 2
PROMPT = 1300
NEW = 12
SEED = 0


def _lossless_config() -> Any:
    from spectralcache import SpectralConfig

    return SpectralConfig.from_preset(
        "lossless", block_size=128, hot_size=32, landmarks=8, outliers_per_block=4
    )


def _greedy(model: Any, ids: torch.Tensor, cache: Any) -> tuple[list[int], torch.Tensor]:
    out = model.generate(
        ids,
        past_key_values=cache,
        max_new_tokens=NEW,
        min_new_tokens=NEW,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )
    tokens = out.sequences[0, ids.shape[1] :].tolist()
    scores = torch.stack([s[0].float().cpu() for s in out.logits])
    return tokens, scores


def _prompt(vocab: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(SEED)
    return torch.randint(3, vocab, (1, PROMPT), generator=g)


def _worker(model_dir: str, out_dir: str) -> None:
    """One rank (run under torch.distributed.run): writes rank<r>.json into ``out_dir``."""
    import torch.distributed as dist
    from transformers import DynamicCache

    from spectralcache import SpectralCache
    from spectralcache.integrations.tp import gather_memory_report, load_tp_model, tp_world_size

    dtype = torch.float32
    model = load_tp_model(model_dir, dtype=dtype).eval()
    rank, world = dist.get_rank(), dist.get_world_size()
    ids = _prompt(model.config.vocab_size).to(model.device)
    with torch.no_grad():
        dyn_tokens, dyn_scores = _greedy(model, ids, DynamicCache(config=model.config))
        lossless = SpectralCache(model, _lossless_config())
        sc_tokens, sc_scores = _greedy(model, ids, lossless)
        compressed_blocks = [layer.num_blocks for layer in lossless.layers]
        default = SpectralCache(model, "default")
        def_tokens, _ = _greedy(model, ids, default)
    gathered = gather_memory_report(default)
    result = {
        "rank": rank,
        "world": world,
        "backend": dist.get_backend(),
        "device": str(model.device),
        "tp_size": tp_world_size(model),
        "config_kv_heads": model.config.num_key_value_heads,
        "cache_kv_heads": lossless.num_kv_heads,
        "layer_kv_heads": [layer.num_kv_heads for layer in default.layers],
        "lossless_blocks": compressed_blocks,
        "dynamic_tokens": dyn_tokens,
        "lossless_tokens": sc_tokens,
        "default_tokens": def_tokens,
        "max_score_diff": float((dyn_scores - sc_scores).abs().max()),
        "dynamic_scores": dyn_scores.tolist(),
        "memory_report": {k: v for k, v in default.memory_report().items() if k != "layers"},
        "gathered": gathered,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


def _run_tp(tmp_path: Path, device: str) -> tuple[list[dict[str, Any]], Any, torch.Tensor]:
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=64, seed=SEED)
    model_dir = tmp_path / "model"
    model.save_pretrained(model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # transformers picks the backend from the accelerator
        if "GLOO_SOCKET_IFNAME" not in env and Path("/sys/class/net/lo").exists():
            # one host: loopback, so gloo does not depend on the hostname resolving
            env["GLOO_SOCKET_IFNAME"] = "lo"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={WORLD}",
        __file__,
        str(model_dir),
        str(out_dir),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(WORLD)]
    keep = os.environ.get("SPECTRALCACHE_TP_RESULTS")  # keep the per-rank evidence of a GPU run
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        for r in range(WORLD):
            Path(keep, f"rank{r}.json").write_text((out_dir / f"rank{r}.json").read_text())
    return results, model, _prompt(model.config.vocab_size)


def _check(tmp_path: Path, device: str) -> None:
    from transformers import DynamicCache

    from spectralcache import SpectralCache

    results, model, ids = _run_tp(tmp_path, device)
    for r in results:
        assert r["world"] == WORLD and r["tp_size"] == WORLD
        assert r["backend"] == ("nccl" if device == "cuda" else "gloo")
        # local heads from the sharded model, not the config's global count
        assert r["config_kv_heads"] == 4 and r["cache_kv_heads"] == 2
        assert r["layer_kv_heads"] == [2, 2]
        assert min(r["lossless_blocks"]) >= 8, r["lossless_blocks"]
        # the acceptance criterion: lossless SpectralCache == DynamicCache under TP
        assert r["lossless_tokens"] == r["dynamic_tokens"], r
        assert r["max_score_diff"] < 1e-3, r["max_score_diff"]
    # every rank computes the full (all-reduced) logits: all agree
    assert results[0]["dynamic_tokens"] == results[1]["dynamic_tokens"]
    assert results[0]["default_tokens"] == results[1]["default_tokens"]

    # the unsharded model in this process: TP computed the same function
    with torch.no_grad():
        ref_tokens, ref_scores = _greedy(model, ids, DynamicCache(config=model.config))
        single = SpectralCache(model, "default")
        _greedy(model, ids, single)
    tp_scores = torch.tensor(results[0]["dynamic_scores"])
    assert torch.allclose(tp_scores, ref_scores, atol=1e-3, rtol=0), float(
        (tp_scores - ref_scores).abs().max()
    )
    assert results[0]["dynamic_tokens"] == ref_tokens

    # default preset: each rank holds its half, compressed by the same factor as one process
    one = single.memory_report()["compressed_layers"]
    assert one["ratio"] < 0.7, one
    per_rank = [r["memory_report"]["compressed_layers"] for r in results]
    for pr in per_rank:
        # exact but for per-layer metadata every rank keeps whole (block starts: a few bytes)
        assert abs(pr["held_bytes"] * WORLD - one["held_bytes"]) <= 1e-4 * one["held_bytes"], (pr, one)
        assert pr["dynamic_bytes"] * WORLD == one["dynamic_bytes"], (pr, one)
        assert abs(pr["ratio"] - one["ratio"]) < 1e-4
    for r in results:
        g = r["gathered"]
        assert g["world_size"] == WORLD and g["rank"] == r["rank"]
        assert [p["compressed_layers"] for p in g["per_rank"]] == per_rank
        total = g["total"]["compressed_layers"]
        assert total["held_bytes"] == sum(pr["held_bytes"] for pr in per_rank)
        assert total["dynamic_bytes"] == one["dynamic_bytes"]
        assert sum(g["total"]["tiers"].values()) == total["held_bytes"]
        assert abs(total["ratio"] - one["ratio"]) < 1e-4


def test_tp_two_ranks_gloo(tmp_path: Path) -> None:
    import pytest

    if not torch.distributed.is_available():
        pytest.skip("this torch build has no torch.distributed")
    device = os.environ.get("SPECTRALCACHE_TP_DEVICE", "cpu")
    if device == "cuda" and torch.cuda.device_count() < WORLD:
        pytest.skip(f"SPECTRALCACHE_TP_DEVICE=cuda needs {WORLD} GPUs")
    _check(tmp_path, device)


def _hand_sharded(rows_per_layer: list[int]) -> Any:
    """The tiny Llama with each layer's k_proj cut to ``rows`` output features, as one TP rank
    of a hand-sharded model holds it, and transformers' TP degree set to 2."""
    from tests.tiny_models import tiny_model

    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    for layer, rows in zip(model.model.layers, rows_per_layer):
        layer.self_attn.k_proj = torch.nn.Linear(64, rows, bias=False)
    model._tp_size = 2
    return model


def test_kv_heads_per_rank_reads_the_local_shard() -> None:
    import pytest
    from tests.tiny_models import tiny_model

    from spectralcache.integrations.tp import kv_heads_per_rank

    unsharded = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    assert kv_heads_per_rank(unsharded, 4, 64) == 4
    assert kv_heads_per_rank(_hand_sharded([128, 128]), 4, 64) == 2
    assert kv_heads_per_rank(_hand_sharded([128, 64]), 4, 64, layer_indices=[0]) == 2
    with pytest.raises(ValueError, match="different numbers of KV heads"):
        kv_heads_per_rank(_hand_sharded([128, 64]), 4, 64)
    with pytest.raises(ValueError, match="not whole heads"):
        kv_heads_per_rank(_hand_sharded([96, 96]), 4, 64)
    with pytest.raises(ValueError, match="does not divide"):
        kv_heads_per_rank(_hand_sharded([192, 192]), 4, 64)


def test_gather_memory_report_without_process_group() -> None:
    from tests.tiny_models import tiny_model, tiny_prompt

    from spectralcache import SpectralCache
    from spectralcache.integrations.tp import gather_memory_report

    model = tiny_model("llama", num_attention_heads=8, num_key_value_heads=4, head_dim=64)
    cache = SpectralCache(model, "default")
    with torch.no_grad():
        model(tiny_prompt(1, 700), past_key_values=cache)
    report = cache.memory_report()
    gathered = gather_memory_report(cache)
    assert gathered["world_size"] == 1 and gathered["rank"] == 0
    for key in ("compressed_layers", "cold_blocks", "all_layers"):
        assert gathered["total"][key] == report[key]
    assert gathered["total"]["tiers"] == report["tiers"]
    assert report["compressed_layers"]["ratio"] < 1


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
