"""Perplexity under compression: "prefill, compress, continue".

For each text segment: prefill ``P`` tokens in one forward call (a compressing cache
compresses them there), then teacher-force the next ``N`` tokens through the *same*
cache and report the negative log-likelihood of those ``N`` tokens only. Every method
sees the same token ids, split at the same place.

Continuation mode (explicit, recorded in the output):

- ``step`` (default): one token per forward call, which is exactly what decoding sees
  -- each continuation token is appended to the cache (and may be compressed with it)
  before the next one is scored. ``N`` forward calls per segment.
- ``chunk``: ``chunk`` tokens per forward call (faster). Within a call the tokens attend
  to each other exactly (a compressing cache only reads *earlier* calls compressed), so
  this is more lenient than decoding for the continuation's own tokens.

Text: the Python reference manual shipped with every CPython (``pydoc_data.topics``),
topics in sorted order joined by blank lines; segment ``k`` is tokens
``[k*(P+N), (k+1)*(P+N))`` of that text, with BOS prepended (so ``P`` counts BOS).
Deterministic per Python minor version (the manual changes between versions).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from spectralcache.eval.methods import (
    Method,
    full_attention_layers,
    measure_kv_bytes_per_layer,
    with_baseline_first,
)
from spectralcache.integrations.compat import cache_kwargs

MODES = ("step", "chunk")


def corpus_text(max_chars: int = 400_000) -> str:
    """The prose the perplexity segments are cut from (see the module docstring)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k].strip() for k in sorted(topics))
    return text[:max_chars]


def segments(tokenizer: Any, prefill: int, cont: int, num_segments: int) -> list[list[int]]:
    """``num_segments`` token lists of length ``prefill + cont`` (BOS first)."""
    if prefill < 2 or cont < 1 or num_segments < 1:
        raise ValueError(
            f"need prefill >= 2, continue >= 1, segments >= 1; got {prefill}, {cont}, {num_segments}"
        )
    need = num_segments * (prefill + cont)
    chars = max(200_000, need * 8)
    ids = tokenizer(corpus_text(chars), add_special_tokens=False).input_ids
    if len(ids) < need:
        raise ValueError(f"the corpus has {len(ids)} tokens, fewer than the {need} asked for")
    bos = tokenizer.bos_token_id
    per = prefill + cont - (1 if bos is not None else 0)
    out = []
    for k in range(num_segments):
        body = ids[k * per : (k + 1) * per]
        out.append(([bos] if bos is not None else []) + body)
    return out


@dataclass
class SegmentResult:
    nll_sum: float
    tokens: int
    prefill_s: float
    continue_s: float
    kv_bytes: int
    kv_bytes_full: int


