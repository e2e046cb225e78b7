"""`specflash bench` end to end on a tiny random target and a random drafter: every
offline method on 2 prompts, the documented last-line JSON, the results folder, the
same-output check, and skipped methods that say why."""

import json
from contextlib import redirect_stderr, redirect_stdout
from io import StringIO

import pytest

from specflash.cli import main
from tiny import tiny_model_folder

OFFLINE = ("hf", "ar", "dflash", "ngram", "hf-ngram")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("bench-target") / "tiny"))


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench-prompts") / "two.jsonl"
    path.write_text(json.dumps({"prompt": "Write a haiku about the sea. The sea is wide"}) + "\n"
                    + json.dumps({"messages": [{"role": "user", "content": "def add(a, b):"}]}) + "\n")
    return str(path)


def bench(capsys, folder, prompts_file, out, *extra):
    code = main(["bench", "--target", folder, "--prompts-file", prompts_file, "--datasets", "",
                 "--max-new-tokens", "12", "--warmup-tokens", "4", "--no-progress", "--out", str(out), *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return captured.out.strip().splitlines(), captured.err


@pytest.fixture(scope="module")
def greedy_run(folder, prompts_file, tmp_path_factory):
    """One greedy run of every offline method, shared by the tests below (capsys is
    function-scoped, so stdout is captured by hand)."""
    out = tmp_path_factory.mktemp("bench-out")
    stdout, stderr = StringIO(), StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["bench", "--target", folder, "--draft", "random", "--methods", ",".join(OFFLINE),
                     "--prompts-file", prompts_file, "--datasets", "", "--max-new-tokens", "12",
                     "--warmup-tokens", "4", "--no-progress", "--block-size", "4", "--out", str(out)])
    assert code == 0, stderr.getvalue()
    return stdout.getvalue().strip().splitlines(), out


def test_last_line_has_the_documented_shape(greedy_run):
    lines, _ = greedy_run
    doc = json.loads(lines[-1])
    assert set(doc) == {"target", "draft", "block_size", "machine", "methods"}
    assert doc["draft"] == "random" and doc["block_size"] == 4
    assert {"cpu", "cores", "threads", "gpu"} <= set(doc["machine"])
    assert set(doc["methods"]) == set(OFFLINE)
    for method, per_set in doc["methods"].items():
        assert list(per_set) == ["two"]
        fig = per_set["two"]
        assert set(fig) == {"prompts", "tau", "efficiency", "efficiency_model", "tpot_s", "tokens_per_s", "speedup",
                            "mismatches"}
        assert fig["prompts"] == 2
        if method in ("ar", "dflash", "ngram"):  # our loop: forwards' share of the decode time, timed in-run
            assert 0 < fig["efficiency"] <= 1
            assert 0 < fig["efficiency_model"] < 2
        else:
            assert fig["efficiency"] is None and fig["efficiency_model"] is None
        assert fig["tpot_s"] > 0 and fig["tokens_per_s"] > 0 and fig["speedup"] > 0
        if method in ("hf", "ar"):
            assert fig["tau"] is None
        else:
            assert fig["tau"] >= 1.0
    assert doc["methods"]["hf"]["two"]["speedup"] == pytest.approx(1.0)


def test_report_names_the_target_forward_of_our_loop(greedy_run):
    lines, out = greedy_run
    assert json.loads(lines[-1])["machine"]["target_forward"] == "lean"  # a tiny Llama: checked bit-identical
    assert "Target forward in specflash's loop: lean" in (out / "report.md").read_text()


def test_block_sizes_compare_in_one_run(capsys, folder, prompts_file, tmp_path, monkeypatch):
    from specflash.perf import measure
    from specflash.perf.costmodel import StepCosts

    # Fixed step costs (a verify dearer with every token, as on a real machine): measured ones
    # of a tiny model on a busy machine can make any block look free, and this is about the policy.
    costs = StepCosts(verify={1: 1e-3, 2: 1.2e-3, 4: 1.6e-3, 8: 2.4e-3, 16: 4e-3}, draft=5e-4)
    monkeypatch.setattr(measure, "load_or_measure", lambda *args, **kwargs: costs)
    lines, _ = bench(capsys, folder, prompts_file, tmp_path, "--draft", "random",
                     "--methods", "hf,dflash@2,dflash@4,dflash@auto")
    doc = json.loads(lines[-1])
    assert set(doc["methods"]) == {"hf", "dflash@2", "dflash@4", "dflash@auto"}
    assert all(f["two"]["mismatches"] == 0 for f in doc["methods"].values())
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["method_info"]["dflash@auto"]["block_policy"] == "auto"
    assert summary["method_info"]["dflash@2"]["block_size"] == 2
    # A random drafter is never right: fixed blocks verify drafts every step, auto learns to skip them.
    assert summary["methods"]["dflash@4"]["two"]["drafts_per_step"] == pytest.approx(3.0, abs=0.6)
    assert summary["methods"]["dflash@auto"]["two"]["drafts_per_step"] < 3.0


def test_bad_method_block_suffix_is_an_input_error(capsys, folder, prompts_file, tmp_path):
    code = main(["bench", "--target", folder, "--prompts-file", prompts_file, "--datasets", "",
                 "--methods", "hf,dflash@0", "--no-progress", "--out", str(tmp_path)])
    assert code == 2 and "dflash@0" in capsys.readouterr().err


def test_every_method_gives_the_baselines_tokens_at_temperature_zero(greedy_run):
    lines, out = greedy_run
    doc = json.loads(lines[-1])
    assert {m: f["two"]["mismatches"] for m, f in doc["methods"].items()} == {m: 0 for m in OFFLINE}
    records = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 * len(OFFLINE)
    by_prompt = {}
    for rec in records:
        by_prompt.setdefault(rec["prompt_id"], set()).add(tuple(rec["token_ids"]))
        assert rec["matches_baseline"] is True
    assert all(len(outputs) == 1 for outputs in by_prompt.values())


def test_results_folder_holds_table_summary_and_plots(greedy_run):
    lines, out = greedy_run
    assert any(line.startswith("| method | dataset |") for line in lines)
    assert sum(line.startswith("| dflash | two |") for line in lines) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["command"].startswith("specflash bench --target")
    assert summary["methods"]["dflash"]["two"]["acceptance_histogram"]
    assert len(summary["methods"]["dflash"]["two"]["acceptance_rate_per_position"]) == 3
    assert summary["method_info"]["dflash"]["block_size"] == 4
    assert "| ngram | two |" in (out / "report.md").read_text()
    assert (out / "drafter-random" / "config.json").is_file()
    pytest.importorskip("matplotlib")
    for name in ("speedup.png", "acceptance_histogram.png", "position_acceptance.png"):
        assert (out / name).stat().st_size > 1000


def test_methods_that_cannot_run_are_skipped_with_the_reason(capsys, folder, prompts_file, tmp_path):
    lines, err = bench(capsys, folder, prompts_file, tmp_path, "--draft", "none", "--methods", "ar,dflash,zlab",
                       "--baseline", "ar", "--no-plots")
    doc = json.loads(lines[-1])
    assert set(doc["methods"]) == {"ar"}
    assert "skipping method dflash: needs a DFlash drafter (--draft none was given)" in err
    assert "skipping method zlab" in err
    assert any(line.startswith("| dflash | skipped |") for line in lines)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert set(summary["skipped_methods"]) == {"dflash", "zlab"}


def test_sampling_reports_no_mismatch_count(capsys, folder, prompts_file, tmp_path):
    lines, _ = bench(capsys, folder, prompts_file, tmp_path, "--methods", "hf,ngram", "--temperature", "0.8",
                     "--top-p", "0.9", "--no-plots")
    doc = json.loads(lines[-1])
    assert doc["methods"]["ngram"]["two"]["mismatches"] is None
    assert doc["methods"]["ngram"]["two"]["prompts"] == 2


@pytest.mark.parametrize("args, words", [(["--methods", "hf,warp"], "unknown method"),
                                         (["--draft", "ngram"], "ngram and hf-ngram methods"),
                                         (["--num-prompts", "0"], "--num-prompts must be >= 1")])
def test_bad_flags_fail_with_one_line(capsys, folder, prompts_file, tmp_path, args, words):
    code = main(["bench", "--target", folder, "--prompts-file", prompts_file, "--datasets", "",
                 "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert code == 2 and words in err and len(err.strip().splitlines()) == 1


def test_help_documents_methods_datasets_figures_and_output(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    text = capsys.readouterr().out
    for word in ("hf-ngram", "zlab", "humaneval", "sharegpt", "gsm8k", "mt-bench", "alpaca", "--prompts-file",
                 "tau", "TPOT", "speedup", "mismatches", "samples.jsonl", "LAST line", "interleaved"):
        assert word in text, word
