"""`specflash bench` end to end: load the target once, build every method, pick the
prompts, warm up, then time the methods interleaved request by request.

Protocol:
- prompts: the eval split of each dataset (see `datasets.py`) in a fixed pseudo-random
  order (`prompt_seed`); prompts longer than `max_prompt_tokens` (or that leave no room
  for `max_new_tokens` in the target's context) are passed over, the first
  `num_prompts` that fit are used; a multi-turn prompt gives one request per turn;
- warm-up: each method decodes the first request `warmup` times with `warmup_tokens`
  new tokens, untimed; at temperature 0 the warm-up also records the greedy draft
  tokens of `dflash` and `zlab` and compares them block by block (checkpoint
  conformance of the reference runtime);
- timing: for every request all methods run one after another (A B C A B C ...), the
  starting method rotating from request to request, so drift of the machine hits every
  method alike; each method's stats come from `metrics.SpecStats`;
- same-output check: at temperature 0 each method's tokens are compared with the
  baseline's on the same request.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InputError
from ..runtime.config import DecodeConfig, at_least, parse_block_size
from . import figures
from .datasets import DATASETS, BenchPrompt, DatasetUnavailable, load_prompts, load_prompts_file, select
from .methods import BenchContext, Method, MethodUnavailable, Run, build_method
from .names import DEFAULT_METHODS, METHODS, split_method


DEFAULT_DATASETS = ("humaneval", "sharegpt")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class BenchOptions:
    target: str = "smollm2-135m-instruct"
    draft: str = "random"  # a drafter folder / hub id, default (the shipped one), random or none
    methods: tuple[str, ...] = DEFAULT_METHODS
    datasets: tuple[str, ...] | None = None  # None: DEFAULT_DATASETS, or none when prompts_file is given
    prompts_file: str | None = None
    num_prompts: int = 20
    prompt_seed: int = 0
    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    chat: bool = True
    baseline: str = "hf"
    block_size: int | str | None = None  # dflash: None = auto
    ngram_block_size: int = 8
    warmup: int = 1
    warmup_tokens: int = 32
    max_prompt_tokens: int = 2048
    device: str = "cpu"
    dtype: str = "auto"
    threads: int | None = None
    static_steps: str = "auto"  # fixed-shape steps / CUDA graphs in specflash's loop (auto: on for CUDA)
    out: str | None = None
    zlab_python: str | None = None
    zlab_venv: str | None = None
    progress: bool = True
    plots: bool = True
    command: str = ""

    def __post_init__(self) -> None:
        if self.datasets is None:  # a prompts file alone runs only that file
            self.datasets = () if self.prompts_file else DEFAULT_DATASETS
        self.datasets = tuple(self.datasets)

    def validate(self) -> None:
        unknown = []
        for spec in self.methods:
            try:
                base, block = split_method(spec)
            except ValueError as exc:
                raise InputError(str(exc)) from None
            if base not in METHODS or (block is not None and base not in ("dflash", "ngram", "dflash-tree")):
                unknown.append(spec)
        if unknown:
            raise InputError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)} "
                             "(dflash and ngram also as NAME@B with B an integer or auto, e.g. dflash@8; dflash-tree "
                             "as dflash-tree@N with N drafts per step)")
        if not self.methods:
            raise InputError("--methods is empty; name at least one of " + ", ".join(METHODS))
        if self.baseline not in METHODS:
            raise InputError(f"unknown --baseline {self.baseline!r}; choose from {', '.join(METHODS)}")
        if not self.datasets and not self.prompts_file:
            raise InputError("no prompts: give --datasets and/or --prompts-file")
        for name, value, low in (("--num-prompts", self.num_prompts, 1), ("--max-new-tokens", self.max_new_tokens, 1),
                                 ("--ngram-block-size", self.ngram_block_size, 2), ("--warmup", self.warmup, 0),
                                 ("--warmup-tokens", self.warmup_tokens, 1),
                                 ("--max-prompt-tokens", self.max_prompt_tokens, 1)):
            at_least(name, value, low)
        self.block_size = parse_block_size(self.block_size)
        if self.draft.strip().lower() == "ngram":
            raise InputError("for bench, --draft names the DFlash drafter (random, none, a folder or a hub id); "
                             "prompt lookup is measured by the ngram and hf-ngram methods")
        DecodeConfig(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                     top_k=self.top_k)  # validates the sampling flags

    @property
    def method_order(self) -> tuple[str, ...]:
        """The methods to run, baseline first (it is always run: speedups need it)."""
        rest = [m for m in dict.fromkeys(self.methods) if m != self.baseline]
        return (self.baseline, *rest)


@dataclass
class Request:
    dataset: str
    prompt: BenchPrompt
    turn: int
    prompt_ids: list[int]


@dataclass
class BenchResult:
    options: BenchOptions
    out_dir: Path
    machine: dict
    versions: dict
    methods: dict[str, dict] = field(default_factory=dict)  # name -> {"description", "block_size", ...}
    skipped_methods: dict[str, str] = field(default_factory=dict)
    skipped_datasets: dict[str, str] = field(default_factory=dict)
    datasets: dict[str, dict] = field(default_factory=dict)  # name -> {"prompts", "passed_over_long"}
    summary: dict[str, dict[str, dict]] = field(default_factory=dict)  # method -> dataset -> figures
    conformance: dict | None = None
    draft_folder: str | None = None
    wall_time_s: float = 0.0


# ------------------------------------------------------------------- helpers
def _encode(target, prompt: BenchPrompt, turn: int, answers: list[str], chat: bool) -> list[int]:
    """Token ids of request `turn` of `prompt`; `answers` are the baseline's earlier replies."""
    if prompt.messages:
        return target.encode_messages(list(prompt.messages))
    if not chat:
        parts = []
        for i in range(turn):
            parts += [prompt.turns[i], answers[i]]
        return target.encode_prompt("\n\n".join(parts + [prompt.turns[turn]]), chat=False)
    messages = []
    for i in range(turn):
        messages += [{"role": "user", "content": prompt.turns[i]}, {"role": "assistant", "content": answers[i]}]
    messages.append({"role": "user", "content": prompt.turns[turn]})
    if getattr(target.tokenizer, "chat_template", None):
        return target.encode_messages(messages)
    return target.encode_prompt(prompt.turns[turn], chat=False)


