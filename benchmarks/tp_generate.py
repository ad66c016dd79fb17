"""SpectralCache vs DynamicCache under transformers tensor parallelism (torchrun), table + JSON.

    torchrun --nproc_per_node 2 benchmarks/tp_generate.py --contexts 32768 131072 \\
        --out benchmarks/results/tp_h100x2.json

A random-weight Llama-3.1-8B-shaped model (32 layers, 32 query / 8 KV heads of 128, hidden
4096, MLP 14336, vocab 128256; ``--layers`` to shorten it) is built once from its config
on rank 0's GPU, saved with ``save_pretrained`` to local disk (``--model-dir``; tmpfs when it
has room; no hub access needed) and loaded on every rank with transformers' own
``tp_plan="auto"``: each of W ranks holds 32/W query and 8/W KV heads of every layer and
its own cache of those heads.

Per context length and cache (DynamicCache, then SpectralCache with ``--preset``), every
rank measures: prefill seconds (one forward over the prompt, ``logits_to_keep=1``), decode
ms/token (median and mean of ``--new`` greedy steps after ``--warmup`` untimed ones, each
step synchronized), peak GPU memory (``torch.cuda.max_memory_allocated``, weights
included, and above the weights), and the KV bytes this rank's cache holds (DynamicCache:
its key/value storages; SpectralCache: ``memory_report()``, and the all-rank total from
``spectralcache.integrations.tp.gather_memory_report``). Rank 0 writes JSON after every
measurement (so a run stopped by a time limit keeps what finished) and prints a table.

Random weights make attention near-uniform and greedy tokens meaningless: this measures
time and memory only (bytes do not depend on the values). Losslessness under TP is checked
by ``tests/unit/test_tp.py`` (also on 2 GPUs with ``SPECTRALCACHE_TP_DEVICE=cuda``).
Runs on CPU with gloo too (``--shape tiny``), to check the script itself.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LLAMA_8B = dict(
    vocab_size=128256,
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    head_dim=128,
    max_position_embeddings=131072,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    rope_scaling={
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    tie_word_embeddings=False,
    bos_token_id=128000,
    eos_token_id=128001,
)
# Same layout in miniature, for a CPU check of the script (head_dim >= the default ranks).
TINY = dict(
    LLAMA_8B,
    vocab_size=512,
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=64,
    max_position_embeddings=16384,
    bos_token_id=1,
    eos_token_id=2,
)


def _parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 131072])
    p.add_argument("--new", type=int, default=32, help="timed decode steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed decode steps before the timed ones")
    p.add_argument("--preset", default="default", help="SpectralConfig preset for the SpectralCache")
    p.add_argument("--shape", choices=("llama3-8b", "tiny"), default="llama3-8b")
    p.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument("--model-dir", default=None, help="where to save/load the random model")
    p.add_argument("--caches", nargs="+", choices=("dynamic", "spectral"), default=["dynamic", "spectral"])
    p.add_argument(
        "--max-seconds",
        type=float,
        default=None,
        help="skip a measurement whose estimated end (from the same cache at the previous context: "
        "prefill scaled quadratically, decode linearly) would pass this many seconds since start",
    )
    p.add_argument("--out", default="benchmarks/results/tp_generate.json")
    return p.parse_args(argv)


def _model_dir(args: argparse.Namespace, cfg_kwargs: dict[str, Any], nbytes: int) -> Path:
    if args.model_dir:
        return Path(args.model_dir)
    # keyed by the config itself, so a saved model is reused only for the very same shape
    digest = hashlib.sha256(json.dumps(cfg_kwargs, sort_keys=True).encode()).hexdigest()[:10]
    name = f"spectralcache-tp-{args.shape}-{args.dtype}-{digest}"
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 1.3 * nbytes:
        return shm / name
    return Path("/tmp") / name


def _build_and_save(cfg_kwargs: dict[str, Any], dtype: torch.dtype, device: torch.device, path: Path) -> None:
    """Rank 0: random-weight model from its config (initialized by transformers on ``device``)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**cfg_kwargs)
    torch.manual_seed(0)
    with device:
        model = LlamaForCausalLM._from_config(config, dtype=dtype)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    del model
    tmp.rename(path)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    dist.barrier()


def _dynamic_kv_bytes(cache: Any) -> int:
    seen: set[int] = set()
    total = 0
    for layer in cache.layers:
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
                seen.add(t.untyped_storage().data_ptr())
                total += t.untyped_storage().nbytes()
    return total


