"""Flags shared by several commands."""

from __future__ import annotations

import argparse

from ..models import DEFAULT_TARGET


def add_sampling_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--temperature", type=float, default=0.0,
                   help="0 = greedy (default); > 0 samples, still exactly the target's distribution")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus filter in (0, 1]; 1 disables (default)")
    g.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 disables (default)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"registered name (see `specflash models`), local folder or hub id (default {DEFAULT_TARGET})")
    g.add_argument("--draft", default=None,
                   help="default (the drafter shipped for the target; the default when one exists), none (plain "
                        "decoding; the default otherwise), random (randomly initialised drafter: a testing aid), "
                        "ngram (prompt lookup), or a DFlash drafter folder / hub id")
    g.add_argument("--block-size", type=int, default=None,
                   help="tokens verified per step (anchor + drafts); default: the drafter's block_size "
                        "(16 for random, 8 for ngram); 1 = plain decoding")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    g.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")


def resolve_draft_flag(args: argparse.Namespace) -> str:
    """Fill in an omitted --draft: the shipped drafter for the target, else none."""
    if args.draft is None:
        from ..loading import default_draft

        args.draft = default_draft(args.target)
    return args.draft
