"""Regenerated training data: resumable shards without duplicates or gaps, the same chat
template as `generate`, responses equal to the target's greedy output, and stored
features equal to a teacher-forced forward."""

import pytest
import torch

from specflash.train import regenerate as regen
from specflash.train.regenerate import RegenConfig, encode_record, regenerate
from specflash.train.shards import ShardDataset
from tiny import hf_greedy, tiny_model_folder
from train_fixtures import prompt_records


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    from specflash.hf.target import TargetModel

    return TargetModel.from_pretrained(str(tiny_model_folder(tmp_path_factory.mktemp("t") / "tiny")))


def test_training_prompts_use_the_generate_chat_template(target):
    record = prompt_records(1)[0]
    assert encode_record(target, record) == target.encode_prompt(record.messages[0][1], chat=True)


def test_shards_resume_without_duplicates_or_gaps(target, tmp_path, monkeypatch):
    records = prompt_records(40)
    config = RegenConfig(max_new_tokens=12, batch_size=4, shard_size=8, layer_ids=(1, 3))
    real = regen.generate_batch
    calls = {"n": 0}

    def dies_on_the_fifth_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # the run is killed mid-way
        return real(*args, **kwargs)

    monkeypatch.setattr(regen, "generate_batch", dies_on_the_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        regenerate(target, records, tmp_path, config, progress=False)
    partial = ShardDataset([tmp_path])
    assert 0 < len(partial) < 40 and len(partial) % 8 == 0  # only whole shards were written
    monkeypatch.setattr(regen, "generate_batch", real)
    stats = regenerate(target, records, tmp_path, config, progress=False)
    assert stats["already_present"] == len(partial)
    ids = ShardDataset([tmp_path]).ids()
    assert sorted(ids) == sorted(r.id for r in records)  # every prompt once: no gap, no duplicate
    assert not list(tmp_path.glob("*.tmp"))


def test_progress_counts_each_prompt_of_this_run_once_beside_other_sets(target, tmp_path, monkeypatch):
    import dataclasses

    import tqdm.auto

    config = RegenConfig(max_new_tokens=4, batch_size=4, shard_size=8)
    other = [dataclasses.replace(r, id=f"other-{r.id}") for r in prompt_records(12)]
    regenerate(target, other, tmp_path, config, progress=False)  # another prompt set's answers
    records = prompt_records(10)
    regenerate(target, records[:4], tmp_path, config, progress=False)
    bars = []

    class Recorder:
        def __init__(self, *args, total=None, **kwargs):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n=1):
            self.n += n

        def set_postfix(self, **kwargs):
            pass

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    regenerate(target, records, tmp_path, config, total=len(records))
    assert [(b.total, b.n) for b in bars] == [(10, 10)]


def test_regenerated_responses_are_the_targets_greedy_output(target, tmp_path):
    records = prompt_records(6)
    regenerate(target, records, tmp_path, RegenConfig(max_new_tokens=16, batch_size=3, layer_ids=(0, 2),
                                                      cache_dtype="float16"), progress=False)  # exact features
    data = ShardDataset([tmp_path])
    target.model.double()
    try:
        for i in range(len(data)):
            example = data[i]
            n_prompt = int((~example.loss_mask).sum())
            prompt = example.input_ids[:n_prompt].tolist()
            response = example.input_ids[n_prompt:].tolist()
            assert response == hf_greedy(target, prompt, 16, eos=list(target.eos_token_ids))[: len(response)]
            target.set_taps((0, 2))
            teacher = target.forward(example.input_ids[None, :-1]).features[0]
            assert example.features.shape == teacher.shape
            assert torch.allclose(example.features.double(), teacher, atol=2e-2, rtol=1e-2)
    finally:
        target.model.float()


