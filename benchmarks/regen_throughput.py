"""Regeneration throughput: response tokens/s of `train data`'s batched generation under
several settings, side by side on the same prompts, against this machine's ceiling.

    python benchmarks/regen_throughput.py --prompts humaneval,stdlib-functions --num-prompts 64 \
        --settings float32:16,bfloat16:16,bfloat16:64 --max-new-tokens 128

Each setting (dtype:batch size) answers the same prompts (sorted by length into batches, as
`train data` does) with greedy decoding. The ceiling is what the target's matrix products
allow: FLOPs per generated token (2 x the parameters each token passes through, LM head
included, plus attention over the average context) against the GFLOP/s this machine
measures on products of the target's own shapes at that batch size and dtype. Settings run
in turn, so read them as ratios within one run. The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch


def matmul_gflops(hidden: int, inner: int, rows: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Measured GFLOP/s of [rows, hidden] @ [hidden, inner] products (an MLP-shaped layer)."""
    a = torch.randn(rows, hidden, dtype=dtype)
    b = torch.randn(hidden, inner, dtype=dtype)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * rows * hidden * inner * n / (time.perf_counter() - start) / 1e9


def flops_per_token(model, context: float) -> float:
    """2 x the parameters a generated token passes through (embeddings are a lookup; the LM
    head is a product) plus attention scores and values over `context` tokens."""
    config = model.config
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if getattr(config, "tie_word_embeddings", False):
        params += model.get_input_embeddings().weight.numel()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    heads_dim = config.num_attention_heads * head_dim
    return 2 * params + 4 * config.num_hidden_layers * heads_dim * context


def main() -> None:
    from specflash.hf.target import TargetModel
    from specflash.train.prompts import load_training_prompts
    from specflash.train.regenerate import RegenConfig, encode_record, generate_batch

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", default="humaneval,stdlib-functions", help="training prompt sets")
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--settings", default="float32:16,bfloat16:16,bfloat16:64",
                        help="comma-separated dtype:batch-size pairs, run in this order")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    records = load_training_prompts(args.prompts.split(","), limit=args.num_prompts)
    results = []
    for setting in args.settings.split(","):
        dtype_name, batch = setting.split(":")
        dtype = getattr(torch, dtype_name)
        target = TargetModel.from_pretrained(args.target, dtype=dtype)
        prompts = sorted((encode_record(target, r) for r in records), key=len)
        config = RegenConfig(max_new_tokens=args.max_new_tokens, batch_size=int(batch))
        tokens, context_sum, start = 0, 0.0, time.perf_counter()
        for i in range(0, len(prompts), int(batch)):
            chunk = prompts[i:i + int(batch)]
            for prompt, (response, _, _, _, _) in zip(chunk, generate_batch(target, chunk, config)):
                tokens += len(response)
                context_sum += len(response) * (len(prompt) + len(response) / 2)
        seconds = time.perf_counter() - start
        model = target.model
        cfg = model.config
        rate = matmul_gflops(cfg.hidden_size, cfg.intermediate_size, min(int(batch), 128), dtype)
        ceiling = rate * 1e9 / flops_per_token(model, context_sum / max(tokens, 1))
        results.append({"dtype": dtype_name, "batch_size": int(batch), "response_tokens": tokens,
                        "seconds": round(seconds, 1), "tokens_per_s": round(tokens / seconds, 1),
                        "matmul_gflops": round(rate, 1), "ceiling_tokens_per_s": round(ceiling, 1),
                        "fraction_of_ceiling": round(tokens / seconds / ceiling, 3)})
        print(f"{setting:>14}: {tokens / seconds:7.1f} response tok/s ({tokens} tokens, {seconds:.0f} s); ceiling "
              f"{ceiling:7.1f} tok/s at {rate:.0f} GFLOP/s -> {tokens / seconds / ceiling:.0%}", flush=True)
        del target
    base = results[0]["tokens_per_s"]
    for r in results:
        r["speedup_vs_first"] = round(r["tokens_per_s"] / base, 2)
    print(json.dumps({"machine": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                      "target": args.target, "num_prompts": len(records), "max_new_tokens": args.max_new_tokens,
                      "results": results}))


if __name__ == "__main__":
    main()