@torch.inference_mode()
def score_segment(
    model: Any, cache: Any, ids: Sequence[int], prefill: int, *, mode: str = "step", chunk: int = 128
) -> SegmentResult:
    """NLL (sum, nats) of ``ids[prefill:]`` given ``ids[:prefill]`` through ``cache``."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if not 2 <= prefill < len(ids):
        raise ValueError(f"prefill must be in [2, {len(ids) - 1}], got {prefill}")
    from transformers import DynamicCache

    if cache is None:
        cache = DynamicCache(config=model.config)
    device = next(model.parameters()).device
    x = torch.tensor([list(ids)], device=device)
    targets = x[0, prefill:]
    t0 = time.perf_counter()
    logits = model(
        input_ids=x[:, :prefill], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1
    ).logits
    t1 = time.perf_counter()
    nll = torch.nn.functional.cross_entropy(logits[0, -1:].float(), targets[:1], reduction="sum").item()
    kv = None
    pos = prefill
    step = 1 if mode == "step" else int(chunk)
    end = len(ids) - 1  # the last token is only a target
    while pos < end:
        hi = min(pos + step, end)
        logits = model(input_ids=x[:, pos:hi], **cache_kwargs(model, cache), use_cache=True).logits
        nll += torch.nn.functional.cross_entropy(
            logits[0].float(), targets[pos - prefill + 1 : hi - prefill + 1], reduction="sum"
        ).item()
        if kv is None:  # measured once the prefill's transient views are gone (see runner.py)
            per_layer = measure_kv_bytes_per_layer(cache)
            full = full_attention_layers(model.config)
            kv = (sum(per_layer), sum(per_layer[i] for i in full if i < len(per_layer)))
        pos = hi
    if kv is None:
        per_layer = measure_kv_bytes_per_layer(cache)
        full = full_attention_layers(model.config)
        kv = (sum(per_layer), sum(per_layer[i] for i in full if i < len(per_layer)))
    t2 = time.perf_counter()
    return SegmentResult(nll, len(ids) - prefill, t1 - t0, t2 - t1, int(kv[0]), int(kv[1]))


def run_perplexity(
    model: Any,
    tokenizer: Any,
    methods: Sequence[Method],
    *,
    prefill: int = 2048,
    cont: int = 512,
    num_segments: int = 1,
    mode: str = "step",
    chunk: int = 128,
    out: Path | None = None,
    seed: int = 0,
    progress: bool = True,
    device: str = "cpu",
    dtype: str = "float32",
) -> list[dict]:
    """Every method (baseline first) on the same segments; one JSON per method under
    ``out/perplexity/`` and ``out/perplexity/summary.json``. A method whose JSON exists
    with the same protocol is not rerun."""
    from tqdm.auto import tqdm

    segs = segments(tokenizer, prefill, cont, num_segments)
    results = []
    protocol = {"prefill": prefill, "continue": cont, "segments": num_segments, "mode": mode}
    if mode == "chunk":
        protocol["chunk"] = chunk
    base = None
    for method in with_baseline_first(list(methods)):
        path = Path(out) / "perplexity" / f"{method.slug}.json" if out is not None else None
        if path is not None and path.exists():
            old = json.loads(path.read_text())
            if old.get("protocol") == protocol and old.get("error") is None:
                results.append(old)
                base = old if method.is_baseline else base
                continue
        res: dict[str, Any] = {"method": method.name, "protocol": protocol, "device": device, "dtype": dtype}
        try:
            res["method_config"] = method.describe()
        except (ValueError, TypeError, ImportError) as err:
            res["method_config"] = f"{type(err).__name__}: {err}"
        per_seg = []
        try:
            for k, ids in enumerate(tqdm(segs, desc=f"ppl {method.name}", disable=not progress)):
                torch.manual_seed(seed * 1_000_003 + k)
                per_seg.append(
                    score_segment(model, method.make_cache(model), ids, prefill, mode=mode, chunk=chunk)
                )
            tok = sum(s.tokens for s in per_seg)
            nll = sum(s.nll_sum for s in per_seg) / tok
            res.update(
                error=None,
                tokens=tok,
                nll=nll,
                perplexity=math.exp(nll),
                segment_nll=[s.nll_sum / s.tokens for s in per_seg],
                kv_bytes=sum(s.kv_bytes for s in per_seg) / len(per_seg),
                kv_bytes_full=sum(s.kv_bytes_full for s in per_seg) / len(per_seg),
                prefill_s=sum(s.prefill_s for s in per_seg) / len(per_seg),
                continue_s=sum(s.continue_s for s in per_seg) / len(per_seg),
            )
        except (RuntimeError, ValueError, TypeError, ImportError, NotImplementedError) as err:
            res.update(error=f"{type(err).__name__}: {err}")
        if method.is_baseline:
            base = res
        if base is not None and res.get("kv_bytes") and base.get("kv_bytes"):
            res["compression_ratio"] = base["kv_bytes"] / res["kv_bytes"]
            res["compression_ratio_full"] = base["kv_bytes_full"] / res["kv_bytes_full"]
            res["delta_nll_vs_baseline"] = res["nll"] - base["nll"]
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(res, indent=2, sort_keys=True) + "\n")
        results.append(res)
    if out is not None:
        p = Path(out) / "perplexity" / "summary.json"
        p.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        (Path(out) / "perplexity" / "summary.md").write_text(perplexity_table(results))
    return results


def perplexity_table(results: list[dict]) -> str:
    lines = [
        "| method | tokens | NLL | perplexity | ΔNLL vs baseline | KV MiB | ratio (all) | ratio (full-attn) "
        "| prefill s | continue s | error |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v: Any, spec: str) -> str:
        return "—" if v is None else format(v, spec)

    for r in results:
        kv = r.get("kv_bytes")
        lines.append(
            f"| {r['method']} | {r.get('tokens', '—')} | {f(r.get('nll'), '.4f')} | {f(r.get('perplexity'), '.3f')} "
            f"| {f(r.get('delta_nll_vs_baseline'), '+.4f')} | {f(None if kv is None else kv / 2**20, '.2f')} "
            f"| {f(r.get('compression_ratio'), '.2f')} | {f(r.get('compression_ratio_full'), '.2f')} "
            f"| {f(r.get('prefill_s'), '.1f')} | {f(r.get('continue_s'), '.1f')} | {r.get('error') or ''} |"
        )
    return "\n".join(lines) + "\n"
