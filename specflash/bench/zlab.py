"""The z-lab reference runtime (`dflash==0.1.0` on PyPI, Transformers backend) as a
benchmark method: its own virtual environment, a driver subprocess, JSON lines.

The venv lives in ``$SPECFLASH_HOME/venvs/zlab`` (default ``~/.cache/specflash``) and is
built on first use with ``python -m venv`` and ``pip install "dflash[local]==0.1.0"``
(PyPI only). ``dflash[local]`` pins, on Linux, torch==2.13.0, transformers==5.15.0 and
jinja2==3.1.6 (plus tqdm==4.70.0, datasets==5.0.1, requests==2.34.2). Its torch pin is
the version specflash pins too, so where pip finds a local CPU build of torch 2.13.0 (as
on the project's machines) the venv is built in about a minute; elsewhere pip fetches
torch 2.13.0 for the platform (a CUDA build on Linux: several GB). Extra pip arguments,
e.g. a CPU wheel index, go in ``SPECFLASH_ZLAB_PIP_ARGS``. ``--zlab-python`` points at
an interpreter that already has dflash 0.1.0 instead.

The driver (`zlab_driver.py`) loads the same target folder and drafter folder the other
methods use and decodes the same prompt token ids; see its docstring for what it patches
in memory (a CUDA-only clock) and why.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ..paths import specflash_home
from ..models.resolve import _lock

ZLAB_REQUIREMENT = "dflash[local]==0.1.0"
DRIVER = Path(__file__).with_name("zlab_driver.py")
_MARKER = ".specflash-complete"


class ZlabUnavailable(RuntimeError):
    """The reference runtime cannot run here; the message says why."""


def zlab_venv_dir() -> Path:
    return specflash_home() / "venvs" / "zlab"


def _tail(path: Path, lines: int = 8) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text[-lines:])


def ensure_zlab_python(venv: Path | None = None, say=None) -> Path:
    """The interpreter of a venv with the reference runtime, building the venv if needed."""
    venv = Path(venv) if venv is not None else zlab_venv_dir()
    python = venv / "bin" / "python"
    with _lock(venv.parent / f".{venv.name}.lock"):
        marker = venv / _MARKER
        if marker.is_file() and marker.read_text().strip() == ZLAB_REQUIREMENT and python.exists():
            return python
        if venv.exists():
            shutil.rmtree(venv)
        if say:
            say(f"specflash: building the z-lab reference venv in {venv} (first use: pip install "
                f"'{ZLAB_REQUIREMENT}', about a minute where torch 2.13.0 is available locally)")
        venv.parent.mkdir(parents=True, exist_ok=True)
        made = subprocess.run([sys.executable, "-m", "venv", str(venv)], capture_output=True, text=True)
        if made.returncode != 0:
            raise ZlabUnavailable(f"python -m venv {venv} failed: {made.stderr.strip()[-300:]}")
        log = venv / "pip-install.log"
        extra = shlex.split(os.environ.get("SPECFLASH_ZLAB_PIP_ARGS", ""))
        with open(log, "w") as fh:
            code = subprocess.run([str(python), "-m", "pip", "install", "--disable-pip-version-check",
                                   *extra, ZLAB_REQUIREMENT], stdout=fh, stderr=subprocess.STDOUT,
                                  env=_clean_env()).returncode
        if code != 0:
            raise ZlabUnavailable(f"pip install '{ZLAB_REQUIREMENT}' into {venv} failed (exit {code}); "
                                  f"log {log}: {_tail(log)}")
        marker.write_text(ZLAB_REQUIREMENT + "\n")
    return python


def _clean_env() -> dict:
    """The environment for the venv's processes: nothing that leaks this interpreter's packages."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PYTHONNOUSERSITE"] = "1"
    env.setdefault("TRANSFORMERS_VERBOSITY", "error")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    return env


class ZlabRuntime:
    """A running driver: `generate(request)` -> the driver's JSON answer."""

    def __init__(self, python: Path, setup: dict, log_path: Path):
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "w")
        self._proc = subprocess.Popen([str(python), "-u", str(DRIVER)], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, stderr=self._log, text=True, env=_clean_env())
        ready = self._ask(setup)
        if not ready.get("ready"):
            self.close()
            raise ZlabUnavailable(f"the reference runtime could not load the target / drafter: "
                                  f"{ready.get('error', ready)}")
        self.versions = ready.get("versions", {})
        self.load_report = ready.get("load", {})
        self.block_size = int(ready["block_size"])

    def _ask(self, message: dict) -> dict:
        if self._proc.poll() is not None:
            raise ZlabUnavailable(f"the reference runtime exited (code {self._proc.returncode}); "
                                  f"log {self.log_path}: {_tail(self.log_path)}")
        self._proc.stdin.write(json.dumps(message) + "\n")
        self._proc.stdin.flush()
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait(timeout=30)
            self._log.flush()
            raise ZlabUnavailable(f"the reference runtime exited (code {self._proc.returncode}); "
                                  f"log {self.log_path}: {_tail(self.log_path)}")
        return json.loads(line)

    def generate(self, request: dict) -> dict:
        answer = self._ask(request)
        if "error" in answer:
            raise ZlabUnavailable(f"the reference runtime failed: {answer['error']}")
        return answer

    def close(self) -> None:
        if self._proc.poll() is None:
            try:
                self._proc.stdin.close()
                self._proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                self._proc.kill()
                self._proc.wait()
        self._log.close()
