"""The synthetic-acceptance bench: a random target of a registered shape and an oracle
drafter fix tau (all right: the whole block; none right: 1), outputs stay the plain
run's, and the CLI writes its report and last-line JSON."""

import json

import pytest

from specflash.bench.synthetic import SHAPES, run_synthetic, synthetic_target
from specflash.cli import main


def test_oracle_acceptance_fixes_tau_and_keeps_outputs():
    result = run_synthetic("tiny", [0.0, 1.0], [4, "auto"], num_prompts=2, prompt_tokens=16, max_new_tokens=25,
                           block_size=4, say=lambda m: None)
    rows = {(r.accept, r.block): r for r in result.rows}
    assert rows[(0.0, "4")].tau == pytest.approx(1.0)
    # 25 tokens = the prefill's + 6 full blocks of 4: every step accepts all 3 drafts.
    assert rows[(1.0, "4")].tau == pytest.approx(4.0) and rows[(1.0, "4")].expected_tau == pytest.approx(4.0)
    assert rows[(0.0, "auto")].drafts_per_step < rows[(0.0, "4")].drafts_per_step
    assert all(r.mismatches == 0 for r in result.rows)
    assert set(result.verify_cost_s) == {1, 2, 3, 4} and result.draft_cost_s > 0


def test_synthetic_target_has_the_registered_shape():
    target = synthetic_target("tiny")
    shape = SHAPES["tiny"]
    assert target.num_layers == shape["num_hidden_layers"] and target.hidden_size == shape["hidden_size"]
    assert target.vocab_rows == shape["vocab_size"] and target.eos_token_ids == ()


def test_synthetic_cli_writes_report_and_json(capsys, tmp_path):
    code = main(["bench", "--synthetic", "tiny", "--accept", "0.8", "--synthetic-blocks", "4,auto",
                 "--num-prompts", "1", "--max-new-tokens", "12", "--prompt-tokens", "8", "--out", str(tmp_path)])
    out = capsys.readouterr().out.strip().splitlines()
    assert code == 0
    doc = json.loads(out[-1])
    assert doc["shape"] == "tiny" and [r["block"] for r in doc["rows"]] == ["4", "auto"]
    assert "verify cost" in (tmp_path / "report.md").read_text().lower()


@pytest.mark.parametrize("flags, message", [
    (["--synthetic", "gpt-9"], "unknown --synthetic shape"),
    (["--synthetic", "tiny", "--synthetic-blocks", "1"], "block of 1"),
    (["--synthetic", "tiny", "--device", "cuda"], "no CUDA device"),
])
def test_synthetic_bad_input_is_one_line(capsys, flags, message):
    import torch

    if "cuda" in flags and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    assert main(["bench", *flags]) == 2
    assert message in capsys.readouterr().err


def test_synthetic_bench_runs_the_static_steps_and_reports_them(capsys, tmp_path):
    """--static-steps on (the CUDA-graph path; on a CPU its fixed-shape steps without
    capture): same outputs as plain decoding with the same steps, the mode in the report."""
    code = main(["bench", "--synthetic", "tiny", "--static-steps", "on", "--accept", "0.8", "--synthetic-blocks",
                 "4,auto", "--num-prompts", "1", "--max-new-tokens", "20", "--prompt-tokens", "8",
                 "--out", str(tmp_path)])
    doc = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert code == 0 and doc["step_mode"] == "static-replay" and doc["graph_error"] is None
    assert all(r["mismatches"] == 0 for r in doc["rows"]) and doc["rows"][0]["tau"] > 1.5
    assert "fixed-shape steps" in (tmp_path / "report.md").read_text()
