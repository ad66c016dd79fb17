"""Shared pieces of the ``bench attention`` / ``bench e2e`` harness: device choice, timing,
run metadata, progress bars, a measured copy bandwidth.

Timing on CUDA uses ``triton.testing.do_bench`` (CUDA events around each call, the L2 cache
cleared before each call, warm-up and repetition given in milliseconds) and reports the
median; without Triton it falls back to CUDA events in a loop. On CPU it is the median of
``time.perf_counter`` around each call, after warm-up calls.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "Timing",
    "device_from_name",
    "dtype_from_name",
    "git_commit",
    "measure_copy_bandwidth",
    "parse_int_list",
    "progress",
    "render_saved_results",
    "run_metadata",
    "sync",
    "sync_sites",
    "time_fn",
]

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def device_from_name(name: str) -> torch.device:
    """``auto`` -> cuda when available; a clear error when CUDA is asked for but missing."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available on this machine")
    return dev


def dtype_from_name(name: str, dev: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA (what the issue measures), float32 on CPU (fast matmuls there)."""
    if name == "auto":
        return torch.bfloat16 if dev.type == "cuda" else torch.float32
    try:
        return _DTYPES[name]
    except KeyError:
        raise SystemExit(f"unknown --dtype {name!r}; choose from auto, {', '.join(_DTYPES)}") from None


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def sync_sites(fn: Callable[[], object]) -> list[str]:
    """``file:line`` of the Python caller of each host synchronization ``fn`` makes on CUDA
    (``torch.cuda.set_sync_debug_mode("warn")`` turns each into a warning; work queued before
    the call is flushed first, so it is not counted). Warnings raised by switching the mode on
    are not ``fn``'s: torch 2.11 raises its notice "Synchronization debug mode is a prototype
    feature and does not yet detect all synchronizing operations" there once per process, which
    the message filter took for a synchronization (stop 21, H200: ``compress_blocks`` counted 2)."""
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        before = len(caught)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{w.filename}:{w.lineno}" for w in caught[before:] if "synchroniz" in str(w.message).lower()]


def git_commit() -> str | None:
    """The commit the numbers belong to. The device machine gets a copy of the working tree
    without ``.git``, so the caller may pass it in ``SPECTRALCACHE_COMMIT``."""
    env = os.environ.get("SPECTRALCACHE_COMMIT")
    if env:
        return env
    try:
        root = Path(__file__).resolve().parents[3]
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # any missing or odd distribution: version unknown
        return None


def run_metadata(benchmark: str, dev: torch.device, **extra: Any) -> dict[str, Any]:
    """Self-describing header: command, date, commit, machine, versions, device."""
    meta: dict[str, Any] = {
        "benchmark": benchmark,
        "command": " ".join(["spectralcache", *sys.argv[1:]])
        if Path(sys.argv[0]).name == "spectralcache"
        else " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": git_commit(),
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "device": str(dev),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        meta["device_name"] = torch.cuda.get_device_name(dev)
        meta["cuda"] = torch.version.cuda
        meta["gpu_memory_bytes"] = int(props.total_memory)
        meta["l2_cache_bytes"] = int(getattr(props, "L2_cache_size", 0)) or None
        meta["multiprocessors"] = int(props.multi_processor_count)
    else:
        meta["device_name"] = platform.processor() or platform.machine()
    meta.update(extra)
    return meta


class Timing(dict):
    """``median_ms`` plus spread (``p20_ms``, ``p80_ms``), the number of timed calls and how."""


def time_fn(
    fn: Callable[[], Any],
    dev: torch.device,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cpu_repeats: int = 10,
    cpu_warmup: int = 2,
) -> Timing:
    """Median time of ``fn()`` (see the module docstring for how, per device)."""
    times: list[float]
    if dev.type == "cuda":
        try:
            from triton.testing import do_bench

            times = list(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all"))
            how = "triton.testing.do_bench (CUDA events per call, L2 cleared before each call)"
        except ImportError:
            fn()
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize(dev)
            est = max(time.perf_counter() - t0, 1e-6) * 1e3
            for _ in range(max(1, int(warmup_ms / est))):
                fn()
            times = []
            for _ in range(max(5, int(rep_ms / est))):
                start = torch.cuda.Event(enable_timing=True)
                end = torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            how = "CUDA events per call (triton missing: L2 not cleared)"
    else:
        for _ in range(cpu_warmup):
            fn()
        times = []
        for _ in range(max(1, cpu_repeats)):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        how = "time.perf_counter per call"
    times.sort()
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return Timing(median_ms=statistics.median(times), p20_ms=q[0], p80_ms=q[3], calls=len(times), timer=how)


def _time_copy(dev: torch.device, n: int) -> tuple[Timing, int, bool]:
    src = torch.randn(n, device=dev)  # random data, never zeros
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), dev, warmup_ms=50, rep_ms=300, cpu_repeats=5)
    return timing, 2 * src.numel() * src.element_size(), bool(torch.equal(dst, src))


def measure_copy_bandwidth(dev: torch.device, nbytes: int = 1 << 30) -> dict[str, Any]:
    """A large device-to-device copy, counting bytes read plus bytes written (GB/s = 1e9 B/s).

    This is the ceiling a memory-bound decode kernel is compared against, measured in the
    same run on the same card rather than taken from a datasheet.
    """
    timing, moved, ok = _time_copy(dev, nbytes // 4)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return {
        "bytes_moved": moved,
        "median_ms": timing["median_ms"],
        "gbps": moved / (timing["median_ms"] * 1e-3) / 1e9,
        "copy_checked": ok,
        "timer": timing["timer"],
    }


def progress(total: int, desc: str) -> Any:
    """tqdm bar on stderr where tqdm is installed; plain lines otherwise."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)
    except ImportError:

        class _Plain:
            def update(self, n: int = 1) -> None:
                pass

            def set_postfix_str(self, s: str) -> None:
                print(f"  {desc}: {s}", file=sys.stderr, flush=True)

            def close(self) -> None:
                pass

        return _Plain()


def parse_int_list(text: str, what: str) -> list[int]:
    """``"4096,16k,128K"`` -> [4096, 16384, 131072]; a clear error naming ``what`` otherwise."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = 1024 if part.endswith("k") else 1
        try:
            value = int(part[:-1] if part.endswith("k") else part) * mult
        except ValueError:
            raise SystemExit(f"bad {what} {part!r} in {text!r}: expected integers like 4096 or 16k") from None
        if value <= 0:
            raise SystemExit(f"bad {what} {part!r}: must be positive")
        out.append(value)
    if not out:
        raise SystemExit(f"no {what} given")
    return out


def render_saved_results(
    replot: str | Path | None,
    markdown: str | Path | None,
    plot: Callable[[list[dict[str, Any]], dict[str, Any], Path], Any],
    to_markdown: Callable[[dict[str, Any]], str],
) -> bool:
    """``--replot JSON`` / ``--markdown JSON``: redraw the PNG beside a results JSON (e.g. one fetched
    from the GPU) or print its README table, instead of measuring. True when one of them was done."""
    if replot:
        path = Path(replot)
        data = json.loads(path.read_text())
        png = path.with_suffix(".png")
        plot(data["results"], data["meta"], png)
        print(f"wrote {png}")
        return True
    if markdown:
        print(to_markdown(json.loads(Path(markdown).read_text())))
        return True
    return False
