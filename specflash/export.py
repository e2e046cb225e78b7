"""Hand a DFlash drafter to a production engine: check a drafter folder against what vLLM or
SGLang reads, write an engine-ready copy (optionally with the drafter's own reduced
vocabulary), and print the exact launch command.

The engines read the published z-lab layout: `config.json` (a Qwen3 config with
`architectures: ["DFlashDraftModel"]`, `block_size`, `num_target_layers` and a
`dflash_config` with `target_layer_ids` and `mask_token_id`) and unprefixed weights in
`model.safetensors`. Three sources of truth, none repeated here:
- the weight names and shapes come from the drafter itself, built on the meta device from
  the config (`expected_weights`);
- the config's values are validated by `DrafterConfig` (the drafter package);
- what each engine reads and tolerates is one row of `RULES` (read from the sources of
  vLLM 0.33.0, `model_executor/models/qwen3_dflash.py` and `v1/spec_decode/dflash.py`, and
  SGLang 0.5.23, `srt/models/dflash.py` and `srt/speculative/dflash_utils.py`); the checks
  read the row rather than naming an engine.
"""

from __future__ import annotations

import copy
import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .drafter import DFlashDrafter, DrafterConfig, read_draft_vocab
from .drafter.config import DRAFTER_ARCHITECTURE
from .errors import CheckpointError, InputError, SpecflashError

ENGINES = ("vllm", "sglang")
ARCHITECTURE = DRAFTER_ARCHITECTURE
WEIGHT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
INDEX_DTYPES = ("I64", "I32")
HEAD_WEIGHTS = ("lm_head.weight", "embed_tokens.weight", "d2t")


@dataclass(frozen=True)
class EngineRules:
    """What one engine's DFlash loader reads from a drafter folder and what it tolerates."""

    name: str
    tp_flag: str  # the launch flag that shards the model over N GPUs
    adds_model_prefix: bool  # looks each weight up as "model." + name, so prefixed names are not found
    stops_on_unknown_weight: bool  # an unknown weight name stops the load (else it is skipped)
    skipped_weights: tuple[str, ...]  # names containing these are dropped before the lookup
    own_head: bool  # lm_head.weight / embed_tokens.weight in the folder replace the target's
    reduced_vocab: bool  # serves draft_vocab_size + lm_head [N, H] + d2t [N], d2t[i] = target id - i
    window_keys: tuple[str, ...]  # where the sliding window is read; the first present wins
    dflash_config_first: tuple[str, ...]  # keys read from dflash_config before the top level
    fc_reads_target_hidden_size: bool  # fc takes features of target_hidden_size (else hidden_size)
    mixed_attention_note: str | None  # a caveat for drafters mixing sliding and full layers
    launch_note: str  # printed with the launch command


RULES: dict[str, EngineRules] = {
    "vllm": EngineRules(
        name="vLLM", tp_flag="--tensor-parallel-size", adds_model_prefix=True, stops_on_unknown_weight=True,
        skipped_weights=("t2d",), own_head=True, reduced_vocab=True,
        window_keys=("dflash_config.swa_window_size", "sliding_window"), dflash_config_first=(),
        fc_reads_target_hidden_size=True,
        mixed_attention_note=("this drafter mixes sliding and full attention layers: vLLM's V2 model runner (the "
                              "default) serves it, the V1 runner (VLLM_USE_V2_MODEL_RUNNER=0) refuses it"),
        launch_note=("vLLM runs the drafter's block attention non-causally, which needs an attention backend "
                     "that supports it: keep --attention-backend FLASH_ATTN (FlashAttention); other backends may "
                     "refuse to start or fall back.")),
    "sglang": EngineRules(
        name="SGLang", tp_flag="--tp-size", adds_model_prefix=False, stops_on_unknown_weight=False,
        skipped_weights=(), own_head=False, reduced_vocab=False,
        window_keys=("sliding_window",), dflash_config_first=("block_size", "num_target_layers"),
        fc_reads_target_hidden_size=False, mixed_attention_note=None,
        launch_note=("SGLang verifies B = --speculative-num-draft-tokens tokens per step (the anchor plus B - 1 "
                     "drafts); add --attention-backend fa3 on Hopper GPUs.")),
}
ENGINE_NAMES = {key: rules.name for key, rules in RULES.items()}

# Keys the engines need written out: their defaults differ from what specflash trained with
# (DrafterConfig fills them in when absent, so it cannot tell).
REQUIRED_KEYS = {
    "head_dim": " (a Qwen3 config would default it to 128)",
    "num_key_value_heads": " (a Qwen3 config would default it to 32)",
    "max_position_embeddings": "",
    "num_target_layers": " (the number of layers of the target the drafter was trained for)",
    "block_size": " (tokens verified per step, e.g. 16)",
    "dflash_config.target_layer_ids": "; the engines would then tap one target layer per draft layer, which "
                                      "does not match fc.weight",
    "dflash_config.mask_token_id": "; the engines need the id of the embedding row the drafter was trained "
                                   "with as MASK",
}