def _choose_prompts(opts: BenchOptions, target, result: BenchResult) -> dict[str, list[BenchPrompt]]:
    sets: dict[str, list[BenchPrompt]] = {}
    sources: list[tuple[str, object]] = [(name, None) for name in dict.fromkeys(opts.datasets)]
    if opts.prompts_file:
        stem = Path(opts.prompts_file).stem or "file"
        sources.append((f"file:{stem}" if stem in DATASETS else stem, opts.prompts_file))
    limit = min(opts.max_prompt_tokens, target.max_context - opts.max_new_tokens - 1)
    for name, path in sources:
        try:
            items = load_prompts_file(path) if path else load_prompts(name, split="eval")
        except DatasetUnavailable as exc:
            result.skipped_datasets[name] = str(exc)
            _say(f"specflash: skipping dataset {name}: {exc}")
            continue
        chosen, long = [], 0
        for prompt in (select(items, opts.prompt_seed) if not path else items):
            if len(_encode(target, prompt, 0, [], opts.chat)) > limit:
                long += 1
                continue
            chosen.append(prompt)
            if len(chosen) == opts.num_prompts:
                break
        if not chosen:
            result.skipped_datasets[name] = f"no prompt fits in {limit} tokens"
            _say(f"specflash: skipping dataset {name}: no prompt fits in {limit} tokens")
            continue
        sets[name] = chosen
        result.datasets[name] = {"prompts": len(chosen), "requests": sum(p.num_turns for p in chosen),
                                 "passed_over_long": long, "available": len(items)}
    return sets


def _drafter_folder(opts: BenchOptions, target, workdir: Path) -> tuple[Path | None, str | None]:
    """The DFlash drafter folder `dflash` and `zlab` both load, read from --draft by
    `runtime.loading.resolve_draft` (a random drafter is saved once, in the published bf16
    format, so both runtimes read the same file; its block fits every block asked for)."""
    from ..runtime.loading import RANDOM_DRAFTER_BLOCK, random_drafter, random_drafter_block, resolve_draft

    try:
        choice = resolve_draft(opts.draft, target.name)
    except InputError as exc:
        if opts.draft.strip().lower() != "default":
            raise
        return None, str(exc)  # no shipped drafter: dflash and zlab are skipped, saying why
    if choice.kind == "none":
        return None, "--draft none was given"
    if choice.kind == "random":
        folder = workdir / "drafter-random"
        suffixes = [split_method(m)[1] for m in opts.methods if split_method(m)[0] == "dflash"]
        asked = opts.block_size if isinstance(opts.block_size, int) else RANDOM_DRAFTER_BLOCK
        block = random_drafter_block(asked, *suffixes)
        random_drafter(target, seed=opts.seed, block_size=block).save_pretrained(folder)
        return folder, None
    return choice.folder, None


def _compare_drafts(ours: list[list[int]] | None, theirs: list[list[int]] | None) -> dict:
    ours, theirs = ours or [], theirs or []
    n = min(len(ours), len(theirs))
    equal = 0
    for a, b in zip(ours[:n], theirs[:n]):
        k = min(len(a), len(b))
        equal += a[:k] == b[:k]
    return {"blocks_specflash": len(ours), "blocks_zlab": len(theirs), "blocks_compared": n, "blocks_equal": equal}


