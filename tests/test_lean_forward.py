"""The lean target forward: bit-identical to transformers' forward (logits and tapped
layers, prefill / one-token steps / blocks, after a cache crop), used only where it is
checked to be, and off where it cannot reproduce the model."""

import pytest
import torch
from transformers import DynamicCache

from specflash.hf.leanforward import LeanForward
from specflash.hf.target import TargetModel
from tiny import tiny_hf_model

LEAN_FAMILIES = ("llama", "qwen2", "qwen3")


def transformers_forward(model, ids, cache, taps, logits_to_keep=0):
    """Logits and tapped layer outputs through the model's own forward (hooks)."""
    captured = {}
    hooks = [model.model.layers[i].register_forward_hook(
        lambda _m, _a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in taps]
    try:
        with torch.inference_mode():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=cache is not None,
                           logits_to_keep=logits_to_keep).logits
    finally:
        for hook in hooks:
            hook.remove()
    return logits, captured


@pytest.mark.parametrize("family", LEAN_FAMILIES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lean_forward_is_bit_identical_to_transformers(family, dtype):
    model = tiny_hf_model(family, dtype=dtype)
    assert LeanForward.supports(model) is None
    lean = LeanForward(model)
    taps = (0, 3, 5)
    ids = torch.randint(0, 250, (1, 40), generator=torch.Generator().manual_seed(2))
    ours, theirs = DynamicCache(), DynamicCache()
    # prefill, one-token steps, a 7-token block, a crop (rejected drafts), another block
    for start, end, crop in ((0, 17, None), (17, 18, None), (18, 19, None), (19, 26, 21), (21, 30, None)):
        with torch.inference_mode():
            logits, features = lean(ids[:, start:end], ours, 0, taps)
        expected, expected_features = transformers_forward(model, ids[:, start:end], theirs, taps)
        assert torch.equal(logits, expected)
        for i in taps:
            assert torch.equal(features[i], expected_features[i])
        if crop is not None:
            ours.crop(crop)
            theirs.crop(crop)


@pytest.mark.parametrize("family", LEAN_FAMILIES)
def test_target_forward_uses_the_lean_forward_and_keeps_logits_to_keep(family):
    target = TargetModel(tiny_hf_model(family, dtype=torch.float32))
    target.set_taps((1, 4))
    assert target.forward_path == "lean"
    ids = torch.randint(0, 250, (1, 12), generator=torch.Generator().manual_seed(3))
    out = target.forward(ids, target.new_cache(), logits_to_keep=1)
    expected, features = transformers_forward(target.model, ids, DynamicCache(), (1, 4), logits_to_keep=1)
    assert out.logits.shape == (1, 1, target.output_rows)
    assert torch.equal(out.logits, expected)
    assert torch.equal(out.features, torch.cat([features[1], features[4]], dim=-1))


def test_gemma_keeps_the_transformers_forward():
    model = tiny_hf_model("gemma3")
    assert "not a supported decoder layer" in LeanForward.supports(model)
    assert TargetModel(model).forward_path == "transformers"


def test_hooks_on_submodules_keep_the_transformers_forward():
    model = tiny_hf_model("llama")
    model.model.layers[2].mlp.register_forward_hook(lambda *_: None)
    assert "forward hooks" in LeanForward.supports(model)
    assert TargetModel(model).forward_path == "transformers"


def test_environment_switch_turns_the_lean_forward_off(monkeypatch):
    monkeypatch.setenv("SPECFLASH_FORWARD", "transformers")
    assert TargetModel(tiny_hf_model("llama")).forward_path == "transformers"


def test_a_lean_forward_that_differs_is_not_used(monkeypatch):
    original = LeanForward._layer

    def off_by_a_little(self, *args):
        return original(self, *args) * (1 + 1e-12)

    monkeypatch.setattr(LeanForward, "_layer", off_by_a_little)
    target = TargetModel(tiny_hf_model("llama"))
    assert target.forward_path == "transformers"
    ids = torch.arange(3, 11)[None]
    expected, _ = transformers_forward(target.model, ids, None, ())
    assert torch.equal(target.forward(ids).logits, expected)


def test_padded_batches_take_the_transformers_forward(monkeypatch):
    target = TargetModel(tiny_hf_model("llama"))
    assert target.forward_path == "lean"
    monkeypatch.setattr(LeanForward, "__call__", lambda *a, **k: pytest.fail("lean forward used with a mask"))
    ids = torch.tensor([[0, 5, 6, 7], [4, 5, 6, 7]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    out = target.forward(ids, None, attention_mask=mask)
    with torch.inference_mode():
        expected = target.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(out.logits, expected)
