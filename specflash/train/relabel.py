"""`specflash train relabel`: labels from the float32 target for answers another dtype wrote.

Decoding is always verified against the float32 target, but `train data --dtype bfloat16`
writes the bfloat16 target's greedy answers, twice as fast; teacher-forced on the same text,
the two targets' greedy tokens differ at a few percent of the positions (2.6% on the
committed SmolLM2 corpus). Relabelling runs every row of such a shard through the target at
`dtype` (float32 by default) once, teacher-forced, and stores its greedy token at each
response position as the row's labels (`target_greedy`), every position, whether or not it
differs from the text. On disk a greedy answer keeps only the positions where its labels
differ from its text (`specflash.data.corpus.pack_rows`), so a relabelled corpus stays about
the size it was; human and sampled answers in those shards (labelled by the writing target)
get the new labels too, stored whole as before.

The text stays as written: it is the context the drafter conditions on (through the
target's features), and the labels are what the drafter learns to predict from it (which
block positions the objective supervises: `specflash.train.objective`). The row keeps its
kind: a relabelled greedy answer is still the target's greedy answer for the held-out split.

Which shards: those listed in the manifest when the run starts whose writer's dtype
(`settings.dtype`) is not `dtype` and whose entry has no `labels` record of `dtype`. Shard by
shard, the shard file is rewritten whole by rename and then its manifest entry gets `labels`
(dtype, counts, time), so a killed run loses at most the shard in progress and a resumed run
skips the finished shards. Shards that `train data` appends later carry no record and wait
for the next run. The manifest is updated with `corpus.update_manifest`, safe beside a
`train data` run appending to the same folder; the shard that run is writing is never read
(it is not in the manifest until it is whole).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from ..data.corpus import (MANIFEST, answer_kind, read_manifest, read_rows, shard_files, shard_index,
                           update_manifest, write_rows)
from ..errors import InputError
from ..hf.target import TargetModel
from .regenerate import teacher_force_by_length


def check_corpus(folder: str | Path) -> dict:
    """The manifest of a corpus folder; a clear error when the folder is missing or is not a corpus."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"no corpus folder {folder}; write one with `specflash train data --out {folder}`")
    manifest = read_manifest(folder)
    if not manifest.get("shards"):
        older = " (an older data folder: `specflash train pack --data FOLDER --out CORPUS` makes it one)" \
            if shard_files(folder) else ""
        raise InputError(f"{folder} is not a specflash corpus: no {MANIFEST} listing its shards{older}")
    return manifest


def needs_labels(entry: dict, dtype: str) -> bool:
    """Whether a manifest entry's shard still needs labels from the `dtype` target: written at
    another (or an unrecorded) dtype, and not relabelled at this one."""
    if entry.get("labels", {}).get("dtype") == dtype:
        return False
    return entry.get("settings", {}).get("dtype") != dtype


def pending_shards(folder: str | Path, dtype: str = "float32") -> list[Path]:
    """Shards of the manifest (as it is now) that need labels from the `dtype` target, in order."""
    folder = Path(folder)
    entries = read_manifest(folder).get("shards", {})
    found = [folder / name for name, entry in entries.items() if needs_labels(entry, dtype)]
    return sorted((p for p in found if p.exists()), key=shard_index)


def stale_label_rows(folders: list[str | Path], dtype: str = "float32") -> int:
    """Rows of shards written by a target of another recorded dtype and never relabelled
    (what `train fit` warns about): their labels are that target's, not the `dtype` one's."""
    total = 0
    for folder in folders:
        for entry in read_manifest(folder).get("shards", {}).values():
            if "dtype" in entry.get("settings", {}) and needs_labels(entry, dtype):
                total += entry.get("rows", 0)
    return total


def teacher_forced_labels(target: TargetModel, rows: list[dict], batch_size: int = 8,
                          on_batch: Callable[[int], None] | None = None) -> list[list[int]]:
    """The target's greedy token at every response position of each row, given the row's
    tokens before it (one teacher-forced forward per batch of similar lengths, for less
    padding); `on_batch(tokens)` hears each batch's sequence tokens."""
    labels: list[list[int]] = [[] for _ in rows]
    for chunk, forced in teacher_force_by_length(target, rows, batch_size):
        for i, (_, greedy, _) in zip(chunk, forced):
            labels[i] = greedy
        if on_batch is not None:
            on_batch(sum(len(rows[i]["input_ids"]) for i in chunk))
    return labels