def test_held_out_split_is_independent_of_processing_order(tmp_path):
    """Data is regenerated in sha256(id) order; the held-out split must not follow it."""
    import hashlib

    from specflash.train.regenerate import write_shard

    ids = sorted((f"sharegpt:{i}" for i in range(400)), key=lambda s: hashlib.sha256(s.encode()).hexdigest())
    rows = [{"id": i, "source": "x", "input_ids": [1, 2, 3], "num_prompt_tokens": 1} for i in ids]
    write_shard(tmp_path, 0, rows)
    train, held = ShardDataset([tmp_path]).split(0.1)
    assert 20 <= len(held) <= 60 and len(train) + len(held) == 400
    first_tenth = set(range(40))
    assert len(first_tenth & set(held)) < 20  # the first processed rows are mostly training rows


def _with_answers(records):
    from dataclasses import replace

    return [replace(r, response=f"The {r.messages[0][1].split()[-1]} answer, {i}.") for i, r in enumerate(records)]


def test_human_fraction_keeps_existing_answers_teacher_forced(target, tmp_path):
    records = _with_answers(prompt_records(16))
    config = RegenConfig(max_new_tokens=12, batch_size=4, layer_ids=(1, 3), human_fraction=0.5,
                         cache_dtype="float16")  # exact features, compared below
    stats = regenerate(target, records, tmp_path, config, progress=False)
    data = ShardDataset([tmp_path])
    by_id = {r.id: r for r in records}
    kinds = {data.rows[i].id: data.rows[i].response_from for i in range(len(data))}
    expected = {r.id: "human" if regen.keeps_human_answer(r, 0.5) else "target" for r in records}
    assert kinds == expected and 0 < stats["human"] < len(records)
    for i in range(len(data)):
        row, example = data.rows[i], data[i]
        if row.response_from != "human":
            continue
        prompt = list(row.input_ids[:row.num_prompt_tokens])
        answer = list(row.input_ids[row.num_prompt_tokens:])
        assert answer == regen.encode_answer(target, by_id[row.id], prompt, 12)[0]
        assert target.decode(answer).startswith(by_id[row.id].response[:8])
        target.set_taps((1, 3))
        teacher = target.forward(example.input_ids[None, :-1]).features[0]
        assert torch.allclose(example.features.float(), teacher, atol=2e-2, rtol=1e-2)


def test_human_answers_never_enter_the_held_out_split(target, tmp_path):
    records = _with_answers(prompt_records(24))
    regenerate(target, records, tmp_path, RegenConfig(max_new_tokens=8, batch_size=8, human_fraction=1.0),
               progress=False)
    data = ShardDataset([tmp_path])
    train, held = data.split(0.5)
    assert held == [] and sorted(train) == list(range(len(data)))


def test_answer_tokens_end_where_the_chat_template_closes_the_turn(target):
    record = _with_answers(prompt_records(1))[0]
    prompt = encode_record(target, record)
    ids, reason = regen.encode_answer(target, record, prompt, 64)
    assert reason == "stop" and ids[-1] in target.eos_token_ids
    assert regen.encode_answer(target, record, prompt, 3) == (ids[:3], "length")


def test_training_prompt_order_mixes_sources_under_a_limit():
    """Every source shows up in the first prompts: the order must not follow the
    train/eval split's hash (which put all HumanEval train prompts last)."""
    from specflash.train.prompts import load_training_prompts

    first = load_training_prompts(["humaneval", "sharegpt"], limit=2000)
    share = sum(r.source == "humaneval" for r in first) / len(first)
    assert 0.002 < share < 0.03  # 86 of ~9350 train prompts overall: ~0.9%


def test_skip_prompts_continues_the_same_fixed_order():
    """--skip-prompts N starts at prompt N of the order a plain run uses, so a second run
    (or machine) answers new prompts; skipping everything is a clear error."""
    from specflash.errors import InputError
    from specflash.train.prompts import load_training_prompts

    whole = load_training_prompts(["humaneval"])
    assert [r.id for r in load_training_prompts(["humaneval"], limit=10, skip=30)] == [r.id for r in whole[30:40]]
    assert [r.id for r in load_training_prompts(["humaneval"], skip=30)] == [r.id for r in whole[30:]]
    with pytest.raises(InputError, match="skips every training prompt"):
        load_training_prompts(["humaneval"], skip=len(whole))
    with pytest.raises(InputError, match="must be 0 or more"):
        load_training_prompts(["humaneval"], skip=-1)


