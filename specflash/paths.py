"""Where specflash keeps its files on this machine: `$SPECFLASH_HOME`, default
`~/.cache/specflash` (converted models, measured costs, the z-lab environment). A leaf
module, so every layer may ask for it."""

from __future__ import annotations

import os
from pathlib import Path


def specflash_home() -> Path:
    """``$SPECFLASH_HOME``, default ``~/.cache/specflash``."""
    env = os.environ.get("SPECFLASH_HOME")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specflash"
