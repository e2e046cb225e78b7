"""Load test of `specflash serve` on this machine: N concurrent clients, M requests,
loopback only, every bound explicit.

    # against a running server
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --clients 8 --requests 64
    # start one (and stop it afterwards)
    python benchmarks/serve_load.py --spawn --target smollm2-135m-instruct --draft none --clients 8 --requests 64
    # the sweep: 1, 2, 4, 8, 16 clients; speculation on (--draft default) and off; batched and --exact
    python benchmarks/serve_load.py --sweep 1,2,4,8,16 --target smollm2-135m-instruct \
        --out docs/bench/serve-load-sweep

One run: phase 1 sends each distinct prompt alone, one at a time (temperature 0): its
solo output. Phase 2 runs `--clients` concurrent streaming clients over `--requests`
requests (prompt i % P) and compares every answer with its prompt's solo output.
Reported: requests/s and tokens/s over phase 2's wall time, latency (request sent to
`[DONE]`) and time to first token percentiles, errors and mismatched outputs. The last
stdout line is one JSON document; the exit status is 1 when any request failed or
differed from its solo output.

The sweep (`--sweep`) starts one server per (draft, stepping) pair (`--drafts`, `--modes`:
`batched` is the default server, `exact` adds `--exact`, `batched-plain` turns row
invariance off). Its first point is one client
sending each of the `--requests` prompts once, one after another: the sequential baseline
and every prompt's solo output on that server; each later point sends the same requests
from N clients at once and compares every answer with that solo output. Every server's
solo outputs are also compared with those of the first server of the sweep (by default
`--exact --draft none`: the target's own greedy tokens). Writes PREFIX.json and a plot,
PREFIX.png (tokens/s and latency against clients), and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

LOOPBACK = ("127.0.0.1", "localhost", "::1")
PROMPTS = [
    "Write a haiku about the sea.",
    "Explain in two sentences why the sky is blue.",
    "List three uses of a paperclip.",
    "What is the capital of France? Answer in one word, then explain.",
    "Write a Python function that returns the square of a number.",
    "Give me a short recipe for pancakes.",
    "Translate 'good morning' into Spanish, French and German.",
    "Describe a cat to someone who has never seen one.",
    "What are the three states of matter?",
    "Write the opening line of a mystery novel.",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "Why do we need sleep?",
    "Count from one to ten in words.",
    "Suggest a name for a friendly robot and explain it.",
    "What is 17 times 23? Show your work.",
    "Write a limerick about a programmer.",
]


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between the closest ranks (q in [0, 1])."""
    if not values:
        return None
    xs = sorted(values)
    pos = q * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def body(prompt: str, args, stream: bool) -> dict:
    out = {"model": args.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": args.max_tokens,
           "temperature": 0, "stream": stream}
    if stream:
        out["stream_options"] = {"include_usage": True}
    if out["model"] is None:
        del out["model"]
    return out


async def solo(client: httpx.AsyncClient, prompt: str, args) -> str:
    r = await client.post("/v1/chat/completions", json=body(prompt, args, stream=False))
    r.raise_for_status()
    return r.json()["choices"][0]["message"]["content"]


async def one_streaming(client: httpx.AsyncClient, prompt: str, args) -> dict:
    t0 = time.perf_counter()
    ttft = None
    parts: list[str] = []
    tokens = 0
    tau = None
    async with client.stream("POST", "/v1/chat/completions", json=body(prompt, args, stream=True)) as r:
        if r.status_code != 200:
            await r.aread()
            raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    parts.append(text)
            if chunk.get("speculative"):
                tau = chunk["speculative"].get("mean_tau")
    return {"text": "".join(parts), "latency": time.perf_counter() - t0, "ttft": ttft, "tokens": tokens,
            "tau": tau}


async def one_blocking(client: httpx.AsyncClient, prompt: str, args) -> dict:
    t0 = time.perf_counter()
    r = await client.post("/v1/chat/completions", json=body(prompt, args, stream=False))
    if r.status_code != 200:
        raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
    data = r.json()
    latency = time.perf_counter() - t0
    return {"text": data["choices"][0]["message"]["content"], "latency": latency, "ttft": None,
            "tokens": data["usage"]["completion_tokens"], "tau": data.get("speculative", {}).get("mean_tau")}


