"""Copying chosen rows of a corpus into a small data folder (`specflash train subset`).

On a machine that did not write a corpus there is no features cache beside it, and `train
fit` or `train compare` on the whole corpus first caches every shard (about 9 hours of one
core at float32 for the SmolLM2 corpus at 331 shards). An A/B on a few thousand rows, or a
compare on a few hundred held-out rows, needs only those rows' features: copy them out and
point `--data` at the copy. Each copied shard keeps its source shard's manifest settings and
label record, so a float32 cache fill still relabels rows a bfloat16 target wrote.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ..errors import InputError
from ..data.corpus import answer_kind, read_manifest, read_rows, record_shard, shard_files, write_rows
from .shards import held_out_bucket


def copy_subset(corpus: str | Path, out: str | Path, *, prompt_ids: set[str] | None = None,
                held_out: int | None = None, fraction: float = 0.03, sources: set[str] | None = None) -> dict:
    """Copy the corpus's greedy target answers to `prompt_ids`, or its first `held_out`
    held-out ones (the split `train fit` makes at `fraction`; of `sources` only, if given),
    into the new folder `out`, one shard per source shard. Returns the copy's totals."""
    if (prompt_ids is None) == (held_out is None):
        raise InputError("give the prompts to copy (--first-prompts) or a count of held-out answers (--held-out)")
    corpus, out = Path(corpus), Path(out)
    if not shard_files(corpus):
        raise InputError(f"{corpus} holds no shards; give a corpus folder, e.g. corpus/smollm2-135m-instruct")
    if out.exists():
        raise InputError(f"{out} exists; give a new folder for the copy")
    manifest = read_manifest(corpus)
    entries = manifest.get("shards", {})
    out.mkdir(parents=True)
    if (corpus / "meta.json").exists():
        shutil.copy(corpus / "meta.json", out / "meta.json")
    copied = index = 0
    for shard in shard_files(corpus):
        if held_out is not None and copied >= held_out:
            break
        rows = [r for r in read_rows(shard) if answer_kind(r) == "greedy"]
        if sources:
            rows = [r for r in rows if r.get("source") in sources]
        if prompt_ids is not None:
            rows = [r for r in rows if r["id"] in prompt_ids]
        else:
            rows = [r for r in rows if held_out_bucket(r["id"]) < fraction][:held_out - copied]
        if not rows:
            continue
        path = write_rows(out / f"shard-{index:05d}.npz", rows)
        entry = entries.get(shard.name, {})
        record_shard(out, path, rows, entry.get("settings", {}), manifest.get("target"),
                     manifest.get("target_sha256"), entry.get("labels"))
        copied += len(rows)
        index += 1
    if not copied:
        shutil.rmtree(out)
        raise InputError(f"no rows of {corpus} matched; nothing was copied")
    return read_manifest(out).get("totals", {})
