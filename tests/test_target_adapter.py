"""The target adapter: tapped layers equal Hugging Face hidden_states[i + 1]; embedding
and LM head match the model's own; the cache rolls back."""

import pytest
import torch

from specflash.errors import CheckpointError
from tiny import FAMILIES


@pytest.mark.parametrize("family", FAMILIES)
def test_tapped_layers_equal_output_hidden_states(targets, family):
    target = targets(family)
    ids = torch.randint(0, 250, (1, 13), generator=torch.Generator().manual_seed(0))
    taps = (0, 2, 4)  # the last layer's hidden_states entry is post-norm in HF, so not compared
    target.set_taps(taps)
    ours = target.forward(ids)
    with torch.no_grad():
        reference = target.model(ids, output_hidden_states=True)
    expected = torch.cat([reference.hidden_states[i + 1] for i in taps], dim=-1)
    assert torch.allclose(ours.features, expected, atol=1e-10)
    assert torch.allclose(ours.logits, reference.logits, atol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_lm_head_of_final_hidden_equals_logits(targets, family):
    target = targets(family)
    ids = torch.arange(5, 15)[None]
    with torch.no_grad():
        out = target.model(ids, output_hidden_states=True)
    assert torch.allclose(target.lm_head(out.hidden_states[-1]), out.logits, atol=1e-10)


def test_gemma_embedding_is_scaled(targets):
    target = targets("gemma3")
    ids = torch.tensor([[1, 2, 3]])
    assert target.embed_scale == pytest.approx(64 ** 0.5)
    assert torch.allclose(target.embed(ids), target.embed_raw(ids) * target.embed_scale)
    llama = targets("llama")
    assert llama.embed_scale == 1.0 and torch.equal(llama.embed(ids), llama.embed_raw(ids))


@pytest.mark.parametrize("family", FAMILIES)
def test_crop_cache_then_continue_equals_full_forward(targets, family):
    target = targets(family)
    target.set_taps(())
    ids = torch.randint(0, 250, (1, 30), generator=torch.Generator().manual_seed(1))
    full = target.forward(ids).logits
    cache = target.new_cache()
    target.forward(ids[:, :25], cache)  # 25 > Gemma's sliding window of 8
    target.crop_cache(cache, 20)
    assert target.cache_length(cache) == 20
    tail = target.forward(ids[:, 20:], cache).logits
    assert torch.allclose(tail, full[:, 20:], atol=1e-9)


def test_out_of_range_taps_raise(targets):
    with pytest.raises(CheckpointError, match="out of range"):
        targets("llama").set_taps((0, 6))


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_and_norm_weights_are_the_models_own_under_draft_layer_names(targets, family):
    from specflash.drafter.model import DraftLayer
    from specflash.runtime.loading import drafter_config_for_target

    target = targets(family)
    state = target.model.state_dict()
    prefix = next(k for k in state if k.endswith("layers.0.input_layernorm.weight")).rsplit("layers.0.", 1)[0]
    last = target.num_layers - 1
    layer = target.decoder_layer_state(last)
    assert layer and all(torch.equal(v, state[f"{prefix}layers.{last}.{k}"]) for k, v in layer.items())
    assert torch.equal(target.final_norm_state()["weight"], state[prefix + "norm.weight"])
    assert torch.equal(target.head_weight, target.model.get_output_embeddings().weight)
    draft_names = set(DraftLayer(drafter_config_for_target(target), 0).state_dict())
    assert {"self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"} <= draft_names & set(layer)
