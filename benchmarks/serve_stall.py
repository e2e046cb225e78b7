"""Does a long prompt stall the other streams? One client streams a long answer; while it
streams, a second client sends a prompt of about `--long-tokens` tokens. Reported: the
streaming client's longest gap between two text chunks before the long prompt arrived,
while it was prefilled (until its first token) and overall, and the long request's time
to first token. Loopback only, bounded.

    python benchmarks/serve_stall.py --spawn --target smollm2-135m-instruct --draft default          # batched
    python benchmarks/serve_stall.py --spawn --target smollm2-135m-instruct --draft default --exact  # one at a time

The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlparse

import httpx

from serve_load import LOOPBACK, spawn_server, stop_server

WORDS = ("river stone lantern harbor meadow copper violet thunder orchard signal canyon ember "
         "glacier pepper saddle quartz willow beacon falcon marble cedar tundra velvet anchor").split()


def long_text(words: int) -> str:
    """Deterministic filler text of `words` words (about 1.3 tokens per word for BPE tokenizers)."""
    out, state = [], 7
    for i in range(words):
        state = (state * 1103515245 + 12345) % (1 << 31)
        out.append(WORDS[state % len(WORDS)] + ("." if i % 13 == 12 else ""))
    return " ".join(out)


async def stream(client: httpx.AsyncClient, content: str, max_tokens: int, times: list[float]) -> dict:
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, "stream_options": {"include_usage": True}}
    usage = {}
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                times.append(time.perf_counter())
    return usage


def longest_gap(times: list[float], start: float, end: float) -> float | None:
    """Longest interval between consecutive chunk arrivals that overlaps [start, end]."""
    gaps = [b - a for a, b in zip(times, times[1:]) if b >= start and a <= end]
    return max(gaps) if gaps else None


async def run(args) -> dict:
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(args.timeout)) as client:
        info = (await client.get("/v1/models")).json()["data"][0]
        await stream(client, "Say hello.", 4, [])  # warm up
        streaming_times: list[float] = []
        long_times: list[float] = []
        t0 = time.perf_counter()
        streamer = asyncio.ensure_future(stream(client, args.stream_prompt, args.stream_tokens, streaming_times))
        while len(streaming_times) < args.after_chunks and not streamer.done():
            await asyncio.sleep(0.01)
        sent = time.perf_counter()
        long_usage = await stream(client, "Summarize this text in one sentence:\n" + long_text(args.long_words),
                                  args.long_max_tokens, long_times)
        stream_usage = await streamer
    first = long_times[0] if long_times else sent
    before = [t for t in streaming_times if t <= sent]
    return {
        "url": args.url, "model": info.get("id"), "draft": info.get("draft"), "exact": args.exact,
        "long_prompt_tokens": long_usage.get("prompt_tokens"), "streamed_tokens": stream_usage.get("completion_tokens"),
        "gap_before_s": longest_gap(before, t0, sent),
        "gap_during_prefill_s": longest_gap(streaming_times, sent, first),
        "gap_overall_s": longest_gap(streaming_times, t0, float("inf")),
        "long_ttft_s": first - sent, "stream_chunks": len(streaming_times),
        "chunks_during_prefill": sum(1 for t in streaming_times if sent <= t <= first),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (loopback only)")
    p.add_argument("--spawn", action="store_true", help="start `specflash serve` on a free loopback port")
    p.add_argument("--target", default="smollm2-135m-instruct")
    p.add_argument("--draft", default="none")
    p.add_argument("--block-size", default=None)
    p.add_argument("--max-concurrency", type=int, default=8)
    p.add_argument("--exact", action="store_true", help="with --spawn: serve --exact (one request per forward)")
    p.add_argument("--extra", default="", help="with --spawn: more serve flags, space-separated")
    p.add_argument("--stream-prompt", default="Write a long story about a lighthouse keeper and a storm.")
    p.add_argument("--stream-tokens", type=int, default=160, help="max_tokens of the streaming client")
    p.add_argument("--after-chunks", type=int, default=10, help="chunks streamed before the long prompt is sent")
    p.add_argument("--long-words", type=int, default=2300, help="words of the long prompt (~3,000 tokens)")
    p.add_argument("--long-max-tokens", type=int, default=8)
    p.add_argument("--timeout", type=float, default=600.0)
    p.add_argument("--startup-timeout", type=float, default=600.0)
    args = p.parse_args(argv)
    if args.spawn == (args.url is not None):
        p.error("give exactly one of --url and --spawn")
    proc = None
    if args.spawn:
        proc, args.url = spawn_server(args, (["--exact"] if args.exact else []) + args.extra.split())
    if urlparse(args.url).hostname not in LOOPBACK:
        p.error(f"{args.url} is not a loopback address")
    try:
        report = asyncio.run(run(args))
    finally:
        stop_server(proc)
    fmt = lambda v: "-" if v is None else f"{v:.2f} s"  # noqa: E731
    print(f"{report['model']} (draft {report['draft']}{', --exact' if args.exact else ''}): long prompt "
          f"{report['long_prompt_tokens']} tokens, TTFT {fmt(report['long_ttft_s'])}; the streaming client's longest "
          f"gap: before {fmt(report['gap_before_s'])}, during the prefill {fmt(report['gap_during_prefill_s'])} "
          f"({report['chunks_during_prefill']} chunks meanwhile), overall {fmt(report['gap_overall_s'])}")
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