def test_human_answers_carry_the_targets_greedy_labels(target, tmp_path):
    """target_greedy[j] is the target's argmax at the position before response token j,
    given the human tokens before it (one unbatched forward as the reference)."""
    records = _with_answers(prompt_records(10))
    regenerate(target, records, tmp_path, RegenConfig(max_new_tokens=12, batch_size=4, human_fraction=1.0),
               progress=False)
    data = ShardDataset([tmp_path])
    assert len(data) == 10 and data.unlabelled_human_rows() == 0
    for i in range(len(data)):
        row, example = data.rows[i], data[i]
        logits = target.forward(example.input_ids[None]).logits[0]  # [S, V]
        expected = logits[row.num_prompt_tokens - 1:-1].argmax(-1)
        assert list(row.target_greedy) == expected.tolist()
        assert torch.equal(example.greedy_ids[row.num_prompt_tokens:], expected)
        assert torch.equal(example.greedy_ids[:row.num_prompt_tokens], example.input_ids[:row.num_prompt_tokens])


def test_teacher_forced_labels_do_not_depend_on_the_logits_budget(target):
    """Rows split into groups to bound the kept logits give the same labels and features."""
    records = _with_answers(prompt_records(6))
    seqs, n_prompt = [], []
    for r in records:
        prompt = encode_record(target, r)
        seqs.append(prompt + regen.encode_answer(target, r, prompt, 12)[0])
        n_prompt.append(len(prompt))
    target.set_taps((1, 3))
    whole = regen.teacher_force_batch(target, seqs, n_prompt)
    one_by_one = regen.teacher_force_batch(target, seqs, n_prompt, logits_budget=1)
    for (f1, g1, _), (f2, g2, _) in zip(whole, one_by_one):
        assert g1 == g2 and torch.allclose(f1.float(), f2.float(), atol=2e-2)


