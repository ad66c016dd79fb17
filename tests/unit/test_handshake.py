"""The cache <-> attention handshake: the layer attention reads is found from the very key
tensor ``update`` returned (weak, identity-keyed), never from "the cache updated last".

Each test fails with the former thread-global handshake (``_ACTIVE``: the SpectralCache updated
last in this thread): another cache updated in between, a stale chunk read again, or an update
made in another thread made the attention fall back to the stock path over the new tokens alone,
silently.
"""

from __future__ import annotations

import copy
import gc
import threading

import pytest
import torch
from tests.tiny_models import tiny_model, tiny_prompt

from spectralcache import SpectralCache, SpectralConfig
from spectralcache.attention.interface import (
    SpectralOnlyTensor,
    lookup,
    register_chunk,
    spectral_attention_forward,
)

CFG = SpectralConfig(block_size=16, hot_size=4, landmarks=2, outliers_per_block=2, rank_keys=8, rank_values=8)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def filled(model, seed: int, n: int = 90) -> SpectralCache:
    cache = SpectralCache(model, CFG)
    with torch.no_grad():
        model(tiny_prompt(1, n, seed=seed), past_key_values=cache, use_cache=True)
    assert cache.layers[0].num_blocks > 0
    return cache


def qkv(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 4, 1, 32, generator=g)  # tiny llama: 4 query heads, 2 KV heads, head_dim 32
    k = torch.randn(1, 2, 1, 32, generator=g)
    v = torch.randn(1, 2, 1, 32, generator=g)
    return q, k, v


def attend_alone(cache: SpectralCache, attn, q, k, v) -> torch.Tensor:
    """Layer 0 attention of a copy of ``cache`` with nothing else happening in between."""
    alone = copy.deepcopy(cache)
    ka, va = alone.update(k, v, 0)
    return spectral_attention_forward(attn, q, ka, va, None)[0]


def test_two_caches_interleaved_in_one_thread(llama) -> None:
    attn = llama.model.layers[0].self_attn
    a, b = filled(llama, seed=1), filled(llama, seed=2)
    q, k, v = qkv(0)
    _, k2, v2 = qkv(1)
    want = attend_alone(a, attn, q, k, v)
    ka, va = a.update(k, v, 0)
    kb, _ = b.update(k2, v2, 0)  # another cache updated between A's update and A's attention
    assert lookup(ka) is a.layers[0] and lookup(kb) is b.layers[0]
    with torch.no_grad():
        got = spectral_attention_forward(attn, q, ka, va, None)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # B's attention still finds B's layer afterwards
    assert lookup(kb) is b.layers[0]
    assert lookup(ka) is None  # A's chunk has been read


def test_stale_chunk_is_never_read_again(llama) -> None:
    """A key tensor whose attention already ran (or that a newer update superseded) is not found,
    and reading it through the stock path raises instead of attending over the new tokens alone."""
    attn = llama.model.layers[0].self_attn
    cache = filled(llama, seed=3)
    q, k, v = qkv(2)
    before = cache.get_seq_length()
    ka, va = cache.update(k, v, 0)
    with torch.no_grad():
        spectral_attention_forward(attn, q, ka, va, None)
        assert lookup(ka) is None
        with pytest.raises(
            RuntimeError, match=r"layer 0: its keys/values were read by .*spectralcache\.enable"
        ):
            spectral_attention_forward(attn, q, ka, va, None)
    # the refused read rolled the forward back: the cache holds what it held before it
    assert cache.layer_lengths() == [before, before]
    # superseded by a newer update of the same layer (a new forward): stale
    cache.update(k, v, 1)  # complete the forward (the tiny llama has 2 layers)
    cache.layers[1].release_chunk()
    kb, _ = cache.update(k, v, 0)
    assert lookup(ka) is None and lookup(kb) is cache.layers[0]
    assert cache.layer_lengths() == [before + 1, before + 1]


def test_update_in_another_thread_is_read_by_its_own_layer(llama) -> None:
    """The handshake is not bound to a thread: the chunk is found from the tensor itself."""
    attn = llama.model.layers[0].self_attn
    cache = filled(llama, seed=4)
    q, k, v = qkv(3)
    want = attend_alone(cache, attn, q, k, v)
    out: dict[str, torch.Tensor] = {}
    worker = threading.Thread(target=lambda: out.update(zip("kv", cache.update(k, v, 0))))
    worker.start()
    worker.join()
    with torch.no_grad():
        got = spectral_attention_forward(attn, q, out["k"], out["v"], None)[0]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_concurrent_generation_in_threads_equals_sequential() -> None:
    models = [tiny_model("llama"), tiny_model("gemma3")]
    prompts = [tiny_prompt(1, 80, seed=5), tiny_prompt(1, 80, seed=6)]
    kw = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)

    def run(i: int) -> torch.Tensor:
        return models[i].generate(prompts[i], past_key_values=SpectralCache(models[i], CFG), **kw)

    want = [run(0), run(1)]
    got: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def target(i: int) -> None:
        try:
            for _ in range(2):
                got[i] = run(i)
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_registry_entries_die_with_their_tensor(llama) -> None:
    from spectralcache.attention import interface

    cache = SpectralCache(llama.config, CFG)
    _, k, v = qkv(4)
    ka, _ = cache.update(k, v, 0)
    assert isinstance(ka, SpectralOnlyTensor) and lookup(ka) is cache.layers[0]
    key = id(ka)
    assert key in interface._CHUNKS
    del ka
    gc.collect()
    assert key not in interface._CHUNKS
    # unrelated tensors, and tensors of uncompressed layers, are never found
    assert lookup(k) is None and lookup(torch.zeros(1)) is None
    with pytest.raises(TypeError, match="key tensor"):
        register_chunk("not a tensor", cache.layers[0])


def test_spectral_only_tensor_allows_metadata_only(llama) -> None:
    cache = SpectralCache(llama.config, CFG)
    _, k, v = qkv(5)
    ka, va = cache.update(k, v, 0)
    assert ka.shape == k.shape and ka.dtype == k.dtype and ka.device == k.device and ka.dim() == 4
    assert ka.size(-1) == 32 and ka.numel() == k.numel() and len(ka) == 1 and ka.is_contiguous()
    assert hash(ka) == id(ka) and ka.stride() == k.stride() and {ka: 1}[ka] == 1
    reads = (
        lambda: ka + 1,
        lambda: ka[:, :, :1],
        lambda: torch.matmul(ka, va.transpose(-1, -2)),
        lambda: ka.data_ptr(),  # what a kernel launch would read
        lambda: torch.nn.functional.scaled_dot_product_attention(ka, ka, va),
    )
    for read in reads:
        with pytest.raises(RuntimeError, match="layer 0: its keys/values were read"):
            read()
