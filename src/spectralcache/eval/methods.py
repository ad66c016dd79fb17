"""Methods compared by the evaluation: a name on the command line -> a cache factory.

A method is written ``kind[:option,option,...]`` and several are joined by commas::

    --methods baseline,spectral:default,spectral:rank_keys=16,rank_values=32,quantized:int4,streaming:sinks=4,window=1024

Commas separate both methods and options; a token that names a kind (``baseline`` or
``kind:...``) starts a new method and a bare ``key=value`` token continues the previous
one. Kinds:

- ``baseline``: transformers' ``DynamicCache`` (the ceiling; the runner always runs it
  first, because every row's compression ratio is taken against it on the same sample).
- ``spectral[:PRESET][,field=value...]``: ``SpectralCache(model, SpectralConfig.from_preset(PRESET, **fields))``;
  ``PRESET`` defaults to ``default``; fields are any :class:`SpectralConfig` field.
- ``quantized:int4|int2[,group=64,residual=128,backend=packed|hqq|quanto]``: KIVI-style
  quantized K/V on the full-attention layers (``spectralcache.eval.baselines``).
- ``streaming:window=W[,sinks=4]``: StreamingLLM sinks + recent window on the
  full-attention layers (``spectralcache.eval.baselines``).

Every method has a ``name`` in canonical form (options in the order given) that is
recorded in each result row, and a ``slug`` usable as a directory name.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from spectralcache.cache.memory import held_bytes

KINDS = ("baseline", "spectral", "quantized", "streaming")
_KIND_RE = re.compile(r"^([A-Za-z_]+)(?::(.*))?$")


@dataclass(frozen=True)
class Method:
    """One cache configuration under evaluation."""

    name: str
    kind: str
    preset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def slug(self) -> str:
        """Directory-safe form of :attr:`name` (``:`` and ``,`` become ``-`` and ``_``)."""
        s = self.name.replace(":", "-").replace(",", "_")
        return re.sub(r"[^A-Za-z0-9._=+-]", "_", s)

    @property
    def is_baseline(self) -> bool:
        return self.kind == "baseline"

    def make_cache(self, model: Any) -> Any:
        """A fresh cache for one sample (``None`` means: let transformers build a DynamicCache).

        Also switches the model's attention implementation to what the method needs:
        SpectralCache attends through the spectral attention function, everything else
        through the model's stock attention.
        """
        return _FACTORIES[self.kind](self, model)

    def describe(self) -> dict[str, Any]:
        """What the name stood for when it ran (presets can change between commits)."""
        if self.kind != "spectral":
            return {"kind": self.kind, "preset": self.preset, **self.options}
        import dataclasses

        cfg = dataclasses.asdict(self.spectral_config())
        return {"kind": "spectral", **{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}}

    def spectral_config(self) -> Any:
        if self.kind != "spectral":
            raise TypeError(f"{self.name} is not a spectral method")
        from spectralcache.config import SpectralConfig

        return SpectralConfig.from_preset(self.preset or "default", **self.options)


def _plain_attention(model: Any) -> None:
    try:
        from spectralcache.integrations.transformers import disable, is_enabled
    except ImportError:  # integration not installed: the model is on its stock attention
        return
    if is_enabled(model):
        disable(model)


def _make_baseline(method: Method, model: Any) -> Any:
    from transformers import DynamicCache

    _plain_attention(model)
    return DynamicCache(config=model.config)


def _make_spectral(method: Method, model: Any) -> Any:
    from spectralcache.cache.cache import SpectralCache

    return SpectralCache(model, method.spectral_config())  # enables spectral attention itself


def _make_quantized(method: Method, model: Any) -> Any:
    from spectralcache.eval.baselines import make_quantized_cache

    _plain_attention(model)
    o = method.options
    return make_quantized_cache(
        model,
        nbits=int(method.preset[3:]),
        q_group_size=o.get("group", 64),
        residual_length=o.get("residual", 128),
        backend=o.get("backend", "packed"),
    )


def _make_streaming(method: Method, model: Any) -> Any:
    from spectralcache.eval.baselines import make_sink_window_cache

    _plain_attention(model)
    return make_sink_window_cache(
        model, n_sink=method.options.get("sinks", 4), window=method.options["window"]
    )


_FACTORIES: dict[str, Callable[[Method, Any], Any]] = {
    "baseline": _make_baseline,
    "spectral": _make_spectral,
    "quantized": _make_quantized,
    "streaming": _make_streaming,
}

# kind -> (allowed option keys, required keys, allowed presets or None for "any / checked later")
_SCHEMA: dict[str, tuple[set[str], set[str], set[str] | None]] = {
    "baseline": (set(), set(), set()),
    "spectral": (set(), set(), None),
    "quantized": ({"group", "residual", "backend"}, set(), {"int4", "int2"}),
    "streaming": ({"sinks", "window"}, {"window"}, set()),
}


def parse_value(text: str) -> Any:
    """A method option's value from its text: bool, None, int, float, else the string."""
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low in ("none", "null"):
        return None
    for conv in (int, float):
        try:
            return conv(text)
        except ValueError:
            pass
    return text


