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


def test_relabelled_greedy_answers_store_only_the_labels_that_differ():
    """A greedy answer's labels cost next to nothing where they equal its text, read back
    whole, and leave the row a greedy answer; human answers keep their dense labels."""
    rows = _rows(64, seed=5)
    greedy = [r for r in rows if r["response_from"] == "target"]
    same = [dict(r, target_greedy=r["input_ids"][r["num_prompt_tokens"]:]) for r in greedy]
    plain_size, same_size = len(corpus.pack_rows(greedy)), len(corpus.pack_rows(same))
    assert same_size < plain_size + 400, (plain_size, same_size)  # a fixed few hundred bytes a shard
    assert corpus.unpack_rows(corpus.pack_rows(same)) == same
    changed = [dict(r, target_greedy=[t if j % 7 else (t + 1) % 49152 for j, t in enumerate(r["target_greedy"])])
               for r in same]
    assert corpus.unpack_rows(corpus.pack_rows(changed + rows)) == changed + rows
    assert {corpus.answer_kind(r) for r in changed} == {"greedy"}


def test_answer_kind_tells_greedy_sampled_and_human_answers_apart():
    assert corpus.answer_kind({"id": "sharegpt-12", "response_from": "target"}) == "greedy"
    assert corpus.answer_kind({"id": "sharegpt-12#T0.7s3", "response_from": "target"}) == "sampled"
    assert corpus.answer_kind({"id": "he/7#T1e-05s0"}) == "sampled"
    assert corpus.answer_kind({"id": "x#T0.7s3", "response_from": "human"}) == "human"
    assert corpus.answer_kind({"id": "a#Tb"}) == "greedy"


def test_a_manifest_replaced_while_it_is_updated_keeps_both_changes(tmp_path, monkeypatch):
    """Another process (a `train data` run) replacing the manifest between our read and our
    write: our change is applied again to its manifest instead of overwriting it."""
    corpus.record_shard(tmp_path, tmp_path / "shard-00000.npz", _rows(2), {"dtype": "bfloat16"})
    real = corpus.read_manifest
    calls = []

    def another_process_writes_in_between(folder):
        manifest = real(folder)
        if not calls:
            calls.append(1)
            corpus.record_shard(tmp_path, tmp_path / "shard-00001.npz", _rows(3, seed=1), {"dtype": "bfloat16"})
        return manifest

    monkeypatch.setattr(corpus, "read_manifest", another_process_writes_in_between)
    corpus.update_manifest(tmp_path, lambda m: m["shards"]["shard-00000.npz"].update(labels={"dtype": "float32"}))
    monkeypatch.setattr(corpus, "read_manifest", real)
    shards = corpus.read_manifest(tmp_path)["shards"]
    assert set(shards) == {"shard-00000.npz", "shard-00001.npz"}
    assert shards["shard-00000.npz"]["labels"] == {"dtype": "float32"}
    assert not list(tmp_path.glob("*.tmp"))


def test_the_committed_corpus_manifest_matches_its_shards():
    """What git holds of corpus/smollm2-135m-instruct: every shard in the manifest and every
    manifest entry a shard, with its rows and tokens, the totals their sums, each prompt
    answered once per id. (31 `package-methods` ids name two or three prompts each, a
    property's getter and setter, written before the prompt set gave them ids of their own.)"""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "corpus" / "smollm2-135m-instruct"
    manifest = corpus.read_manifest(folder)
    entries = manifest["shards"]
    shards = corpus.shard_files(folder)
    assert sorted(p.name for p in shards) == sorted(entries)
    answered = set()  # (id, prompt tokens)
    prompts_of: dict[str, int] = {}
    rows_total = 0
    for shard in shards:
        rows = corpus.read_rows(shard)
        entry = entries[shard.name]
        prompt = sum(r["num_prompt_tokens"] for r in rows)
        assert (entry["rows"], entry["prompt_tokens"]) == (len(rows), prompt), shard.name
        assert entry["response_tokens"] == sum(len(r["input_ids"]) for r in rows) - prompt, shard.name
        for r in rows:
            answered.add((r["id"], tuple(r["input_ids"][:r["num_prompt_tokens"]])))
            prompts_of[r["id"]] = prompts_of.get(r["id"], 0) + 1
        rows_total += len(rows)
    assert len(answered) == rows_total == manifest["totals"]["rows"]
    shared = [i for i, n in prompts_of.items() if n > 1]
    assert all(i.startswith("package-methods:") for i in shared) and len(shared) <= 31
    assert manifest["totals"]["response_tokens"] == sum(e["response_tokens"] for e in entries.values())
    assert manifest["target"] == "smollm2-135m-instruct" and manifest["target_sha256"]