def relabel_rows(rows: list[dict], labels: list[list[int]], dtype: str) -> dict:
    """Give each row its new labels (in place); returns the shard's `labels` record: the
    dtype, rows, response positions, positions whose label changed from the one used before,
    and for the greedy answers their positions and those whose label differs from the text."""
    record = {"dtype": dtype, "rows": len(rows), "positions": 0, "changed": 0,
              "greedy_positions": 0, "greedy_differing_from_text": 0}
    for row, new in zip(rows, labels):
        response = row["input_ids"][row["num_prompt_tokens"]:]
        old = row.get("target_greedy") or response
        record["positions"] += len(new)
        record["changed"] += sum(a != b for a, b in zip(new, old))
        if answer_kind(row) == "greedy":
            record["greedy_positions"] += len(new)
            record["greedy_differing_from_text"] += sum(a != b for a, b in zip(new, response))
        row["target_greedy"] = list(new)
    record["relabelled"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


def mark_relabelled(folder: str | Path, name: str, record: dict) -> None:
    """Put a relabelled shard's record into its manifest entry (re-read, then replaced whole)."""
    def change(manifest: dict) -> None:
        manifest.setdefault("shards", {}).setdefault(name, {})["labels"] = record

    update_manifest(folder, change)


def restore_records(folder: str | Path, records: dict[str, dict]) -> None:
    """Put back the records of shards relabelled now that a concurrent writer's manifest
    dropped (an older `train data` replaces the manifest without checking it, so a record
    written between its read and its write is lost; the shard itself is relabelled)."""
    entries = read_manifest(folder).get("shards", {})
    for name, record in records.items():
        if entries.get(name, {}).get("labels") != record:
            mark_relabelled(folder, name, record)


def relabel_corpus(target: TargetModel, folder: str | Path, dtype: str = "float32", batch_size: int = 8,
                   max_shards: int | None = None, progress: bool = True) -> dict:
    """Relabel the pending shards of a corpus (module doc) with `target`, loaded at `dtype`.
    Returns totals over the shards done now (the sum of their `labels` records), the seconds
    taken and how many shards still need labels."""
    from tqdm.auto import tqdm

    folder = Path(folder)
    manifest = check_corpus(folder)
    todo = pending_shards(folder, dtype)[:max_shards]
    totals = {"shards": 0, "rows": 0, "positions": 0, "changed": 0, "greedy_positions": 0,
              "greedy_differing_from_text": 0}
    started = time.perf_counter()
    entries = manifest["shards"]
    tokens = sum(entries[p.name].get("prompt_tokens", 0) + entries[p.name].get("response_tokens", 0) for p in todo)
    bar = tqdm(total=tokens, desc=f"relabelling {len(todo)} shards ({dtype})", unit="tok", unit_scale=True,
               disable=not progress, dynamic_ncols=True)
    target.set_taps(())  # labels only: no features
    records: dict[str, dict] = {}
    for shard in todo:
        rows = read_rows(shard)
        record = relabel_rows(rows, teacher_forced_labels(target, rows, batch_size, bar.update), dtype)
        write_rows(shard, rows)  # whole, by rename
        mark_relabelled(folder, shard.name, record)
        records[shard.name] = record
        for key in totals:
            totals[key] += 1 if key == "shards" else record[key]
        if totals["greedy_positions"]:
            bar.set_postfix(differing=f"{totals['greedy_differing_from_text'] / totals['greedy_positions']:.2%}")
    bar.close()
    restore_records(folder, records)
    totals["seconds"] = round(time.perf_counter() - started, 1)
    if totals["greedy_positions"]:
        fraction = totals["greedy_differing_from_text"] / totals["greedy_positions"]
        totals["greedy_fraction_differing"] = round(fraction, 5)
    totals["shards_pending"] = len(pending_shards(folder, dtype))
    return totals
