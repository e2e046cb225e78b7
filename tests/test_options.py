"""Options read once: a block size is checked by one function (runtime/config.py) wherever
it comes in, a --draft value is read by one function (runtime/loading.py) for generate and
bench alike, bad flag values fail while parsing with one line and exit 2, and
`bench --prompts-file F` alone runs only F."""

import json

import pytest

from specflash.bench import runner
from specflash.bench.datasets import BenchPrompt
from specflash.bench.runner import BenchOptions
from specflash.cli import main
from specflash.errors import CheckpointError, InputError
from specflash.runtime.blockpolicy import make_policy
from specflash.runtime.config import DecodeConfig, parse_block_size
from specflash.runtime.loading import build_proposer, random_drafter, resolve_draft
from specflash.runtime.proposers import DFlashProposer, NgramProposer
from tiny import tiny_drafter, tiny_model_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("options-target") / "tiny"))


@pytest.fixture(scope="module")
def target(folder):
    from specflash.hf.target import TargetModel

    return TargetModel.from_pretrained(folder)


@pytest.fixture(scope="module")
def drafter8(target, tmp_path_factory):
    """A drafter folder with block size 8."""
    path = tmp_path_factory.mktemp("options-drafter") / "drafter"
    random_drafter(target, block_size=8).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("options-prompts") / "mine.jsonl"
    path.write_text(json.dumps({"prompt": "Write a haiku about the sea."}) + "\n")
    return str(path)


def one_line_exit_2(capsys, argv, words):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert words in err, err
    assert "Traceback" not in err and "usage:" not in err and len(err.strip().splitlines()) == 1, err


# ------------------------------------------------------------ block size
def test_one_check_takes_auto_and_integers_from_one_up_to_the_drafters_block():
    assert parse_block_size(None) is None and parse_block_size("auto") == parse_block_size(" AUTO ") == "auto"
    assert parse_block_size("8") == 8 and parse_block_size(1) == 1 and parse_block_size(16, limit=16) == 16
    for bad, words in (("0", "block size must be >= 1 (got 0)"), (-3, "block size must be >= 1"),
                       ("big", "block size must be 'auto' or an integer >= 1 (got 'big')")):
        with pytest.raises(InputError, match=words.replace("(", r"\(").replace(")", r"\)")):
            parse_block_size(bad)
    with pytest.raises(InputError, match="larger than the drafter's block size 8"):
        parse_block_size(9, limit=8)
    with pytest.raises(InputError, match="an integer >= 1"):
        parse_block_size("auto", auto=False)


def test_library_entry_points_refuse_what_the_command_line_refuses(target):
    with pytest.raises(InputError, match="block size must be >= 1"):
        DecodeConfig(block_size=0)
    with pytest.raises(InputError, match="block size must be >= 1"):
        BenchOptions(block_size=0).validate()
    with pytest.raises(InputError, match="block size must be >= 1"):
        make_policy(0, target, None)
    proposer = DFlashProposer(tiny_drafter(target, block_size=8), target)
    with pytest.raises(InputError, match="larger than the drafter's block size 8"):
        make_policy(9, target, proposer)
    assert make_policy(8, target, proposer)[0] == 8
    assert make_policy(16, target, NgramProposer())[0] == 16  # prompt lookup has no block of its own


