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
    from specflash.target import TargetModel

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


def test_regenerated_responses_are_the_targets_greedy_output(target, tmp_path):
    records = prompt_records(6)
    regenerate(target, records, tmp_path, RegenConfig(max_new_tokens=16, batch_size=3, layer_ids=(0, 2)),
               progress=False)
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
