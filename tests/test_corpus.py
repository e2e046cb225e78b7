"""The training corpus format: compact shards, the manifest, appending and packing."""

from __future__ import annotations

import json
import random

import pytest

from specflash.data import corpus
from specflash.errors import InputError
from specflash.train.shards import ShardDataset


def _rows(n: int, vocab: int = 49152, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = [rng.randrange(vocab) for _ in range(rng.randrange(3, 40))]
        response = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))]
        row = {"id": f"r{seed}-{i}", "source": "humaneval" if i % 2 else "sharegpt", "input_ids": prompt + response,
               "num_prompt_tokens": len(prompt), "response_from": "target", "finish_reason": "stop"}
        if i % 3 == 0:
            row["response_from"] = "human"
            row["target_greedy"] = [rng.randrange(vocab) for _ in response]
        rows.append(row)
    return rows


def test_compact_shard_round_trips_every_field():
    rows = _rows(20)
    assert corpus.unpack_rows(corpus.pack_rows(rows)) == rows


def test_compact_shard_keeps_ids_beyond_uint16():
    rows = _rows(5, vocab=262144)
    assert max(t for r in rows for t in r["input_ids"]) >= 2 ** 16
    assert corpus.unpack_rows(corpus.pack_rows(rows)) == rows


def test_jsonl_and_compact_shards_read_back_the_same(tmp_path):
    rows = _rows(12)
    (tmp_path / "a").mkdir()
    corpus.write_rows(tmp_path / "a" / "shard-00000.npz", rows)
    (tmp_path / "b").mkdir()
    corpus.write_rows(tmp_path / "b" / "shard-00000.jsonl", rows)
    a, b = ShardDataset([tmp_path / "a"]), ShardDataset([tmp_path / "b"])
    assert [(r.id, r.input_ids, r.num_prompt_tokens, r.response_from, r.target_greedy) for r in a.rows] == \
           [(r.id, r.input_ids, r.num_prompt_tokens, r.response_from, r.target_greedy) for r in b.rows]


def test_compact_shards_take_a_fraction_of_jsonl(tmp_path):
    rows = _rows(64, seed=3)
    small = corpus.write_rows(tmp_path / "shard-00000.npz", rows).stat().st_size
    text = corpus.write_rows(tmp_path / "shard-00001.jsonl", rows).stat().st_size
    assert small * 2.5 < text


def test_shard_files_lists_both_kinds_in_index_order(tmp_path):
    for name in ("shard-00002.npz", "shard-00000.jsonl", "shard-00001.npz", "shard-00001.features.safetensors",
                 "shard-00003.npz.tmp", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in corpus.shard_files(tmp_path)] == ["shard-00000.jsonl", "shard-00001.npz",
                                                             "shard-00002.npz"]
    assert corpus.next_shard_index(tmp_path) == 3


def test_manifest_totals_count_rows_tokens_sources_and_writers(tmp_path):
    first, second = _rows(6, seed=1), _rows(4, seed=2)
    for i, (rows, dtype) in enumerate(((first, "bfloat16"), (second, "float32"))):
        path = corpus.write_rows(tmp_path / f"shard-{i:05d}.npz", rows)
        corpus.record_shard(tmp_path, path, rows, {"dtype": dtype, "temperature": 0.0}, "t", "ab" * 32)
    manifest = corpus.read_manifest(tmp_path)
    everything = first + second
    totals = manifest["totals"]
    assert totals["rows"] == 10 and totals["shards"] == 2
    assert totals["prompt_tokens"] == sum(r["num_prompt_tokens"] for r in everything)
    assert totals["response_tokens"] == sum(len(r["input_ids"]) - r["num_prompt_tokens"] for r in everything)
    human = sum(r["response_from"] == "human" for r in everything)
    assert totals["rows_by_writer"] == {"human": human, "target/bfloat16": sum(
        r["response_from"] == "target" for r in first), "target/float32": sum(r["response_from"] == "target"
                                                                              for r in second)}
    assert manifest["target"] == "t" and manifest["shards"]["shard-00001.npz"]["settings"]["dtype"] == "float32"


def test_corpus_refuses_text_from_another_target(tmp_path):
    rows = _rows(2)
    path = corpus.write_rows(tmp_path / "shard-00000.npz", rows)
    corpus.record_shard(tmp_path, path, rows, {}, "mine", "a" * 64)
    corpus.check_target(tmp_path, "mine", "a" * 64)
    with pytest.raises(InputError, match="folder of its own"):
        corpus.check_target(tmp_path, "other", "b" * 64)


def test_unreadable_shard_names_the_file_and_the_fix(tmp_path):
    bad = tmp_path / "shard-00000.npz"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="shard-00000.npz.*re-run"):
        corpus.read_rows(bad)


def test_pack_appends_only_new_ids_and_carries_cached_features(tmp_path):
    src = tmp_path / "old"
    src.mkdir()
    rows = _rows(8, seed=5)
    corpus.write_rows(src / "shard-00000.jsonl", rows[:4])
    corpus.write_rows(src / "shard-00001.jsonl", rows[4:])
    (src / "shard-00001.features.safetensors").write_bytes(b"cached")
    (src / "meta.json").write_text(json.dumps({"dtype": "bfloat16", "layer_ids": [1], "temperature": 0.0}))
    dst = tmp_path / "corpus"
    dst.mkdir()
    corpus.write_rows(dst / "shard-00000.npz", rows[:2])  # two rows already there
    counts = corpus.pack_folder(src, dst, "t", "c" * 64)
    assert counts == {"rows": 6, "skipped": 2, "shards": 2}
    assert sorted(r.id for r in ShardDataset([dst]).rows) == sorted(r["id"] for r in rows)
    assert (dst / "shard-00002.features.safetensors").read_bytes() == b"cached"  # carried whole
    assert not (dst / "shard-00001.features.safetensors").exists()  # cut: its row numbers changed
    assert corpus.read_manifest(dst)["shards"]["shard-00001.npz"]["settings"]["dtype"] == "bfloat16"
    assert corpus.pack_folder(src, dst, "t", "c" * 64)["rows"] == 0  # idempotent
