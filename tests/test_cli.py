"""The command line: `generate` on a local target folder, JSON output, and a one-line
error with a non-zero exit for every user mistake."""

import json
import subprocess
import sys

import pytest

from specflash.cli import main
from tiny import tiny_model_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("target") / "tiny"))


@pytest.fixture(scope="module")
def short_context_folder(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("short") / "tiny", max_positions=32))


def run_json(capsys, *args):
    code = main(["generate", "--json", *args])
    out = capsys.readouterr().out
    assert code == 0, out
    return json.loads(out.strip().splitlines()[-1])


def test_generate_json_has_the_documented_fields(capsys, folder):
    data = run_json(capsys, "--target", folder, "--draft", "random", "--prompt", "Write a haiku about the sea",
                    "--max-new-tokens", "12")
    for key in ("text", "token_ids", "num_new_tokens", "tau", "acceptance_lengths", "tokens_per_s",
                "time_to_first_token_s"):
        assert key in data
    assert data["num_new_tokens"] == len(data["token_ids"]) <= 12
    assert data["tau"] >= 1.0


@pytest.mark.parametrize("draft, block", [("random", "16"), ("random", "4"), ("ngram", "8")])
def test_generate_with_a_draft_prints_the_same_tokens_as_without(capsys, folder, draft, block):
    args = ["--target", folder, "--prompt", "Hello, how are you today?", "--max-new-tokens", "30"]
    plain = run_json(capsys, *args, "--draft", "none")
    spec = run_json(capsys, *args, "--draft", draft, "--block-size", block)
    assert spec["token_ids"] == plain["token_ids"]
    assert spec["text"] == plain["text"]


def test_generate_with_static_steps_prints_the_same_tokens(capsys, folder):
    args = ["--target", folder, "--prompt", "Hello, how are you today?", "--max-new-tokens", "30"]
    plain = run_json(capsys, *args, "--draft", "none", "--static-steps", "off")
    for draft in ("none", "random"):
        assert run_json(capsys, *args, "--draft", draft, "--static-steps", "on")["token_ids"] == plain["token_ids"]


def test_generate_streams_text(capsys, folder):
    assert main(["generate", "--target", folder, "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    captured = capsys.readouterr()
    assert "tokens/s" in captured.err


def test_drafter_folder_round_trip_through_the_cli(capsys, folder, tmp_path):
    from specflash.runtime.loading import random_drafter
    from specflash.hf.target import TargetModel

    target = TargetModel.from_pretrained(folder)
    random_drafter(target, block_size=8).save_pretrained(tmp_path / "drafter")
    args = ["--target", folder, "--prompt", "def add(a, b):", "--max-new-tokens", "20", "--no-chat"]
    assert run_json(capsys, *args, "--draft", str(tmp_path / "drafter"))["token_ids"] == \
        run_json(capsys, *args, "--draft", "none")["token_ids"]


@pytest.mark.parametrize("flags, message", [
    (["--prompt", "   "], "prompt is empty"),
    (["--prompt", "hi", "--temperature", "-1"], "temperature must be >= 0"),
    (["--prompt", "hi", "--top-p", "0"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
    (["--prompt", "hi", "--top-k", "-3"], "top_k must be >= 0"),
    (["--prompt", "hi", "--max-new-tokens", "0"], "max_new_tokens must be >= 1"),
    (["--prompt", "hi", "--block-size", "0"], "block size must be >= 1"),
    (["--prompt", "hi", "--draft", "/no/such/drafter"], "does not exist"),
    (["--prompt", "hi", "--dtype", "float8"], "unknown dtype"),
])
def test_bad_input_gets_one_line_and_exit_2(capsys, folder, flags, message):
    code = main(["generate", "--target", folder, *flags])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_unknown_model_name_lists_known_ones(capsys):
    code = main(["generate", "--target", "no-such-model", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "smollm2-135m-instruct" in err


def test_prompt_longer_than_context(capsys, short_context_folder):
    code = main(["generate", "--target", short_context_folder, "--prompt", "the sea " * 40])
    err = capsys.readouterr().err
    assert code == 2 and "context" in err and "shorten the prompt" in err


def test_models_lists_registry_with_licences(capsys):
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "smollm2-135m-instruct" in out and "Apache-2.0" in out and "gemma-3-270m" in out


def test_console_script_exit_code_and_help():
    done = subprocess.run([sys.executable, "-m", "specflash.cli", "generate", "--help"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "--block-size" in done.stdout and "--temperature" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "specflash.cli", "generate", "--target", "no-such-model",
                          "--prompt", "x"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("specflash: error:")


def _subparsers(parser):
    import argparse
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield name, sub
                for inner, subsub in _subparsers(sub):
                    yield f"{name} {inner}", subsub


def test_every_option_of_every_command_has_help():
    from specflash.cli import build_parser
    missing = [f"{name} {action.option_strings[-1]}"
               for name, sub in _subparsers(build_parser())
               for action in sub._actions
               if action.option_strings and not action.help]
    assert not missing, f"options without --help text: {missing}"
