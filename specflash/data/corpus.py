"""The training corpus on disk: compact shards of target-written token ids plus a manifest.

A corpus folder (e.g. `corpus/smollm2-135m-instruct/`) holds what must outlive a machine:
the sequences a target wrote (prompt + response token ids), small enough to commit.
Features are not part of it: `train fit` recomputes them with the target, and a
`shard-NNNNN.features.safetensors` beside a shard (written by `train data --features`)
is a local cache that git ignores.

Shard files, one of two kinds, numbered in one sequence per folder:
- `shard-NNNNN.npz` (written now): numpy arrays, deflate-compressed
    tokens            [T] uint16 (uint32 for vocabularies over 65,536): every row's ids, concatenated
    offsets           [R + 1] int64: row r is tokens[offsets[r]:offsets[r + 1]]
    num_prompt_tokens [R] int32
    greedy, greedy_offsets: the target's greedy token at each response position, for rows
                      whose response the target did not write greedily (human and sampled
                      answers; empty for the others)
    label_diffs       [D, 2] uint16 (uint32 when wider), only in shards `train relabel`
                      rewrote: (response position, label) wherever a greedy answer's label
                      (the relabelling target's greedy token) differs from its text, rows in
                      order; a relabelled answer stores nothing where the two agree
    rows_json         a JSON list of {id, source, response_from, finish_reason, has_greedy}
                      per row, plus label_diffs (its count of those pairs) for a relabelled
                      greedy answer
- `shard-NNNNN.jsonl` (older folders): one JSON object per row with the same fields.
Either reads back as the same row dicts (`read_rows`), so every reader accepts both: a
row's labels, when it has any, are its `target_greedy` list (one token per response token).

How a response was written (`answer_kind`): "human" (an existing answer, teacher-forced),
"sampled" (the target at a temperature, id `<prompt id>#T0.7s3`) or "greedy" (the target's
own greedy answer, in whatever dtype wrote it). A greedy answer keeps that kind when it gets
labels from a relabelling.

`manifest.json` says what is in the folder and how it was made: the target and the sha256 of
its weights, per shard the generation settings (dtype, temperature, prompt sets, ...) and
token counts, and totals by prompt set and by writer ("target/bfloat16", "human", ...); a
relabelled shard's entry also has `labels` (the dtype of the target whose greedy tokens are
its labels, and counts). Each shard is written whole by rename and the manifest after it, so
a killed job loses at most the shard in progress.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from collections import Counter
from pathlib import Path

import numpy as np

from ..errors import InputError

MANIFEST = "manifest.json"
FORMAT = "specflash-corpus/1"
_SUFFIXES = (".npz", ".jsonl")
_SAMPLED_ID = re.compile(r"#T[^#]+s-?\d+$")  # what `train data --temperature T --seed N` appends to an id


def answer_kind(row: dict) -> str:
    """How a row's response was written: "human" (an existing answer, teacher-forced),
    "sampled" (the target at a temperature: its id ends in "#T<temperature>s<seed>") or
    "greedy" (the target's own greedy answer). Labels added later do not change it."""
    if row.get("response_from", "target") != "target":
        return "human"
    return "sampled" if _SAMPLED_ID.search(row["id"]) else "greedy"


def shard_files(folder: str | Path) -> list[Path]:
    """The shard files of a folder (both kinds), in index order."""
    folder = Path(folder)
    found = [p for p in folder.glob("shard-*") if p.suffix in _SUFFIXES and p.stem.split("-")[1].isdigit()]
    return sorted(found, key=shard_index)


def shard_index(path: Path) -> int:
    return int(path.stem.split("-")[1])


def next_shard_index(folder: str | Path) -> int:
    return max((shard_index(p) for p in shard_files(folder)), default=-1) + 1


def features_path(shard: Path) -> Path:
    """Where a shard's cached features live (a local cache, never committed)."""
    return shard.with_name(shard.stem + ".features.safetensors")


def _concat(seqs: list[list[int]], dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(s) for s in seqs])
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int64, count=int(offsets[-1]))
    return flat.astype(dtype), offsets


def _stores_label_diffs(row: dict) -> bool:
    """Whether a row's labels go to disk as differences from its text: a greedy answer with
    one label per response token (what `train relabel` gives it). Human and sampled answers
    keep the dense `greedy` arrays older readers know."""
    labels = row.get("target_greedy")
    return (labels is not None and answer_kind(row) == "greedy"
            and len(labels) == len(row["input_ids"]) - row["num_prompt_tokens"])


def label_diffs(row: dict) -> list[tuple[int, int]]:
    """(response position, label) wherever a row's `target_greedy` differs from its response."""
    response = row["input_ids"][row["num_prompt_tokens"]:]
    return [(j, label) for j, (label, token) in enumerate(zip(row["target_greedy"], response)) if label != token]


