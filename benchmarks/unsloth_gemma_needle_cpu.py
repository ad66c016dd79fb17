"""The demo's needle on the real Gemma 3 270M with Unsloth's Gemma 3 patches active (CPU).

Unsloth cannot load a model without a GPU, but ``import unsloth`` (``UNSLOTH_ALLOW_CPU=1``)
applies its class-wide Gemma 3 attention replacement (SDPA hard-coded) on CPU too. This
script loads the embedded Gemma 3 270M the demo uses (``spectralcache.eval.model``) after
``import unsloth`` and records, on one ``niah_single_1`` prompt:

* that Unsloth's path is active and ``SpectralCache(model, ...)`` refuses it;
* the answer with a plain DynamicCache through Unsloth's attention (the baseline there);
* ``patch_unsloth_attention(model, preset)`` then the answer with a SpectralCache, its KV
  bytes vs the DynamicCache's (all layers and the full-attention layers it compresses).

Run in a virtualenv holding unsloth / unsloth_zoo 2026.10.9 and transformers <= 5.17:

    UNSLOTH_ALLOW_CPU=1 python benchmarks/unsloth_gemma_needle_cpu.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--preset", default="default")
    parser.add_argument("--threads", default="auto")
    args = parser.parse_args()
    unsloth = importlib.import_module("unsloth")  # first, as Unsloth requires
    import torch
    import transformers

    from spectralcache import SpectralCache
    from spectralcache.eval.methods import full_attention_layers
    from spectralcache.eval.model import choose_threads, load_model
    from spectralcache.eval.runner import answer
    from spectralcache.eval.scoring import score
    from spectralcache.eval.tasks import generate_samples
    from spectralcache.integrations.unsloth import patch_unsloth_attention, unsloth_inference_paths

    threads = choose_threads(args.threads)
    rec: dict = {
        "command": " ".join(sys.argv),
        "versions": {
            "unsloth": unsloth.__version__,
            "unsloth_zoo": sys.modules["unsloth_zoo"].__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "threads": threads,
    }
    model, tok = load_model(device="cpu", dtype="float32")
    s = generate_samples("niah_single_1", tokenizer=tok, length=args.length, num_samples=1, seed=0)[0]
    rec["prompt"] = {"context_tokens": s["context_tokens"], "depth": s["depth"], "expected": s["answers"]}
    rec["inference_paths_before"] = unsloth_inference_paths(model)
    try:
        SpectralCache(model, args.preset)
        rec["unpatched_spectralcache"] = "no error"
    except Exception as e:
        rec["unpatched_spectralcache"] = f"{type(e).__name__}: {str(e)[:300]}"
    n_full = len(full_attention_layers(model.config))

    def run(label: str, cache) -> dict:
        t0 = time.perf_counter()
        a = answer(
            model,
            tok,
            cache,
            s["context"],
            s["question"] + s["answer_prefix"],
            max_new_tokens=s["max_new_tokens"],
        )
        row = {
            "answer": a.text,
            "correct": bool(score(s["metric"], a.text, s["answers"]) == 1.0),
            "kv_bytes": a.kv_bytes,
            "kv_bytes_full_attn": a.kv_bytes_full,
            "seconds": time.perf_counter() - t0,
        }
        print(label, row, flush=True)
        return row

    from transformers import DynamicCache

    rec["plain_unsloth_dynamic"] = run("plain Unsloth, DynamicCache", DynamicCache(config=model.config))
    patch_unsloth_attention(model, args.preset)
    rec["inference_paths_after_patch"] = unsloth_inference_paths(model)
    rec["patched_spectral"] = run(f"patched, SpectralCache({args.preset})", SpectralCache(model, args.preset))
    base, spec = rec["plain_unsloth_dynamic"], rec["patched_spectral"]
    rec["reduction_all_layers"] = base["kv_bytes"] / spec["kv_bytes"]
    rec["reduction_full_attn_layers"] = base["kv_bytes_full_attn"] / spec["kv_bytes_full_attn"]
    rec["full_attention_layers"] = n_full
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unsloth_gemma_needle_cpu.json").write_text(json.dumps(rec, indent=1, default=str))
    print(
        json.dumps({k: v for k, v in rec.items() if k not in ("inference_paths_before",)}, default=str)[:2000]
    )


if __name__ == "__main__":
    main()
