"""`specflash train fit` with every float16 cached feature passed through float8 first.

What training on a float8 features cache gives, without rewriting the float16 cache: the
arm of an A/B against a plain `fit` with the same flags (compare the two with
`specflash train compare`). Usage: python benchmarks/float8_cache_ab.py FIT-FLAGS...
(the flags of `specflash train fit`; --data's caches must be float16).
"""

from __future__ import annotations

import sys

import specflash.train.shards as shards
from specflash.cli import main
from specflash.data.feature_cache import dequantize_float8, quantize_float8, read_row_features

TAPS = 5  # tapped layers in the SmolLM2 corpus's features (its meta.json layer_ids)


def through_float8(handle, row: int):
    features = read_row_features(handle, row)  # [S - 1, K*H] float16
    return dequantize_float8(*quantize_float8(features, TAPS))


if __name__ == "__main__":
    shards.read_row_features = through_float8
    sys.exit(main(["train", "fit", *sys.argv[1:]]))
