"""Block-compression study on the real Gemma 3 270M K/V (CPU, float32).

Captures the model's own keys / values / post-RoPE queries of its full-attention layers for a
4096-token prose prompt, then compresses 7 blocks of 512 per layer with several variants and
reports reconstruction and attention-output errors (last 256 real queries vs exact attention),
compression time, and SpectralCache.memory_report() ratios at 2128 / 3000 / 4096 tokens.

python benchmarks/cache_block_study.py [--out benchmarks/results/cache_block_study.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from spectralcache.cache.block import compress_blocks, reconstruct
from spectralcache.cache.cache import SpectralCache
from spectralcache.cache.rope import RopeRotator, find_rotary_inv_freq
from spectralcache.config import SpectralConfig

L, T, NB, N = 16, 512, 7, 4096


def capture(model, tok) -> dict:
    from transformers import DynamicCache
    from transformers.models.gemma3.modeling_gemma3 import apply_rotary_pos_emb

    from spectralcache.eval.haystack import prose_source

    ids = tok(prose_source(), return_tensors="pt").input_ids
    while ids.shape[1] < N:
        ids = torch.cat([ids, ids[:, 1:]], 1)
    ids = ids[:, :N]
    full = [i for i, t in enumerate(model.config.layer_types) if t == "full_attention"]
    qs: dict[int, torch.Tensor] = {}
    hooks = [
        model.model.layers[i].self_attn.q_norm.register_forward_hook(
            lambda m, a, out, i=i: qs.__setitem__(i, out.detach())
        )
        for i in full
    ]
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    for h in hooks:
        h.remove()
    pos = torch.arange(N)[None]
    data = {"full": full}
    for i in full:
        cos, sin = model.model.rotary_emb(qs[i], pos, "full_attention")
        q, _ = apply_rotary_pos_emb(qs[i], qs[i], cos, sin)
        data[i] = {
            "k": cache.layers[i].keys.clone(),
            "v": cache.layers[i].values.clone(),
            "q": q[:, :, -256:].clone(),
            "scaling": model.model.layers[i].self_attn.scaling,
        }
    return data


def variant_errors(cfg: SpectralConfig, d: dict, rot: RopeRotator) -> dict:
    k, v, q = d["k"], d["v"], d["q"]
    dim = k.shape[-1]
    sl = slice(L, L + NB * T)
    kb = k[:, :, sl].reshape(1, 1, NB, T, dim)
    vb = v[:, :, sl].reshape(1, 1, NB, T, dim)
    starts = L + T * torch.arange(NB)
    fit = kb
    rotate = None
    if cfg.key_space == "pre_rope":
        fit = rot.unrotate(k[:, :, sl], L + torch.arange(NB * T)).reshape(1, 1, NB, T, dim)

        def rotate(x):
            return rot.rotate_block_keys(x, starts)

    rk_, rv_ = cfg.ranks_for(dim)
    t0 = time.perf_counter()
    comp = compress_blocks(fit, vb, cfg, rk_, rv_, exact_keys=kb)
    seconds = time.perf_counter() - t0
    rk, rv = reconstruct(comp, rotate)
    kh, vh = k.clone(), v.clone()
    kh[:, :, sl] = rk.reshape(1, 1, NB * T, dim)
    vh[:, :, sl] = rv.reshape(1, 1, NB * T, dim)
    qpos = torch.arange(N - 256, N)
    mask = torch.arange(N)[None] <= qpos[:, None]

    def attn(kx, vx):
        s = (q.float() @ kx.float().mT) * d["scaling"]
        return s.masked_fill(~mask, float("-inf")).softmax(-1) @ vx.float()

    ref, out = attn(k, v), attn(kh, vh)
    return {
        "key_error": ((rk - kb).norm() / kb.norm()).item(),
        "value_error": ((rv - vb).norm() / vb.norm()).item(),
        "attention_output_error": ((out - ref).norm(dim=-1) / ref.norm(dim=-1)).mean().item(),
        "ms_per_block": 1000 * seconds / NB,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cache_block_study.json")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from spectralcache.eval.model import load_model

    model, tok = load_model(dtype=torch.float32)
    t0 = time.perf_counter()
    data = capture(model, tok)
    capture_s = time.perf_counter() - t0
    dim = model.config.head_dim
    rot = RopeRotator(find_rotary_inv_freq(model, "full_attention"), dim)
    base = SpectralConfig(rank_keys=32, rank_values=64, outliers_per_block=32, coeff_bits=8)
    variants = {
        "lowrank 32/64 int8, 32 outliers": base,
        "+ refit after outliers": base.replace(refit_after_outliers=True),
        "no outliers": base.replace(outliers_per_block=0),
        "pre_rope": base.replace(key_space="pre_rope"),
        "int4 coefficients": base.replace(coeff_bits=4),
        "exact SVD": base.replace(svd_method="exact"),
        "16-bit coefficients": base.replace(coeff_bits=16),
    }
    results: dict = {"variants": {}, "memory": {}}
    for name, cfg in variants.items():
        results["variants"][name] = {str(i): variant_errors(cfg, data[i], rot) for i in data["full"]}
        row = "  ".join(
            f"L{i}: K {r['key_error']:.4f} V {r['value_error']:.4f} out {r['attention_output_error']:.4f} "
            f"{r['ms_per_block']:.0f} ms/blk"
            for i, r in results["variants"][name].items()
        )
        print(f"{name:34s} {row}", flush=True)
    for preset in ("lowrank", "default", "aggressive"):
        try:
            cfg = SpectralConfig.from_preset(preset)
        except ValueError:
            continue
        for n in (2128, 3000, 4096):
            cache = SpectralCache(model.config, cfg)
            for i in data["full"]:
                cache.update(data[i]["k"][:, :, :n], data[i]["v"][:, :, :n], i)
                cache.layers[i].release_chunk()
            rep = cache.memory_report()
            layer = cache.layers[data["full"][0]]
            entry = {
                "config": repr(cfg),
                "blocks_per_layer": layer.num_blocks,
                "hot_tokens": layer.hot_len,
                "compressed_layers_ratio": rep["compressed_layers"]["ratio"],
                "cold_blocks_ratio": rep["cold_blocks"]["ratio"],
            }
            results["memory"][f"{preset}@{n}"] = entry
            shown = {k: v for k, v in entry.items() if k != "config"}
            print(f"memory {preset}@{n}: {shown}", flush=True)
    results["machine"] = f"CPU, {torch.get_num_threads()} thread(s); capture {capture_s:.0f} s"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
