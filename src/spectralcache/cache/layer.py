"""``SpectralLayer``: one compressed decoder layer's cache (landmarks | cold blocks | hot buffer).

Token flow: the first ``landmarks`` tokens ever cached go to the landmark tier (exact, never
compressed); later tokens enter the hot buffer. Whenever the hot buffer (with the incoming
tokens) holds at least ``hot_size + block_size`` tokens, its oldest ``n * block_size`` tokens (as
many whole blocks as possible while ``hot_size`` stay hot) are compressed in **one** batched call
(every block of every head at once) and appended to the cold tier, whose tensors are stacked
``[B, H, nb, ...]`` so attention never loops over blocks.

Storage (append-only, preallocated):

* the cold tier is one :class:`ColdBlocks` whose tensors are buffers ``[B, H, capacity, ...]``
  (``block_starts [capacity]``); ``state()`` hands out the views ``[:, :, :nb]``. New blocks
  are written in place after the last one; when the capacity is exhausted the buffers are
  reallocated with geometric growth (:data:`COLD_GROWTH`; a prefill into an empty tier allocates
  exactly what it needs);
* the landmarks live in a ``[B, H, landmarks, D]`` buffer filled in place;
* the hot buffer is ``[B, H, capacity, D]`` with a live window ``[lo, hi)``: new tokens are
  written at ``hi``; compressing the oldest hot tokens only advances ``lo``. When a decode
  token does not fit, the live window is copied into a fresh buffer with ``max(block_size // 32,
  16)`` tokens of slack (a prefill chunk's remainder is stored in an exact-fit buffer). Slack is
  held memory and ``memory_report`` counts it, so it stays small: copying a window of at most
  ``hot_size + block_size`` rows every 16 decode steps costs far less than a decode step.

Nothing already visible through a view is ever overwritten, and every reallocation makes a fresh
buffer, so :meth:`SpectralLayer.checkpoint` (counters + references) and
:meth:`SpectralLayer.rollback` restore the layer exactly after a failed forward. ``crop``,
``reorder_cache``, ``batch_select_indices``, ``batch_repeat_interleave``, ``offload``,
``prefetch``, ``reset`` and ``to`` may reallocate or shrink the windows; they invalidate
outstanding checkpoints.

NaN / inf guarantee (no host synchronization on the decode path):

* a chunk of more than one token (prefill) is checked before anything changes; NaN/inf there
  raises ValueError naming the layer, and the cache is unchanged;
* a single-token update (decode) is not checked when it is stored (no host read, and no
  device work either: a decode token stays exact in the landmark / hot tier until a block is
  compressed, so it can still be checked there). The layer only notes, as a host int, the
  first cache index stored since the last check. At the next natural synchronization point --
  before any block is compressed (the token arriving with that update included), at the next
  multi-token update, in :meth:`check_finite` (which ``SpectralCache.memory_report`` calls) --
  the exact rows from that index on are reduced on the device and read once; NaN/inf there
  raises ValueError naming the layer and the first non-finite cache index (the raising update
  is refused; crop to that index to go on). Therefore a NaN/inf token never enters a
  compressed block, and it is reported at the latest when the block holding it would be
  compressed. Until then it sits in the exact tiers, where the attention output of the step
  that stored it is already NaN (a model producing NaN K/V produces NaN hidden states as
  well). (Before, each decode step folded its token into a device-side bool: 5 more kernel
  launches per layer and step -- an 8-launch form of it took 58.7 us of host time on the H100
  machine -- and the rows it folded are the very rows scanned now, so the same tokens are
  reported at the same points.)

Rows too large for the stored coefficients (finite, but ``max|row| / 127`` overflows a float16
scale) are kept exact as outliers by ``compress_blocks``; a block with more of them than
``outliers_per_block`` is refused with ValueError before the layer changes.

The current call's exact K/V (the "chunk") are kept only until this layer's attention has run:
the attention function calls :meth:`SpectralLayer.release_chunk`; the next ``update``,
``crop`` or ``reset`` drops it anyway.

``update`` returns the exact chunk ``(key_states, value_states)`` it was given, *not* the whole
cache: the spectral attention reads :meth:`state` instead. A stock attention function handed
these tensors would see only the new tokens; with a mask sized by :meth:`get_mask_sizes`
(``seq_len + q``) SDPA then fails on the shape mismatch instead of silently attending to a
truncated context.
"""

from __future__ import annotations

import copy
import math
import operator
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import CacheLayerMixin

from spectralcache.cache.block import compress_blocks, reconstruct
from spectralcache.cache.deferred import DeferredCheck, DeviceSeconds, should_defer
from spectralcache.cache.rope import RopeRotator, rotate_block_keys
from spectralcache.cache.state import ColdBlocks, SpectralLayerState
from spectralcache.config import BASISLESS_CODECS, SpectralConfig

__all__ = [
    "COLD_GROWTH",
    "COLD_TIERS",
    "LayerCheckpoint",
    "SpectralLayer",
    "is_padded_token_rows",
    "is_tokens_contiguous",
    "padded_token_rows",
    "stores_values_tokens_contiguous",
    "tokens_contiguous",
    "tokens_contiguous_stride",
]

_SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
# Growth factor of the cold tier's capacity. Geometric growth keeps appends amortized O(1)
# (each block is copied 1 / (COLD_GROWTH - 1) = 4 times on average); 1.25 rather than 2 because
# the capacity is held memory (memory_report counts it), and doubling could hold twice the cold
# tier a long decode needs.
COLD_GROWTH = 1.25


# compress_tail keeps whole ``block_size`` blocks when they leave at most 1/64 of the prompt's
# compressible tokens exact (at most ``block_size - 1``, so from ~32K tokens on at block_size 512):
# at most ~1.6 % of the tokens and ~4 % more bytes at the default preset (32K: +3 %, 128K: +0.5 %), for a
# faster decode kernel.
# H200, the default preset through a real cache (stop 23, ``benchmarks/results/lead_stop23/scan1/``,
# graph replays, L2 cleared, one process): 128K batch 1 0.0732 ms with 512-token blocks against 0.0788
# with the re-blocked 511 (1.89x / 1.76x SDPA; 147.9 / 147.2 MB read), 32K 0.0313 against 0.0338 (510;
# 38.1 / 37.0 MB); the aligned 496 and 448 were no faster than 511 (0.0784 / 0.0779 at 128K).
TAIL_PLAIN_FRACTION = 64


def stores_values_tokens_contiguous(config: SpectralConfig) -> bool:
    """Whether the cold tier keeps its value coefficient bytes tokens-contiguous: packed int4 rows of
    the identity codec (the default preset's values). The tensor is the same ``[B, H, nb, T, D/2]``
    (a byte = two channels of one token), its memory ordered ``[B, H, nb, D/2, T_row]`` (``T_row``:
    ``T`` rounded up to ``VALUE_ROW_ALIGN``, so every row starts 16-byte aligned): the decode
    kernel's value tile then reaches its ``mma`` operand (tokens as the reduction dim) without a
    single-byte shared-memory load per element. H200, stop 21 (``benchmarks/results/kernel_stop21/
    lead_final/``): the default layout at 128K, same process -- batch 1 0.0670 ms against 0.0745 ms
    row-major (2.08x / 1.87x SDPA), batch 8 0.4610 against 0.5195 (synthetic 512-token blocks timed back
    to back; a real cache's state with its compressed tail's block length: ``VALUE_ROW_ALIGN``). Low-rank
    and int8 rows stay row-major (whole-row copies in the kernel; stop 22's SASS: tokens-contiguous
    low-rank values make the aggressive loop longer, 2092 vs 2031 instructions)."""
    return config.value_codec == "identity" and config.value_bits == 4


# Tokens-contiguous rows start every VALUE_ROW_ALIGN tokens (= bytes: one packed byte per token), so a
# row holds its block's T tokens rounded up to 16. Blocks of the compressed tail's length
# (``compress_tail``, the default preset: 511 at 128K) then still start each row 16-byte aligned, and
# the decode kernel may read a value tile up to the next 16-token boundary (its mask constant over
# 16-token groups: ``decode._value_tokens_padded``), which keeps the loads 16-byte vectors. H200,
# stop 22 (``benchmarks/results/lead_stop22/fix/``, real cache, 128K batch 1, graph replays): 0.0781 ms
# with both, 0.1377 with the rows padded but the mask ``t < 511``, 0.1261 unpadded (stop 21), 0.0732 for
# whole 512-token blocks. The padding (at most 15 bytes per row) is held, never stored into.
VALUE_ROW_ALIGN = 16


