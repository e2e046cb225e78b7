"""Putting a target and a drafter together: drafter configs sized for a target, random
drafters (a testing aid), compatibility checks, what a `--draft` value means
(`resolve_draft`, the one place that reads it) and the proposer it builds, and
the set-up steps that follow loading, each made once and handed on: the target's
fixed-shape steps (`setup_static_steps`, before proposers are built: a DFlash proposer
then gets its drafter's fixed-shape steps) and this machine's verify kernels
(`choose_verify_kernels`, before any cost is measured: the kernels change the costs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..drafter.checkpoint import drafter_folder
from ..drafter.config import DrafterConfig, default_target_layer_ids
from ..drafter.model import DFlashDrafter
from ..errors import CheckpointError, InputError
from ..hf.staticsteps import StaticDraftSteps
from ..hf.target import TargetModel, choose_mask_token_id
from ..perf.kernelchoice import KernelChoice, choose_kernels
from .blockpolicy import native_block
from .config import parse_block_size
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
RANDOM_DRAFTER_BLOCK = 16


@dataclass(frozen=True)
class DraftChoice:
    """What a `--draft` value names: kind 'none' (plain decoding), 'random' (a random drafter),
    'ngram' (prompt lookup) or 'drafter' (a DFlash drafter in the local `folder`)."""

    kind: str
    folder: Path | None = None


def resolve_draft(draft: str | None, target_name: str | None) -> DraftChoice:
    """The one reading of a `--draft` value, for every command and entry point: None or
    'none', 'random', 'ngram', 'default' (the drafter shipped for `target_name`; an
    InputError when there is none), a drafter folder, or a hub id (fetched into the hub
    cache; a CheckpointError when it is neither a folder nor fetchable, e.g. offline)."""
    if draft is None:
        return DraftChoice("none")
    key = str(draft).strip().lower()
    if not key:
        raise InputError(f"--draft is empty; choose {DRAFT_CHOICES_HELP}")
    if key in ("none", "random", "ngram"):
        return DraftChoice(key)
    if key == "default":
        from ..drafters import shipped_drafter

        folder = shipped_drafter(target_name)
        if folder is None:
            raise InputError(f"no drafter is shipped for target {target_name!r}; pass --draft none, random, ngram "
                             "or a drafter folder (train one with `specflash train`)")
        return DraftChoice("drafter", folder)
    return DraftChoice("drafter", drafter_folder(draft))


def default_draft(target_name: str, otherwise: str = "none") -> str:
    """What an omitted --draft means: the shipped drafter when the target has one, else
    `otherwise` (none for generate and serve, random for bench)."""
    from ..drafters import shipped_drafter

    return "default" if shipped_drafter(target_name) is not None else otherwise


def random_drafter_block(*block_sizes: int | str | None) -> int:
    """The block of a `--draft random` drafter: the largest fixed block asked for, so that
    each fits it (see `make_policy`), else 16; at least 2 (a block of 1 drafts nothing)."""
    sizes = [b for b in block_sizes if isinstance(b, int)]
    return max(max(sizes, default=RANDOM_DRAFTER_BLOCK), 2)


def dflash_proposer(drafter: DFlashDrafter, target: TargetModel) -> DFlashProposer:
    """A DFlash proposer for this drafter; when the target runs fixed-shape steps, with the
    drafter's own fixed-shape steps (made here, once: shallow copies of the proposer, as the
    server makes per request, share them and their CUDA graphs)."""
    static = target.static_steps
    steps = StaticDraftSteps(drafter, target, graphs=static.graphs) if static is not None else None
    return DFlashProposer(drafter, target, static_steps=steps)


def build_proposer(draft: str | None, target: TargetModel, seed: int = 0,
                   block_size: int | None = None) -> Proposer | None:
    """The proposer a `--draft` value names (see `resolve_draft`); None for plain decoding.
    A fixed `block_size` must fit a loaded drafter's block (checked here, before anything
    is measured); a random drafter is made to fit it."""
    choice = resolve_draft(draft, target.name)
    if choice.kind == "none":
        return None
    if choice.kind == "ngram":
        return NgramProposer()
    if choice.kind == "random":
        drafter = random_drafter(target, seed=seed, block_size=random_drafter_block(block_size))
        return dflash_proposer(drafter, target)
    drafter = load_drafter(choice.folder, target)
    parse_block_size(block_size, limit=drafter.block_size)
    return dflash_proposer(drafter, target)


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
