"""Synthetic-acceptance benchmark: engine efficiency and the verify-cost curve on any device,
without real weights.

A randomly initialised target of a real model's shape (e.g. Qwen3-8B) and a randomly
initialised DFlash drafter sized for it are built directly on the device (nothing to
download: on a GPU machine that cannot receive multi-GB checkpoints this is how the engine
gets measured). The drafter runs its real forward every step, so the draft cost is real,
but the tokens it returns come from an oracle: each draft token is the target's own
greedy continuation (from a plain decoding run of the same prompt) with probability p,
else a wrong token. That fixes the acceptance rate, so tau is known in advance
(1 + p + ... + p^(B-1) for a fixed block B), and what is measured is the engine: tokens/s,
speedup over plain decoding with the same target, and engine efficiency (the share of the
decode time spent in the drafter and target forwards, timed in the run).

The random target's LM head is scaled up so its greedy choices are far from ties; in
bf16 a 16-token verify can still round differently from a 1-token step, which shows up
as mismatches with the plain run (reported, never hidden).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

import torch

from ..runtime.config import DecodeConfig
from ..runtime.decode import SpeculativeDecoder
from ..runtime.proposers.base import Proposal
from ..runtime.sampling import Sampler
from ..hf.target import TargetModel
from .report import STEP_MODES

# Published shapes (config.json facts of the named models).
SHAPES: dict[str, dict] = {
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=False),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
                     num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                     max_position_embeddings=40960, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                     tie_word_embeddings=True),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rope_theta=500_000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=False),
    "smollm2-135m": dict(model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=49152,
                         max_position_embeddings=8192, rope_theta=100_000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True),
    "tiny": dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024,
                 rope_theta=10_000.0, rms_norm_eps=1e-5, tie_word_embeddings=False),
}
DRAFT_LAYERS = {"qwen3-8b": 5, "qwen3-4b": 5, "llama-3.1-8b": 5}  # published drafters; 1 elsewhere


def synthetic_target(shape: str, device: str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0,
                     head_scale: float = 20.0) -> TargetModel:
    """A random target of a registered shape, built on `device` (no tokenizer, no eos)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    params = dict(SHAPES[shape])
    config = AutoConfig.for_model(params.pop("model_type"), **params)
    config.eos_token_id = None
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():  # peaked logits: greedy choices far from ties
        head = model.get_output_embeddings().weight
        if model.config.tie_word_embeddings:
            model.lm_head = torch.nn.Linear(head.shape[1], head.shape[0], bias=False, device=head.device,
                                            dtype=head.dtype)
            model.lm_head.weight.copy_(head)
            head = model.lm_head.weight
        head.mul_(head_scale)
    return TargetModel(model.eval(), tokenizer=None, name=f"synthetic-{shape}")


class OracleDraftProposer:
    """Runs the real drafter (its cost is what is measured) but proposes the reference
    continuation, each token right with probability p."""

    name = "synthetic"

    def __init__(self, inner, vocab_size: int, p_correct: float, seed: int = 0):
        self.inner = inner
        self.vocab_size = vocab_size
        self.p_correct = p_correct
        self.reference: list[int] = []
        self._rng = torch.Generator().manual_seed(seed)

    @property
    def layer_ids(self):
        return self.inner.layer_ids

    @property
    def block_size(self) -> int:
        return self.inner.block_size

    def reset(self, prompt_ids, features) -> None:
        self.inner.reset(prompt_ids, features)

    def commit(self, tokens, features) -> None:
        self.inner.commit(tokens, features)

    def propose(self, anchor: int, position: int, num_tokens: int, sampler: Sampler) -> Proposal:
        drafted = self.inner.propose(anchor, position, num_tokens, sampler).tokens  # the real forward
        truth = self.reference[position + 1: position + 1 + num_tokens]
        right = torch.rand(len(truth), generator=self._rng) < self.p_correct
        tokens = [t if ok else (t + 1) % self.vocab_size for t, ok in zip(truth, right.tolist())]
        return Proposal(torch.tensor(tokens, dtype=torch.long, device=drafted.device))


@dataclass
class SyntheticRow:
    accept: float
    block: str
    tau: float
    expected_tau: float | None
    tokens_per_s: float
    speedup: float
    efficiency: float | None
    drafts_per_step: float
    mismatches: int


@dataclass
class SyntheticResult:
    shape: str
    device: str
    dtype: str
    prompts: int
    max_new_tokens: int
    draft_layers: int
    verify_cost_s: dict[int, float]
    draft_cost_s: float
    ar_tokens_per_s: float
    step_mode: str = "dynamic"  # TargetModel.step_mode: dynamic, static-eager, static-replay, cuda-graphs
    graph_error: str | None = None  # why CUDA graphs were turned off mid-run, if they were
    rows: list[SyntheticRow] = field(default_factory=list)