async def run_load(args) -> dict:
    limits = httpx.Limits(max_connections=args.clients + 2, max_keepalive_connections=args.clients + 2)
    timeout = httpx.Timeout(args.timeout)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    prompts = PROMPTS[: min(len(PROMPTS), args.requests)]
    async with httpx.AsyncClient(base_url=args.url, timeout=timeout, limits=limits, headers=headers) as client:
        info = (await client.get("/v1/models")).json()["data"][0]
        reference: dict[str, str] = {}
        if args.check:
            for prompt in prompts:  # one at a time: each prompt's solo output
                reference[prompt] = await solo(client, prompt, args)
        results: list[dict] = []
        errors: list[str] = []
        next_index = 0
        deadline = time.perf_counter() + args.deadline

        async def worker() -> None:
            nonlocal next_index
            while next_index < args.requests and time.perf_counter() < deadline:
                i = next_index
                next_index += 1
                prompt = prompts[i % len(prompts)]
                try:
                    res = await (one_streaming if args.stream else one_blocking)(client, prompt, args)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}")
                    continue
                res["match"] = (reference[prompt] == res["text"]) if args.check else None
                results.append(res)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.clients)))
        wall = time.perf_counter() - t0
    latencies = [r["latency"] for r in results]
    ttfts = [r["ttft"] for r in results if r["ttft"] is not None]
    taus = [r["tau"] for r in results if r["tau"] is not None]
    tokens = sum(r["tokens"] for r in results)
    return {
        "url": args.url, "model": info.get("id"), "draft": info.get("draft"), "block_size": info.get("block_size"),
        "clients": args.clients, "requests": args.requests, "completed": len(results), "errors": len(errors),
        "mismatches": sum(1 for r in results if r["match"] is False), "checked": args.check,
        "stream": args.stream, "max_tokens": args.max_tokens, "wall_s": wall,
        "requests_per_s": len(results) / wall if wall else None,
        "tokens_per_s": tokens / wall if wall else None, "completion_tokens": tokens,
        "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
        "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
        "mean_tau": sum(taus) / len(taus) if taus else None, "error_samples": errors[:5],
    }


async def run_phase(url: str, prompts: list[str], clients: int, args) -> dict:
    """`clients` concurrent streaming clients over `prompts` (one request each, in order)."""
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    results: list[dict | None] = [None] * len(prompts)
    errors: list[str] = []
    next_index = 0
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(args.timeout), limits=limits) as client:
        async def worker() -> None:
            nonlocal next_index
            while next_index < len(prompts):
                i = next_index
                next_index += 1
                try:
                    results[i] = await one_streaming(client, prompts[i], args)
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    errors.append(f"request {i}: {type(exc).__name__}: {exc}")

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - t0
    done = [r for r in results if r is not None]
    tokens = sum(r["tokens"] for r in done)
    latencies = [r["latency"] for r in done]
    ttfts = [r["ttft"] for r in done if r["ttft"] is not None]
    taus = [r["tau"] for r in done if r["tau"] is not None]
    return {"clients": clients, "requests": len(prompts), "completed": len(done), "errors": len(errors),
            "wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall, "requests_per_s": len(done) / wall,
            "latency_p50_s": percentile(latencies, 0.5), "latency_p99_s": percentile(latencies, 0.99),
            "ttft_p50_s": percentile(ttfts, 0.5), "ttft_p99_s": percentile(ttfts, 0.99),
            "mean_tau": sum(taus) / len(taus) if taus else None, "error_samples": errors[:3],
            "texts": [r["text"] if r is not None else None for r in results]}


MODES = ("exact", "batched", "batched-plain")  # --exact; the default; batched without row invariance