def pack_rows(rows: list[dict]) -> bytes:
    """Row dicts -> the bytes of a compact `.npz` shard (the module doc says what is where)."""
    largest = max((max([*r["input_ids"], *(r.get("target_greedy") or [])], default=0) for r in rows), default=0)
    dtype = np.uint16 if largest < 2 ** 16 else np.uint32
    sparse = [_stores_label_diffs(r) for r in rows]
    tokens, offsets = _concat([r["input_ids"] for r in rows], dtype)
    greedy, greedy_offsets = _concat([[] if s else r.get("target_greedy") or [] for r, s in zip(rows, sparse)],
                                     dtype)
    arrays = {"tokens": tokens, "offsets": offsets, "greedy": greedy, "greedy_offsets": greedy_offsets,
              "num_prompt_tokens": np.array([r["num_prompt_tokens"] for r in rows], dtype=np.int32)}
    meta, diffs = [], []
    for r, s in zip(rows, sparse):
        entry = {"id": r["id"], "source": r.get("source", "?"), "response_from": r.get("response_from", "target"),
                 "finish_reason": r.get("finish_reason"), "has_greedy": r.get("target_greedy") is not None and not s}
        if s:
            found = label_diffs(r)
            entry["label_diffs"] = len(found)
            diffs += found
        meta.append(entry)
    if any(sparse):  # only relabelled shards carry the array
        widest = max((max(pair) for pair in diffs), default=0)
        arrays["label_diffs"] = np.array(diffs, dtype=np.uint16 if widest < 2 ** 16 else np.uint32).reshape(-1, 2)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays, rows_json=np.array(json.dumps(meta)))
    return buffer.getvalue()


def unpack_rows(data: bytes | Path) -> list[dict]:
    """The bytes (or file) of a compact shard -> row dicts, as `pack_rows` was given them."""
    source = io.BytesIO(data) if isinstance(data, bytes) else data
    with np.load(source, allow_pickle=False) as z:
        tokens, offsets = z["tokens"].astype(np.int64), z["offsets"]
        greedy, greedy_offsets = z["greedy"].astype(np.int64), z["greedy_offsets"]
        prompt = z["num_prompt_tokens"]
        meta = json.loads(str(z["rows_json"]))
        diffs = z["label_diffs"].astype(np.int64) if "label_diffs" in z.files else np.zeros((0, 2), np.int64)
    rows, taken = [], 0
    for r, m in enumerate(meta):
        ids = tokens[offsets[r]:offsets[r + 1]]
        row = {"id": m["id"], "source": m["source"], "input_ids": ids.tolist(),
               "num_prompt_tokens": int(prompt[r]), "response_from": m["response_from"],
               "finish_reason": m["finish_reason"]}
        if m.get("has_greedy"):
            row["target_greedy"] = greedy[greedy_offsets[r]:greedy_offsets[r + 1]].tolist()
        elif "label_diffs" in m:  # the response, where the labels differ from it replaced
            labels = ids[int(prompt[r]):].copy()
            mine = diffs[taken:taken + m["label_diffs"]]
            labels[mine[:, 0]] = mine[:, 1]
            taken += m["label_diffs"]
            row["target_greedy"] = labels.tolist()
        rows.append(row)
    return rows


def read_rows(path: str | Path) -> list[dict]:
    """One shard file of either kind -> its row dicts."""
    path = Path(path)
    try:
        if path.suffix == ".npz":
            return unpack_rows(path)
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: not a readable specflash shard ({err}); delete it and re-run "
                         "`specflash train data` on the folder to write it again") from err


def write_rows(path: str | Path, rows: list[dict]) -> Path:
    """Write a shard whole, by rename (a reader sees the old file or the new one); the kind
    follows the suffix (.npz compact, .jsonl text)."""
    path = Path(path)
    if path.suffix == ".npz":
        data = pack_rows(rows)
    else:
        data = "".join(json.dumps(row) + "\n" for row in rows).encode()
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return path


def folder_ids(folder: str | Path) -> set[str]:
    """Ids of every row already in the folder's shards (what a resumed job skips)."""
    return {row["id"] for shard in shard_files(folder) for row in read_rows(shard)}


# ------------------------------------------------------------------ manifest
def weights_sha256(folder: str | Path) -> str | None:
    """sha256 over a model folder's weight files (safetensors, else .bin), in name order:
    which target wrote a corpus. None when the folder has none."""
    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    digest = hashlib.sha256()
    for file in files:
        with file.open("rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()


def read_manifest(folder: str | Path) -> dict:
    path = Path(folder) / MANIFEST
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path} is not valid JSON ({err}); restore it from git") from err


def check_target(folder: str | Path, target: str, sha256: str | None) -> None:
    """A corpus holds one target's writing: refuse to append another's."""
    manifest = read_manifest(folder)
    theirs = manifest.get("target_sha256")
    if theirs and sha256 and theirs != sha256:
        raise InputError(f"{folder} holds text written by {manifest.get('target')} (weights sha256 "
                         f"{theirs[:12]}...), not by {target} ({sha256[:12]}...); write another target's "
                         "answers into a folder of its own")


