"""The decode kernel halves its token tile when a layout does not fit on chip.

On an H100, identity int4 values at head_dim 256 in float32 need 270-289 KB of shared memory at
256-token tiles (232 KB available): the compile raises Triton's ``OutOfResources``, which used to
send every such decode step to the torch reference. ``decode_attention`` now retries with 128-
and 64-token tiles before refusing; a ``block_t`` the caller chose is never changed. Here the
launcher is wrapped so that tiles above a limit raise ``OutOfResources`` as the compiler would, and
the kernel itself runs in Triton's interpreter (``tests/conftest.py``) or compiled on CUDA. Since
stop 20 the automatic plan pipelines two blocks (``BLOCK_STAGES`` 2) where a block holds few tiles;
a launch that does not fit first drops that pipelining at the same tile, then halves the tile."""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("needs CUDA or TRITON_INTERPRET=1 (set by tests/conftest.py)", allow_module_level=True)

from spectralcache.attention.reference import spectral_attention  # noqa: E402
from spectralcache.attention.triton import decode  # noqa: E402
from spectralcache.attention.triton.synthetic import random_state  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


class OutOfResources(Exception):
    """Stands for triton.runtime.errors.OutOfResources (``_launch_split`` matches it by name)."""


def limited_launcher(monkeypatch, max_block_t: int) -> list[tuple[int, int]]:
    """Wrap the split kernel's launcher: tiles above ``max_block_t`` tokens fail to "compile".
    Records ``(BLOCK_T, BLOCK_STAGES)`` of every launch tried."""
    seen: list[tuple[int, int]] = []
    real = decode._SPLIT

    def launch(grid, args, constexprs, options):
        seen.append((int(constexprs["BLOCK_T"]), int(constexprs["BLOCK_STAGES"])))
        if constexprs["BLOCK_T"] > max_block_t:
            raise OutOfResources(f"shared memory: BLOCK_T={constexprs['BLOCK_T']} too large")
        return real(grid, args, constexprs, options)

    monkeypatch.setattr(decode, "_SPLIT", launch)
    monkeypatch.setattr(decode, "_DOES_NOT_FIT", set())
    return seen


@pytest.mark.parametrize("max_block_t", [128, 64])
def test_tile_is_halved_until_it_fits(monkeypatch, max_block_t):
    state = random_state(block_size=256, blocks=2, head_dim=32, identity_values=True, value_bits=4,
                         device=DEVICE, seed=max_block_t)  # fmt: skip
    seen = limited_launcher(monkeypatch, max_block_t)
    q = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = decode.decode_attention(q, state, None)
    # one-tile blocks: pipelined two blocks deep first, the same tile without it, then halved tiles
    assert seen == [(256, 2), (256, 0)] + [(t, 0) for t in (128, 64) if t >= max_block_t]
    ref = spectral_attention(q, state, None)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=2e-5)
    # the failed launch shapes are remembered: the next step goes straight to the fitting tile
    seen.clear()
    decode.decode_attention(q, state, None)
    assert seen == [(max_block_t, 0)]


def test_nothing_fits_and_a_chosen_tile_raise(monkeypatch):
    state = random_state(block_size=256, blocks=2, head_dim=32, device=DEVICE, seed=3)
    q = torch.randn(1, 4, 1, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    seen = limited_launcher(monkeypatch, 32)
    with pytest.raises(decode.KernelDoesNotFit):
        decode.decode_attention(q, state, None)
    assert seen == [(256, 2), (256, 0), (128, 0), (64, 0)]
    seen = limited_launcher(monkeypatch, 64)
    with pytest.raises(decode.KernelDoesNotFit):
        decode.decode_attention(q, state, None, block_t=128)  # the caller's tile stands
    assert seen == [(128, 2), (128, 0)]  # with and without the block pipelining, never halved