@dataclass
class ExportReport:
    engine: str
    drafter: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    block_size: int | None = None
    tp_size: int | None = None
    target: str | None = None
    command: str | None = None
    written: Path | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "drafter": str(self.drafter), "ok": self.ok, "problems": self.problems,
                "warnings": self.warnings, "notes": self.notes, "block_size": self.block_size,
                "tp_size": self.tp_size, "target": self.target, "command": self.command,
                "written": str(self.written) if self.written else None}


def launch_command(engine: str, target: str, drafter: str, block_size: int, tp_size: int | None = None) -> str:
    """The command that serves `target` with the drafter folder on `engine`."""
    if engine not in RULES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    tp = f" \\\n  {RULES[engine].tp_flag} {tp_size}" if tp_size and tp_size > 1 else ""
    if engine == "vllm":
        spec = json.dumps({"method": "dflash", "model": drafter, "num_speculative_tokens": block_size - 1})
        return (f"vllm serve {shlex.quote(target)} \\\n  --speculative-config {shlex.quote(spec)} \\\n"
                f"  --attention-backend FLASH_ATTN{tp}")
    return (f"python -m sglang.launch_server --model-path {shlex.quote(target)} \\\n"
            f"  --speculative-algorithm DFLASH --speculative-draft-model-path {shlex.quote(drafter)} \\\n"
            f"  --speculative-num-draft-tokens {block_size}{tp}")


# ------------------------------------------------------------ tensor parallel


def tp_problems(what: str, heads: int, kv_heads: int, intermediate: int | None, n: int) -> list[str]:
    """Why `n`-way tensor parallelism cannot shard this model. Both engines split the query
    heads and the MLP width evenly over the GPUs, and split the KV heads too, or replicate them
    when there are fewer KV heads than GPUs (then N must be a multiple of them)."""
    out = []
    if heads % n:
        out.append(f"{what}'s {heads} attention heads do not divide by {n}")
    if kv_heads >= n and kv_heads % n:
        out.append(f"{what}'s {kv_heads} KV heads do not divide by {n}")
    elif kv_heads < n and n % kv_heads:
        out.append(f"{n} is not a multiple of {what}'s {kv_heads} KV heads")
    if intermediate and intermediate % n:
        out.append(f"{what}'s MLP width {intermediate} does not divide by {n}")
    return out


def valid_tp_sizes(models: dict[str, tuple[int, int, int | None]], limit: int = 8) -> list[int]:
    """The GPU counts N <= limit that shard every model: {what: (heads, kv heads, MLP width)}."""
    return [n for n in range(1, limit + 1) if not any(tp_problems(what, *shape, n) for what, shape in models.items())]


def _tp_shapes(config: DrafterConfig | None, target_cfg: dict[str, Any] | None) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    if target_cfg is not None and _is_int(target_cfg.get("num_attention_heads")):
        heads = target_cfg["num_attention_heads"]
        kv = target_cfg.get("num_key_value_heads") or heads
        inter = target_cfg.get("intermediate_size")
        shapes["the target"] = (heads, kv, inter if _is_int(inter) else None)
    if config is not None:
        shapes["the drafter"] = (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)
    return shapes


def _check_tp(config: DrafterConfig | None, target_cfg: dict[str, Any] | None, rules: EngineRules,
              tp_size: int | None, report: ExportReport) -> None:
    shapes = _tp_shapes(config, target_cfg)
    if tp_size is not None:
        if tp_size < 1:
            report.problems.append(f"{rules.tp_flag} must be >= 1 (got {tp_size})")
            return
        why = [p for what, shape in shapes.items() for p in tp_problems(what, *shape, tp_size)]
        if why:
            valid = valid_tp_sizes(shapes)
            report.problems.append(f"{rules.tp_flag} {tp_size} cannot shard these models: {'; '.join(why)} "
                                   f"(valid: {', '.join(map(str, valid))})")
        elif "the target" not in shapes:
            report.warnings.append(f"{rules.tp_flag} {tp_size} suits the drafter; the target's heads were not "
                                   "checked (pass --target)")
        return
    if not shapes:
        return
    valid = valid_tp_sizes(shapes)
    described = " and ".join(f"{what} ({shape[0]} heads, {shape[1]} KV heads)" for what, shape in shapes.items())
    unchecked = "" if "the target" in shapes else "; the target's heads must divide too (pass --target to check)"
    if valid == [1]:
        report.notes.append(f"tensor parallelism: no N in 2..8 shards {described} evenly: serve on one GPU per "
                            f"replica{unchecked}")
    else:
        report.notes.append(f"to shard over N GPUs add {rules.tp_flag} N with N one of "
                            f"{', '.join(map(str, valid))} (the attention heads, KV heads and MLP width of "
                            f"{described} must split evenly){unchecked}")


