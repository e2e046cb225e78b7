"""benchmarks/gpu_corpus_run.sh: the GPU corpus run's CPU dry run (tiny random target, every step:
prepare, the chunked carry, run, collect) and its chunk / stash / assemble round trip."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "benchmarks" / "gpu_corpus_run.sh"


def load_helper():
    spec = importlib.util.spec_from_file_location("gpu_corpus_run", REPO / "benchmarks" / "gpu_corpus_run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chunks_are_stashed_one_call_at_a_time_and_assemble_to_the_payload(tmp_path):
    helper = load_helper()
    payload = tmp_path / "payload"
    payload.mkdir()
    (payload / "plan.json").write_text(json.dumps({"x": 1}))
    (payload / "blob").write_bytes(os.urandom(300_000))
    tar_path = tmp_path / "payload.tar"
    with tarfile.open(tar_path, "w") as tar:
        tar.add(payload, arcname="payload")
    carry = tmp_path / "carry"
    infos = helper.write_chunks(tar_path, carry, 3)
    assert [i["chunk"] for i in infos] == [1, 2, 3] and sum(i["bytes"] for i in infos) == tar_path.stat().st_size
    paths = helper.Paths(SimpleNamespace(root=str(tmp_path), carry=str(carry)), dry=True)
    _, missing = helper.stash_chunks(paths, only=2)
    assert missing == [1, 3]
    _, missing = helper.stash_chunks(paths, only=3)
    assert missing == [1]
    info, missing = helper.stash_chunks(paths, only=1)
    assert missing == []
    out = helper.assemble(paths, info)
    assert (out / "blob").read_bytes() == (payload / "blob").read_bytes()
    # A chunk damaged in transit is refused.
    part = carry / "c2" / "payload.part2of3"
    part.write_bytes(b"x" + part.read_bytes()[1:])
    with pytest.raises(SystemExit, match="damaged"):
        helper.stash_chunks(paths, only=2)


@pytest.mark.slow
def test_dry_run_writes_corpus_shards_and_a_drafter(tmp_path):
    root = tmp_path / "dry"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("OUT", None)
    done = subprocess.run(["bash", str(SCRIPT), "dry-run", "--root", str(root)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    result = json.loads((root / "dry-run.json").read_text())
    # What the device hands back stays inside the tool's limits.
    returned = root / "out"
    files = sorted(p for p in returned.iterdir())
    assert 0 < len(files) <= 8 and all(p.stat().st_size <= 16 * 2 ** 20 for p in files)
    assert {"summary.json", "run.log", "drafter.tar", "corpus.tar.00"} <= {p.name for p in files}
    # New answers landed in the local corpus (greedy) and its sampled sibling, in the compact format,
    # none of them for prompts the device's corpus already had.
    for name in ("tiny", "tiny-sampled"):
        corpus = root / "corpus-local" / name
        assert list(corpus.glob("shard-*.npz")), name
        manifest = json.loads((corpus / "manifest.json").read_text())
        assert manifest["totals"]["rows"] > 0 and manifest["target_sha256"]
    assert result["seeded_rows"] > 0 and result["new_rows"] > 0
    # The drafter was fitted and exported.
    drafter = root / "return" / "drafter"
    assert (drafter / "config.json").is_file() and (drafter / "model.safetensors").is_file()
    summary = json.loads((returned / "summary.json").read_text())
    assert summary["status"] == "done" and summary["fit"]["rc"] == 0 and summary["fit"]["steps"] > 0
    # The target repair ran: the scrambled copy came out byte-identical to the prepared target.
    assert summary["target"].get("weights_rewritten_with_carried_header") is True
