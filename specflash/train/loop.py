"""The drafter training loop: AdamW, cosine schedule with warm-up, gradient clipping and
accumulation, DDP through torchrun (gloo on CPU, nccl on GPU), checkpoints that resume
exactly (model, optimizer, step, data position), a progress bar, a JSONL log, a loss-curve
PNG, held-out offline acceptance with its standard error, and export in the published
checkpoint format.

Every pass over the data draws fresh anchors and a fresh order: both are pure functions of
(seed, pass number, row id), and the pass number counts across a whole lineage of runs
(a run continued with --init-from starts counting where its source stopped), so no two
passes anywhere in a drafter's history repeat the same (context, block) pairs."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pickle
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..drafter import DrafterConfig
from ..devices import resolve_device
from ..drafter import DRAFT_VOCAB_NAME, DFlashDrafter, DraftHead, read_draft_vocab
from ..errors import InputError
from ..runtime.loading import drafter_config_for_target
from ..hf.target import TargetModel
from .objective import (
    VocabSubset,
    acceptance_from_hits,
    decode_walk,
    block_training_mask,
    build_blocks,
    cosine_lr,
    block_soft_targets,
    sample_anchors,
    valid_anchors,
    weighted_block_loss,
)
from ..data.corpus import features_path, read_manifest, shard_files
from ..data.feature_cache import DEFAULT_CACHE_DTYPE
from .relabel import stale_label_rows
from .shards import Example, ShardDataset


@dataclass
class TrainConfig:
    data: list[str]
    out: str
    target: str = "smollm2-135m-instruct"
    num_layers: int = 1
    block_size: int = 16
    target_layer_ids: list[int] | None = None  # default: what the data folder recorded
    anchors_per_sequence: int = 128
    epochs: float = 6  # passes over the training rows; a fraction: that share of one pass, the schedule ending there
    lr: float = 6e-4
    warmup_fraction: float = 0.04
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 4  # sequences per optimizer step on each process
    max_length: int = 1024
    draft_vocab: int = 16384  # 0: full vocabulary in the loss
    gamma: float | None = None
    loss_positions: int | None = None  # supervise block positions 1..L only (default: all B-1)
    distill: float = 0.0  # share of each position's loss that distils the target's top-k distribution
    distill_temperature: float = 1.0
    feature_noise: float = 0.0  # std of Gaussian noise on the features in training, relative to their RMS
    held_out_fraction: float | None = None  # None: 3%, raised up to 20% to hold out ~eval_sequences rows
    eval_every: int = 200
    eval_sequences: int = 256  # held-out rows per estimate (and as many training rows)
    train_estimate: bool = True  # also estimate on training sequences: the gap to held-out is memorization
    save_every: int = 100
    log_every: int = 10
    max_steps: int | None = None  # stop early (the schedule still spans all epochs)
    evaluate_only: bool = False  # scoring drafters (`train compare`): a split with no training rows is fine
    init: str = "random"  # or "target": copy the target's last layers
    init_from: str | None = None  # warm start: an exported drafter folder, or an earlier run (weights + AdamW moments)
    standardize_features: bool = True  # train fc on features / their RMS (folded into fc.weight on export)
    cache_features: bool = True  # features missing beside the data are computed once up front, not in every step
    cache_dtype: str = DEFAULT_CACHE_DTYPE  # how those are stored: "float16" or "float8" (data/feature_cache.py)
    precision: str = "auto"  # "fp32", "bf16" (autocast), or "auto": bf16 on GPUs and CPUs with bf16 units
    seed: int = 0
    exclude_ids_file: str | None = None  # ids (one per line) never trained on, e.g. benchmark prompts
    train_sources: tuple[str, ...] | None = None  # train only on rows of these prompt sets (None: all)
    device: str = "auto"  # auto (a GPU when there is one), cpu, cuda, cuda:N

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse settings no run could use, with the flag to fix (checked once, here)."""
        if not self.epochs > 0:
            raise InputError(f"--epochs must be positive (a fraction: part of one pass), got {self.epochs}")
        if self.block_size < 2:
            raise InputError(f"--block-size must be at least 2, got {self.block_size}")
        if not 0 <= self.warmup_fraction < 1:
            raise InputError(f"--warmup-fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.loss_positions is not None and not 1 <= self.loss_positions <= self.block_size - 1:
            raise InputError(f"--loss-positions must be between 1 and block size - 1 = {self.block_size - 1}, "
                             f"got {self.loss_positions}")
        if not 0 <= self.distill <= 1:
            raise InputError(f"--distill must be between 0 (off) and 1 (distillation only), got {self.distill}")
        if not 0 <= self.feature_noise <= 10:
            raise InputError(f"--feature-noise must be between 0 (off) and 10, got {self.feature_noise}")
        if not 0 <= self.weight_decay < 1:
            raise InputError(f"--weight-decay must be in [0, 1), got {self.weight_decay}")
        if not self.distill_temperature > 0:
            raise InputError(f"--distill-temperature must be positive, got {self.distill_temperature}")
        if self.held_out_fraction is not None and not 0 <= self.held_out_fraction <= 1:
            raise InputError(f"--held-out-fraction must be in [0, 1], got {self.held_out_fraction}")
        if self.init not in ("random", "target"):
            raise InputError(f"--init must be random or target, got {self.init!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise InputError(f"unknown precision {self.precision!r}; choose auto, fp32 or bf16")

    @classmethod
    def from_dict(cls, saved: dict) -> "TrainConfig":
        """A config saved in a checkpoint; fields of older versions that no longer exist are dropped."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in saved.items() if k in known})


def _rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def init_distributed(device: torch.device | None = None) -> tuple[int, int]:
    """Join the torchrun process group when launched by torchrun: nccl when training on
    GPUs, gloo on CPUs (also on a GPU machine told --device cpu)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        if not torch.distributed.is_initialized():
            backend = "nccl" if device is not None and device.type == "cuda" else "gloo"
            if backend == "nccl":
                torch.cuda.set_device(device)
            if backend == "gloo" and os.environ.get("LOCAL_WORLD_SIZE") == os.environ["WORLD_SIZE"]:
                # All ranks on this machine: talk over loopback rather than whatever interface the
                # hostname resolves to (in containers and sandboxes that one may not accept connections).
                os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
            torch.distributed.init_process_group(backend=backend)
    return _rank_world()


def shutdown_distributed(clean: bool = True) -> None:
    """Leave the process group explicitly: a gloo group torn down at interpreter exit can
    abort the process (SIGABRT) while its peers are still finishing. After a clean run every
    rank first meets at a barrier, so no rank tears its end down while a peer still talks to
    it (a 2-rank CPU run has hung in teardown without one); after an error the group is left
    to the exiting process, since a collective teardown would wait for peers that may never
    come."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        if not clean:
            return
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def cpu_has_bf16_units() -> bool:
    """True on CPUs with native bf16 matrix instructions (AMX or AVX512-BF16); elsewhere bf16
    matmuls are emulated and much slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "fp32":
        return False
    if precision != "auto":
        raise InputError(f"unknown precision {precision!r}; choose auto, fp32 or bf16")
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16_units())


def data_layer_ids(folders: list[str]) -> list[int] | None:
    """The target layers the data folders tapped (their meta.json); folders that disagree
    cannot train one drafter."""
    found: dict[str, list[int]] = {}
    for folder in folders:
        meta = Path(folder) / "meta.json"
        if meta.exists():
            ids = json.loads(meta.read_text()).get("layer_ids")
            if ids:
                found[folder] = [int(i) for i in ids]
    if len({tuple(ids) for ids in found.values()}) > 1:
        raise InputError("the data folders tapped different target layers ("
                         + "; ".join(f"{f}: {ids}" for f, ids in found.items())
                         + "); train on folders regenerated with the same --layer-ids / --num-features")
    return next(iter(found.values()), None)


def check_feature_width(dataset: ShardDataset, index: int, drafter: DFlashDrafter) -> None:
    """Stored features must be as wide as the drafter's fc expects (K tapped layers x hidden)."""
    features = dataset[index].features
    expected = drafter.fc.in_features
    if features is not None and features.shape[-1] != expected:
        folder = dataset.rows[index].shard.parent
        raise InputError(f"the features stored in {folder} are {features.shape[-1]} wide, but a drafter tapping "
                         f"target layers {list(drafter.target_layer_ids)} needs {expected}: the data was "
                         "regenerated with other layers. The drafter taps the layers in the data folder's "
                         "meta.json (written by `specflash train data`; without it, the default layers): restore "
                         "that file, or regenerate the data")


def init_from_target(drafter: DFlashDrafter, target: TargetModel) -> None:
    """Copy the target's last decoder layers (and final norm) into the drafter where the
    shapes match; q_norm / k_norm stay at 1."""
    n = len(drafter.layers)
    with torch.no_grad():
        for i, layer in enumerate(drafter.layers):
            source = target.decoder_layer_state(target.num_layers - n + i)
            for name, param in layer.named_parameters():
                if name in source and source[name].shape == param.shape:
                    param.copy_(source[name])
        norm = target.final_norm_state().get("weight")
        if norm is not None and norm.shape == drafter.norm.weight.shape:
            drafter.norm.weight.copy_(norm)


SHAPE_FIELDS = ("hidden_size", "target_layer_ids", "intermediate_size", "num_attention_heads",
                "num_key_value_heads")


def check_same_shape(drafter: DFlashDrafter, theirs: DrafterConfig, source: str | Path) -> None:
    """A warm start needs the source's width and tapped layers; the number of draft layers may
    differ (only upwards, which the callers check), and so may the block size, which no weight
    depends on (the run trains and exports the drafter at its own --block-size; in-block
    attention is bidirectional, so a drafter serves well only at the block it trained at)."""
    for name in SHAPE_FIELDS:
        a, b = getattr(drafter.config, name, None), getattr(theirs, name, None)
        if a != b:
            raise InputError(f"--init-from {source}: its {name} is {b}, this run's is {a}; "
                             f"start from a drafter of the same shape or drop --init-from")


def checkpoint_to_init_from(path: str) -> Path | None:
    """The training checkpoint that `--init-from` names, or None when it names an exported
    drafter folder: a `.pt` file, or an earlier run's folder (its checkpoints/last.pt)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".pt":
        return p
    if not (p / "config.json").is_file() and (p / "checkpoints" / "last.pt").is_file():
        return p / "checkpoints" / "last.pt"
    return None


def init_from_checkpoint(drafter: DFlashDrafter, path: Path) -> tuple[dict, torch.Tensor | None, int]:
    """Warm start from an earlier run's training checkpoint: its weights and feature scale
    exactly as they were being trained (nothing folded), and the optimizer state returned to
    be carried over (`carry_optimizer_moments`). A drafter with more layers than the
    checkpoint's grows as from an exported drafter (`silence_new_layers`), and its old
    weights keep their moments (`moments_by_name`). Also returned: the run's draft vocabulary (None when
    neither the checkpoint nor the run's exported drafter has one) and its lineage's pass
    count (UNKNOWN_LINEAGE_PASSES for checkpoints from before the count). A fresh AdamW restarts
    with steps of about the learning rate on every weight whatever its gradient, which set
    earlier warm starts back by a few thousand steps; the carried moments keep the steps the
    size they had."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
        saved, moments = state["drafter"], state["optimizer"]
        config = DrafterConfig.from_dict(state["drafter_config"])
    except (OSError, RuntimeError, KeyError, TypeError, EOFError, pickle.UnpicklingError) as err:
        raise InputError(f"--init-from {path}: not a readable specflash training checkpoint ({err}); pass an "
                         f"earlier run's folder, its checkpoints/last.pt, or an exported drafter folder") from err
    check_same_shape(drafter, config, path)
    params = dict(drafter.named_parameters())
    its = len({k.split(".")[1] for k in saved if k.startswith("layers.")})
    refuse_shrinking(path, its, len(drafter.layers))
    old_names = [name for name in saved if name in params]  # the source's parameters, in its order
    new = {name for name in params if name not in saved}
    if (any(saved[name].shape != params[name].shape for name in old_names)
            or not all(in_grown_layer(name, its) for name in new)):
        raise InputError(f"--init-from {path}: the checkpoint's weights do not fit this run's drafter "
                         f"(shapes differ); continue it with the settings it was trained with")
    with torch.no_grad():
        for name in old_names:
            params[name].copy_(saved[name].to(params[name]))
        drafter.feature_scale.copy_(state["feature_scale"].to(drafter.feature_scale))
    silence_new_layers(drafter, its)
    if new:
        moments = moments_by_name(moments, old_names, [name for name, _ in drafter.named_parameters()])
    vocab = state.get("draft_vocab")
    exported = path.parent.parent / "drafter"  # checkpoints written before they kept the vocabulary
    if vocab is None and (exported / DRAFT_VOCAB_NAME).is_file():
        vocab = torch.as_tensor(read_draft_vocab(exported), dtype=torch.long)
    return moments, vocab, int(state.get("passes_total", UNKNOWN_LINEAGE_PASSES))


UNKNOWN_LINEAGE_PASSES = 1000  # a source that did not count its passes: number ours beyond any it could have made


def drafter_lineage_passes(source: str | Path) -> int:
    """Passes over data already made in the lineage of an exported drafter (its
    training_info.json count); for a drafter that predates the count (a checkpoint without
    one likewise), UNKNOWN_LINEAGE_PASSES, so our anchors never repeat the seeds its passes
    used (those were numbered from 0 in every run)."""
    info = Path(source) / "training_info.json"
    if info.is_file():
        try:
            return int(json.loads(info.read_text()).get("passes_total", UNKNOWN_LINEAGE_PASSES))
        except (ValueError, TypeError):
            pass
    return UNKNOWN_LINEAGE_PASSES


def pass_seed(seed: int, pass_number: int, row_id: str) -> int:
    """The anchor seed of one row in one pass (a 63-bit hash of all three)."""
    import hashlib

    digest = hashlib.sha256(f"{seed}:{pass_number}:{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


LARGE_FILL_TOKENS = 2_000_000  # a features fill past this many tokens takes over an hour of a CPU core


def uncached_tokens(folder: str | Path) -> int:
    """Sequence tokens (prompts and answers) of a folder's shards without a features cache,
    from its manifest (0 for a folder without one)."""
    entries = read_manifest(folder).get("shards", {})
    missing = [entries.get(shard.name, {}) for shard in shard_files(folder) if not features_path(shard).exists()]
    return sum(entry.get("prompt_tokens", 0) + entry.get("response_tokens", 0) for entry in missing)


def held_out_fraction(config: "TrainConfig", dataset: ShardDataset) -> float:
    """The configured fraction, or by default 3% raised (up to 20%) until about
    config.eval_sequences target-written rows are held out: an estimate over 32 sequences
    has a standard error (~0.07 tau) larger than most differences between runs."""
    if config.held_out_fraction is not None:
        return config.held_out_fraction
    own = sum(1 for r in dataset.rows if r.greedy_answer)
    return min(0.2, max(0.03, config.eval_sequences / max(1, own)))


def carry_optimizer_moments(optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Take the per-parameter state (AdamW's moments and step counts) of a saved optimizer,
    keeping this run's hyper-parameters (learning rate, weight decay, betas)."""
    mine = optimizer.state_dict()
    mine["state"] = saved["state"]
    optimizer.load_state_dict(mine)


def init_from_drafter(drafter: DFlashDrafter, folder: str) -> torch.Tensor | None:
    """Warm start: copy every weight of an exported drafter of the same shape. The export
    folded the feature scale into fc.weight; it is unfolded with this run's scale, so the
    drafter computes the same function and trains on standardized features.

    A source with fewer draft layers (otherwise the same shape) grows: its layers fill the
    first ones, and each extra layer starts with zero output projections (attention o_proj,
    MLP down_proj), so it adds nothing to the residual stream and the grown drafter again
    computes the source's function; training then puts the new layer to use.
    Returns the source's draft vocabulary (None without one), which the run keeps."""
    source = DFlashDrafter.from_pretrained(folder)
    check_same_shape(drafter, source.config, folder)
    its = len(source.layers)
    refuse_shrinking(folder, its, len(drafter.layers))
    missing, unexpected = drafter.load_state_dict(source.state_dict(), strict=False)
    grown = {k for k in missing if in_grown_layer(k, its)}
    if set(missing) - grown or unexpected:
        raise InputError(f"--init-from {folder}: weights do not match (missing {sorted(set(missing) - grown)[:3]}, "
                         f"unexpected {unexpected[:3]})")
    with torch.no_grad():
        drafter.fc.weight.mul_(drafter.feature_scale.to(drafter.fc.weight.dtype)[None, :])
    silence_new_layers(drafter, its)
    return source.draft_vocab  # [N] target ids, or None: a full-vocabulary drafter


def refuse_shrinking(source: str | Path, its: int, ours: int) -> None:
    """A warm start's source with more draft layers than this run's drafter is refused."""
    if its > ours:
        raise InputError(f"--init-from {source}: it has {its} draft layers, this run {ours}; pass --num-layers "
                         f"{its} or more (a drafter can grow by layers, not shrink)")


def in_grown_layer(name: str, kept: int) -> bool:
    """Whether a parameter name ("layers.2.mlp.up_proj.weight") lies in a draft layer past the
    first `kept`: one that growing a `kept`-layer source adds."""
    return name.startswith("layers.") and int(name.split(".")[1]) >= kept


def silence_new_layers(drafter: DFlashDrafter, kept: int) -> None:
    """Zero the output projections (attention o_proj, MLP down_proj) of every draft layer past
    the first `kept`: a grown layer then adds nothing to the residual stream, so the grown
    drafter computes its source's function until training puts the layer to use."""
    with torch.no_grad():
        for layer in drafter.layers[kept:]:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()


def moments_by_name(saved: dict, old_names: list[str], new_names: list[str]) -> dict:
    """A saved optimizer state renumbered for a grown drafter: torch numbers a parameter's
    state by its place in parameters(), and the new layers' parameters shift the places of
    those after them. Each old parameter keeps its moments under its new number; the new
    ones start without (AdamW creates them at their first step)."""
    place = {name: i for i, name in enumerate(new_names)}
    state = {place[name]: saved["state"][i] for i, name in enumerate(old_names) if i in saved["state"]}
    return {**saved, "state": state}


@dataclass
class WarmStart:
    """What `--init-from` hands a run besides the weights it loads into the drafter."""

    moments: dict | None = None  # the source run's optimizer state (a checkpoint only)
    vocab: torch.Tensor | None = None  # [N] the draft vocabulary the source was trained on
    passes: int = 0  # passes over data made in the source's lineage


def warm_start(drafter: DFlashDrafter, source: str | None) -> WarmStart:
    """Load `--init-from` into the drafter: an earlier run's checkpoint (weights, feature scale,
    optimizer moments) or an exported drafter folder (weights, grown when it has fewer layers).
    Call after the run's own feature scale is set: an exported drafter's fc is unfolded with it."""
    if not source:
        return WarmStart()
    checkpoint = checkpoint_to_init_from(source)
    if checkpoint is not None:
        return WarmStart(*init_from_checkpoint(drafter, checkpoint))
    return WarmStart(None, init_from_drafter(drafter, source), drafter_lineage_passes(source))


def choose_draft_vocabulary(counts: torch.Tensor, size: int, inherited: torch.Tensor | None) -> VocabSubset:
    """The loss (and decoding) vocabulary: a warm start's own when it has one of this size, else
    the `size` most frequent labels in `counts` [V]. A warm start keeps the vocabulary its
    drafter learned to rank: a recount over new data swaps in tokens it was never trained
    against, whose logits are arbitrary (it moved one drafter's held-out estimate by -0.05
    and +0.05 in two runs)."""
    if inherited is not None and inherited.numel() == size:
        return VocabSubset(inherited, counts.numel())
    return VocabSubset.most_frequent(counts, size)


def for_distributed(drafter: DFlashDrafter, world: int, device: torch.device) -> torch.nn.Module:
    """The module the training step calls: the drafter, or a DDP wrapper of it under torchrun."""
    if world <= 1:
        return drafter
    return torch.nn.parallel.DistributedDataParallel(drafter, device_ids=[device] if device.type == "cuda" else None)


class Trainer:
    """One training run: data and split, the drafter and its warm start, the optimizer, then
    the loop (`fit`), checkpoints, estimates and export. The pieces it assembles are the
    functions above (warm_start, choose_draft_vocabulary, for_distributed)."""

    def __init__(self, config: TrainConfig, target: TargetModel | None = None, progress: bool = True):
        self.config = config
        self.rank, self.world = _rank_world()
        self.progress = progress and self.rank == 0
        self.out = Path(config.out)
        self.target = target or TargetModel.from_pretrained(config.target, device=resolve_device(config.device))
        for p in self.target.model.parameters():
            p.requires_grad_(False)
        layer_ids = config.target_layer_ids or data_layer_ids(config.data)
        drafter_config = drafter_config_for_target(self.target, num_layers=config.num_layers,
                                                   block_size=config.block_size, target_layer_ids=layer_ids)
        if config.cache_features:  # before the rows are read: the fill may relabel them
            self.fill_feature_cache(tuple(drafter_config.target_layer_ids))
        self.dataset = ShardDataset(config.data, max_length=config.max_length)
        exclude = set()
        if config.exclude_ids_file:
            exclude = {line.strip() for line in Path(config.exclude_ids_file).read_text().splitlines() if line.strip()}
        self.train_idx, self.eval_idx = self.dataset.split(held_out_fraction(config, self.dataset), exclude)
        if not self.train_idx and not config.evaluate_only:
            raise InputError("no training sequences left after the held-out split; regenerate more data")
        if config.train_sources:
            self.train_idx = only_sources(self.dataset, self.train_idx, config.train_sources)
        self.train_eval_idx = train_estimate_sample(self.dataset, self.train_idx, config.eval_sequences)
        unlabelled = self.dataset.unlabelled_human_rows()
        if unlabelled and self.rank == 0:
            print(f"warning: {unlabelled} teacher-forced (human) answers have no target greedy labels, so the "
                  "drafter learns their human tokens, which the target would often not write; run `specflash "
                  "train data` on the data folder(s) again to add the labels", flush=True)
        stale = stale_label_rows(config.data)
        if stale and self.rank == 0:
            print(f"warning: {stale} rows were written by a target in another dtype than float32 (e.g. `train data "
                  "--dtype bfloat16`) and keep its greedy tokens as labels, not the float32 target's that decoding "
                  "checks; run `specflash train relabel --data FOLDER` on the data folder(s) first", flush=True)
        if config.distill > 0 and self.dataset[self.train_idx[0]].topk_ids is None and self.rank == 0:
            print("warning: --distill needs the target's top-k logits beside the data (`specflash train data` "
                  "with the features and --topk); without them positions train on their labels alone", flush=True)
        torch.manual_seed(config.seed)
        self.drafter = DFlashDrafter(drafter_config).init_weights(
            generator=torch.Generator().manual_seed(config.seed)).to(self.target.device)
        check_feature_width(self.dataset, (self.train_idx or self.eval_idx)[0], self.drafter)
        if config.init == "target":
            init_from_target(self.drafter, self.target)
        from_checkpoint = bool(config.init_from) and checkpoint_to_init_from(config.init_from) is not None
        if config.standardize_features and not from_checkpoint:  # a checkpoint brings the scale it trained with
            rows = (self.train_idx or self.eval_idx)[:64]
            self.drafter.feature_scale.copy_(self.feature_rms(rows).to(self.drafter.feature_scale))
        start = warm_start(self.drafter, config.init_from)
        self.model = for_distributed(self.drafter, self.world, self.target.device)
        self.head = self.target.head_weight  # [V, H], frozen
        self.subset = None
        if config.draft_vocab:
            counts = self.dataset.token_counts(self.train_idx, self.target.vocab_rows)
            self.subset = choose_draft_vocabulary(counts, config.draft_vocab, start.vocab)
            self.subset_coverage = self.subset.coverage(counts)
            self.drafter.set_draft_vocab(self.subset.ids)  # exported with the drafter, used at decode time
        self.draft_head = DraftHead(self.drafter, self.target)
        self.optimizer = torch.optim.AdamW(self.drafter.parameters(), lr=config.lr,
                                           weight_decay=config.weight_decay)
        if start.moments is not None:
            carry_optimizer_moments(self.optimizer, start.moments)
        per_step = config.grad_accum * self.world
        self.steps_per_epoch = max(1, len(self.train_idx) // per_step)
        self.total_steps = max(1, round(self.steps_per_epoch * config.epochs))
        self.step = 0
        self.passes_before = start.passes  # passes made before this run, in its lineage
        self.tokens_seen = 0
        self.train_seconds = 0.0
        self.bf16 = use_bf16(config.precision, self.target.device)
        self._estimates: tuple[int, dict] | None = None  # (step, estimates()) of the current weights

    def fill_feature_cache(self, layer_ids: tuple[int, ...]) -> None:
        """Shards without cached features (a corpus on a new machine; `train data
        --no-features`) get them now, with the target's top-k logits: one teacher-forced
        pass, written beside the shards, instead of a target forward per sequence in every
        step. Shards that need the (float32) target's labels get them in the same pass
        (`cache_features`). Rank 0 writes; the other processes wait for it."""
        from .regenerate import cache_features

        folders = [folder for folder in self.config.data
                   if any(not features_path(shard).exists() for shard in shard_files(folder))]
        if folders and self.rank == 0:
            tokens = sum(uncached_tokens(folder) for folder in folders)
            if tokens >= LARGE_FILL_TOKENS:
                print(f"caching the target's features of {tokens / 1e6:.1f}M tokens before training: hours on a "
                      "CPU (about 470 tokens/s a core at float32). `specflash train cache --dtype bfloat16` is "
                      "~2.7x faster on CPUs with AMX and on GPUs; for an A/B or a compare, `specflash train subset` "
                      "copies out only the rows it reads", flush=True)
            for folder in folders:
                cache_features(self.target, folder, layer_ids, progress=self.progress,
                               cache_dtype=self.config.cache_dtype)
        if self.world > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def _autocast(self):
        return torch.autocast(self.target.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def feature_rms(self, indices: list[int]) -> torch.Tensor:
        """[K*H] root-mean-square of each feature dimension over some training sequences
        (the first position, often an attention sink with huge activations, left out)."""
        total = None
        count = 0
        for index in indices:
            features = self._features(self.dataset[index])[1:].double()
            if features.numel() == 0:
                continue
            part = features.pow(2).sum(0)
            total = part if total is None else total + part
            count += features.shape[0]
        if total is None:
            return torch.ones(self.drafter.feature_scale.shape)
        return (total / count).sqrt().clamp_min(1e-3).float()

    # ------------------------------------------------------------ checkpoint
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoints" / "last.pt"

    def save_checkpoint(self) -> None:
        if self.rank != 0:
            return
        path = self.checkpoint_path
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"drafter": self.drafter.state_dict(), "feature_scale": self.drafter.feature_scale,
                 "optimizer": self.optimizer.state_dict(), "step": self.step,
                 "draft_vocab": None if self.subset is None else self.subset.ids,
                 "tokens_seen": self.tokens_seen, "train_seconds": self.train_seconds,
                 "passes_before": self.passes_before, "passes_total": self.passes_total,
                 "config": dataclasses.asdict(self.config), "drafter_config": self.drafter.config.to_dict()}
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self) -> bool:
        if not self.checkpoint_path.exists():
            return False
        state = torch.load(self.checkpoint_path, map_location=self.target.device, weights_only=False)
        self.drafter.load_state_dict(state["drafter"])
        if "feature_scale" in state:
            self.drafter.feature_scale.copy_(state["feature_scale"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.tokens_seen = int(state.get("tokens_seen", 0))
        self.train_seconds = float(state.get("train_seconds", 0.0))
        self.passes_before = int(state.get("passes_before", self.passes_before))
        self._estimates = None
        return True

    # ------------------------------------------------------------ data order
    def _order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + self.passes_before + epoch)
        perm = torch.randperm(len(self.train_idx), generator=g).tolist()
        return [self.train_idx[i] for i in perm]

    def _micro_indices(self, step: int) -> list[int]:
        """Example indices this process trains on at optimizer step `step`."""
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self._order(epoch)
        per_step = self.config.grad_accum * self.world
        chunk = order[within * per_step:(within + 1) * per_step]
        return chunk[self.rank::self.world]

    def _anchor_generator(self, step: int, index: int) -> torch.Generator:
        """Anchors of a row in this step's pass: fresh in every pass of the lineage, and the
        same for a row whatever else the data holds (keyed by the row's id, not its index)."""
        epoch = step // self.steps_per_epoch
        return torch.Generator().manual_seed(pass_seed(self.config.seed, self.passes_before + epoch,
                                                       self.dataset.rows[index].id))

    def _noise_generator(self, step: int, index: int) -> torch.Generator:
        """Feature noise of a row at an optimizer step: fresh at every step, reproduced exactly
        on resume (a pure function of seed, step in the lineage's pass and row id)."""
        return torch.Generator().manual_seed(pass_seed(self.config.seed + 1_000_033, self.passes_before * 1_000_003
                                                       + step, self.dataset.rows[index].id))

    @property
    def passes_total(self) -> int:
        """Passes over the data in this drafter's lineage, the current one included once begun."""
        return self.passes_before + math.ceil(self.step / self.steps_per_epoch)

    # --------------------------------------------------------------- compute
    def _features(self, example: Example) -> torch.Tensor:
        if example.features is not None:
            return example.features.to(self.target.device, torch.float32)
        self.target.set_taps(self.drafter.target_layer_ids)
        with torch.no_grad():
            return self.target.forward(example.input_ids[None, :-1].to(self.target.device)).features[0].float()

    def _draft_hidden(self, example: Example, anchors: torch.Tensor, model=None, every_position: bool = False,
                      noise: torch.Generator | None = None):
        """The drafter's block outputs for `anchors` of `example`; with a `noise` generator
        (training only) the features get config.feature_noise x their RMS of Gaussian noise."""
        cfg = self.drafter.config
        blocks = build_blocks(example.input_ids, example.loss_mask, anchors, cfg.block_size, cfg.mask_token_id,
                              self.config.gamma, None if every_position else self.config.loss_positions,
                              greedy_ids=example.greedy_ids)
        features = self._features(example)  # [S-1, F]
        if noise is not None:
            scale = self.config.feature_noise * self.drafter.feature_scale.to(features.device)  # [F]
            features = features + torch.randn(features.shape, generator=noise).to(features.device) * scale
        device = self.target.device
        embeds = self.drafter.embed_block(blocks.ids[None].to(device), self.target.embed_raw, torch.float32)
        mask = block_training_mask(anchors, features.shape[0], cfg.block_size)[None, None].to(device)
        hidden = (model or self.model)(embeds, blocks.positions[None].to(device), features[None],
                                       torch.arange(features.shape[0], device=device)[None], None, mask)
        return hidden[0], blocks

    def train_step(self) -> dict:
        self.model.train()
        lr = cosine_lr(self.step, self.total_steps, self.config.lr, self.config.warmup_fraction)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        indices = self._micro_indices(self.step)
        total_loss, tokens = 0.0, 0
        correct = torch.zeros(self.config.block_size)
        count = torch.zeros(self.config.block_size)
        for index in indices:
            example = self.dataset[index]
            anchors = sample_anchors(example.loss_mask, self.config.block_size, self.config.anchors_per_sequence,
                                     self._anchor_generator(self.step, index))
            if anchors.numel() == 0:
                continue
            soft = None
            if self.config.distill > 0 and example.topk_ids is not None:
                soft = block_soft_targets(blocks_positions(anchors, self.config.block_size),
                                          int((~example.loss_mask).sum()), example.topk_ids, example.topk_logits,
                                          self.config.distill, self.config.distill_temperature)
            noise = self._noise_generator(self.step, index) if self.config.feature_noise > 0 else None
            with self._autocast():
                hidden, blocks = self._draft_hidden(example, anchors, noise=noise)
                loss, stats = weighted_block_loss(hidden, self.head, blocks, self.subset, soft=soft)
            (loss / len(indices)).backward()
            total_loss += loss.item() / len(indices)
            tokens += example.input_ids.numel()
            correct += stats["correct"]
            count += stats["count"]
        grad_norm = torch.nn.utils.clip_grad_norm_(self.drafter.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.tokens_seen += tokens * self.world
        acc = (correct / count.clamp_min(1))[1:]
        return {"step": self.step, "loss": total_loss, "lr": lr, "grad_norm": float(grad_norm),
                "tokens": tokens, "acc_first": float(acc[0]) if acc.numel() else 0.0,
                "acc_mean": float(acc.mean()) if acc.numel() else 0.0}

    @torch.no_grad()
    def evaluate(self, indices: list[int] | None = None, max_blocks_per_sequence: int = 64,
                 per_sequence: bool = False, walk_tokens: int = 0) -> dict:
        """Offline acceptance on held-out sequences: teacher-forced blocks against the
        target's own continuation (in a relabelled answer, the labelling target's greedy tokens),
        argmax over the drafter's vocabulary as at decode time. tau_estimate is the mean
        acceptance over anchors spread through each answer; with walk_tokens > 0, walk_tau is
        tokens per verify step of decoding each answer's first walk_tokens tokens (decode_walk),
        the figure `specflash bench` measures, from every anchor there."""
        self.drafter.eval()
        indices = (indices if indices is not None else self.eval_idx)[: self.config.eval_sequences]
        lengths, hits_all = [], []  # per sequence: [blocks] acceptance lengths, [blocks, B-1] reach
        scored = []  # ids of the sequences in `lengths`
        walks: dict[str, tuple[float, int]] = {}  # per sequence: (tokens, verify steps)
        for index in indices:
            example = self.dataset[index]
            if walk_tokens > 0:
                walk = self._walk(example, walk_tokens)
                if walk[1]:
                    walks[example.id] = walk
            anchors = valid_anchors(example.loss_mask, self.config.block_size)
            if anchors.numel() == 0:
                continue
            stride = max(1, math.ceil(anchors.numel() / max_blocks_per_sequence))
            anchors = anchors[::stride]
            with self._autocast():
                hidden, blocks = self._draft_hidden(example, anchors, model=self.drafter, every_position=True)
                pred = self.draft_head.greedy(hidden)  # [Q], from the draft vocabulary as at decode time
            b = self.config.block_size
            pred = pred.view(-1, b)[:, 1:].cpu()
            truth = blocks.labels.view(-1, b)[:, 1:]
            # Valid anchors keep every block inside the response, so a label is unknown (-100) only
            # in a relabelled answer, past where its text left the labelling target's greedy path
            # (build_blocks): the continuation decoding would verify is unknown there and counts as
            # a miss, so such a block's acceptance is a lower bound (low only if the drafter got
            # every known position right). Dropping those blocks instead would drop the uncertain
            # spots of the text (a third of the blocks at 2.6% differing labels, block 16).
            hits = pred == truth
            hits = hits[truth[:, 0] >= 0]
            if hits.numel():
                lengths.append(acceptance_from_hits(hits).float())
                scored.append(example.id)
                hits_all.append(hits.float().cumprod(dim=1))
        self.drafter.train()
        if not lengths:
            return {"tau_estimate": None, "tau_estimate_se": None, "blocks": 0, "sequences": 0}
        tau, se = clustered_mean([x.sum().item() for x in lengths], [x.numel() for x in lengths])
        reach = torch.cat(hits_all).mean(dim=0)  # P(first k drafts all right)
        result = {"tau_estimate": tau, "tau_estimate_se": se, "blocks": sum(x.numel() for x in lengths),
                  "sequences": len(lengths), "accept_through_position": [round(float(x), 4) for x in reach]}
        if walks:
            result["walk_tau"], result["walk_tau_se"] = clustered_mean([w[0] for w in walks.values()],
                                                                       [w[1] for w in walks.values()])
        if per_sequence:  # for paired comparisons of drafters on the same sequences
            result["per_sequence"] = {i: (x.sum().item(), x.numel()) for i, x in zip(scored, lengths)}
            if walks:
                result["walk_per_sequence"] = walks
        return result

    @torch.no_grad()
    def _walk(self, example, budget: int) -> tuple[float, int]:
        """(tokens, verify steps) of decoding the first `budget` tokens of one answer along the
        target's continuation: acceptance at every anchor from the first response token, blocks
        running past the answer's end counting their missing labels as misses (decoding stops
        at the end-of-turn token there)."""
        anchors = valid_anchors(example.loss_mask, self.config.block_size, whole_blocks=False)
        if anchors.numel() == 0:
            return 0.0, 0
        anchors = anchors[anchors < anchors[0] + budget]  # [n] consecutive positions of the answer
        with self._autocast():
            hidden, blocks = self._draft_hidden(example, anchors, model=self.drafter, every_position=True)
            pred = self.draft_head.greedy(hidden)  # [n * B]
        b = self.config.block_size
        hits = pred.view(-1, b)[:, 1:].cpu() == blocks.labels.view(-1, b)[:, 1:]  # [n, B-1]
        tokens, steps = decode_walk(acceptance_from_hits(hits), budget)
        return float(tokens), steps

    def estimates(self) -> dict:
        """The log's eval fields: the held-out estimate (eval_*) and, with train_estimate,
        the same estimate on training sequences (eval_train_*); a training-set figure far
        above the held-out one means the drafter is memorizing its data (more data, not
        more epochs, is then what raises decoded tau). Weights change only by a step, so the
        figures of the current step are kept: export after the run's last eval reuses them."""
        if self._estimates is not None and self._estimates[0] == self.step:
            return dict(self._estimates[1])
        record = {f"eval_{k}": v for k, v in self.evaluate().items()}
        if self.config.train_estimate and self.train_eval_idx:
            record.update({f"eval_train_{k}": v for k, v in self.evaluate(self.train_eval_idx).items()})
        self._estimates = (self.step, dict(record))
        return record

    # ------------------------------------------------------------------ run
    def fit(self, resume: bool = True) -> dict:
        from tqdm.auto import tqdm

        if resume and self.load_checkpoint() and self.rank == 0:
            print(f"resumed from {self.checkpoint_path} at step {self.step}", flush=True)
        self.out.mkdir(parents=True, exist_ok=True)
        log_path = self.out / "log.jsonl"
        last = self.total_steps if self.config.max_steps is None else min(self.total_steps, self.config.max_steps)
        bar = tqdm(total=last, initial=self.step, desc="training", unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        record: dict = {}
        if self.step == 0 and self.config.eval_every and last > 0:
            # Where the run starts (a warm start's drafter, or an untrained one): the
            # reference the later held-out estimates are read against.
            start = {"step": 0, **self.estimates()}
            if self.rank == 0:
                _append_json(log_path, start)
                train_part = (f"; training sequences: {format_estimate(start, 'eval_train_')}"
                              if "eval_train_tau_estimate" in start else "")
                print(f"held-out tau estimate at step 0: {format_estimate(start, 'eval_')}{train_part}", flush=True)
        window_tokens, window_start = 0, time.perf_counter()
        while self.step < last:
            t0 = time.perf_counter()
            record = self.train_step()
            self.train_seconds += time.perf_counter() - t0
            window_tokens += record["tokens"] * self.world
            if self.step % self.config.log_every == 0 or self.step == last:
                rate = window_tokens / max(1e-9, time.perf_counter() - window_start)
                record.update(tokens_per_s=rate, tokens_seen=self.tokens_seen, train_seconds=self.train_seconds)
                window_tokens, window_start = 0, time.perf_counter()
                if self.config.eval_every and (self.step % self.config.eval_every == 0 or self.step == last):
                    record.update(self.estimates())
                if self.rank == 0:
                    _append_json(log_path, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", acc1=f"{record['acc_first']:.2f}",
                                tok_s=f"{rate:.0f}")
            if self.step % self.config.save_every == 0 or self.step == last:
                self.save_checkpoint()
            bar.update(1)
        bar.close()
        if self.rank == 0:
            plot_loss_curve(log_path, self.out / "loss.png")
        return record


def blocks_positions(anchors: torch.Tensor, block_size: int) -> torch.Tensor:
    """anchors [A] -> [A * B] absolute positions of every block query, as build_blocks lays them out."""
    return (anchors[:, None] + torch.arange(block_size)[None, :]).flatten()


def clustered_mean(sums: list[float], counts: list[int]) -> tuple[float, float | None]:
    """Mean over blocks grouped in sequences, and its standard error with the sequence as
    the unit (blocks of one sequence are not independent): the ratio estimator's
    sqrt(m / (m - 1) * sum_i (s_i - mean * n_i)^2) / sum_i n_i. None with one sequence."""
    total = float(sum(counts))
    mean = sum(sums) / total
    m = len(sums)
    if m < 2:
        return mean, None
    spread = sum((s - mean * n) ** 2 for s, n in zip(sums, counts))
    return mean, math.sqrt(m / (m - 1) * spread) / total


def paired_difference(a: dict[str, tuple[float, int]], b: dict[str, tuple[float, int]]) -> tuple[float, float | None]:
    """Difference of two drafters' estimates (b - a) on the sequences both scored, with its
    standard error from the per-sequence differences (sequence as the unit): far smaller
    than either estimate's own error, since both face the same hard and easy sequences.
    Each value is (sum, count) and each estimate the ratio sum / count; the counts may differ
    between the two (verify steps of a decode walk): the error is then the linearized one of
    the difference of the two ratio estimators, which is clustered_mean's of the per-sequence
    differences when the counts agree (blocks of the same anchors)."""
    common = sorted(set(a) & set(b))
    if not common:
        raise InputError("the two evaluations share no sequence; compare them on the same data")
    count_a, count_b = float(sum(a[k][1] for k in common)), float(sum(b[k][1] for k in common))
    mean_a, mean_b = sum(a[k][0] for k in common) / count_a, sum(b[k][0] for k in common) / count_b
    m = len(common)
    if m < 2:
        return mean_b - mean_a, None
    residuals = [(b[k][0] - mean_b * b[k][1]) / count_b - (a[k][0] - mean_a * a[k][1]) / count_a for k in common]
    return mean_b - mean_a, math.sqrt(m / (m - 1) * sum(r * r for r in residuals))


def source_of(row_id: str) -> str:
    """A row's prompt set: the part of its id before the first ':' ("sharegpt:uXAT1cn_0" ->
    "sharegpt"; an id without one is its own source "other")."""
    return row_id.split(":", 1)[0] if ":" in row_id else "other"


def only_sources(dataset: ShardDataset, indices: list[int], sources: tuple[str, ...]) -> list[int]:
    """The rows among `indices` whose prompt set is one of `sources` (`fit --train-sources`:
    e.g. only what a corpus added since the last run); a clear error when none is left."""
    kept = [i for i in indices if source_of(dataset.rows[i].id) in sources]
    if not kept:
        present = sorted({source_of(dataset.rows[i].id) for i in indices})
        raise InputError(f"--train-sources {','.join(sources)} matches no training row; the data's prompt sets "
                         f"are: {', '.join(present)}")
    return kept


def by_source(per_sequence: dict[str, tuple[float, int]]) -> dict[str, dict[str, tuple[float, int]]]:
    """Per-sequence scores grouped by prompt set (`source_of` each row id)."""
    groups: dict[str, dict[str, tuple[float, int]]] = {}
    for key, value in per_sequence.items():
        groups.setdefault(source_of(key), {})[key] = value
    return dict(sorted(groups.items()))


def train_estimate_sample(dataset: "ShardDataset", train_idx: list[int], count: int) -> list[int]:
    """`count` training rows the target wrote greedily, spread evenly over the training
    order (every k-th), fixed for the run, for the training-set acceptance estimate."""
    rows = [i for i in train_idx if dataset.rows[i].greedy_answer]
    if not rows or count <= 0:
        return []
    stride = max(1, len(rows) // count)
    return rows[::stride][:count]


def format_estimate(record: dict, prefix: str = "eval_") -> str:
    """'1.792 +- 0.011 (256 sequences)' from a log record's estimate fields."""
    tau = record.get(f"{prefix}tau_estimate")
    if tau is None:
        return "none (no scorable blocks)"
    se = record.get(f"{prefix}tau_estimate_se")
    spread = f" +- {se:.3f}" if se is not None else ""
    return f"{tau:.3f}{spread} ({record.get(f'{prefix}sequences', '?')} sequences)"


def _append_json(path: Path, record: dict) -> None:
    with path.open("a") as f:
        f.write(json.dumps(record) + "\n")


def plot_loss_curve(log_path: Path, png: Path) -> bool:
    """Loss, held-out and training-set tau estimates against step (needs matplotlib; skipped without)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()] if log_path.exists() else []
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    losses = [r for r in rows if "loss" in r]
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("weighted CE")
    evals = [r for r in rows if r.get("eval_tau_estimate") is not None]
    if evals:
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in evals], [r["eval_tau_estimate"] for r in evals], "o-", color="tab:orange",
                 label="held-out tau estimate")
        fitted = [r for r in evals if r.get("eval_train_tau_estimate") is not None]
        if fitted:
            ax2.plot([r["step"] for r in fitted], [r["eval_train_tau_estimate"] for r in fitted], "s--",
                     color="tab:green", label="training-set tau estimate")
        ax2.set_ylabel("tau estimate")
        ax2.legend(loc="lower right")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return True


def data_summary(trainer: "Trainer") -> dict:
    ds = trainer.dataset
    sources = sorted({ds.rows[i].source for i in trainer.train_idx})
    from_target = ds.num_response_tokens([i for i in trainer.train_idx if ds.rows[i].response_from == "target"])
    total = ds.num_response_tokens(trainer.train_idx)
    greedy_labelled = ds.num_response_tokens([i for i in trainer.train_idx if ds.rows[i].written == "human"
                                              and ds.rows[i].target_greedy is not None])
    greedy_rows = [i for i in trainer.train_idx if ds.rows[i].greedy_answer]
    return {"sources": sources, "sequences": len(trainer.train_idx), "held_out": len(trainer.eval_idx),
            "response_tokens": total, "fraction_from_target": round(from_target / total, 4) if total else None,
            "human_tokens_with_target_labels": greedy_labelled,
            "sampled_response_tokens": ds.num_response_tokens([i for i in trainer.train_idx
                                                               if ds.rows[i].written == "sampled"]),
            # greedy answers relabelled by another dtype's target (`train relabel`): labels that differ from the text
            "greedy_labels_differing_from_text": ds.labels_differing_from_text(greedy_rows)}


def export_run(trainer: "Trainer", folder: str | Path | None = None, command: str | None = None) -> Path:
    """Write the drafter in the published format plus its model card (rank 0 only)."""
    from .export import export_drafter, machine_summary

    folder = Path(folder) if folder else trainer.out / "drafter"
    evaluation = trainer.estimates()
    cfg = trainer.config
    info = {
        "target": cfg.target,
        "command": command or "specflash train fit ...",
        "data": data_summary(trainer),
        "hyperparameters": {k: getattr(cfg, k) for k in (
            "num_layers", "block_size", "anchors_per_sequence", "epochs", "lr", "warmup_fraction", "weight_decay",
            "grad_clip", "grad_accum", "max_length", "draft_vocab", "gamma", "loss_positions", "distill",
            "distill_temperature", "feature_noise", "init", "init_from",
            "precision", "seed")} | {
            "world_size": trainer.world, "target_layer_ids": list(trainer.drafter.target_layer_ids)},
        "steps": trainer.step,
        "passes_total": trainer.passes_total,
        "total_steps": trainer.total_steps,
        "tokens_seen": trainer.tokens_seen,
        "train_hours": round(trainer.train_seconds / 3600, 3),
        "machine": machine_summary(),
        "tau_estimate": evaluation.get("eval_tau_estimate"),
        "tau_estimate_se": evaluation.get("eval_tau_estimate_se"),
        "held_out_sequences": evaluation.get("eval_sequences"),
        "tau_estimate_text": format_estimate(evaluation, "eval_"),
        "accept_through_position": evaluation.get("eval_accept_through_position"),
        "train_tau_estimate": evaluation.get("eval_train_tau_estimate"),
        "train_tau_estimate_text": (format_estimate(evaluation, "eval_train_")
                                    if evaluation.get("eval_train_tau_estimate") is not None else None),
    }
    return export_drafter(trainer.drafter, folder, info)
