"""Property tests: SpectralLayer against a reference that keeps exact K/V and applies the same
compression (same trigger rule, same blocks, via ``compress_blocks`` / ``reconstruct``).

The reference holds, per token, what the layer should reconstruct: the exact K/V until the
token is compressed, then the block reconstruction. It keeps its own stacked compressed
blocks only to re-decode a partially cropped block the way the layer's crop contract says
(the kept head of the block becomes its reconstruction).
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spectralcache.cache.block import compress_blocks, reconstruct
from spectralcache.cache.layer import SpectralLayer
from spectralcache.cache.rope import RopeRotator
from spectralcache.cache.state import ColdBlocks
from spectralcache.config import SpectralConfig

D = 8


pytestmark = pytest.mark.usefixtures("one_thread")


def rotator():
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float) / D))
    return RopeRotator(inv, D)


class Reference:
    def __init__(self, cfg: SpectralConfig, rot: RopeRotator | None):
        self.cfg, self.rot = cfg, rot
        self.k = self.v = None
        self.nb = 0
        self.blocks: ColdBlocks | None = None
        self.rk, self.rv = cfg.ranks_for(D)

    @property
    def seq(self):
        return 0 if self.k is None else self.k.shape[-2]

    def _rotate(self, starts):
        if self.rot is None:
            return None
        return lambda x: self.rot.rotate_block_keys(x, starts)

    def update(self, k, v):
        if self.k is None or self.seq == 0:
            self.k, self.v = k.clone(), v.clone()
        else:
            self.k, self.v = torch.cat([self.k, k], -2), torch.cat([self.v, v], -2)
        cfg, t = self.cfg, self.cfg.block_size
        lp = min(cfg.landmarks, self.seq)
        hot_start = lp + self.nb * t
        hot_len = self.seq - hot_start
        if hot_len >= cfg.hot_size + t:
            n = (hot_len - cfg.hot_size) // t
            b, h = self.k.shape[:2]
            sl = slice(hot_start, hot_start + n * t)
            kb = self.k[:, :, sl].reshape(b, h, n, t, D)
            vb = self.v[:, :, sl].reshape(b, h, n, t, D)
            starts = hot_start + t * torch.arange(n)
            fit = kb
            if self.rot is not None:
                fit = self.rot.unrotate(self.k[:, :, sl], hot_start + torch.arange(n * t)).reshape(
                    b, h, n, t, D
                )
            comp = compress_blocks(fit, vb, cfg, self.rk, self.rv, exact_keys=kb, block_starts=starts)
            rk, rv = reconstruct(comp, self._rotate(starts))
            self.k[:, :, sl] = rk.reshape(b, h, n * t, D)
            self.v[:, :, sl] = rv.reshape(b, h, n * t, D)
            if self.blocks is None:
                self.blocks = comp
            else:  # the plain, slow way: concatenate everything
                old = self.blocks
                self.blocks = comp.map_tensors(
                    lambda f, x: torch.cat([getattr(old, f), x], 0 if f == "block_starts" else 2)
                )
            self.nb += n

    def crop(self, n):
        if self.k is None:
            return
        cfg, t = self.cfg, self.cfg.block_size
        new_len = max(self.seq - n, 0)
        keep_blocks = 0 if new_len < cfg.landmarks else min(self.nb, (new_len - cfg.landmarks) // t)
        if keep_blocks < self.nb:
            partial = new_len - (cfg.landmarks + keep_blocks * t)
            if partial > 0:
                j = keep_blocks
                blk = self.blocks.blocks(j, j + 1)
                rk, rv = reconstruct(blk, self._rotate(blk.block_starts))
                lo = cfg.landmarks + j * t
                self.k[:, :, lo : lo + partial] = rk[:, :, 0, :partial]
                self.v[:, :, lo : lo + partial] = rv[:, :, 0, :partial]
            self.nb = keep_blocks
            self.blocks = None if keep_blocks == 0 else self.blocks.blocks(0, keep_blocks)
        self.k, self.v = self.k[:, :, :new_len], self.v[:, :, :new_len]

    def batch(self, fn):
        if self.seq == 0:
            return
        self.k, self.v = fn(self.k), fn(self.v)
        if self.blocks is not None:
            self.blocks = self.blocks.map_tensors(lambda f, x: x if f == "block_starts" else fn(x))


configs = st.builds(
    lambda t, hot, lm, o, rk, rv, bits, ks, refit, kc, vc, zp: SpectralConfig(
        block_size=t,
        hot_size=hot,
        landmarks=lm,
        outliers_per_block=min(o, t - 1),
        rank_keys=min(rk, t),
        rank_values=min(rv, t),
        coeff_bits=bits,
        key_space=ks,
        refit_after_outliers=refit,
        key_codec=kc,
        value_codec=vc,
        key_zero_point=zp and kc == "channel" and bits != 16,
    ),
    t=st.sampled_from([4, 8]),
    hot=st.sampled_from([0, 1, 3]),
    lm=st.sampled_from([0, 2]),
    o=st.integers(0, 2),
    rk=st.integers(1, 8),
    rv=st.integers(1, 8),
    bits=st.sampled_from([4, 8, 16]),
    ks=st.sampled_from(["post_rope", "pre_rope"]),
    refit=st.booleans(),
    kc=st.sampled_from(["lowrank", "lowrank", "identity", "channel"]),
    vc=st.sampled_from(["lowrank", "lowrank", "identity"]),
    zp=st.booleans(),
)

ops = st.lists(
    st.one_of(
        st.tuples(st.just("update"), st.integers(1, 30)),
        st.tuples(st.just("undone"), st.integers(1, 30)),  # an update rolled back (failed forward)
        st.tuples(st.just("release"), st.just(0)),
        st.tuples(st.just("crop"), st.integers(1, 25)),
        st.tuples(st.just("reorder"), st.integers(0, 10_000)),
        st.tuples(st.just("select"), st.integers(0, 10_000)),
        st.tuples(st.just("repeat"), st.integers(1, 2)),
    ),
    min_size=1,
    max_size=10,
)


@settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(cfg=configs, batch=st.integers(1, 3), heads=st.integers(1, 2), program=ops, seed=st.integers(0, 2**16))
def test_layer_matches_reference(cfg, batch, heads, program, seed):
    rot = rotator() if cfg.key_space == "pre_rope" else None
    layer = SpectralLayer(cfg, 0, head_dim=D, num_kv_heads=heads, rotator=rot)
    ref = Reference(cfg, rot)
    g = torch.Generator().manual_seed(seed)
    b = batch
    for op, arg in program:
        if op == "update":
            k = torch.randn(b, heads, arg, D, generator=g)
            v = torch.randn(b, heads, arg, D, generator=g)
            out = layer.update(k, v)
            assert out[0] is k and out[1] is v
            ref.update(k, v)
        elif op == "undone":
            token = layer.checkpoint()
            layer.update(
                torch.randn(b, heads, arg, D, generator=g), torch.randn(b, heads, arg, D, generator=g)
            )
            layer.rollback(token)
        elif op == "release":
            layer.release_chunk()
        elif op == "crop":
            layer.crop(-arg)
            ref.crop(arg)
        elif op == "reorder":
            idx = torch.randint(0, b, (b,), generator=torch.Generator().manual_seed(arg))
            layer.reorder_cache(idx)
            ref.batch(lambda x, idx=idx: x.index_select(0, idx))
        elif op == "select":
            n_keep = 1 + arg % b
            idx = torch.randperm(b, generator=torch.Generator().manual_seed(arg))[:n_keep].sort().values
            layer.batch_select_indices(idx)
            if ref.seq:
                ref.batch(lambda x, idx=idx: x[idx])
                b = n_keep
        elif op == "repeat":
            if b * arg <= 4:
                layer.batch_repeat_interleave(arg)
                if ref.seq:
                    ref.batch(lambda x, r=arg: x.repeat_interleave(r, dim=0))
                    b *= arg
        # invariants after every op
        assert layer.get_seq_length() == ref.seq
        assert layer.num_blocks == ref.nb
        if ref.seq == 0:
            continue
        st_ = layer.state()
        assert st_.hot_start == min(cfg.landmarks, ref.seq) + ref.nb * cfg.block_size
        assert st_.hot_start + st_.hot_keys.shape[-2] == ref.seq
        assert st_.hot_keys.shape[0] == b
        if st_.cold is not None:
            assert st_.cold.block_starts.tolist() == [
                cfg.landmarks + j * cfg.block_size for j in range(ref.nb)
            ]
        rk, rv = layer.reconstruct()
        torch.testing.assert_close(rk, ref.k, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rv, ref.v, rtol=1e-4, atol=1e-4)
