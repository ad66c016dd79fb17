"""``SpectralConfig``: every knob of the spectral KV cache, validated at construction.

A configuration is model-agnostic; the checks that need the model (rank <= head_dim, which
layers exist, whether they are full attention) run when a :class:`SpectralCache` is built
for a concrete model, via :meth:`SpectralConfig.check_for_model`.

Named presets live in :data:`PRESETS` (see :func:`get_preset`), so that benchmarks, the CLI
and tests can iterate over every preset by name.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from spectralcache.linalg.rsvd import ORTH_METHODS

__all__ = [
    "BASIS_DTYPES",
    "CODECS",
    "KEY_SPACES",
    "PRESETS",
    "SVD_METHODS",
    "SVD_ORTH",
    "SVD_SOLVERS",
    "SpectralConfig",
    "get_preset",
    "list_presets",
]

KEY_SPACES = ("post_rope", "pre_rope")
SVD_METHODS = ("randomized", "exact")
# Which randomized solver fits a block (``svd_method="randomized"``): see ``svd_solver`` below.
SVD_SOLVERS = ("auto", "subspace", "rsvd")
# Orthonormalisation inside the randomized SVD (``spectralcache.linalg.rsvd.randomized_svd``).
SVD_ORTH = ORTH_METHODS
BASIS_DTYPES = ("auto", "model", "float16", "bfloat16", "float32")
COMPUTE_DTYPES = ("float32", "float64")
COEFF_BITS = (4, 8, 16)
# How a block's keys / values are stored: "lowrank" = coefficients on a fitted basis;
# "identity" = the rows themselves, quantized per token (the basis is the identity, not stored);
# "channel" (keys only) = the rows themselves, quantized with one scale per channel and block.
CODECS = ("lowrank", "identity", "channel")
# Codecs that store the rows themselves (no basis, no rank: ``head_dim`` columns per token).
BASISLESS_CODECS = ("identity", "channel")
# Who reads a compressed layer in attention (see ``attention/triton/dispatch.py``).
ATTENTION_BACKENDS = ("auto", "triton", "torch")
OUTLIER_SELECTIONS = ("residual", "attention", "mixed")

_TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _is_int(value: object) -> bool:
    # bool is a subclass of int; ``block_size=True`` is a bug, not 1.
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(frozen=True)
class SpectralConfig:
    """Configuration of the spectral (low-rank) KV cache.

    Every field has a default chosen for long-context decoding on models with head_dim 64-256.

    Attributes:
        block_size: 512. Tokens per compressed block. Larger blocks amortise the basis
            (``rank * head_dim`` numbers per block) over more tokens; smaller blocks adapt the
            basis to local content. 512 keeps the basis at <= 1/4 of the block's bytes for
            head_dim 256 and rank 32/64 while a block still fits one GPU tile loop.
        rank_keys: 32. Rank of each block's key basis. Keys (especially pre-RoPE) are
            strongly low-rank; ``None`` means full rank (``head_dim``), for the lossless preset.
        rank_values: 64. Rank of the value basis; values are markedly less low-rank than
            keys, hence the asymmetric default. ``None`` means full rank.
        hot_size: 64. The most recent tokens are always kept exact: recent tokens receive most
            attention and are still changing the local context. A block is compressed once the
            hot buffer holds ``hot_size + block_size`` tokens, so between ``hot_size`` and
            ``hot_size + block_size - 1`` recent tokens are exact at any time.
        landmarks: 16. The first tokens ever cached are kept exact: attention sinks and the
            start of the system prompt draw attention out of proportion to their number.
        outliers_per_block: 32. Tokens of each block (per KV head) kept exact because the
            block's low-rank representation reconstructs them worst (a "needle" is such a
            token). 32 of 512 is 6 %, enough for needles while costing 1/16 of the block's
            exact bytes.
        key_codec: ``"lowrank"``. How each block's keys are stored. ``"lowrank"``: a rank
            ``rank_keys`` basis fitted per block plus per-token coefficients. ``"identity"``: no
            basis; the keys themselves are the coefficients (``[T, head_dim]``, quantized per
            token with ``coeff_bits``), so ``rank_keys`` is ignored and the only error is the
            quantization. On a block whose spectrum is flat (prose) the identity codec is far more
            accurate per byte than a high rank: with head_dim 256 and a float16 basis, rank 128
            costs as many bytes as the identity codec (int8) and keeps ~8 % error where int8
            rounding keeps ~0.5 %. See ``docs/fidelity.md``.
            ``"channel"`` (keys only, issue 9's KIVI-style lever): the keys themselves quantized with
            one scale per channel and block (``key_scales [..., nb, 1, head_dim]``) instead of per
            token: keys carry a few large channels that a per-token scale follows, so int4 per
            token loses the rest (niah_single_1 17 % at 4K); outlier tokens are left out of the
            scales. The Triton decode kernel reads it (post-RoPE: the scales fold into the query once
            per block; pre-RoPE: into the rebuilt key tile), as the torch reference does.
        key_zero_point: ``False`` (``True`` in the default preset since stop 18). With
            ``key_codec="channel"`` and 4- or 8-bit keys: each channel
            of a block also gets a float32 offset (``key_offsets [..., nb, 1, head_dim]``), so the
            levels cover the channel's range ``[min, max]`` instead of ``[-max|k|, max|k|]`` (KIVI's
            asymmetric keys). Post-RoPE keys have channels that barely turn over a block and sit
            far from zero; on Gemma 3 270M's keys it halves the score error of int4 keys at +4
            bytes (float32) per channel and block (``docs/fidelity.md``). Attention adds ``q·offset`` to the
            block's scores (one dot product per block).
        key_group_size: ``None``. With ``key_codec="channel"`` and 4- or 8-bit keys: one scale (and
            zero point) per channel for every group of about this many tokens of a block instead
            of one per block (``key_scales`` / ``key_offsets [..., nb, G, head_dim]``, ``G =
            ceil(T / key_group_size)`` groups of ``ceil(T / G)`` rows, ``cache/state.py``): finer
            channel ranges where a channel drifts over a block (issue 9's lever; 128-token blocks,
            which also cut the key ranges to 128 tokens, held niah_multikey_1 at the plain cache's
            level at 4K but spread the outliers too thinly at 8K). Costs ``G - 1`` more scale rows
            per block (6 bytes per channel each with zero points). **Read by the torch reference
            only**: the Triton decode kernel refuses such states (``"auto"`` then attends with the
            reference; ``GraphedDecoder`` refuses the cache), so no preset uses it yet.
        value_codec: ``"lowrank"``. The same choice for values (``rank_values`` ignored when
            ``"identity"``; ``"channel"`` is refused for values).
        coeff_bits: 8. Storage of the per-token coefficients: 8 = int8 with a float16 scale
            per row, 4 = two int4 values packed per uint8 with a float16 scale per row, 16 =
            no quantization (model dtype), used by the lossless preset.
        value_coeff_bits: ``None``. Storage of the value coefficients when it should differ from
            ``coeff_bits`` (same choices); ``None`` means ``coeff_bits``. Values tolerate coarser
            rounding than keys: a key error is exponentiated by the softmax, a value error is
            only averaged. On Gemma 3 270M multikey prompts int4 value rows kept the baseline's
            answers where int4 key rows lost them (``docs/fidelity.md``).
        key_space: ``"post_rope"``. ``"pre_rope"`` un-rotates keys with the exact inverse of
            the model's own RoPE before compression (pre-RoPE keys are lower rank); attention
            then re-rotates every reconstructed tile, which costs compute. ``"post_rope"``
            compresses keys as the model cached them and lets attention score in the latent
            space directly.
        svd_method: ``"randomized"``. ``"randomized"`` uses the project's randomized SVD (fast,
            a few passes over the block); ``"exact"`` uses a full truncated SVD (reference /
            lossless).
        svd_solver: ``"auto"``. Which randomized solver fits the blocks: ``"subspace"``
            (``spectralcache.linalg.subspace``: ``svd_subspace_iter`` subspace iterations on
            each block's ``D x D`` Gram with exactly ``rank`` columns, no small eigenproblem,
            no host synchronization; its basis is orthonormal but unordered, which nothing
            downstream needs), ``"rsvd"`` (``spectralcache.linalg.rsvd.randomized_svd`` with
            ``svd_orth`` / ``svd_n_iter`` / ``svd_oversample``: an oversampled sketch ordered
            by an ``l x l`` eigenproblem per block), or ``"auto"``: subspace on CUDA, where
            the rsvd's batched eigenproblems were the bulk of a layer's compression
            (``benchmarks/compress_layer.py``), rsvd elsewhere (CPU behaviour unchanged).
        svd_subspace_iter: 4. Subspace iterations of the ``"subspace"`` solver after its
            first product with the Gram (each costs a ``D x D x rank`` product per block, no
            pass over the block). On real Gemma 3 270M K/V blocks (4K prose, ranks 32/64) the
            error over the optimal rank-r error was 1.02 at 2, 1.008 at 4, 1.004 at 6
            (``benchmarks/subspace_error.py``; the rsvd's 1.002-1.010). A 128K-token layer of
            Llama-8B shape (default preset, bf16, H100) compressed in 17.3 / 19.0 / 19.6 ms at 2 /
            3 / 4 iterations (rsvd: 266 ms), value fit 1.027 / 1.016 / 1.010 x optimal
            (``benchmarks/results/compress_layer_cuda_h100.log``).
        svd_orth: ``"cholqr2"``. Orthonormalisation inside the randomized SVD (CholeskyQR2:
            a few GEMMs, orthogonal to working precision, with the rsvd module's fallback
            chain if a Cholesky breaks down).
        svd_n_iter: 2. Power iterations of the randomized SVD; 2 is the usual accuracy /
            cost sweet spot for spectra that decay moderately.
        svd_oversample: 8. Extra random directions sampled beyond the rank; improves the
            captured subspace at negligible cost.
        seed: 0. Seed of the randomized SVD's test matrices; compression is a deterministic
            function of the block contents for a given seed.
        refit_after_outliers: False. After choosing the outliers, fit the basis again on the
            block with the outlier rows zeroed, so no rank is spent on tokens that are kept
            exact anyway. It costs a second SVD per block (compression ~2x slower) and on real
            Gemma 3 270M K/V it lowered the reconstruction error by only 1-8 % with mixed effect
            on attention output (see the cache report), so it is off by default.
        compress_layers: ``None``. ``None`` compresses every full-attention layer of the model
            (``config.layer_types``); sliding-window layers always keep transformers'
            ``DynamicSlidingWindowLayer`` (they are already bounded). An explicit tuple of layer
            indices compresses only those layers (each must be a full-attention layer); the
            other full-attention layers keep a plain ``DynamicLayer``.
        basis_dtype: ``"auto"``. Storage dtype of the block bases. ``"auto"``: the model dtype
            for float16 / bfloat16 models; for float32 models float16 when coefficients are
            quantized (int8 rounding, ~1/254 of a row's max, dwarfs float16 rounding of a
            unit-norm basis row, ~1/2048, and it halves the basis bytes) and float32 when
            ``coeff_bits == 16`` (so that full rank stays lossless). ``"model"`` always uses the
            model dtype.
        compute_dtype: ``"float32"``. Dtype of the SVD and quantization arithmetic.
        attention_backend: ``"auto"``. Which implementation attends over the compressed layers:
            ``"auto"`` uses the fused Triton decode kernel for decode steps on CUDA when Triton is
            installed and the torch reference otherwise (CPU, prefill); ``"triton"`` requires the
            kernel for every decode step (prefill still uses the reference); ``"torch"`` always
            uses the reference. The environment variable ``SPECTRALCACHE_ATTENTION_BACKEND`` (same
            values), when set, overrides this field. It changes no stored byte, only who reads them.
        compress_tail: False. "No wasted exact tail". When off, a prompt leaves between
            ``hot_size`` and ``hot_size + block_size - 1`` recent tokens exact (whatever does not fill
            a whole block). When on, the layer's *first* compression in a prefill chunk (more than
            one token) picks the layer's block length ``T'`` in ``[T_min, block_size]`` (``T_min =
            max(ceil(block_size / 2), ranks, outliers_per_block + 1)``) so that whole blocks end
            within a few tokens of ``seq_len - hot_size``: ``k = ceil(n / block_size)`` blocks of
            ``T' = n // k`` tokens for the ``n`` tokens past the landmarks and ``hot_size``, which
            leaves ``hot_size + (n mod k)`` tokens exact (fewer than ``hot_size + k``), unless whole
            ``block_size`` blocks leave no more, or at most ``n / 64`` (a long prompt: whole blocks
            decode faster, ``cache.layer.TAIL_PLAIN_FRACTION``; then ``T`` is kept). Every later
            block of that layer (decode, later chunks) has ``T'`` tokens, until the cold tier is
            emptied (crop, reset). The attention state keeps its contract unchanged
            (``ColdBlocks.block_size`` is ``T'``, blocks stay contiguous, ``[nb, T']`` shapes), so
            every reader handles it. Limitation: only the first prefill chunk of a layer is
            re-blocked; a later chunk still leaves its partial block exact. Off by default until
            measured (``docs/fidelity.md``).
        outlier_selection: ``"residual"``. How each block's ``outliers_per_block`` exact tokens
            are chosen. ``"residual"``: the tokens the stored representation reconstructs worst
            (``cache/block.py``). ``"attention"`` (SnapKV-style): the tokens that receive the most
            attention from the last ``observation_window`` queries of the prefill forward that
            compressed the block (softmax of ``q · kᵀ · scaling`` over the exact keys the layer
            holds, post-RoPE, causal; summed over the window and the GQA group; max-pooled over
            ``outlier_pooling`` neighbouring tokens). ``"mixed"``: the sum of both scores'
            within-block ranks (each normalised to [0, 1]). With either of the last two, a
            multi-token update defers compressing its due blocks until its attention has run (the
            blocks stay exact in the hot tier meanwhile), so the queries are known; blocks due at a
            decode step (one token) still use the residual. Off by default until measured
            (``docs/fidelity.md``).
        observation_window: 32. Queries (the last ones of the forward's chunk) whose attention
            ranks the tokens for ``outlier_selection`` ``"attention"`` / ``"mixed"``.
        outlier_pooling: 7. Width (odd) of the max-pooling of the attention score over
            neighbouring tokens (SnapKV keeps the neighbourhood of an attended token); 1 = none.
        outlier_spans: 1. Each block is cut into this many spans of (nearly) equal length and
            every span keeps ``outliers_per_block / outlier_spans`` of its highest-scoring tokens
            exact, instead of the block's top ``outliers_per_block`` wherever they fall (must
            divide ``outliers_per_block``). Why: 128-token blocks with 2 outliers each answered
            niah_multikey_1 samples that 512-token blocks with 8 free outliers lose, and per-channel
            key groups did not, so the allocation of exact tokens over a block's span is a lever of
            its own (``docs/fidelity.md``, "Stop 19"). Same bytes and layout as 1 (the decode kernel
            reads it); rows too large to quantize are always kept exact, whichever span they are in.
        outliers_per_span: ``None``. With ``outlier_spans``: the exact tokens each span keeps at
            least; the other ``outliers_per_block - outlier_spans * outliers_per_span`` are the
            block's highest-scoring remaining tokens wherever they fall. ``None``: all of them
            spread (``outliers_per_block / outlier_spans`` per span).
    """

    block_size: int = 512
    rank_keys: int | None = 32
    rank_values: int | None = 64
    hot_size: int = 64
    landmarks: int = 16
    outliers_per_block: int = 32
    key_codec: str = "lowrank"
    value_codec: str = "lowrank"
    coeff_bits: int = 8
    key_zero_point: bool = False
    key_group_size: int | None = None
    value_coeff_bits: int | None = None
    key_space: str = "post_rope"
    svd_method: str = "randomized"
    svd_orth: str = "cholqr2"
    svd_n_iter: int = 2
    svd_oversample: int = 8
    svd_solver: str = "auto"
    svd_subspace_iter: int = 4
    seed: int = 0
    refit_after_outliers: bool = False
    compress_layers: tuple[int, ...] | None = None
    basis_dtype: str = "auto"
    compute_dtype: str = "float32"
    attention_backend: str = "auto"
    compress_tail: bool = False
    outlier_selection: str = "residual"
    observation_window: int = 32
    outlier_pooling: int = 7
    outlier_spans: int = 1
    outliers_per_span: int | None = None
    name: str = field(default="custom", compare=False)

    def __post_init__(self) -> None:
        def need_int(name: str, minimum: int) -> int:
            value = getattr(self, name)
            if not _is_int(value):
                raise TypeError(f"SpectralConfig.{name} must be an int, got {type(value).__name__} {value!r}")
            if value < minimum:
                raise ValueError(f"SpectralConfig.{name} must be >= {minimum}, got {value}")
            return value

        block_size = need_int("block_size", 2)
        need_int("hot_size", 0)
        need_int("landmarks", 0)
        outliers = need_int("outliers_per_block", 0)
        need_int("svd_n_iter", 0)
        need_int("svd_oversample", 0)
        need_int("svd_subspace_iter", 0)
        need_int("seed", 0)
        for name, codec in (("rank_keys", self.key_codec), ("rank_values", self.value_codec)):
            value = getattr(self, name)
            if value is None:
                continue
            need_int(name, 1)
            if value > block_size and codec not in BASISLESS_CODECS:  # a basis-less codec has no rank
                raise ValueError(
                    f"SpectralConfig.{name}={value} exceeds block_size={block_size}: a block of "
                    f"{block_size} tokens has rank at most {block_size}"
                )
        if outliers >= block_size:
            raise ValueError(
                f"SpectralConfig.outliers_per_block={outliers} must be < block_size={block_size} "
                "(at least one token of each block must be low-rank)"
            )
        if not _is_int(self.coeff_bits) or self.coeff_bits not in COEFF_BITS:
            raise ValueError(
                f"SpectralConfig.coeff_bits must be one of {COEFF_BITS}, got {self.coeff_bits!r}"
            )
        vb = self.value_coeff_bits
        if vb is not None and (not _is_int(vb) or vb not in COEFF_BITS):
            raise ValueError(
                f"SpectralConfig.value_coeff_bits must be None or one of {COEFF_BITS}, got {vb!r}"
            )
        for name, allowed in (
            ("key_codec", CODECS),
            ("value_codec", CODECS),
            ("key_space", KEY_SPACES),
            ("svd_method", SVD_METHODS),
            ("svd_orth", SVD_ORTH),
            ("svd_solver", SVD_SOLVERS),
            ("basis_dtype", BASIS_DTYPES),
            ("compute_dtype", COMPUTE_DTYPES),
            ("attention_backend", ATTENTION_BACKENDS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"SpectralConfig.{name} must be one of {allowed}, got {value!r}")
        if self.value_codec == "channel":
            raise ValueError(
                "SpectralConfig.value_codec='channel' is not supported: per-channel scales are for keys "
                "(attention weights mix value rows, so values keep per-token scales: 'identity' or 'lowrank')"
            )
        if not isinstance(self.key_zero_point, bool):
            raise TypeError(f"SpectralConfig.key_zero_point must be a bool, got {self.key_zero_point!r}")
        if self.key_zero_point and (self.key_codec != "channel" or self.coeff_bits == 16):
            raise ValueError(
                "SpectralConfig.key_zero_point=True needs key_codec='channel' with coeff_bits 4 or 8 "
                f"(got key_codec={self.key_codec!r}, coeff_bits={self.coeff_bits}): zero points are "
                "per-channel offsets of quantized keys"
            )
        if self.key_group_size is not None:
            need_int("key_group_size", 2)
            if self.key_codec != "channel" or self.coeff_bits == 16:
                raise ValueError(
                    "SpectralConfig.key_group_size needs key_codec='channel' with coeff_bits 4 or 8 "
                    f"(got key_codec={self.key_codec!r}, coeff_bits={self.coeff_bits}): groups are "
                    "token ranges of per-channel key scales"
                )
        if not isinstance(self.refit_after_outliers, bool):
            raise TypeError(
                f"SpectralConfig.refit_after_outliers must be a bool, got {self.refit_after_outliers!r}"
            )
        if self.compress_layers is not None:
            layers = self.compress_layers
            if isinstance(layers, (str, bytes)) or not hasattr(layers, "__iter__"):
                raise TypeError(
                    f"SpectralConfig.compress_layers must be None or a sequence of layer indices, got {layers!r}"
                )
            layers = tuple(layers)
            for idx in layers:
                if not _is_int(idx) or idx < 0:
                    raise ValueError(
                        f"SpectralConfig.compress_layers entries must be non-negative ints, got {idx!r}"
                    )
            if len(set(layers)) != len(layers):
                raise ValueError(f"SpectralConfig.compress_layers has duplicates: {layers}")
            if not layers:
                raise ValueError(
                    "SpectralConfig.compress_layers is empty; use None for 'every full-attention layer'"
                )
            object.__setattr__(self, "compress_layers", tuple(sorted(layers)))
        if not isinstance(self.compress_tail, bool):
            raise TypeError(f"SpectralConfig.compress_tail must be a bool, got {self.compress_tail!r}")
        if self.outlier_selection not in OUTLIER_SELECTIONS:
            raise ValueError(
                f"SpectralConfig.outlier_selection must be one of {OUTLIER_SELECTIONS}, "
                f"got {self.outlier_selection!r}"
            )
        need_int("observation_window", 1)
        spans = need_int("outlier_spans", 1)
        if self.outliers_per_span is None:
            if spans > 1 and outliers % spans:
                raise ValueError(
                    f"SpectralConfig.outlier_spans={spans} must divide outliers_per_block={outliers} "
                    "(each span of a block keeps the same number of exact tokens), or set "
                    "outliers_per_span"
                )
        elif need_int("outliers_per_span", 0) * spans > outliers:
            raise ValueError(
                f"SpectralConfig.outliers_per_span={self.outliers_per_span} x outlier_spans={spans} "
                f"exceeds outliers_per_block={outliers}"
            )
        if need_int("outlier_pooling", 1) % 2 == 0:
            raise ValueError(
                f"SpectralConfig.outlier_pooling must be odd (a window centred on each token), "
                f"got {self.outlier_pooling}"
            )
        if not isinstance(self.name, str):
            raise TypeError(f"SpectralConfig.name must be a str, got {self.name!r}")

    @property
    def value_bits(self) -> int:
        """Resolved storage width of the value coefficients."""
        return self.coeff_bits if self.value_coeff_bits is None else self.value_coeff_bits

    # ------------------------------------------------------------------ model-dependent
    def ranks_for(self, head_dim: int) -> tuple[int, int]:
        """Resolved (rank_keys, rank_values) for a model's head_dim: the number of stored
        coefficient columns per token. ``None`` means full rank; an identity codec stores
        ``head_dim`` columns (the rows themselves) whatever the configured rank."""
        if self.key_codec in BASISLESS_CODECS:
            rk = head_dim
        else:
            rk = min(head_dim if self.rank_keys is None else self.rank_keys, self.block_size)
        if self.value_codec == "identity":
            rv = head_dim
        else:
            rv = min(head_dim if self.rank_values is None else self.rank_values, self.block_size)
        return rk, rv

    def check_ranks(self, head_dim: int) -> None:
        """Ranks must not exceed the model's head_dim (a block's keys have rank <= head_dim)."""
        for name, codec in (("rank_keys", self.key_codec), ("rank_values", self.value_codec)):
            value = getattr(self, name)
            if codec in BASISLESS_CODECS:
                continue
            if value is not None and value > head_dim:
                raise ValueError(
                    f"SpectralConfig.{name}={value} exceeds the model's head_dim={head_dim}; "
                    "use at most head_dim (or None for full rank)"
                )

    def check_for_model(self, head_dim: int, num_layers: int) -> None:
        """Checks that need the model: ranks vs head_dim, layer indices vs the layer count."""
        self.check_ranks(head_dim)
        if self.compress_layers is not None:
            bad = [i for i in self.compress_layers if i >= num_layers]
            if bad:
                raise ValueError(
                    f"SpectralConfig.compress_layers has indices {bad} but the model has {num_layers} layers"
                )

    def basis_torch_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """Storage dtype of the bases for a model whose K/V have ``model_dtype``."""
        if self.basis_dtype == "model":
            return model_dtype
        if self.basis_dtype == "auto":
            if model_dtype in (torch.float16, torch.bfloat16):
                return model_dtype
            return model_dtype if self.coeff_bits == 16 and self.value_bits == 16 else torch.float16
        return _TORCH_DTYPES[self.basis_dtype]

    @property
    def outliers_each_span(self) -> int:
        """Exact tokens each of the ``outlier_spans`` spans of a block keeps at least:
        ``outliers_per_span``, or all outliers spread evenly when it is None."""
        if self.outliers_per_span is None:
            return self.outliers_per_block // self.outlier_spans
        return self.outliers_per_span

    def compute_torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.compute_dtype == "float64" else torch.float32

    def replace(self, **changes: object) -> SpectralConfig:
        """A validated copy with some fields changed (name becomes "custom" unless given).

        Warns when a rank is set for a side whose codec has none (``"identity"`` / ``"channel"``
        store the rows themselves): since stop 17 the default preset is such a codec on both sides,
        so ``from_preset("default", rank_keys=16)`` would otherwise be silently the default.
        Changing ``key_codec`` away from ``"channel"`` (or ``coeff_bits`` to 16) without naming
        ``key_zero_point`` (``key_group_size``) turns the zero points (groups) off, since only
        quantized channel keys have them. Changing ``outliers_per_block`` below what
        ``outlier_spans`` spreads, without naming the span fields, lowers ``outliers_per_span`` to
        what fits (0: no floor, every outlier chosen freely)."""
        changes.setdefault("name", "custom")
        codec = changes.get("key_codec", self.key_codec)
        off_channel = codec != "channel" or changes.get("coeff_bits", self.coeff_bits) == 16
        # zero points and groups belong to quantized channel keys: moving off them (the default
        # preset -> low-rank or 16-bit keys) drops them instead of failing validation
        if off_channel and self.key_zero_point and "key_zero_point" not in changes:
            changes["key_zero_point"] = False
        if off_channel and self.key_group_size is not None and "key_group_size" not in changes:
            changes["key_group_size"] = None
        spans = changes.get("outlier_spans", self.outlier_spans)
        named = "outlier_spans" in changes or "outliers_per_span" in changes
        o = changes.get("outliers_per_block", self.outliers_per_block)
        if not named and spans > 1 and _is_int(o):
            per = o // spans if self.outliers_per_span is None else self.outliers_per_span
            if per * spans > o or (self.outliers_per_span is None and o % spans):
                # fewer outliers than the spread needs: keep the floor that fits, the rest free
                changes["outliers_per_span"] = min(per, o // spans)
        cfg = dataclasses.replace(self, **changes)
        for rank, side, codec in (
            ("rank_keys", "key", cfg.key_codec),
            ("rank_values", "value", cfg.value_codec),
        ):
            if rank in changes and codec in BASISLESS_CODECS:
                warnings.warn(
                    f"SpectralConfig.{rank}={changes[rank]!r} is ignored: the {side} codec is {codec!r}, "
                    f"which stores rows, not a rank-r basis (set {side}_codec='lowrank', or use the "
                    f"'lowrank' preset, for a low-rank {side} codec)",
                    UserWarning,
                    stacklevel=2,
                )
        return cfg

    @classmethod
    def from_preset(cls, name: str, **overrides: object) -> SpectralConfig:
        """The named preset, optionally with some fields overridden."""
        cfg = get_preset(name)
        return cfg.replace(**overrides) if overrides else cfg


# ---------------------------------------------------------------------- presets
PRESETS: dict[str, Callable[[], SpectralConfig]] = {
    # Since stop 17: keys quantized per channel (int4, KIVI-style), values per token (int4), 8 exact
    # outliers per block and the prefill's partial tail compressed. Against the low-rank preset that
    # was the default before ("lowrank" below) it holds more on every axis measured but decode speed
    # (README, "Stop 17: the default preset", which names each run): Gemma 3 270M at 4K, niah_single_1 87 %
    # vs 85 %, niah_multikey_1 63 % vs 10 % (plain cache 87 % / 80 %), 6.0x vs 3.8x fewer bytes on
    # the compressed layers; perplexity dNLL +0.008 vs +0.117; 3.5x vs 2.8x fewer bytes at the
    # Llama-8B shape (bf16); no SVD to compute (cheaper prefill). The decode kernel reads it at 1.5x
    # SDPA's speed at 128K on an H100 (the low-rank layout: 2.1x); on an H200 the dev script's
    # synthetic 512-token blocks gave 1.61x (stop 19), 1.74x (stop 20), 2.08x (stop 21), but the
    # cache's own state -- compress_tail makes 511-token blocks at 128K -- ran at 1.1x until stop 22
    # aligned its value rows: 1.78x at batch 1, 1.97x at batch 8 (`spectralcache bench attention`,
    # graph replays, L2 cleared; benchmarks/results/lead_stop22/), 1.94x / 2.08x since stop 23 keeps
    # whole 512-token blocks for long prompts (1.08x at 4K batch 1; benchmarks/results/lead_stop23/), and
    # 2.02x / 2.05x (1.24x at 4K) since stop 24 flags the outlier rows in the value scales, splits the
    # combine kernel's rows and launches it as a programmatic dependent (benchmarks/results/lead_stop24/).
    # Since stop 18 with per-channel zero points on the keys (key_zero_point): on the same 30 + 30
    # samples at 4K perplexity dNLL +0.0001 instead of +0.008 and more retrieval answers kept
    # (docs/fidelity.md, "Stop 18: key zero points"), for 4 bytes per key channel and block.
    "default": lambda: SpectralConfig(
        key_codec="channel",
        value_codec="identity",
        coeff_bits=4,
        outliers_per_block=8,
        compress_tail=True,
        key_zero_point=True,
        name="default",
    ),
    # Low-rank keys and values (the default until stop 16): int8 coefficients, rank 32/64 of
    # 512-token blocks, 32 exact outliers per block. The faster decode kernel (2.1x SDPA at 128K), but
    # more bytes than "default" at head_dim 128 (2.8x vs 3.5x fewer than bf16), and low-rank keys lose
    # multi-key retrieval and perplexity (docs/fidelity.md, "the identity-values discrepancy").
    "lowrank": lambda: SpectralConfig(name="lowrank"),
    # Low-rank with int4 coefficients, lower ranks, fewer outliers: 7.3x fewer bytes at the Llama-8B
    # shape, answers degrade (README, eval tables).
    "aggressive": lambda: SpectralConfig(
        rank_keys=16, rank_values=32, outliers_per_block=16, coeff_bits=4, name="aggressive"
    ),
    # Largest reduction (issue 9's "max"): int4, ranks 8/16, 4 outliers, the prefill's partial tail
    # compressed: >= 12x fewer bytes on the compressed layers at the Llama-8B shape (bf16), 21-30x at
    # Gemma 3 270M's (float32); answers degrade (docs/fidelity.md, "max preset").
    "max": lambda: SpectralConfig(
        rank_keys=8, rank_values=16, outliers_per_block=4, coeff_bits=4, compress_tail=True, name="max"
    ),
    # Pre-RoPE keys: the "lowrank" budget with keys compressed before rotation.
    "pre_rope": lambda: SpectralConfig(key_space="pre_rope", name="pre_rope"),
    # Full rank, no quantization, exact SVD: the cache must reproduce DynamicCache outputs.
    "lossless": lambda: SpectralConfig(
        rank_keys=None,
        rank_values=None,
        outliers_per_block=0,
        coeff_bits=16,
        svd_method="exact",
        refit_after_outliers=False,
        basis_dtype="model",
        name="lossless",
    ),
}


def list_presets() -> list[str]:
    return sorted(PRESETS)


def get_preset(name: str) -> SpectralConfig:
    """The preset registered under ``name`` (a fresh, validated instance)."""
    try:
        factory = PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown SpectralConfig preset {name!r}; known presets: {list_presets()}") from None
    return factory()
