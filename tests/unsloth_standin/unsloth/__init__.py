"""Stand-in for unsloth 2026.10.9 (inference-routing parts only; see ../README.md).

Importing it applies the unsloth_zoo temporary patches, as ``import unsloth`` does.
"""

__version__ = "2026.10.9+standin"

from unsloth_zoo.temporary_patches import gemma as _gemma

_gemma.patch_Gemma3Attention_generic()

from unsloth.models.llama import FastLanguageModel  # noqa: E402
from unsloth.models.vision import FastModel  # noqa: E402

__all__ = ["FastLanguageModel", "FastModel"]


def _standin_restore() -> None:
    """Undo every class-level change this stand-in made (test isolation)."""
    from unsloth.models import llama

    llama._restore_pre_patch()
    _gemma.restore_Gemma3Attention()
