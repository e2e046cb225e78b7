"""Do batched steps change any greedy token? Each prompt decoded alone (`SpeculativeDecoder`,
what `serve --exact` runs), alone in the batched decoder (one row per forward: what the
batched server gives a request sent alone), and all together in the batched decoder
(`--slots` at a time, as the server batches them), at temperature 0; every output compared
with the solo one, and together with alone.

    python benchmarks/batch_exactness.py --target smollm2-135m-instruct --draft default --max-new-tokens 64

Prompts: the bench's eval prompts (`--humaneval` HumanEval and `--sharegpt` ShareGPT ones,
in the bench's fixed order) and the load test's 16 prompts. For every output that differs
from the solo one: the first differing position and the solo forward's top-2 logit margin
there (how close the target's choice was). The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))  # the repository, when not installed

from serve_load import PROMPTS  # noqa: E402


def eval_prompts(humaneval: int, sharegpt: int) -> list[str]:
    from specflash.bench.datasets import load_prompts, select

    out = []
    for name, n in (("humaneval", humaneval), ("sharegpt", sharegpt)):
        if n:
            out += [p.text for p in select(load_prompts(name, split="eval"), 0)[:n]]
    return out


def margin_at(target, ids: list[int], position: int) -> float:
    """Top-2 logit gap of a plain forward over the prompt + output up to `position`."""
    with torch.inference_mode():
        logits = target.forward(torch.tensor([ids], device=target.device), target.new_cache()).logits[0, -1]
    top = torch.topk(logits.float(), 2).values
    return float(top[0] - top[1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--draft", default="default")
    p.add_argument("--block-size", default="auto")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--humaneval", type=int, default=8)
    p.add_argument("--sharegpt", type=int, default=8)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--no-alone", dest="alone", action="store_false", help="skip the batched-alone pass")
    p.add_argument("--no-row-invariant", dest="row_invariant", action="store_false",
                   help="batched forwards without row invariance (BatchDecoder(row_invariant=False))")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from specflash.runtime.batchdecode import BatchDecoder
    from specflash.runtime.batchpolicy import LoadAwarePolicy
    from specflash.runtime.blockpolicy import AutoBlock
    from specflash.runtime.config import DecodeConfig
    from specflash.runtime.pipeline import Pipeline

    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    pipe = Pipeline.load(args.target, draft=args.draft, block_size=args.block_size, log=log, tree="off")
    base = pipe.decoder
    texts = eval_prompts(args.humaneval, args.sharegpt) + PROMPTS
    prompts = [pipe.encode([{"role": "user", "content": t}]) for t in texts]
    config = DecodeConfig(max_new_tokens=args.max_new_tokens)

    def batch_policy():
        if base.proposer is None or not isinstance(base.policy, AutoBlock):
            return None
        from specflash.perf.measure import load_or_measure_batch

        invariant = args.row_invariant and base.target.enable_row_invariance()
        costs = load_or_measure_batch(base.target, base.proposer, max_rows=args.slots, max_tokens=base.block_size,
                                      log=log, row_invariant=invariant)
        return LoadAwarePolicy(costs, base.policy.costs, base.policy.max_drafts)

    t0 = time.perf_counter()
    solo = [base.generate(ids, config).token_ids for ids in prompts]
    t_solo = time.perf_counter() - t0
    runs = {}
    if args.alone:
        t0 = time.perf_counter()
        decoder = BatchDecoder(base.target, base.proposer, base.block_size, base.policy, batch_policy(), max_slots=1,
                               row_invariant=args.row_invariant)
        runs["batched_alone"] = ([r.token_ids for r in decoder.generate_all(prompts, config)],
                                 time.perf_counter() - t0)
    t0 = time.perf_counter()
    decoder = BatchDecoder(base.target, base.proposer, base.block_size, base.policy, batch_policy(),
                           max_slots=args.slots, row_invariant=args.row_invariant)
    runs["batched_together"] = ([r.token_ids for r in decoder.generate_all(prompts, config)],
                                time.perf_counter() - t0)
    report = {"target": args.target, "draft": args.draft, "block_size": args.block_size,
              "row_invariant": args.row_invariant and base.target.row_invariant,
              "max_new_tokens": args.max_new_tokens, "slots": args.slots, "prompts": len(prompts),
              "solo_tokens": sum(len(t) for t in solo), "solo_s": round(t_solo, 1)}
    for name, (outputs, seconds) in runs.items():
        flips = []
        for i, (a, b) in enumerate(zip(outputs, solo)):
            if a != b:
                at = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                flips.append({"prompt": i, "text": texts[i][:60], "position": at,
                              "solo_margin": round(margin_at(base.target, prompts[i] + b[:at], at), 6)})
        report[name] = {"differing": len(flips), "seconds": round(seconds, 1), "flips": flips}
        print(f"{name}: {len(flips)} of {len(prompts)} outputs differ from solo ({seconds:.0f} s; solo {t_solo:.0f} s)",
              file=sys.stderr)
        for flip in flips:
            print(f"  prompt {flip['prompt']} ({flip['text']!r}): first difference at token {flip['position']}, "
                  f"top-2 margin {flip['solo_margin']:.2e}", file=sys.stderr)
    if "batched_alone" in runs:
        alone, together = runs["batched_alone"][0], runs["batched_together"][0]
        report["together_vs_alone_differing"] = sum(1 for a, b in zip(alone, together) if a != b)
        print(f"batched together vs batched alone: {report['together_vs_alone_differing']} of {len(prompts)} differ",
              file=sys.stderr)
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
