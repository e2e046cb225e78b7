"""`specflash export`: a drafter in the published layout passes for vLLM and SGLang and
gets the exact launch command; a broken one gets the list of what the engine would
reject (config keys, weight names, shapes), and a drafter for another target is caught.
The engine facts (vLLM 0.33.0, SGLang 0.5.23): mixed sliding/full drafters serve on vLLM's
V2 runner; SGLang reads the window from `sliding_window` only; vLLM maps `d2t` to its
reduced draft vocabulary and skips `t2d`; tensor parallelism needs heads that split evenly.
A reduced-vocabulary export drafts the same tokens as specflash's DraftHead."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specflash.cli import main
from specflash.drafter import DFlashDrafter, DraftHead
from specflash.errors import InputError
from specflash.export import (check_drafter, expected_weights, export, head_weights, launch_command,
                              valid_tp_sizes)
from specflash.hf.target import TargetModel
from specflash.runtime.loading import random_drafter
from tiny import tiny_model_folder

SHIPPED = Path(__file__).resolve().parents[1] / "specflash" / "drafters" / "smollm2-135m-instruct"
SMOLLM2 = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 576,
           "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "vocab_size": 49152}


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
        cfg["dflash_config"]["mask_token_id"] = 10 ** 6
        cfg["dflash_config"]["target_layer_ids"] = [1, 99]

    def weights_edit(state):
        del state["fc.weight"]
        state["layers.0.mlp.up_proj.weight"] = state["layers.0.mlp.up_proj.weight"][:-1]
        state["rotary_emb.inv_freq"] = torch.zeros(8, dtype=torch.bfloat16)

    broken = copy_drafter(good_drafter, tmp_path / "broken", config_edit, weights_edit)
    report = check_drafter(broken, "vllm")
    assert not report.ok and report.command is None
    text = "\n".join(report.problems)
    for expected in ("architectures must be", "mask_token_id 1000000 is not a row", "[99] out of range",
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


def test_the_expected_weights_are_the_drafters_own(good_drafter):
    drafter = DFlashDrafter.from_pretrained(good_drafter)
    built = {name: tuple(t.shape) for name, t in drafter.published_state_dict().items()}
    assert expected_weights(drafter.config) == built
    assert built == {name: tuple(t.shape) for name, t in load_file(str(good_drafter / "model.safetensors")).items()}
    wide = expected_weights(drafter.config, target_hidden_size=2 * drafter.config.hidden_size)
    assert wide["fc.weight"][1] == 2 * built["fc.weight"][1]


def test_config_values_are_checked_by_the_drafter_config(good_drafter, tmp_path):
    folder = copy_drafter(good_drafter, tmp_path / "heads",
                          lambda c: c.update(num_attention_heads=4, num_key_value_heads=3))
    problems = "\n".join(check_drafter(folder, "vllm").problems)
    assert "num_attention_heads must be a multiple of num_key_value_heads" in problems


def test_mixed_sliding_and_full_layers_pass_for_both_engines(good_drafter, tmp_path):
    """vLLM's V2 model runner (the default) serves them; only the V1 runner refuses: a note."""
    def config_edit(cfg):
        cfg["layer_types"] = ["sliding_attention", "full_attention"]
        cfg["sliding_window"] = 64

    mixed = copy_drafter(good_drafter, tmp_path / "mixed", config_edit)
    vllm = check_drafter(mixed, "vllm")
    assert vllm.ok, vllm.problems
    assert any("V1 runner" in note and "V2" in note for note in vllm.notes)
    assert check_drafter(mixed, "sglang").ok


def test_sglang_reads_the_window_from_sliding_window_only(good_drafter, tmp_path):
    def swa_only(cfg):
        cfg["layer_types"] = ["sliding_attention", "full_attention"]
        cfg["dflash_config"]["swa_window_size"] = 64

    folder = copy_drafter(good_drafter, tmp_path / "swa", swa_only)
    assert check_drafter(folder, "vllm").ok  # vLLM reads dflash_config.swa_window_size first
    problems = check_drafter(folder, "sglang").problems
    assert len(problems) == 1 and "sliding_window" in problems[0] and "swa_window_size" in problems[0]
    # --out writes the key SGLang reads
    report = export(folder, "sglang", out=tmp_path / "swa-out")
    assert report.ok, report.problems
    assert json.loads((tmp_path / "swa-out" / "config.json").read_text())["sliding_window"] == 64
    # two windows that disagree: vLLM would run another window than the one trained
    both = copy_drafter(folder, tmp_path / "both", lambda c: c.update(sliding_window=32))
    assert any("swa_window_size (64)" in p for p in check_drafter(both, "vllm").problems)
    assert check_drafter(both, "sglang").ok


