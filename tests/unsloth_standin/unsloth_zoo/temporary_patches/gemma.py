"""Stand-in for unsloth_zoo.temporary_patches.gemma: ``Gemma3Attention.forward`` replaced class-wide.

The replacement updates the cache and then calls SDPA itself: the model's attention
implementation (``config._attn_implementation``) is never consulted. The original is stored
on the class under the name unsloth_zoo's ``patch_function`` uses.
"""

from __future__ import annotations

import torch.nn.functional as F

STORED = "_original_modeling_gemma3_Gemma3Attention_forward"


def sdpa_attention_forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None):
    """Q/K/V projections, optional q/k norms, RoPE, ``cache.update``, then SDPA -- always SDPA."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    q = self.q_proj(hidden_states).view(shape).transpose(1, 2)
    k = self.k_proj(hidden_states).view(shape).transpose(1, 2)
    v = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    if hasattr(self, "q_norm"):
        q, k = self.q_norm(q), self.k_norm(k)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    if cache is not None:
        k, v = cache.update(k, v, self.layer_idx)
    mask = attention_mask[..., : k.shape[-2]] if attention_mask is not None else None
    out = F.scaled_dot_product_attention(
        q,
        k,
        v,
        attn_mask=mask,
        is_causal=mask is None and q.shape[2] > 1,
        scale=self.scaling,
        enable_gqa=True,
    )
    return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


def forward_past_key_values(
    self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs
):
    # The real one takes past_key_values (transformers <= 5.17); accept 5.24's `cache` as well.
    cache = past_key_values if past_key_values is not None else kwargs.get("cache")
    return sdpa_attention_forward(self, hidden_states, position_embeddings, attention_mask, cache)


def patch_Gemma3Attention_generic() -> None:
    import transformers.models.gemma3.modeling_gemma3 as modeling

    cls = modeling.Gemma3Attention
    if cls.forward is forward_past_key_values:
        return
    setattr(cls, STORED, cls.forward)
    cls.forward = forward_past_key_values


def restore_Gemma3Attention() -> None:
    import transformers.models.gemma3.modeling_gemma3 as modeling

    cls = modeling.Gemma3Attention
    if STORED in vars(cls):
        cls.forward = vars(cls)[STORED]
        delattr(cls, STORED)
