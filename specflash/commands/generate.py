"""`specflash generate`: one prompt, streamed text or one JSON object."""

from __future__ import annotations

import argparse
import json
import sys

from .common import add_model_flags, add_sampling_flags, resolve_draft_flag


def register(sub) -> None:
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
    add_model_flags(gen)
    add_sampling_flags(gen)
    gen.set_defaults(handler=run)


def block_label(pipe) -> str:
    if pipe.proposer is None:
        return "plain decoding"
    if pipe.block_policy.startswith("tree"):
        return "draft tree " + ("auto" if pipe.block_policy == "tree-auto" else f"of {pipe.decoder.policy.budget}")
    return f"block {pipe.block_size}" + (" auto" if pipe.block_policy == "auto" else "")


def run(args: argparse.Namespace) -> int:
    from ..runtime.config import DecodeConfig
    from ..errors import InputError
    from ..runtime.pipeline import Pipeline

    resolve_draft_flag(args)
    if not args.prompt.strip():
        raise InputError("the prompt is empty; pass some text with --prompt")
    config = DecodeConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed)
    pipe = Pipeline.load(args.target, draft=args.draft, device=args.device, dtype=args.dtype,
                         block_size=args.block_size, seed=args.seed, log=lambda m: print(m, file=sys.stderr),
                         static_steps=args.static_steps, tree=args.tree)
    prompt = [{"role": "system", "content": args.system}, {"role": "user", "content": args.prompt}] \
        if args.system and args.chat else args.prompt
    if args.json:
        result = pipe.generate(prompt, config, chat=args.chat)
        payload = {"target": args.target, "draft": args.draft, "block_size": pipe.block_size,
                   "block_policy": pipe.block_policy}
        payload.update(result.to_dict())
        print(json.dumps(payload))
        return 0
    from ..runtime.metrics import SpecStats

    stats = SpecStats()
    for delta in pipe.stream(prompt, config, chat=args.chat, stats=stats):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    tau = f"{stats.tau:.2f}" if stats.tau is not None else "-"
    rate = f"{stats.tokens_per_s:.1f}" if stats.tokens_per_s else "-"
    print(f"[{stats.num_new_tokens} tokens, tau {tau}, {rate} tokens/s decode, "
          f"first token {stats.time_to_first_token_s * 1000:.0f} ms, {block_label(pipe)}]", file=sys.stderr)
    return 0