def reduced_head_folder(good_drafter, dst, ids, config_edit=None, d2t=None, t2d=True):
    """The good drafter plus its own head over `ids` (what --reduced-vocab writes), by hand."""
    cfg = json.loads((good_drafter / "config.json").read_text())
    hidden, vocab = cfg["hidden_size"], cfg["vocab_size"]
    index = torch.tensor(ids)

    def weights_edit(state):
        state["lm_head.weight"] = torch.randn(len(ids), hidden).to(torch.bfloat16)
        state["d2t"] = index - torch.arange(len(ids)) if d2t is None else d2t
        if t2d:
            state["t2d"] = torch.zeros(vocab, dtype=torch.bool).index_fill(0, index, True)

    def edit(c):
        c["draft_vocab_size"] = len(ids)
        if config_edit:
            config_edit(c)

    return copy_drafter(good_drafter, dst, edit, weights_edit)


def test_vllm_maps_d2t_to_its_reduced_vocabulary_and_skips_t2d(good_drafter, tmp_path):
    ids = [3, 5, 8, 13, 21, 34]
    folder = reduced_head_folder(good_drafter, tmp_path / "reduced", ids)
    report = check_drafter(folder, "vllm")
    assert report.ok, report.problems
    assert any("draft vocabulary: 6 of" in line for line in report.summary)
    assert any("skips t2d" in note for note in report.notes)
    sglang = check_drafter(folder, "sglang")  # no own head there: ignored, the target's full head drafts
    assert sglang.ok and any("d2t" in w and "lm_head.weight" in w for w in sglang.warnings)

    def problems(name, **kwargs):
        return "\n".join(check_drafter(reduced_head_folder(good_drafter, tmp_path / name, ids, **kwargs),
                                       "vllm").problems)

    assert "d2t is present but config.json sets no draft_vocab_size" in problems(
        "no-size", config_edit=lambda c: c.pop("draft_vocab_size"))
    assert "distinct target id" in problems("dup", d2t=-torch.arange(len(ids)))  # all to target id 0
    assert "distinct target id" in problems("range", d2t=torch.full((len(ids),), 10 ** 6))
    assert "d2t is F32" in problems("float", d2t=torch.zeros(len(ids)))
    missing = copy_drafter(folder, tmp_path / "no-d2t", weights_edit=lambda s: s.pop("d2t"))
    assert any("needs d2t" in p for p in check_drafter(missing, "vllm").problems)
    wrong_rows = copy_drafter(folder, tmp_path / "rows", weights_edit=lambda s: s.update(
        {"lm_head.weight": s["lm_head.weight"][:-1]}))
    assert any("lm_head.weight" in p and "wrong shape" in p for p in check_drafter(wrong_rows, "vllm").problems)


def test_tensor_parallel_sizes_must_split_the_heads():
    """SmolLM2-135M: 9 heads, 3 KV heads, MLP 1536: 2, 4 and 8 do not split 9 heads, 9 is above 8."""
    assert valid_tp_sizes({"the target": (9, 3, 1536), "the drafter": (9, 3, 1536)}) == [1, 3]
    assert valid_tp_sizes({"m": (32, 8, 14336)}) == [1, 2, 4, 8]
    assert valid_tp_sizes({"m": (16, 2, 4096)}, limit=16) == [1, 2, 4, 8, 16]  # KV heads replicated past 2


def test_tp_size_is_checked_against_target_and_drafter(tmp_path):
    target = tmp_path / "smollm2"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(SMOLLM2))
    tip = check_drafter(SHIPPED, "sglang", target=str(target))
    assert tip.ok, tip.problems
    assert any("--tp-size N with N one of 1, 3" in note for note in tip.notes)
    bad = check_drafter(SHIPPED, "vllm", target=str(target), tp_size=2)
    assert not bad.ok and bad.command is None
    assert "9 attention heads do not divide by 2" in bad.problems[0] and "(valid: 1, 3)" in bad.problems[0]
    good = check_drafter(SHIPPED, "vllm", target=str(target), tp_size=3)
    assert good.ok, good.problems
    assert good.command.endswith("--attention-backend FLASH_ATTN \\\n  --tensor-parallel-size 3")
    assert "--tp-size 3" in check_drafter(SHIPPED, "sglang", target=str(target), tp_size=3).command
    # without the target only the drafter is known: said so
    alone = check_drafter(SHIPPED, "vllm", tp_size=3)
    assert alone.ok and any("target's heads were not checked" in w for w in alone.warnings)


