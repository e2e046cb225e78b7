"""`specflash serve`: the OpenAI-compatible HTTP server (see specflash/serve/)."""

from __future__ import annotations

import argparse
import os
import sys

from .common import AtLeast, add_model_flags, resolve_draft_flag

API_KEY_ENV = "SPECFLASH_API_KEY"


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve the target over an OpenAI-compatible HTTP API",
        description="Serve the target model, speculatively when a drafter is given, over an OpenAI-compatible "
                    "HTTP API: POST /v1/chat/completions and /v1/completions (with streaming), GET /v1/models, "
                    "/health and /metrics (Prometheus). Up to --max-concurrency requests share one target forward per "
                    "step (continuous batching; long prompts are prefilled in chunks between the others' steps); "
                    "--exact steps them one at a time instead, so each gets exactly the tokens it would get alone. "
                    "Draft trees (--tree) always step one at a time.")
    add_model_flags(p, tree_default="off")  # trees step one request at a time; batching pays more under load
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 exposes it, use --api-key)")
    g.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    g.add_argument("--max-concurrency", type=int, action=AtLeast, minimum=1, default=8,
                   help="requests decoded at once, in one batched forward per step (default 8); more wait in a "
                        "queue")
    g.add_argument("--exact", action="store_true",
                   help="step the requests one at a time, each in its own target forward (round-robin): every "
                        "answer is exactly its solo output, whatever float rounding batched shapes bring; lower "
                        "throughput under load, and a long prompt is prefilled in one step")
    g.add_argument("--prefill-chunk", type=int, action=AtLeast, minimum=1, default=128,
                   help="batched: most prompt tokens one request prefills per step, so a long prompt does not "
                        "stall the other streams (default 128: ~0.4 s of prefill per step on a 2-core CPU)")
    g.add_argument("--max-queue", type=int, action=AtLeast, minimum=0, default=256,
                   help="requests that may wait for a slot before new ones get 503 (default 256)")
    g.add_argument("--default-max-tokens", type=int, action=AtLeast, minimum=1, default=512,
                   help="max_tokens of requests that do not set it, capped by the context (default 512)")
    g.add_argument("--served-model-name", default=None,
                   help="the model id clients send and /v1/models lists (default: the --target value)")
    g.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set)")
    g.add_argument("--threads", type=int, action=AtLeast, minimum=1, default=None,
                   help="torch threads of the decoding thread (default: CPU cores - 1, leaving one to the HTTP "
                        "server; on a GPU it hardly matters)")
    g.add_argument("--max-body-mb", type=float, default=4.0,
                   help="largest request body in MB, counted as it arrives (default 4; larger gets 413)")
    g.add_argument("--max-messages", type=int, action=AtLeast, minimum=1, default=4096,
                   help="most messages in one chat request (default 4096)")
    g.add_argument("--max-prompt-chars", type=int, action=AtLeast, minimum=1, default=None,
                   help="most characters in one prompt, checked before tokenizing (default: 16 per token of the "
                        "model's context)")
    g.add_argument("--seed", type=int, default=0, help="seed of the random drafter (--draft random)")
    g.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                   help="server log verbosity (default info)")
    p.set_defaults(handler=run)


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError

    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise InputError("specflash serve needs the serve extra: pip install 'specflash[serve]'") from None
    threads = args.threads if args.threads is not None else max(1, _cpu_count() - 1)
    if not args.max_body_mb > 0:
        raise InputError(f"--max-body-mb must be > 0 (got {args.max_body_mb})")
    if not 0 <= args.port <= 65535:
        raise InputError(f"--port must be in 0..65535 (got {args.port})")
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None

    from ..runtime.pipeline import Pipeline
    from ..serve import ServeSettings, create_app, serve_forever
    from ..serve.runner import LOOPBACK_HOSTS

    resolve_draft_flag(args)  # an omitted --draft: the drafter shipped for the target, else none
    pipe = Pipeline.load(args.target, draft=args.draft, device=args.device, dtype=args.dtype,
                         block_size=args.block_size, seed=args.seed, log=lambda m: print(m, file=sys.stderr),
                         static_steps=args.static_steps, tree=args.tree)
    name = args.served_model_name or args.target
    settings = ServeSettings(model_name=name, draft=args.draft, aliases=(args.target,), api_key=api_key,
                             max_concurrency=args.max_concurrency, max_queue=args.max_queue,
                             default_max_tokens=args.default_max_tokens, torch_threads=threads,
                             max_body_bytes=int(args.max_body_mb * 1024 * 1024), max_messages=args.max_messages,
                             max_prompt_chars=args.max_prompt_chars, exact=args.exact,
                             prefill_chunk=args.prefill_chunk)
    app = create_app(pipe, settings)
    if args.host not in LOOPBACK_HOSTS and not api_key:
        print(f"specflash: warning: serving on {args.host} without an API key; anyone who can reach this "
              f"address can use it (set --api-key or ${API_KEY_ENV})", file=sys.stderr)

    def ready(port: int) -> None:
        host = f"[{args.host}]" if ":" in args.host else args.host
        how = ("draft tree " + pipe.block_policy) if pipe.block_policy.startswith("tree") else \
            f"block {pipe.block_size} {pipe.block_policy}"
        print(f"specflash: serving {name!r} (draft {args.draft}, {how}, context "
              f"{pipe.target.max_context}; {app.state.engine.describe()}) on http://{host}:{port}/v1"
              f"{' (API key required)' if api_key else ''}", file=sys.stderr, flush=True)

    try:
        serve_forever(app, args.host, args.port, log_level=args.log_level, on_ready=ready)
    except OSError as exc:
        raise InputError(f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}") from None
    return 0