# ------------------------------------------------------------------ config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _lookup(cfg: dict[str, Any], key: str) -> Any:
    """A top-level key, or `dflash_config.x` inside dflash_config."""
    if key.startswith("dflash_config."):
        return (cfg.get("dflash_config") or {}).get(key.split(".", 1)[1])
    return cfg.get(key)


def _window(cfg: dict[str, Any], rules: EngineRules) -> tuple[str | None, Any]:
    """(the key the engine takes the sliding window from, its value)."""
    for key in rules.window_keys:
        value = _lookup(cfg, key)
        if value is not None:
            return key, value
    return None, None


def engine_view(cfg: dict[str, Any], rules: EngineRules) -> dict[str, Any]:
    """config.json as this engine reads it, in DrafterConfig's layout: the keys it takes from
    dflash_config first moved to the top level, and the sliding window from where it reads it."""
    view = copy.deepcopy(cfg)
    dflash = view.get("dflash_config") if isinstance(view.get("dflash_config"), dict) else {}
    for key in rules.dflash_config_first:
        if dflash.get(key) is not None:
            view[key] = dflash[key]
    _, window = _window(cfg, rules)
    if window is not None:
        view["sliding_window"] = window
    else:
        view.pop("sliding_window", None)
    return view


def drafter_config(cfg: dict[str, Any]) -> DrafterConfig:
    """The DrafterConfig of a config.json, validated by the config class (CheckpointError)."""
    try:
        return DrafterConfig.from_dict(cfg)
    except (TypeError, ValueError) as exc:
        if isinstance(exc, CheckpointError):
            raise
        raise CheckpointError(f"invalid drafter config: {exc}") from None