def writer_of(row: dict, settings: dict) -> str:
    """Who wrote a row's response: 'human', or 'target/<dtype>' (a sampled one says so)."""
    if row.get("response_from", "target") != "target":
        return "human"
    name = f"target/{settings.get('dtype', '?')}"
    if settings.get("temperature"):
        name += f"/T={settings['temperature']}"
    return name


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime ns, size) of a file, None when absent: changes whenever it is replaced."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def update_manifest(folder: str | Path, change, attempts: int = 20) -> dict:
    """Read the manifest, apply `change(manifest)` (in place) and write it back whole by rename.

    Safe beside another process that rewrites the manifest by rename (a `train data` run
    appending shards to the folder): the new manifest is written to a file of this process's
    own, and if the manifest was replaced since it was read, the change is applied again to
    the newer one instead of overwriting it. (The gap left, between that last check and the
    rename, is microseconds.) Returns the manifest written."""
    path = Path(folder) / MANIFEST
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    for _ in range(attempts):
        before = _stamp(path)
        manifest = read_manifest(folder) or {"format": FORMAT}
        change(manifest)
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        if _stamp(path) == before:
            os.replace(tmp, path)
            return manifest
        time.sleep(0.05)
    tmp.unlink(missing_ok=True)
    raise InputError(f"{path} kept changing while it was being updated; try again")


def record_shard(folder: str | Path, shard: Path, rows: list[dict], settings: dict,
                 target: str | None = None, target_sha256: str | None = None, labels: dict | None = None) -> dict:
    """Add (or replace) a shard's entry in the manifest and recompute the totals; `labels`
    (a relabelled shard's record, carried by `pack_folder`) goes into the entry."""
    prompt = sum(r["num_prompt_tokens"] for r in rows)
    total = sum(len(r["input_ids"]) for r in rows)
    entry = {
        "rows": len(rows), "prompt_tokens": prompt, "response_tokens": total - prompt,
        "sources": dict(Counter(r.get("source", "?") for r in rows)),
        "writers": dict(Counter(writer_of(r, settings) for r in rows)),
        "settings": settings, "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if labels is not None:
        entry["labels"] = labels

    def change(manifest: dict) -> None:
        if target is not None:
            manifest.setdefault("target", target)
        if target_sha256 is not None:
            manifest.setdefault("target_sha256", target_sha256)
        manifest.setdefault("shards", {})[shard.name] = entry
        manifest["totals"] = _totals(manifest["shards"])

    return update_manifest(folder, change)


def _totals(shards: dict) -> dict:
    sources: Counter = Counter()
    writers: Counter = Counter()
    for entry in shards.values():
        sources.update(entry["sources"])
        writers.update(entry["writers"])
    return {"shards": len(shards), "rows": sum(e["rows"] for e in shards.values()),
            "prompt_tokens": sum(e["prompt_tokens"] for e in shards.values()),
            "response_tokens": sum(e["response_tokens"] for e in shards.values()),
            "rows_by_source": dict(sorted(sources.items())), "rows_by_writer": dict(sorted(writers.items()))}


def pack_folder(source: str | Path, corpus: str | Path, target: str | None = None,
                target_sha256: str | None = None) -> dict:
    """Append the rows of another data folder (either shard kind, e.g. an older JSONL folder)
    to a corpus as compact shards, skipping ids the corpus already has; a shard carried
    whole keeps its cached features. Settings come from the source's manifest, else its
    meta.json. Returns counts."""
    source, corpus = Path(source), Path(corpus)
    if not shard_files(source):
        raise InputError(f"no shard files in {source}; nothing to pack")
    if target is not None:
        check_target(corpus, target, target_sha256)
    corpus.mkdir(parents=True, exist_ok=True)
    have = folder_ids(corpus)
    theirs = read_manifest(source).get("shards", {})
    meta_file = source / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    fallback = {k: v for k, v in meta.items() if k not in ("target", "layer_ids", "features")}
    counts = {"rows": 0, "skipped": 0, "shards": 0}
    index = next_shard_index(corpus)
    for shard in shard_files(source):
        rows = read_rows(shard)
        keep = [r for r in rows if r["id"] not in have]
        counts["skipped"] += len(rows) - len(keep)
        if not keep:
            continue
        out = corpus / f"shard-{index:05d}.npz"
        cached = features_path(shard)
        if len(keep) == len(rows) and cached.exists():
            tmp = features_path(out).with_suffix(".tmp")
            tmp.write_bytes(cached.read_bytes())
            os.replace(tmp, features_path(out))
        write_rows(out, keep)
        entry = theirs.get(shard.name, {})
        labels = entry.get("labels") if len(keep) == len(rows) else None  # its counts are of the whole shard
        record_shard(corpus, out, keep, entry.get("settings", fallback), target or meta.get("target"), target_sha256,
                     labels)
        have.update(r["id"] for r in keep)
        counts["rows"] += len(keep)
        counts["shards"] += 1
        index += 1
    return counts
