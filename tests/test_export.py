"""`specflash export`: a drafter in the published layout passes for vLLM and SGLang and
gets the exact launch command; a broken one gets the list of what the engine would
reject (config keys, weight names, shapes), and a drafter for another target is caught."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from specflash.cli import main
from specflash.export import check_drafter, launch_command
from specflash.runtime.loading import random_drafter
from specflash.hf.target import TargetModel
from tiny import tiny_model_folder


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    return tiny_model_folder(tmp_path_factory.mktemp("export") / "target")


@pytest.fixture(scope="module")
def good_drafter(target_dir, tmp_path_factory):
    target = TargetModel.from_pretrained(str(target_dir))
    folder = tmp_path_factory.mktemp("export") / "drafter"
    random_drafter(target, block_size=8, num_layers=2).save_pretrained(folder)
    return folder


def copy_drafter(src, dst, config_edit=None, weights_edit=None):
    dst.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    if config_edit:
        config_edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    state = load_file(str(src / "model.safetensors"))
    if weights_edit:
        weights_edit(state)
    save_file(state, str(dst / "model.safetensors"))
    return dst


def test_a_good_drafter_passes_for_vllm_with_the_exact_command(good_drafter, target_dir):
    report = check_drafter(good_drafter, "vllm", target=str(target_dir))
    assert report.ok, report.problems
    assert report.command == (
        f"vllm serve {target_dir.resolve()} \\\n"
        f"  --speculative-config '{{\"method\": \"dflash\", \"model\": \"{good_drafter.resolve()}\", "
        f"\"num_speculative_tokens\": 7}}' \\\n"
        "  --attention-backend FLASH_ATTN")
    assert any("FLASH_ATTN" in note for note in report.notes)


def test_a_good_drafter_passes_for_sglang_with_the_exact_command(good_drafter, target_dir):
    report = check_drafter(good_drafter, "sglang", target=str(target_dir), block_size=4)
    assert report.ok, report.problems
    assert report.command == (
        f"python -m sglang.launch_server --model-path {target_dir.resolve()} \\\n"
        f"  --speculative-algorithm DFLASH --speculative-draft-model-path {good_drafter.resolve()} \\\n"
        "  --speculative-num-draft-tokens 4")


def test_a_registered_target_is_launched_by_its_hub_id():
    assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct" in launch_command(
        "vllm", "HuggingFaceTB/SmolLM2-135M-Instruct", "/d", 16)
    assert '"num_speculative_tokens": 15' in launch_command("vllm", "t", "/d", 16)


def test_a_broken_drafter_gets_every_problem_listed(good_drafter, tmp_path):
    def config_edit(cfg):
        cfg["architectures"] = ["Qwen3ForCausalLM"]
        del cfg["dflash_config"]["mask_token_id"]
        cfg["dflash_config"]["target_layer_ids"] = [1, 99]

    def weights_edit(state):
        del state["fc.weight"]
        state["layers.0.mlp.up_proj.weight"] = state["layers.0.mlp.up_proj.weight"][:-1]
        state["rotary_emb.inv_freq"] = torch.zeros(8, dtype=torch.bfloat16)

    broken = copy_drafter(good_drafter, tmp_path / "broken", config_edit, weights_edit)
    report = check_drafter(broken, "vllm")
    assert not report.ok and report.command is None
    text = "\n".join(report.problems)
    for expected in ("architectures must be", "mask_token_id is missing", "[99] are out of range",
                     "missing 1 tensor(s) the config implies: fc.weight", "wrong shape",
                     "layers.0.mlp.up_proj.weight", "vLLM has no place for", "rotary_emb.inv_freq"):
        assert expected in text, text
    # SGLang skips unknown tensors: a warning there, not a problem
    sglang = check_drafter(broken, "sglang")
    assert not any("rotary_emb" in p for p in sglang.problems)
    assert any("rotary_emb" in w for w in sglang.warnings)


def test_prefixed_weight_names_break_vllm_only(good_drafter, tmp_path):
    prefixed = copy_drafter(good_drafter, tmp_path / "prefixed",
                            weights_edit=lambda s: s.update({f"model.{k}": s.pop(k) for k in list(s)}))
    assert any("model." in p for p in check_drafter(prefixed, "vllm").problems)
    assert check_drafter(prefixed, "sglang").ok


def test_mixed_sliding_and_full_layers_are_refused_by_vllm_only(good_drafter, tmp_path):
    def config_edit(cfg):
        cfg["layer_types"] = ["sliding_attention", "full_attention"]
        cfg["sliding_window"] = 64

    mixed = copy_drafter(good_drafter, tmp_path / "mixed", config_edit)
    assert any("mix sliding_attention" in p for p in check_drafter(mixed, "vllm").problems)
    assert check_drafter(mixed, "sglang").ok


def test_disagreeing_block_sizes_are_a_problem(good_drafter, tmp_path):
    folder = copy_drafter(good_drafter, tmp_path / "blocks", lambda c: c["dflash_config"].update(block_size=4))
    assert any("dflash_config.block_size is 4" in p for p in check_drafter(folder, "sglang").problems)


def test_a_drafter_for_another_target_is_caught(good_drafter, target_dir, tmp_path):
    other = tmp_path / "other-target"
    other.mkdir()
    cfg = json.loads((target_dir / "config.json").read_text())
    cfg.update(num_hidden_layers=12, hidden_size=128)
    (other / "config.json").write_text(json.dumps(cfg))
    problems = "\n".join(check_drafter(good_drafter, "vllm", target=str(other)).problems)
    assert "hidden_size is 128" in problems and "num_hidden_layers is 12" in problems


def test_missing_files_are_problems_not_crashes(tmp_path):
    assert "not a folder" in check_drafter(tmp_path / "nope", "vllm").problems[0]
    (tmp_path / "empty").mkdir()
    problems = check_drafter(tmp_path / "empty", "sglang").problems
    assert any("config.json is missing" in p for p in problems)
    assert any("no model.safetensors" in p for p in problems)


def test_export_command_prints_the_command_or_the_problems(capsys, good_drafter, tmp_path):
    assert main(["export", str(good_drafter), "--engine", "sglang"]) == 0
    out = capsys.readouterr().out
    assert "--speculative-algorithm DFLASH" in out and "--speculative-num-draft-tokens 8" in out
    broken = copy_drafter(good_drafter, tmp_path / "b", lambda c: c.pop("num_target_layers"))
    assert main(["export", str(broken), "--engine", "vllm"]) == 1
    err = capsys.readouterr().err
    assert "vLLM would reject" in err and "  - config.json: num_target_layers is missing" in err
    assert main(["export", str(broken), "--engine", "vllm", "--json"]) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["ok"] is False and data["command"] is None and data["problems"]


def test_a_draft_vocabulary_passes_with_a_note_that_engines_ignore_it(good_drafter, target_dir, tmp_path):
    folder = copy_drafter(good_drafter, tmp_path / "with-vocab")
    (folder / "draft_vocab.json").write_text(json.dumps({"format": "specflash.draft_vocab/1", "size": 2,
                                                         "target_ids": [1, 2]}))
    for engine in ("vllm", "sglang"):
        report = check_drafter(folder, engine, target=str(target_dir))
        assert report.ok, report.problems
        assert any("draft_vocab.json" in note for note in report.notes)
    assert not any("draft_vocab.json" in n for n in check_drafter(good_drafter, "vllm", target=str(target_dir)).notes)
