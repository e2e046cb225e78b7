"""benchmarks/paired_tau.py: two bench runs' decoded acceptance paired by request."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("paired_tau", REPO / "benchmarks" / "paired_tau.py")
paired_tau = importlib.util.module_from_spec(spec)
spec.loader.exec_module(paired_tau)


def write_run(folder: Path, taus: dict[tuple, float], first: tuple[int, int] = (10, 4), mismatched=()) -> Path:
    folder.mkdir()
    lines = []
    for (dataset, prompt, turn), tau in taus.items():
        lines.append({"method": "dflash", "dataset": dataset, "prompt_id": prompt, "turn": turn, "tau": tau,
                      "drafted_per_position": [first[0], 3], "accepted_per_position": [first[1], 1],
                      "matches_baseline": (dataset, prompt, turn) not in mismatched})
        lines.append({"method": "hf", "dataset": dataset, "prompt_id": prompt, "turn": turn, "tau": None})
    (folder / "samples.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return folder


def test_the_difference_is_paired_by_request_with_its_standard_error(tmp_path, capsys):
    a = {("humaneval", "1", 0): 1.5, ("humaneval", "2", 0): 2.5, ("sharegpt", "9", 0): 1.2}
    b = {("humaneval", "1", 0): 1.6, ("humaneval", "2", 0): 2.8, ("sharegpt", "9", 0): 1.2,
         ("sharegpt", "10", 0): 3.0}  # a request only B has: not paired
    run_a = write_run(tmp_path / "a", a)
    run_b = write_run(tmp_path / "b", b, first=(10, 6), mismatched={("sharegpt", "9", 0)})
    table = paired_tau.compare(paired_tau.read_samples(run_a, "dflash"), paired_tau.read_samples(run_b, "dflash"))
    code = table["humaneval"]
    assert code["pairs"] == 2 and code["tau_a"] == pytest.approx(2.0) and code["tau_b"] == pytest.approx(2.2)
    assert code["difference"] == pytest.approx(0.2)
    assert code["se"] == pytest.approx(math.sqrt(((0.1 - 0.2) ** 2 + (0.3 - 0.2) ** 2) / 1) / math.sqrt(2))
    assert table["all"]["pairs"] == 3 and table["sharegpt"]["mismatches_b"] == 1
    assert code["p_first_a"] == pytest.approx(0.4) and code["p_first_b"] == pytest.approx(0.6)
    assert paired_tau.main([str(run_a), str(run_b)]) == 0
    out = capsys.readouterr().out
    assert "| humaneval | 2 | 2.000 | 2.200 | +0.200 ± 0.100 |" in out


def test_runs_without_shared_requests_or_samples_are_refused_with_a_reason(tmp_path):
    run_a = write_run(tmp_path / "a", {("humaneval", "1", 0): 1.5})
    run_b = write_run(tmp_path / "b", {("humaneval", "2", 0): 1.5})
    with pytest.raises(SystemExit, match="share no request"):
        paired_tau.main([str(run_a), str(run_b)])
    with pytest.raises(SystemExit, match="no .*samples.jsonl"):
        paired_tau.main([str(run_a), str(tmp_path / "missing")])
    with pytest.raises(SystemExit, match="method 'zlab'"):
        paired_tau.main([str(run_a), str(run_b), "--method", "zlab"])
