"""SpectralCache inside a model loaded with Unsloth.

What Unsloth does at inference (read from unsloth / unsloth_zoo 2026.10.9):

* ``FastLanguageModel`` (Llama, Mistral, Qwen2/3, Gemma, Gemma 2): ``pre_patch`` replaces the
  transformers classes' ``forward`` / ``prepare_inputs_for_generation`` with Unsloth's
  (``CausalLM_fast_forward``, ``LlamaModel_fast_forward``, ``LlamaAttention_fast_forward``,
  decode through ``LlamaModel_fast_forward_inference`` -> ``LlamaAttention_fast_forward_inference``),
  which turn any ``Cache`` into legacy tuples and keep their own buffers: a SpectralCache is
  dropped without a word. Since 2026.10 the replacements are *gated* per module
  (``_gated_method``): they run only on modules whose ``_unsloth_fast_path`` attribute is true
  (``mark_unsloth_fast_path``, at load and again in ``get_peft_model``), else the transformers
  original runs.
* ``FastModel`` / Gemma 3: unsloth_zoo replaces ``Gemma3Attention.forward`` (class-wide, at
  ``import unsloth``, original kept as ``_original_modeling_gemma3_Gemma3Attention_forward``)
  with one that updates the cache and then calls SDPA itself, so a registered attention
  function is never called; its ``generate`` wrapper forces ``cache_implementation="static"``.
* ``model.generate`` is replaced per instance (``unsloth_fast_generate`` /
  ``unsloth_base_fast_generate``; transformers' own kept as ``model._old_generate``).

:func:`patch_unsloth_attention` undoes this **for one model instance**, without touching
Unsloth's classes or functions: it sets ``_unsloth_fast_path = False`` on the instance's
modules, binds the transformers attention ``forward`` back onto attention modules whose class
forward Unsloth replaced (found from what Unsloth itself stored, never copied), switches the
model to the ``"spectral"`` attention implementation, and makes ``model.generate`` build a
fresh :class:`~spectralcache.cache.cache.SpectralCache` per call (dropping a forced
``cache_implementation``). Features are detected, not versions; a layout it does not
recognise raises :class:`UnslothLayoutError` naming the Unsloth version.

What is given up: Unsloth's fused inference for that model -- its fused QKV / RoPE / decode
kernels, per-module decode buffers, CUDA-graph decode and the static-cache ``torch.compile``
of ``generate``. Attention then runs transformers' modules with spectral attention (compressed
layers) and SDPA (the others). Training is unaffected: Unsloth's training forwards are the
same gated methods; call :func:`unpatch_unsloth_attention` (or patch again after
``get_peft_model``, which re-marks every module) as needed.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import sys
import types
from typing import Any

from torch import nn

from spectralcache.config import SpectralConfig, get_preset
from spectralcache.integrations.compat import CACHE_ARGUMENT_NAMES, cache_argument

__all__ = [
    "UNSLOTH_KEYWORD_ALIASES",
    "UnslothInferenceError",
    "UnslothLayoutError",
    "last_spectral_cache",
    "patch_unsloth_attention",
    "refuse_unsloth_inference",
    "resolve_config",
    "unpatch_unsloth_attention",
    "unsloth_inference_paths",
    "unsloth_version",
]

# The prototype's keyword names -> SpectralConfig fields.
UNSLOTH_KEYWORD_ALIASES = {
    "k_rank_keys": "rank_keys",
    "k_rank_values": "rank_values",
    "hot_buffer_size": "hot_size",
}

FAST_PATH_FLAG = "_unsloth_fast_path"
_STATE = "_spectralcache_unsloth_patch"
_MISSING = object()
_GENERATE_WRAPPER_NAMES = ("unsloth_fast_generate", "unsloth_base_fast_generate")


class UnslothLayoutError(RuntimeError):
    """Unsloth's inference layout on this model is not one this integration recognises."""


class UnslothInferenceError(RuntimeError):
    """A SpectralCache was combined with a model whose inference Unsloth still runs."""


