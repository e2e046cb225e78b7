"""Drafter config and checkpoint: the published layout loads, save/load round-trips, and
every malformed or mismatched checkpoint raises a CheckpointError that says what is wrong."""

import json

import pytest
import torch
from safetensors.torch import save_file

from specflash.drafter import DrafterConfig, default_target_layer_ids
from specflash.drafter import DFlashDrafter
from specflash.errors import CheckpointError
from specflash.runtime.loading import check_compatible, load_drafter
from tiny import tiny_drafter

H, I, HEADS, KV, HD, V, L_T = 64, 96, 4, 2, 16, 256, 6  # noqa: E741


def published_config(**overrides) -> dict:
    """A config.json laid out exactly as z-lab publishes (Qwen3-8B drafter, scaled down)."""
    config = {
        "architectures": ["DFlashDraftModel"],
        "model_type": "qwen3",
        "hidden_size": H,
        "intermediate_size": I,
        "num_hidden_layers": 2,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "head_dim": HD,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-6,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "max_position_embeddings": 40960,
        "vocab_size": V,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "block_size": 16,
        "num_target_layers": L_T,
        "layer_types": ["full_attention", "full_attention"],
        "dflash_config": {"mask_token_id": V - 1, "target_layer_ids": [1, 3]},
    }
    config.update(overrides)
    return config


def published_weights(n_layers=2, n_features=2) -> dict:
    w = {"fc.weight": torch.randn(H, n_features * H), "hidden_norm.weight": torch.ones(H),
         "norm.weight": torch.ones(H)}
    for i in range(n_layers):
        p = f"layers.{i}."
        w.update({
            p + "input_layernorm.weight": torch.ones(H),
            p + "post_attention_layernorm.weight": torch.ones(H),
            p + "self_attn.q_proj.weight": torch.randn(HEADS * HD, H) * 0.02,
            p + "self_attn.k_proj.weight": torch.randn(KV * HD, H) * 0.02,
            p + "self_attn.v_proj.weight": torch.randn(KV * HD, H) * 0.02,
            p + "self_attn.o_proj.weight": torch.randn(H, HEADS * HD) * 0.02,
            p + "self_attn.q_norm.weight": torch.ones(HD),
            p + "self_attn.k_norm.weight": torch.ones(HD),
            p + "mlp.gate_proj.weight": torch.randn(I, H) * 0.02,
            p + "mlp.up_proj.weight": torch.randn(I, H) * 0.02,
            p + "mlp.down_proj.weight": torch.randn(H, I) * 0.02,
        })
    return {k: v.to(torch.bfloat16) for k, v in w.items()}


def write_folder(path, config, weights):
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    save_file(weights, str(path / "model.safetensors"))
    return path


def test_published_layout_loads(tmp_path):
    weights = published_weights()
    folder = write_folder(tmp_path / "d", published_config(), weights)
    drafter = DFlashDrafter.from_pretrained(folder)
    assert drafter.config.target_layer_ids == (1, 3)
    assert drafter.config.mask_token_id == V - 1 and drafter.block_size == 16
    state = drafter.state_dict()
    for name, tensor in weights.items():
        assert torch.equal(state[name], tensor.float()), name


