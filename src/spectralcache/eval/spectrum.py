"""``spectralcache eval spectrum``: how low-rank are Gemma's real keys and values?

One prefill of a long prose prompt (the perplexity corpus, ``pydoc_data.topics``) with a
plain ``DynamicCache``; for every full-attention layer (the ones SpectralCache
compresses; 5, 11, 17 in Gemma 3 270M) the exact K/V are cut into blocks of
``block_size`` tokens and, per block and KV head:

- singular values of the keys **post-RoPE** (what the cache stores), of the keys
  **pre-RoPE** (captured by a forward hook on the layer's ``k_norm``, i.e. after the key
  norm and before the rotation) and of the values;
- the relative reconstruction error of the best rank-r approximation,
  ``||X - X_r||_F / ||X||_F = sqrt(sum_{i>r} s_i^2 / sum_i s_i^2)`` (Eckart-Young), for
  every r. This is the floor any rank-r block compressor can reach, before quantization
  and before keeping outliers exact.

Writes ``spectrum.json`` (all singular values, error curves, and the ranks needed for
10 % / 5 % / 1 % error) and ``spectrum.png``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from spectralcache.integrations.compat import cache_kwargs

KINDS = ("keys_pre_rope", "keys_post_rope", "values")


def relative_error_curve(s: torch.Tensor) -> list[float]:
    """``e[r]`` for r = 0..len(s): relative Frobenius error of the best rank-r approximation."""
    e2 = (s.double() ** 2).flip(0).cumsum(0).flip(0)  # tail energy from index r on
    total = float(e2[0]) if e2.numel() else 0.0
    if total == 0.0:
        return [0.0] * (s.numel() + 1)
    return [math.sqrt(float(x) / total) for x in e2] + [0.0]


def rank_for(curve: list[float], tol: float) -> int:
    return next(r for r, e in enumerate(curve) if e <= tol)


def block_spectra(x: torch.Tensor, block_size: int) -> list[list[float]]:
    """Singular values of each full block of ``x`` [H, T, D] (per head, blocks in order)."""
    out = []
    for h in range(x.shape[0]):
        for b in range(x.shape[1] // block_size):
            blk = x[h, b * block_size : (b + 1) * block_size].double()
            out.append(torch.linalg.svdvals(blk).tolist())
    return out


@torch.inference_mode()
def capture(model: Any, tokenizer: Any, length: int) -> dict[int, dict[str, torch.Tensor]]:
    """Exact K (pre and post RoPE) and V of every full-attention layer for a ``length``-token prompt."""
    from transformers import DynamicCache

    from spectralcache.eval.methods import full_attention_layers
    from spectralcache.eval.perplexity import segments

    ids = torch.tensor(
        [segments(tokenizer, length - 1, 1, 1)[0][:length]], device=next(model.parameters()).device
    )
    layers = full_attention_layers(model.config)
    pre: dict[int, torch.Tensor] = {}
    hooks = []
    decoder = model.model.layers
    for i in layers:
        attn = decoder[i].self_attn
        if not hasattr(attn, "k_norm"):
            raise ValueError(
                f"layer {i} has no k_norm to hook; pre-RoPE capture supports Gemma-style attention"
            )
        hooks.append(
            attn.k_norm.register_forward_hook(lambda mod, inp, out, i=i: pre.__setitem__(i, out.detach()))
        )
    try:
        cache = DynamicCache(config=model.config)
        model(input_ids=ids, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
    finally:
        for h in hooks:
            h.remove()
    return {
        i: {
            "keys_pre_rope": pre[i][0].float().cpu(),
            "keys_post_rope": cache.layers[i].keys[0].float().cpu(),
            "values": cache.layers[i].values[0].float().cpu(),
        }
        for i in layers
    }


def analyse(kv: dict[int, dict[str, torch.Tensor]], block_size: int) -> dict[str, Any]:
    res: dict[str, Any] = {"block_size": block_size, "layers": {}}
    for i, kinds in kv.items():
        entry = {}
        for kind in KINDS:
            spectra = block_spectra(kinds[kind], block_size)
            curves = [relative_error_curve(torch.tensor(s)) for s in spectra]
            n = len(curves[0])
            mean_curve = [sum(c[r] for c in curves) / len(curves) for r in range(n)]
            entry[kind] = {
                "singular_values": spectra,
                "relative_error_mean": mean_curve,
                "relative_error_max": [max(c[r] for c in curves) for r in range(n)],
                "rank_for_error": {str(t): max(rank_for(c, t) for c in curves) for t in (0.10, 0.05, 0.01)},
            }
        res["layers"][str(i)] = entry
    return res


def plot_spectrum(res: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = list(res["layers"])
    fig, axes = plt.subplots(len(layers), 2, figsize=(11, 3.3 * len(layers)), squeeze=False)
    colors = {"keys_pre_rope": "tab:blue", "keys_post_rope": "tab:orange", "values": "tab:green"}
    ranks = res.get("default_ranks", {})
    for row, layer in zip(axes, layers):
        e = res["layers"][layer]
        for kind in KINDS:
            sv = torch.tensor(e[kind]["singular_values"])
            sv = sv / sv[:, :1]
            row[0].semilogy(sv.mean(0).numpy(), color=colors[kind], label=kind)
            row[0].fill_between(range(sv.shape[1]), sv.min(0).values.numpy(), sv.max(0).values.numpy(),
                                color=colors[kind], alpha=0.15)  # fmt: skip
            row[1].plot(
                e[kind]["relative_error_mean"], color=colors[kind], label=f"{kind} (mean over blocks)"
            )
            row[1].plot(e[kind]["relative_error_max"], color=colors[kind], ls=":", lw=1)
        for name, r in ranks.items():
            row[1].axvline(r, color="gray", ls="--", lw=0.8)
            row[1].text(r, 0.95, f" {name}={r}", fontsize=7, color="gray", va="top")
        row[0].set_title(
            f"layer {layer}: σ_i / σ_1 per {res['block_size']}-token block (band: min-max)", fontsize=10
        )
        row[0].set_ylim(1e-6, 1.5)
        row[0].set_xlabel("index")
        row[0].legend(fontsize=7)
        row[0].grid(alpha=0.3)
        row[1].set_title(f"layer {layer}: best rank-r relative error (dotted: worst block)", fontsize=10)
        row[1].set_xlabel("rank")
        row[1].set_ylim(0, 1)
        row[1].set_xlim(0, 128)
        row[1].grid(alpha=0.3)
        row[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_spectrum(
    out: Path,
    *,
    length: int = 4096,
    block_size: int = 512,
    device: str = "cpu",
    dtype: str = "float32",
    model_name: str = "gemma3-270m",
    seed: int = 0,
    plots: bool = True,
    model: Any = None,
    tokenizer: Any = None,
) -> dict[str, Any]:
    if length < block_size:
        raise ValueError(f"--length ({length}) must be at least one block ({block_size})")
    if model is None or tokenizer is None:
        from spectralcache.eval.model import load_model

        model, tokenizer = load_model(model_name, device=device, dtype=dtype)
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    kv = capture(model, tokenizer, length)
    res = analyse(kv, block_size)
    res.update(length=length, device=device, dtype=dtype, model=model_name, seconds=time.perf_counter() - t0)
    try:
        from spectralcache.config import SpectralConfig

        cfg = SpectralConfig()
        res["default_ranks"] = {"rank_keys": cfg.rank_keys, "rank_values": cfg.rank_values}
    except ImportError:
        pass
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "spectrum.json").write_text(json.dumps(res) + "\n")
    summary = {
        layer: {kind: e[kind]["rank_for_error"] for kind in KINDS} for layer, e in res["layers"].items()
    }
    (out / "spectrum_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(summary, indent=2))
    if plots:
        print(plot_spectrum(res, out / "spectrum.png"))
    return res
