"""The `specflash` command line: parses flags into the library's dataclasses and calls it.

No logic lives here. A user mistake (a `SpecflashError`) prints one line to stderr and
exits with status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import __version__
from .errors import SpecflashError

DEFAULT_TARGET = "smollm2-135m-instruct"


def _add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples, still exactly the target's distribution")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus filter in (0, 1]; 1 disables (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables (default)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"registered name (see `specflash models`), local folder or hub id (default {DEFAULT_TARGET})")
    g.add_argument("--draft", default="none",
                   help="none (plain decoding, default), random (randomly initialised drafter: a testing aid), "
                        "ngram (prompt lookup), or a DFlash drafter folder / hub id")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens verified per step (anchor + drafts); default: the drafter's block_size "
                        "(16 for random, 8 for ngram); 1 = plain decoding")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="specflash",
        description="Lossless speculative decoding with DFlash block-diffusion drafters: "
                    "the same tokens as the target model alone, faster.")
    parser.add_argument("--version", action="version", version=f"specflash {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    gen = sub.add_parser("generate", help="generate text for one prompt",
                         description="Generate a response for one prompt with the target model, "
                                     "speculatively when a drafter is given. At temperature 0 the tokens equal "
                                     "plain greedy decoding of the target.")
    gen.add_argument("--prompt", required=True, help="the prompt text")
    gen.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                     help="apply the target's chat template (default: on)")
    gen.add_argument("--system", default=None, help="optional system message (chat mode)")
    gen.add_argument("--max-new-tokens", type=int, default=128, help="at most this many new tokens (default 128)")
    gen.add_argument("--json", action="store_true",
                     help="print one JSON object (text, token_ids, num_new_tokens, tau, acceptance_lengths, "
                          "tokens_per_s, time_to_first_token_s, ...) instead of streaming text")
    _add_model_flags(gen)
    _add_sampling_flags(gen)

    sub.add_parser("models", help="list the registered target models and their licences",
                   description="List the registered target models: name, hub id, licence and where the "
                               "weights come from offline.")
    return parser


def _cmd_generate(args: argparse.Namespace) -> int:
    from .config import DecodeConfig
    from .errors import InputError
    from .pipeline import Pipeline

    if not args.prompt.strip():
        raise InputError("the prompt is empty; pass some text with --prompt")
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, block_size=args.block_size, seed=args.seed)
    pipe = Pipeline.load(args.target, draft=args.draft, device=args.device, dtype=args.dtype,
                         block_size=args.block_size, seed=args.seed)
    prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}] \
        if args.system and args.chat else args.prompt
    if args.json:
        result = pipe.generate(prompt, config, chat=args.chat)
        payload = {"target": args.target, "draft": args.draft, "block_size": pipe.block_size}
        payload.update(result.to_dict())
        print(json.dumps(payload))
        return 0
    from .metrics import SpecStats

    stats = SpecStats()
    for delta in pipe.stream(prompt, config, chat=args.chat, stats=stats):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    tau = f"{stats.tau:.2f}" if stats.tau is not None else "-"
    rate = f"{stats.tokens_per_s:.1f}" if stats.tokens_per_s else "-"
    print(f"[{stats.num_new_tokens} tokens, tau {tau}, {rate} tokens/s decode, "
          f"first token {stats.time_to_first_token_s * 1000:.0f} ms, block {pipe.block_size}]", file=sys.stderr)
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    rows = [("name", "hub id", "licence", "offline source")]
    for entry in list_models():
        offline = "PyPI " + " + ".join(entry.pypi.requirements) if entry.pypi is not None else "-"
        rows.append((entry.name, entry.hub_id, entry.licence, offline))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
    return 0


COMMANDS = {"generate": _cmd_generate, "models": _cmd_models}


def _quiet_libraries() -> None:
    """Keep transformers' per-weight progress bars and advisory warnings off the terminal."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a hard dependency
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _quiet_libraries()
    try:
        return COMMANDS[args.command](args)
    except SpecflashError as exc:
        print(f"specflash: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("specflash: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
