"""SpectralCache under transformers' tensor parallelism (``tp_plan="auto"``, torchrun).

Under tensor parallelism transformers shards every attention layer by heads: ``q_proj`` /
``k_proj`` / ``v_proj`` are split column-wise (each rank computes its own query and KV
heads), ``o_proj`` row-wise, followed by an all-reduce. The cache therefore lives per rank:
each rank's ``SpectralCache`` holds, compresses and attends over its local KV heads only, and
no collective is needed inside the cache or the attention (the model's own all-reduce after
``o_proj`` combines the heads). Rank ``r`` of ``W`` holds KV heads ``[r*H/W, (r+1)*H/W)``.

What this module adds:

* :func:`kv_heads_per_rank` — the number of KV heads this rank caches, read from the sharded
  model (its local ``k_proj`` weight rows), not from the global config. ``SpectralCache(model)``
  calls it, so a cache built from a sharded model expects exactly the local heads.
* :func:`gather_memory_report` — ``SpectralCache.memory_report()`` is per rank (bytes this
  rank's GPU holds); this all-gathers the reports of a process group and sums them to totals.
* :func:`load_tp_model` — ``from_pretrained`` with transformers' own ``tp_plan="auto"``,
  across the transformers 5.x spellings of that option.

Only tensor parallelism over attention heads is supported; see the README section
"Several GPUs (tensor parallelism)" for pipeline parallelism and vLLM.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = ["gather_memory_report", "kv_heads_per_rank", "load_tp_model", "tp_world_size"]

# Names of the key projection in transformers attention modules (separate K projection only:
# fused QKV projections are not split per head in a way we can read reliably).
_KEY_PROJECTIONS = ("k_proj", "key_proj", "wk")


def tp_world_size(model: Any) -> int:
    """Tensor-parallel degree transformers sharded ``model`` with (1 when not sharded)."""
    size = getattr(model, "tp_size", None)
    if size is None:
        size = getattr(model, "_tp_size", None)
    return int(size) if size else 1


def _local_rows(weight: torch.Tensor) -> int:
    """Output features this rank holds of a (possibly DTensor-sharded) Linear weight."""
    to_local = getattr(weight, "to_local", None)
    local = to_local() if callable(to_local) else weight
    return int(local.shape[0])


def _local_key_heads(model: nn.Module, head_dim: int, layer_indices: list[int] | None) -> dict[int, int]:
    """{layer_idx: KV heads held on this rank} for attention modules with a separate key projection."""
    found: dict[int, int] = {}
    for name, module in model.named_modules():
        layer_idx = getattr(module, "layer_idx", None)
        if not isinstance(layer_idx, int) or (layer_indices is not None and layer_idx not in layer_indices):
            continue
        for proj_name in _KEY_PROJECTIONS:
            proj = getattr(module, proj_name, None)
            weight = getattr(proj, "weight", None)
            if isinstance(weight, torch.Tensor):
                rows = _local_rows(weight)
                if rows % head_dim:
                    raise ValueError(
                        f"{name}.{proj_name}: {rows} local output features are not whole heads of "
                        f"head_dim {head_dim}; cannot tell how many KV heads this rank holds"
                    )
                found[layer_idx] = rows // head_dim
                break
    return found


def kv_heads_per_rank(
    model: nn.Module, num_kv_heads: int, head_dim: int, layer_indices: list[int] | None = None
) -> int:
    """KV heads this rank caches: ``num_kv_heads`` (the global config count) on an unsharded
    model; under transformers tensor parallelism, the heads of the local ``k_proj`` shard.

    The count is read from the sharded weights themselves, so it is right whatever plan
    sharded them; the config count is only checked to be a multiple of it. Raises a clear
    ``ValueError`` when layers disagree or the local count does not divide the global one.
    """
    world = tp_world_size(model)
    if world == 1:
        return num_kv_heads
    per_layer = _local_key_heads(model, head_dim, layer_indices)
    if per_layer:
        counts = sorted(set(per_layer.values()))
        if len(counts) != 1:
            raise ValueError(
                f"tensor parallelism (tp_size={world}): attention layers hold different numbers of KV heads "
                f"on this rank ({per_layer}); SpectralCache needs one count for all compressed layers"
            )
        local = counts[0]
    else:
        # No separate key projection to read: a head-sharding plan splits KV heads evenly.
        if num_kv_heads % world:
            raise ValueError(
                f"tensor parallelism (tp_size={world}): {num_kv_heads} KV heads cannot be split evenly "
                "across ranks, and the model has no separate k_proj to read the local count from"
            )
        local = num_kv_heads // world
    if local < 1 or num_kv_heads % local:
        raise ValueError(
            f"tensor parallelism (tp_size={world}): this rank holds {local} KV heads, which does not divide "
            f"the model's {num_kv_heads} KV heads"
        )
    return local


def _sum_reports(reports: list[dict[str, Any]]) -> dict[str, Any]:
    def summary(key: str) -> dict[str, Any]:
        held = sum(r[key]["held_bytes"] for r in reports)
        dyn = sum(r[key]["dynamic_bytes"] for r in reports)
        return {"held_bytes": held, "dynamic_bytes": dyn, "ratio": held / dyn if dyn else None}

    tiers: dict[str, int] = {}
    for r in reports:
        for name, nbytes in r["tiers"].items():
            tiers[name] = tiers.get(name, 0) + int(nbytes)
    layers = []
    for idx in range(len(reports[0]["layers"])):
        entries = [r["layers"][idx] for r in reports]
        held = sum(e["held_bytes"] for e in entries)
        dyn = sum(e["dynamic_bytes"] for e in entries)
        layers.append(
            {
                "layer_idx": entries[0]["layer_idx"],
                "layer_type": entries[0]["layer_type"],
                "kind": entries[0]["kind"],
                "held_bytes": held,
                "dynamic_bytes": dyn,
                "ratio": held / dyn if dyn else None,
            }
        )
    seconds = [r["compression"]["seconds"] for r in reports]
    return {
        "layers": layers,
        "tiers": tiers,
        "compressed_layers": summary("compressed_layers"),
        "cold_blocks": summary("cold_blocks"),
        "all_layers": summary("all_layers"),
        # ranks compress their heads concurrently: the wall cost is the slowest rank's
        "compression_seconds_max_rank": max(seconds),
    }


def gather_memory_report(cache: Any, group: Any = None) -> dict[str, Any]:
    """Totals of ``cache.memory_report()`` over the ranks of ``group`` (default: the world).

    A collective: every rank of the group must call it. Returns, on every rank,
    ``{"world_size", "rank", "per_rank": [each rank's summary], "total": {...}}`` where
    ``total`` sums held / dynamic bytes per layer, per tier and for the three aggregates
    (ratios recomputed from the sums), and ``per_rank`` keeps each rank's
    ``all_layers`` / ``compressed_layers`` / ``cold_blocks`` / ``tiers`` so an uneven
    split is visible. Without an initialized process group it returns the one report.
    """
    import torch.distributed as dist

    report = cache.memory_report()
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size(group)
        rank = dist.get_rank(group)
        gathered: list[Any] = [None] * world
        dist.all_gather_object(gathered, report, group=group)
    else:
        world, rank, gathered = 1, 0, [report]
    if len({len(r["layers"]) for r in gathered}) != 1:
        raise ValueError(
            "gather_memory_report: ranks hold caches with different numbers of layers "
            f"({[len(r['layers']) for r in gathered]}); every rank must pass its cache of the same model"
        )
    keep = ("all_layers", "compressed_layers", "cold_blocks", "tiers")
    return {
        "world_size": world,
        "rank": rank,
        "per_rank": [{k: r[k] for k in keep} for r in gathered],
        "total": _sum_reports(gathered),
    }


def load_tp_model(path: str, **kwargs: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, <tp_plan="auto">, **kwargs)`` under torchrun.

    Uses ``distributed_config=DistributedConfig(tp_plan="auto")`` where transformers has it
    (5.x; the bare ``tp_plan=`` argument is deprecated there), else ``tp_plan="auto"``.
    transformers initializes the process group itself (NCCL on CUDA, gloo on CPU).
    """
    from transformers import AutoModelForCausalLM

    try:
        from transformers.distributed import DistributedConfig
    except ImportError:  # older transformers: the standalone argument
        return AutoModelForCausalLM.from_pretrained(path, tp_plan="auto", **kwargs)
    return AutoModelForCausalLM.from_pretrained(
        path, distributed_config=DistributedConfig(tp_plan="auto"), **kwargs
    )
