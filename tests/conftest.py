import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny import tiny_target  # noqa: E402

# Tiny models are dominated by per-op overhead: one thread is much faster than two
# (and immune to another process busy on the second core).
torch.set_num_threads(1)

# Measured step costs (`--block-size auto`) of tiny test models never reach the user's cache.
os.environ.setdefault("SPECFLASH_COST_CACHE", tempfile.mkdtemp(prefix="specflash-costs-"))


@pytest.fixture(scope="session")
def targets():
    cache = {}

    def get(family: str):
        if family not in cache:
            cache[family] = tiny_target(family)
        return cache[family]

    return get
