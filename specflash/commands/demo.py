"""`specflash demo`: see DFlash work on the default model in one command."""

from __future__ import annotations

import argparse
import sys

from .common import DEFAULT_TARGET, AtLeast, add_tree_flag, block_size_arg, resolve_draft_flag


def register(sub) -> None:
    p = sub.add_parser("demo", help="plain decoding vs DFlash side by side on a few prompts",
                       description="Fetch the target (and its shipped drafter), run a few prompts with plain "
                                   "decoding and with speculative decoding, and show tokens/s, tau, the same-output "
                                   "check, and the text with accepted draft tokens underlined.")
    p.add_argument("--target", default=DEFAULT_TARGET, help=f"target model (default {DEFAULT_TARGET})")
    p.add_argument("--draft", default=None,
                   help="drafter: default (shipped for the target), random, ngram or a folder (default: the "
                        "shipped drafter, else random)")
    p.add_argument("--block-size", type=block_size_arg, default="auto",
                   help="auto (default: cost-aware drafts per step) or a fixed verify width")
    add_tree_flag(p)
    p.add_argument("--prompt", action="append", default=None, help="a prompt (repeatable; default: three built-in)")
    p.add_argument("--max-new-tokens", type=int, action=AtLeast, minimum=1, default=96,
                   help="new tokens per prompt (default 96)")
    p.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                   help="underline accepted draft tokens in colour (auto: when stdout is a terminal)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..demo import DEMO_PROMPTS, format_table, marked_text, run_demo
    from ..hf.target import TargetModel
    from ..runtime.blockpolicy import make_policy
    from ..runtime.decode import SpeculativeDecoder
    from ..runtime.loading import build_proposer, choose_verify_kernels
    from ..runtime.treepolicy import make_tree_policy

    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_draft_flag(args)
    if args.draft == "none":
        args.draft = "random"  # the demo compares against a drafter; none would compare plain with plain
        print("specflash: no drafter is shipped for this target yet; showing a random drafter (tau ~ 1)",
              file=sys.stderr)
    prompts = tuple(args.prompt) if args.prompt else DEMO_PROMPTS
    print(f"loading {args.target} ...", file=sys.stderr)
    target = TargetModel.from_pretrained(args.target)
    numeric = args.block_size if isinstance(args.block_size, int) else None
    proposer = build_proposer(args.draft, target, block_size=numeric)
    say = lambda m: print(m, file=sys.stderr)  # noqa: E731
    choose_verify_kernels(target, proposer, log=say)  # this machine's verify kernels, before any cost
    size, policy = make_policy(args.block_size, target, proposer, log=say)
    policy = make_tree_policy(args.tree, target, proposer, log=say, block_size=args.block_size) or policy
    decoder = SpeculativeDecoder(target, proposer, size, policy)
    rows = run_demo(target, decoder, prompts, args.max_new_tokens)
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())
    how = (f"draft tree {decoder.policy.name}" if decoder.policy.name.startswith("tree")
           else f"block {decoder.block_size} {decoder.policy.name}")
    print(f"\ntarget {args.target}, draft {args.draft}, {how}, "
          f"{args.max_new_tokens} new tokens, greedy\n")
    print(format_table(rows))
    mark = "underlined" if color else "in «»"
    for row in rows:
        print(f"\n> {row.prompt}\n(accepted draft tokens {mark})\n")
        print(marked_text(target, row.spec, color))
    same = all(row.same for row in rows)
    print(f"\nsame output as plain decoding: {'yes, every prompt' if same else 'NO'}")
    return 0 if same else 1
