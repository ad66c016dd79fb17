"""SpectralCache inside models loaded with the real Unsloth (GPU check for issue 11).

For tiny random-weight Llama, Qwen3 and Gemma 3 (tests/tiny_models.py), saved locally with
a word-level tokenizer and loaded with ``FastLanguageModel`` / ``FastModel``:

* what of Unsloth's inference path is active (``unsloth_inference_paths``);
* plain Unsloth greedy tokens, and plain transformers (same weights, ``AutoModelForCausalLM``,
  DynamicCache) for reference;
* ``SpectralCache(model, ...)`` on the unpatched model (must raise), and a cache built from
  the config passed to the unpatched ``generate`` (what happens is recorded);
* ``patch_unsloth_attention(model, "lossless", ...)`` greedy tokens (must equal plain Unsloth),
  the cache it used (blocks compressed, length), wall time of both generate calls;
* Llama / Qwen3: ``get_peft_model`` afterwards (re-marks the fast path: generate must refuse),
  patched again (LoRA starts at zero, so tokens must equal plain Unsloth again);
* Qwen3 (head_dim 64): the ``default`` preset on a 1400-token prompt, memory reduction.

Run on the GPU machine with Unsloth carried as wheels (see benchmarks/results/unsloth/README.md):

    python benchmarks/unsloth_check.py --out DIR            # real Unsloth, CUDA
    python benchmarks/unsloth_check.py --standin --out DIR  # the CI stand-in on CPU (dry run)
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 300, 24
SMALL = dict(block_size=32, hot_size=16, landmarks=4)
# The lossless preset is exact in float32 only (refused in fp16/bf16); there the identity
# codecs (per-token 16-bit rows) are the exact configuration.
EXACT_HALF = dict(key_codec="identity", value_codec="identity")


def _lossless(dtype_name: str) -> dict:
    return SMALL if dtype_name == "float32" else {**SMALL, **EXACT_HALF}


def _err(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)[:600]}


def _save_tiny(name: str, root: Path) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tiny_models import VOCAB, tiny_model

    path = root / name
    model = tiny_model(name, dtype=torch.float32)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3"
    )
    fast.save_pretrained(path)
    return path


def _generate(model, ids, **kwargs) -> tuple[list[int], float]:
    import torch

    sync = torch.cuda.synchronize if ids.is_cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    out = model.generate(
        input_ids=ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, **kwargs
    )
    sync()
    return out[0, ids.shape[1] :].tolist(), time.perf_counter() - t0


def run_case(name: str, dtype_name: str, path: Path, standin: bool, device: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from spectralcache import SpectralCache
    from spectralcache.integrations.unsloth import (
        last_spectral_cache,
        patch_unsloth_attention,
        resolve_config,
        unsloth_inference_paths,
    )
    from tiny_models import tiny_model, tiny_prompt

    dtype = getattr(torch, dtype_name)
    rec: dict = {"model": name, "dtype": dtype_name}
    ids = tiny_prompt(1, PROMPT).to(device)
    import unsloth

    loader = unsloth.FastModel if name == "gemma3" else unsloth.FastLanguageModel
    if standin:
        model = loader.from_model(tiny_model(name, dtype=dtype))
    else:
        kwargs = dict(max_seq_length=2048, dtype=dtype, load_in_4bit=False, fix_tokenizer=False)
        if name != "gemma3":
            kwargs["use_gradient_checkpointing"] = False
        model, _ = loader.from_pretrained(str(path), **kwargs)
    rec["loader"] = loader.__name__
    rec["model_class"] = f"{type(model).__module__}.{type(model).__name__}"
    attn = next(m for n, m in model.named_modules() if n.endswith("self_attn"))
    rec["attention_class"] = f"{type(attn).__module__}.{type(attn).__name__}"
    rec["attention_forward"] = f"{type(attn).forward.__module__}.{type(attn).forward.__qualname__}"
    rec["generate_before"] = getattr(model.generate, "__name__", str(model.generate))
    rec["inference_paths_before"] = unsloth_inference_paths(model)
    rec["plain_unsloth_tokens"], rec["plain_unsloth_s"] = _generate(model, ids)
    try:
        SpectralCache(model, "lossless")
        rec["unpatched_spectralcache_model"] = "no error"
    except Exception as e:
        rec["unpatched_spectralcache_model"] = _err(e)
    try:
        cfg_cache = SpectralCache(model.config, resolve_config("lossless", **_lossless(dtype_name)))
        toks, _ = _generate(model, ids, past_key_values=cfg_cache)
        rec["unpatched_config_cache_generate"] = {
            "tokens_equal_plain": toks == rec["plain_unsloth_tokens"],
            "cache_seq_length_after": cfg_cache.get_seq_length(),
        }
    except Exception as e:
        rec["unpatched_config_cache_generate"] = _err(e)
    rec["lossless_overrides"] = _lossless(dtype_name)
    patch_unsloth_attention(model, "lossless", **_lossless(dtype_name))
    rec["inference_paths_after_patch"] = unsloth_inference_paths(model)
    rec["attn_implementation_after_patch"] = model.config._attn_implementation
    rec["patched_lossless_tokens"], rec["patched_lossless_s"] = _generate(model, ids)
    cache = last_spectral_cache(model)
    rec["patched_cache"] = {
        "seq_length": cache.get_seq_length(),
        "blocks_compressed": cache.compression_stats()["blocks"],
    }
    rec["lossless_equal_plain_unsloth"] = rec["patched_lossless_tokens"] == rec["plain_unsloth_tokens"]
    rec["first_difference_at"] = next(
        (
            i
            for i, (a, b) in enumerate(zip(rec["patched_lossless_tokens"], rec["plain_unsloth_tokens"]))
            if a != b
        ),
        None,
    )
    # plain transformers on the same weights (reference; no Unsloth flags on this instance)
    ref = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    if name == "gemma3" and unsloth_inference_paths(ref):
        rec["transformers_reference"] = "skipped: Gemma3Attention.forward is replaced class-wide by Unsloth"
    else:
        rec["transformers_tokens"], _ = _generate(ref, ids)
        rec["lossless_equal_transformers"] = rec["patched_lossless_tokens"] == rec["transformers_tokens"]
        rec["plain_unsloth_equal_transformers"] = rec["plain_unsloth_tokens"] == rec["transformers_tokens"]
    del ref
    if name != "gemma3" and dtype_name == "float32":
        try:
            peft_model = loader.get_peft_model(
                model,
                r=8,
                lora_alpha=16,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                use_gradient_checkpointing=False,
            )
            try:
                _generate(peft_model, ids)
                rec["after_get_peft_model_without_repatch"] = "no error"
            except Exception as e:
                rec["after_get_peft_model_without_repatch"] = _err(e)
            patch_unsloth_attention(peft_model, "lossless", **_lossless(dtype_name))
            toks, _ = _generate(peft_model, ids)
            rec["peft_repatched_equal_plain_unsloth"] = toks == rec["plain_unsloth_tokens"]
            rec["peft_model_class"] = type(peft_model).__name__
        except Exception as e:
            rec["peft"] = _err(e) | {"traceback": traceback.format_exc()[-1500:]}
    if name == "qwen3":
        long_ids = tiny_prompt(1, 1400, seed=1).to(device)
        patch_unsloth_attention(model, "default")
        toks, secs = _generate(model, long_ids)
        report = last_spectral_cache(model).memory_report()
        rec["default_preset_1400"] = {
            "compressed_layers": report["compressed_layers"],
            "all_layers": report["all_layers"],
            "seconds": secs,
        }
    return rec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--standin", action="store_true", help="use tests/unsloth_standin (CPU dry run)")
    parser.add_argument("--models", default="llama,qwen3,gemma3")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    if args.standin:
        sys.path.insert(0, str(ROOT / "tests" / "unsloth_standin"))
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # First: Unsloth patches transformers when imported (importlib keeps import sorting off it).
    unsloth = importlib.import_module("unsloth")
    import torch
    import transformers

    device = "cuda" if torch.cuda.is_available() and not args.standin else "cpu"
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict = {
        "command": " ".join(sys.argv),
        "versions": {
            "unsloth": getattr(unsloth, "__version__", None),
            "unsloth_zoo": getattr(sys.modules.get("unsloth_zoo"), "__version__", None),
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        },
        "prompt_tokens": PROMPT,
        "new_tokens": NEW,
        "lossless_overrides": {"float32": SMALL, "half": {**SMALL, **EXACT_HALF}},
        "cases": [],
    }
    root = Path("/tmp/spectralcache_unsloth_tiny")
    paths = {name: _save_tiny(name, root) for name in args.models.split(",")}
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            t0 = time.perf_counter()
            try:
                rec = run_case(name, dtype_name, paths[name], args.standin, device)
            except Exception as e:
                rec = {
                    "model": name,
                    "dtype": dtype_name,
                    "error": _err(e),
                    "traceback": traceback.format_exc()[-3000:],
                }
            rec["case_seconds"] = time.perf_counter() - t0
            result["cases"].append(rec)
            print(
                json.dumps({k: v for k, v in rec.items() if "tokens" not in k}, default=str)[:3000],
                flush=True,
            )
            (args.out / "unsloth_check.json").write_text(json.dumps(result, indent=1, default=str))
    ok = [c.get("lossless_equal_plain_unsloth") for c in result["cases"]]
    print("lossless == plain Unsloth:", ok, flush=True)


if __name__ == "__main__":
    main()
