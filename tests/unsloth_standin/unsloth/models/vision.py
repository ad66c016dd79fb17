"""Stand-in for unsloth.models.vision 2026.10.9: FastModel's ``generate`` forces a static cache."""

from __future__ import annotations

import types


def unsloth_base_fast_generate(self, *args, **kwargs):
    kwargs["cache_implementation"] = "static"
    return self._old_generate(*args, **kwargs)


class FastModel:
    @staticmethod
    def from_model(model):
        """What ``from_pretrained`` does to a loaded Gemma 3, for a model built in code
        (the attention forward was replaced class-wide at ``import unsloth``)."""
        model._old_generate = model.generate
        model.generate = types.MethodType(unsloth_base_fast_generate, model)
        return model
