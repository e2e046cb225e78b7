"""A DFlash drafter's configuration.

`DrafterConfig` reads and writes the `config.json` of a DFlash drafter in exactly the
layout z-lab publishes and vLLM / SGLang read (top-level Qwen3 keys plus `block_size`,
`num_target_layers`, `layer_types` and a `dflash_config` dict with `mask_token_id` and
`target_layer_ids`). Keys we do not model are kept in `extra` and written back, so a
load/save round trip never loses information.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError, InputError

DRAFTER_ARCHITECTURE = "DFlashDraftModel"

# Top-level keys modelled by DrafterConfig (everything else goes to `extra`).
_TOP_LEVEL_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "rms_norm_eps",
    "attention_bias",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "vocab_size",
    "tie_word_embeddings",
    "block_size",
    "num_target_layers",
    "layer_types",
    "sliding_window",
    "is_causal",
)
# Keys read from `dflash_config` (falling back to the top level, as the engines do).
_DFLASH_KEYS = (
    "mask_token_id",
    "target_layer_ids",
    "input_embedding_scale",
    "output_multiplier",
    "final_logit_softcapping",
)


def default_target_layer_ids(num_target_layers: int, num_features: int) -> list[int]:
    """The published default: one feature -> the middle layer; otherwise spread evenly
    from layer 1 to layer L-3 (round(1 + k * (L - 4) / (n - 1)))."""
    if num_features < 1:
        raise InputError(f"number of target features must be >= 1, got {num_features}")
    if num_features == 1:
        return [num_target_layers // 2]
    span = num_target_layers - 4
    return [int(round(1 + k * span / (num_features - 1))) for k in range(num_features)]


@dataclass(frozen=True)
class DrafterConfig:
    """The config.json of a DFlash drafter. Field names are the published key names."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    num_target_layers: int
    target_layer_ids: tuple[int, ...]
    mask_token_id: int
    block_size: int = 16
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    rope_theta: float = 1_000_000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 40960
    tie_word_embeddings: bool = False
    layer_types: tuple[str, ...] = ()
    sliding_window: int | None = None
    is_causal: bool | None = None
    input_embedding_scale: float = 1.0
    output_multiplier: float = 1.0
    final_logit_softcapping: float | None = None
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.layer_types:
            object.__setattr__(self, "layer_types", ("full_attention",) * self.num_hidden_layers)
        object.__setattr__(self, "layer_types", tuple(self.layer_types))
        object.__setattr__(self, "target_layer_ids", tuple(int(i) for i in self.target_layer_ids))
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        problems = []
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "vocab_size", "num_target_layers"):
            if int(getattr(self, name)) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.block_size < 1:
            problems.append(f"block_size must be >= 1 (got {self.block_size})")
        if self.num_key_value_heads and self.num_attention_heads % self.num_key_value_heads:
            problems.append("num_attention_heads must be a multiple of num_key_value_heads")
        if len(self.layer_types) != self.num_hidden_layers:
            problems.append(f"layer_types has {len(self.layer_types)} entries for "
                            f"{self.num_hidden_layers} layers")
        bad_types = sorted(set(self.layer_types) - {"full_attention", "sliding_attention"})
        if bad_types:
            problems.append(f"unsupported layer_types {bad_types} (use full_attention or sliding_attention)")
        if "sliding_attention" in self.layer_types and not self.sliding_window:
            problems.append("sliding_attention layers need a positive sliding_window")
        if not self.target_layer_ids:
            problems.append("dflash_config.target_layer_ids is empty")
        out_of_range = [i for i in self.target_layer_ids if not 0 <= i < self.num_target_layers]
        if out_of_range:
            problems.append(f"target_layer_ids {out_of_range} out of range for a target with "
                            f"{self.num_target_layers} layers (valid: 0..{self.num_target_layers - 1})")
        if not 0 <= self.mask_token_id < self.vocab_size:
            problems.append(f"mask_token_id {self.mask_token_id} is not a row of a {self.vocab_size}-row "
                            "embedding; choose an id in [0, vocab_size)")
        if self.hidden_act != "silu":
            problems.append(f"hidden_act {self.hidden_act!r} is not supported (only 'silu')")
        if problems:
            raise CheckpointError("invalid drafter config: " + "; ".join(problems))

    @property
    def num_features(self) -> int:
        return len(self.target_layer_ids)

    # --------------------------------------------------------- serialisation
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DrafterConfig":
        data = dict(data)
        dflash = dict(data.pop("dflash_config", None) or {})
        kwargs: dict[str, Any] = {}
        for key in _TOP_LEVEL_KEYS:
            if key in data:
                kwargs[key] = data.pop(key)
        for key in _DFLASH_KEYS:
            if key in dflash:
                kwargs[key] = dflash.pop(key)
            elif key in data:
                kwargs[key] = data.pop(key)
        # SGLang also reads block_size inside dflash_config.
        if "block_size" not in kwargs and "block_size" in dflash:
            kwargs["block_size"] = dflash["block_size"]
        dflash.pop("block_size", None)
        rope_parameters = data.pop("rope_parameters", None)
        if "rope_theta" not in kwargs and isinstance(rope_parameters, dict):
            kwargs["rope_theta"] = rope_parameters.get("rope_theta", 1_000_000.0)
        if "head_dim" not in kwargs and "hidden_size" in kwargs and "num_attention_heads" in kwargs:
            kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
        if "num_key_value_heads" not in kwargs and "num_attention_heads" in kwargs:
            kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
        for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "vocab_size", "num_target_layers", "mask_token_id"):
            if kwargs.get(key) is None:
                where = "dflash_config." if key == "mask_token_id" else ""
                raise CheckpointError(f"drafter config.json lacks {where}{key}; "
                                      "is this a DFlash drafter folder?")
        if kwargs.get("target_layer_ids") is None:
            n_features = _infer_num_features(data)
            kwargs["target_layer_ids"] = default_target_layer_ids(kwargs["num_target_layers"], n_features)
        extra = data
        if dflash:
            extra["dflash_config"] = dflash
        kwargs["extra"] = extra
        try:
            return cls(**kwargs)
        except TypeError as exc:  # wrong value types in the json
            raise CheckpointError(f"invalid drafter config: {exc}") from None

    def to_dict(self) -> dict[str, Any]:
        extra = {k: v for k, v in self.extra.items() if k != "dflash_config"}
        extra_dflash = dict(self.extra.get("dflash_config", {}))
        out: dict[str, Any] = {
            "architectures": [DRAFTER_ARCHITECTURE],
            "model_type": "qwen3",
            "torch_dtype": "bfloat16",
        }
        out.update(extra)
        for key in _TOP_LEVEL_KEYS:
            value = getattr(self, key)
            if key == "layer_types":
                value = list(value)
            if key in ("sliding_window", "is_causal") and value is None:
                continue
            out[key] = value
        dflash: dict[str, Any] = dict(extra_dflash)
        dflash["mask_token_id"] = self.mask_token_id
        dflash["target_layer_ids"] = list(self.target_layer_ids)
        if self.input_embedding_scale != 1.0:
            dflash["input_embedding_scale"] = self.input_embedding_scale
        if self.output_multiplier != 1.0:
            dflash["output_multiplier"] = self.output_multiplier
        if self.final_logit_softcapping is not None:
            dflash["final_logit_softcapping"] = self.final_logit_softcapping
        dflash["block_size"] = self.block_size
        out["dflash_config"] = dflash
        return out

    @classmethod
    def from_json_file(cls, path: str | Path) -> "DrafterConfig":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"no config.json in {path.parent}; a drafter folder needs "
                                  "config.json and model.safetensors") from None
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return cls.from_dict(data)

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")

    def replace(self, **changes: Any) -> "DrafterConfig":
        return dataclasses.replace(self, **changes)


def _infer_num_features(data: dict[str, Any]) -> int:
    """Without target_layer_ids the feature count is unknown; published drafters use 5."""
    return int(data.get("num_target_features", 5))
