"""The ways of decoding `specflash bench` compares, each behind one small interface.

Every method takes prompt token ids and a `DecodeConfig` and returns the new tokens with
a `metrics.SpecStats` (so every figure is computed by the same code):
- hf       Hugging Face `generate` with KV cache (greedy or sampled): what a user runs
           without us. Times come from a streamer that notes when each chunk of tokens
           arrives (TTFT = first chunk, TPOT over the later ones).
- ar       specflash's loop with block size 1 (plain decoding).
- dflash   specflash's DFlash loop with the drafter and block size given.
- dflash-tree  the same drafter's candidates and prompt-lookup branches verified as a draft
           tree each step (treedecode.py); @N a fixed node budget, default auto.
- ngram    specflash's prompt-lookup proposer (n-grams of 3 down to 1 tokens).
- hf-ngram Hugging Face `generate(prompt_lookup_num_tokens=k, max_matching_ngram_size=3)`
           with the same k = block - 1 as `ngram`; each streamed chunk is one verify
           step, so its size is that step's acceptance length.
- zlab     the z-lab reference runtime (see `zlab.py`) on the same target, drafter
           folder and prompt ids.
A method that cannot run raises `MethodUnavailable` with the reason when it is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..runtime.config import DecodeConfig
from ..runtime.decode import SpeculativeDecoder
from ..errors import CheckpointError
from ..runtime.metrics import SpecStats
from ..runtime.proposers.base import Proposal, Proposer
from ..hf.target import TargetModel
from .names import METHODS

class MethodUnavailable(Exception):
    """This method cannot run with this target / drafter / machine; the message says why."""


@dataclass
class Run:
    token_ids: list[int]
    stats: SpecStats
    drafts: list[list[int]] | None = None  # greedy draft tokens per verify step, when recorded
    tokens_past_limit: int = 0  # tokens a runtime returned beyond max_new_tokens (dropped)


@dataclass
class BenchContext:
    """What the methods share: the loaded target and the settings of the run."""

    target: TargetModel
    target_folder: Path
    draft_folder: Path | None  # None: no DFlash drafter (reason in draft_problem)
    draft_problem: str | None = None
    block_size: int | str | None = None  # dflash: int, 'auto' or None (= auto); zlab: int or the drafter's
    ngram_block_size: int = 8
    device: str = "cpu"
    dtype: str = "float32"
    threads: int = 1
    workdir: Path = Path(".")
    zlab_python: Path | None = None
    zlab_venv: Path | None = None
    say: object = print
    info: dict = field(default_factory=dict)


class Method:
    name = ""
    has_drafts = False
    block_size: int | None = None

    def run(self, prompt_ids: list[int], config: DecodeConfig, record_drafts: bool = False) -> Run:
        raise NotImplementedError

    def close(self) -> None:
        pass


# ------------------------------------------------------------- Hugging Face
class _Arrivals:
    """A transformers streamer noting when each chunk of new tokens arrives."""

    def __init__(self):
        self.chunks: list[tuple[float, int]] = []
        self._prompt_seen = False

    def put(self, value) -> None:
        if not self._prompt_seen:  # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.chunks.append((time.perf_counter(), int(value.numel())))

    def end(self) -> None:
        pass


class HFMethod(Method):
    def __init__(self, name: str, target: TargetModel, lookup_tokens: int | None = None):
        self.name = name
        self.target = target
        self.lookup_tokens = lookup_tokens
        self.has_drafts = lookup_tokens is not None
        self.block_size = lookup_tokens + 1 if lookup_tokens is not None else 1

    def run(self, prompt_ids: list[int], config: DecodeConfig, record_drafts: bool = False) -> Run:
        target = self.target
        target.set_taps(())  # no hooks left over from a DFlash run
        eos = list(config.stop_token_ids if config.stop_token_ids is not None else target.eos_token_ids)
        kwargs: dict = {"max_new_tokens": config.max_new_tokens, "eos_token_id": eos or None,
                        "pad_token_id": eos[0] if eos else 0}
        if config.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=config.temperature,
                          top_p=config.top_p if config.top_p < 1.0 else None, top_k=config.top_k or None)
        if self.lookup_tokens is not None:
            kwargs.update(prompt_lookup_num_tokens=self.lookup_tokens, max_matching_ngram_size=3)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=target.device)
        clock = _Arrivals()
        with torch.inference_mode(), target.stock_kernels():  # the baseline runs transformers as shipped
            t0 = time.perf_counter()
            out = target.model.generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **kwargs)
        tokens = out[0, len(prompt_ids):].tolist()
        # transformers 5.2's prompt lookup does not cap its candidates by the room left, so an
        # accepted block can end past max_new_tokens; the same-output check compares what was asked.
        extra = max(0, len(tokens) - config.max_new_tokens)
        tokens = tokens[:config.max_new_tokens]
        stats = SpecStats(num_new_tokens=len(tokens))
        if clock.chunks:
            stats.time_to_first_token_s = clock.chunks[0][0] - t0
            stats.decode_time_s = clock.chunks[-1][0] - clock.chunks[0][0]
            stats.first_step_tokens = clock.chunks[0][1]
            if self.has_drafts:
                stats.acceptance_lengths.extend(n for _, n in clock.chunks)
        return Run(tokens, stats, tokens_past_limit=extra)


# ------------------------------------------------------------------ specflash
class _Recorder:
    """A proposer that passes everything through and notes the proposed tokens."""

    def __init__(self, inner: Proposer):
        self.inner = inner
        self.name = inner.name
        self.drafts: list[list[int]] = []

    @property
    def layer_ids(self) -> tuple[int, ...]:
        return self.inner.layer_ids

    def reset(self, prompt_ids, features) -> None:
        self.inner.reset(prompt_ids, features)

    def commit(self, tokens, features) -> None:
        self.inner.commit(tokens, features)

    def propose(self, anchor, position, num_tokens, sampler) -> Proposal:
        proposal = self.inner.propose(anchor, position, num_tokens, sampler)
        self.drafts.append([int(t) for t in proposal.tokens.tolist()])
        return proposal


class SpecflashMethod(Method):
    """Our loop. `block` is an int (fixed), 'auto' (cost-aware, see `blockpolicy`) or None
    (the proposer's own block, fixed). `costs` (the cost model: bare forward times) gives
    the engine efficiency of every run."""

    def __init__(self, name: str, target: TargetModel, proposer: Proposer | None, block: int | str | None,
                 say=None, tree: int | str | None = None):
        from ..perf.measure import load_or_measure
        from ..runtime.blockpolicy import make_policy
        from ..runtime.loading import choose_verify_kernels
        from ..runtime.treepolicy import make_tree_policy

        self.name = name
        self.target = target
        self.proposer = proposer
        choose_verify_kernels(target, proposer, log=say)  # this machine's verify kernels, before any cost
        self.block_size, self.policy = make_policy(block, target, proposer, log=say)
        tree_policy = make_tree_policy(tree, target, proposer, log=say)  # tree: a draft tree per step
        if tree_policy is not None:
            self.policy = tree_policy
        self.policy_name = self.policy.name if proposer is not None else "fixed"
        self.has_drafts = proposer is not None
        self.decoder = SpeculativeDecoder(target, proposer, self.block_size, self.policy)
        widest = max(self.block_size, getattr(tree_policy, "max_nodes", 0) + 1, 1)
        self.costs = getattr(self.policy, "costs", None) or load_or_measure(target, proposer, max_tokens=widest,
                                                                           log=say)

    def run(self, prompt_ids: list[int], config: DecodeConfig, record_drafts: bool = False) -> Run:
        if record_drafts and self.proposer is not None:
            recorder = _Recorder(self.proposer)
            # Fixed block: every step drafts, so the drafts line up with the reference runtime's;
            # full LM head (the published format, as the reference runtime reads the folder), not
            # the drafter's own draft vocabulary.
            drafter = getattr(self.proposer, "drafter", None)
            vocab = getattr(drafter, "draft_vocab", None)
            if vocab is not None:
                drafter.draft_vocab = None
            try:
                result = SpeculativeDecoder(self.target, recorder, self.block_size).generate(prompt_ids, config)
            finally:
                if vocab is not None:
                    drafter.draft_vocab = vocab
            return Run(result.token_ids, result.stats, recorder.drafts)
        result = self.decoder.generate(prompt_ids, config)
        return Run(result.token_ids, result.stats)


# ------------------------------------------------------------------ z-lab
class ZlabMethod(Method):
    name = "zlab"
    has_drafts = True

    def __init__(self, ctx: BenchContext):
        from .zlab import ZlabRuntime, ZlabUnavailable, ensure_zlab_python

        if ctx.draft_folder is None:
            raise MethodUnavailable(f"needs a DFlash drafter folder ({ctx.draft_problem})")
        try:
            python = ctx.zlab_python or ensure_zlab_python(ctx.zlab_venv, say=ctx.say)
            block = ctx.block_size if isinstance(ctx.block_size, int) else None  # auto: the drafter's block
            setup = {"target": str(ctx.target_folder), "draft": str(ctx.draft_folder), "device": ctx.device,
                     "dtype": ctx.dtype, "threads": ctx.threads, "block_size": block}
            self.runtime = ZlabRuntime(python, setup, ctx.workdir / "zlab-driver.log")
        except ZlabUnavailable as exc:
            raise MethodUnavailable(str(exc)) from None
        self.block_size = self.runtime.block_size
        self.versions = self.runtime.versions
        self.load_report = self.runtime.load_report
        self.stop_token_ids = list(ctx.target.eos_token_ids)

    def check_drafter(self, folder: Path, workdir: Path, seed: int = 0) -> dict:
        """Both runtimes' drafter forward on the same random inputs (40 context features, one
        block at the positions after them): how far apart are the hidden states?"""
        from ..drafter.model import DFlashDrafter

        drafter = DFlashDrafter.from_pretrained(folder, dtype=torch.float32)
        generator = torch.Generator().manual_seed(seed)
        features = torch.randn(1, 40, drafter.fc.weight.shape[1], generator=generator)  # [1, c, K*H_t]
        embeds = torch.randn(1, self.block_size, drafter.config.hidden_size, generator=generator) * 0.05
        with torch.inference_mode():
            hidden = drafter(embeds, torch.arange(40, 40 + self.block_size)[None], features,
                             torch.arange(40)[None], drafter.new_cache(capacity=64))  # [1, q, H]
        path = Path(workdir) / "drafter-io.pt"
        torch.save({"features": features, "block_embeds": embeds, "hidden": hidden}, path)
        return self.runtime.generate({"op": "drafter_io", "path": str(path.resolve())})

    def run(self, prompt_ids: list[int], config: DecodeConfig, record_drafts: bool = False) -> Run:
        from .zlab import ZlabUnavailable

        stop = list(config.stop_token_ids) if config.stop_token_ids is not None else self.stop_token_ids
        request = {"prompt_ids": list(prompt_ids), "max_new_tokens": config.max_new_tokens,
                   "temperature": config.temperature, "top_p": config.top_p, "top_k": config.top_k,
                   "seed": config.seed, "stop_token_ids": stop, "record_drafts": record_drafts}
        try:
            answer = self.runtime.generate(request)
        except ZlabUnavailable as exc:
            raise MethodUnavailable(str(exc)) from None
        tokens = answer["token_ids"]
        stats = SpecStats(num_new_tokens=len(tokens), time_to_first_token_s=answer["time_to_first_token_s"],
                          decode_time_s=answer["decode_time_s"])
        produced = 1  # the prefill's token
        for length in answer["acceptance_lengths"]:
            drafted = min(self.block_size - 1, config.max_new_tokens - produced)
            stats.record_step(drafted, min(length - 1, drafted))
            produced += length
        return Run(tokens, stats, answer.get("drafts"))

    def close(self) -> None:
        self.runtime.close()


# ------------------------------------------------------------------ factory
def build_method(name: str, ctx: BenchContext) -> Method:
    """The method called `name` (optionally NAME@B), ready to run; MethodUnavailable says why it cannot."""
    from ..runtime.loading import build_proposer
    from .names import split_method

    base, block = split_method(name)
    target = ctx.target
    if base == "hf":
        return HFMethod("hf", target)
    if base == "hf-ngram":
        return HFMethod("hf-ngram", target, lookup_tokens=ctx.ngram_block_size - 1)
    if base == "ar":
        return SpecflashMethod("ar", target, None, 1, say=ctx.say)
    if base == "ngram":
        return SpecflashMethod(name, target, build_proposer("ngram", target),
                               block if block is not None else ctx.ngram_block_size, say=ctx.say)
    if base == "dflash":
        if ctx.draft_folder is None:
            raise MethodUnavailable(f"needs a DFlash drafter ({ctx.draft_problem})")
        block = block if block is not None else (ctx.block_size or "auto")
        try:
            numeric = block if isinstance(block, int) else None
            proposer = build_proposer(str(ctx.draft_folder), target, block_size=numeric)
        except CheckpointError as exc:
            raise MethodUnavailable(str(exc)) from None
        return SpecflashMethod(name, target, proposer, block, say=ctx.say)
    if base == "dflash-tree":
        if ctx.draft_folder is None:
            raise MethodUnavailable(f"needs a DFlash drafter ({ctx.draft_problem})")
        try:
            proposer = build_proposer(str(ctx.draft_folder), target)
        except CheckpointError as exc:
            raise MethodUnavailable(str(exc)) from None
        return SpecflashMethod(name, target, proposer, None, say=ctx.say, tree=block if block is not None else "auto")
    if base == "zlab":
        return ZlabMethod(ctx)
    raise MethodUnavailable(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