def test_save_then_load_gives_identical_weights_and_config(tmp_path, targets):
    drafter = tiny_drafter(targets("llama")).float()
    drafter.save_pretrained(tmp_path / "d", dtype=torch.float32)
    loaded = DFlashDrafter.from_pretrained(tmp_path / "d")
    assert loaded.config == drafter.config
    for (name, a), (_, b) in zip(drafter.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_saved_files_use_published_names_and_bf16(tmp_path, targets):
    from safetensors import safe_open

    drafter = tiny_drafter(targets("llama"))
    drafter.save_pretrained(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    for key in ("block_size", "num_target_layers", "layer_types", "hidden_size", "num_hidden_layers"):
        assert key in config
    assert set(config["dflash_config"]) >= {"mask_token_id", "target_layer_ids"}
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.bfloat16 for k in keys)
    assert {"fc.weight", "hidden_norm.weight", "norm.weight", "layers.0.self_attn.q_proj.weight",
            "layers.0.self_attn.k_norm.weight", "layers.1.mlp.down_proj.weight"} <= keys
    assert not any(k.startswith(("embed_tokens", "lm_head", "rotary")) for k in keys)


def test_default_target_layer_ids_follow_the_published_rule():
    assert default_target_layer_ids(36, 5) == [1, 9, 17, 25, 33]  # Qwen3-8B
    assert default_target_layer_ids(32, 5) == [1, 8, 15, 22, 29]  # Llama-3.1-8B
    assert default_target_layer_ids(30, 1) == [15]


def test_missing_target_layer_ids_get_the_default(tmp_path):
    config = published_config(num_target_layers=36)
    config["dflash_config"] = {"mask_token_id": V - 1}
    weights = published_weights(n_features=5)
    drafter = DFlashDrafter.from_pretrained(write_folder(tmp_path / "d", config, weights))
    assert drafter.config.target_layer_ids == (1, 9, 17, 25, 33)


@pytest.mark.parametrize("change, message", [
    ({"block_size": 0}, "block_size"),
    ({"dflash_config": {"mask_token_id": V, "target_layer_ids": [1, 3]}}, "mask_token_id"),
    ({"dflash_config": {"mask_token_id": V - 1, "target_layer_ids": [1, 6]}}, "out of range"),
    ({"layer_types": ["full_attention"]}, "layer_types"),
    ({"layer_types": ["sliding_attention", "full_attention"]}, "sliding_window"),
    ({"hidden_act": "gelu"}, "hidden_act"),
])
def test_bad_config_raises_checkpoint_error(tmp_path, change, message):
    folder = write_folder(tmp_path / "d", published_config(**change), published_weights())
    with pytest.raises(CheckpointError, match=message):
        DFlashDrafter.from_pretrained(folder)


def test_missing_weights_raise(tmp_path):
    weights = published_weights()
    del weights["norm.weight"]
    with pytest.raises(CheckpointError, match="missing weights norm.weight"):
        DFlashDrafter.from_pretrained(write_folder(tmp_path / "d", published_config(), weights))


def test_unexpected_weights_raise(tmp_path):
    weights = published_weights()
    weights["layers.2.mlp.up_proj.weight"] = torch.zeros(I, H, dtype=torch.bfloat16)
    with pytest.raises(CheckpointError, match="unexpected weights layers.2"):
        DFlashDrafter.from_pretrained(write_folder(tmp_path / "d", published_config(), weights))


def test_wrong_shape_weights_raise(tmp_path):
    weights = published_weights(n_features=3)  # fc is [H, 3H] but config says 2 features
    with pytest.raises(CheckpointError, match="wrong shape"):
        DFlashDrafter.from_pretrained(write_folder(tmp_path / "d", published_config(), weights))


def test_missing_folder_and_files_raise(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        DFlashDrafter.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        DFlashDrafter.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "config.json").write_text(json.dumps(published_config()))
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DFlashDrafter.from_pretrained(tmp_path / "empty")
    (tmp_path / "empty" / "model.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(CheckpointError, match="cannot read"):
        DFlashDrafter.from_pretrained(tmp_path / "empty")


def test_non_json_config_raises(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        DFlashDrafter.from_pretrained(tmp_path / "d")


def test_drafter_for_another_target_is_rejected(tmp_path, targets):
    target = targets("llama")
    wide = published_config(hidden_size=128, intermediate_size=I)
    config = DrafterConfig.from_dict(wide)
    with pytest.raises(CheckpointError, match="hidden size 128 != target hidden size 64"):
        check_compatible(DFlashDrafter(config), target)
    other_depth = DrafterConfig.from_dict(published_config(num_target_layers=12,
                                                           dflash_config={"mask_token_id": 3,
                                                                          "target_layer_ids": [1, 9]}))
    with pytest.raises(CheckpointError, match="out of range"):
        check_compatible(DFlashDrafter(other_depth), target)
    big_vocab = DrafterConfig.from_dict(published_config(vocab_size=1000,
                                                         dflash_config={"mask_token_id": 999,
                                                                        "target_layer_ids": [1, 3]}))
    with pytest.raises(CheckpointError, match="mask_token_id 999"):
        check_compatible(DFlashDrafter(big_vocab), target)


def test_load_drafter_checks_the_target(tmp_path, targets):
    folder = write_folder(tmp_path / "d", published_config(hidden_size=128), published_weights())
    with pytest.raises(CheckpointError):
        load_drafter(folder, targets("llama"))


def test_config_round_trip_keeps_unknown_keys():
    data = published_config(custom_key=7)
    data["dflash_config"]["extra_flag"] = True
    out = DrafterConfig.from_dict(data).to_dict()
    assert out["custom_key"] == 7 and out["dflash_config"]["extra_flag"] is True
    assert out["dflash_config"]["target_layer_ids"] == [1, 3]


def test_feature_scale_is_folded_into_fc_on_save(tmp_path, targets):
    """Training divides features by their RMS; the saved fc.weight absorbs it, so the
    published format (no extra tensor) reproduces the same outputs."""
    target = targets("llama")
    drafter = tiny_drafter(target).float()
    drafter.feature_scale.copy_(torch.rand(drafter.feature_scale.shape) * 50 + 0.5)
    drafter.save_pretrained(tmp_path / "d", dtype=torch.float32)
    loaded = DFlashDrafter.from_pretrained(tmp_path / "d")
    assert torch.equal(loaded.feature_scale, torch.ones_like(loaded.feature_scale))
    features = torch.randn(1, 9, drafter.fc.in_features) * 30
    block = torch.randn(1, 4, 64)
    args = (block, torch.arange(9, 13)[None], features, torch.arange(9)[None])
    with torch.no_grad():
        assert torch.allclose(drafter(*args), loaded(*args), atol=1e-5)


def test_draft_vocab_round_trips_beside_the_published_weights(tmp_path, targets):
    import json

    from safetensors import safe_open

    from specflash.drafter import DRAFT_VOCAB_NAME

    drafter = tiny_drafter(targets("llama")).set_draft_vocab([9, 3, 3, 40, 7])
    drafter.save_pretrained(tmp_path / "d")
    data = json.loads((tmp_path / "d" / DRAFT_VOCAB_NAME).read_text())
    assert data["target_ids"] == [3, 7, 9, 40] and data["size"] == 4
    with safe_open(str(tmp_path / "d" / "model.safetensors"), "pt") as f:
        assert all("vocab" not in k and "d2t" not in k for k in f.keys())  # engines stop at unknown tensors
    assert DFlashDrafter.from_pretrained(tmp_path / "d").draft_vocab.tolist() == [3, 7, 9, 40]
    # Saving a full-vocabulary drafter into the same folder removes the stale file.
    drafter.set_draft_vocab(None).save_pretrained(tmp_path / "d")
    assert not (tmp_path / "d" / DRAFT_VOCAB_NAME).exists()
    assert DFlashDrafter.from_pretrained(tmp_path / "d").draft_vocab is None


@pytest.mark.parametrize("content, message", [
    ("not json", "not a draft vocabulary"),
    ('{"format": "other", "target_ids": [1]}', "expected format"),
    ('{"format": "specflash.draft_vocab/1", "size": 1, "target_ids": [100000]}', "must lie in"),
])
def test_bad_draft_vocab_file_raises_checkpoint_error(tmp_path, targets, content, message):
    from specflash.drafter import DRAFT_VOCAB_NAME

    tiny_drafter(targets("llama")).save_pretrained(tmp_path / "d")
    (tmp_path / "d" / DRAFT_VOCAB_NAME).write_text(content)
    with pytest.raises(CheckpointError, match=message):
        DFlashDrafter.from_pretrained(tmp_path / "d")
