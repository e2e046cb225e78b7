"""`train relabel`: answers a bfloat16 target wrote get the float32 target's greedy tokens as
labels, resumably, without changing how the rows count for the held-out split; and the
features cache (`train cache`, `fit`'s own fill), which relabels in the same forward."""

from __future__ import annotations

import json

import pytest
import torch

from specflash.cli import main
from specflash.data.corpus import features_path, read_manifest, read_rows, shard_files, weights_sha256, write_rows
from specflash.hf.target import TargetModel
from specflash.train import relabel as rl
from specflash.train.loop import train_estimate_sample
from specflash.train.regenerate import RegenConfig, cache_features, regenerate
from specflash.train.shards import ShardDataset
from tiny import tiny_model_folder
from train_fixtures import prompt_records

BF16 = {"dtype": "bfloat16", "temperature": 0.0}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("relabel") / "target")
    return folder, TargetModel.from_pretrained(str(folder))


def write_corpus(tiny, out, records, temperature: float = 0.0, seed: int = 0) -> None:
    """Greedy (or sampled) answers recorded as a bfloat16 target's, a third of them nudged off
    the float32 target's path at their third response token, as a bfloat16 writer's answers are."""
    folder, target = tiny
    old = set(shard_files(out)) if out.exists() else set()
    regenerate(target, records, out, RegenConfig(max_new_tokens=12, batch_size=4, shard_size=4,
                                                 temperature=temperature, seed=seed),
               progress=False, settings=BF16 | {"temperature": temperature}, target_name=str(folder),
               target_sha256=weights_sha256(folder))
    for shard in set(shard_files(out)) - old:
        rows = read_rows(shard)
        for k, row in enumerate(rows):
            at = row["num_prompt_tokens"] + 2
            if k % 3 == 0 and "target_greedy" not in row and at < len(row["input_ids"]) - 1:
                row["input_ids"][at] = (row["input_ids"][at] + 1) % 200
        write_rows(shard, rows)
    (out / "meta.json").write_text(json.dumps({"layer_ids": [1, 3]}))


def bare_corpus(tiny, tmp_path, n: int):
    """A bfloat16-written corpus without its features cache, as it arrives on a new machine."""
    corpus = tmp_path / "corpus"
    write_corpus(tiny, corpus, prompt_records(n))
    for cache in corpus.glob("*.features*"):
        cache.unlink()
    return corpus


def reference_labels(target: TargetModel, ids: list[int], n_prompt: int) -> list[int]:
    """The target's argmax at every response position, one unbatched float32 forward."""
    logits = target.forward(torch.tensor([ids])).logits[0]  # [S, V]
    return logits[n_prompt - 1:-1].argmax(-1).tolist()


