"""What `specflash bench` writes: a markdown table (stdout and report.md), summary.json,
PNG plots, and the one-line JSON document that ends stdout.

Results folder:
  samples.jsonl              one line per method and request: tokens, SpecStats fields,
                             same-output check against the baseline (written by the runner)
  summary.json               everything below plus settings, machine, versions, command
  report.md                  the table, spread, histograms, per-position rates, conformance
  speedup.png                speedup over the baseline, per method and dataset
  acceptance_histogram.png   share of verify steps by acceptance length (drafting methods)
  position_acceptance.png    acceptance rate by draft position (drafting methods)
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from .runner import BenchResult


def _num(value, fmt: str, scale: float = 1.0) -> str:
    return "-" if value is None else format(value * scale, fmt)


def last_line(result: BenchResult) -> dict:
    """The documented last line of stdout (a fixed shape scripts can rely on)."""
    opts = result.options
    methods = {
        name: {dataset: {"prompts": f["prompts"], "tau": f["tau"], "efficiency": f.get("efficiency"),
                         "efficiency_model": f.get("efficiency_model"),
                         "tpot_s": f["tpot_s"],
                         "tokens_per_s": f["tokens_per_s"], "speedup": f["speedup"], "mismatches": f["mismatches"]}
               for dataset, f in per_set.items()}
        for name, per_set in result.summary.items()
    }
    return {"target": opts.target, "draft": opts.draft,
            "block_size": opts.block_size if opts.block_size is not None else "auto",
            "machine": result.machine, "methods": methods}


def markdown_table(result: BenchResult) -> str:
    base = result.options.baseline
    rows = ["| method | dataset | prompts | tau | drafts/step | efficiency | TPOT ms mean | TPOT ms min / median / max "
            f"| TTFT ms | tok/s | speedup vs {base} | mismatches |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, per_set in result.summary.items():
        for dataset, f in per_set.items():
            s = f["tpot_s_spread"]
            rows.append(
                f"| {name} | {dataset} | {f['prompts']} | {_num(f['tau'], '.2f')} "
                f"| {_num(f.get('drafts_per_step'), '.1f')} | {_num(f.get('efficiency'), '.2f')} "
                f"| {_num(f['tpot_s'], '.1f', 1e3)} "
                f"| {_num(s['min'], '.1f', 1e3)} / {_num(s['median'], '.1f', 1e3)} / {_num(s['max'], '.1f', 1e3)} "
                f"| {_num(f['time_to_first_token_s'], '.0f', 1e3)} | {_num(f['tokens_per_s'], '.1f')} "
                f"| {_num(f['speedup'], '.2f')}x | {'-' if f['mismatches'] is None else f['mismatches']} |")
    for name, reason in result.skipped_methods.items():
        rows.append(f"| {name} | skipped | | | | | | | | | | {reason.replace('|', '/')} |")
    return "\n".join(rows)


def _details(result: BenchResult) -> list[str]:
    lines = []
    for name, per_set in result.summary.items():
        for dataset, f in per_set.items():
            if f.get("requests_past_limit"):
                lines.append(f"- {name} / {dataset}: {f['requests_past_limit']} request(s) returned more than "
                             f"{result.options.max_new_tokens} tokens; the extra tokens were dropped before the "
                             "same-output check (transformers' prompt lookup does not cap its candidates by the "
                             "room left)")
            if not f["acceptance_histogram"]:
                continue
            total = sum(f["acceptance_histogram"].values())
            hist = ", ".join(f"{k}: {v / total:.1%}" for k, v in f["acceptance_histogram"].items())
            rates = " ".join(f"{r:.2f}" for r in f["acceptance_rate_per_position"]) or "n/a"
            lines.append(f"- {name} / {dataset}: acceptance lengths {{{hist}}}; per-position rate [{rates}]")
    return lines


STEP_MODES = {  # TargetModel.step_mode
    "dynamic": "dynamic (a growing KV cache, eager)",
    "static-eager": "static KV cache, fixed-shape steps, eager",
    "static-replay": "static KV cache, fixed-shape steps on static buffers, no graphs (this device has none)",
    "cuda-graphs": "static KV cache, fixed-shape steps replayed as CUDA graphs",
}


def _forward_note(path: str | None) -> str:
    if path == "lean":
        return ("lean (specflash/leanforward.py: transformers' operations with less framework, checked "
                "bit-identical to transformers' forward on this model before use)")
    return "transformers' own forward" if path else "not recorded"


def render_markdown(result: BenchResult, plots: list[str]) -> str:
    opts, m = result.options, result.machine
    gpu = m["gpu"]["name"] if m.get("gpu") else "none"
    versions = ", ".join(f"{k} {v}" for k, v in result.versions.items() if v)
    out = [f"# specflash bench: {opts.target}", "",
           f"Command: `{opts.command}`", "",
           f"Machine: {m['cpu']}, {m['cores']} logical cores, {m['threads']} torch threads, "
           f"{m['memory_gib']} GiB RAM, GPU: {gpu}, device {m['device']}; {m['os']}, Python {m['python']}; "
           f"load average at start {m.get('load_average')}.",
           f"Libraries: {versions}.", "",
           f"Target forward in specflash's loop: {_forward_note(m.get('target_forward'))}; "
           f"steps: {STEP_MODES.get(m.get('step_mode'), 'not recorded')}; few-row verify kernels "
           f"(W @ x^T instead of F.linear, chosen by measurement on this machine): {m.get('kernels', 'not recorded')}"
           ".", "",
           f"Settings: draft `{opts.draft}`" + (f" (folder {result.draft_folder})" if result.draft_folder else "")
           + f", block size {opts.block_size or 'auto'}, ngram block {opts.ngram_block_size}, "
           f"max {opts.max_new_tokens} new tokens, temperature {opts.temperature}, top-p {opts.top_p}, "
           f"top-k {opts.top_k}, seed {opts.seed}, chat template {'on' if opts.chat else 'off'}, "
           f"prompt seed {opts.prompt_seed}, warm-up {opts.warmup} x {opts.warmup_tokens} tokens, "
           f"baseline {opts.baseline}; wall time {result.wall_time_s / 60:.1f} min.", "",
           "Methods: " + "; ".join(f"{k} = {v['description']} (block {v['block_size']})"
                                   for k, v in result.methods.items()) + ".", "",
           "Datasets (eval split): " + "; ".join(
               f"{k}: {v['prompts']} prompts / {v['requests']} requests ({v['passed_over_long']} longer "
               f"prompts passed over)" for k, v in result.datasets.items()) + ".", ""]
    for name, reason in result.skipped_datasets.items():
        out.append(f"- dataset {name} skipped: {reason}")
    out += ["", markdown_table(result), "",
            "tau = mean over requests of (accepted drafts + 1) per verify step (drafting methods only); TPOT = "
            "decode-phase time / tokens after the first (prefill excluded), mean over requests; tok/s = 1 / mean "
            "TPOT; speedup = baseline mean TPOT / method mean TPOT; mismatches = requests whose tokens differ from "
            "the baseline's (temperature 0); drafts/step = mean drafts verified per step (auto may verify 0); "
            "efficiency = time spent in the drafter and target forwards, timed in the run itself / decode time "
            "(our loop only; 1.0 = no engine overhead; the JSON's efficiency_model uses the cost model's times "
            "instead).", ""]
    costs = [(k, v["costs"]) for k, v in result.methods.items() if v.get("costs")]
    if costs:
        out += ["Cost model (bare forwards after a 256-token context, ms; the basis of efficiency and of "
                "`auto`):", ""]
        for name, c in costs:
            curve = ", ".join(f"{n}: {t * 1e3:.1f}" for n, t in c["verify"].items())
            drafts = c.get("drafts")
            draft = (f"t_draft(k) {{{', '.join(f'{k}: {t * 1e3:.1f}' for k, t in drafts.items())}}}" if drafts
                     else f"t_draft {c['draft'] * 1e3:.1f}")
            out.append(f"- {name}: t_verify(n) {{{curve}}}; {draft}"
                       + (" (measured on a busy machine)" if c.get("noisy") else ""))
        out.append("")
    details = _details(result)
    if details:
        out += ["Acceptance (pooled over all verify steps) and notes:", "", *details, ""]
    if result.conformance:
        out += ["z-lab reference runtime conformance:", "", "```json",
                json.dumps(result.conformance, indent=2), "```", ""]
    out += [f"![{p}]({p})" for p in plots]
    return "\n".join(out).rstrip() + "\n"


def write_plots(result: BenchResult, out_dir: Path) -> list[str]:
    """PNG plots; [] (with the reason on stderr) when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import sys

        print("specflash: no plots (matplotlib is not installed: pip install 'specflash[bench]')", file=sys.stderr)
        return []
    written = []
    datasets = list(dict.fromkeys(d for per_set in result.summary.values() for d in per_set))
    names = list(result.summary)

    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(names) * max(1, len(datasets)) / 2, 3.6))
    width = 0.8 / max(1, len(datasets))
    for j, dataset in enumerate(datasets):
        values = [result.summary[n].get(dataset, {}).get("speedup") or 0.0 for n in names]
        ax.bar([i + j * width for i in range(len(names))], values, width, label=dataset)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks([i + width * (len(datasets) - 1) / 2 for i in range(len(names))], names)
    ax.set_ylabel(f"speedup over {result.options.baseline} (TPOT)")
    ax.set_title(f"{result.options.target}, {result.options.max_new_tokens} new tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "speedup.png", dpi=110)
    plt.close(fig)
    written.append("speedup.png")

    drafting = [(n, d) for n in names for d, f in result.summary[n].items() if f["acceptance_histogram"]]
    if drafting:
        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for n, d in drafting:
            hist = {int(k): v for k, v in result.summary[n][d]["acceptance_histogram"].items()}
            total = sum(hist.values())
            xs = list(range(1, max(hist) + 1))
            ax.plot(xs, [hist.get(x, 0) / total for x in xs], marker="o", label=f"{n} / {d}")
        ax.set_xlabel("acceptance length (accepted drafts + 1)")
        ax.set_ylabel("share of verify steps")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "acceptance_histogram.png", dpi=110)
        plt.close(fig)
        written.append("acceptance_histogram.png")

        fig, ax = plt.subplots(figsize=(6.4, 3.6))
        for n, d in drafting:
            rates = result.summary[n][d]["acceptance_rate_per_position"]
            if rates:
                ax.plot(range(1, len(rates) + 1), rates, marker=".", label=f"{n} / {d}")
        ax.set_xlabel("draft position")
        ax.set_ylabel("acceptance rate")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "position_acceptance.png", dpi=110)
        plt.close(fig)
        written.append("position_acceptance.png")
    return written


def write_results(result: BenchResult) -> dict:
    """Write summary.json, report.md and the plots; return the last-line document."""
    out_dir = result.out_dir
    plots = write_plots(result, out_dir) if result.options.plots else []
    doc = last_line(result)
    summary = dict(doc)
    summary.update(methods=result.summary, method_info=result.methods, skipped_methods=result.skipped_methods,
                   datasets=result.datasets, skipped_datasets=result.skipped_datasets, versions=result.versions,
                   command=result.options.command, settings=asdict(result.options),
                   draft_folder=result.draft_folder, zlab_conformance=result.conformance,
                   wall_time_s=result.wall_time_s, plots=plots)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "report.md").write_text(render_markdown(result, plots))
    return doc
