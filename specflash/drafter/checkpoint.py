"""A drafter folder on disk, in the published layout: where it is (a local folder or a hub
id), `config.json`, the weights (`model.safetensors`, or shards listed by an index), and the
check that the weights fit the config. `DFlashDrafter.save_pretrained` / `from_pretrained`
are built on these."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import CheckpointError
from .config import DrafterConfig
from .vocab import write_draft_vocab

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
CONFIG_NAME = "config.json"


def write_checkpoint(folder: str | Path, state: dict[str, torch.Tensor], config: DrafterConfig,
                     dtype: torch.dtype, draft_vocab: torch.Tensor | None) -> Path:
    """Write config.json + model.safetensors (weights cast to `dtype`) + draft_vocab.json."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to(dtype).contiguous().cpu() for k, v in state.items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    data = config.to_dict()
    data["torch_dtype"] = str(dtype).removeprefix("torch.")
    (folder / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
    write_draft_vocab(folder, draft_vocab)
    return folder


def check_weights(folder: Path, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Raise CheckpointError unless `state` has exactly the `expected` names and shapes."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing weights {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected weights {_short(unexpected)}")
        raise CheckpointError(f"drafter checkpoint {folder} does not match its config.json: "
                              + "; ".join(parts))
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise CheckpointError(f"drafter checkpoint {folder} has weights of the wrong shape for its "
                              f"config.json: {_short(wrong)}")


def _short(items: list[str], limit: int = 4) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" (+{len(items) - limit} more)" if len(items) > limit else "")


def drafter_folder(name_or_path: str | Path) -> Path:
    """A local drafter folder as it is, a hub id (org/name) fetched into the hub cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{path} is a file; pass the drafter folder holding config.json "
                              "and model.safetensors")
    text = str(name_or_path)
    if text.count("/") == 1 and not text.startswith((".", "/", "~")):
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.md"]))
        except Exception as exc:  # offline, unknown repo, auth
            raise CheckpointError(f"drafter {text!r} is not a local folder and could not be fetched "
                                  f"from the hub ({type(exc).__name__}: {str(exc).splitlines()[0][:160]})") from None
    raise CheckpointError(f"drafter folder {text!r} does not exist; pass a folder with config.json "
                          "and model.safetensors, or a hub id like org/name")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files: list[Path]
    if (folder / WEIGHTS_NAME).exists():
        files = [folder / WEIGHTS_NAME]
    elif (folder / WEIGHTS_INDEX_NAME).exists():
        index = json.loads((folder / WEIGHTS_INDEX_NAME).read_text())
        files = [folder / name for name in sorted(set(index.get("weight_map", {}).values()))]
    else:
        raise CheckpointError(f"no {WEIGHTS_NAME} in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except (SafetensorError, OSError) as exc:
            raise CheckpointError(f"cannot read {file}: {exc}") from None
    # Some exports prefix names with "model."; the published layout has no prefix.
    if state and all(k.startswith("model.") for k in state):
        state = {k[len("model."):]: v for k, v in state.items()}
    return state