def sweep(args) -> dict:
    """Every (draft, mode) server over every client count (module docstring)."""
    counts = [int(c) for c in args.sweep.split(",")]
    if not counts or counts[0] != 1 or any(not 1 <= c <= 64 for c in counts):
        raise SystemExit("--sweep lists client counts from 1 (the sequential baseline), each 1..64")
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.requests)]
    servers, first_solo = [], None
    for draft in args.drafts.split(","):
        for mode in args.modes.split(","):
            args.draft = draft
            if mode not in MODES:
                raise SystemExit(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
            extra = ["--exact"] if mode == "exact" else []
            proc, url = spawn_server(args, extra, {"SPECFLASH_ROW_INVARIANT": "0"} if mode == "batched-plain" else None)
            try:
                print(f"{draft} / {mode}: server up at {url}", file=sys.stderr, flush=True)
                points = []
                for clients in counts:
                    point = asyncio.run(run_phase(url, prompts, clients, args))
                    points.append(point)
                    solo = points[0]["texts"]
                    point["mismatches"] = sum(1 for a, b in zip(point["texts"], solo) if a is not None and a != b)
                    print(f"  {clients:>2} clients: {point['tokens_per_s']:.1f} tokens/s, "
                          f"{point['requests_per_s']:.3f} requests/s, latency p50 {point['latency_p50_s']:.2f} s, "
                          f"{point['errors']} errors, {point['mismatches']} mismatches", file=sys.stderr, flush=True)
            finally:
                stop_server(proc)
            solo = points[0]["texts"]
            if first_solo is None:
                first_solo = solo
            base = points[0]["tokens_per_s"]
            for point in points:
                point["speedup_over_sequential"] = point["tokens_per_s"] / base if base else None
            servers.append({"draft": draft, "mode": mode, "solo_differs_from_first_server":
                            sum(1 for a, b in zip(solo, first_solo) if a != b), "points": points})
    for server in servers:
        for point in server["points"]:
            point.pop("texts")
    return {"target": args.target, "max_tokens": args.max_tokens, "requests": args.requests,
            "max_concurrency": args.max_concurrency, "clients": counts, "servers": servers,
            "machine": machine_line()}


def machine_line() -> str:
    import platform

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f} at the end"


def sweep_table(report: dict) -> str:
    """The sweep as a Markdown table."""
    out = ["| `--draft` | stepping | clients | tokens/s | x sequential | requests/s | TTFT p50 / p99 | "
           "latency p50 / p99 | tau | errors | mismatches |", "|---|---|---:|---:|---:|---:|---|---|---:|---:|---:|"]
    for server in report["servers"]:
        for p in server["points"]:
            tau = "-" if p["mean_tau"] is None else f"{p['mean_tau']:.2f}"
            out.append(f"| {server['draft']} | {server['mode']} | {p['clients']} | {p['tokens_per_s']:.1f} | "
                       f"{p['speedup_over_sequential']:.2f}x | {p['requests_per_s']:.3f} | "
                       f"{p['ttft_p50_s']:.2f} / {p['ttft_p99_s']:.2f} s | "
                       f"{p['latency_p50_s']:.1f} / {p['latency_p99_s']:.1f} s | {tau} | {p['errors']} | "
                       f"{p['mismatches']} |")
    return "\n".join(out)


