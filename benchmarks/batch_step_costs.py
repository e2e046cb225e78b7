"""Cost of one batched target forward (`TargetModel.forward_batch`) of B rows against B solo
forwards, each sequence ~256 tokens into its context: rows of 1 token (plain decoding
steps) and of 8 tokens (an anchor and 7 drafts).

    python benchmarks/batch_step_costs.py --target smollm2-135m-instruct --threads 2

Per (B, n): the median over `--repeats` of the wall time of one `forward_batch` of B rows
of n tokens over a SlotKVCache, and of B `forward` calls of n tokens, one per sequence,
each on its own DynamicCache (what today's server does per step). The two are timed
interleaved, repeat by repeat; after every call each cache is cropped back, so every
repeat sees the same context length. Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=256, help="cached tokens per sequence")
    parser.add_argument("--batches", default="1,2,4,8,16")
    parser.add_argument("--tokens", default="1,8", help="tokens per row")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--row-invariant", action="store_true",
                        help="time the batched forward with row invariance on (TargetModel.enable_row_invariance)")
    args = parser.parse_args()

    from specflash.hf.batchstep import BatchRow
    from specflash.hf.target import TargetModel

    torch.set_num_threads(args.threads)
    target = TargetModel.from_pretrained(args.target, dtype=torch.float32)
    target.set_taps((1, target.num_layers // 2, target.num_layers - 2))  # a drafter's taps: features cost too
    if args.row_invariant and not target.enable_row_invariance():
        raise SystemExit("row invariance is not available for this target on this machine")
    batches = [int(b) for b in args.batches.split(",")]
    widths = [int(n) for n in args.tokens.split(",")]
    generator = torch.Generator().manual_seed(0)
    context = torch.randint(0, target.vocab_rows, (args.context,), generator=generator)

    with torch.inference_mode():
        prefilled = target.new_cache()
        target.forward(context[None], prefilled)
    rows_out = []
    print(f"{target.name}, fp32, {args.threads} threads, {args.context} cached tokens per sequence, "
          f"forward path {target.forward_path}, row-invariant {target.row_invariant}, median of {args.repeats}")
    print(f"{'B':>3} {'n':>3} {'batched ms':>11} {'B solo ms':>10} {'solo/batched':>13} {'batched ms/row':>15}")
    for b in batches:
        # Every sequence holds the same context (the cost does not depend on which tokens).
        slots = target.new_slot_cache(max_slots=b, capacity=args.context + max(widths))
        for _ in range(b):
            slot = slots.acquire()
            for layer, source in enumerate(prefilled.layers):
                slots.keys[layer][slot, :, : args.context] = source.keys[0]
                slots.values[layer][slot, :, : args.context] = source.values[0]
            slots.advance(slot, args.context)
        solos = [copy.deepcopy(prefilled) for _ in range(b)]
        for n in widths:
            blocks = [torch.randint(0, target.vocab_rows, (n,), generator=generator) for _ in range(b)]
            batched_times, solo_times = [], []
            for repeat in range(args.repeats + 1):  # the first round warms up
                start = time.perf_counter()
                target.forward_batch(slots, [BatchRow(s, block) for s, block in enumerate(blocks)], args.row_invariant)
                batched = time.perf_counter() - start
                for s in range(b):
                    slots.crop(s, args.context)
                start = time.perf_counter()
                for cache, block in zip(solos, blocks):
                    target.forward(block[None], cache)
                solo = time.perf_counter() - start
                for cache in solos:
                    target.crop_cache(cache, args.context)
                if repeat:
                    batched_times.append(batched)
                    solo_times.append(solo)
            batched_ms = 1000 * statistics.median(batched_times)
            solo_ms = 1000 * statistics.median(solo_times)
            rows_out.append({"batch": b, "tokens_per_row": n, "batched_ms": round(batched_ms, 2),
                             "solo_ms": round(solo_ms, 2), "solo_over_batched": round(solo_ms / batched_ms, 2)})
            print(f"{b:>3} {n:>3} {batched_ms:>11.1f} {solo_ms:>10.1f} {solo_ms / batched_ms:>13.2f} "
                  f"{batched_ms / b:>15.1f}", flush=True)
    print(json.dumps({"target": target.name, "threads": args.threads, "context": args.context,
                      "row_invariant": target.row_invariant,
                      "machine": platform.processor() or platform.machine(), "rows": rows_out}))


if __name__ == "__main__":
    main()
