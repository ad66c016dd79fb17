"""Stand-in for ``unsloth_compiled_module_gemma3`` (unsloth_zoo's compiler output, 2026.10.9).

``FastModel.from_pretrained`` runs ``unsloth_compile_transformers`` (``fuse_lm_head=True``),
which writes a copy of transformers' ``modeling_gemma3`` to
``unsloth_compiled_cache/unsloth_compiled_module_gemma3.py`` and rebinds
``modeling_gemma3.Gemma3ForCausalLM`` / ``Gemma3Attention`` to the copies there, so the loaded
model is an instance of this module's ``Gemma3ForCausalLM`` (seen on the H100 with the real
Gemma 3 270M; reproduced on CPU by calling the real ``unsloth_compile_transformers`` with the
loader's arguments). What matters for a KV cache, mirrored here:

* both are standalone copies (the model class derives from transformers'
  ``Gemma3PreTrainedModel``, not from its ``Gemma3ForCausalLM``; the attention class from
  ``nn.Module`` only);
* the copy's attention class dispatches to SDPA itself and this module's source never calls the
  attention interface's lookup, so transformers' ``PreTrainedModel._can_set_attn_implementation``
  (a heuristic on the source of the model class's module) answers False for the model class:
  ``set_attn_implementation`` only warns and changes nothing;
* the attention forward is unsloth_zoo's class-wide replacement (the real record:
  ``unsloth_zoo.temporary_patches.gemma._make_gemma3_attn_forwards.<locals>.forward_past_key_values``).

The copy's ``Gemma3ForCausalLM.forward`` is, for inference, transformers' (the real one adds the
fused LM-head loss for training), so it is reused here rather than copied.
"""

from __future__ import annotations

from torch import nn
from transformers import GenerationMixin
from transformers.models.gemma3 import modeling_gemma3 as _transformers_gemma3
from unsloth_zoo.temporary_patches.gemma import forward_past_key_values


class Gemma3Attention(nn.Module):
    """Attention copy: SDPA hard-coded (the real copy's forward is unsloth_zoo's replacement)."""

    forward = forward_past_key_values


class Gemma3ForCausalLM(_transformers_gemma3.Gemma3PreTrainedModel, GenerationMixin):
    _tied_weights_keys = _transformers_gemma3.Gemma3ForCausalLM._tied_weights_keys
    config_class = _transformers_gemma3.Gemma3ForCausalLM.config_class
    forward = _transformers_gemma3.Gemma3ForCausalLM.forward