def run_synthetic(shape: str, accepts: list[float], blocks: list[int | str], device: str = "cpu",
                  dtype: torch.dtype = torch.float32, num_prompts: int = 4, prompt_tokens: int = 128,
                  max_new_tokens: int = 128, draft_layers: int | None = None, block_size: int = 16, seed: int = 0,
                  static_steps: str = "auto", say=print) -> SyntheticResult:
    from ..perf.measure import measure_costs
    from ..runtime.blockpolicy import AutoBlock
    from ..runtime.loading import dflash_proposer, random_drafter, setup_static_steps

    say(f"building a random {shape} target on {device} ({str(dtype).removeprefix('torch.')}) ...")
    target = synthetic_target(shape, device, dtype, seed)
    step_mode = setup_static_steps(target, static_steps, say=say)
    say(f"steps: {step_mode}")
    layers = draft_layers or DRAFT_LAYERS.get(shape, 1)
    drafter = random_drafter(target, seed=seed, num_layers=layers, block_size=block_size)
    inner = dflash_proposer(drafter.to(device=target.device, dtype=dtype), target)
    say("measuring the cost model (verify forwards of 1..B tokens, one drafter forward) ...")
    costs = measure_costs(target, inner, max_tokens=block_size, context=prompt_tokens)
    generator = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, int(SHAPES[shape]["vocab_size"]), (prompt_tokens,), generator=generator).tolist()
               for _ in range(num_prompts)]
    config = DecodeConfig(max_new_tokens=max_new_tokens, stop_token_ids=())
    plain = SpeculativeDecoder(target)
    plain.generate(prompts[0], DecodeConfig(max_new_tokens=8, stop_token_ids=()))  # warm-up
    references, ar_tpots = [], []
    for prompt in prompts:
        result = plain.generate(prompt, config)
        references.append(result.token_ids)
        ar_tpots.append(result.stats.tpot_s)
    ar_tpot = statistics.fmean(ar_tpots)
    out = SyntheticResult(shape, str(target.device), str(dtype).removeprefix("torch."), num_prompts, max_new_tokens,
                          layers, dict(costs.verify), costs.draft, 1.0 / ar_tpot, step_mode)
    for p in accepts:
        for block in blocks:
            proposer = OracleDraftProposer(inner, target.vocab_rows, p, seed=seed)
            size = block_size if block == "auto" else int(block)
            policy = AutoBlock(costs, size - 1) if block == "auto" else None
            decoder = SpeculativeDecoder(target, proposer, size, policy)
            taus, tpots, mismatches, steps, decode_time, forward_time = [], [], 0, [], 0.0, 0.0
            for prompt, reference in zip(prompts, references):
                proposer.reference = list(prompt) + reference
                result = decoder.generate(prompt, config)
                taus.append(result.stats.tau or 1.0)
                tpots.append(result.stats.tpot_s)
                mismatches += result.token_ids != reference
                steps += result.stats.drafted_per_step
                decode_time += result.stats.decode_time_s
                forward_time += result.stats.forward_time_s
            tpot = statistics.fmean(tpots)
            expected = sum(p ** i for i in range(size)) if block != "auto" else None
            out.rows.append(SyntheticRow(p, str(block), statistics.fmean(taus), expected, 1.0 / tpot, ar_tpot / tpot,
                                         forward_time / decode_time if decode_time > 0 else None,
                                         statistics.fmean(steps) if steps else 0.0, mismatches))
            say(f"p={p} block {block}: tau {out.rows[-1].tau:.2f}, speedup {out.rows[-1].speedup:.2f}x")
    static = target.static_steps
    errors = [e for e in (static.graph_error if static else None, inner.graph_error) if e]
    out.graph_error = "; ".join(errors) or None
    return out


def render(result: SyntheticResult) -> str:
    lines = [f"# specflash synthetic bench: random {result.shape} target on {result.device} ({result.dtype})", "",
             f"{result.prompts} random prompts, {result.max_new_tokens} new tokens, drafter {result.draft_layers} "
             f"layer(s) (real forward, oracle tokens); plain decoding {result.ar_tokens_per_s:.1f} tok/s.", "",
             f"Steps: {STEP_MODES.get(result.step_mode, result.step_mode)}"
             + (f" (graphs turned off mid-run: {result.graph_error})" if result.graph_error else "") + ".", "",
             "Verify cost (one target forward after the prompt, ms): "
             + ", ".join(f"{n}: {s * 1e3:.2f}" for n, s in sorted(result.verify_cost_s.items()))
             + f"; drafter forward {result.draft_cost_s * 1e3:.2f} ms.", "",
             "| p(draft right) | block | tau | expected tau | drafts/step | tok/s | speedup vs plain | efficiency "
             "| mismatches |", "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result.rows:
        expected = "-" if r.expected_tau is None else f"{r.expected_tau:.2f}"
        eff = "-" if r.efficiency is None else f"{r.efficiency:.2f}"
        lines.append(f"| {r.accept} | {r.block} | {r.tau:.2f} | {expected} | {r.drafts_per_step:.1f} "
                     f"| {r.tokens_per_s:.1f} | {r.speedup:.2f}x | {eff} | {r.mismatches} |")
    return "\n".join(lines) + "\n"
