"""Decoded acceptance of two drafters, paired by prompt: is the second one better beyond noise?

`specflash bench` prints each run's mean tau per prompt set; two drafters benched on the same
prompts differ by a few hundredths, less than either mean's spread over prompts. Pairing
the runs by request (dataset, prompt id, turn) removes the prompts' own difficulty: this
prints, per prompt set, each run's mean tau, the mean of the per-request differences with
its standard error, each run's P(first draft right) and its mismatches.

    specflash bench --draft runs/a/drafter --methods dflash --baseline dflash --block-size 16 \\
        --datasets humaneval,sharegpt --num-prompts 20 --max-new-tokens 128 --out results/bench-a
    specflash bench --draft runs/b/drafter ... --out results/bench-b
    python benchmarks/paired_tau.py results/bench-a results/bench-b [--method dflash] [--json]

Only requests present in both runs are paired (their counts are printed)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def read_samples(path: str | Path, method: str) -> dict[tuple, dict]:
    """{(dataset, prompt_id, turn): record} of one method in a bench folder (or its samples.jsonl)."""
    path = Path(path)
    if path.is_dir():
        path = path / "samples.jsonl"
    if not path.exists():
        raise SystemExit(f"error: no {path}; pass a `specflash bench --out` folder or its samples.jsonl")
    found = {}
    for line in path.read_text().splitlines():
        rec = json.loads(line)
        if rec.get("method") == method and rec.get("tau") is not None:
            found[(rec["dataset"], str(rec["prompt_id"]), rec.get("turn", 0))] = rec
    if not found:
        raise SystemExit(f"error: {path} has no drafted requests of method {method!r} (see --method)")
    return found


def first_draft_right(records: list[dict]) -> float | None:
    """Pooled P(first draft accepted) over the records' steps."""
    drafted = sum((r.get("drafted_per_position") or [0])[0] for r in records)
    accepted = sum((r.get("accepted_per_position") or [0])[0] for r in records)
    return accepted / drafted if drafted else None


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of b - a over pairs and its standard error (0 with fewer than two pairs)."""
    diffs = [y - x for x, y in zip(a, b)]
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(len(diffs)) if len(diffs) > 1 else 0.0
    return mean, se


def compare(a: dict[tuple, dict], b: dict[tuple, dict]) -> dict[str, dict]:
    """Per prompt set and overall: pairs, mean tau of each run, the paired difference (b - a)
    with its standard error, P(first draft right) of each, mismatches of each."""
    keys = sorted(set(a) & set(b))
    if not keys:
        raise SystemExit("error: the two runs share no request (dataset, prompt id, turn); bench the same prompts")
    groups: dict[str, list[tuple]] = {}
    for key in keys:
        groups.setdefault(key[0], []).append(key)
    groups["all"] = keys
    table = {}
    for name, members in groups.items():
        ta = [a[k]["tau"] for k in members]
        tb = [b[k]["tau"] for k in members]
        diff, se = paired_difference(ta, tb)
        table[name] = {"pairs": len(members), "tau_a": statistics.fmean(ta), "tau_b": statistics.fmean(tb),
                       "difference": diff, "se": se,
                       "p_first_a": first_draft_right([a[k] for k in members]),
                       "p_first_b": first_draft_right([b[k] for k in members]),
                       "mismatches_a": sum(a[k].get("matches_baseline") is False for k in members),
                       "mismatches_b": sum(b[k].get("matches_baseline") is False for k in members)}
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="baseline bench folder (or samples.jsonl)")
    parser.add_argument("b", help="compared bench folder (or samples.jsonl)")
    parser.add_argument("--method", default="dflash", help="method name in both runs (default dflash)")
    parser.add_argument("--json", action="store_true", help="print the table as JSON")
    args = parser.parse_args(argv)
    a, b = read_samples(args.a, args.method), read_samples(args.b, args.method)
    table = compare(a, b)
    print(f"paired over requests in both runs (A: {len(a)}, B: {len(b)})", file=sys.stderr)
    if args.json:
        print(json.dumps(table, indent=1))
        return 0

    def num(x, spec=".3f"):
        return "-" if x is None else format(x, spec)

    print("| prompts | pairs | tau A | tau B | B - A (paired) | P(1st right) A | B | mismatches A / B |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, row in table.items():
        print(f"| {name} | {row['pairs']} | {num(row['tau_a'])} | {num(row['tau_b'])} | "
              f"{row['difference']:+.3f} ± {row['se']:.3f} | {num(row['p_first_a'])} | {num(row['p_first_b'])} | "
              f"{row['mismatches_a']} / {row['mismatches_b']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
