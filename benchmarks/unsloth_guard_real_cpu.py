"""A config-built SpectralCache given to an unpatched Unsloth Llama / Qwen3 raises (real Unsloth, CPU).

Unsloth cannot load a model without a GPU, so this applies to tiny random-weight models built in
code exactly what ``FastLlamaModel.from_pretrained`` does to the transformers classes around
``pre_patch`` (unsloth 2026.10.9, ``unsloth/models/llama.py``: restore compiled classes, snapshot,
``pre_patch()``, record, gate) and to the instance (``mark_unsloth_fast_path``). Then, per model:

* a *plain* model of the same class (not marked: the gates run transformers' originals) with
  ``spectralcache.enable`` and a config-built cache generates as usual (the guard stays quiet);
* the marked model with ``SpectralCache(model.config, cfg)``: ``generate`` and a direct forward
  must raise ``SpectralCacheBypassedError`` (Unsloth's ``_fast_prepare_inputs_for_generation`` /
  ``_cache_as_legacy_tuple`` ask the cache its length), with nothing written to the cache;
* after ``patch_unsloth_attention(model, cfg)`` the same cache is used and the greedy tokens equal
  the plain model's.

Run in a virtualenv with unsloth / unsloth_zoo 2026.10.x and transformers <= 5.17:

    UNSLOTH_ALLOW_CPU=1 PYTHONPATH=src python benchmarks/unsloth_guard_real_cpu.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT, NEW = 200, 8


def _error(e: BaseException) -> dict:
    return {"type": type(e).__name__, "message": str(e)[:700]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    unsloth = importlib.import_module("unsloth")  # first, as Unsloth requires
    import torch
    import transformers
    from unsloth.models import llama as unsloth_llama
    from unsloth.models.qwen3 import FastQwen3Model

    import spectralcache
    from spectralcache import SpectralCache
    from spectralcache.integrations.compat import cache_kwargs
    from spectralcache.integrations.unsloth import (
        last_spectral_cache,
        patch_unsloth_attention,
        resolve_config,
        unsloth_inference_paths,
    )
    from tiny_models import tiny_model, tiny_prompt

    def greedy(model, ids, cache) -> list[int]:
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0,
                **cache_kwargs(model, cache),
            )  # fmt: skip
        return out[0, ids.shape[1] :].tolist()

    result: dict = {
        "command": " ".join(sys.argv),
        "versions": {
            "unsloth": unsloth.__version__,
            "unsloth_zoo": sys.modules["unsloth_zoo"].__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
        "models": {},
    }
    cfg = resolve_config("lossless", block_size=32, hot_size=16, landmarks=4)
    for name, patcher in (("llama", unsloth_llama.FastLlamaModel), ("qwen3", FastQwen3Model)):
        row: dict = {}
        try:
            # Built before pre_patch: Unsloth's replacement rotary-embedding __init__ asks CUDA
            # for the current device. The forwards are class attributes, so both instances run
            # whatever the classes hold after the patch below.
            plain, model = tiny_model(name), tiny_model(name)
            unsloth_llama._restore_uncompiled_transformers_classes(patcher)
            snapshot = unsloth_llama._snapshot_transformers_modules(patcher)
            patcher.pre_patch()
            unsloth_llama._record_pre_patch_changes(snapshot)
            unsloth_llama._gate_pre_patch_to_unsloth_models(snapshot)
            unsloth_llama.mark_unsloth_fast_path(model)
            ids = tiny_prompt(1, PROMPT)
            spectralcache.enable(plain)
            plain_cache = SpectralCache(plain.config, cfg)
            want = greedy(plain, ids, plain_cache)
            row["plain_model_config_cache_seq_length"] = plain_cache.get_seq_length()
            row["unsloth_inference_paths_marked_model"] = unsloth_inference_paths(model)
            cache = SpectralCache(model.config, cfg)
            for label, call in {
                "generate": lambda m=model, c=cache, i=ids: greedy(m, i, c),
                "forward": lambda m=model, c=cache, i=ids: m(i, **cache_kwargs(m, c)),
            }.items():
                try:
                    with torch.no_grad():
                        call()
                    row[f"unpatched_{label}"] = "no error"
                except Exception as e:
                    row[f"unpatched_{label}"] = _error(e)
            row["cache_seq_length_after_refusals"] = cache.get_seq_length()
            patch_unsloth_attention(model, cfg)
            got = greedy(model, ids, cache)
            row["patched_same_cache_used"] = last_spectral_cache(model) is cache
            row["patched_cache_seq_length"] = cache.get_seq_length()
            row["patched_equal_plain"] = got == want
            row["ok"] = bool(
                all(
                    isinstance(row[f"unpatched_{k}"], dict)
                    and row[f"unpatched_{k}"]["type"] == "SpectralCacheBypassedError"
                    for k in ("generate", "forward")
                )
                and row["cache_seq_length_after_refusals"] == 0
                and row["plain_model_config_cache_seq_length"] == PROMPT + NEW - 1
                and row["patched_same_cache_used"]
                and row["patched_equal_plain"]
            )
        except Exception as e:
            row["error"] = _error(e) | {"traceback": traceback.format_exc()[-2500:]}
            row["ok"] = False
        result["models"][name] = row
        print(name, json.dumps(row, default=str)[:1500], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "unsloth_guard_real_cpu.json").write_text(json.dumps(result, indent=1, default=str))
    print("ok:", {k: v["ok"] for k, v in result["models"].items()})


if __name__ == "__main__":
    main()
