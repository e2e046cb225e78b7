"""Flags shared by several commands, and their checks at parse time.

A flag value is checked once, while argparse reads it, by the same function the library
entry points call (runtime/config.py: `parse_block_size`, `at_least`); a bad value is an
`OptionError`, which argparse lets through, so `cli.main` prints one line and exits 2."""

from __future__ import annotations

import argparse

from ..errors import InputError, SpecflashError
from ..models import DEFAULT_TARGET
from ..runtime.config import at_least, parse_block_size, parse_tree


class OptionError(SpecflashError):
    """A bad flag value, found while parsing. Not a ValueError: argparse would catch that and
    print its usage with a generic "invalid value" instead of the message."""


class AtLeast(argparse.Action):
    """An integer flag with a lower bound, checked as it is parsed:
    `add_argument("--warmup", type=int, action=AtLeast, minimum=0)`."""

    def __init__(self, option_strings, dest, minimum: int = 1, **kwargs):
        super().__init__(option_strings, dest, **kwargs)
        self.minimum = minimum

    def __call__(self, parser, namespace, values, option_string=None):
        try:
            at_least(self.option_strings[-1], values, self.minimum)
        except InputError as exc:
            raise OptionError(str(exc)) from None
        setattr(namespace, self.dest, values)


def csv_list(text: str) -> tuple[str, ...]:
    """The items of a comma-separated flag value, spaces around them dropped, empty ones skipped."""
    return tuple(part.strip() for part in text.split(",") if part.strip())


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples, still exactly the target's distribution")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus filter in (0, 1]; 1 disables (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables (default)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")


def add_model_flags(p: argparse.ArgumentParser, tree_default: str = "auto") -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"registered name (see `specflash models`), local folder or hub id (default {DEFAULT_TARGET})")
    g.add_argument("--draft", default=None,
                   help="default (the drafter shipped for the target; the default when one exists), none (plain "
                        "decoding; the default otherwise), random (randomly initialised drafter: a testing aid), "
                        "ngram (prompt lookup), or a DFlash drafter folder / hub id")
    g.add_argument("--block-size", type=block_size_arg, default="auto",
                   help="tokens verified per step (anchor + drafts): auto (default: the cost model and the running "
                        "acceptance pick 0..B-1 drafts each step, B = the drafter's block_size; costs are measured "
                        "once per model and machine and cached) or a fixed integer from 1 (plain decoding) to B")
    add_tree_flag(g, tree_default)
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    add_static_steps_flag(g)


def add_tree_flag(group, default: str = "auto") -> None:
    group.add_argument("--tree", type=tree_arg, default=parse_tree(default),
                       help="verify a draft tree each step instead of one block: the drafter's top candidates at "
                            "every depth plus the prompt-lookup continuation, best-first, in one target forward. "
                            "auto (the cost model and calibrated acceptance pick the drafter call and 0..32 drafts "
                            "each step; linear blocks when --block-size is a fixed number), a fixed node budget N, "
                            f"or off (linear blocks, --block-size). Default: {default}")


def tree_arg(value: str) -> int | str | None:
    """argparse type of --tree: 'auto', 'off' (None) or a node budget >= 1 (`parse_tree`)."""
    try:
        return parse_tree(value)
    except InputError as exc:
        raise OptionError(str(exc)) from None


def add_static_steps_flag(group) -> None:
    group.add_argument("--static-steps", choices=("auto", "on", "off"), default="auto",
                       help="fixed-shape target and drafter steps on a static KV cache, replayed as CUDA graphs: "
                            "auto (default: on for --device cuda with a Llama / Qwen target, off on CPU), on, off")


def block_size_arg(value: str) -> int | str:
    """argparse type of --block-size: 'auto' or an integer >= 1 (`parse_block_size`; the cap
    at the drafter's own block is checked once the drafter is loaded)."""
    try:
        return parse_block_size(value)
    except InputError as exc:
        raise OptionError(str(exc)) from None


def resolve_draft_flag(args: argparse.Namespace, otherwise: str = "none") -> str:
    """Fill in an omitted --draft: the shipped drafter for the target, else `otherwise`.
    What the value then means is read in one place: `runtime.loading.resolve_draft`."""
    if args.draft is None:
        from ..runtime.loading import default_draft

        args.draft = default_draft(args.target, otherwise)
    return args.draft