def _stand_ins(view: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    """`view` with harmless values for `keys` (already reported missing, or values the weights'
    names and shapes do not depend on), so the config class can still check the rest and the
    drafter can still be built for its shapes."""
    view = copy.deepcopy(view)
    dflash = view.get("dflash_config") if isinstance(view.get("dflash_config"), dict) else {}
    view["dflash_config"] = dflash
    ids = dflash.get("target_layer_ids")
    n_ids = len(ids) if isinstance(ids, list) else 0
    ids_ok = n_ids and all(_is_int(i) and i >= 0 for i in ids)
    if "mask_token_id" in keys:
        dflash["mask_token_id"] = 0
    if "num_target_layers" in keys:
        view["num_target_layers"] = max(max(ids) + 1 if ids_ok else 1, n_ids)
    if "target_layer_ids" in keys and n_ids:
        dflash["target_layer_ids"] = list(range(n_ids))
    if "sliding_window" in keys:
        view["sliding_window"] = 1
    return view


def _check_config(cfg: dict[str, Any], rules: EngineRules,
                  report: ExportReport) -> tuple[DrafterConfig | None, DrafterConfig | None, dict[str, Any]]:
    """Check config.json as `rules`' engine reads it. Returns (its DrafterConfig, None if
    invalid; a DrafterConfig of the same sizes for the weight check, None if even the sizes
    are invalid; the engine's view of the config)."""
    problems, warnings = report.problems, report.warnings
    architectures = cfg.get("architectures")
    if not isinstance(architectures, list) or ARCHITECTURE not in architectures:
        problems.append(f"config.json: architectures must be [\"{ARCHITECTURE}\"] (got {architectures!r}); the "
                        "engines pick the DFlash draft model class by this name")
    if cfg.get("model_type") != "qwen3":
        problems.append(f"config.json: model_type must be \"qwen3\" (got {cfg.get('model_type')!r}); the engines "
                        "read the drafter's config as a Qwen3 config")
    if not isinstance(cfg.get("dflash_config"), dict):
        problems.append("config.json: dflash_config is missing; it must hold target_layer_ids and mask_token_id")
    dflash = cfg.get("dflash_config") if isinstance(cfg.get("dflash_config"), dict) else {}
    for key in ("block_size", "num_target_layers"):
        inner, top = dflash.get(key), cfg.get(key)
        if inner is not None and top is not None and inner != top:
            first = " and ".join(r.name for r in RULES.values() if key in r.dflash_config_first)
            second = " and ".join(r.name for r in RULES.values() if key not in r.dflash_config_first)
            problems.append(f"config.json: dflash_config.{key} is {inner} but the top-level {key} is {top}; "
                            f"{first} reads the first, {second} the second: make them equal")
    view = engine_view(cfg, rules)
    reported: set[str] = set()  # keys reported missing: stand-ins keep the config class from repeating it
    for key, why in REQUIRED_KEYS.items():
        if _lookup(view, key) is None:
            problems.append(f"config.json: {key} is missing{why}")
            reported.add(key.rpartition(".")[2])
    rope = view.get("rope_parameters")
    if view.get("rope_theta") is None and not (isinstance(rope, dict) and rope.get("rope_theta") is not None):
        problems.append("config.json: rope_theta is missing (the engines would assume 1e6; write the target's "
                        "value)")
    if view.get("block_size") == 1:
        problems.append("config.json: block_size is 1, which leaves no token to draft; use the training block size")

    layer_types = view.get("layer_types")
    sliding = isinstance(layer_types, list) and "sliding_attention" in layer_types
    if sliding:
        key, window = _window(cfg, rules)
        if window is None:
            others = [k for r in RULES.values() for k in r.window_keys
                      if k not in rules.window_keys and _lookup(cfg, k) is not None]
            found = f"; this config has only {', '.join(others)}, which {rules.name} does not read" if others else ""
            fix = " (or write a copy with `specflash export --out DIR`, which writes sliding_window)" if others else ""
            problems.append(f"config.json: sliding_attention layers need a window; {rules.name} reads it from "
                            f"{' or '.join(rules.window_keys)}{found}{fix}")
            reported.add("sliding_window")
        elif key != "sliding_window" and cfg.get("sliding_window") not in (None, window):
            problems.append(f"config.json: {rules.name} reads the window from {key} ({window}) before sliding_window "
                            f"({cfg['sliding_window']}), which specflash trained with: make them equal")
        if rules.mixed_attention_note and "full_attention" in layer_types:
            report.notes.append(rules.mixed_attention_note)

    config = shapes = None
    try:
        shapes = drafter_config(_stand_ins(view, reported))
        config = None if reported else shapes
    except CheckpointError as exc:
        problems.append(f"config.json: {str(exc).removeprefix('invalid drafter config: ')}")
        try:  # the weights' shapes follow from the sizes alone
            shapes = drafter_config(_stand_ins(view, reported | {"mask_token_id", "num_target_layers",
                                                                 "target_layer_ids"}))
        except CheckpointError:
            pass
    if "target_layer_ids" in reported:  # the number of features fc takes is unknown
        shapes = None

    target_hidden = cfg.get("target_hidden_size")
    if target_hidden is not None and target_hidden != cfg.get("hidden_size"):
        if not rules.fc_reads_target_hidden_size:
            problems.append(f"config.json: target_hidden_size differs from hidden_size; {rules.name} sizes fc for "
                            "features of the drafter's own width")
        elif not _is_int(target_hidden) or target_hidden < 1:
            problems.append(f"config.json: target_hidden_size must be a positive integer (got {target_hidden!r})")
    draft_vocab = cfg.get("draft_vocab_size")
    if draft_vocab is not None:
        vocab = cfg.get("vocab_size")
        if not rules.reduced_vocab:
            warnings.append(f"config.json: draft_vocab_size is set; {rules.name} ignores it and drafts over the "
                            "target's full LM head (still lossless)")
        elif not _is_int(draft_vocab) or draft_vocab < 1 or (_is_int(vocab) and draft_vocab > vocab):
            problems.append(f"config.json: draft_vocab_size must be an integer in [1, vocab_size] (got "
                            f"{draft_vocab!r}, vocab_size {vocab})")
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    if dtype is not None and dtype not in WEIGHT_DTYPES.values():
        warnings.append(f"config.json: torch_dtype {dtype!r}; the engines expect bfloat16 (float16 and float32 "
                        "are cast)")
    if cfg.get("quantization_config"):
        warnings.append("config.json: has a quantization_config; the engines will try to load a quantized drafter")
    return config, shapes, view


# ----------------------------------------------------------------- weights


def _meta_drafter(config: DrafterConfig) -> DFlashDrafter:
    with torch.device("meta"):
        return DFlashDrafter(config)


def expected_weights(config: DrafterConfig, target_hidden_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape of the drafter this config describes, as save_pretrained writes it
    (built on the meta device: no memory, no init). `target_hidden_size`: fc's per-feature
    width when the engine sizes it by the target (vLLM)."""
    with torch.device("meta"):
        shapes = {name: tuple(t.shape) for name, t in _meta_drafter(config).published_state_dict().items()}
    if target_hidden_size and target_hidden_size != config.hidden_size:
        shapes["fc.weight"] = (config.hidden_size, config.num_features * target_hidden_size)
    return shapes


def head_weights(config: DrafterConfig, draft_vocab_size: int | None = None) -> dict[str, tuple[int, ...]]:
    """The drafter's own embedding / LM head an engine may load instead of the target's: with a
    reduced vocabulary of N tokens, lm_head.weight is [N, H] and d2t [N] maps draft ids to
    target ids (target id = i + d2t[i])."""
    h, v = config.hidden_size, config.vocab_size
    n = draft_vocab_size or v
    shapes = {"lm_head.weight": (n, h), "embed_tokens.weight": (v, h)}
    if n != v:
        shapes["d2t"] = (n,)
    return shapes


def _weight_files(folder: Path) -> tuple[list[Path], list[str]]:
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return [single], []
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            return [folder / name for name in sorted(set(weight_map.values()))], []
        except (json.JSONDecodeError, AttributeError) as exc:
            return [], [f"model.safetensors.index.json is not a valid index ({exc})"]
    others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
    hint = f" (found {', '.join(others)}: convert to safetensors)" if others else ""
    return [], [f"no model.safetensors (or model.safetensors.index.json) in the folder{hint}"]


def read_weight_index(folder: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], list[str]]:
    """name -> (shape, safetensors dtype) from the headers only; plus problems reading them."""
    from safetensors import safe_open

    files, problems = _weight_files(folder)
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    tensors[name] = (tuple(piece.get_shape()), piece.get_dtype())
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            problems.append(f"{file.name} cannot be read as safetensors ({type(exc).__name__}: {exc})")
    return tensors, problems


def _read_tensor(folder: Path, name: str) -> torch.Tensor | None:
    from safetensors import safe_open

    for file in _weight_files(folder)[0]:
        with safe_open(str(file), framework="pt") as f:
            if name in f.keys():
                return f.get_tensor(name)
    return None


def _short(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _check_d2t(folder: Path, stored_name: str, config: DrafterConfig, report: ExportReport) -> list[int] | None:
    """The target ids d2t maps the draft ids to (None, with a problem, when they are not valid ids)."""
    d2t = _read_tensor(folder, stored_name)
    if d2t is None or d2t.dim() != 1:
        return None
    ids = (torch.arange(d2t.numel()) + d2t.long()).tolist()
    if any(not 0 <= i < config.vocab_size for i in ids) or len(set(ids)) != len(ids):
        report.problems.append(f"weights: d2t must map draft id i to a distinct target id i + d2t[i] in "
                               f"[0, {config.vocab_size}); these do not")
        return None
    return ids


def _check_weights(folder: Path, config: DrafterConfig | None, view: dict[str, Any], rules: EngineRules,
                   report: ExportReport) -> None:
    tensors, read_problems = read_weight_index(folder)
    report.problems.extend(read_problems)
    if not tensors:
        if not read_problems:
            report.problems.append("the weight files hold no tensors")
        return
    prefix = ""
    if all(n.startswith("model.") for n in tensors):
        if rules.adds_model_prefix:
            report.problems.append(f"weights: every name starts with \"model.\"; {rules.name} adds that prefix itself "
                                   "and would not find them: save them without it (e.g. fc.weight)")
        else:
            report.warnings.append(f"weights: names start with \"model.\"; {rules.name} strips it, vLLM would not")
        prefix = "model."
        tensors = {n[len(prefix):]: v for n, v in tensors.items()}
    skipped = sorted(n for n in tensors if any(s in n for s in rules.skipped_weights))
    if skipped:
        report.notes.append(f"weights: {rules.name} skips {', '.join(skipped)}")
    names = set(tensors) - set(skipped)
    if config is None:
        report.warnings.append("weights: names and shapes not checked, config.json lacks the sizes they follow "
                               "from")
        return
    target_hidden = view.get("target_hidden_size") if rules.fc_reads_target_hidden_size else None
    try:
        expected = expected_weights(config, target_hidden if _is_int(target_hidden) else None)
    except (TypeError, ValueError, RuntimeError) as exc:  # sizes of the wrong type in config.json
        report.problems.append(f"config.json: cannot build the drafter it describes ({type(exc).__name__}: {exc})")
        return
    draft_vocab = view.get("draft_vocab_size") if rules.reduced_vocab else None
    reduced = _is_int(draft_vocab) and 0 < draft_vocab < config.vocab_size
    heads = head_weights(config, draft_vocab if reduced else None)

    missing = sorted(set(expected) - names)
    if missing:
        report.problems.append(f"weights: missing {len(missing)} tensor(s) the config implies: {_short(missing)}")
    present_heads = sorted(n for n in names if n in HEAD_WEIGHTS)
    if present_heads and not rules.own_head:
        report.warnings.append(f"weights: {', '.join(present_heads)} present; {rules.name} ignores them and uses "
                               "the target's embedding and LM head")
    elif rules.own_head:
        if reduced:
            for name in ("lm_head.weight", "d2t"):
                if name not in names:
                    report.problems.append(f"weights: draft_vocab_size {draft_vocab} needs {name} "
                                           f"{list(heads[name])}; without it {rules.name} cannot map the drafter's "
                                           f"{draft_vocab} logits to target tokens")
        elif "d2t" in names:
            report.problems.append(f"weights: d2t is present but config.json sets no draft_vocab_size below "
                                   f"vocab_size ({config.vocab_size}); {rules.name} only has a place for d2t with a "
                                   "reduced draft vocabulary: set draft_vocab_size or drop d2t")
        full = [n for n in present_heads if n != "d2t" and not (reduced and n == "lm_head.weight")]
        if full:
            report.warnings.append(f"weights: {', '.join(full)} present; {rules.name} will use them instead of the "
                                   "target's (DFlash drafters normally borrow the target's)")
    unexpected = sorted(names - set(expected) - set(HEAD_WEIGHTS))
    if unexpected:
        if rules.stops_on_unknown_weight:
            report.problems.append(f"weights: {len(unexpected)} tensor(s) {rules.name} has no place for (it stops on "
                                   f"the first): {_short(unexpected)}")
        else:
            report.warnings.append(f"weights: {rules.name} ignores {len(unexpected)} unknown tensor(s): "
                                   f"{_short(unexpected)}")
    shapes = {**expected, **(heads if rules.own_head else {})}
    wrong = [f"{n} {list(tensors[n][0])} (expected {list(shape)})" for n, shape in shapes.items()
             if n in names and tensors[n][0] != shape]
    if wrong:
        report.problems.append(f"weights: {len(wrong)} tensor(s) have the wrong shape for the config: "
                               f"{_short(wrong, 3)}")
    loaded = names & (set(expected) | (set(heads) - {"d2t"} if rules.own_head else set()))
    dtypes = sorted({tensors[n][1] for n in loaded})
    odd = [d for d in dtypes if d not in WEIGHT_DTYPES]
    if odd:
        report.problems.append(f"weights: dtype(s) {odd} are not plain floating point (bf16, fp16, fp32)")
    elif dtypes != ["BF16"]:
        report.warnings.append(f"weights are {', '.join(WEIGHT_DTYPES[d] for d in dtypes)}; the engines cast them, "
                               "bfloat16 is the published format (half the size)")
    if rules.own_head and reduced and "d2t" in names and not any("d2t" in w for w in wrong):
        if tensors["d2t"][1] not in INDEX_DTYPES:
            report.problems.append(f"weights: d2t is {tensors['d2t'][1]}; it holds token id offsets (int64)")
        else:
            ids = _check_d2t(folder, prefix + "d2t", config, report)
            vocab_file = read_draft_vocab(folder) if (folder / "draft_vocab.json").exists() else None
            if ids is not None and vocab_file is not None and ids != vocab_file:
                report.problems.append("weights: d2t maps to other target ids than draft_vocab.json lists")
            elif ids is not None:
                report.summary.append(f"draft vocabulary: {len(ids)} of {config.vocab_size} tokens (lm_head "
                                      f"{list(heads['lm_head.weight'])}, d2t): {rules.name} drafts from these only")
    if not (missing or wrong or odd or (unexpected and rules.stops_on_unknown_weight)):
        report.summary.append(f"weights: {len(names)} tensors ({', '.join(dtypes)}), names and shapes as "
                              f"{rules.name} loads them")


# ------------------------------------------------------------------ target


def read_target_config(target: str) -> tuple[dict[str, Any] | None, str, str | None]:
    """(the target's text config or None, the id to launch it by, why the config is unknown)."""
    from .models import cached_model_dir, find_entry

    path = Path(target).expanduser()
    if path.is_dir():
        folder, launch_id = path, str(path.resolve())
    else:
        entry = find_entry(target)
        launch_id = entry.hub_id if entry is not None else target
        folder = cached_model_dir(entry.name) if entry is not None else None
        if folder is None:
            return None, launch_id, (f"{target} is not downloaded here; the target checks were skipped "
                                     f"(run `specflash generate --target {target}` once to fetch it)"
                                     if entry is not None else
                                     f"{target} is not a local folder or a registered model; the target checks "
                                     "were skipped")
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        return None, launch_id, f"cannot read {folder / 'config.json'} ({exc}); the target checks were skipped"
    if isinstance(cfg.get("text_config"), dict):
        cfg = {**cfg, **cfg["text_config"]}
    return cfg, launch_id, None


def _check_target(cfg: dict[str, Any], config: DrafterConfig, view: dict[str, Any], rules: EngineRules,
                  target: str, report: ExportReport) -> None:
    target_hidden = view.get("target_hidden_size") if rules.fc_reads_target_hidden_size else None
    checks = [("hidden_size", target_hidden or config.hidden_size, "hidden size"),
              ("num_hidden_layers", config.num_target_layers, "number of layers (num_target_layers)"),
              ("vocab_size", config.vocab_size, "vocabulary (the engines share its embedding and LM head)")]
    for key, mine, what in checks:
        theirs = cfg.get(key)
        if theirs is not None and mine != theirs:
            report.problems.append(f"target {target}: {key} is {theirs}, the drafter expects {mine}: the {what} "
                                   "must match; this drafter was trained for another target")
    vocab = cfg.get("vocab_size")
    if _is_int(vocab) and not 0 <= config.mask_token_id < vocab:
        report.problems.append(f"target {target}: mask_token_id {config.mask_token_id} is not a row of its "
                               f"{vocab}-row embedding")


# ------------------------------------------------------------------ checks


def _read_config(path: Path, report: ExportReport) -> dict[str, Any] | None:
    try:
        cfg = json.loads((path / "config.json").read_text())
        if not isinstance(cfg, dict):
            raise ValueError("it must hold a JSON object")
        return cfg
    except FileNotFoundError:
        report.problems.append("config.json is missing")
    except (json.JSONDecodeError, ValueError) as exc:
        report.problems.append(f"config.json is not valid ({exc})")
    return None


def check_drafter(folder: str | Path, engine: str, target: str | None = None, block_size: int | None = None,
                  tp_size: int | None = None) -> ExportReport:
    """Check a drafter folder for `engine`; the report's `command` is set when it passes."""
    if engine not in RULES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    rules = RULES[engine]
    path = Path(folder).expanduser()
    report = ExportReport(engine=engine, drafter=path.resolve() if path.exists() else path, tp_size=tp_size)
    if not path.is_dir():
        report.problems.append(f"{path} is not a folder; pass the drafter folder holding config.json and "
                               "model.safetensors")
        return report
    cfg = _read_config(path, report)
    config, shapes, view = _check_config(cfg, rules, report) if cfg is not None else (None, None, {})
    if config is not None and not report.problems:
        report.summary.append(
            f"config.json: {ARCHITECTURE}, {config.num_hidden_layers} layer(s), hidden {config.hidden_size}, "
            f"block {config.block_size}, target layers {list(config.target_layer_ids)} of "
            f"{config.num_target_layers}, mask id {config.mask_token_id}")
    _check_weights(path, shapes, view, rules, report)
    report.block_size = block_size if block_size is not None else (config.block_size if config else None)
    if block_size is not None and block_size < 2:
        report.problems.append(f"--block-size must be >= 2 (got {block_size})")
    target_cfg = None
    if target is not None:
        target_cfg, report.target, why = read_target_config(target)
        if why:
            report.warnings.append(why)
        elif config is not None:
            _check_target(target_cfg, config, view, rules, target, report)
    _check_tp(shapes, target_cfg, rules, tp_size, report)
    if report.ok and report.block_size:
        report.command = launch_command(engine, report.target or "<target model: hub id or folder>",
                                        str(report.drafter), report.block_size, tp_size)
        report.notes.insert(0, rules.launch_note)
        if report.target is None:
            report.notes.append("pass --target to check the drafter against its target and fill in its id")
        if (path / "draft_vocab.json").exists() and not any(s.startswith("draft vocabulary") for s in report.summary):
            how = (" To draft from the same tokens, write a copy with its own reduced head: specflash export "
                   f"{shlex.quote(str(path))} --engine {engine} --reduced-vocab "
                   f"--target {shlex.quote(target or 'TARGET')} --out DIR"
                   if rules.reduced_vocab else "")
            report.notes.append(f"draft_vocab.json (specflash's reduced draft vocabulary) is not read by "
                                f"{rules.name}: it drafts over the full LM head, still lossless, and its acceptance "
                                f"may differ a little from specflash's.{how}")
    return report


# ------------------------------------------------------------------ writing


def write_engine_folder(drafter_dir: str | Path, out: str | Path, engine: str, target: str | None = None,
                        reduced_vocab: bool = False) -> Path:
    """Write the drafter to `out` in the layout `engine` reads: config.json with every key the
    engines read (the sliding window at the top level), model.safetensors in the drafter's
    dtype. With `reduced_vocab`, also the drafter's own LM head over its draft vocabulary
    (draft_vocab.json's N ids): `lm_head.weight` [N, H] (the target's head rows of those
    ids), `d2t` [N] int64 with d2t[i] = target_ids[i] - i, and `draft_vocab_size` N, so the
    engine drafts from the same tokens specflash trained on. Raises SpecflashError."""
    from safetensors.torch import save_file

    from .drafter.checkpoint import check_weights, drafter_folder, read_weights
    from .drafter.vocab import write_draft_vocab

    if engine not in RULES:
        raise InputError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    rules = RULES[engine]
    source = drafter_folder(drafter_dir)
    out = Path(out).expanduser()
    if out.resolve() == source.resolve():
        raise InputError("--out must be a new folder, not the drafter's own")
    cfg = json.loads((source / "config.json").read_text()) if (source / "config.json").is_file() else None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{source / 'config.json'} is missing or not a JSON object")
    view = copy.deepcopy(cfg)  # the window specflash trained with, else the one vLLM reads
    if view.get("sliding_window") is None:
        view["sliding_window"] = (view.get("dflash_config") or {}).get("swa_window_size")
    config = drafter_config(view)
    meta = _meta_drafter(config)
    state = read_weights(source)
    check_weights(source, meta.published_state_dict(), state)
    dtype = state["fc.weight"].dtype
    extra = {k: v for k, v in config.extra.items() if k != "draft_vocab_size"}
    ids = read_draft_vocab(source)
    if ids is not None:  # sorted, distinct, rows of the vocabulary (CheckpointError otherwise)
        ids = meta.set_draft_vocab(ids).draft_vocab.tolist()
    if reduced_vocab:
        if not rules.reduced_vocab:
            raise InputError(f"{rules.name} has no place for a drafter's own vocabulary (its DFlash drafter always "
                             "uses the target's LM head): drop --reduced-vocab")
        if target is None:
            raise InputError("--reduced-vocab needs --target: the drafter's head is made of the target's LM head "
                             "rows")
        if ids is None:
            raise InputError(f"{source} has no draft_vocab.json: the drafter proposes from the full vocabulary, "
                             "there is nothing to reduce")
        if len(ids) >= config.vocab_size:
            raise InputError(f"draft_vocab.json lists {len(ids)} ids, the whole {config.vocab_size}-token "
                             "vocabulary: there is nothing to reduce")
        state.update(_reduced_head(config, target, ids, dtype))
        extra["draft_vocab_size"] = len(ids)
    config = config.replace(extra=extra)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    data = config.to_dict()
    data["torch_dtype"] = str(dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(data, indent=2) + "\n")
    write_draft_vocab(out, torch.tensor(ids) if ids is not None else None)
    return out


def _reduced_head(config: DrafterConfig, target: str, ids: list[int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """lm_head.weight [N, H] (the target's LM head rows of `ids`, loaded in `dtype`, exact) and d2t."""
    from .hf.target import TargetModel
    from .runtime.loading import check_compatible

    model = TargetModel.from_pretrained(target, dtype=dtype)
    check_compatible(_meta_drafter(config), model)
    if model.output_rows != config.vocab_size or model.hidden_size != config.hidden_size:
        raise CheckpointError(f"target {target}'s LM head is [{model.output_rows}, {model.hidden_size}], the "
                              f"drafter expects [{config.vocab_size}, {config.hidden_size}]")
    index = torch.tensor(ids, dtype=torch.long)
    rows, bias = model.head_rows(index)
    if bias is not None:
        raise CheckpointError(f"target {target}'s LM head has a bias, which the engines' drafter head has no place "
                              "for")
    return {"lm_head.weight": rows.to(dtype).cpu(), "d2t": index - torch.arange(len(ids), dtype=torch.long)}


def export(drafter_dir: str | Path, engine: str, target: str | None = None, block_size: int | None = None,
           tp_size: int | None = None, out: str | Path | None = None, reduced_vocab: bool = False) -> ExportReport:
    """`specflash export`: with `out`, write the engine folder there first and check that;
    else check the drafter folder as it is."""
    if reduced_vocab and out is None:
        raise InputError("--reduced-vocab writes a new drafter folder: give it with --out DIR")
    if out is None:
        return check_drafter(drafter_dir, engine, target=target, block_size=block_size, tp_size=tp_size)
    try:
        written = write_engine_folder(drafter_dir, out, engine, target=target, reduced_vocab=reduced_vocab)
    except SpecflashError:
        raise
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot write {out}: {exc}") from None
    report = check_drafter(written, engine, target=target, block_size=block_size, tp_size=tp_size)
    report.written = report.drafter
    return report
