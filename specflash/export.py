"""Hand a DFlash drafter to a production engine: check the folder against what vLLM or
SGLang reads, and write the exact launch command.

The engines read the published z-lab layout (see docs: dflash-spec section 1):
`config.json` with `architectures: ["DFlashDraftModel"]`, `model_type: "qwen3"`, the
Qwen3 size keys, top-level `block_size` and `num_target_layers` (SGLang looks inside
`dflash_config` first), and `dflash_config.{target_layer_ids, mask_token_id}`; weights
in `model.safetensors` (or an index plus shards) named without a prefix. What each
engine does with a deviation decides whether it is a problem or a warning here:
- vLLM prefixes every weight name with "model." and looks it up: a name it does not
  know (an extra tensor, or names already prefixed) stops the load; `embed_tokens` /
  `lm_head` load and replace the target's; mixed sliding/full `layer_types` are refused.
- SGLang skips names it does not know and strips a "model." prefix; it supports
  per-layer sliding attention.
Both engines fall back to one target feature per draft layer when `target_layer_ids`
is absent and need an explicit `mask_token_id` for a target without a mask token, so
both are required here.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ENGINES = ("vllm", "sglang")
ENGINE_NAMES = {"vllm": "vLLM", "sglang": "SGLang"}
ARCHITECTURE = "DFlashDraftModel"
WEIGHT_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}
SHARED_WITH_TARGET = ("embed_tokens.weight", "lm_head.weight")

VLLM_BACKEND_NOTE = ("vLLM runs the drafter's block attention non-causally, which needs an attention backend that "
                     "supports it: keep --attention-backend FLASH_ATTN (FlashAttention); other backends may refuse "
                     "to start or fall back.")
SGLANG_NOTE = ("SGLang verifies B = --speculative-num-draft-tokens tokens per step (the anchor plus B - 1 drafts); "
               "add --attention-backend fa3 on Hopper GPUs, and --tp-size N to shard the target.")


@dataclass
class ExportReport:
    engine: str
    drafter: Path
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    summary: list[str] = field(default_factory=list)
    block_size: int | None = None
    target: str | None = None
    command: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {"engine": self.engine, "drafter": str(self.drafter), "ok": self.ok, "problems": self.problems,
                "warnings": self.warnings, "notes": self.notes, "block_size": self.block_size,
                "target": self.target, "command": self.command}


def launch_command(engine: str, target: str, drafter: str, block_size: int) -> str:
    """The command that serves `target` with the drafter folder on `engine`."""
    if engine == "vllm":
        spec = json.dumps({"method": "dflash", "model": drafter, "num_speculative_tokens": block_size - 1})
        return (f"vllm serve {shlex.quote(target)} \\\n  --speculative-config {shlex.quote(spec)} \\\n"
                "  --attention-backend FLASH_ATTN")
    if engine == "sglang":
        return (f"python -m sglang.launch_server --model-path {shlex.quote(target)} \\\n"
                f"  --speculative-algorithm DFLASH --speculative-draft-model-path {shlex.quote(drafter)} \\\n"
                f"  --speculative-num-draft-tokens {block_size}")
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")


# ------------------------------------------------------------------ config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_config(cfg: dict[str, Any], engine: str, report: ExportReport) -> dict[str, Any]:
    """Check config.json; return the sizes the weight check needs (missing ones absent)."""
    problems, warnings = report.problems, report.warnings
    sizes: dict[str, Any] = {}
    architectures = cfg.get("architectures")
    if not isinstance(architectures, list) or ARCHITECTURE not in architectures:
        problems.append(f"config.json: architectures must be [\"{ARCHITECTURE}\"] (got {architectures!r}); the "
                        "engines pick the DFlash draft model class by this name")
    if cfg.get("model_type") != "qwen3":
        problems.append(f"config.json: model_type must be \"qwen3\" (got {cfg.get('model_type')!r}); the engines "
                        "read the drafter's config as a Qwen3 config")
    dflash = cfg.get("dflash_config")
    if not isinstance(dflash, dict):
        problems.append("config.json: dflash_config is missing; it must hold target_layer_ids and mask_token_id")
        dflash = {}
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "max_position_embeddings", "num_target_layers",
                "block_size"):
        value = cfg.get(key)
        if value is None and engine == "sglang" and key in ("block_size", "num_target_layers"):
            value = dflash.get(key)  # SGLang reads these from dflash_config first
        if value is None:
            why = {"head_dim": " (a Qwen3 config would default it to 128)",
                   "num_target_layers": " (the number of layers of the target the drafter was trained for)",
                   "block_size": " (tokens verified per step, e.g. 16)"}.get(key, "")
            problems.append(f"config.json: {key} is missing{why}")
        elif not _is_int(value) or value < 1:
            problems.append(f"config.json: {key} must be a positive integer (got {value!r})")
        else:
            sizes[key] = value
    for key in ("rms_norm_eps",):
        if not _is_number(cfg.get(key)):
            problems.append(f"config.json: {key} must be a number (got {cfg.get(key)!r})")
    rope = cfg.get("rope_parameters")
    if not _is_number(cfg.get("rope_theta")) and not (isinstance(rope, dict) and _is_number(rope.get("rope_theta"))):
        problems.append("config.json: rope_theta is missing (the engines would assume 1e6; write the target's "
                        "value)")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"config.json: hidden_act must be \"silu\" (got {cfg.get('hidden_act')!r})")
    if not isinstance(cfg.get("attention_bias", False), bool):
        problems.append(f"config.json: attention_bias must be true or false (got {cfg.get('attention_bias')!r})")
    heads, kv = sizes.get("num_attention_heads"), sizes.get("num_key_value_heads")
    if heads and kv and heads % kv:
        problems.append(f"config.json: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
    if sizes.get("block_size") == 1:
        problems.append("config.json: block_size is 1, which leaves no token to draft; use the training block size")

    for key in ("block_size", "num_target_layers"):
        inner, top = dflash.get(key), cfg.get(key)
        if inner is not None and top is not None and inner != top:
            problems.append(f"config.json: dflash_config.{key} is {inner} but the top-level {key} is {top}; "
                            "SGLang reads the first, vLLM the second: make them equal")
    ids = dflash.get("target_layer_ids")
    n_target = sizes.get("num_target_layers")
    if ids is None:
        problems.append("config.json: dflash_config.target_layer_ids is missing; the engines would then tap one "
                        "target layer per draft layer, which does not match fc.weight")
    elif not isinstance(ids, list) or not ids or not all(_is_int(i) for i in ids):
        problems.append(f"config.json: dflash_config.target_layer_ids must be a non-empty list of integers "
                        f"(got {ids!r})")
    else:
        sizes["num_features"] = len(ids)
        if n_target is not None:
            bad = [i for i in ids if not 0 <= i < n_target]
            if bad:
                problems.append(f"config.json: target_layer_ids {bad} are out of range for a target with "
                                f"{n_target} layers (valid 0..{n_target - 1}; id i = output of decoder layer i)")
    mask = dflash.get("mask_token_id")
    vocab = sizes.get("vocab_size")
    if mask is None:
        problems.append("config.json: dflash_config.mask_token_id is missing; the engines need the id of the "
                        "embedding row the drafter was trained with as MASK")
    elif not _is_int(mask) or mask < 0 or (vocab is not None and mask >= vocab):
        problems.append(f"config.json: dflash_config.mask_token_id must be an integer in [0, vocab_size) "
                        f"(got {mask!r}, vocab_size {vocab})")

    layers = sizes.get("num_hidden_layers")
    layer_types = cfg.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or (layers is not None and len(layer_types) != layers):
            problems.append(f"config.json: layer_types must list one entry per draft layer ({layers}), got "
                            f"{layer_types!r}")
        else:
            unknown = sorted(set(layer_types) - {"full_attention", "sliding_attention"})
            if unknown:
                problems.append(f"config.json: layer_types {unknown} are not supported (full_attention, "
                                "sliding_attention)")
            sliding = [t == "sliding_attention" for t in layer_types]
            if any(sliding):
                window = cfg.get("sliding_window", dflash.get("swa_window_size"))
                if not _is_int(window) or window < 1:
                    problems.append("config.json: sliding_attention layers need a positive sliding_window")
                if engine == "vllm" and not all(sliding):
                    problems.append("config.json: vLLM does not support drafters that mix sliding_attention and "
                                    "full_attention layers; serve this one with SGLang")
    target_hidden = cfg.get("target_hidden_size")
    if target_hidden is not None and target_hidden != sizes.get("hidden_size"):
        if engine == "sglang":
            problems.append("config.json: target_hidden_size differs from hidden_size; SGLang sizes fc for "
                            "features of the drafter's own width")
        elif _is_int(target_hidden):
            sizes["target_hidden_size"] = target_hidden
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    if dtype is not None and dtype not in WEIGHT_DTYPES.values():
        warnings.append(f"config.json: torch_dtype {dtype!r}; the engines expect bfloat16 (float16 and float32 "
                        "are cast)")
    if cfg.get("quantization_config"):
        warnings.append("config.json: has a quantization_config; the engines will try to load a quantized drafter")
    return sizes


# ----------------------------------------------------------------- weights


def expected_weights(sizes: dict[str, Any], attention_bias: bool) -> dict[str, tuple[int, ...]]:
    """Weight name -> shape for a drafter of these sizes (the published names, no prefix)."""
    h, inter, n_layers = sizes["hidden_size"], sizes["intermediate_size"], sizes["num_hidden_layers"]
    heads, kv, hd = sizes["num_attention_heads"], sizes["num_key_value_heads"], sizes["head_dim"]
    features = sizes["num_features"] * sizes.get("target_hidden_size", h)
    out: dict[str, tuple[int, ...]] = {"fc.weight": (h, features), "hidden_norm.weight": (h,), "norm.weight": (h,)}
    for i in range(n_layers):
        p = f"layers.{i}."
        out.update({
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (heads * hd, h),
            p + "self_attn.k_proj.weight": (kv * hd, h),
            p + "self_attn.v_proj.weight": (kv * hd, h),
            p + "self_attn.o_proj.weight": (h, heads * hd),
            p + "self_attn.q_norm.weight": (hd,),
            p + "self_attn.k_norm.weight": (hd,),
            p + "mlp.gate_proj.weight": (inter, h),
            p + "mlp.up_proj.weight": (inter, h),
            p + "mlp.down_proj.weight": (h, inter),
        })
        if attention_bias:
            out.update({p + "self_attn.q_proj.bias": (heads * hd,), p + "self_attn.k_proj.bias": (kv * hd,),
                        p + "self_attn.v_proj.bias": (kv * hd,), p + "self_attn.o_proj.bias": (h,)})
    return out


def read_weight_index(folder: Path) -> tuple[dict[str, tuple[tuple[int, ...], str]], list[str]]:
    """name -> (shape, safetensors dtype) from the headers only; plus problems reading them."""
    from safetensors import safe_open

    problems: list[str] = []
    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        files = [single]
    elif index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            files = [folder / name for name in sorted(set(weight_map.values()))]
        except (json.JSONDecodeError, AttributeError) as exc:
            return {}, [f"model.safetensors.index.json is not a valid index ({exc})"]
    else:
        others = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (found {', '.join(others)}: convert to safetensors)" if others else ""
        return {}, [f"no model.safetensors (or model.safetensors.index.json) in the folder{hint}"]
    tensors: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
        try:
            with safe_open(str(file), framework="numpy") as f:
                for name in f.keys():
                    piece = f.get_slice(name)
                    tensors[name] = (tuple(piece.get_shape()), piece.get_dtype())
        except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
            problems.append(f"{file.name} cannot be read as safetensors ({type(exc).__name__}: {exc})")
    return tensors, problems


def _short(items: list[str], limit: int = 5) -> str:
    return ", ".join(items[:limit]) + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def _check_weights(folder: Path, sizes: dict[str, Any], attention_bias: bool, engine: str,
                   report: ExportReport) -> None:
    tensors, read_problems = read_weight_index(folder)
    report.problems.extend(read_problems)
    if not tensors:
        if not read_problems:
            report.problems.append("the weight files hold no tensors")
        return
    names = set(tensors)
    if all(n.startswith("model.") for n in names):
        if engine == "vllm":
            report.problems.append("weights: every name starts with \"model.\"; vLLM adds that prefix itself and "
                                   "would not find them: save them without it (e.g. fc.weight)")
        else:
            report.warnings.append("weights: names start with \"model.\"; SGLang strips it, vLLM would not")
        tensors = {n[len("model."):]: v for n, v in tensors.items()}
        names = set(tensors)
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "num_features")
    if not all(k in sizes for k in needed):
        if sizes:
            report.warnings.append("weights: names and shapes not checked, the config lacks sizes they follow from")
        return
    expected = expected_weights(sizes, attention_bias)
    missing = sorted(set(expected) - names)
    if missing:
        report.problems.append(f"weights: missing {len(missing)} tensor(s) the config implies: {_short(missing)}")
    shared = sorted(n for n in names if n in SHARED_WITH_TARGET)
    if shared:
        if engine == "vllm":
            report.warnings.append(f"weights: {', '.join(shared)} present; vLLM will use them instead of the "
                                   "target's (DFlash drafters normally borrow the target's)")
        else:
            report.warnings.append(f"weights: {', '.join(shared)} present; SGLang ignores them and uses the target's")
    unexpected = sorted(names - set(expected) - set(SHARED_WITH_TARGET))
    if unexpected:
        if engine == "vllm":
            report.problems.append(f"weights: {len(unexpected)} tensor(s) vLLM has no place for (it stops on the "
                                   f"first): {_short(unexpected)}")
        else:
            report.warnings.append(f"weights: SGLang ignores {len(unexpected)} unknown tensor(s): "
                                   f"{_short(unexpected)}")
    wrong = [f"{n} {list(tensors[n][0])} (expected {list(shape)})" for n, shape in expected.items()
             if n in tensors and tensors[n][0] != shape]
    if wrong:
        report.problems.append(f"weights: {len(wrong)} tensor(s) have the wrong shape for the config: "
                               f"{_short(wrong, 3)}")
    dtypes = sorted({tensors[n][1] for n in names})
    odd = [d for d in dtypes if d not in WEIGHT_DTYPES]
    if odd:
        report.problems.append(f"weights: dtype(s) {odd} are not plain floating point (bf16, fp16, fp32)")
    elif dtypes != ["BF16"]:
        report.warnings.append(f"weights are {', '.join(WEIGHT_DTYPES[d] for d in dtypes)}; the engines cast them, "
                               "bfloat16 is the published format (half the size)")
    if not (missing or wrong or odd or (unexpected and engine == "vllm")):
        report.summary.append(f"weights: {len(names)} tensors ({', '.join(dtypes)}), names and shapes as "
                              f"{ENGINE_NAMES[engine]} loads them")


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


def _check_target(cfg: dict[str, Any], drafter_cfg: dict[str, Any], sizes: dict[str, Any], target: str,
                  report: ExportReport) -> None:
    checks = [("hidden_size", sizes.get("target_hidden_size", sizes.get("hidden_size")), "hidden size"),
              ("num_hidden_layers", sizes.get("num_target_layers"), "number of layers (num_target_layers)"),
              ("vocab_size", sizes.get("vocab_size"), "vocabulary (the engines share its embedding and LM head)")]
    for key, mine, what in checks:
        theirs = cfg.get(key)
        if mine is not None and theirs is not None and mine != theirs:
            report.problems.append(f"target {target}: {key} is {theirs}, the drafter expects {mine}: the {what} "
                                   "must match; this drafter was trained for another target")
    mask = (drafter_cfg.get("dflash_config") or {}).get("mask_token_id")
    vocab = cfg.get("vocab_size")
    if _is_int(mask) and _is_int(vocab) and not 0 <= mask < vocab:
        report.problems.append(f"target {target}: mask_token_id {mask} is not a row of its {vocab}-row embedding")


# ------------------------------------------------------------------ entry


def check_drafter(folder: str | Path, engine: str, target: str | None = None,
                  block_size: int | None = None) -> ExportReport:
    """Check a drafter folder for `engine`; the report's `command` is set when it passes."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    path = Path(folder).expanduser()
    report = ExportReport(engine=engine, drafter=path.resolve() if path.exists() else path)
    if not path.is_dir():
        report.problems.append(f"{path} is not a folder; pass the drafter folder holding config.json and "
                               "model.safetensors")
        return report
    try:
        cfg = json.loads((path / "config.json").read_text())
        if not isinstance(cfg, dict):
            raise ValueError("it must hold a JSON object")
    except FileNotFoundError:
        report.problems.append("config.json is missing")
        cfg = None
    except (json.JSONDecodeError, ValueError) as exc:
        report.problems.append(f"config.json is not valid ({exc})")
        cfg = None
    sizes: dict[str, Any] = {}
    if cfg is not None:
        sizes = _check_config(cfg, engine, report)
        if not report.problems:
            dflash = cfg.get("dflash_config", {})
            report.summary.append(
                f"config.json: {ARCHITECTURE}, {sizes['num_hidden_layers']} layer(s), hidden {sizes['hidden_size']}, "
                f"block {sizes['block_size']}, target layers {dflash.get('target_layer_ids')} of "
                f"{sizes['num_target_layers']}, mask id {dflash.get('mask_token_id')}")
    _check_weights(path, sizes, bool((cfg or {}).get("attention_bias", False)), engine, report)
    report.block_size = block_size if block_size is not None else sizes.get("block_size")
    if block_size is not None and block_size < 2:
        report.problems.append(f"--block-size must be >= 2 (got {block_size})")
    if target is not None:
        target_cfg, report.target, why = read_target_config(target)
        if why:
            report.warnings.append(why)
        elif cfg is not None:
            _check_target(target_cfg, cfg, sizes, target, report)
    if report.ok and report.block_size:
        report.command = launch_command(engine, report.target or "<target model: hub id or folder>",
                                        str(report.drafter), report.block_size)
        report.notes.append(VLLM_BACKEND_NOTE if engine == "vllm" else SGLANG_NOTE)
        if report.target is None:
            report.notes.append("pass --target to check the drafter against its target and fill in its id")
        if (Path(folder) / "draft_vocab.json").exists():
            report.notes.append(f"draft_vocab.json (specflash's reduced draft vocabulary) is not read by "
                                f"{ENGINE_NAMES[engine]}: it drafts over the full LM head, still lossless, and its "
                                "acceptance may differ a little from specflash's")
    return report
