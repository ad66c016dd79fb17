import dataclasses

import pytest
import torch

from spectralcache.config import PRESETS, SpectralConfig, get_preset, list_presets


def test_defaults_are_valid_and_documented():
    cfg = SpectralConfig()
    assert (cfg.block_size, cfg.rank_keys, cfg.rank_values) == (512, 32, 64)
    assert (cfg.hot_size, cfg.coeff_bits, cfg.key_space) == (64, 8, "post_rope")
    doc = SpectralConfig.__doc__
    for f in dataclasses.fields(SpectralConfig):
        if f.name != "name":
            assert f"{f.name}:" in doc, f"field {f.name} is not documented"


@pytest.mark.parametrize("name", list_presets())
def test_every_preset_is_valid(name):
    cfg = get_preset(name)
    assert isinstance(cfg, SpectralConfig)
    assert cfg.name == name
    # a fresh instance each time, equal by value
    assert get_preset(name) == cfg
    # revalidating a copy must not raise
    assert cfg.replace(seed=1).seed == 1


def test_registry_names_the_presets():
    assert {"default", "aggressive", "lossless", "pre_rope"} <= set(PRESETS)
    lossless = get_preset("lossless")
    assert lossless.rank_keys is None and lossless.coeff_bits == 16 and lossless.outliers_per_block == 0
    assert SpectralConfig.from_preset("aggressive", hot_size=8).hot_size == 8


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown SpectralConfig preset 'nope'.*default"):
        get_preset("nope")


@pytest.mark.parametrize(
    ("field", "value", "exc"),
    [
        ("block_size", 0, ValueError),
        ("block_size", 1.5, TypeError),
        ("block_size", True, TypeError),
        ("rank_keys", 0, ValueError),
        ("rank_values", -3, ValueError),
        ("rank_keys", 1024, ValueError),  # > block_size
        ("hot_size", -1, ValueError),
        ("landmarks", -1, ValueError),
        ("outliers_per_block", 512, ValueError),  # == block_size
        ("outliers_per_block", -1, ValueError),
        ("coeff_bits", 2, ValueError),
        ("coeff_bits", 8.0, ValueError),
        ("key_space", "rope", ValueError),
        ("svd_method", "lanczos", ValueError),
        ("svd_orth", "gram_schmidt", ValueError),
        ("svd_n_iter", -1, ValueError),
        ("svd_oversample", -2, ValueError),
        ("seed", -1, ValueError),
        ("refit_after_outliers", 1, TypeError),
        ("basis_dtype", "float8", ValueError),
        ("compute_dtype", "float16", ValueError),
        ("key_codec", "svd", ValueError),
        ("value_coeff_bits", 2, ValueError),
        ("value_coeff_bits", 8.0, ValueError),
        ("value_codec", None, ValueError),
        ("compress_layers", (1, 1), ValueError),
        ("compress_layers", (-1,), ValueError),
        ("compress_layers", (), ValueError),
        ("compress_layers", "0,1", TypeError),
    ],
)
def test_invalid_values_name_the_field(field, value, exc):
    with pytest.raises(exc, match=field):
        SpectralConfig(**{field: value})


def test_rank_above_block_size_message():
    with pytest.raises(ValueError, match="rank_values=64 exceeds block_size=32"):
        SpectralConfig(block_size=32, rank_keys=8)


def test_compress_layers_normalised():
    assert SpectralConfig(compress_layers=[3, 1]).compress_layers == (1, 3)


def test_model_dependent_checks():
    cfg = SpectralConfig(rank_keys=32, rank_values=64)
    with pytest.raises(ValueError, match=r"rank_values=64 exceeds the model's head_dim=32"):
        cfg.check_for_model(head_dim=32, num_layers=4)
    with pytest.raises(ValueError, match="compress_layers has indices"):
        SpectralConfig(compress_layers=(5,)).check_for_model(head_dim=256, num_layers=4)
    assert get_preset("lossless").ranks_for(64) == (64, 64)
    # full rank is capped by the block size (a block's rank is <= T)
    assert get_preset("lossless").replace(block_size=16).ranks_for(64) == (16, 16)


def test_identity_codec_stores_head_dim_columns():
    """An identity codec has no rank: it stores the rows (head_dim columns), even past the
    block size, and a configured rank on that side is neither used nor checked."""
    cfg = SpectralConfig(key_codec="identity", rank_keys=32, rank_values=64)
    assert cfg.ranks_for(256) == (256, 64)
    assert cfg.replace(value_codec="identity").ranks_for(48) == (48, 48)
    small = SpectralConfig(
        block_size=16, rank_keys=8, rank_values=8, outliers_per_block=2, key_codec="identity"
    )
    assert small.ranks_for(64) == (64, 8)
    cfg.replace(rank_values=16, key_codec="identity").check_for_model(head_dim=16, num_layers=4)
    with pytest.raises(ValueError, match="rank_values=64 exceeds the model's head_dim=32"):
        SpectralConfig(key_codec="identity").check_for_model(head_dim=32, num_layers=4)


def test_value_bits_resolution():
    assert SpectralConfig().value_bits == 8
    assert SpectralConfig(value_coeff_bits=4).value_bits == 4
    assert SpectralConfig(coeff_bits=4).value_bits == 4
    # lossless keeps the model dtype only when neither side is quantized
    assert SpectralConfig(coeff_bits=16, value_coeff_bits=8).basis_torch_dtype(torch.float32) == torch.float16


def test_basis_dtype_resolution():
    cfg = SpectralConfig()
    assert cfg.basis_torch_dtype(torch.bfloat16) == torch.bfloat16
    assert cfg.basis_torch_dtype(torch.float16) == torch.float16
    # quantized coefficients dominate the error: fp32 models store the basis in fp16
    assert cfg.basis_torch_dtype(torch.float32) == torch.float16
    # unquantized (lossless) keeps the model dtype
    assert cfg.replace(coeff_bits=16).basis_torch_dtype(torch.float32) == torch.float32
    assert cfg.replace(basis_dtype="model").basis_torch_dtype(torch.float32) == torch.float32
    assert cfg.replace(basis_dtype="bfloat16").basis_torch_dtype(torch.float32) == torch.bfloat16


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        SpectralConfig().block_size = 4


def test_rank_for_a_rankless_codec_warns() -> None:
    """Since stop 17 the default preset stores rows on both sides: a rank override there is a no-op,
    said out loud; on a low-rank side it is taken without a word."""
    import warnings

    with pytest.warns(UserWarning, match="rank_keys=16 is ignored: the key codec is 'channel'"):
        cfg = SpectralConfig.from_preset("default", rank_keys=16)
    assert cfg.key_codec == "channel"
    with pytest.warns(UserWarning, match="rank_values=8 is ignored: the value codec is 'identity'"):
        SpectralConfig.from_preset("lowrank").replace(value_codec="identity", rank_values=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert SpectralConfig.from_preset("lowrank", rank_keys=16).rank_keys == 16
        assert SpectralConfig.from_preset("default", key_codec="lowrank", rank_keys=16).rank_keys == 16
        SpectralConfig.from_preset("default", block_size=256)