def tokens_contiguous_stride(tokens: int) -> int:
    """The channel-row stride (in tokens) of the tokens-contiguous layout for ``tokens`` per block."""
    return -(-max(tokens, 1) // VALUE_ROW_ALIGN) * VALUE_ROW_ALIGN


def empty_tokens_contiguous(like: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """An uninitialized ``shape = [..., T, w]`` tensor (``like``'s dtype and device) in the layout
    :func:`stores_values_tokens_contiguous` names: memory ``[..., w, T_row]``, ``T_row`` =
    :func:`tokens_contiguous_stride` (``T`` rounded up to ``VALUE_ROW_ALIGN``), seen as the
    transposed view of its first ``T`` columns."""
    *outer, t, w = shape
    return like.new_empty([*outer, w, tokens_contiguous_stride(t)])[..., :t].transpose(-1, -2)


def is_tokens_contiguous(x: torch.Tensor) -> bool:
    """Whether ``x [..., T, w]`` is in that layout: tokens contiguous, channel rows ``T_row`` apart and,
    with a block dim, blocks ``w * T_row`` apart (the dims before may be views of a larger capacity)."""
    if x.dim() < 2:
        return False
    t, w = x.shape[-2], x.shape[-1]
    row = tokens_contiguous_stride(t)
    if (t > 1 and x.stride(-2) != 1) or (w > 1 and x.stride(-1) != row):
        return False
    return x.dim() < 3 or x.shape[-3] < 2 or x.stride(-3) == w * row


def tokens_contiguous(x: torch.Tensor) -> torch.Tensor:
    """``x [..., T, w]`` in the layout :func:`stores_values_tokens_contiguous` names (a copy unless it
    already is): memory ``[..., w, T_row]`` with ``T_row`` a multiple of ``VALUE_ROW_ALIGN``."""
    if is_tokens_contiguous(x):
        return x
    out = empty_tokens_contiguous(x, list(x.shape))
    out.copy_(x)
    return out


# The per-token value scales ``[B, H, nb, T, 1]`` of the same layout's blocks start every ``T_row``
# tokens too (memory ``[B, H, capacity, T_row, 1]``, the padding zeros), so the decode kernel may load a
# tile's scales up to the next 16-token boundary: 4-byte-or-wider copies that its software pipeliner
# issues a tile ahead (``cp.async``). With blocks ``T' = 506`` tokens apart and the mask ``t < 506`` the
# compiled kernel loaded them two bytes at a time, synchronously, in every tile (sm_90a SASS on the CPU,
# ``attention_kernel_dev.py --sections sass``, stop 23: 9 ``LDG.E.U16`` and no ``LDGSTS.E`` against 5 and 6
# for 512-token blocks) -- the likely cause of the re-blocked layouts' slower tiles (stop 23: 0.0788 ms at
# 128K batch 1 with 511-token blocks against 0.0732 with 512).
def empty_padded_token_rows(like: torch.Tensor, shape: list[int] | tuple[int, ...]) -> torch.Tensor:
    """A zero ``shape = [..., nb, T, w]`` tensor (``like``'s dtype and device) whose blocks start every
    :func:`tokens_contiguous_stride` ``(T)`` rows: memory ``[..., nb, T_row, w]``, seen as its first ``T`` rows
    (the padding rows stay zero)."""
    *outer, t, w = shape
    return like.new_zeros([*outer, tokens_contiguous_stride(t), w])[..., :t, :]


def is_padded_token_rows(x: torch.Tensor) -> bool:
    """Whether ``x [..., nb, T, w]`` is in that layout: rows dense, blocks ``T_row * w`` apart."""
    if x.dim() < 3:
        return False
    t, w = x.shape[-2], x.shape[-1]
    if (w > 1 and x.stride(-1) != 1) or (t > 1 and x.stride(-2) != w):
        return False
    return x.stride(-3) == tokens_contiguous_stride(t) * w


def padded_token_rows(x: torch.Tensor) -> torch.Tensor:
    """``x [..., nb, T, w]`` in that layout (a copy unless it already is)."""
    if is_padded_token_rows(x):
        return x
    out = empty_padded_token_rows(x, list(x.shape))
    out.copy_(x)
    return out


# the cold fields kept in a padded layout where ``stores_values_tokens_contiguous``: field -> (allocate
# ``[..., T, w]`` in it, copy a tensor into it unless it already is)
_PADDED_LAYOUTS = {
    "value_coeffs": (empty_tokens_contiguous, tokens_contiguous),
    "value_scales": (empty_padded_token_rows, padded_token_rows),
}


# Everything a checkpoint restores (the layer's whole mutable state; buffers by reference).
_STATE_ATTRS = (
    "keys",
    "values",
    "is_initialized",
    "dtype",
    "device",
    "batch_size",
    "num_kv_heads",
    "head_dim",
    "_seq_len",
    "_lm_k",
    "_lm_v",
    "_n_lm",
    "_cold",
    "_nb",
    "_block_t",
    "_hot_k",
    "_hot_v",
    "_hot_lo",
    "_hot_hi",
    "_hot_start",
    "_chunk_k",
    "_chunk_v",
    "_chunk_start",
    "_unchecked_from",
    "_observe_due",
)
_MISSING = object()
# one C-level read of every attribute above (checkpoint of an initialized layer, where all exist)
_GET_STATE = operator.attrgetter(*_STATE_ATTRS)
_GET_COLD_FIELDS = operator.attrgetter(*ColdBlocks.tensor_fields())
# memory_report's tier of every ColdBlocks tensor field (checked against the dataclass below)
_TIER_OF_FIELD = {
    "key_coeffs": "coefficients",
    "value_coeffs": "coefficients",
    "key_scales": "scales",
    "key_offsets": "scales",
    "value_scales": "scales",
    "key_basis": "bases",
    "value_basis": "bases",
    "outlier_keys": "outliers",
    "outlier_values": "outliers",
    "outlier_index": "outlier_index",
    "block_starts": "block_starts",
}
if set(_TIER_OF_FIELD) != set(ColdBlocks.tensor_fields()):  # a new ColdBlocks field needs a tier
    raise ImportError(
        f"layer.py: tiers for ColdBlocks fields {set(ColdBlocks.tensor_fields()) ^ set(_TIER_OF_FIELD)}"
    )
#: memory_report tiers that make up the compressed (cold) tier
COLD_TIERS = tuple(dict.fromkeys(_TIER_OF_FIELD.values()))
_EXACT_TIERS = ("landmarks", "hot", "chunk")


def _any_nonfinite(*xs: torch.Tensor) -> torch.Tensor:
    """Device bool: some element is NaN or inf. Reduces with min / max, which propagate NaN,
    so no full-size boolean temporary is made (a prefill chunk can be gigabytes)."""
    ends = [e.float() for x in xs if x.numel() for e in torch.aminmax(x)]
    if not ends:
        return torch.zeros((), dtype=torch.bool, device=xs[0].device)
    return ~torch.isfinite(torch.stack(ends)).all()


@dataclass(frozen=True)
class LayerCheckpoint:
    """What :meth:`SpectralLayer.checkpoint` returns: counters and buffer references (no copies)."""

    layer: SpectralLayer
    generation: int  # structural changes (crop, batch ops, reset, to, offload) bump it
    seq: int  # order of checkpoints within a generation
    attrs: tuple[tuple[str, Any], ...]
    n_compression_calls: int


def _decode_facts(key_states: torch.Tensor, value_states: torch.Tensor) -> tuple:
    """What ``SpectralLayer._validate``'s checks of a decode token depend on (its fast path)."""
    return (
        key_states.shape,
        value_states.shape,
        key_states.dtype,
        value_states.dtype,
        key_states.device,
        value_states.device,
    )


class SpectralLayer(CacheLayerMixin):
    """Compressed cache of one full-attention layer (KV heads only; GQA heads never repeated)."""

    is_sliding = False
    is_compileable = False
    is_croppable = True
    #: set by ``integrations/graphed.py`` only while it runs a graphed decode step (see
    #: "Graphed decode steps" below); None otherwise. Not part of the checkpointed state.
    _graph_slot: Any = None

    def __init__(
        self,
        config: SpectralConfig,
        layer_idx: int = 0,
        *,
        head_dim: int | None = None,
        num_kv_heads: int | None = None,
        rope_inv_freq: torch.Tensor | None = None,
        rotator: RopeRotator | None = None,
    ) -> None:
        """``rope_inv_freq`` (pre_rope only): the model's RoPE inverse frequencies for this
        layer (``find_rotary_inv_freq``); ``rotator`` is accepted instead for convenience."""
        super().__init__()
        if not isinstance(config, SpectralConfig):
            raise TypeError(f"SpectralLayer needs a SpectralConfig, got {type(config).__name__}")
        if rope_inv_freq is None and rotator is not None:
            rope_inv_freq = rotator.inv_freq
        if config.key_space == "pre_rope" and rope_inv_freq is None:
            raise ValueError(
                "key_space='pre_rope' needs rope_inv_freq (the model's rotary inverse frequencies, "
                "see spectralcache.cache.rope.find_rotary_inv_freq)"
            )
        if head_dim is not None:
            config.check_ranks(head_dim)
        self.config = config
        self.layer_idx = layer_idx
        self.expected_head_dim = head_dim
        self.expected_kv_heads = num_kv_heads
        # validated here (host, once); moved to the cache's device at the first update
        self.rotator: RopeRotator | None = None
        if config.key_space == "pre_rope":
            self.rotator = RopeRotator(rope_inv_freq, head_dim or 2 * rope_inv_freq.numel())
        # stats: (blocks compressed, seconds) per compression call
        # (blocks, seconds) per compression call; on CUDA the seconds are read when first used
        self.compression_calls: list[tuple[int, float | DeviceSeconds]] = []
        # set by SpectralCache for the length of a forward opened by spectralcache.enable's hooks:
        # refusals found on the device go here and are read once at the forward's end
        self.deferred_checks: list[DeferredCheck] | None = None
        self._generation = 0
        self._checkpoint_seq = 0
        # checkpoints taken after the one a rollback returned to: (first, last) seq, per generation
        self._invalid_seqs: list[tuple[int, int]] = []
        self._clear()

    # ------------------------------------------------------------------ bookkeeping
    def _clear(self) -> None:
        self.keys = None
        self.values = None
        self.is_initialized = False
        self._seq_len = 0
        self._lm_k: torch.Tensor | None = None  # [B, H, landmarks, D] buffer
        self._lm_v: torch.Tensor | None = None
        self._n_lm = 0
        self._cold: ColdBlocks | None = None  # buffers [B, H, capacity, ...]
        self._nb = 0
        # tokens per block of this layer: fixed by its first compression (config.block_size, or
        # the re-blocked length of SpectralConfig.compress_tail); None while the cold tier is empty
        self._block_t: int | None = None
        self._hot_k: torch.Tensor | None = None  # [B, H, capacity, D] buffer, live [lo, hi)
        self._hot_v: torch.Tensor | None = None
        self._hot_lo = 0
        self._hot_hi = 0
        self._hot_start = 0  # cache index of the token at _hot_lo
        self._chunk_k: torch.Tensor | None = None
        self._chunk_v: torch.Tensor | None = None
        self._chunk_start = 0
        # cache index of the first decode token stored since the last NaN/inf check (None: none);
        # those tokens are all still exact (landmarks / hot), see the module docstring
        self._unchecked_from: int | None = None
        # outlier_selection != "residual": the last update (a multi-token chunk) deferred its due
        # blocks to observe_queries (they wait exact in the hot tier)
        self._observe_due = False
        self._invalidate_checkpoints()

    def _invalidate_checkpoints(self) -> None:
        self._generation += 1
        self._invalid_seqs = []
        # the layout may have changed (batch, dtype, device): validate the next decode token in full
        self._decode_facts = None

    def __repr__(self) -> str:
        return (
            f"SpectralLayer(layer_idx={self.layer_idx}, seq_len={self._seq_len}, "
            f"blocks={self.num_blocks}, hot={self.hot_len})"
        )

    @property
    def num_blocks(self) -> int:
        return self._nb

    @property
    def block_size(self) -> int:
        """Tokens per cold block of this layer: ``config.block_size``, unless
        ``config.compress_tail`` re-blocked the first prefill chunk (then the chosen ``T'``)."""
        return self.config.block_size if self._block_t is None else self._block_t

    def _tail_block_size(self, n: int) -> int:
        """``compress_tail``: the block length ``T'`` that lays whole blocks over ``n`` tokens
        with the fewest left over (``k = ceil(n / T)`` blocks of ``n // k``; fewer than ``k``
        tokens remain), within ``[T_min, block_size]``; ``block_size`` itself when whole blocks of
        it leave no more over (ties keep the longer block: fewer bases), or at most ``n //
        TAIL_PLAIN_FRACTION`` (a long prompt: whole blocks decode faster, see that constant), or when
        ``n < T_min`` (then nothing is due and the choice waits for a later chunk).

        Why re-blocking rather than a padded short last block: readers locate blocks from host
        integers (block ``n`` ends ``(nb - n - 1) * T`` before ``hot_start``) and attend the exact
        copy of every row listed in ``outlier_index``, so padding rows could be neither placed nor
        masked within the state contract; a uniform ``T'`` keeps ``[nb, T']`` shapes and
        contiguous blocks, which every reader already handles."""
        cfg, t = self.config, self.config.block_size
        rk, rv = cfg.ranks_for(self.head_dim)
        ranks = [
            r for r, codec in ((rk, cfg.key_codec), (rv, cfg.value_codec)) if codec not in BASISLESS_CODECS
        ]
        t_min = min(t, max(-(-t // 2), cfg.outliers_per_block + 1, *ranks))
        if n < t_min:
            return t
        k = -(-n // t)
        t_prime = min(t, max(t_min, n // k))
        # the plain layout may already waste less (n just past a multiple of T), or little enough
        # for the decode kernel's sake (a long prompt): keep T then
        waste = n % t
        if n >= t and (waste <= n - (n // t_prime) * t_prime or waste <= n // TAIL_PLAIN_FRACTION):
            return t
        return t_prime

    @property
    def rope_inv_freq(self) -> torch.Tensor | None:
        """[rot_dim / 2] float32 (pre_rope only), on the cache's device once initialized."""
        return None if self.rotator is None else self.rotator.inv_freq

    def _place_rotator(self, device: torch.device) -> None:
        if self.rotator is not None and self.rotator.inv_freq.device != device:
            moved = copy.copy(self.rotator)  # already validated: no second (syncing) check
            moved.inv_freq = self.rotator.inv_freq.to(device)
            self.rotator = moved

    @property
    def cold_capacity(self) -> int:
        """Blocks the cold buffers can hold before they are reallocated."""
        return 0 if self._cold is None else int(self._cold.block_starts.shape[0])

    @property
    def hot_len(self) -> int:
        return self._hot_hi - self._hot_lo

    @property
    def num_landmarks(self) -> int:
        return self._n_lm

    @property
    def ranks(self) -> tuple[int, int]:
        if self.head_dim is None:
            raise RuntimeError("layer not initialized")
        return self.config.ranks_for(self.head_dim)

    @property
    def pending_chunk_keys(self) -> torch.Tensor | None:
        """The key tensor the last ``update`` returned, until ``release_chunk``."""
        return self._chunk_k

    @property
    def has_pending_chunk(self) -> bool:
        """True between ``update`` and ``release_chunk`` (i.e. while attention may still read it)."""
        return self._chunk_k is not None

    # ------------------------------------------------------------------ views
    def _landmarks(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._n_lm == self._lm_k.shape[2]:
            # full (every decode step once the first tokens are in): the buffers are the views;
            # no slicing op per step
            return self._lm_k, self._lm_v
        return self._lm_k[:, :, : self._n_lm], self._lm_v[:, :, : self._n_lm]

    def _hot(self) -> tuple[torch.Tensor, torch.Tensor]:
        lo, hi = self._hot_lo, self._hot_hi
        return self._hot_k[:, :, lo:hi], self._hot_v[:, :, lo:hi]

    def _cold_view(self, lo: int = 0, hi: int | None = None) -> ColdBlocks | None:
        if self._cold is None or self._nb == 0:
            return None
        if lo == 0 and hi is None:
            # The whole-tier view that state() hands out at every decode step: reused while the
            # buffers (self._cold, replaced on every reallocation) and the block count stay, which
            # saves ten slicing ops a step and lets readers cache their per-view launch arguments
            # (attention/triton/decode.py). It lives on the buffers' object, so it dies with them.
            memo = self._cold.__dict__.get("_full_view")
            if memo is not None and memo[0] == self._nb:
                view = memo[1]
                # a caller may have reassigned a field of a view it was handed: then slice afresh
                # (identity per field, in C: no Python loop per decode step)
                if all(map(operator.is_, _GET_COLD_FIELDS(view), memo[2])):
                    return view
            view = self._cold.blocks(0, self._nb)
            self._cold.__dict__["_full_view"] = (self._nb, view, _GET_COLD_FIELDS(view))
            return view
        return self._cold.blocks(lo, self._nb if hi is None else hi)

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> LayerCheckpoint:
        """A cheap snapshot (counters and references to the current buffers, no copy).

        :meth:`rollback` with it restores the layer exactly, as long as only ``update`` and
        ``release_chunk`` ran since (they write only past every live window). Any other
        mutation (crop, batch ops, reset, offload, ``to``) invalidates it, and so does a
        rollback to an *earlier* checkpoint (rolling back to this one, or to a later one, keeps
        it valid: nested checkpoints, e.g. one per forward around one per update, compose).
        """
        self._checkpoint_seq += 1
        if self.is_initialized:  # every attribute exists: one C-level read (decode: every step)
            attrs = _GET_STATE(self)
        else:
            attrs = tuple(getattr(self, name, _MISSING) for name in _STATE_ATTRS)
        return LayerCheckpoint(
            self, self._generation, self._checkpoint_seq, attrs, len(self.compression_calls)
        )

    def rollback(self, token: LayerCheckpoint) -> None:
        """Restore the state captured by :meth:`checkpoint`."""
        if not isinstance(token, LayerCheckpoint) or token.layer is not self:
            raise ValueError(f"layer {self.layer_idx}: rollback needs a checkpoint taken on this layer")
        stale = token.generation != self._generation or any(
            lo <= token.seq <= hi for lo, hi in self._invalid_seqs
        )
        if stale:
            raise RuntimeError(
                f"layer {self.layer_idx}: this checkpoint is no longer valid (the layer was cropped, "
                "reordered, reset or moved, or rolled back to an earlier checkpoint, since it was taken)"
            )
        for name, value in zip(_STATE_ATTRS, token.attrs):
            if value is _MISSING:
                if hasattr(self, name):
                    delattr(self, name)
            else:
                setattr(self, name, value)
        del self.compression_calls[token.n_compression_calls :]
        self._decode_facts = None  # validated against the state before; validate the next call in full
        # later checkpoints may reference windows the next updates will overwrite
        if token.seq < self._checkpoint_seq:
            self._invalid_seqs.append((token.seq + 1, self._checkpoint_seq))

    # ------------------------------------------------------------------ validation
    def _validate(self, key_states: Any, value_states: Any) -> None:
        """Refuse bad K/V with an error naming the problem, before anything changes.

        Decode fast path: once a single token has passed every check below on this layer, a
        later one with the very same shapes, dtypes and devices passes them too (each check
        depends only on those and on the layer's batch / heads / head_dim / dtype / device,
        which only ``lazy_initialization``, ``to``, batch ops, crop, reset and rollback change,
        and they all drop the cached facts). So that case is one tuple compare; anything else
        takes the full checks (same errors as ever)."""
        facts = self._decode_facts
        if (
            facts is not None
            and isinstance(key_states, torch.Tensor)
            and isinstance(value_states, torch.Tensor)
            and facts == _decode_facts(key_states, value_states)
        ):
            return
        self._validate_full(key_states, value_states)
        if key_states.shape[-2] == 1 and self.is_initialized and self._seq_len > 0:
            self._decode_facts = _decode_facts(key_states, value_states)

    def _validate_full(self, key_states: Any, value_states: Any) -> None:
        for name, x in (("key_states", key_states), ("value_states", value_states)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    f"layer {self.layer_idx}: {name} must be a torch.Tensor, got {type(x).__name__}"
                )
            if x.ndim != 4:
                raise ValueError(
                    f"layer {self.layer_idx}: {name} must be [batch, kv_heads, tokens, head_dim], "
                    f"got shape {tuple(x.shape)}"
                )
            if x.dtype not in _SUPPORTED_DTYPES:
                raise TypeError(f"layer {self.layer_idx}: {name} has unsupported dtype {x.dtype}")
        if key_states.shape != value_states.shape:
            raise ValueError(
                f"layer {self.layer_idx}: key_states {tuple(key_states.shape)} and value_states "
                f"{tuple(value_states.shape)} must have the same shape"
            )
        if key_states.dtype != value_states.dtype:
            raise ValueError(
                f"layer {self.layer_idx}: key_states dtype {key_states.dtype} != value_states dtype {value_states.dtype}"
            )
        if key_states.device != value_states.device:
            raise ValueError(f"layer {self.layer_idx}: key_states and value_states are on different devices")
        b, h, _, d = key_states.shape
        if self.expected_head_dim is not None and d != self.expected_head_dim:
            raise ValueError(
                f"layer {self.layer_idx}: head_dim {d} != the model's head_dim {self.expected_head_dim}"
            )
        if self.expected_kv_heads is not None and h != self.expected_kv_heads:
            raise ValueError(
                f"layer {self.layer_idx}: {h} heads given but the model has {self.expected_kv_heads} KV heads "
                "(pass KV heads only, never GQA-repeated heads)"
            )
        if self.is_initialized:
            if d != self.head_dim or h != self.num_kv_heads:
                raise ValueError(
                    f"layer {self.layer_idx}: got [.., {h} heads, .., head_dim {d}] but the cache holds "
                    f"{self.num_kv_heads} heads of head_dim {self.head_dim}"
                )
            if self._seq_len > 0 and b != self.batch_size:
                raise ValueError(f"layer {self.layer_idx}: batch {b} != cached batch {self.batch_size}")
            if key_states.dtype != self.dtype:
                raise ValueError(
                    f"layer {self.layer_idx}: dtype {key_states.dtype} != cached dtype {self.dtype}"
                )
            if key_states.device != self.device:
                raise ValueError(
                    f"layer {self.layer_idx}: device {key_states.device} != cached device {self.device}"
                )
        if d < 2:
            raise ValueError(f"layer {self.layer_idx}: head_dim must be >= 2, got {d}")
        rk, rv = self.config.ranks_for(d)
        if max(rk, rv) > d:
            raise ValueError(f"layer {self.layer_idx}: ranks ({rk}, {rv}) exceed head_dim {d}")
        if key_states.shape[-2] > 1:
            # a prefill chunk: read back at the forward's end when it collects checks, else now
            if self.deferred_checks is not None and should_defer(key_states):
                idx = self.layer_idx
                self.deferred_checks.append(
                    DeferredCheck(
                        _any_nonfinite(key_states, value_states),
                        lambda: f"layer {idx}: key/value states contain NaN or inf",
                    )
                )
            elif bool(_any_nonfinite(key_states, value_states)):
                raise ValueError(
                    f"layer {self.layer_idx}: key/value states contain NaN or inf; the cache was not changed"
                )
            self.check_finite()

    # ------------------------------------------------------------------ finiteness
    def _unchecked_rows(self, since: int) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """``(first cache index, keys, values)`` views of the stored exact rows at cache index
        ``>= since`` (landmarks, hot): where every decode token since the last check still is."""
        rows = []
        lk, lv = self._landmarks()
        if since < lk.shape[2]:
            rows.append((since, lk[:, :, since:], lv[:, :, since:]))
        hk, hv = self._hot()
        skip = max(since - self._hot_start, 0)
        if skip < hk.shape[2]:
            rows.append((self._hot_start + skip, hk[:, :, skip:], hv[:, :, skip:]))
        return rows

    @staticmethod
    def _first_nonfinite(rows: list[tuple[int, torch.Tensor, torch.Tensor]]) -> int | None:
        """Cache index of the first row holding a NaN/inf (host sync; errors only)."""
        for first, k, v in rows:
            bad = ~(torch.isfinite(k).all(-1) & torch.isfinite(v).all(-1))  # [B, H, n]
            idx = bad.flatten(0, 1).any(0).nonzero()
            if idx.numel():
                return first + int(idx[0])
        return None

    def check_finite(self, incoming: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> None:
        """NaN/inf check of the decode tokens stored since the last check (one host sync when
        there are any; none otherwise); raise ValueError naming the layer and the first bad cache
        index. ``incoming``: ``(keys, values, first cache index)`` of a decode token not stored
        yet that is checked with them (the token of an update that compresses a block).

        Called before every block compression and every multi-token update, and by
        ``SpectralCache.memory_report``; nothing is changed when it raises.
        """
        since = self._unchecked_from
        if since is None and incoming is None:
            return
        rows = [] if since is None or not self.is_initialized else self._unchecked_rows(since)
        if incoming is not None:
            rows.append((incoming[2], incoming[0], incoming[1]))
        if not rows or not bool(_any_nonfinite(*(x for _, k, v in rows for x in (k, v)))):
            self._unchecked_from = None
            return
        index = self._first_nonfinite(rows)
        where = "" if index is None else f" (first at cache index {index})"
        hint = "" if index is None else f"; crop the cache to {index} tokens or reset it to go on"
        raise ValueError(
            f"layer {self.layer_idx}: a decode step stored key/value states with NaN or inf{where}. "
            f"They were never compressed{hint}"
        )

    # ------------------------------------------------------------------ CacheLayerMixin
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.batch_size, self.num_kv_heads, _, self.head_dim = key_states.shape
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        lm = self.config.landmarks
        self._lm_k = key_states.new_empty(b, h, lm, d)
        self._lm_v = key_states.new_empty(b, h, lm, d)
        self._n_lm = 0
        self._hot_k = key_states.new_empty(b, h, 0, d)
        self._hot_v = key_states.new_empty(b, h, 0, d)
        self._hot_lo = self._hot_hi = self._hot_start = 0
        self._cold, self._nb = None, 0
        self._unchecked_from = None
        self._decode_facts = None
        self._place_rotator(self.device)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``[B, H, q, D]`` post-RoPE keys / values; compress whole blocks when due.

        Validates first (shapes, heads, batch, dtype, device; NaN/inf on the host for q > 1,
        at the next sync point for q == 1: see the module docstring). A failure anywhere
        restores the layer from a checkpoint, so it leaves the cache unchanged.
        Returns the exact chunk (the given tensors); attention reads :meth:`state`.
        """
        self._validate(key_states, value_states)
        token = self.checkpoint()
        try:
            self._append(key_states, value_states)
        except BaseException:
            self.rollback(token)
            raise
        return key_states, value_states

    def update_checkpointed(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """:meth:`update` for a caller holding a :meth:`checkpoint` of this layer taken right
        before this call, which it rolls back to if this raises (``SpectralCache.update``: its
        per-forward checkpoint): the same checks and writes without a second checkpoint. On an
        exception the layer may be half-updated until that rollback."""
        self._validate(key_states, value_states)
        self._append(key_states, value_states)

    #: the q == 1 fast path of ``_append`` (tests switch it off on an instance to compare)
    decode_fast_path = True

    def _append_decode(self, key_states: torch.Tensor, value_states: torch.Tensor) -> bool:
        """One token into the hot buffer's spare room -- what :meth:`_append` does for a decode
        token when the landmarks are full, no block is due and the buffer has room (every step
        but one in ``hot_slack``) -- with only the writes and counters that step changes (the
        hot window start is already ``landmarks + blocks * T`` then). False: nothing done, the
        general path must run."""
        hi = self._hot_hi
        if (
            not self.decode_fast_path
            or not self._seq_len
            or self._n_lm != self.config.landmarks
            or hi >= self._hot_k.shape[2]
            or hi - self._hot_lo + 1 >= self.config.hot_size + self.block_size
        ):
            return False
        start = self._seq_len
        self._hot_k[:, :, hi : hi + 1].copy_(key_states)
        self._hot_v[:, :, hi : hi + 1].copy_(value_states)
        self._hot_hi = hi + 1
        if self._unchecked_from is None:
            self._unchecked_from = start
        self._observe_due = False
        self._chunk_k, self._chunk_v = key_states, value_states
        self._chunk_start = start
        self._seq_len = start + 1
        return True

    def _append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        if self._graph_slot is not None:
            self._append_graph(key_states, value_states)
            return
        if key_states.shape[2] == 1 and self.is_initialized and self._append_decode(key_states, value_states):
            return
        if not self.is_initialized or self._seq_len == 0:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[-2]
        cfg, t = self.config, self.block_size
        start = self._seq_len
        if q == 1 and self._unchecked_from is None:
            self._unchecked_from = start  # checked at the next sync point (module docstring)

        # landmarks: written in place after the last one
        n_lm = min(max(cfg.landmarks - self._n_lm, 0), q)
        if n_lm:
            self._lm_k[:, :, self._n_lm : self._n_lm + n_lm].copy_(key_states[:, :, :n_lm])
            self._lm_v[:, :, self._n_lm : self._n_lm + n_lm].copy_(value_states[:, :, :n_lm])
            self._n_lm += n_lm
        xk, xv = (key_states[:, :, n_lm:], value_states[:, :, n_lm:]) if n_lm else (key_states, value_states)
        # Invariant: landmarks [0, L') | blocks [L', L' + nb*T) | hot; hot only holds tokens once
        # the landmarks are full, so the hot window starts right after the last block.
        self._hot_start = self._n_lm + self._nb * t

        # whole blocks due: read them from the live hot window and/or the incoming tokens
        live = self.hot_len
        total = live + xk.shape[-2]
        if self._block_t is None and cfg.compress_tail and q > 1:
            t = self._tail_block_size(total - cfg.hot_size)
        n_new = (total - cfg.hot_size) // t if total >= cfg.hot_size + t else 0
        # importance-aware outliers: a prefill chunk's due blocks wait for its queries
        defer = q > 1 and cfg.outlier_selection != "residual"
        self._observe_due = defer and n_new > 0
        if n_new and not defer:
            self._block_t = t  # the layer's block length from its first compression on
            m = n_new * t
            from_hot = min(m, live)
            from_new = m - from_hot
            hk, hv = self._hot()
            if from_new == 0:
                src_k, src_v = hk[:, :, :m], hv[:, :, :m]
            elif from_hot == 0:
                src_k, src_v = xk[:, :, :m], xv[:, :, :m]
            else:
                src_k = torch.cat([hk, xk[:, :, :from_new]], dim=-2)
                src_v = torch.cat([hv, xv[:, :, :from_new]], dim=-2)
            # natural sync point: a NaN/inf decode token (this one included) never enters a block
            self.check_finite((key_states, value_states, start) if q == 1 else None)
            blocks = self._compress(src_k, src_v, self._hot_start, t)
            self._append_blocks(blocks)
            self._hot_lo += from_hot
            self._hot_start += m
            xk, xv = xk[:, :, from_new:], xv[:, :, from_new:]

        # the rest enters the hot buffer, in place after the live window when it fits
        rem = xk.shape[-2]
        if rem:
            hi = self._hot_hi
            if hi + rem <= self._hot_k.shape[-2]:
                self._hot_k[:, :, hi : hi + rem].copy_(xk)
                self._hot_v[:, :, hi : hi + rem].copy_(xv)
                self._hot_hi = hi + rem
            else:
                # a fresh buffer (never compacted in place: checkpoints may reference the old one);
                # decode gets slack, a prefill chunk's remainder an exact fit
                slack = self.hot_slack if q <= self.hot_slack else 0
                lo, kept = self._hot_lo, self.hot_len
                self._hot_k = self._compact(self._hot_k[:, :, lo:hi], xk, slack)
                self._hot_v = self._compact(self._hot_v[:, :, lo:hi], xv, slack)
                self._hot_lo, self._hot_hi = 0, kept + rem
        self._chunk_k, self._chunk_v = key_states, value_states
        self._chunk_start = start
        self._seq_len = start + q

    @property
    def hot_slack(self) -> int:
        """Tokens of room a decode-time reallocation of the hot buffer leaves after the live window."""
        return max(self.config.block_size // 32, 16)

    @staticmethod
    def _compact(window: torch.Tensor, new: torch.Tensor, slack: int) -> torch.Tensor:
        b, h, n, d = window.shape
        buf = window.new_empty(b, h, n + new.shape[-2] + slack, d)
        buf[:, :, :n].copy_(window)
        buf[:, :, n : n + new.shape[-2]].copy_(new)
        return buf

    # ------------------------------------------------------------------ graphed decode steps
    # What ``integrations/graphed.py`` (a whole decode step replayed from a CUDA graph) needs from
    # a layer. A replay runs no Python, so everything host-side moves out of the step:
    #
    # * ``graph_prepare`` (eager, before the step): compresses the block the incoming token makes
    #   due -- the very block ``_append`` would compress with that token, since with
    #   ``hot_size >= 1`` it lies wholly in the hot window -- and keeps the hot window at row 0 of
    #   a fixed-capacity buffer (``graph_hot_capacity`` rows), compacting it in place after a
    #   compression. So the hot buffer's address survives every step; only cold-buffer growth
    #   (made rare by ``reserve_blocks``) or the first compression moves a buffer.
    # * ``graph_advance`` (host, before the step): the host counters of one more token, and the
    #   hot row it goes to (the caller hands that row to the step as a device scalar).
    # * ``_append_graph`` (inside the step, while ``_graph_slot`` is set): writes the token at
    #   that device row with ``index_copy_`` -- no host int is baked into the write.
    # * ``graph_state``: the state the step's attention reads (the token is in the hot window).
    #
    # In-place compaction overwrites rows that a view handed out earlier may show, so it
    # invalidates outstanding checkpoints (``rollback`` to one then raises); nothing else here
    # breaks the checkpoint contract (``graph_advance`` only moves counters).

    @property
    def graph_hot_capacity(self) -> int:
        """Rows of the fixed hot buffer in graphed decoding: the most a hot window holds after a
        decode write (``hot_size + block_size - 1``) plus one."""
        return self.config.hot_size + self.config.block_size

    def graph_unready_reason(self) -> str | None:
        """Why the next decode token cannot go through a graphed step (None: it can)."""
        if not self.is_initialized or self._seq_len == 0:
            return "the layer is empty (prefill first)"
        if self.config.hot_size < 1:
            return "hot_size is 0 (a due block would include the incoming token)"
        if self._n_lm != self.config.landmarks:
            return f"the landmarks are not full yet ({self._n_lm} of {self.config.landmarks})"
        if self._chunk_k is not None:
            return "a chunk is pending (the previous forward's attention did not run)"
        if getattr(self, "_observe_due", False):
            return "blocks deferred by a prefill chunk are still due"
        return None

    def graph_prepare(self, tokens_ahead: int = 0) -> None:
        """Make the layer ready for one graphed decode token (eager; may synchronize).

        Compresses the due block (if the incoming token makes one due), gives the hot window a
        buffer of ``graph_hot_capacity`` rows starting at row 0, and grows the cold buffers (when
        they are reallocated anyway, or now if they exist and are smaller) to hold every block
        the next ``tokens_ahead`` decode tokens (this one included) will make due, so that those
        compressions append in place. Atomic: a failed compression leaves the layer as it was."""
        reason = self.graph_unready_reason()
        if reason is not None:
            raise RuntimeError(f"layer {self.layer_idx}: not ready for a graphed decode step: {reason}")
        cfg, t = self.config, self.block_size
        live = self.hot_len
        want_cold = self._nb + max(live + int(tokens_ahead) - cfg.hot_size, 0) // t
        if live + 1 >= cfg.hot_size + t:
            m = (live + 1 - cfg.hot_size) // t * t  # <= live, since hot_size >= 1
            token = self.checkpoint()
            try:
                self.check_finite()  # a NaN/inf decode token never enters a block
                hk, hv = self._hot()
                blocks = self._compress(hk[:, :, :m], hv[:, :, :m], self._hot_start, t)
                self._append_blocks(blocks, min_capacity=want_cold)
                self._block_t = t
                self._hot_lo += m
                self._hot_start += m
            except BaseException:
                self.rollback(token)
                raise
        if self._cold is not None and self._nb and self.cold_capacity < want_cold:
            self._regrow_cold(want_cold)
        cap = self.graph_hot_capacity
        lo, hi = self._hot_lo, self._hot_hi
        if self._hot_k.shape[2] < cap:
            # a fresh fixed-capacity buffer (outstanding checkpoints keep the old one)
            none = self._hot_k.new_empty(self.batch_size, self.num_kv_heads, 0, self.head_dim)
            self._hot_k = self._compact(self._hot_k[:, :, lo:hi], none, cap - (hi - lo))
            self._hot_v = self._compact(self._hot_v[:, :, lo:hi], none, cap - (hi - lo))
            self._hot_lo, self._hot_hi = 0, hi - lo
        elif lo:
            # in place: the buffer (and a captured graph's address of it) stays
            n = hi - lo
            for buf in (self._hot_k, self._hot_v):
                buf[:, :, :n].copy_(buf[:, :, lo:hi].clone())
            self._hot_lo, self._hot_hi = 0, n
            self._invalidate_checkpoints()  # rows a checkpoint's window shows were overwritten

    def _regrow_cold(self, capacity: int, template: ColdBlocks | None = None) -> None:
        """Fresh cold buffers of ``capacity`` blocks holding the current ones (checkpoint-safe),
        shaped like ``template``'s tensors (default: the current buffers; a layer that holds none
        yet passes the blocks it is about to append)."""
        old, nb = self._cold, self._nb
        padded = stores_values_tokens_contiguous(self.config)

        def grow(name: str, x: torch.Tensor) -> torch.Tensor:
            axis = 0 if name == "block_starts" else 2
            shape = list(x.shape)
            shape[axis] = capacity
            if padded and name in _PADDED_LAYOUTS:
                buf = _PADDED_LAYOUTS[name][0](x, shape)
            else:
                buf = x.new_empty(shape)
            if nb:
                buf.narrow(axis, 0, nb).copy_(getattr(old, name).narrow(axis, 0, nb))
            return buf

        self._cold = (old if template is None else template).map_tensors(grow)

    def graph_advance(self) -> int:
        """Host counters of one graphed decode token (call after :meth:`graph_prepare`); returns
        the hot-buffer row the step must write it to. Only counters change: a checkpoint taken
        before this call restores the layer."""
        hi = self._hot_hi
        if hi >= self._hot_k.shape[2] or self._chunk_k is not None:
            raise RuntimeError(f"layer {self.layer_idx}: graph_advance without graph_prepare")
        start = self._seq_len
        self._hot_hi = hi + 1
        if self._unchecked_from is None:
            self._unchecked_from = start  # checked at the next sync point (module docstring)
        self._observe_due = False
        self._seq_len = start + 1
        return hi

    def _append_graph(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """The write of a graphed decode step: the token goes to the hot row ``graph_advance``
        chose, read from the device scalar ``_graph_slot.write_row``; counters were advanced
        already. The chunk is kept as in ``_append_decode`` (the attention handshake finds the
        layer by it)."""
        if key_states.shape[2] != 1:
            raise RuntimeError(
                f"layer {self.layer_idx}: a graphed decode step takes one token, got {key_states.shape[2]}"
            )
        row = self._graph_slot.write_row
        self._hot_k.index_copy_(2, row, key_states)
        self._hot_v.index_copy_(2, row, value_states)
        self._chunk_k, self._chunk_v = key_states, value_states
        self._chunk_start = self._seq_len - 1

    def graph_state(self) -> SpectralLayerState:
        """:meth:`state` without the chunk: the step's token is read from the hot window, where
        ``_append_graph`` wrote it (same values), so no per-step tensor's address is baked."""
        state = self.state()
        state.chunk_keys = state.chunk_values = None
        state.chunk_start = state.seq_len
        return state

    def release_chunk(self) -> None:
        """Drop the current call's exact K/V (called by attention once it has run)."""
        self._chunk_k = self._chunk_v = None

    def get_seq_length(self) -> int:
        return self._seq_len

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        # The mask indexes cache indices 0 .. seq_len + q - 1 (every token ever cached).
        return self._seq_len + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self._clear()

    def offload(self) -> None:
        self._map_tensors(lambda x: x.to("cpu", non_blocking=True), compact=False)

    def prefetch(self) -> None:
        if self.is_initialized:
            device = self.device
            self._map_tensors(lambda x: x.to(device, non_blocking=True), compact=False)

    # ------------------------------------------------------------------ batch ops
    def _map_tensors(self, fn, *, compact: bool, batch: bool = False) -> None:
        """Apply ``fn`` to every tensor (building all results before assigning anything).

        ``compact``: apply it to the live views only, so the results are exact-fit buffers (batch
        ops); otherwise to the whole buffers, capacity included (``offload`` / ``prefetch`` / ``to``).
        ``batch``: ``fn`` acts on the batch dim, so it skips ``block_starts`` (no batch dim).
        """
        if not self.is_initialized:
            return
        if compact:
            lm_k, lm_v = self._lm_k, self._lm_v  # fixed capacity: map whole
            hot_k, hot_v = self._hot()
            cold = self._cold_view()
        else:
            lm_k, lm_v, hot_k, hot_v, cold = self._lm_k, self._lm_v, self._hot_k, self._hot_v, self._cold
        new_cold = None
        if cold is not None:
            new_cold = cold.map_tensors(lambda name, x: x if batch and name == "block_starts" else fn(x))
            if stores_values_tokens_contiguous(self.config):
                # batch ops return row-major copies: keep the layouts the kernel reads fastest
                for name, (_, relayout) in _PADDED_LAYOUTS.items():
                    x = getattr(new_cold, name)
                    if x is not None:
                        setattr(new_cold, name, relayout(x))
        chunk = [None if x is None else fn(x) for x in (self._chunk_k, self._chunk_v)]
        new = (fn(lm_k), fn(lm_v), fn(hot_k), fn(hot_v))
        # assign (nothing above mutated self)
        self._lm_k, self._lm_v, self._hot_k, self._hot_v = new
        self._chunk_k, self._chunk_v = chunk
        self._cold = new_cold
        if compact:
            self._hot_hi -= self._hot_lo
            self._hot_lo = 0
            if new_cold is None:
                self._nb = 0
        self._invalidate_checkpoints()

    def _batch_op(self, fn) -> None:
        if self.is_initialized and self._seq_len > 0:
            self._map_tensors(fn, compact=True, batch=True)
            self.batch_size = int(self._hot_k.shape[0])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.is_initialized and self._seq_len > 0:
            idx = beam_idx.to(self.device)
            self._batch_op(lambda x: x.index_select(0, idx))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_op(lambda x: x.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.is_initialized and self._seq_len > 0:
            if isinstance(indices, torch.Tensor):
                indices = indices.to(self.device)
            self._batch_op(lambda x: x[indices, ...].contiguous())

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SpectralLayer:
        """Move every tensor to ``device`` and / or convert the exact tiers and bases to ``dtype``.

        Integer coefficients, outlier indices and float16 scales keep their dtype; 16-bit
        coefficients (stored in the model dtype) and bases stored in the model dtype follow
        ``dtype``; float16 bases (``basis_dtype`` auto for float32 models) stay float16 unless the
        config says ``basis_dtype="model"``. Returns self.
        """
        if dtype is not None and dtype not in _SUPPORTED_DTYPES:
            raise TypeError(f"layer {self.layer_idx}: unsupported dtype {dtype}")
        if not self.is_initialized:
            return self
        target_device = self.device if device is None else torch.device(device)
        old_dtype = self.dtype
        new_dtype = old_dtype if dtype is None else dtype
        new_basis = self.config.basis_torch_dtype(new_dtype)
        old_basis = self.config.basis_torch_dtype(old_dtype)

        def move(x: torch.Tensor, kind: str = "exact") -> torch.Tensor:
            want = x.dtype
            if kind == "exact" and x.dtype == old_dtype:
                want = new_dtype
            elif kind == "basis" and x.dtype == old_basis:
                want = new_basis
            return x.to(device=target_device, dtype=want)

        cold = None
        if self._cold is not None:
            kinds = {
                "key_basis": "basis",
                "value_basis": "basis",
                "outlier_keys": "exact",
                "outlier_values": "exact",
                "key_coeffs": "exact" if self.config.coeff_bits == 16 else "keep",
                "value_coeffs": "exact" if self.config.value_bits == 16 else "keep",
            }
            cold = self._cold.map_tensors(lambda name, x: move(x, kinds.get(name, "keep")))
        moved = [move(x) for x in (self._lm_k, self._lm_v, self._hot_k, self._hot_v)]
        chunk = [None if x is None else move(x) for x in (self._chunk_k, self._chunk_v)]
        self._lm_k, self._lm_v, self._hot_k, self._hot_v = moved
        self._chunk_k, self._chunk_v = chunk
        self._cold = cold
        self.dtype, self.device = new_dtype, target_device
        self._place_rotator(target_device)
        self._invalidate_checkpoints()
        return self

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the last ``-tokens_to_remove`` tokens (a negative int, as ``DynamicLayer``).

        Tokens in the hot buffer or landmarks are cut off (the windows shrink; no copy). Cropping
        into the cold tier drops every block that reaches past the new length; the kept head of a
        partially cropped block is put back into the hot buffer as its *reconstruction* (outliers
        exact, the rest from the low-rank representation, re-rotated for pre-RoPE), so no exact
        copy is pretended. Those tokens are compressed again when the hot buffer next fills.
        No host synchronization (every boundary is a host int).
        """
        if tokens_to_remove > 0:
            raise ValueError(
                f"crop({tokens_to_remove}): pass a negative number of tokens to remove, as for DynamicLayer"
            )
        if tokens_to_remove == 0 or not self.is_initialized:
            return
        self.release_chunk()
        new_len = max(self._seq_len + tokens_to_remove, 0)
        t = self.block_size
        first_block = self._hot_start - self._nb * t  # == number of landmarks whenever nb > 0
        if new_len >= self._hot_start:
            self._hot_hi = self._hot_lo + (new_len - self._hot_start)
        elif self._nb and new_len >= first_block:
            n_keep = (new_len - first_block) // t  # whole blocks kept
            partial = new_len - first_block - n_keep * t
            b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
            hot_k = self._hot_k.new_empty(b, h, partial, d)
            hot_v = self._hot_v.new_empty(b, h, partial, d)
            if partial:
                block = self._cold_view(n_keep, n_keep + 1)
                rec_k, rec_v = reconstruct(block, self._rotate_fn(block.block_starts))  # [B,H,1,T,D]
                hot_k.copy_(rec_k[:, :, 0, :partial])
                hot_v.copy_(rec_v[:, :, 0, :partial])
            self._hot_k, self._hot_v = hot_k, hot_v
            self._hot_lo, self._hot_hi = 0, partial
            self._hot_start = first_block + n_keep * t
            self._nb = n_keep
            if n_keep == 0:
                self._cold = None  # release the cold buffers
                self._block_t = None  # the next first compression chooses again
        else:
            self._n_lm = new_len
            self._hot_lo = self._hot_hi = 0
            self._hot_start = new_len
            self._cold, self._nb = None, 0
            self._block_t = None
        self._seq_len = new_len
        if self._unchecked_from is not None and self._unchecked_from >= new_len:
            self._unchecked_from = None  # every unchecked token was cropped away
        self._invalidate_checkpoints()

    # ------------------------------------------------------------------ compression
    def _rotate_fn(self, block_starts: torch.Tensor):
        if self.config.key_space != "pre_rope":
            return None
        inv_freq = self.rope_inv_freq
        return lambda keys: rotate_block_keys(keys, block_starts, inv_freq)

    def _compress(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        first_index: int,
        t: int,
        importance: torch.Tensor | None = None,
    ) -> ColdBlocks:
        """Compress ``[B, H, n*t, D]`` tokens starting at cache index ``first_index`` into blocks
        of ``t`` tokens: one ``compress_blocks`` call for every block of every head."""
        b, h, n_tok, d = keys.shape
        nb = n_tok // t
        kb = keys.reshape(b, h, nb, t, d)
        vb = values.reshape(b, h, nb, t, d)
        fit_keys = kb
        if self.config.key_space == "pre_rope":
            positions = first_index + torch.arange(n_tok, device=keys.device, dtype=torch.int64)
            fit_keys = self.rotator.unrotate(keys.float(), positions).reshape(b, h, nb, t, d)
        starts = first_index + t * torch.arange(nb, device=keys.device, dtype=torch.int64)
        rk, rv = self.config.ranks_for(d)
        deferred = self.deferred_checks
        n_deferred = 0 if deferred is None else len(deferred)
        seconds = DeviceSeconds(keys.device)
        try:
            blocks = compress_blocks(
                fit_keys,
                vb,
                self.config,
                rk,
                rv,
                exact_keys=kb,
                block_starts=starts,
                block_size=t,
                importance=importance,
                deferred_checks=deferred,
            )
        except ValueError as e:
            raise ValueError(
                f"layer {self.layer_idx}: cannot compress cache indices {first_index}..{first_index + n_tok - 1}: "
                f"{e}. The update was refused and the cache is unchanged"
            ) from e
        if deferred is not None and len(deferred) > n_deferred:
            check = deferred[-1]
            where = f"layer {self.layer_idx}: cannot compress cache indices {first_index}..{first_index + n_tok - 1}"
            deferred[-1] = DeferredCheck(check.failed, lambda: f"{where}: {check.message()}")
        self.compression_calls.append((nb, seconds.stop()))
        return blocks

    def _append_blocks(self, new: ColdBlocks, min_capacity: int = 0) -> None:
        """Write ``new`` after the last block, growing the buffers (fresh ones) when full
        (to at least ``min_capacity`` blocks: graphed decoding reserves room ahead)."""
        n = new.num_blocks
        need = self._nb + n
        if self._cold is None or need > self.cold_capacity:
            cap = need if self._nb == 0 else max(need, math.ceil(self._nb * COLD_GROWTH))
            self._regrow_cold(max(cap, min_capacity), template=new)
        nb = self._nb

        def put(name: str, x: torch.Tensor) -> torch.Tensor:
            axis = 0 if name == "block_starts" else 2
            getattr(self._cold, name).narrow(axis, nb, n).copy_(x)
            return x

        new.map_tensors(put)
        self._nb = need

    # ------------------------------------------------------------------ importance-aware outliers
    def observe_queries(
        self, query: torch.Tensor, scaling: float | None = None, softcap: float | None = None
    ) -> None:
        """Compress the blocks the current multi-token update deferred, ranking each block's
        outliers by the attention its tokens receive from the chunk's last queries.

        Called by spectral attention (``attention/interface.py``) once it has attended the chunk,
        before ``release_chunk``; ``query`` is its ``[B, Hq, q, D]`` query (post-RoPE, ``Hq`` a
        multiple of the KV heads). Does nothing unless ``config.outlier_selection`` is not
        ``"residual"`` and the last ``update`` deferred blocks (and its chunk is still pending), so
        a decode step never gets here with work to do. The blocks compressed are exactly those the
        update would have compressed (same count, same ``compress_tail`` block length); only the
        outlier choice differs. Writes only past live views or into fresh buffers, so a checkpoint
        taken before the update (the cache's per-forward one) still rolls it back; a failure
        restores the layer as it was before this call.
        """
        # getattr: a layer pickled before this field existed has none (and nothing deferred)
        if not getattr(self, "_observe_due", False) or self._chunk_k is None:
            return
        cfg = self.config
        live = self.hot_len
        t = self.block_size
        if self._block_t is None and cfg.compress_tail:
            t = self._tail_block_size(live - cfg.hot_size)
        n_new = (live - cfg.hot_size) // t if live >= cfg.hot_size + t else 0
        token = self.checkpoint()
        try:
            self._observe_due = False
            if not n_new:
                return
            m = n_new * t
            b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
            importance = self._attention_importance(query, scaling, softcap, m)
            hk, hv = self._hot()
            self.check_finite()  # a NaN/inf decode token never enters a block
            blocks = self._compress(
                hk[:, :, :m], hv[:, :, :m], self._hot_start, t, importance.reshape(b, h, n_new, t)
            )
            self._append_blocks(blocks)
            self._block_t = t
            # what stays hot moves to a fresh buffer: the chunk's buffer (whole prompt) would
            # otherwise stay held (memory_report counts capacity); fresh, so checkpoints stay valid
            lo, hi = self._hot_lo + m, self._hot_hi
            slack = self.hot_slack if self._chunk_k.shape[-2] <= self.hot_slack else 0
            none = hk.new_empty(b, h, 0, d)
            self._hot_k = self._compact(self._hot_k[:, :, lo:hi], none, slack)
            self._hot_v = self._compact(self._hot_v[:, :, lo:hi], none, slack)
            self._hot_lo, self._hot_hi = 0, hi - lo
            self._hot_start += m
        except BaseException:
            self.rollback(token)
            raise

    def _attention_importance(
        self, query: torch.Tensor, scaling: float | None, softcap: float | None, m: int
    ) -> torch.Tensor:
        """SnapKV score of the oldest ``m`` hot tokens, ``[B, H, m]`` float32: their softmax
        weight under each of the last ``observation_window`` queries, summed over the window and
        the GQA group, then max-pooled over ``outlier_pooling`` neighbours.

        The softmax runs over the exact keys the layer holds (landmarks and the hot window, which
        holds the chunk), causally by cache index; cold blocks of earlier chunks are left out of
        the normaliser (reading them would mean decompressing), which rescales each query's row by
        one factor and keeps the within-row order. Padding masks are not applied. Keys are
        processed in slices so the largest temporary is ``B * Hq * w * 8192`` floats."""
        cfg = self.config
        b, h, d = self.batch_size, self.num_kv_heads, self.head_dim
        if query.ndim != 4 or query.shape[0] != b or query.shape[-1] != d or query.shape[1] % h:
            raise ValueError(
                f"layer {self.layer_idx}: observe_queries needs [batch={b}, heads (a multiple of {h}), "
                f"q, head_dim={d}] queries, got {tuple(query.shape)}"
            )
        g = query.shape[1] // h
        w = min(cfg.observation_window, query.shape[-2])
        scale = d**-0.5 if scaling is None else float(scaling)
        qw = query[:, :, -w:].float().reshape(b, h, g, w, d)
        q_pos = self._seq_len - w + torch.arange(w, device=query.device)  # cache index of each query
        (lk, _), (hk, _) = self._landmarks(), self._hot()
        tiers = [(0, lk), (self._hot_start, hk)]
        step = max(1, (1 << 24) // max(1, b * h * g * w))

        def logits(keys: torch.Tensor, first: int) -> torch.Tensor:  # [B, H, g, w, n]
            s = torch.einsum("bhgwd,bhnd->bhgwn", qw, keys.float()) * scale
            if softcap is not None:
                s = softcap * torch.tanh(s / softcap)
            k_pos = first + torch.arange(keys.shape[-2], device=query.device)
            return s.masked_fill(k_pos.view(1, -1) > q_pos.view(-1, 1), float("-inf"))

        lse = torch.full((b, h, g, w, 1), float("-inf"), device=query.device)
        for first, keys in tiers:
            for s0 in range(0, keys.shape[-2], step):
                part = logits(keys[:, :, s0 : s0 + step], first + s0).logsumexp(-1, keepdim=True)
                lse = torch.logaddexp(lse, part)
        score = torch.empty(b, h, m, device=query.device)
        for s0 in range(0, m, step):
            s1 = min(m, s0 + step)
            p = (logits(hk[:, :, s0:s1], self._hot_start + s0) - lse).exp()
            score[:, :, s0:s1] = p.sum(dim=(2, 3))
        k = cfg.outlier_pooling
        if k > 1:
            score = torch.nn.functional.max_pool1d(
                score.reshape(b * h, 1, m), k, stride=1, padding=k // 2
            ).reshape(b, h, m)
        return score

    # ------------------------------------------------------------------ state
    def state(self) -> SpectralLayerState:
        """The compressed state as the attention function reads it (see ``cache/state.py``):
        views into the layer's buffers, shapes exactly as documented there."""
        if not self.is_initialized:
            raise RuntimeError(f"layer {self.layer_idx}: state() before the first update")
        (lk, lv), (hk, hv) = self._landmarks(), self._hot()
        return SpectralLayerState(
            layer_idx=self.layer_idx,
            seq_len=self._seq_len,
            landmark_keys=lk,
            landmark_values=lv,
            cold=self._cold_view(),
            hot_keys=hk,
            hot_values=hv,
            hot_start=self._hot_start,
            chunk_keys=self._chunk_k,
            chunk_values=self._chunk_v,
            chunk_start=self._chunk_start if self._chunk_k is not None else self._seq_len,
            key_space=self.config.key_space,
            rope_inv_freq=self.rope_inv_freq,
        )

    def reconstruct(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference decode of every cached token, ``[B, H, seq_len, D]`` in cache-index order
        (landmarks, cold blocks with outliers exact, hot). For tests and debugging only."""
        if not self.is_initialized:
            raise RuntimeError(f"layer {self.layer_idx}: reconstruct() before the first update")
        (lk, lv), (hk, hv) = self._landmarks(), self._hot()
        ks, vs = [lk.to(dtype)], [lv.to(dtype)]
        cold = self._cold_view()
        if cold is not None:
            rk_, rv_ = reconstruct(cold, self._rotate_fn(cold.block_starts), dtype)
            b, h, nb, t, d = rk_.shape
            ks.append(rk_.reshape(b, h, nb * t, d))
            vs.append(rv_.reshape(b, h, nb * t, d))
        ks.append(hk.to(dtype))
        vs.append(hv.to(dtype))
        return torch.cat(ks, dim=-2), torch.cat(vs, dim=-2)

    # ------------------------------------------------------------------ memory
    def _tiers(
        self, cold: ColdBlocks | None, exact: dict[str, list[torch.Tensor]]
    ) -> dict[str, list[torch.Tensor]]:
        tiers: dict[str, list[torch.Tensor]] = {
            name: [] for name in (*_EXACT_TIERS[:1], *COLD_TIERS, *_EXACT_TIERS[1:])
        }
        if not self.is_initialized:
            return tiers
        tiers.update(exact)
        if cold is not None:
            for name, x in cold.tensors().items():
                if x is not None:  # an identity codec stores no basis, 16 bits no scales
                    tiers[_TIER_OF_FIELD[name]].append(x)
        return tiers

    def tier_tensors(self) -> dict[str, list[torch.Tensor]]:
        """Tensors held per tier, the whole buffers (capacity included): what is allocated."""
        chunk = [] if self._chunk_k is None else [self._chunk_k, self._chunk_v]
        exact = {"landmarks": [self._lm_k, self._lm_v], "hot": [self._hot_k, self._hot_v], "chunk": chunk}
        return self._tiers(self._cold, exact) if self.is_initialized else self._tiers(None, {})

    def tier_used_tensors(self) -> dict[str, list[torch.Tensor]]:
        """The live views per tier (what ``state()`` hands out): the data in use."""
        if not self.is_initialized:
            return self._tiers(None, {})
        chunk = [] if self._chunk_k is None else [self._chunk_k, self._chunk_v]
        exact = {"landmarks": list(self._landmarks()), "hot": list(self._hot()), "chunk": chunk}
        return self._tiers(self._cold_view(), exact)
