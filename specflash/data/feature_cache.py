"""The features cache beside a corpus shard: its file format, in float16 or float8.

`shard-NNNNN.features.safetensors` holds, for row i of the shard,
    "i"             [len(input_ids) - 1, K*H] the target's tapped features (K layers of H)
    "scale.i"       [len(input_ids) - 1, K] float32, only in a float8 cache (see below)
    "topk_ids.i"    [len(response), k] int32, the target's k largest logits where it wrote
    "topk_logits.i" [len(response), k] float16  each response token (optional)
and says in its safetensors metadata how the features are stored ({"features": "float16"}
or {"features": "float8", "groups": "K"}; a file without metadata is float16).

float16 keeps a bfloat16 target's features exactly, at 2 bytes a value: 5.8 KB a token for
SmolLM2-135M tapped at 5 layers, 57 GB per 10M tokens of prompts and answers. float8
(`float8_e4m3fn`, scaled per token and tapped layer so that the layer's largest magnitude
at that token maps to float8's largest, 448) halves that, at a relative error of about 1-2%
per value: per layer and token, because the tapped layers' magnitudes differ by more than
ten times and the first position (an attention sink) by a thousand. float8 is the default:
a drafter trained on it reached float16's held-out acceptance (docs/training.md, the A/B).
A cache is written whole, by rename, so a killed writer leaves the old file or the new one,
never half.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where used: the CLI reads this module's names at start-up
    import torch

CACHE_DTYPES = ("float16", "float8")
DEFAULT_CACHE_DTYPE = "float8"
FLOAT8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max


def quantize_float8(features: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[S, K*H] features -> ([S, K*H] float8_e4m3fn values, [S, K] float32 scales), each
    group of H values of a position scaled by its own largest magnitude / 448 (an all-zero
    group gets scale 1)."""
    import torch

    seq, width = features.shape
    if groups < 1 or width % groups:
        raise ValueError(f"cannot split {width} features into {groups} equal groups")
    x = features.float().reshape(seq, groups, width // groups)  # [S, K, H]
    scale = x.abs().amax(-1) / FLOAT8_MAX  # [S, K]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    values = (x / scale[..., None]).clamp(-FLOAT8_MAX, FLOAT8_MAX).to(torch.float8_e4m3fn)
    return values.reshape(seq, width), scale


def dequantize_float8(values: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """([S, K*H] float8, [S, K] scales) -> [S, K*H] float32."""
    seq, width = values.shape
    groups = scale.shape[-1]
    x = values.float().reshape(seq, groups, width // groups) * scale.float()[..., None]
    return x.reshape(seq, width)


def encode_features(features: list[torch.Tensor], dtype: str = DEFAULT_CACHE_DTYPE,
                    groups: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Rows' [S_i, K*H] features -> (tensors, metadata) of a cache file in `dtype`."""
    import torch

    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
    tensors: dict[str, torch.Tensor] = {}
    if dtype == "float16":
        for i, f in enumerate(features):
            tensors[str(i)] = f.to(torch.float16).contiguous()
        return tensors, {"features": "float16"}
    for i, f in enumerate(features):
        values, scale = quantize_float8(f, groups)
        tensors[str(i)] = values.contiguous()
        tensors[f"scale.{i}"] = scale.contiguous()
    return tensors, {"features": "float8", "groups": str(groups)}


def write_feature_cache(path: Path, features: list[torch.Tensor],
                        topk: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None,
                        dtype: str = DEFAULT_CACHE_DTYPE, groups: int = 1) -> Path:
    """Write a cache file whole, by rename: row i's features in `dtype` (float8 scaled per
    position and group of K*H / `groups` values) and, where given, its top-k as
    "topk_ids.i" (int32) / "topk_logits.i" (float16)."""
    import torch

    tensors, metadata = encode_features(features, dtype, groups)
    for i, pair in enumerate(topk or []):
        if pair is not None:
            tensors[f"topk_ids.{i}"] = pair[0].to(torch.int32).contiguous()
            tensors[f"topk_logits.{i}"] = pair[1].to(torch.float16).contiguous()
    return _save_whole(path, tensors, metadata)


def _save_whole(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    from safetensors.torch import save_file

    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def cache_dtype(handle) -> str:
    """"float16" or "float8": how an open cache (safetensors `safe_open`) stores features."""
    return (handle.metadata() or {}).get("features", "float16")


def read_row_features(handle, row: int) -> torch.Tensor:
    """Row `row`'s [S - 1, K*H] features from an open cache: float16 as stored, float8
    scaled back to float32."""
    import torch

    values = handle.get_tensor(str(row))
    if values.dtype != torch.float8_e4m3fn:
        return values
    return dequantize_float8(values, handle.get_tensor(f"scale.{row}"))


def convert_feature_cache(path: Path, dtype: str, groups: int) -> bool:
    """Rewrite a float16 cache file as `dtype` (top-k logits kept as they are), whole, by
    rename. Returns False when it is stored that way already. A float8 cache is not widened
    back (its lost precision would not return): recompute it instead."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        have = cache_dtype(handle)
        if have == dtype:
            return False
        if have == "float8":
            raise ValueError(f"{path} is a float8 cache; widening it to {dtype} would not restore its precision "
                             "(delete it and let `specflash train cache` recompute it)")
        keys = list(handle.keys())
        rows = sorted(int(k) for k in keys if k.isdigit())
        if rows != list(range(len(rows))):
            raise ValueError(f"{path} does not number its rows 0..{len(rows) - 1}")
        features = [handle.get_tensor(str(i)) for i in rows]
        topk = {k: handle.get_tensor(k) for k in keys if k.startswith("topk_")}
    tensors, metadata = encode_features(features, dtype, groups)
    _save_whole(path, tensors | topk, metadata)
    return True


def compact_caches(folder: str | Path, groups: int, progress: bool = True) -> dict[str, int]:
    """Rewrite every float16 cache of a corpus folder as float8 (shard by shard, each whole,
    so a killed run resumes), freeing about half their space. Returns counts: shards
    converted, shards already float8, bytes before and after."""
    from tqdm.auto import tqdm

    from .corpus import features_path, shard_files

    caches = [features_path(s) for s in shard_files(folder) if features_path(s).exists()]
    report = {"converted": 0, "already_float8": 0, "bytes_before": 0, "bytes_after": 0}
    for path in tqdm(caches, desc=f"float8 caches of {folder}", unit="shard", disable=not progress,
                     dynamic_ncols=True):
        before = path.stat().st_size
        if not convert_feature_cache(path, "float8", groups):
            report["already_float8"] += 1
            continue
        report["bytes_before"] += before
        report["bytes_after"] += path.stat().st_size
        report["converted"] += 1
    return report