def plot_sweep(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for server in report["servers"]:
        label = f"--draft {server['draft']}, {server['mode']}"
        style = {"batched": "-", "exact": "--"}.get(server["mode"], ":")
        xs = [p["clients"] for p in server["points"]]
        left.plot(xs, [p["tokens_per_s"] for p in server["points"]], style, marker="o", label=label)
        right.plot(xs, [p["latency_p50_s"] for p in server["points"]], style, marker="o", label=label + " p50")
    for ax, title in ((left, "total tokens/s"), (right, "request latency p50 (s)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(report["clients"], [str(c) for c in report["clients"]])
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.suptitle(f"specflash serve, {report['target']}, {report['max_tokens']} tokens per request, temperature 0",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_server(proc: subprocess.Popen | None) -> None:
    """Stop a spawned server: SIGTERM, then SIGKILL if it has not exited within 30 s."""
    if proc is None:
        return
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


def spawn_server(args, extra: list[str] = (), env_extra: dict | None = None) -> tuple[subprocess.Popen, str]:
    """`specflash serve` of args.target / draft / block_size / max_concurrency (+ `extra`
    flags, `env_extra` environment) on a free loopback port -> (process, url) once /health
    answers."""
    port = free_port()
    cmd = [sys.executable, "-m", "specflash.cli", "serve", "--target", args.target, "--draft", args.draft,
           "--host", "127.0.0.1", "--port", str(port), "--max-concurrency", str(args.max_concurrency),
           "--log-level", "warning", *extra]
    if args.block_size is not None:
        cmd += ["--block-size", str(args.block_size)]
    env = dict(os.environ, **(env_extra or {}))
    env.pop("SPECFLASH_API_KEY", None)
    proc = subprocess.Popen(cmd, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}: {' '.join(cmd)}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    proc.terminate()
    raise SystemExit(f"the server did not answer /health within {args.startup_timeout} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default=None, help="a running server (loopback only), e.g. http://127.0.0.1:8000")
    p.add_argument("--spawn", action="store_true", help="start `specflash serve` on a free loopback port")
    p.add_argument("--target", default="smollm2-135m-instruct", help="with --spawn: the target")
    p.add_argument("--draft", default="none", help="with --spawn: the drafter (none, random, ngram, folder)")
    p.add_argument("--block-size", type=int, default=None, help="with --spawn: block size")
    p.add_argument("--max-concurrency", type=int, default=8, help="with --spawn: server slots (default 8)")
    p.add_argument("--model", default=None, help="model id to send (default: none, the server's)")
    p.add_argument("--api-key", default=os.environ.get("SPECFLASH_API_KEY"),
                   help="bearer token, if the server needs one")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients, 1..256 (default 8)")
    p.add_argument("--requests", type=int, default=64, help="requests in the timed phase, 1..10000 (default 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="max_tokens per request, 1..4096 (default 64)")
    p.add_argument("--no-stream", dest="stream", action="store_false", help="non-streaming requests")
    p.add_argument("--no-check", dest="check", action="store_false", help="skip the solo-output comparison")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per request (default 300)")
    p.add_argument("--deadline", type=float, default=1800.0,
                   help="seconds after which no new request starts (default 1800)")
    p.add_argument("--startup-timeout", type=float, default=300.0, help="with --spawn: seconds to wait for /health")
    p.add_argument("--sweep", default=None, metavar="1,2,4,8,16",
                   help="sweep these client counts (the first must be 1) over spawned servers; see the docstring")
    p.add_argument("--drafts", default="none,default",
                   help="with --sweep: --draft of each server (default none,default)")
    p.add_argument("--modes", default="exact,batched",
                   help="with --sweep: stepping of each server: exact (--exact), batched (the default), "
                        "batched-plain (batched without row invariance, SPECFLASH_ROW_INVARIANT=0)")
    p.add_argument("--out", default=None, help="with --sweep: write PREFIX.json and PREFIX.png")
    args = p.parse_args(argv)
    if args.sweep is not None:
        if args.url is not None or not 1 <= args.requests <= 256 or not 1 <= args.max_tokens <= 4096:
            p.error("--sweep spawns its servers (no --url); --requests 1..256, --max-tokens 1..4096")
        report = sweep(args)
        table = sweep_table(report)
        print(table)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out + ".json").write_text(json.dumps(report, indent=1) + "\n")
            plot_sweep(report, args.out + ".png")
        print(json.dumps(report))
        bad = sum(p["errors"] + p["mismatches"] for server in report["servers"] for p in server["points"])
        return 0 if bad == 0 else 1
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 10000 or not 1 <= args.max_tokens <= 4096:
        p.error("--clients must be 1..256, --requests 1..10000, --max-tokens 1..4096")
    if args.spawn == (args.url is not None):
        p.error("give exactly one of --url and --spawn")
    proc = None
    if args.spawn:
        proc, args.url = spawn_server(args)
    host = urlparse(args.url).hostname
    if host not in LOOPBACK:
        p.error(f"{args.url} is not a loopback address; this load test only runs against this machine")
    try:
        report = asyncio.run(run_load(args))
    finally:
        stop_server(proc)
    fmt = lambda v, unit="": "-" if v is None else f"{v:.3f}{unit}"  # noqa: E731
    print(f"{report['model']} (draft {report['draft']}, block {report['block_size']}): {report['clients']} clients, "
          f"{report['completed']}/{report['requests']} requests, {report['errors']} errors, "
          f"{report['mismatches']} mismatches{'' if report['checked'] else ' (not checked)'}")
    print(f"  requests/s {fmt(report['requests_per_s'])}   tokens/s {fmt(report['tokens_per_s'])}   "
          f"latency p50 {fmt(report['latency_p50_s'], ' s')} p99 {fmt(report['latency_p99_s'], ' s')}   "
          f"TTFT p50 {fmt(report['ttft_p50_s'], ' s')} p99 {fmt(report['ttft_p99_s'], ' s')}   "
          f"tau {fmt(report['mean_tau'])}")
    for sample in report["error_samples"]:
        print(f"  error: {sample}")
    print(json.dumps(report))
    return 0 if report["errors"] == 0 and report["mismatches"] == 0 and report["completed"] == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())