def test_reduced_vocab_export_drafts_the_same_tokens_as_the_draft_head(target_dir, tmp_path):
    target = TargetModel.from_pretrained(str(target_dir))
    generator = torch.Generator().manual_seed(0)
    ids = torch.randperm(target.vocab_rows, generator=generator)[:40].sort().values
    source = tmp_path / "drafter"
    random_drafter(target, block_size=8, num_layers=1).set_draft_vocab(ids).save_pretrained(source, torch.float32)
    out = tmp_path / "vllm-drafter"
    report = export(source, "vllm", target=str(target_dir), out=out, reduced_vocab=True)
    assert report.ok, report.problems
    assert report.written == out.resolve() and str(out.resolve()) in report.command

    cfg = json.loads((out / "config.json").read_text())
    state = load_file(str(out / "model.safetensors"))
    n, hidden = len(ids), target.hidden_size
    assert cfg["draft_vocab_size"] == n and cfg["vocab_size"] == target.vocab_rows
    assert state["lm_head.weight"].shape == (n, hidden) and state["lm_head.weight"].dtype == torch.float32
    assert torch.equal(state["lm_head.weight"], target.head_rows(ids)[0])
    assert state["d2t"].dtype == torch.int64 and torch.equal(state["d2t"] + torch.arange(n), ids)
    assert set(state) == set(expected_weights(DFlashDrafter.from_pretrained(source).config)) | set(
        head_weights(DFlashDrafter.from_pretrained(source).config, n)) - {"embed_tokens.weight"}

    # vLLM's proposal: logits over the N rows, draft id i -> target id i + d2t[i]
    drafter = DFlashDrafter.from_pretrained(source)
    head = DraftHead(drafter, target)
    hidden_states = torch.randn(64, hidden, generator=generator)
    reduced = hidden_states @ state["lm_head.weight"].T
    draft_ids = reduced.argmax(dim=-1)
    assert torch.equal(draft_ids + state["d2t"][draft_ids], head.greedy(hidden_states))
    full = reduced.new_full((64, cfg["vocab_size"]), float("-inf"))  # as vLLM scatters them
    full[:, torch.arange(n) + state["d2t"]] = reduced
    assert torch.equal(full.argmax(dim=-1), head.logits(hidden_states).argmax(dim=-1))


def test_export_command_writes_the_reduced_vocab_folder(capsys, target_dir, tmp_path):
    target = TargetModel.from_pretrained(str(target_dir))
    source = tmp_path / "drafter"
    random_drafter(target, block_size=8, num_layers=1).set_draft_vocab(list(range(10, 50))).save_pretrained(source)
    out = tmp_path / "out"
    assert main(["export", str(source), "--engine", "vllm", "--target", str(target_dir), "--out", str(out),
                 "--reduced-vocab"]) == 0
    text = capsys.readouterr().out
    assert f"wrote {out.resolve()}" in text and "draft vocabulary: 40 of" in text and str(out.resolve()) in text


def test_reduced_vocab_needs_out_a_target_a_draft_vocabulary_and_vllm(good_drafter, target_dir, tmp_path):
    with pytest.raises(InputError, match="--out"):
        export(good_drafter, "vllm", target=str(target_dir), reduced_vocab=True)
    with pytest.raises(InputError, match="no draft_vocab.json"):
        export(good_drafter, "vllm", target=str(target_dir), out=tmp_path / "a", reduced_vocab=True)
    with pytest.raises(InputError, match="--target"):
        export(good_drafter, "vllm", out=tmp_path / "b", reduced_vocab=True)
    with pytest.raises(InputError, match="SGLang has no place"):
        export(good_drafter, "sglang", target=str(target_dir), out=tmp_path / "c", reduced_vocab=True)
    assert main(["export", str(good_drafter), "--engine", "vllm", "--reduced-vocab"]) == 2


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
        assert any("--reduced-vocab" in note for note in report.notes) == (engine == "vllm")
    assert not any("draft_vocab.json" in n for n in check_drafter(good_drafter, "vllm", target=str(target_dir)).notes)