# ---------------------------------------------------------------------- detection
def unsloth_version() -> str:
    """``"unsloth X, unsloth_zoo Y"`` for what is imported / installed (for error messages)."""
    parts = []
    for name in ("unsloth", "unsloth_zoo"):
        version = getattr(sys.modules.get(name), "__version__", None)
        if version is None:
            try:
                from importlib.metadata import version as dist_version

                version = dist_version(name)
            except Exception:
                version = "not installed"
        parts.append(f"{name} {version}")
    return ", ".join(parts)


def _unsloth_loaded() -> bool:
    return any(name.split(".")[0].startswith("unsloth") for name in list(sys.modules))


def _is_unsloth_code(fn: Any) -> bool:
    fn = getattr(fn, "__func__", fn)  # bound method -> function
    module = getattr(fn, "__module__", None) or ""
    return module.split(".")[0].startswith("unsloth")


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own a KV cache layer: an int ``layer_idx`` and K/V projections."""
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(getattr(m, "layer_idx", None), int)
        and any(hasattr(m, p) for p in ("k_proj", "qkv_proj", "kv_proj"))
    ]


def _gated_parts(fn: Any) -> tuple[Any, Any, Any] | None:
    """(fast, original, owner class) of an Unsloth ``_gated_method`` wrapper, or None."""
    if not getattr(fn, "_unsloth_gated", False):
        return None
    try:
        nonlocals = inspect.getclosurevars(fn).nonlocals
    except (TypeError, ValueError):
        return None
    if not {"fast", "original", "cls"} <= set(nonlocals):
        return None
    return nonlocals["fast"], nonlocals["original"], nonlocals["cls"]


def _class_forward_after(cls: type, module: nn.Module) -> Any:
    """What ``super(cls, module).forward`` resolves to (the gate's fallback for a missing original)."""
    mro = type(module).__mro__
    for klass in mro[mro.index(cls) + 1 :]:
        if "forward" in vars(klass):
            return vars(klass)["forward"]
    return None


def _effective_forward(module: nn.Module) -> Any:
    """The function that ``module.forward`` will actually run for this instance."""
    fn = vars(module).get("forward")
    if fn is not None:
        return getattr(fn, "__func__", fn)
    fn = type(module).forward
    for _ in range(8):  # gates do not nest in practice; bounded anyway
        parts = _gated_parts(fn)
        if parts is None:
            return fn
        fast, original, owner = parts
        if getattr(module, FAST_PATH_FLAG, False):
            return fast
        fn = _class_forward_after(owner, module) if not callable(original) else original
    return fn


def unsloth_inference_paths(model: nn.Module) -> list[str]:
    """What of Unsloth's inference path is active on this model instance (empty: none).

    Cheap when Unsloth is not imported (no module walk then).
    """
    if not _unsloth_loaded():
        return []
    found = []
    flagged = [name or "<model>" for name, m in model.named_modules() if getattr(m, FAST_PATH_FLAG, False)]
    if flagged:
        found.append(
            f"{len(flagged)} modules (e.g. {flagged[0]!r}) have {FAST_PATH_FLAG}=True, so Unsloth's gated fast "
            "forwards run, which turn the cache into tuples and keep their own K/V buffers"
        )
    for name, m in _attention_modules(model):
        fn = _effective_forward(m)
        if _is_unsloth_code(fn):
            found.append(
                f"{name}.forward is {fn.__module__}.{getattr(fn, '__qualname__', fn)} (Unsloth's), "
                "which never calls the registered attention function"
            )
    return found


def refuse_unsloth_inference(model: nn.Module) -> None:
    """Raise :class:`UnslothInferenceError` if Unsloth's inference path is active on ``model``."""
    found = unsloth_inference_paths(model)
    if found:
        more = f" (+{len(found) - 2} more)" if len(found) > 2 else ""
        raise UnslothInferenceError(
            f"{type(model).__name__} runs Unsloth's inference path ({unsloth_version()}): "
            f"{'; '.join(found[:2])}{more}. It would silently ignore a SpectralCache. Call "
            "spectralcache.integrations.unsloth.patch_unsloth_attention(model, config) first "
            "(again after get_peft_model)."
        )


# ---------------------------------------------------------------------- config
def resolve_config(
    config_or_preset: SpectralConfig | str | None = "default", **overrides: Any
) -> SpectralConfig:
    """A SpectralConfig from a preset name / config plus overrides (prototype names accepted)."""
    fields = {f.name for f in dataclasses.fields(SpectralConfig)}
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        name = UNSLOTH_KEYWORD_ALIASES.get(key, key)
        if name not in fields:
            raise TypeError(
                f"patch_unsloth_attention: unknown option {key!r}; SpectralConfig fields are "
                f"{sorted(fields - {'name'})} (aliases: {UNSLOTH_KEYWORD_ALIASES})"
            )
        if name in changes:
            raise TypeError(f"patch_unsloth_attention: {key!r} and another alias both set {name!r}")
        changes[name] = value
    if config_or_preset is None:
        config = get_preset("default")
    elif isinstance(config_or_preset, str):
        config = get_preset(config_or_preset)
    elif isinstance(config_or_preset, SpectralConfig):
        config = config_or_preset
    else:
        raise TypeError(
            f"config_or_preset must be a SpectralConfig or a preset name, got {type(config_or_preset).__name__}"
        )
    return config.replace(**changes) if changes else config


# ---------------------------------------------------------------------- patching
@dataclasses.dataclass
class _PatchState:
    config: SpectralConfig
    flags: list[tuple[nn.Module, Any]] = dataclasses.field(default_factory=list)
    forwards: list[tuple[nn.Module, Any]] = dataclasses.field(default_factory=list)
    generates: list[tuple[Any, Any]] = dataclasses.field(default_factory=list)
    last_cache: Any = None
    # True while this instance answers transformers' "can set attention implementation" itself
    can_set_attn_override: bool = False


def _base_model(model: Any) -> nn.Module:
    from transformers import PreTrainedModel

    base = model
    get_base = getattr(model, "get_base_model", None)  # PEFT wrappers
    if callable(get_base) and not isinstance(model, PreTrainedModel):
        base = get_base()
    if not isinstance(base, PreTrainedModel):
        raise TypeError(
            f"patch_unsloth_attention expects a transformers model (or a PEFT model around one), "
            f"got {type(model).__name__}"
        )
    return base


def _wrapper_chain(model: Any, base: nn.Module) -> list[Any]:
    """``model``, the objects between it and ``base`` (PEFT's LoraModel), and ``base``."""
    chain, seen, obj = [], set(), model
    while obj is not None and id(obj) not in seen:
        chain.append(obj)
        seen.add(id(obj))
        if obj is base:
            break
        obj = getattr(obj, "base_model", None) if getattr(obj, "base_model", None) is not obj else None
        if obj is not None and obj is not base and not isinstance(obj, nn.Module):
            break
    if base not in chain:
        chain.append(base)
    return chain


def _stock_forward(cls: type, modeling_names: tuple[str, ...] = ()) -> Any:
    """The non-Unsloth ``forward`` of attention class ``cls``: what Unsloth stored when replacing it."""
    candidates: list[Any] = []
    for klass in cls.__mro__:
        for key, value in vars(klass).items():
            # unsloth_zoo's patch_function keeps the original as _original_<module>_<Class>_forward.
            if key.startswith("_original_") and key.endswith("_forward"):
                candidates.append(value)
        if "forward" in vars(klass):
            parts = _gated_parts(vars(klass)["forward"])
            candidates.append(parts[1] if parts else vars(klass)["forward"])
    for modeling_name in modeling_names:
        # FastModel may rebind the modeling module's class to a compiled copy: ask the module.
        try:
            modeling = importlib.import_module(modeling_name)
        except ImportError:
            continue
        same = vars(modeling).get(cls.__name__)
        if isinstance(same, type) and same is not cls:
            candidates.append(_stock_forward(same))
    for fn in candidates:
        fn = getattr(fn, "__func__", fn)
        if callable(fn) and not _is_unsloth_code(fn) and fn is not nn.Module.forward:
            return fn
    for modeling_name in modeling_names:
        # Last resort (FastModel's compiled copies, which do not subclass the transformers class):
        # the class of the same name from a fresh load of transformers' own modeling file.
        fresh = _pristine_modeling(modeling_name)
        same = getattr(fresh, cls.__name__, None) if fresh is not None else None
        if isinstance(same, type) and "forward" in vars(same):
            return vars(same)["forward"]
    return None


def _modeling_modules(base: nn.Module) -> tuple[str, ...]:
    """transformers modeling modules this model's classes come from (by class and by model type)."""
    names: list[str] = []
    for klass in type(base).__mro__:
        if klass.__module__.startswith("transformers.models.") and ".modeling_" in klass.__module__:
            names.append(klass.__module__)
    try:
        from transformers.models.auto.configuration_auto import model_type_to_module_name
    except ImportError:  # pragma: no cover - every transformers 5.x has it
        model_type_to_module_name = None
    for cfg in (base.config, base.config.get_text_config(decoder=True)):
        model_type = getattr(cfg, "model_type", None)
        if model_type and model_type_to_module_name is not None:
            module = model_type_to_module_name(model_type)
            names.append(f"transformers.models.{module}.modeling_{module}")
    return tuple(dict.fromkeys(names))


_PRISTINE: dict[str, Any] = {}


def _pristine_modeling(modeling_name: str) -> Any:
    """transformers' modeling file ``modeling_name`` loaded afresh under a private name (cached).

    Unsloth may have rebound names in the imported module; this copy holds the functions as
    transformers ships them. Attention functions still come from the shared registry, so the
    ``"spectral"`` implementation registered there is what this copy's attention calls.
    """
    if modeling_name in _PRISTINE:
        return _PRISTINE[modeling_name]
    module = None
    try:
        import importlib.util

        spec = importlib.util.find_spec(modeling_name)
        if spec is not None and spec.origin:
            package, _, leaf = modeling_name.rpartition(".")
            private = importlib.util.spec_from_file_location(
                f"{package}._spectralcache_pristine_{leaf}", spec.origin
            )
            module = importlib.util.module_from_spec(private)
            sys.modules[private.name] = module  # dataclasses / inspect look the module up by name
            private.loader.exec_module(module)
    except Exception:
        module = None
    _PRISTINE[modeling_name] = module
    return module


_CAN_SET_ATTN = "_can_set_attn_implementation"


def _routes_through_attention_interface(fn: Any) -> bool:
    """Whether ``fn`` looks its attention function up in transformers' registry (by the global
    names its code uses: transformers' attention forwards call ``ALL_ATTENTION_FUNCTIONS``)."""
    fn = getattr(fn, "__func__", fn)
    try:
        fn = inspect.unwrap(fn)  # through functools.wraps decorators (deprecate_kwarg on 5.24)
    except ValueError:  # a __wrapped__ cycle
        return False
    code = getattr(fn, "__code__", None)
    return code is not None and "ALL_ATTENTION_FUNCTIONS" in code.co_names


def _attention_interface_in_use() -> bool:
    """Instance-level answer to ``PreTrainedModel._can_set_attn_implementation`` for a patched
    model whose class's module hides that its attention now routes through the interface."""
    return True


def _answer_can_set_attn_for_instance(base: nn.Module, state: _PatchState) -> None:
    """Let ``set_attn_implementation`` work on a patched model of a compiled class.

    transformers decides whether a model may switch its attention implementation from the
    *source of its class's module* (``PreTrainedModel._can_set_attn_implementation``: an
    ``*Attention(nn.Module)`` class there must call the attention interface). ``FastModel``
    returns an instance of the compiler's copy (``unsloth_compiled_module_gemma3.Gemma3ForCausalLM``,
    fused LM-head loss), whose module's attention copy hard-codes SDPA, so the answer is False
    and ``set_attn_implementation("spectral")`` would only warn. After patching, every attention
    module of this instance runs transformers' forward, which does route through the interface:
    when that holds, this instance answers True itself (an instance attribute shadowing the
    classmethod; the class is left alone). Undone by :func:`unpatch_unsloth_attention`.
    """
    can_set = getattr(type(base), _CAN_SET_ATTN, None)
    if can_set is None or can_set():
        return
    attention = _attention_modules(base)
    if attention and all(_routes_through_attention_interface(_effective_forward(m)) for _, m in attention):
        object.__setattr__(base, _CAN_SET_ATTN, _attention_interface_in_use)
        state.can_set_attn_override = True


def patch_unsloth_attention(
    model: Any, config_or_preset: SpectralConfig | str | None = "default", **overrides: Any
) -> Any:
    """Make an Unsloth-loaded model generate with a SpectralCache; returns ``model``.

    Args:
        model: what ``FastLanguageModel.from_pretrained`` / ``FastModel.from_pretrained`` /
            ``get_peft_model`` returned (a transformers model or a PEFT model around one).
        config_or_preset: a :class:`SpectralConfig` or a preset name (``"default"``,
            ``"lossless"``, ...).
        **overrides: SpectralConfig fields; the prototype's names are accepted too
            (``block_size``, ``k_rank_keys`` -> ``rank_keys``, ``k_rank_values`` ->
            ``rank_values``, ``hot_buffer_size`` -> ``hot_size``).

    Afterwards ``model.generate(ids, ...)`` uses a fresh SpectralCache per call (or the cache
    passed as ``cache=`` / ``past_key_values=``; ``cache_implementation="spectral"`` with
    ``cache_config=SpectralConfig | preset name`` picks another config for one call), and a
    direct ``model(ids, cache=SpectralCache(model, cfg))`` reads it through spectral attention.
    :func:`last_spectral_cache` returns the cache of the last ``generate`` (for
    ``memory_report()``).

    Given up for this model: Unsloth's fused inference (fused QKV / RoPE / attention decode
    kernels, its decode buffers and CUDA graphs, the static-cache compiled ``generate``);
    transformers' modules run instead, with spectral attention on the compressed layers.
    Patch again after ``get_peft_model`` (it re-marks every module for the fast path); undo
    with :func:`unpatch_unsloth_attention`.

    Raises:
        UnslothLayoutError: Unsloth's layout on this model is not recognised (names the
            version); nothing is changed then.
    """
    from spectralcache.integrations.transformers import enable

    config = resolve_config(config_or_preset, **overrides)
    base = _base_model(model)
    state: _PatchState | None = getattr(base, _STATE, None)
    if state is None:
        state = _PatchState(config=config)
    state.config = config
    flagged_before = {id(m) for m, _ in state.flags}
    patched_before = {id(m) for m, _ in state.forwards}
    new_flags: list[tuple[nn.Module, Any]] = []
    new_forwards: list[tuple[nn.Module, Any]] = []
    try:
        # 1. Gated fast paths off, per instance (PEFT wrapper modules included).
        roots = [model] if isinstance(model, nn.Module) else [base]
        for m in {id(x): x for root in roots for x in root.modules()}.values():
            if getattr(m, FAST_PATH_FLAG, False):
                if id(m) not in flagged_before:
                    new_flags.append((m, vars(m).get(FAST_PATH_FLAG, _MISSING)))
                object.__setattr__(m, FAST_PATH_FLAG, False)
        # 2. Attention forwards that Unsloth replaced class-wide: bind the stock one per instance.
        modeling_names = _modeling_modules(base)
        for name, m in _attention_modules(base):
            fn = _effective_forward(m)
            if not _is_unsloth_code(fn):
                continue
            stock = _stock_forward(type(m), modeling_names)
            if stock is None:
                raise UnslothLayoutError(
                    f"{name}: forward is {fn.__module__}.{getattr(fn, '__qualname__', fn)} and no "
                    f"transformers original was found (looked for Unsloth's stored _original_*_forward and "
                    f"for a class of that name in {list(modeling_names)}); this Unsloth "
                    f"layout is not supported ({unsloth_version()})"
                )
            if id(m) not in patched_before:
                new_forwards.append((m, vars(m).get("forward", _MISSING)))
            object.__setattr__(m, "forward", types.MethodType(stock, m))
        left = unsloth_inference_paths(base)
        if left:
            raise UnslothLayoutError(
                f"Unsloth's inference path is still active after patching ({unsloth_version()}): "
                + "; ".join(left[:3])
            )
    except Exception:
        _restore(new_flags, new_forwards, [])
        raise
    state.flags += new_flags
    state.forwards += new_forwards
    object.__setattr__(base, _STATE, state)
    _answer_can_set_attn_for_instance(base, state)
    enable(base)
    # 3. generate: transformers' own (per-instance Unsloth wrappers removed), fresh SpectralCache.
    recorded = {id(obj) for obj, _ in state.generates}

    def record(obj: Any) -> None:
        if id(obj) not in recorded:
            state.generates.append((obj, vars(obj).get("generate", _MISSING)))
            recorded.add(id(obj))

    for obj in _wrapper_chain(model, base):
        current = vars(obj).get("generate", _MISSING)
        if current is _MISSING or getattr(current, "__func__", None) is _spectral_generate:
            continue
        record(obj)
        del vars(obj)["generate"]
    record(model)
    vars(model)["generate"] = types.MethodType(_spectral_generate, model)
    return model


def _restore(
    flags: list[tuple[Any, Any]], forwards: list[tuple[Any, Any]], generates: list[tuple[Any, Any]]
) -> None:
    for m, previous in reversed(flags):
        if previous is _MISSING:
            vars(m).pop(FAST_PATH_FLAG, None)
        else:
            object.__setattr__(m, FAST_PATH_FLAG, previous)
    for m, previous in reversed(forwards):
        if previous is _MISSING:
            vars(m).pop("forward", None)
        else:
            object.__setattr__(m, "forward", previous)
    for obj, previous in reversed(generates):
        if previous is _MISSING:
            vars(obj).pop("generate", None)
        else:
            object.__setattr__(obj, "generate", previous)


def unpatch_unsloth_attention(model: Any) -> Any:
    """Undo :func:`patch_unsloth_attention`: Unsloth's flags, forwards and generate come back."""
    from spectralcache.integrations.transformers import disable

    base = _base_model(model)
    state: _PatchState | None = getattr(base, _STATE, None)
    if state is None:
        return model
    _restore(state.flags, state.forwards, state.generates)
    object.__delattr__(base, _STATE)
    disable(base)  # needs the instance's answer, if any, to switch attention back
    if state.can_set_attn_override:
        vars(base).pop(_CAN_SET_ATTN, None)
    return model


def last_spectral_cache(model: Any) -> Any:
    """The SpectralCache the patched ``model.generate`` used last (None before the first call)."""
    state = getattr(_base_model(model), _STATE, None)
    return state.last_cache if state is not None else None


def _spectral_generate(self: Any, *args: Any, **kwargs: Any) -> Any:
    """``generate`` of a patched model: transformers' own, with a SpectralCache."""
    from spectralcache.cache.cache import SpectralCache
    from spectralcache.integrations.compat import passed_cache

    base = _base_model(self)
    state: _PatchState = getattr(base, _STATE)
    # get_peft_model (or anything else) may have re-armed Unsloth's fast path since patching.
    refuse_unsloth_inference(base)
    implementation = kwargs.pop("cache_implementation", None)
    cache_config = kwargs.pop("cache_config", None)
    cache = passed_cache(kwargs)
    for name in CACHE_ARGUMENT_NAMES:
        kwargs.pop(name, None)
    if implementation not in (None, "spectral"):
        # An explicit other cache type: the caller's choice (spectral attention then reads
        # nothing compressed and runs SDPA for every layer).
        if cache is not None:
            kwargs[cache_argument(base)] = cache
        return type(self).generate(self, *args, cache_implementation=implementation, **kwargs)
    if cache is None:
        if cache_config is None:
            cache_config = state.config
        cache = SpectralCache(base, resolve_config(cache_config))
    elif cache_config is not None:
        raise ValueError("pass either a cache or cache_config, not both")
    kwargs[cache_argument(base)] = cache
    generation_config = kwargs.get("generation_config") or getattr(base, "generation_config", None)
    if generation_config is not None and getattr(generation_config, "cache_implementation", None):
        # A cache_implementation forced on the model (Unsloth pins "static") conflicts with a cache.
        generation_config = generation_config.__class__.from_dict(generation_config.to_dict())
        generation_config.cache_implementation = None
        kwargs["generation_config"] = generation_config
    state.last_cache = cache
    was_training = bool(getattr(self, "training", False))
    if was_training:
        self.eval()  # Unsloth's generate switches to inference as well
    try:
        return type(self).generate(self, *args, **kwargs)
    finally:
        if was_training:
            self.train()
