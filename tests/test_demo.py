"""`specflash demo`: the side-by-side table, the same-output check and the marking of
accepted draft tokens."""

from specflash.cli import main
from specflash.runtime.config import DecodeConfig
from specflash.runtime.decode import SpeculativeDecoder
from specflash.demo import accepted_mask
from specflash.runtime.proposers import OracleProposer
from tiny import hf_greedy, tiny_model_folder


def test_accepted_mask_marks_exactly_the_accepted_drafts(targets):
    target = targets("llama")
    prompt = list(range(3, 13))
    reference = hf_greedy(target, prompt, 13)
    oracle = OracleProposer(prompt + reference, target.vocab_rows)
    result = SpeculativeDecoder(target, oracle, 4).generate(prompt, DecodeConfig(max_new_tokens=13,
                                                                                   stop_token_ids=()),
                                                            keep_steps=True)
    # first token from prefill, then 3 full blocks: 3 accepted drafts + the target's own token
    assert accepted_mask(result) == [False] + [True, True, True, False] * 3


def test_demo_command_runs_and_checks_same_output(tmp_path, capsys):
    folder = tiny_model_folder(tmp_path / "tiny")
    code = main(["demo", "--target", str(folder), "--draft", "ngram", "--max-new-tokens", "12", "--prompt",
                 "hello there", "--color", "never"])
    out = capsys.readouterr().out
    assert code == 0
    assert "same output as plain decoding: yes" in out and "tau" in out and "dflash tok/s" in out
