"""Putting a target and a drafter together: drafter configs sized for a target, random
drafters (a testing aid), compatibility checks, the proposer a `--draft` value means, and
the set-up steps that follow loading, each made once and handed on: the target's
fixed-shape steps (`setup_static_steps`, before proposers are built: a DFlash proposer
then gets its drafter's fixed-shape steps) and this machine's verify kernels
(`choose_verify_kernels`, before any cost is measured: the kernels change the costs)."""

from __future__ import annotations

from pathlib import Path

import torch

from ..drafter.config import DrafterConfig, default_target_layer_ids
from ..drafter.model import DFlashDrafter
from ..errors import CheckpointError, InputError
from ..hf.staticsteps import StaticDraftSteps
from ..hf.target import TargetModel, choose_mask_token_id
from ..perf.kernelchoice import KernelChoice, choose_kernels
from .blockpolicy import native_block
from .proposers import DFlashProposer, NgramProposer
from .proposers.base import Proposer

STATIC_STEP_CHOICES = ("auto", "on", "off")


def drafter_config_for_target(target: TargetModel, num_layers: int = 1, block_size: int = 16,
                              num_features: int | None = None, target_layer_ids: list[int] | None = None,
                              mask_token_id: int | None = None, intermediate_size: int | None = None) -> DrafterConfig:
    """A drafter config matching `target`'s width, heads, RoPE and vocabulary."""
    if target_layer_ids is None:
        n = num_features if num_features is not None else min(5, max(1, target.num_layers - 3))
        target_layer_ids = default_target_layer_ids(target.num_layers, n)
    return DrafterConfig(
        hidden_size=target.hidden_size,
        intermediate_size=int(intermediate_size or target.intermediate_size),
        num_hidden_layers=num_layers,
        num_attention_heads=target.num_attention_heads,
        num_key_value_heads=target.num_key_value_heads,
        head_dim=target.head_dim,
        vocab_size=target.vocab_rows,
        num_target_layers=target.num_layers,
        target_layer_ids=tuple(target_layer_ids),
        mask_token_id=choose_mask_token_id(target.tokenizer, target.vocab_rows) if mask_token_id is None
        else mask_token_id,
        block_size=block_size,
        rms_norm_eps=target.rms_norm_eps,
        rope_theta=target.rope_theta,
        max_position_embeddings=target.max_context,
        input_embedding_scale=target.embed_scale,
    )


def random_drafter(target: TargetModel, seed: int = 0, **config_kwargs) -> DFlashDrafter:
    """A randomly initialised drafter for `target` (for testing the loop and measuring overhead)."""
    config = drafter_config_for_target(target, **config_kwargs)
    generator = torch.Generator().manual_seed(seed)
    drafter = DFlashDrafter(config).init_weights(generator=generator)
    return drafter.to(device=target.device, dtype=target.dtype).eval()


def check_compatible(drafter: DFlashDrafter, target: TargetModel) -> None:
    """Raise CheckpointError listing every way `drafter` does not fit `target`."""
    cfg = drafter.config
    problems = []
    if cfg.hidden_size != target.hidden_size:
        problems.append(f"drafter hidden size {cfg.hidden_size} != target hidden size {target.hidden_size}")
    if cfg.num_target_layers != target.num_layers:
        problems.append(f"drafter was made for a target with {cfg.num_target_layers} layers, this one has "
                        f"{target.num_layers}")
    bad_ids = [i for i in cfg.target_layer_ids if not 0 <= i < target.num_layers]
    if bad_ids:
        problems.append(f"target_layer_ids {bad_ids} out of range for {target.num_layers} target layers")
    if not 0 <= cfg.mask_token_id < target.vocab_rows:
        problems.append(f"mask_token_id {cfg.mask_token_id} is not a row of the target's "
                        f"{target.vocab_rows}-row embedding")
    if problems:
        raise CheckpointError("drafter does not fit target " + str(target.name) + ": " + "; ".join(problems)
                              + ". Use a drafter trained for this target.")


def load_drafter(path: str | Path, target: TargetModel) -> DFlashDrafter:
    drafter = DFlashDrafter.from_pretrained(path, dtype=target.dtype, device=target.device)
    check_compatible(drafter, target)
    return drafter


DRAFT_CHOICES_HELP = ("default (the drafter shipped for the target), none (plain decoding), random (a random "
                      "drafter: a testing aid), ngram (prompt lookup), or a drafter folder / hub id")


def default_draft(target_name: str) -> str:
    """What an omitted --draft means: the shipped drafter when the target has one, else none."""
    from ..drafters import shipped_drafter

    return "default" if shipped_drafter(target_name) is not None else "none"


def dflash_proposer(drafter: DFlashDrafter, target: TargetModel) -> DFlashProposer:
    """A DFlash proposer for this drafter; when the target runs fixed-shape steps, with the
    drafter's own fixed-shape steps (made here, once: shallow copies of the proposer, as the
    server makes per request, share them and their CUDA graphs)."""
    static = target.static_steps
    steps = StaticDraftSteps(drafter, target, graphs=static.graphs) if static is not None else None
    return DFlashProposer(drafter, target, static_steps=steps)


def build_proposer(draft: str | None, target: TargetModel, seed: int = 0,
                   block_size: int | None = None) -> Proposer | None:
    """The proposer a `--draft` value names; None for plain decoding."""
    if draft is None or draft.lower() == "none":
        return None
    key = draft.lower()
    if key == "random":
        return dflash_proposer(random_drafter(target, seed=seed, block_size=max(block_size or 16, 2)), target)
    if key == "ngram":
        return NgramProposer()
    if key == "default":
        from ..drafters import shipped_drafter

        folder = shipped_drafter(target.name)
        if folder is None:
            raise InputError(f"no drafter is shipped for target {target.name!r}; pass --draft none, random, ngram "
                             "or a drafter folder (train one with `specflash train`)")
        return dflash_proposer(load_drafter(folder, target), target)
    if not draft.strip():
        raise InputError(f"--draft is empty; choose {DRAFT_CHOICES_HELP}")
    return dflash_proposer(load_drafter(draft, target), target)


def setup_static_steps(target: TargetModel, choice: str = "auto", say=None) -> str:
    """Turn the target's fixed-shape steps on or off as a --static-steps choice says and
    return the resulting `step_mode`: 'auto' turns them on for CUDA devices when the target
    supports them (else says why not), 'on' always (an error if unsupported; on a CPU the
    same fixed-shape steps run without graphs, no faster: a way to test them), 'off' never.
    Call it before building proposers."""
    choice = str(choice).strip().lower()
    if choice not in STATIC_STEP_CHOICES:
        raise InputError(f"--static-steps must be one of {', '.join(STATIC_STEP_CHOICES)} (got {choice!r})")
    if choice == "off" or (choice == "auto" and target.device.type != "cuda"):
        target.disable_static_steps()
        return target.step_mode
    try:
        target.enable_static_steps(graphs=True)
    except InputError as exc:
        if choice == "on":
            raise
        if say is not None:
            say(f"CUDA graphs off: {exc}")
    return target.step_mode


def choose_verify_kernels(target: TargetModel, proposer: Proposer | None, log=None) -> KernelChoice:
    """This machine's few-row verify kernels for the proposer's block (perf/kernelchoice.py:
    measured once per model and machine, then cached), handed to the target; plain decoding
    keeps the target's kernels. Call it before any cost is measured."""
    if proposer is None:
        return target.kernel_choice
    choice = choose_kernels(target, max_tokens=native_block(proposer), log=log)
    target.set_kernel_choice(choice)
    return choice
