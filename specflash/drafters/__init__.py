"""Drafters shipped inside the package, one folder per registered target (published
checkpoint format plus a model card saying how it was trained)."""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def shipped_drafter(target_name: str | None) -> Path | None:
    """The shipped drafter folder for a registered target name (or alias / hub id), if any."""
    if not target_name:
        return None
    from ..models import find_entry

    entry = find_entry(str(target_name))
    if entry is None:
        return None
    folder = HERE / entry.name
    return folder if (folder / "config.json").exists() and (folder / "model.safetensors").exists() else None
