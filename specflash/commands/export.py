"""`specflash export`: check a drafter folder for vLLM / SGLang and print the launch command."""

from __future__ import annotations

import argparse
import json
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="check a drafter for vLLM or SGLang and print the command that serves it",
        description="Check a DFlash drafter folder (config.json + model.safetensors) against what vLLM or SGLang "
                    "reads: config keys, weight names, shapes and dtypes, and with --target the target's sizes. "
                    "Prints the exact launch command, or the list of what the engine would reject (exit 1).")
    p.add_argument("drafter_dir", metavar="DRAFTER_DIR", help="the drafter folder")
    p.add_argument("--engine", required=True, choices=("vllm", "sglang"), help="the serving engine")
    p.add_argument("--target", default=None,
                   help="the target: registered name, local folder or hub id (checked when its config is here; "
                        "its hub id goes into the command)")
    p.add_argument("--block-size", type=int, default=None,
                   help="tokens verified per step (default: the drafter's block_size); vLLM gets B - 1 "
                        "speculative tokens, SGLang B draft tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (ok, problems, warnings, command)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from ..export import ENGINE_NAMES, check_drafter

    report = check_drafter(args.drafter_dir, args.engine, target=args.target, block_size=args.block_size)
    if args.json:
        print(json.dumps(report.to_dict()))
        return 0 if report.ok else 1
    engine = ENGINE_NAMES[args.engine]
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
