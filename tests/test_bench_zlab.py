"""The z-lab reference runtime (dflash==0.1.0, in its own venv) loads a specflash drafter
checkpoint exactly and decodes the same tokens, with the same drafts, as specflash.
Slow: the first run builds the venv (about a minute where torch 2.13.0 is local)."""

import json
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import pytest

from specflash.cli import main
from tiny import tiny_model_folder

pytestmark = pytest.mark.slow


def test_zlab_loads_our_drafter_and_decodes_the_same_tokens(tmp_path):
    folder = str(tiny_model_folder(tmp_path / "tiny"))
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"prompt": "Write a haiku about the sea"}) + "\n"
                       + json.dumps({"prompt": "def add(a, b):"}) + "\n")
    stdout, stderr = StringIO(), StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["bench", "--target", folder, "--draft", "random", "--methods", "ar,dflash,zlab",
                     "--baseline", "ar", "--prompts-file", str(prompts), "--datasets", "", "--max-new-tokens",
                     "24", "--warmup-tokens", "24", "--no-progress", "--no-plots", "--out", str(tmp_path / "out")])
    assert code == 0, stderr.getvalue()
    doc = json.loads(stdout.getvalue().strip().splitlines()[-1])
    assert "zlab" in doc["methods"], stderr.getvalue()
    assert doc["methods"]["zlab"]["p"]["mismatches"] == 0
    assert doc["methods"]["dflash"]["p"]["mismatches"] == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    conf = summary["zlab_conformance"]
    loaded = conf["loaded"]
    assert loaded["class"] == "DFlashDraftModel"
    assert loaded["missing_keys"] == [] and loaded["unexpected_keys"] == [] and loaded["mismatched_keys"] == []
    assert loaded["compared_tensors"] == loaded["file_tensors"] > 0
    assert loaded["max_abs_weight_diff"] == 0.0
    assert conf["versions"]["dflash"] == "0.1.0"
    assert conf["drafter_forward"]["max_abs_diff"] < 1e-5 * max(1.0, conf["drafter_forward"]["mean_abs"])
    drafts = conf["warmup_drafts"]
    assert drafts["blocks_compared"] > 0 and drafts["blocks_equal"] == drafts["blocks_compared"]
    assert conf["warmup_same_tokens"] is True
    assert conf["requests_same_tokens_as_dflash"] == {"compared": 2, "equal": 2}
