"""The keyword under which the installed transformers takes a cache.

transformers 5.24 renamed the model / ``generate`` argument ``past_key_values`` to ``cache``
(``@deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")``): both work, but the
old name warns (``FutureWarning``) on every call. Older 5.x releases (5.0 - 5.2x) only know
``past_key_values``, and their model forwards take ``**kwargs``, so passing ``cache=`` there
would be swallowed silently. The name is therefore chosen by feature, never by version:
whatever the model's own ``forward`` (or, for wrappers with a bare ``**kwargs`` signature
such as PEFT's, transformers' ``prepare_inputs_for_generation``) names as a parameter.

    model(input_ids=ids, **cache_kwargs(model, cache))
    model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=8)
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

__all__ = ["CACHE_ARGUMENT_NAMES", "cache_argument", "cache_kwargs", "passed_cache"]

CACHE_ARGUMENT_NAMES = ("cache", "past_key_values")


def _parameters(fn: Any) -> set[str]:
    try:
        # inspect follows functools.wraps' __wrapped__, i.e. through deprecate_kwarg.
        return set(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return set()


@functools.lru_cache(maxsize=1)
def _library_default() -> str:
    from transformers.generation.utils import GenerationMixin

    return (
        "cache"
        if "cache" in _parameters(GenerationMixin.prepare_inputs_for_generation)
        else "past_key_values"
    )


@functools.lru_cache(maxsize=256)
def _for_forward(forward: Any) -> str:
    # Keyed by the forward function itself, not the class: Unsloth and others rebind forwards.
    params = _parameters(forward)
    named = [name for name in CACHE_ARGUMENT_NAMES if name in params]
    # Exactly one named: that one. Both (a wrapper accepting either) or neither (**kwargs):
    # what the installed transformers' generation code uses.
    return named[0] if len(named) == 1 else _library_default()


def cache_argument(model: Any = None) -> str:
    """``"cache"`` or ``"past_key_values"``: the name ``model`` (or the installed transformers) prefers."""
    if model is None:
        return _library_default()
    forward = getattr(type(model), "forward", None)
    try:
        return _for_forward(forward)
    except TypeError:  # unhashable callable
        return _library_default()


def cache_kwargs(model: Any, cache: Any) -> dict[str, Any]:
    """``{name: cache}`` with the name :func:`cache_argument` picks for ``model``."""
    return {cache_argument(model): cache}


def passed_cache(kwargs: dict[str, Any]) -> Any:
    """The cache a call passed under either name (None if neither); raises if both are given."""
    given = [name for name in CACHE_ARGUMENT_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise ValueError("pass the cache once, as `cache=` or `past_key_values=`, not both")
    return kwargs[given[0]] if given else None
