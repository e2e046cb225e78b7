"""Which drafter shape gives the most speedup per hour of training on this machine?

Trains each arm from scratch on the same fixed subset of a `specflash train data` folder
(the first --shards shard files, linked into a study folder so the data cannot grow under
the runs), one after another, with the same schedule, then reads each run's held-out
estimate (per-position acceptance against the target's own continuation) and measures
the exported drafter's step costs. The modelled speedup over plain decoding is the one the
`auto` block policy would reach with that acceptance:
max over k of E[tokens | k] / step(k) * t_verify(1).

    python benchmarks/drafter_shape_study.py --data runs/data/smollm2-sharegpt --out runs/study \\
        --arm "1 layer=--num-layers 1" --arm "1 layer, target init=--num-layers 1 --init target" \\
        --arm "2 layers=--num-layers 2"

Arms are resumable (each is a `train fit` run folder); the last stdout line is one JSON
document with a row per arm.
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

from specflash.perf.costmodel import best_num_drafts, expected_tokens


def link_subset(data: Path, study_data: Path, shards: int) -> int:
    """Link meta.json and the first `shards` shards (jsonl + features) into study_data."""
    study_data.mkdir(parents=True, exist_ok=True)
    files = sorted(data.glob("shard-*.jsonl"))[:shards]
    if not files:
        sys.exit(f"no shard-*.jsonl in {data}")
    for src in [data / "meta.json", *files, *(f.with_name(f.stem + ".features.safetensors") for f in files)]:
        dst = study_data / src.name
        if src.exists() and not dst.exists():
            dst.symlink_to(src.resolve())
    return len(files)


def read_log(path: Path) -> tuple[list[dict], dict]:
    """(every held-out evaluation record, the last training record) of a run's log.jsonl."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in records if "eval_tau_estimate" in r], [r for r in records if "loss" in r][-1]


def modelled_speedup(accept_through: list[float], costs) -> tuple[float, int]:
    """(speedup over plain decoding, number of drafts) of the step the `auto` policy picks
    for a fixed acceptance profile: accept_through[i] = P(draft positions 1..i+1 all right)."""
    conditional = [now / before if before > 0 else 0.0
                   for before, now in zip([1.0, *accept_through], accept_through)]
    k = best_num_drafts(conditional, costs, len(conditional))
    return expected_tokens(conditional, k) / costs.step_s(k) * costs.step_s(0), k


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="a `specflash train data` folder")
    parser.add_argument("--out", required=True, help="study folder (subset links and one run per arm)")
    parser.add_argument("--shards", type=int, default=20, help="use the first N shards")
    parser.add_argument("--arm", action="append", required=True,
                        help='"NAME=extra train fit flags"; repeat for each arm')
    parser.add_argument("--common", default="--block-size 16 --anchors 32 --grad-accum 4 --lr 1e-3 --gamma 2.5 "
                        "--loss-positions 6 --epochs 1 --eval-every 100 --save-every 50 --threads 2",
                        help="flags every arm shares")
    parser.add_argument("--target", default="smollm2-135m-instruct")
    args = parser.parse_args()

    out = Path(args.out)
    study_data = out / "data"
    n = link_subset(Path(args.data), study_data, args.shards)
    print(f"study data: first {n} shards of {args.data} linked into {study_data}", flush=True)

    arms = []
    for spec in args.arm:
        name, _, flags = spec.partition("=")
        slug = "".join(c if c.isalnum() else "-" for c in name.strip().lower()).strip("-")
        run = out / slug
        if not (run / "drafter" / "model.safetensors").exists():
            cmd = ["specflash", "train", "fit", "--data", str(study_data), "--out", str(run), "--target", args.target,
                   *shlex.split(args.common), *shlex.split(flags)]
            print("$ " + shlex.join(cmd), flush=True)
            subprocess.run(cmd, check=True)
        arms.append((name.strip(), flags, run))

    import torch

    from specflash.perf.measure import measure_costs
    from specflash.runtime.loading import build_proposer
    from specflash.hf.target import TargetModel

    torch.set_num_threads(2)
    target = TargetModel.from_pretrained(args.target)
    rows = []
    for name, flags, run in arms:
        evals, train = read_log(run / "log.jsonl")
        last = evals[-1]
        proposer = build_proposer(str(run / "drafter"), target)
        costs = measure_costs(target, proposer, max_tokens=8)
        speed, k = modelled_speedup(last["eval_accept_through_position"][:7], costs)
        rows.append({
            "arm": name, "flags": flags, "steps": last["step"], "train_hours": round(train["train_seconds"] / 3600, 3),
            "tau_estimate": round(last["eval_tau_estimate"], 3), "p_first": last["eval_accept_through_position"][0],
            "eval_blocks": last["eval_blocks"], "t_draft_ms": round(1000 * costs.draft_s(2), 1),
            "t_verify3_ms": round(1000 * costs.verify_s(3), 1), "modelled_speedup": round(speed, 3),
            "best_drafts": k, "curve": [(r["step"], round(r["eval_tau_estimate"], 3)) for r in evals],
        })
    print("\n| arm | steps | train h | tau est | P(1st right) | t_draft(2) ms | modelled speedup (drafts) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arm']} | {r['steps']} | {r['train_hours']:.2f} | {r['tau_estimate']:.3f} | {r['p_first']:.3f} "
              f"| {r['t_draft_ms']:.1f} | {r['modelled_speedup']:.3f}x ({r['best_drafts']}) |")
    print(json.dumps({"data": args.data, "shards": n, "common": args.common, "arms": rows}))


if __name__ == "__main__":
    main()
