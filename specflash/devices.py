"""The torch device a command runs on: `--device auto|cpu|cuda|cuda:N`, checked against
this machine so a wrong choice is a clear error rather than a stack trace deep in torch.
Under torchrun, `auto` and a bare `cuda` take the process's LOCAL_RANK GPU."""

from __future__ import annotations

import os

import torch

from .errors import InputError


def _local_gpu() -> torch.device:
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """auto (a GPU when there is one, else the CPU), cpu, cuda or cuda:N."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = (spec or "auto").strip().lower()
    if text == "auto":
        return _local_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise InputError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise InputError(f"--device {spec}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise InputError(f"--device {spec}: no CUDA device is available on this machine; use --device cpu")
    if device.index is None:
        return _local_gpu()
    if device.index >= torch.cuda.device_count():
        raise InputError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                         f"numbered from 0")
    return device