def test_relabel_stores_the_float32_targets_teacher_forced_argmax(tiny, tmp_path, capsys):
    corpus = tmp_path / "corpus"
    write_corpus(tiny, corpus, prompt_records(10))
    capsys.readouterr()
    assert main(["train", "relabel", "--data", str(corpus), "--batch-size", "3", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["shards"] == 3 and report["shards_pending"] == 0 and report["labels"] == "float32"
    differing = 0
    for shard in shard_files(corpus):
        for row in read_rows(shard):
            expected = reference_labels(tiny[1], row["input_ids"], row["num_prompt_tokens"])
            assert row["target_greedy"] == expected, row["id"]
            differing += sum(a != b for a, b in zip(expected, row["input_ids"][row["num_prompt_tokens"]:]))
    assert 0 < differing == report["greedy_differing_from_text"]
    entries = read_manifest(corpus)["shards"].values()
    assert all(e["labels"]["dtype"] == "float32" for e in entries)
    assert sum(e["labels"]["greedy_positions"] for e in entries) == report["greedy_positions"] > differing
    data = ShardDataset([corpus])
    for i, row in enumerate(data.rows):  # the objective's labels: the float32 ones, the text untouched
        example = data[i]
        labels = example.input_ids if example.greedy_ids is None else example.greedy_ids
        assert labels[row.num_prompt_tokens:].tolist() == reference_labels(tiny[1], list(row.input_ids),
                                                                           row.num_prompt_tokens)
    assert main(["train", "relabel", "--data", str(corpus)]) == 0  # nothing left: no target loaded
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards"] == 0


def test_a_killed_relabel_resumes_with_the_shards_not_done(tiny, tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write_corpus(tiny, corpus, prompt_records(12))
    shards = rl.pending_shards(corpus)
    assert len(shards) == 3
    real = rl.teacher_forced_labels
    calls = []

    def dies_on_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    untouched = shards[1].read_bytes()
    monkeypatch.setattr(rl, "teacher_forced_labels", dies_on_the_second_shard)
    with pytest.raises(KeyboardInterrupt):
        rl.relabel_corpus(tiny[1], corpus, progress=False)
    monkeypatch.setattr(rl, "teacher_forced_labels", real)
    assert rl.pending_shards(corpus) == shards[1:] and shards[1].read_bytes() == untouched
    assert not list(corpus.glob("*.tmp"))
    done = rl.relabel_corpus(tiny[1], corpus, progress=False)
    assert done["shards"] == 2 and done["shards_pending"] == 0
    # `train data` appending more bfloat16 answers: only the new shards wait for the next run
    write_corpus(tiny, corpus, prompt_records(16))
    new = rl.pending_shards(corpus)
    assert [p.name for p in new] == ["shard-00003.npz"]
    assert rl.stale_label_rows([corpus]) == 4
    assert rl.relabel_corpus(tiny[1], corpus, max_shards=5, progress=False)["shards"] == 1
    assert rl.stale_label_rows([corpus]) == 0


def test_relabelled_greedy_answers_stay_greedy_answers_for_the_split(tiny, tmp_path):
    corpus = tmp_path / "corpus"
    records = prompt_records(24)
    write_corpus(tiny, corpus, records)
    write_corpus(tiny, corpus, records[:12], temperature=1.5, seed=1)  # sampled answers of the same prompts
    before = ShardDataset([corpus])
    split_before = before.split(0.5)
    estimate_before = train_estimate_sample(before, split_before[0], 8)
    rl.relabel_corpus(tiny[1], corpus, progress=False)
    after = ShardDataset([corpus])
    assert sum(r.target_greedy is not None for r in after.rows if r.written == "greedy") > 0  # some differ
    train, held = after.split(0.5)
    assert (train, held) == split_before and held
    assert all(after.rows[i].written == "greedy" and "#" not in after.rows[i].id for i in held)
    assert {after.rows[i].id.split("#")[0] for i in train}.isdisjoint(after.rows[i].id for i in held)
    assert train_estimate_sample(after, train, 8) == estimate_before
    assert all(after.rows[i].greedy_answer for i in estimate_before)
    assert [r.written for r in after.rows].count("sampled") == 12


def test_train_fit_runs_on_a_relabelled_corpus(tiny, tmp_path, capsys):
    folder, _ = tiny
    corpus = tmp_path / "corpus"
    write_corpus(tiny, corpus, prompt_records(24))
    fit = ["train", "fit", "--data", str(corpus), "--target", str(folder), "--num-layers", "1", "--block-size",
           "4", "--anchors", "8", "--draft-vocab", "0", "--epochs", "1", "--max-steps", "2", "--eval-every", "2",
           "--grad-accum", "2", "--precision", "fp32", "--device", "cpu", "--no-cache-features"]
    capsys.readouterr()
    assert main([*fit, "--out", str(tmp_path / "before")]) == 0
    assert "train relabel" in capsys.readouterr().out  # warned: labels not from the float32 target
    assert main(["train", "relabel", "--data", str(corpus)]) == 0
    capsys.readouterr()
    assert main([*fit, "--out", str(tmp_path / "run")]) == 0
    assert "train relabel" not in capsys.readouterr().out
    info = json.loads((tmp_path / "run" / "drafter" / "training_info.json").read_text())
    assert info["data"]["greedy_labels_differing_from_text"] > 0 and info["data"]["sampled_response_tokens"] == 0
    assert info["data"]["held_out"] > 0 and info["tau_estimate"] is not None


def test_a_new_machines_feature_cache_fill_relabels_in_the_same_pass(tiny, tmp_path, capsys):
    folder, target = tiny
    corpus = bare_corpus(tiny, tmp_path, 12)
    assert rl.stale_label_rows([corpus]) == 12 and not features_path(shard_files(corpus)[0]).exists()
    fit = ["train", "fit", "--data", str(corpus), "--target", str(folder), "--num-layers", "1", "--block-size",
           "4", "--anchors", "8", "--draft-vocab", "0", "--epochs", "1", "--max-steps", "1", "--eval-every", "0",
           "--precision", "fp32", "--device", "cpu", "--out", str(tmp_path / "run")]
    capsys.readouterr()
    assert main(fit) == 0
    assert "train relabel" not in capsys.readouterr().out  # the fill relabelled before the rows were read
    assert rl.stale_label_rows([corpus]) == 0 and rl.pending_shards(corpus) == []
    for shard in shard_files(corpus):
        assert features_path(shard).exists()
        for row in read_rows(shard):
            assert row["target_greedy"] == reference_labels(target, row["input_ids"], row["num_prompt_tokens"])
    assert all(e["labels"]["dtype"] == "float32" for e in read_manifest(corpus)["shards"].values())


def test_a_cache_fill_told_not_to_relabel_leaves_the_shards_alone(tiny, tmp_path):
    corpus = bare_corpus(tiny, tmp_path, 8)
    before = {shard.name: shard.read_bytes() for shard in shard_files(corpus)}
    assert cache_features(tiny[1], corpus, (1, 3), progress=False, relabel=False) == 8
    assert {shard.name: shard.read_bytes() for shard in shard_files(corpus)} == before
    assert rl.stale_label_rows([corpus]) == 8


def test_relabel_refuses_what_is_not_a_corpus(tmp_path, capsys):
    assert main(["train", "relabel", "--data", str(tmp_path / "missing")]) == 2
    assert "no corpus folder" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", "relabel", "--data", str(tmp_path / "empty")]) == 2
    assert "not a specflash corpus" in capsys.readouterr().err
    old = tmp_path / "old"
    old.mkdir()
    write_rows(old / "shard-00000.jsonl", [{"id": "a", "input_ids": [1, 2, 3], "num_prompt_tokens": 1}])
    assert main(["train", "relabel", "--data", str(old)]) == 2
    err = capsys.readouterr().err
    assert "not a specflash corpus" in err and "train pack" in err and "Traceback" not in err


def test_train_cache_caches_features_ahead_of_fit_and_relabels_at_float32(tiny, tmp_path, capsys):
    corpus = bare_corpus(tiny, tmp_path, 8)
    before = {shard.name: shard.read_bytes() for shard in shard_files(corpus)}
    capsys.readouterr()
    assert main(["train", "cache", "--data", str(corpus), "--dtype", "bfloat16", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 8 and report["relabelled_shards"] == 0 and report["layer_ids"] == [1, 3]
    assert all(features_path(shard).exists() for shard in shard_files(corpus))
    assert {shard.name: shard.read_bytes() for shard in shard_files(corpus)} == before  # bf16: labels as written
    assert main(["train", "cache", "--data", str(corpus)]) == 0  # all cached: nothing to do, no target loaded
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["shards"] == 0
    for cache in corpus.glob("*.features*"):
        cache.unlink()
    assert main(["train", "cache", "--data", str(corpus), "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 8 and report["relabelled_shards"] == 2 and rl.stale_label_rows([corpus]) == 0


def test_train_cache_explains_bad_input(tiny, tmp_path, capsys):
    assert main(["train", "cache", "--data", str(tmp_path / "missing")]) == 2
    assert "no corpus folder" in capsys.readouterr().err
    corpus = bare_corpus(tiny, tmp_path, 4)
    for bad, message in (("1,x", "comma-separated layer numbers"), ("1,99", "must lie in 0..")):
        assert main(["train", "cache", "--data", str(corpus), "--layer-ids", bad, "--device", "cpu"]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not any(features_path(shard).exists() for shard in shard_files(corpus))


def test_train_cache_float8_rewrites_float16_caches_and_writes_new_ones_as_float8(tiny, tmp_path, capsys):
    from safetensors import safe_open

    from specflash.data.feature_cache import cache_dtype
    from specflash.train.shards import ShardDataset

    corpus = bare_corpus(tiny, tmp_path, 8)
    assert main(["train", "cache", "--data", str(corpus), "--dtype", "bfloat16", "--device", "cpu",
                 "--cache-dtype", "float16"]) == 0
    exact = {ex.id: ex.features for ex in (ShardDataset([corpus])[i] for i in range(8))}
    features_path(shard_files(corpus)[0]).unlink()  # one shard without a cache, one with a float16 one
    capsys.readouterr()
    assert main(["train", "cache", "--data", str(corpus), "--dtype", "bfloat16", "--device", "cpu",
                 "--cache-dtype", "float8"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 4 and report["compacted"]["converted"] == 1
    assert report["compacted"]["bytes_after"] < 0.7 * report["compacted"]["bytes_before"]
    for shard in shard_files(corpus):
        with safe_open(str(features_path(shard)), "pt") as handle:
            assert cache_dtype(handle) == "float8"
    data = ShardDataset([corpus])
    for i in range(8):
        got, want = data[i].features.float(), exact[data[i].id].float()
        assert got.shape == want.shape and (got - want).norm() < 0.03 * want.norm()
    assert main(["train", "cache", "--data", str(corpus), "--cache-dtype", "float8"]) == 0  # nothing left to do
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["shards"] == 0 and report["compacted"]["converted"] == 0
    assert report["compacted"]["already_float8"] == 2


def test_a_large_cache_fill_says_what_it_costs_and_what_is_cheaper(tiny, tmp_path, capsys, monkeypatch):
    import specflash.train.loop as loop

    folder, _ = tiny
    corpus = bare_corpus(tiny, tmp_path, 8)
    tokens = loop.uncached_tokens(corpus)
    assert tokens == sum(len(r["input_ids"]) for shard in shard_files(corpus) for r in read_rows(shard))
    fit = ["train", "fit", "--data", str(corpus), "--target", str(folder), "--num-layers", "1", "--block-size",
           "4", "--anchors", "8", "--draft-vocab", "0", "--epochs", "1", "--max-steps", "1", "--eval-every", "0",
           "--precision", "fp32", "--device", "cpu"]
    monkeypatch.setattr(loop, "LARGE_FILL_TOKENS", tokens + 1)
    capsys.readouterr()
    assert main([*fit, "--out", str(tmp_path / "small")]) == 0
    assert "train subset" not in capsys.readouterr().out  # a fill below the threshold says nothing
    for shard in shard_files(corpus):
        features_path(shard).unlink()
    monkeypatch.setattr(loop, "LARGE_FILL_TOKENS", tokens)
    assert main([*fit, "--out", str(tmp_path / "large")]) == 0
    out = capsys.readouterr().out
    assert "--dtype bfloat16" in out and "train subset" in out
    assert loop.uncached_tokens(corpus) == 0
