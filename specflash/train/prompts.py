"""Training prompts: the TRAIN split of the benchmark's prompt sets (so no evaluation
prompt is ever trained on) and JSONL files, as `PromptRecord`s for regeneration."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import InputError
from .regenerate import PromptRecord


def _record(prompt) -> PromptRecord:
    if prompt.messages:
        messages = tuple((m["role"], m["content"]) for m in prompt.messages)
    else:
        messages = (("user", prompt.turns[0]),)
    return PromptRecord(id=f"{prompt.dataset}:{prompt.id}", source=prompt.dataset, messages=messages,
                        response=prompt.reference)


def load_training_prompts(sources: list[str], limit: int | None = None, skip: int = 0) -> list[PromptRecord]:
    """Prompts of every source (a set name or a JSONL path), in a fixed shuffled order
    (by a salted hash of each id), at most `limit` of them after the first `skip`.

    The salt matters: the train/eval split is itself a hash threshold on the same ids, so
    ordering by the unsalted hash put every HumanEval train prompt (hashes above 0.5)
    after all ShareGPT prompts, and `limit` never reached them."""
    from ..bench.datasets import load_prompts, load_prompts_file

    records: list[PromptRecord] = []
    for source in (s.strip() for s in sources):
        if not source:
            continue
        if source.endswith(".jsonl") or Path(source).is_file():
            prompts = load_prompts_file(source)
        else:
            prompts = load_prompts(source, split="train")
        records.extend(_record(p) for p in prompts if p.text.strip())
    if not records:
        raise InputError(f"no training prompts in {', '.join(sources)}")
    records.sort(key=lambda r: hashlib.sha256(f"order:{r.id}".encode()).hexdigest())
    if skip < 0:
        raise InputError(f"--skip-prompts must be 0 or more, got {skip}")
    records = records[skip:]
    if not records:
        raise InputError(f"--skip-prompts {skip} skips every training prompt of {', '.join(sources)}")
    return records[:limit] if limit else records