def _build(kind: str, tokens: list[str], original: str) -> Method:
    if kind not in KINDS:
        raise ValueError(f"unknown method kind {kind!r} in {original!r}; expected one of {list(KINDS)}")
    allowed, required, presets = _SCHEMA[kind]
    preset: str | None = None
    options: dict[str, Any] = {}
    for tok in tokens:
        if "=" in tok:
            key, _, val = tok.partition("=")
            key = key.strip()
            if not key or not val.strip():
                raise ValueError(f"malformed option {tok!r} in method {original!r}; expected key=value")
            if kind != "spectral" and key not in allowed:
                raise ValueError(
                    f"unknown option {key!r} for {kind} in {original!r}; allowed: {sorted(allowed) or 'none'}"
                )
            if key in options:
                raise ValueError(f"option {key!r} given twice in method {original!r}")
            options[key] = parse_value(val.strip())
        else:
            if preset is not None or options:
                raise ValueError(f"{original!r}: a preset name ({tok!r}) must come first and only once")
            if presets is not None and tok not in presets:
                expect = sorted(presets) if presets else "no preset"
                raise ValueError(f"unknown preset {tok!r} for {kind} in {original!r}; expected {expect}")
            preset = tok
    if kind == "quantized" and preset is None:
        raise ValueError(f"{original!r}: quantized needs a bit width, e.g. quantized:int4")
    missing = required - set(options)
    if missing:
        raise ValueError(f"{original!r}: {kind} needs {sorted(missing)}, e.g. streaming:sinks=4,window=1024")
    for key in ("group", "residual", "sinks", "window"):
        if key in options and (
            not isinstance(options[key], int) or options[key] < (0 if key == "sinks" else 1)
        ):
            raise ValueError(f"{original!r}: {key} must be a positive integer, got {options[key]!r}")
    if kind == "spectral":
        preset = preset or "default"
    parts = ([preset] if preset else []) + [f"{k}={v}" for k, v in options.items()]
    name = kind + (":" + ",".join(parts) if parts else "")
    method = Method(name=name, kind=kind, preset=preset, options=options)
    if kind == "spectral":
        _check_spectral(method)
    return method


def _check_spectral(method: Method) -> None:
    """Validate the config now, so a typo fails before an hour of baseline runs."""
    try:
        from spectralcache.config import SpectralConfig  # noqa: F401
    except ImportError:  # cache not landed yet: validated when the cache is built
        return
    try:
        method.spectral_config()
    except TypeError as err:  # dataclasses.replace with an unknown field
        raise ValueError(f"{method.name}: {err}") from None


def parse_methods(spec: str | list[str]) -> list[Method]:
    """Parse ``--methods`` (one string, or several that are joined) into methods.

    Raises ``ValueError`` naming the bad token; duplicates are an error too, because two
    identical methods would write the same prediction files.
    """
    if isinstance(spec, (list, tuple)):
        spec = ",".join(spec)
    if not isinstance(spec, str):
        raise TypeError(f"methods must be a string, got {type(spec).__name__}")
    tokens = [t.strip() for t in spec.split(",")]
    if not spec.strip() or any(not t for t in tokens):
        raise ValueError(f"empty method in {spec!r}")
    groups: list[tuple[str, list[str], str]] = []
    for tok in tokens:
        m = _KIND_RE.match(tok)
        if m and "=" not in tok.split(":", 1)[0]:
            kind, rest = m.group(1), m.group(2)
            groups.append((kind, [rest] if rest else [], tok))
        elif "=" in tok and groups:
            kind, toks, orig = groups[-1]
            toks.append(tok)
            groups[-1] = (kind, toks, orig + "," + tok)
        else:
            raise ValueError(f"cannot parse method token {tok!r} in {spec!r}; expected kind[:options]")
    methods = [_build(kind, toks, orig) for kind, toks, orig in groups]
    seen: set[str] = set()
    for m in methods:
        if m.name in seen:
            raise ValueError(f"method {m.name!r} given twice")
        seen.add(m.name)
    return methods


def with_baseline_first(methods: list[Method]) -> list[Method]:
    """The baseline first (added if missing): every other row is measured against it."""
    rest = [m for m in methods if not m.is_baseline]
    return [Method(name="baseline", kind="baseline"), *rest]


# ------------------------------------------------------------------ measured memory
def _layers(cache: Any) -> list[Any]:
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise TypeError(f"{type(cache).__name__} has no .layers; expected a transformers 5 Cache")
    return list(layers)


def _report_layers(cache: Any) -> list[int] | None:
    """Per-layer held bytes from a SpectralCache ``memory_report()`` (None for other caches)."""
    report_fn = getattr(cache, "memory_report", None)
    if not callable(report_fn):
        return None
    report = report_fn()
    try:
        return [int(e["held_bytes"]) for e in report["layers"]]
    except (KeyError, TypeError) as err:
        raise TypeError(f"unexpected memory_report() layout from {type(cache).__name__}: {err}") from None


def kv_bytes_by_layer(cache: Any) -> list[int]:
    """Bytes held by each layer's tensors: every distinct untyped storage counted once
    (a storage shared by two layers is charged to the first). A view counts its whole
    storage, because that is what stays allocated (:func:`spectralcache.cache.memory.held_bytes`)."""
    seen: set[tuple[str, int]] = set()
    return [held_bytes(layer, seen=seen) for layer in _layers(cache)]


def measure_kv_bytes_per_layer(cache: Any) -> list[int]:
    """Measured bytes per layer: a SpectralCache's own ``memory_report()`` (measured from
    tensor storage per tier), else :func:`kv_bytes_by_layer`."""
    per_layer = _report_layers(cache)
    return per_layer if per_layer is not None else kv_bytes_by_layer(cache)


def measure_kv_bytes(cache: Any) -> int:
    """Bytes actually held by the cache's tensors (not a formula)."""
    return sum(measure_kv_bytes_per_layer(cache))


def full_attention_layers(config: Any) -> list[int]:
    """Indices of the layers a KV compressor may touch (all layers when no layer_types)."""
    cfg = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types = getattr(cfg, "layer_types", None)
    if not types:
        return list(range(cfg.num_hidden_layers))
    return [i for i, t in enumerate(types) if t == "full_attention"]
