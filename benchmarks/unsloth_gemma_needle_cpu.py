"""The demo's needle on the real Gemma 3 270M with Unsloth's Gemma 3 patches active (CPU).

Unsloth cannot load a model without a GPU, but ``import unsloth`` (``UNSLOTH_ALLOW_CPU=1``)
applies its class-wide Gemma 3 attention replacement (SDPA hard-coded) on CPU too. This
script loads the embedded Gemma 3 270M the demo uses (``spectralcache.eval.model``) after
``import unsloth`` and records, on one ``niah_single_1`` prompt:

* that Unsloth's path is active and ``SpectralCache(model, ...)`` refuses it;
* the answer with a plain DynamicCache through Unsloth's attention (the baseline there);
* ``patch_unsloth_attention(model, preset)`` then the answer with a SpectralCache, its KV
  bytes vs the DynamicCache's (all layers and the full-attention layers it compresses).

``--fastmodel-compile`` first runs unsloth_zoo's compiler with the arguments
``FastModel.from_pretrained`` passes it (``unsloth/models/loader.py``), which rebinds
``modeling_gemma3.Gemma3ForCausalLM`` / ``Gemma3Attention`` to its generated copies
(``unsloth_compiled_module_gemma3``), so the model loaded afterwards has the classes FastModel
gives the real Gemma 3 270M on a GPU (the model class's module hides the attention interface
from transformers' ``_can_set_attn_implementation``). It also answers with ``lossless`` (float32),
which must give plain Unsloth's answer.

Run in a virtualenv holding unsloth / unsloth_zoo 2026.10.9 and transformers <= 5.17:

    UNSLOTH_ALLOW_CPU=1 PYTHONPATH=src python benchmarks/unsloth_gemma_needle_cpu.py --out DIR [--fastmodel-compile]
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
    parser.add_argument(
        "--fastmodel-compile", action="store_true", help="FastModel's compiled classes (see above)"
    )
    args = parser.parse_args()
    unsloth = importlib.import_module("unsloth")  # first, as Unsloth requires
    import torch
    import transformers

    if args.fastmodel_compile:
        from unsloth.models._utils import unsloth_compile_transformers

        # the arguments of unsloth/models/loader.py (FastModel.from_pretrained), float32, no remote code
        unsloth_compile_transformers(
            dtype=torch.float32, model_name="gemma3-270m", model_types=["gemma3"], sdpa_dynamic_mask=True,
            sdpa_bool_masks=True, sdpa_gqa_replace=True, sdpa_dynamic_compile=True, compile_attention=True,
            disable_causal_masks=True, compile_torch_modules=True, compile_custom_modules=True,
            compile_function_calls=True, fuse_lm_head=True, gradient_checkpointing=True, manual_replacements=True,
            fast_lora_forwards=True, fast_residual_stream=False, accurate_accumulation=True, epilogue_fusion=True,
            max_autotune=False, shape_padding=True, cudagraphs=False,
        )  # fmt: skip

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
    attn = next(m for n, m in model.named_modules() if n.endswith("self_attn"))
    rec["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    rec["attention_class"] = f"{type(attn).__module__}.{type(attn).__name__}"
    rec["model_class_can_set_attn_implementation"] = type(model)._can_set_attn_implementation()
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
    if args.fastmodel_compile:
        from spectralcache.integrations.unsloth import resolve_config

        patch_unsloth_attention(model, "lossless")
        rec["patched_lossless"] = run(
            "patched, SpectralCache(lossless)", SpectralCache(model, resolve_config("lossless"))
        )
        rec["lossless_answer_equals_plain"] = (
            rec["patched_lossless"]["answer"] == rec["plain_unsloth_dynamic"]["answer"]
        )
        from spectralcache.integrations.unsloth import unpatch_unsloth_attention

        unpatch_unsloth_attention(model)
        rec["inference_paths_after_unpatch"] = len(unsloth_inference_paths(model))
        rec["attn_implementation_after_unpatch"] = model.config._attn_implementation
    base, spec = rec["plain_unsloth_dynamic"], rec["patched_spectral"]
    rec["reduction_all_layers"] = base["kv_bytes"] / spec["kv_bytes"]
    rec["reduction_full_attn_layers"] = base["kv_bytes_full_attn"] / spec["kv_bytes_full_attn"]
    rec["full_attention_layers"] = n_full
    args.out.mkdir(parents=True, exist_ok=True)
    name = (
        "unsloth_gemma_needle_cpu_compiled.json"
        if args.fastmodel_compile
        else "unsloth_gemma_needle_cpu.json"
    )
    (args.out / name).write_text(json.dumps(rec, indent=1, default=str))
    print(
        json.dumps({k: v for k, v in rec.items() if k not in ("inference_paths_before",)}, default=str)[:2000]
    )


if __name__ == "__main__":
    main()
