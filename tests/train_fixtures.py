"""Shared helpers for the training tests: a tiny target folder and its regenerated data."""

from __future__ import annotations

import json
from pathlib import Path

from specflash.hf.target import TargetModel
from specflash.train.regenerate import PromptRecord, RegenConfig, regenerate
from tiny import tiny_model_folder

WORDS = "sea wave wind ship sail blue deep salt shore tide moon star night storm gull rock".split()


def prompt_records(n: int) -> list[PromptRecord]:
    out = []
    for i in range(n):
        words = " ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 5))
        out.append(PromptRecord(id=f"p{i}", source="synthetic", messages=(("user", f"Write about {words}"),)))
    return out


def make_training_data(root: Path, n_prompts: int = 48, max_new_tokens: int = 40, layer_ids=(1, 3),
                       varied: bool = False):
    folder = tiny_model_folder(root / "target", varied=varied)
    target = TargetModel.from_pretrained(str(folder))
    data = root / "data"
    regenerate(target, prompt_records(n_prompts), data,
               RegenConfig(max_new_tokens=max_new_tokens, batch_size=8, shard_size=16, layer_ids=tuple(layer_ids)),
               progress=False)
    (data / "meta.json").write_text(json.dumps({"layer_ids": list(layer_ids)}))
    return folder, target, data