def test_existing_shards_get_greedy_labels_added_in_place(target, tmp_path):
    """Shards written before the labels existed: `add_target_greedy` labels their human
    rows exactly as a fresh run would, leaves target rows and features alone, and is a no-op
    the second time."""
    import json

    records = _with_answers(prompt_records(12))
    config = RegenConfig(max_new_tokens=10, batch_size=4, layer_ids=(1, 3), human_fraction=0.5)
    regenerate(target, records, tmp_path, config, progress=False)
    fresh = {r.id: r.target_greedy for r in ShardDataset([tmp_path]).rows}
    features_before = {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")}
    from specflash.data.corpus import read_rows, shard_files

    for shard in shard_files(tmp_path):  # make them old-style: JSONL without the labels
        rows = read_rows(shard)
        shard.with_suffix(".jsonl").write_text(
            "".join(json.dumps({k: v for k, v in r.items() if k != "target_greedy"}) + "\n" for r in rows))
        shard.unlink()
    old = ShardDataset([tmp_path])
    assert old.unlabelled_human_rows() == sum(v is not None for v in fresh.values()) > 0
    labelled = regen.add_target_greedy(target, tmp_path, batch_size=3, progress=False)
    assert labelled == old.unlabelled_human_rows()
    assert {r.id: r.target_greedy for r in ShardDataset([tmp_path]).rows} == fresh
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.safetensors")} == features_before
    assert regen.add_target_greedy(target, tmp_path, progress=False) == 0


def test_train_data_no_features_keeps_tokens_and_the_tapped_layers_only(tmp_path):
    import json

    from specflash.cli import main

    folder = tiny_model_folder(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}"}) + "\n" for w in ("sea", "wind", "salt")))
    common = ["train", "data", "--target", str(folder), "--prompts", str(prompts), "--max-new-tokens", "6",
              "--batch-size", "2", "--layer-ids", "1,3", "--device", "cpu"]
    assert main([*common, "--out", str(tmp_path / "bare"), "--no-features"]) == 0
    assert main([*common, "--out", str(tmp_path / "full")]) == 0
    bare, full = ShardDataset([str(tmp_path / "bare")]), ShardDataset([str(tmp_path / "full")])
    assert [r.input_ids for r in bare.rows] == [r.input_ids for r in full.rows] and len(bare.rows) == 3
    assert not list((tmp_path / "bare").glob("*.features.safetensors"))
    assert list((tmp_path / "full").glob("*.features.safetensors"))
    meta = json.loads((tmp_path / "bare" / "meta.json").read_text())
    assert meta["layer_ids"] == [1, 3] and meta["features"] is False


def test_train_data_appends_to_a_corpus_and_its_manifest_says_how(tmp_path):
    import json

    from specflash.cli import main
    from specflash.data.corpus import read_manifest, shard_files

    folder = tiny_model_folder(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}"}) + "\n"
                               for w in ("sea", "wind", "salt", "tide", "moon")))
    common = ["train", "data", "--target", str(folder), "--prompts", str(prompts), "--max-new-tokens", "6",
              "--batch-size", "2", "--layer-ids", "1,3", "--device", "cpu", "--out", str(tmp_path / "corpus"),
              "--no-features"]
    assert main([*common, "--max-prompts", "2"]) == 0
    first = read_manifest(tmp_path / "corpus")
    assert main([*common, "--max-prompts", "5"]) == 0
    assert read_manifest(tmp_path / "corpus")["totals"]["rows"] == 5  # appended, nothing repeated
    assert main([*common, "--max-prompts", "3", "--temperature", "0.7"]) == 0  # sampled answers: new rows
    manifest = read_manifest(tmp_path / "corpus")
    assert first["totals"]["rows"] == 2 and manifest["totals"]["rows"] == 8
    assert len(ShardDataset([tmp_path / "corpus"]).rows) == 8
    assert all(p.suffix == ".npz" for p in shard_files(tmp_path / "corpus"))
    assert manifest["target"] == str(folder) and len(manifest["target_sha256"]) == 64
    assert manifest["totals"]["rows_by_writer"] == {"target/float32": 5, "target/float32/T=0.7": 3}
    settings = [s["settings"] for s in manifest["shards"].values()]
    assert {s["temperature"] for s in settings} == {0.0, 0.7} and all(s["dtype"] == "float32" for s in settings)


