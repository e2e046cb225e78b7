"""`specflash train subset`: chosen rows of a corpus copied out with their shards' settings."""

from __future__ import annotations

import json
from pathlib import Path

from specflash.cli import main
from specflash.data.corpus import read_manifest, read_rows, record_shard, shard_files, write_rows
from specflash.train.prompts import load_training_prompts
from specflash.train.shards import ShardDataset

SETTINGS = {"dtype": "bfloat16", "temperature": 0.0, "prompts": "x"}


def row(row_id: str, source: str, response_from: str = "target") -> dict:
    return {"id": row_id, "source": source, "input_ids": [1, 2, 3, 4, 5, 6], "num_prompt_tokens": 2,
            "response_from": response_from, "finish_reason": "stop"}


def make_corpus(root: Path, n: int = 120) -> Path:
    """Two shards: greedy answers of two sources, plus one sampled and one human answer each."""
    root.mkdir()
    for index, source in enumerate(("file", "other")):
        rows = [row(f"{source}:{i}", source) for i in range(n)]
        rows += [row(f"{source}:0#T0.7s1", source), row(f"{source}:1h", source, response_from="human")]
        path = write_rows(root / f"shard-{index:05d}.npz", rows)
        record_shard(root, path, rows, SETTINGS | {"prompts": source}, "tiny", "abc",
                     {"dtype": "float32"} if index == 1 else None)
    return root


def copied_rows(folder: Path) -> list[dict]:
    return [r for shard in shard_files(folder) for r in read_rows(shard)]


def test_held_out_rows_are_the_first_of_the_split_fit_makes(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "held"
    assert main(["train", "subset", "--data", str(corpus), "--out", str(out), "--held-out", "5",
                 "--held-out-fraction", "0.2"]) == 0
    dataset = ShardDataset([corpus])
    _, held = dataset.split(0.2)
    assert [r["id"] for r in copied_rows(out)] == [dataset.rows[i].id for i in held][:5]
    # every copied row is held out at fraction 1 (what `train compare` is given)
    assert len(ShardDataset([out]).split(1.0)[1]) == 5


def test_held_out_rows_can_be_limited_to_some_prompt_sets(tmp_path):
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "held"
    main(["train", "subset", "--data", str(corpus), "--out", str(out), "--held-out", "100",
          "--held-out-fraction", "0.3", "--prompts", "other"])
    rows = copied_rows(out)
    assert rows and {r["source"] for r in rows} == {"other"}


def test_first_prompts_copies_their_greedy_answers_with_each_shards_settings(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": f"question {i}"}) + "\n" for i in range(120)))
    wanted = {r.id for r in load_training_prompts([str(prompts)], limit=30)}
    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "first"
    main(["train", "subset", "--data", str(corpus), "--out", str(out), "--prompts", str(prompts),
          "--first-prompts", "30"])
    assert {r["id"] for r in copied_rows(out)} == wanted  # no sampled or human answer, nothing of "other"
    entries = list(read_manifest(out)["shards"].values())
    assert [e["settings"]["dtype"] for e in entries] == ["bfloat16"]  # so a cache fill relabels them
    assert read_manifest(out)["target"] == "tiny"


def test_subset_refuses_an_existing_out_folder_and_missing_choices(tmp_path, capsys):
    corpus = make_corpus(tmp_path / "corpus")
    assert main(["train", "subset", "--data", str(corpus), "--out", str(corpus), "--held-out", "3"]) == 2
    assert "exists; give a new folder" in capsys.readouterr().err
    assert main(["train", "subset", "--data", str(corpus), "--out", str(tmp_path / "x")]) == 2
    assert "--first-prompts N" in capsys.readouterr().err
    assert main(["train", "subset", "--data", str(corpus), "--out", str(tmp_path / "y"), "--first-prompts", "3"]) == 2
    assert "needs --prompts" in capsys.readouterr().err
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()
