"""Stand-in for unsloth.models.vision 2026.10.9: FastModel's ``generate`` forces a static cache."""

from __future__ import annotations

import types


def unsloth_base_fast_generate(self, *args, **kwargs):
    kwargs["cache_implementation"] = "static"
    return self._old_generate(*args, **kwargs)


class FastModel:
    @staticmethod
    def from_model(model, compiled_classes: bool = False):
        """What ``from_pretrained`` does to a loaded Gemma 3, for a model built in code
        (the attention forward was replaced class-wide at ``import unsloth``).

        ``compiled_classes=True``: the model and its attention modules are instances of the
        compiler's copies (``unsloth_compiled_module_gemma3``), as ``from_pretrained`` returned
        the real Gemma 3 270M on the H100 (a tiny random Gemma 3 came back as transformers'
        ``Gemma3ForCausalLM`` with compiled attention copies).
        """
        if compiled_classes:
            import unsloth_compiled_module_gemma3 as compiled

            model.__class__ = compiled.Gemma3ForCausalLM
            for layer in model.model.layers:
                layer.self_attn.__class__ = compiled.Gemma3Attention
        model._old_generate = model.generate
        model.generate = types.MethodType(unsloth_base_fast_generate, model)
        return model