def _measure(model: Any, ids: torch.Tensor, kind: str, args: argparse.Namespace) -> dict[str, Any]:
    from transformers import DynamicCache

    import spectralcache
    from spectralcache import SpectralCache
    from spectralcache.integrations.tp import gather_memory_report

    device = ids.device
    cuda = device.type == "cuda"
    if kind == "dynamic":
        spectralcache.disable(model)
        cache = DynamicCache(config=model.config)
    else:
        cache = SpectralCache(model, args.preset)  # switches the model to spectral attention
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device) if cuda else 0
    _sync(device)
    t0 = time.perf_counter()
    with torch.no_grad():
        out = model(ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
    _sync(device)
    prefill_s = time.perf_counter() - t0
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    tokens = [int(token[0, 0])]
    del out
    step_ms = []
    with torch.no_grad():
        for step in range(args.warmup + args.new):
            _sync(device)
            t0 = time.perf_counter()
            out = model(token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            _sync(device)
            if step >= args.warmup:
                step_ms.append(1e3 * (time.perf_counter() - t0))
            tokens.append(int(token[0, 0]))
            del out
    result: dict[str, Any] = {
        "cache": kind,
        "prefill_s": prefill_s,
        "decode_ms_per_token_median": statistics.median(step_ms),
        "decode_ms_per_token_mean": statistics.fmean(step_ms),
        "decode_ms_all": step_ms,
        "seq_len_end": int(cache.get_seq_length()),
        "first_tokens": tokens[:8],
    }
    if cuda:
        peak = torch.cuda.max_memory_allocated(device)
        result["peak_gpu_bytes"] = peak
        result["peak_gpu_bytes_above_weights"] = peak - base
        result["weights_and_buffers_bytes"] = base
    if kind == "dynamic":
        result["kv_bytes_rank"] = _dynamic_kv_bytes(cache)
    else:
        report = cache.memory_report()
        result["kv_bytes_rank"] = report["all_layers"]["held_bytes"]
        result["kv_dynamic_equivalent_bytes_rank"] = report["all_layers"]["dynamic_bytes"]
        result["kv_ratio_rank"] = report["all_layers"]["ratio"]
        result["tiers_rank"] = report["tiers"]
        result["compression"] = report["compression"]
        total = gather_memory_report(cache)["total"]
        result["kv_bytes_total"] = total["all_layers"]["held_bytes"]
        result["kv_ratio_total"] = total["all_layers"]["ratio"]
    result["kv_heads_rank"] = getattr(cache, "num_kv_heads", None) or int(cache.layers[0].keys.shape[1])
    del cache
    if cuda:
        torch.cuda.empty_cache()
    return result


def _estimate_seconds(rows: list[dict[str, Any]], kind: str, context: int, args: argparse.Namespace) -> float:
    """Wall seconds a measurement of ``kind`` at ``context`` should take, from the last one of the
    same cache (prefill quadratic in context: attention dominates at long context; the rest
    linear). 0 when there is none to scale from."""
    previous = [row for row in rows if row["cache"] == kind]
    if not previous:
        return 0.0
    last = previous[-1]
    scale = context / last["context"]
    prefill = max(r["prefill_s"] for r in last["ranks"])
    rest = max(r["measure_wall_s"] for r in last["ranks"]) - prefill
    return prefill * scale**2 + max(rest, 0.0) * scale


def _git_commit() -> str | None:
    """$SPECTRALCACHE_GIT_COMMIT when set (a run from a `git archive` snapshot, which may sit inside
    another checkout), else HEAD of the checkout."""
    if os.environ.get("SPECTRALCACHE_GIT_COMMIT"):
        return os.environ["SPECTRALCACHE_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    return None


def _table(rows: list[dict[str, Any]], world: int) -> str:
    lines = [
        f"{'context':>8} {'cache':>8} {'prefill s':>9} {'decode ms/tok':>13} {'peak GiB/GPU':>12} "
        f"{'KV MiB/rank':>11} {'KV ratio':>8}"
    ]
    for row in rows:
        for m in row["ranks"][:1]:
            peak = max(r.get("peak_gpu_bytes", 0) for r in row["ranks"]) / 2**30
            kv = max(r["kv_bytes_rank"] for r in row["ranks"]) / 2**20
            ratio = m.get("kv_ratio_total")
            lines.append(
                f"{row['context']:>8} {row['cache']:>8} {max(r['prefill_s'] for r in row['ranks']):>9.2f} "
                f"{max(r['decode_ms_per_token_median'] for r in row['ranks']):>13.2f} {peak:>12.2f} "
                f"{kv:>11.1f} {ratio if ratio is not None else 1.0:>8.3f}"
            )
    lines.append(
        f"(TP world size {world}; max over ranks; KV ratio = SpectralCache bytes / DynamicCache bytes)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    start = time.perf_counter()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    cfg_kwargs = dict(LLAMA_8B if args.shape == "llama3-8b" else TINY)
    if args.layers:
        cfg_kwargs["num_hidden_layers"] = args.layers
    est_params = (
        cfg_kwargs["num_hidden_layers"]
        * (
            2 * cfg_kwargs["hidden_size"] * cfg_kwargs["num_attention_heads"] * cfg_kwargs["head_dim"]
            + 2 * cfg_kwargs["hidden_size"] * cfg_kwargs["num_key_value_heads"] * cfg_kwargs["head_dim"]
            + 3 * cfg_kwargs["hidden_size"] * cfg_kwargs["intermediate_size"]
        )
        + 2 * cfg_kwargs["vocab_size"] * cfg_kwargs["hidden_size"]
    )
    path = _model_dir(args, cfg_kwargs, est_params * torch.empty((), dtype=dtype).element_size())
    t0 = time.perf_counter()
    if rank == 0 and not (path / "config.json").exists():
        _build_and_save(cfg_kwargs, dtype, device, path)
    dist.barrier()
    build_s = time.perf_counter() - t0
    from spectralcache.integrations.tp import load_tp_model, tp_world_size

    t0 = time.perf_counter()
    model = load_tp_model(str(path), dtype=dtype).eval()
    load_s = time.perf_counter() - t0
    if tp_world_size(model) != world:
        raise RuntimeError(f"model sharded {tp_world_size(model)}-way, expected {world}")

    import transformers

    meta = {
        "benchmark": "tp_generate",
        "world_size": world,
        "device": torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu",
        "backend": dist.get_backend(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "git_commit": _git_commit(),
        "model_config": cfg_kwargs,
        "dtype": args.dtype,
        "preset": args.preset,
        "decode_steps": args.new,
        "warmup_steps": args.warmup,
        "model_build_and_save_s": build_s,
        "model_load_s": load_s,
        "model_dir": str(path),
        "command": "torchrun --nproc_per_node {} benchmarks/tp_generate.py {}".format(
            world, " ".join(argv if argv is not None else sys.argv[1:])
        ),
    }
    rows: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    out_path = Path(args.out)
    for context in args.contexts:
        g = torch.Generator().manual_seed(context)
        ids = torch.randint(3, cfg_kwargs["vocab_size"], (1, context), generator=g).to(device)
        for kind in args.caches:
            elapsed = time.perf_counter() - start
            estimate = _estimate_seconds(rows, kind, context, args)
            fits = args.max_seconds is None or elapsed + estimate < args.max_seconds
            go = torch.tensor([fits], dtype=torch.int32, device=device)
            dist.broadcast(go, 0)  # every rank takes rank 0's decision
            if not bool(go.item()):
                skipped.append(
                    {
                        "context": context,
                        "cache": kind,
                        "reason": f"--max-seconds {args.max_seconds}: at {elapsed:.0f}s, estimated "
                        f"{estimate:.0f}s more",
                    }
                )
                continue
            t_measure = time.perf_counter()
            result = _measure(model, ids, kind, args)
            result["measure_wall_s"] = time.perf_counter() - t_measure
            result["rank"] = rank
            per_rank: list[Any] = [None] * world
            dist.all_gather_object(per_rank, result)
            rows.append({"context": context, "cache": kind, "ranks": per_rank})
            if rank == 0:
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps({**meta, "results": rows, "skipped": skipped}, indent=1))
                print(
                    f"[{time.perf_counter() - start:.0f}s] context {context} {kind}: prefill "
                    f"{result['prefill_s']:.2f}s decode {result['decode_ms_per_token_median']:.2f} ms/tok "
                    f"KV/rank {result['kv_bytes_rank'] / 2**20:.1f} MiB",
                    flush=True,
                )
    if rank == 0:
        out_path.write_text(json.dumps({**meta, "results": rows, "skipped": skipped}, indent=1))
        print(_table(rows, world))
        print(f"wrote {out_path}")
    dist.barrier()
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
