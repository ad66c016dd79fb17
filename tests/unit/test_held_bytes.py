"""held_bytes: distinct storages actually held, each counted once (views charged their storage)."""

import dataclasses

import torch

from spectralcache.cache.memory import held_bytes, logical_bytes


def test_views_share_their_storage_and_capacity_counts():
    buf = torch.zeros(2, 3, 100, 8)  # capacity
    view = buf[:, :, :10]
    assert held_bytes(view) == buf.numel() * 4 == held_bytes(buf, view, buf[:, :, 50:])
    assert logical_bytes(view) == 2 * 3 * 10 * 8 * 4
    # two storages, one shared seen-set: the second call counts only what is new
    other = torch.zeros(5, dtype=torch.int8)
    seen: set = set()
    assert held_bytes(view, seen=seen) == buf.numel() * 4
    assert held_bytes([buf, other], seen=seen) == 5
    assert held_bytes(None, torch.empty(0), torch.zeros(3, device="meta")) == 0


def test_containers_dataclasses_objects_are_walked_once():
    @dataclasses.dataclass
    class Pair:
        a: torch.Tensor
        b: torch.Tensor | None

    class Holder:
        def __init__(self):
            self.x = torch.zeros(4, dtype=torch.float16)
            self.pair = Pair(torch.zeros(3), None)
            self.same = self.x[1:]
            self.more = {"k": [torch.zeros(2, dtype=torch.int64)], "n": 3, "s": "text"}
            self.me = self  # cycles are fine
            self.module = torch.nn.Linear(100, 100)  # weights are not cache memory

    assert held_bytes(Holder()) == 4 * 2 + 3 * 4 + 2 * 8


def test_the_cache_layer_is_measured_through_it():
    from spectralcache.cache.layer import SpectralLayer
    from spectralcache.config import SpectralConfig

    cfg = SpectralConfig(
        block_size=8, rank_keys=2, rank_values=2, hot_size=2, landmarks=1, outliers_per_block=1
    )
    layer = SpectralLayer(cfg, 0, head_dim=4, num_kv_heads=1)
    k = torch.randn(1, 1, 30, 4)
    layer.update(k, k)
    layer.release_chunk()
    # the whole layer object holds exactly the storages of its tiers (nothing hidden elsewhere)
    tiers = layer.tier_tensors()
    assert held_bytes(layer) == held_bytes(*[t for ts in tiers.values() for t in ts])
