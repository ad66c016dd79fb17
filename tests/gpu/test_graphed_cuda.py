"""Graphed decoding on CUDA: the captured one-token forward, replayed across steps (skipped without CUDA).

``tests/unit/test_graphed.py`` runs the same step without capture on CPU; here the step is
captured with ``torch.cuda.graph`` and replayed, through compressions (eager, between replays),
and compared with (a) the eager path (``model(...)`` with a SpectralCache: greedy tokens equal,
logits close) and (b) the same step run without capture (``mode="static"``: same kernels, so
the replay must reproduce it to float rounding).
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
pytest.importorskip("triton")

from tests.tiny_models import small_lossy_config, tiny_model, tiny_prompt  # noqa: E402

from spectralcache import GraphedDecoder, graphed_generate  # noqa: E402
from spectralcache.cache.cache import SpectralCache  # noqa: E402
from spectralcache.integrations.compat import cache_kwargs  # noqa: E402

CFG = dict(block_size=16, rank_keys=8, rank_values=8, hot_size=4, landmarks=3, outliers_per_block=2)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _three_runs(model, ids: torch.Tensor, steps: int) -> dict:
    """mode -> (tokens, logits, decoder, cache) for eager, static (uncaptured) and graph decoding."""
    runs = {}
    for mode in ("eager", "static", "graph"):
        cache = SpectralCache(model, small_lossy_config(**CFG))
        decoder = GraphedDecoder(model, cache, max_new_tokens=steps, mode=mode)
        tokens, logits = decoder.generate(ids, steps, return_logits=True)
        runs[mode] = (tokens, logits, decoder, cache)
    return runs


@pytest.mark.parametrize(("batch", "prompt", "steps"), [(1, 40, 60), (3, 10, 50)])
def test_replayed_step_equals_eager_and_uncaptured(batch: int, prompt: int, steps: int) -> None:
    model = tiny_model("llama").cuda()
    ids = tiny_prompt(batch, prompt, seed=prompt).cuda()
    runs = _three_runs(model, ids, steps)
    g_tokens, g_logits, dec, cache = runs["graph"]
    assert torch.equal(g_tokens, runs["eager"][0])
    assert torch.equal(g_tokens, runs["static"][0])
    # the capture itself: replay = the uncaptured step
    assert max(_rel(a, b) for a, b in zip(g_logits, runs["static"][1])) < 1e-5
    # against the eager path: K/V of layer 1 differ by the attention's rounding (the kernel's
    # float32 dots run in tf32; other split plans), and each rank-8 fit of a 16-token block of
    # random K/V (flat spectrum) amplifies that: 1.9e-3 after 3 compressions on the H100
    assert max(_rel(a, b) for a, b in zip(g_logits, runs["eager"][1])) < 1e-2
    # compressions happened while decoding (every 16 steps), yet the graph was captured at most
    # twice (the first compression of a short prompt moves the cold buffers once)
    assert len(cache.layers[0].compression_calls) >= 3
    assert 1 <= dec.captures <= 2, (dec.captures, dec.static_steps, dec.replays)
    assert dec.replays >= steps - 1 - 2 * dec.captures


def test_graphed_generate_bf16_matches_uncaptured() -> None:
    model = tiny_model("llama", dtype=torch.bfloat16).cuda()
    ids = tiny_prompt(2, 33, seed=5).cuda()
    a, la = graphed_generate(
        model, ids, SpectralCache(model, small_lossy_config(**CFG)), 40, return_logits=True
    )
    b, lb = graphed_generate(
        model, ids, SpectralCache(model, small_lossy_config(**CFG)), 40, mode="static", return_logits=True
    )
    assert torch.equal(a, b)
    assert max(_rel(x, y) for x, y in zip(la, lb)) < 1e-2


def test_recapture_after_a_buffer_moves() -> None:
    """``crop`` into the cold tier reallocates: the next step runs uncaptured, the one after
    captures again, and decoding stays equal to the eager path."""
    model = tiny_model("llama").cuda()
    ids = tiny_prompt(1, 60, seed=7).cuda()
    cache = SpectralCache(model, small_lossy_config(**CFG))
    decoder = GraphedDecoder(model, cache, max_new_tokens=40, mode="graph")
    ref = SpectralCache(model, small_lossy_config(**CFG))
    nxt = decoder.next_ids(decoder.prefill(ids)).clone()
    with torch.no_grad():
        model(ids, **cache_kwargs(model, ref))
        for _ in range(6):
            model(nxt, **cache_kwargs(model, ref))  # the eager twin, fed the same tokens
            nxt = decoder.next_ids(decoder.step(nxt)).clone()
    captures = decoder.captures
    for c in (cache, ref):
        c.crop(-26)  # 66 -> 40 tokens, into the cold tier: the hot buffer is rebuilt from a reconstruction
    for _ in range(8):
        a = decoder.step(nxt).clone()
        with torch.no_grad():
            b = model(nxt, **cache_kwargs(model, ref)).logits[:, -1]
        assert _rel(a, b) < 1e-3
        nxt = a.argmax(-1, keepdim=True)
    assert decoder.captures == captures + 1


def test_padded_batch_replays_equal_eager() -> None:
    """Left-padded rows: the captured step reads the padding mask (fixed address, by cache index)
    and per-row positions; = the eager forwards, and = the uncaptured step. Decoding past
    ``max_new_tokens`` grows the mask once (one more capture)."""
    model = tiny_model("llama").cuda()
    ids = tiny_prompt(3, 30, seed=8).cuda()
    mask = torch.ones_like(ids)
    for row, pad in enumerate([0, 9, 3]):
        ids[row, :pad] = 0
        mask[row, :pad] = 0
    runs = {}
    for mode in ("eager", "static", "graph"):
        decoder = GraphedDecoder(
            model, SpectralCache(model, small_lossy_config(**CFG)), max_new_tokens=30, mode=mode
        )
        runs[mode] = (*decoder.generate(ids, 30, attention_mask=mask, return_logits=True), decoder)
    tokens, logits, dec = runs["graph"]
    assert torch.equal(tokens, runs["eager"][0]) and torch.equal(tokens, runs["static"][0])
    assert max(_rel(a, b) for a, b in zip(logits, runs["eager"][1])) < 1e-3
    assert max(_rel(a, b) for a, b in zip(logits, runs["static"][1])) < 1e-5
    captures = dec.captures
    nxt = tokens[:, -1:]
    for _ in range(8):  # past max_new_tokens: the mask grows once
        nxt = dec.next_ids(dec.step(nxt))
    assert dec.captures == captures + 1


@pytest.mark.parametrize(("batch", "prompt", "steps"), [(1, 100, 40), (2, 30, 60)])
def test_sliding_window_model_replays_equal_eager_and_uncaptured(batch: int, prompt: int, steps: int) -> None:
    """A tiny Gemma 3 (sliding, full, sliding, full; window 64): the sliding layers' window buffers
    are shifted inside the graph and attended without the model's mask (which holds the capture
    step's window offset); replays across many steps (and a window that fills while decoding, for
    the 30-token prompt) must equal the uncaptured step and the eager path."""
    model = tiny_model("gemma3").cuda()
    ids = tiny_prompt(batch, prompt, seed=prompt).cuda()
    runs = _three_runs(model, ids, steps)
    g_tokens, g_logits, dec, cache = runs["graph"]
    assert torch.equal(g_tokens, runs["eager"][0]) and torch.equal(g_tokens, runs["static"][0])
    assert max(_rel(a, b) for a, b in zip(g_logits, runs["static"][1])) < 1e-5
    assert max(_rel(a, b) for a, b in zip(g_logits, runs["eager"][1])) < 1e-2
    assert dec.captures <= 3 and dec.replays >= steps - 1 - max(0, 63 - prompt) - 2 * dec.captures
    # the window layers hold the last 63 tokens in order, as the eager cache's
    eager_cache = runs["eager"][3]
    for got, want in (
        (cache.layers[0].keys, eager_cache.layers[0].keys),
        (cache.layers[0].values, eager_cache.layers[0].values),
    ):
        assert got.shape == want.shape == (batch, 1, 63, 64) and _rel(got, want) < 1e-5
