"""Exact inverse / re-application of a model's rotary position embedding, for ``pre_rope`` blocks.

Mechanism (why no hooks are needed): transformers applies RoPE before ``Cache.update``; the
cache only sees post-RoPE keys ``k_post = a * R(p) k_pre`` (``a`` = the rotary module's
``attention_scaling``, ``p`` = the token's position id). We un-rotate a key by the *pure*
rotation ``R(i)^-1`` of its **cache index** ``i`` (not its position id) using the model's own
``inv_freq`` (taken from its rotary module, so rope scaling such as llama3 / yarn / linear and
Gemma 3's per-layer-type theta are included), and attention re-rotates with ``R(i)``:

* exactness: ``R(i) R(i)^-1 = I`` whatever ``i`` is, so the re-rotated key equals the cached
  post-RoPE key to float32 rounding, independent of padding or position-id conventions;
* low rank: within one batch row, position ids are cache indices minus a constant (left padding
  shifts a row by its pad count), so the un-rotated keys are ``a * R(p - i) k_pre`` with
  ``p - i`` constant over the row: a fixed orthogonal map (times ``a``) of the true pre-RoPE
  keys, which has exactly their singular values. Compression quality is therefore that of the
  true pre-RoPE keys.

Only the rotate-half ("GPT-NeoX") layout used by Llama / Mistral / Qwen / Gemma is supported;
partial rotary (``2 * len(inv_freq) < head_dim``) rotates the leading dims only, as those models do.
The angle is computed exactly as the models compute it: ``position.float() * inv_freq`` in float32.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RopeRotator", "find_rotary_inv_freq", "rotate_block_keys", "rotate_by_positions"]


def rotate_by_positions(
    x: torch.Tensor, positions: torch.Tensor, inv_freq: torch.Tensor, sign: float = 1.0
) -> torch.Tensor:
    """Rotate-half RoPE of ``x [..., T, D]`` by ``sign * float32(positions) * inv_freq``.

    ``positions`` broadcasts to ``x.shape[:-1]``; the leading ``2 * len(inv_freq)`` dims are
    rotated, the rest pass through. Computed in float32, returned in ``x.dtype``.
    """
    rd = 2 * inv_freq.shape[-1]
    if rd == 0 or rd > x.shape[-1]:
        raise ValueError(
            f"rotary embedding with {inv_freq.shape[-1]} frequencies does not fit head_dim={x.shape[-1]}"
        )
    freqs = positions.to(x.device)[..., None].float() * inv_freq.to(x.device, torch.float32)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    xf = x.float()
    xr = xf[..., :rd]
    half = rd // 2
    rotated_half = torch.cat((-xr[..., half:], xr[..., :half]), dim=-1)
    yr = xr * cos + rotated_half * (sin * sign)
    if rd < xf.shape[-1]:
        yr = torch.cat((yr, xf[..., rd:]), dim=-1)
    return yr.to(x.dtype)


def rotate_block_keys(keys: torch.Tensor, block_starts: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Re-rotate pre-RoPE block keys ``[B, H, nb, T, D]`` whose blocks start at cache indices
    ``block_starts [nb]`` with R(+angle(cache index)); returns post-RoPE keys in ``keys.dtype``.

    A pure function of tensors (what ``SpectralLayerState.rope_inv_freq`` feeds); no host sync.
    """
    if keys.ndim != 5:
        raise ValueError(f"rotate_block_keys expects keys [B, H, nb, T, D], got shape {tuple(keys.shape)}")
    nb, t = keys.shape[2], keys.shape[3]
    if block_starts.numel() != nb:
        raise ValueError(f"rotate_block_keys: {block_starts.numel()} block starts for {nb} blocks")
    positions = block_starts.to(keys.device, torch.int64).view(nb, 1) + torch.arange(
        t, device=keys.device, dtype=torch.int64
    )
    return rotate_by_positions(keys, positions, inv_freq)


class RopeRotator:
    """Pure RoPE rotation by cache index, with the model's inverse frequencies."""

    def __init__(self, inv_freq: torch.Tensor, head_dim: int):
        inv_freq = inv_freq.detach().to(torch.float32).flatten().clone()
        rot_dim = 2 * inv_freq.numel()
        if rot_dim == 0 or rot_dim > head_dim:
            raise ValueError(
                f"rotary embedding with {inv_freq.numel()} frequencies does not fit head_dim={head_dim}"
            )
        if not torch.isfinite(inv_freq).all():
            raise ValueError("rotary inv_freq contains NaN/inf")
        self.inv_freq = inv_freq
        self.rot_dim = rot_dim
        self.head_dim = head_dim

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply R(positions): ``x [..., T, D]``, ``positions`` broadcastable to ``x.shape[:-1]``."""
        return rotate_by_positions(x, positions, self.inv_freq, 1.0)

    def unrotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Apply R(positions)^-1 (the exact inverse of :meth:`rotate`)."""
        return rotate_by_positions(x, positions, self.inv_freq, -1.0)

    def rotate_block_keys(self, keys: torch.Tensor, block_starts: torch.Tensor) -> torch.Tensor:
        """:func:`rotate_block_keys` with this rotator's inverse frequencies."""
        return rotate_block_keys(keys, block_starts, self.inv_freq)


def find_rotary_inv_freq(model: nn.Module, layer_type: str | None) -> torch.Tensor:
    """The inverse frequencies the model uses for layers of ``layer_type``.

    Looks for the decoder's rotary-embedding module (a module with an ``inv_freq`` buffer, or
    ``{layer_type}_inv_freq`` for models with per-layer-type RoPE such as Gemma 3), skipping
    vision towers.
    """
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if "vision" in name or "visual" in name:
            continue
        has_typed = layer_type is not None and hasattr(module, f"{layer_type}_inv_freq")
        if has_typed or isinstance(getattr(module, "inv_freq", None), torch.Tensor):
            candidates.append((name, module))
    if not candidates:
        raise ValueError(
            f"key_space='pre_rope' needs the model's rotary embedding, but {type(model).__name__} has no "
            "module with an inv_freq buffer"
        )
    # Prefer the shallowest module (the decoder's shared rotary embedding).
    candidates.sort(key=lambda item: item[0].count("."))
    _, module = candidates[0]
    if layer_type is not None and hasattr(module, f"{layer_type}_inv_freq"):
        inv_freq = getattr(module, f"{layer_type}_inv_freq")
    else:
        inv_freq = module.inv_freq
    return inv_freq.detach().to(torch.float32).clone()
