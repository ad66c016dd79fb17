"""Host cost of one SpectralCache decode step per layer, on CPU (no GPU): torch ops and microseconds.

What one layer of a decode step (one query token) runs in transformers: ``SpectralCache.update``
-> ``SpectralLayer.update`` -> the ``"spectral"`` attention function (``interface.py``) ->
``layer.state()`` -> ``dispatch.attend`` -> ``decode_attention`` (the Triton path, as on CUDA;
here under ``TRITON_INTERPRET=1`` with the two kernel launches replaced by no-ops, so what is
measured is the Python + torch-op work around them). The enabled model's per-forward hooks
(``_begin_forward`` / ``_end_forward``) run once per step and are charged to the step.

Shape: the Llama-3.1-8B attention layout (32 query heads, 8 KV heads, head_dim 128, bf16,
batch 1), ``--layers`` compressed layers, the default preset with 64-token blocks and 32 hot
tokens (so that a CPU prefill is quick) holding ``--blocks`` blocks per layer.

Figures:

* ``ops``: torch operators per layer-step, counted with ``torch.profiler`` (top-level ``aten::``
  events only, i.e. what Python called, not what an op calls inside). ``launching_ops`` leaves
  out pure view / metadata ops (slice, view, as_strided, ...) and allocations (empty*), which
  launch no CUDA kernel; every other op is one (or more) kernel launch(es) on CUDA, ~5-10 us of
  host time each on the device machine's CPU. Counted separately for a plain step (the token
  is written into the hot buffer's slack), a step that reallocates the hot buffer (every
  ``hot_slack`` = 16 steps) and a step that compresses a block (every block_size steps; a sync
  point with the SVD, not a host-overhead question);
* ``host_us_per_layer_step``: wall microseconds of a whole step (all layers) / layers, median
  over steps that compress nothing, and the same for update alone.

``--before COMMIT``: the same measurement on that commit's ``src`` (``git archive``), in child
processes alternating with the working tree's, so both columns come from the same run on the
same (shared, loaded) machine.

    OMP_NUM_THREADS=1 python benchmarks/decode_host_cpu.py --out DIR --before 40248a4
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# ops that launch no kernel on CUDA (views, metadata, allocation)
_NO_KERNEL = {
    "aten::slice",
    "aten::view",
    "aten::reshape",
    "aten::_reshape_alias",
    "aten::as_strided",
    "aten::transpose",
    "aten::t",
    "aten::select",
    "aten::unsqueeze",
    "aten::squeeze",
    "aten::expand",
    "aten::alias",
    "aten::detach",
    "aten::narrow",
    "aten::permute",
    "aten::flatten",
    "aten::empty",
    "aten::empty_like",
    "aten::empty_strided",
    "aten::new_empty",
    "aten::new_empty_strided",
    "aten::lift_fresh",
    "aten::result_type",
    "aten::is_nonzero",
}


def _worker(args: argparse.Namespace) -> dict:
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ["SPECTRALCACHE_ATTENTION_BACKEND"] = "triton"
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import LlamaConfig

    import spectralcache
    from spectralcache import SpectralCache, SpectralConfig
    from spectralcache.attention.interface import spectral_attention_forward
    from spectralcache.attention.triton import decode as dec

    torch.manual_seed(0)
    n_layers, n_kv, n_q, d = args.layers, 8, 32, 128
    mcfg = LlamaConfig(
        hidden_size=n_q * d, num_attention_heads=n_q, num_key_value_heads=n_kv, head_dim=d,
        num_hidden_layers=n_layers, intermediate_size=64, vocab_size=128,
    )  # fmt: skip
    block, hot = 64, 32
    cache = SpectralCache(mcfg, SpectralConfig.from_preset("default", block_size=block, hot_size=hot))
    prefill = 16 + block * args.blocks + hot + 8
    dt = torch.bfloat16
    for i in range(n_layers):
        k = torch.randn(1, n_kv, prefill, d, dtype=dt)
        cache.update(k, torch.randn_like(k), i)
        cache.layers[i].release_chunk()

    class Attn(torch.nn.Module):
        def __init__(self, idx: int) -> None:
            super().__init__()
            self.layer_idx = idx

    mods = [Attn(i).eval() for i in range(n_layers)]
    toks = [torch.randn(1, n_kv, 1, d, dtype=dt) for _ in range(16)]
    q = torch.randn(1, n_q, 1, d, dtype=dt)
    scaling = d**-0.5
    dec._SPLIT = dec._COMBINE = lambda *a: None  # launches stubbed: Python + torch ops only
    step_no = [0]

    def update_all() -> None:
        s = step_no[0]
        cache._begin_forward()
        for i in range(n_layers):
            cache.update(toks[(s + i) % 16], toks[(s + i + 5) % 16], i)
            cache.layers[i].release_chunk()
        cache._end_forward(False)
        step_no[0] += 1

    def step() -> None:
        s = step_no[0]
        cache._begin_forward()
        for i in range(n_layers):
            k, v = cache.update(toks[(s + i) % 16], toks[(s + i + 5) % 16], i)
            spectral_attention_forward(mods[i], q, k, v, None, scaling=scaling)
        cache._end_forward(False)
        step_no[0] += 1

    def kind() -> tuple:
        layer = cache.layers[0]
        return layer.num_blocks, layer._hot_k.data_ptr()

    # ---- op counts, step by step
    counts: dict[str, list] = collections.defaultdict(list)
    names_plain: collections.Counter = collections.Counter()
    for _ in range(2 * block + 8):
        nb0, p0 = kind()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            step()
        nb1, p1 = kind()
        top = [e.name for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        launching = [n for n in top if n not in _NO_KERNEL]
        what = "compress" if nb1 != nb0 else "realloc" if p1 != p0 else "plain"
        counts[what].append((len(top) / n_layers, len(launching) / n_layers))
        if what == "plain" and not names_plain:
            names_plain.update(top)
    ops = {
        what: {
            "steps": len(v),
            "ops_per_layer_step": statistics.median(a for a, _ in v),
            "launching_ops_per_layer_step": statistics.median(b for _, b in v),
        }
        for what, v in counts.items()
    }
    # ---- host time
    times, times_update = [], []
    for fn, out in ((step, times), (update_all, times_update)):
        for _ in range(8):
            fn()
        for _ in range(args.steps):
            nb0, p0 = kind()
            t0 = time.perf_counter()
            fn()
            dt_us = (time.perf_counter() - t0) * 1e6
            if kind()[0] == nb0:  # compression steps are a different question (SVD, sync)
                out.append(dt_us / n_layers)
    return {
        "ops": ops,
        "plain_step_ops_by_name_all_layers": dict(names_plain.most_common()),
        "host_us_per_layer_step_median": statistics.median(times),
        "update_us_per_layer_step_median": statistics.median(times_update),
        "host_us_per_layer_step_p25_p75": [statistics.quantiles(times, n=4)[i] for i in (0, 2)],
        "layers": n_layers,
        "context_tokens": cache.get_seq_length(),
        "spectralcache_file": spectralcache.__file__,
    }


def _run_child(src: Path, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=f"{src}:{ROOT}", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", "--layers", str(args.layers), "--blocks", str(args.blocks)]
    cmd += ["--steps", str(args.steps), "--out", "-"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if res.returncode:
        raise RuntimeError(f"worker on {src} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--before", default=None, help="commit to compare against (its src via git archive)")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--blocks", type=int, default=40)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(args)))
        return 0
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], cwd=ROOT, capture_output=True, text=True)
    variants = {
        "after": (ROOT / "src", head.stdout.strip() + (" (+ uncommitted src)" if dirty.stdout else ""))
    }
    tmp = tempfile.TemporaryDirectory()
    if args.before:
        dst = Path(tmp.name) / "before"
        dst.mkdir()
        archive = subprocess.run(
            ["git", "archive", args.before, "src"], cwd=ROOT, capture_output=True, check=True
        )
        subprocess.run(["tar", "-x", "-C", str(dst)], input=archive.stdout, check=True)
        variants = {"before": (dst / "src", args.before), **variants}
    rounds: dict[str, list] = {name: [] for name in variants}
    for r in range(args.rounds):  # alternate, so load changes hit both alike
        for name, (src, _) in variants.items():
            rounds[name].append(_run_child(src, args))
            print(f"round {r} {name}: {rounds[name][-1]['host_us_per_layer_step_median']:.1f} us/layer-step, "
                  f"ops {rounds[name][-1]['ops']}", flush=True)  # fmt: skip
    result: dict = {
        "command": " ".join(["python", "benchmarks/decode_host_cpu.py", *(argv or sys.argv[1:])]),
        "machine": f"{platform.node()} ({platform.processor() or platform.machine()}), {os.cpu_count()} CPUs, "
        "shared with other engineers' jobs; OMP_NUM_THREADS=1",
        "load_avg_at_end": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "variants": {},
    }
    for name, (_src, commit) in variants.items():
        rs = rounds[name]
        result["variants"][name] = {
            "commit": commit,
            "ops": rs[0]["ops"],
            "host_us_per_layer_step_median_per_round": [x["host_us_per_layer_step_median"] for x in rs],
            "host_us_per_layer_step": min(x["host_us_per_layer_step_median"] for x in rs),
            "update_us_per_layer_step": min(x["update_us_per_layer_step_median"] for x in rs),
            "plain_step_ops_by_name_all_layers": rs[0]["plain_step_ops_by_name_all_layers"],
            "layers": rs[0]["layers"],
            "context_tokens": rs[0]["context_tokens"],
        }
    if "before" in variants:
        b, a = result["variants"]["before"], result["variants"]["after"]
        result["ratio_host_us_before_over_after"] = b["host_us_per_layer_step"] / a["host_us_per_layer_step"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "decode_host_cpu.json").write_text(json.dumps(result, indent=1))
    for name, v in result["variants"].items():
        print(
            f"{name} ({v['commit']}): {v['host_us_per_layer_step']:.1f} us per layer-step "
            f"(update {v['update_us_per_layer_step']:.1f}); ops per layer-step {v['ops']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
