"""The features cache format: float16 as stored, float8 scaled per position and tapped layer."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from specflash.data.feature_cache import (cache_dtype, convert_feature_cache, dequantize_float8, quantize_float8,
                                          read_row_features, write_feature_cache)


def _features(seq: int = 12, taps: int = 3, hidden: int = 16, seed: int = 0) -> torch.Tensor:
    """[seq, taps*hidden] features whose layers differ in magnitude (by 5x10^4 here; about 10x
    in SmolLM2), with one huge attention-sink position, as a real target's do."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(seq, taps, hidden, generator=g) * torch.tensor([0.001, 1.0, 50.0])[:taps, None]
    x[0] *= 200.0
    return x.reshape(seq, taps * hidden).to(torch.float16)


def test_float8_round_trip_keeps_every_value_within_float8_precision():
    x = _features()
    values, scale = quantize_float8(x, 3)
    assert values.dtype == torch.float8_e4m3fn and scale.shape == (12, 3)
    back = dequantize_float8(values, scale).reshape(12, 3, 16)
    exact = x.float().reshape(12, 3, 16)
    # e4m3: 3 mantissa bits (relative step 2^-3, half of it by rounding), subnormals below 2^-6 of the scale
    bound = torch.maximum(exact.abs() * 2.0 ** -4, scale[..., None] * 2.0 ** -10)
    assert torch.all((back - exact).abs() <= bound * 1.0001)


def test_float8_scales_each_tapped_layer_apart():
    """One scale per position over all layers would push the smallest layer into float8's
    subnormals; per layer, its relative error stays that of float8."""
    x = _features()
    small = x.float().reshape(12, 3, 16)[1:, 0]  # the smallest layer, after the sink position
    per_layer = dequantize_float8(*quantize_float8(x, 3)).reshape(12, 3, 16)[1:, 0]
    one_scale = dequantize_float8(*quantize_float8(x, 1)).reshape(12, 3, 16)[1:, 0]
    rel = lambda y: ((y - small).norm() / small.norm()).item()  # noqa: E731
    assert rel(per_layer) < 0.05 < rel(one_scale)


def test_an_all_zero_group_reads_back_as_zeros():
    x = torch.zeros(4, 8, dtype=torch.float16)
    x[:, 4:] = 3.0
    values, scale = quantize_float8(x, 2)
    assert torch.equal(dequantize_float8(values, scale), x.float())


def test_float8_refuses_a_width_the_taps_do_not_divide():
    with pytest.raises(ValueError, match="equal groups"):
        quantize_float8(torch.ones(2, 10), 3)


def _write(path, dtype):
    rows = [_features(seq=5 + i, seed=i) for i in range(3)]
    topk = [(torch.arange(8).reshape(4, 2), torch.linspace(-1, 1, 8).reshape(4, 2)), None,
            (torch.ones(2, 2), torch.zeros(2, 2))]
    write_feature_cache(path, rows, topk, dtype, groups=3)
    return rows, topk


def test_a_float8_cache_reads_back_its_rows_and_keeps_topk_exact(tmp_path):
    path = tmp_path / "shard-00000.features.safetensors"
    rows, topk = _write(path, "float8")
    with safe_open(str(path), "pt") as handle:
        assert cache_dtype(handle) == "float8"
        for i, row in enumerate(rows):
            got = read_row_features(handle, i)
            assert got.dtype == torch.float32 and got.shape == row.shape
            assert ((got - row.float()).norm() / row.float().norm()) < 0.05
        assert torch.equal(handle.get_tensor("topk_ids.0"), topk[0][0].to(torch.int32))
        assert "topk_ids.1" not in handle.keys()
    assert not path.with_suffix(".tmp").exists()


def test_a_float16_cache_reads_back_exactly(tmp_path):
    path = tmp_path / "shard-00000.features.safetensors"
    rows, _ = _write(path, "float16")
    with safe_open(str(path), "pt") as handle:
        assert cache_dtype(handle) == "float16"
        assert all(torch.equal(read_row_features(handle, i), row) for i, row in enumerate(rows))


def test_converting_a_float16_cache_to_float8_reads_as_if_written_so_and_is_about_half(tmp_path):
    converted = tmp_path / "a.features.safetensors"
    direct = tmp_path / "b.features.safetensors"
    rows, _ = _write(converted, "float16")
    _write(direct, "float8")
    before = _feature_bytes(converted)
    assert convert_feature_cache(converted, "float8", groups=3)
    assert not convert_feature_cache(converted, "float8", groups=3)  # already float8: untouched
    assert _feature_bytes(converted) <= 0.5 * before + 4 * 3 * sum(len(r) for r in rows)  # + float32 scales
    with safe_open(str(converted), "pt") as a, safe_open(str(direct), "pt") as b:
        assert set(a.keys()) == set(b.keys())
        assert all(torch.equal(a.get_tensor(k).float(), b.get_tensor(k).float()) for k in a.keys())


def _feature_bytes(path) -> int:
    with safe_open(str(path), "pt") as handle:
        return sum(handle.get_tensor(k).nbytes for k in handle.keys() if not k.startswith("topk_"))


def test_a_float8_cache_is_not_widened_back(tmp_path):
    path = tmp_path / "a.features.safetensors"
    _write(path, "float8")
    with pytest.raises(ValueError, match="would not restore"):
        convert_feature_cache(path, "float16", groups=3)