def _record(req: Request, method: Method, run: Run, baseline: Run | None, greedy: bool) -> dict:
    rec = {"method": method.name, "dataset": req.dataset, "prompt_id": req.prompt.id, "turn": req.turn,
           "num_prompt_tokens": len(req.prompt_ids), "token_ids": run.token_ids}
    rec.update(run.stats.to_dict())
    rec["first_step_tokens"] = run.stats.first_step_tokens
    rec["tokens_past_limit"] = run.tokens_past_limit
    if greedy and baseline is not None:
        where = figures.first_mismatch(run.token_ids, baseline.token_ids)
        rec["matches_baseline"], rec["first_mismatch"] = where is None, where
    else:
        rec["matches_baseline"], rec["first_mismatch"] = None, None
    return rec


# ---------------------------------------------------------------------- run
def run_bench(opts: BenchOptions) -> BenchResult:
    import torch
    from tqdm import tqdm

    from ..models import resolve_model
    from ..hf.target import TargetModel
    from ..perf.machine import library_versions, machine_info
    from ..runtime.loading import setup_static_steps
    from ..runtime.pipeline import parse_dtype

    opts.validate()
    t_start = time.perf_counter()
    if opts.threads:
        torch.set_num_threads(opts.threads)
    out_dir = Path(opts.out or Path("results") / "bench" / time.strftime("%Y%m%d-%H%M%S"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = parse_dtype(opts.dtype, opts.device)
    target = TargetModel.from_pretrained(opts.target, dtype=dtype, device=opts.device)
    result = BenchResult(opts, out_dir, machine_info(opts.device), library_versions())
    result.machine["target_forward"] = target.forward_path  # our loop's forward (the hf baseline: transformers')
    result.machine["step_mode"] = setup_static_steps(target, opts.static_steps, say=_say)

    sets = _choose_prompts(opts, target, result)
    if not sets:
        raise InputError("no dataset could be loaded: " + "; ".join(f"{k}: {v}" for k, v in
                                                                  result.skipped_datasets.items()))

    draft_folder, draft_problem = None, None
    if {"dflash", "zlab"} & {split_method(m)[0] for m in opts.methods}:
        draft_folder, draft_problem = _drafter_folder(opts, target, out_dir)
        result.draft_folder = str(draft_folder) if draft_folder else None
    ctx = BenchContext(target=target, target_folder=resolve_model(opts.target), draft_folder=draft_folder,
                       draft_problem=draft_problem, block_size=opts.block_size,
                       ngram_block_size=opts.ngram_block_size, device=opts.device,
                       dtype=str(dtype).removeprefix("torch."), threads=torch.get_num_threads(), workdir=out_dir,
                       zlab_python=Path(opts.zlab_python) if opts.zlab_python else None,
                       zlab_venv=Path(opts.zlab_venv) if opts.zlab_venv else None, say=_say)

    methods: dict[str, Method] = {}
    for name in opts.method_order:
        try:
            methods[name] = build_method(name, ctx)
        except MethodUnavailable as exc:
            result.skipped_methods[name] = str(exc)
            _say(f"specflash: skipping method {name}: {exc}")
            continue
        info = {"description": METHODS[split_method(name)[0]], "block_size": methods[name].block_size,
                "block_policy": getattr(methods[name], "policy_name", "fixed")}
        if getattr(methods[name], "costs", None) is not None:
            info["costs"] = methods[name].costs.to_dict()
        if name == "zlab":
            info.update(versions=methods[name].versions, load=methods[name].load_report)
        result.methods[name] = info

    result.machine["kernels"] = target.kernel_choice.describe()  # few-row verify kernels (kernelchoice.py)
    greedy = opts.temperature == 0.0
    config = DecodeConfig(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                          top_k=opts.top_k, seed=opts.seed)
    requests_total = sum(p.num_turns for prompts in sets.values() for p in prompts)
    try:
        first_set = next(iter(sets))
        first = sets[first_set][0]
        warm_req = Request(first_set, first, 0, _encode(target, first, 0, [], opts.chat))
        _warm_up(methods, warm_req, config, opts, result)
        bar = tqdm(total=requests_total * len(methods), desc="bench", unit="run", file=sys.stderr,
                   disable=not opts.progress, mininterval=1.0, dynamic_ncols=True)
        samples: dict[str, dict[str, list]] = {m: {d: [] for d in sets} for m in methods}
        agree_with_dflash = {"compared": 0, "equal": 0}
        with open(out_dir / "samples.jsonl", "w") as jsonl, bar:
            index = 0
            for dataset, prompts in sets.items():
                for prompt in prompts:
                    answers: list[str] = []
                    for turn in range(prompt.num_turns):
                        req = Request(dataset, prompt, turn, _encode(target, prompt, turn, answers, opts.chat))
                        runs = _run_interleaved(methods, req, config, index, bar, result)
                        index += 1
                        base = runs.get(opts.baseline)
                        for name, run in runs.items():
                            rec = _record(req, methods[name], run, base, greedy)
                            jsonl.write(json.dumps(rec) + "\n")
                            samples[name][dataset].append((run.stats, rec["matches_baseline"], run.tokens_past_limit))
                        jsonl.flush()
                        if "zlab" in runs and "dflash" in runs:
                            agree_with_dflash["compared"] += 1
                            agree_with_dflash["equal"] += runs["zlab"].token_ids == runs["dflash"].token_ids
                        reference = base or next(iter(runs.values()), None)
                        answers.append(target.decode(reference.token_ids) if reference else "")
        if result.conformance is not None:
            result.conformance["requests_same_tokens_as_dflash"] = agree_with_dflash
    finally:
        for method in methods.values():
            method.close()

    _summarize(result, samples, methods, greedy)
    result.wall_time_s = time.perf_counter() - t_start
    return result


def _warm_up(methods: dict[str, Method], req: Request, config: DecodeConfig, opts: BenchOptions,
             result: BenchResult) -> None:
    if opts.warmup < 1:
        return
    warm = DecodeConfig(max_new_tokens=min(opts.warmup_tokens, opts.max_new_tokens), temperature=config.temperature,
                        top_p=config.top_p, top_k=config.top_k, seed=config.seed)
    record = config.greedy and "zlab" in methods and "dflash" in methods
    drafts: dict[str, Run] = {}
    for _ in range(opts.warmup):
        for name in list(methods):
            try:
                run = methods[name].run(req.prompt_ids, warm, record_drafts=record and name in ("zlab", "dflash"))
            except Exception as exc:  # one method failing must not stop the others
                _drop(methods, name, f"failed in warm-up: {_why(exc)}", result)
                continue
            if record and name in ("zlab", "dflash"):
                drafts[name] = run
    if "zlab" in result.methods:
        conf = {"loaded": result.methods["zlab"].get("load"), "versions": result.methods["zlab"].get("versions")}
        try:
            conf["drafter_forward"] = methods["zlab"].check_drafter(result.draft_folder, result.out_dir)
        except Exception as exc:  # a failed check is a finding, not a crash
            conf["drafter_forward"] = {"error": _why(exc)}
        if "zlab" in drafts and "dflash" in drafts:
            conf["warmup_drafts"] = _compare_drafts(drafts["dflash"].drafts, drafts["zlab"].drafts)
            conf["warmup_same_tokens"] = drafts["dflash"].token_ids == drafts["zlab"].token_ids
        result.conformance = conf


def _why(exc: Exception) -> str:
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return text if isinstance(exc, MethodUnavailable) else f"{type(exc).__name__}: {text}"


def _drop(methods: dict[str, Method], name: str, reason: str, result: BenchResult) -> None:
    method = methods.pop(name)
    method.close()
    result.skipped_methods[name] = reason
    result.methods.pop(name, None)
    _say(f"specflash: dropping method {name}: {reason}")


def _run_interleaved(methods: dict[str, Method], req: Request, config: DecodeConfig, index: int, bar,
                     result: BenchResult) -> dict[str, Run]:
    names = list(methods)
    shift = index % len(names) if names else 0
    runs: dict[str, Run] = {}
    for name in names[shift:] + names[:shift]:
        bar.set_postfix_str(f"{req.dataset} {req.prompt.id} {name}", refresh=False)
        try:
            runs[name] = methods[name].run(req.prompt_ids, config)
        except Exception as exc:  # one method failing must not stop the others
            _drop(methods, name, f"failed on {req.dataset}/{req.prompt.id}: {_why(exc)}", result)
        bar.update(1)
    return {name: runs[name] for name in names if name in runs}  # back in the listed order


def _summarize(result: BenchResult, samples: dict, methods: dict[str, Method], greedy: bool) -> None:
    baseline = result.options.baseline
    for name, per_set in samples.items():
        if name not in methods:
            continue  # dropped mid-run: reported in skipped_methods
        result.summary[name] = {}
        for dataset, items in per_set.items():
            stats = [s for s, _, _ in items]
            fig = figures.summarize(stats, methods[name].has_drafts, getattr(methods[name], "costs", None))
            fig["mismatches"] = sum(1 for _, same, _ in items if same is False) if greedy and baseline in methods \
                else None
            fig["requests_past_limit"] = sum(1 for _, _, extra in items if extra)
            result.summary[name][dataset] = fig
    for name, per_set in result.summary.items():
        for dataset, fig in per_set.items():
            base = result.summary.get(baseline, {}).get(dataset, {}).get("tpot_s")
            fig["speedup"] = figures.speedup(base, fig["tpot_s"])