@pytest.mark.parametrize("argv, words", [
    (["generate", "--prompt", "hi", "--block-size", "0"], "block size must be >= 1 (got 0)"),
    (["generate", "--prompt", "hi", "--block-size", "big"], "block size must be 'auto' or an integer >= 1"),
    (["demo", "--block-size", "-2"], "block size must be >= 1 (got -2)"),
    (["serve", "--block-size", "0"], "block size must be >= 1 (got 0)"),
    (["bench", "--block-size", "0"], "block size must be >= 1 (got 0)"),
    (["bench", "--synthetic", "tiny", "--synthetic-blocks", "4,1"], "a block of 1 drafts nothing"),
    (["bench", "--synthetic", "tiny", "--synthetic-blocks", "4,0"], "block size must be >= 1 (got 0)"),
    (["demo", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1 (got 0)"),
    (["bench", "--num-prompts", "0"], "--num-prompts must be >= 1 (got 0)"),
    (["bench", "--ngram-block-size", "1"], "--ngram-block-size must be >= 2 (got 1)"),
    (["bench", "--warmup", "-1"], "--warmup must be >= 0 (got -1)"),
    (["serve", "--max-queue", "-1"], "--max-queue must be >= 0 (got -1)"),
    (["serve", "--threads", "0"], "--threads must be >= 1 (got 0)"),
])
def test_bad_values_fail_while_parsing_with_one_line_and_exit_2(capsys, argv, words):
    one_line_exit_2(capsys, argv, words)  # no target named: nothing is loaded before the refusal


def test_a_block_above_the_drafters_is_refused_once_the_drafter_is_known(capsys, folder, drafter8):
    one_line_exit_2(capsys, ["generate", "--target", folder, "--prompt", "hi", "--draft", str(drafter8),
                             "--block-size", "9"], "larger than the drafter's block size 8")


# ---------------------------------------------------------------- --draft
def _bench_reading(draft, target, tmp_path, methods=("hf", "dflash"), block_size=None):
    opts = BenchOptions(target=target.name, draft=draft, methods=methods, block_size=block_size)
    return runner._drafter_folder(opts, target, tmp_path)


def test_generate_and_bench_read_each_draft_spelling_the_same_way(target, drafter8, tmp_path):
    assert build_proposer("none", target) is None and build_proposer(None, target) is None
    assert _bench_reading("none", target, tmp_path) == (None, "--draft none was given")

    assert isinstance(build_proposer("ngram", target), NgramProposer)
    assert resolve_draft(" NGRAM ", target.name).kind == "ngram"
    with pytest.raises(InputError, match="ngram and hf-ngram methods"):  # bench measures prompt lookup as methods
        BenchOptions(draft="ngram").validate()

    ours = build_proposer("random", target)
    folder, problem = _bench_reading("random", target, tmp_path)
    assert problem is None and json.loads((folder / "config.json").read_text())["block_size"] == ours.block_size == 16

    assert build_proposer(str(drafter8), target).block_size == 8
    assert _bench_reading(str(drafter8), target, tmp_path) == (drafter8, None)
    assert resolve_draft(str(drafter8), target.name).folder == drafter8

    with pytest.raises(InputError, match="no drafter is shipped"):
        build_proposer("default", target)
    folder, problem = _bench_reading("default", target, tmp_path)  # bench skips dflash and zlab instead
    assert folder is None and "no drafter is shipped" in problem

    with pytest.raises(InputError, match="--draft is empty"):
        resolve_draft("  ", target.name)


def test_default_names_the_shipped_drafter_of_a_registered_target():
    from specflash.drafters import shipped_drafter

    choice = resolve_draft("default", "smollm2-135m-instruct")
    assert choice.kind == "drafter" and choice.folder == shipped_drafter("smollm2-135m-instruct")


def test_a_random_bench_drafter_fits_every_block_asked_for(target, tmp_path):
    folder, _ = _bench_reading("random", target, tmp_path / "a", methods=("hf", "dflash@4", "dflash@32"))
    assert json.loads((folder / "config.json").read_text())["block_size"] == 32
    folder, _ = _bench_reading("random", target, tmp_path / "b", block_size=4)
    assert json.loads((folder / "config.json").read_text())["block_size"] == 4


@pytest.fixture
def offline_hub(monkeypatch):
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)


def test_an_unreachable_hub_id_is_the_same_clear_error_from_generate_and_bench(capsys, folder, prompts_file,
                                                                              tmp_path, offline_hub):
    with pytest.raises(CheckpointError, match="could not be fetched"):
        resolve_draft("no-org/no-drafter", "tiny")
    words = "drafter 'no-org/no-drafter' is not a local folder and could not be fetched from the hub"
    one_line_exit_2(capsys, ["generate", "--target", folder, "--prompt", "hi", "--draft", "no-org/no-drafter"], words)
    one_line_exit_2(capsys, ["bench", "--target", folder, "--prompts-file", prompts_file, "--methods", "hf,dflash",
                             "--draft", "no-org/no-drafter", "--no-progress", "--out", str(tmp_path)], words)


# ------------------------------------------------------------ --prompts-file
def test_a_prompts_file_alone_runs_only_that_file():
    assert BenchOptions(prompts_file="mine.jsonl").datasets == ()
    assert BenchOptions().datasets == runner.DEFAULT_DATASETS
    assert BenchOptions(prompts_file="mine.jsonl", datasets=("gsm8k",)).datasets == ("gsm8k",)


@pytest.fixture
def fake_sets(monkeypatch):
    """Named sets without their packages: two made-up prompts each."""
    def load(name, split="eval"):
        return [BenchPrompt(dataset=name, id=f"{name}-{i}", turns=(f"Say {i} in words.",)) for i in range(2)]

    monkeypatch.setattr(runner, "load_prompts", load)


@pytest.mark.parametrize("extra, sets", [((), ["mine"]), (("--datasets", "humaneval"), ["humaneval", "mine"])])
def test_bench_runs_the_file_alone_or_with_the_named_sets(capsys, folder, prompts_file, tmp_path, fake_sets,
                                                          extra, sets):
    code = main(["bench", "--target", folder, "--prompts-file", prompts_file, *extra, "--methods", "ar",
                 "--baseline", "ar", "--num-prompts", "1", "--max-new-tokens", "3", "--warmup", "0", "--no-plots",
                 "--no-progress", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert list(json.loads(captured.out.strip().splitlines()[-1])["methods"]["ar"]) == sets
    command = json.loads((tmp_path / "summary.json").read_text())["command"]
    assert f"--datasets {','.join(s for s in sets if s != 'mine') or chr(39) * 2}" in command


def test_bench_help_says_a_prompts_file_alone_runs_only_that_file(capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "alone it runs only this file" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("temperature", (float("inf"), float("nan"), 1e39, 1e308))
def test_decode_config_rejects_a_temperature_float32_cannot_hold(temperature):
    from specflash.runtime.config import DecodeConfig

    with pytest.raises(InputError, match="temperature must be a finite number"):
        DecodeConfig(temperature=temperature)


def test_comma_lists_read_the_same_with_spaces_and_stray_commas():
    from specflash.commands.common import csv_list

    assert csv_list("package-methods, sharegpt-turns,") == csv_list("package-methods,sharegpt-turns") \
        == ("package-methods", "sharegpt-turns")
    assert csv_list(" , ") == ()
