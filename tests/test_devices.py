"""--device: auto picks a GPU when there is one (the process's own under torchrun), and a
device this machine lacks is a clear InputError, not a stack trace from torch."""

import pytest
import torch

from specflash.devices import resolve_device
from specflash.errors import InputError


def pretend_gpus(monkeypatch, count):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)


def test_auto_is_the_cpu_without_a_gpu(monkeypatch):
    pretend_gpus(monkeypatch, 0)
    assert resolve_device("auto") == resolve_device(None) == torch.device("cpu")


def test_auto_and_bare_cuda_take_the_local_rank_gpu_under_torchrun(monkeypatch):
    pretend_gpus(monkeypatch, 2)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)
    assert resolve_device("cpu") == torch.device("cpu")


def test_a_gpu_the_machine_lacks_is_an_input_error(monkeypatch):
    pretend_gpus(monkeypatch, 0)
    with pytest.raises(InputError, match="no CUDA device.*--device cpu"):
        resolve_device("cuda")
    pretend_gpus(monkeypatch, 2)
    with pytest.raises(InputError, match="has 2 CUDA device"):
        resolve_device("cuda:2")


def test_a_name_that_is_no_device_is_an_input_error():
    with pytest.raises(InputError, match="not a device"):
        resolve_device("gpu0")
    with pytest.raises(InputError, match="only cpu and cuda"):
        resolve_device("meta")


@pytest.mark.parametrize("command", [
    ["generate", "--prompt", "hi", "--max-new-tokens", "2"],
    ["train", "fit", "--data", "nowhere", "--out", "nowhere"],
])
def test_commands_given_a_missing_gpu_say_so_in_one_line(capsys, command):
    from specflash.cli import main

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err
    assert "no CUDA device" in err and "Traceback" not in err
