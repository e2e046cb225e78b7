"""`specflash export`: check a drafter folder for vLLM / SGLang (or write an engine-ready copy)
and print the launch command."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="check a drafter for vLLM or SGLang and print the command that serves it",
        description="Check a DFlash drafter folder (config.json + model.safetensors) against what vLLM or SGLang "
                    "reads: config keys, weight names, shapes and dtypes, and with --target the target's sizes. "
                    "Prints the exact launch command, or the list of what the engine would reject (exit 1). "
                    "With --out, first writes an engine-ready copy of the drafter there (with --reduced-vocab, "
                    "vLLM drafts from the drafter's own draft vocabulary) and checks that.")
    p.add_argument("drafter_dir", metavar="DRAFTER_DIR", help="the drafter folder")
    p.add_argument("--engine", required=True, choices=("vllm", "sglang"), help="the serving engine")
    p.add_argument("--target", default=None,
                   help="the target: registered name, local folder or hub id (checked when its config is here; "
                        "its hub id goes into the command)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens verified per step (default: the drafter's block_size); vLLM gets B - 1 "
                        "speculative tokens, SGLang B draft tokens")
    p.add_argument("--tp-size", type=int, default=None, metavar="N",
                   help="shard target and drafter over N GPUs (checked: the attention heads, KV heads and MLP "
                        "width must split evenly); goes into the command")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="write an engine-ready copy of the drafter to DIR (config keys as the engine reads them) "
                        "and check that")
    p.add_argument("--reduced-vocab", action="store_true",
                   help="vLLM only, with --out and --target: give the copy its own LM head over the drafter's "
                        "draft vocabulary (draft_vocab.json: lm_head.weight [N, H] from the target's head rows, "
                        "d2t, draft_vocab_size), so vLLM drafts from the same N tokens specflash does")
    p.add_argument("--json", action="store_true", help="print one JSON object (ok, problems, warnings, command)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..export import ENGINE_NAMES, export

    report = export(args.drafter_dir, args.engine, target=args.target, block_size=args.block_size,
                    tp_size=args.tp_size, out=args.out, reduced_vocab=args.reduced_vocab)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0 if report.ok else 1
    engine = ENGINE_NAMES[args.engine]
    if report.written is not None:
        print(f"wrote {report.written}")
    if not report.ok:
        print(f"specflash export: {engine} would reject {report.drafter} ({len(report.problems)} "
              f"problem{'s' if len(report.problems) > 1 else ''}):", file=sys.stderr)
        for problem in report.problems:
            print(f"  - {problem}", file=sys.stderr)
        for warning in report.warnings:
            print(f"  warning: {warning}", file=sys.stderr)
        return 1
    print(f"{report.drafter}: ready for {engine}")
    for line in report.summary:
        print(f"  {line}")
    for warning in report.warnings:
        print(f"  warning: {warning}")
    print("\nlaunch with:\n")
    print(report.command)
    for note in report.notes:
        print(f"\nnote: {note}")
    return 0
