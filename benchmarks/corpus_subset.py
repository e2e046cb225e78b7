"""Copy chosen rows of a corpus into a small data folder, keeping each source shard's
manifest settings (so `train fit` still relabels bfloat16-written rows with the float32
target when it caches their features).

Why: on a new machine the committed corpus has no feature cache, and `train fit` or
`train compare` on it first caches every shard (about 9 hours at one 2-core thread for the
SmolLM2 corpus at 331 shards). An A/B on a few thousand rows, or a compare on a few hundred
held-out rows, only needs those rows' features: copy them out and point `--data` at the copy.

    # the greedy answers to the first 2,450 package-methods prompts of the fixed order
    python3 benchmarks/corpus_subset.py --corpus corpus/smollm2-135m-instruct \
        --out /work/data/pm-greedy-2450 --prompts package-methods --first-prompts 2450
    # the first 400 held-out rows (as `train fit` splits at 3%), for `train compare
    # --data /work/data/heldout-400 --held-out-fraction 1`
    python3 benchmarks/corpus_subset.py --corpus corpus/smollm2-135m-instruct \
        --out /work/data/heldout-400 --held-out 400 --held-out-fraction 0.03
    # ... or only those of some prompt sets
    python3 benchmarks/corpus_subset.py --corpus corpus/smollm2-135m-instruct \
        --out /work/data/heldout-pm-300 --held-out 300 --prompts package-methods
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
from pathlib import Path

from specflash.data.corpus import read_manifest, read_rows, record_shard, shard_files, write_rows
from specflash.train.prompts import load_training_prompts


def held_out(prompt_id: str, fraction: float) -> bool:
    """The split of `ShardDataset.split`: a salted hash of the prompt id below `fraction`."""
    bucket = int(hashlib.sha256(f"held-out:{prompt_id}".encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return bucket < fraction


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", required=True, help="corpus folder, e.g. corpus/smollm2-135m-instruct")
    parser.add_argument("--out", required=True, help="new data folder (must not exist)")
    parser.add_argument("--prompts", help="with --first-prompts: the prompt set(s) of the fixed order; with "
                        "--held-out: only rows of these prompt sets")
    parser.add_argument("--first-prompts", type=int, help="greedy answers to the first N prompts of the fixed "
                        "order of --prompts (those `train data --max-prompts N` answers)")
    parser.add_argument("--held-out", type=int, help="the first N held-out greedy answers in corpus order")
    parser.add_argument("--held-out-fraction", type=float, default=0.03,
                        help="the split of the runs to compare (default 0.03, `train fit`'s)")
    args = parser.parse_args(argv)
    if (args.first_prompts is None) == (args.held_out is None):
        parser.error("give one of --first-prompts (with --prompts) or --held-out")
    out = Path(args.out)
    if out.exists():
        parser.error(f"{out} exists; give a new folder")
    wanted: set[str] | None = None
    if args.first_prompts is not None:
        if not args.prompts:
            parser.error("--first-prompts needs --prompts")
        wanted = {r.id for r in load_training_prompts(args.prompts.split(","), limit=args.first_prompts)}
    corpus = Path(args.corpus)
    entries = read_manifest(corpus).get("shards", {})
    out.mkdir(parents=True)
    if (corpus / "meta.json").exists():
        shutil.copy(corpus / "meta.json", out / "meta.json")
    manifest = read_manifest(corpus)
    copied = 0
    index = 0
    for shard in shard_files(corpus):
        if args.held_out is not None and copied >= args.held_out:
            break
        rows = [r for r in read_rows(shard) if r.get("response_from", "target") == "target" and "#" not in r["id"]]
        if wanted is not None:
            rows = [r for r in rows if r["id"] in wanted]
        else:
            if args.prompts:
                rows = [r for r in rows if r.get("source") in args.prompts.split(",")]
            rows = [r for r in rows if held_out(r["id"], args.held_out_fraction)][:args.held_out - copied]
        if not rows:
            continue
        path = write_rows(out / f"shard-{index:05d}.npz", rows)
        entry = entries.get(shard.name, {})
        record_shard(out, path, rows, entry.get("settings", {}), manifest.get("target"),
                     manifest.get("target_sha256"), entry.get("labels"))
        copied += len(rows)
        index += 1
    totals = read_manifest(out).get("totals", {})
    print(json.dumps({"out": str(out), "rows": copied, "shards": index} | {"totals": totals}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