def test_train_pack_turns_an_older_folder_into_corpus_shards(tmp_path, capsys):
    import json

    from specflash.cli import main
    from specflash.data.corpus import read_rows, shard_files, write_rows

    folder = tiny_model_folder(tmp_path / "tiny")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Tell me about {w}"}) + "\n" for w in ("sea", "wind", "salt")))
    old = tmp_path / "old"
    assert main(["train", "data", "--target", str(folder), "--prompts", str(prompts), "--max-new-tokens", "5",
                 "--batch-size", "2", "--layer-ids", "1,3", "--device", "cpu", "--out", str(old)]) == 0
    for shard in shard_files(old):  # as older versions wrote them
        write_rows(shard.with_suffix(".jsonl"), read_rows(shard))
        shard.unlink()
    (old / "manifest.json").unlink()
    capsys.readouterr()
    assert main(["train", "pack", "--data", str(old), "--out", str(tmp_path / "corpus")]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["rows"] == 3 and report["corpus"]["rows"] == 3
    packed = ShardDataset([tmp_path / "corpus"])
    assert sorted(r.input_ids for r in packed.rows) == sorted(r.input_ids for r in ShardDataset([old]).rows)
    assert packed[0].features is not None  # cached features came along


def test_topk_logits_kept_are_the_targets_largest_where_it_wrote_each_token(target, tmp_path):
    config = RegenConfig(max_new_tokens=10, batch_size=3, layer_ids=(1, 3), topk=5)
    regenerate(target, prompt_records(6), tmp_path, config, progress=False)
    data = ShardDataset([tmp_path])
    for i in range(len(data)):
        example, row = data[i], data.rows[i]
        n_prompt = row.num_prompt_tokens
        n_response = example.input_ids.numel() - n_prompt
        assert example.topk_ids.shape == example.topk_logits.shape == (n_response, 5)
        logits = target.forward(example.input_ids[None, :-1]).logits[0, n_prompt - 1:].float()  # [R, V]
        values, ids = logits.topk(5, dim=-1)
        assert torch.equal(example.topk_ids, ids)
        assert torch.allclose(example.topk_logits, values, atol=1e-2, rtol=1e-3)
        assert torch.equal(example.topk_ids[:, 0], example.input_ids[n_prompt:])  # greedy: the top-1 is the token


def test_no_topk_means_no_distribution_kept(target, tmp_path):
    regenerate(target, prompt_records(3), tmp_path, RegenConfig(max_new_tokens=6, layer_ids=(1, 3)), progress=False)
    example = ShardDataset([tmp_path])[0]
    assert example.topk_ids is None and example.topk_logits is None and example.features is not None


def test_sampled_answers_carry_the_targets_greedy_labels_and_their_seed(target, tmp_path):
    records = prompt_records(6)
    for seed in (1, 2):
        regenerate(target, records, tmp_path, RegenConfig(max_new_tokens=12, batch_size=3, temperature=1.5,
                                                          seed=seed), progress=False)
    data = ShardDataset([tmp_path])
    assert sorted(r.id for r in data.rows) == sorted(f"{r.id}#T1.5s{s}" for r in records for s in (1, 2))
    differs = 0
    for i in range(len(data)):
        row, example = data.rows[i], data[i]
        n_prompt = row.num_prompt_tokens
        logits = target.forward(example.input_ids[None, :-1]).logits[0, n_prompt - 1:]
        assert list(row.target_greedy) == logits.argmax(-1).tolist()  # greedy given the sampled tokens before
        differs += list(row.target_greedy) != list(row.input_ids[n_prompt:])
    assert differs  # at T=1.5 some sampled answers leave the greedy path
    again = regenerate(target, records, tmp_path, RegenConfig(max_new_tokens=12, temperature=1.5, seed=2),
                       progress=False)
    assert again["done"] == 0 and again["already_present"] == len(records)


def test_sampled_answers_of_held_out_prompts_are_never_trained_on(tmp_path):
    from specflash.data.corpus import write_rows

    rows = []
    for i in range(200):
        rows.append({"id": f"q{i}", "source": "x", "input_ids": [1, 2, 3], "num_prompt_tokens": 1})
        rows.append({"id": f"q{i}#T0.7s0", "source": "x", "input_ids": [1, 2, 4], "num_prompt_tokens": 1,
                     "target_greedy": [2, 3]})
    write_rows(tmp_path / "shard-00000.npz", rows)
    data = ShardDataset([tmp_path])
    train, held = data.split(0.2)
    held_prompts = {data.rows[i].id for i in held}
    assert 20 <= len(held) <= 60 and all("#" not in p for p in held_prompts)
    assert not {data.rows[i].id.split("#")[0] for i in train} & held_prompts
    assert len(train) == 400 - 2 * len(held)


def test_regeneration_can_keep_its_features_as_float8(target, tmp_path):
    """The same answers, their features read back within float8's precision, in about half the space."""
    records = prompt_records(8)
    sizes = {}
    for dtype in ("float16", "float8"):
        regenerate(target, records, tmp_path / dtype, RegenConfig(max_new_tokens=12, batch_size=4, layer_ids=(1, 3),
                                                                  cache_dtype=dtype), progress=False)
        sizes[dtype] = sum(f.stat().st_size for f in (tmp_path / dtype).glob("*.features.safetensors"))
    exact, small = ShardDataset([tmp_path / "float16"]), ShardDataset([tmp_path / "float8"])
    assert [r.input_ids for r in exact.rows] == [r.input_ids for r in small.rows]
    for i in range(len(exact)):
        want, got = exact[i].features.float(), small[i].features
        assert got.shape == want.shape and (got - want).norm() < 0.03 * want.norm()
    assert sizes["float8"] < 0.75 * sizes["float16"]
