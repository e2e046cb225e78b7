"""The training loop: it learns, resumes exactly after a kill, DDP over 2 CPU processes
equals one process with the combined batch, and export writes a loadable drafter."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

from specflash.cli import main
from specflash.drafter import DFlashDrafter
from specflash.train.loop import TrainConfig, Trainer, export_run
from train_fixtures import make_training_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    folder, target, data = make_training_data(root, n_prompts=96)
    return root, folder, target, data


def config(setup, out, **changes):
    root, folder, _, data = setup
    base = dict(data=[str(data)], out=str(root / out), target=str(folder), num_layers=1, block_size=8,
                anchors_per_sequence=32, epochs=50, lr=3e-3, grad_accum=2, draft_vocab=0, held_out_fraction=0.2,
                eval_every=0, save_every=10_000, eval_sequences=32, precision="fp32")
    base.update(changes)
    return TrainConfig(**base)


def test_training_raises_held_out_acceptance(setup):
    trainer = Trainer(config(setup, "learn", max_steps=200), target=setup[2], progress=False)
    before = trainer.evaluate()["tau_estimate"]
    trainer.fit()
    after = trainer.evaluate()["tau_estimate"]
    assert before < 1.2
    assert after > before + 1.0, (before, after)


@pytest.mark.parametrize("noise", [0.0, 0.3], ids=["plain", "feature-noise"])
def test_kill_and_resume_equals_uninterrupted(setup, noise):
    target = setup[2]
    straight = Trainer(config(setup, f"straight-{noise}", max_steps=8, save_every=2, feature_noise=noise),
                       target=target, progress=False)
    straight.fit()

    class Killed(Trainer):
        def train_step(self):
            if self.step == 5:
                raise KeyboardInterrupt
            return super().train_step()

    killed = Killed(config(setup, f"resumed-{noise}", max_steps=8, save_every=2, feature_noise=noise), target=target,
                    progress=False)
    with pytest.raises(KeyboardInterrupt):
        killed.fit()
    resumed = Trainer(config(setup, f"resumed-{noise}", max_steps=8, save_every=2, feature_noise=noise),
                      target=target, progress=False)
    resumed.fit()
    assert resumed.step == straight.step == 8
    for (name, a), b in zip(straight.drafter.state_dict().items(), resumed.drafter.state_dict().values()):
        assert torch.equal(a, b), name


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_process_group(command: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    """Run a launcher in its own session; past the timeout kill it and every rank it started
    (killing the launcher alone leaves its ranks running) and report exit code -9."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        return subprocess.CompletedProcess(command, -9, out, f"timed out after {timeout} s\n{err}")
    return subprocess.CompletedProcess(command, process.returncode, out, err)


def test_ddp_two_processes_equal_one_process_with_the_combined_batch(setup):
    root, folder, _, data = setup
    common = ["train", "fit", "--data", str(data), "--target", str(folder), "--num-layers", "1", "--block-size",
              "8", "--anchors", "16", "--draft-vocab", "0", "--max-steps", "2", "--eval-every", "0", "--lr", "1e-3",
              "--threads", "1", "--precision", "fp32"]
    assert main(common + ["--out", str(root / "single"), "--grad-accum", "2"]) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1")
    errors = []
    for _attempt in range(2):  # one retry: gloo has aborted or hung at start-up/teardown on a loaded 2-core CI machine
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                    "127.0.0.1", "--master-port", str(free_port())]
        done = run_process_group([*launcher, "-m", "specflash.cli", *common, "--out", str(root / "ddp"),
                                  "--grad-accum", "1", "--no-resume"], env=env, timeout=150)
        if done.returncode == 0:
            break
        # Rank errors come first in torchrun's stderr, its own traceback last.
        errors.append(f"exit {done.returncode}\n" + done.stderr[:3000] + "\n...\n" + done.stderr[-800:])
    assert done.returncode == 0, "\n=====\n".join(errors)
    single = torch.load(root / "single" / "checkpoints" / "last.pt", weights_only=False)
    ddp = torch.load(root / "ddp" / "checkpoints" / "last.pt", weights_only=False)
    assert single["step"] == ddp["step"] == 2
    for name, a in single["drafter"].items():
        assert torch.allclose(a, ddp["drafter"][name], atol=1e-5), name


def test_export_writes_a_loadable_drafter_with_a_card(setup, capsys):
    root, folder, target, _ = setup
    trainer = Trainer(config(setup, "export", max_steps=3), target=target, progress=False)
    trainer.fit()
    out = export_run(trainer, root / "exported")
    drafter = DFlashDrafter.from_pretrained(out)
    assert drafter.config.target_layer_ids == (1, 3) and drafter.block_size == 8
    card = (out / "README.md").read_text()
    assert "tau estimate" in card and "fraction of training tokens generated by the target: 1.0" in card
    info = json.loads((out / "training_info.json").read_text())
    assert info["steps"] == 3
    # The exported drafter decodes losslessly through the CLI.
    args = ["generate", "--target", str(folder), "--prompt", "Write about the sea", "--max-new-tokens", "24",
            "--json"]
    assert main(args + ["--draft", str(out)]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(args + ["--draft", "none"]) == 0
    plain = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert spec["token_ids"] == plain["token_ids"]


def test_export_with_a_draft_vocabulary_writes_it_and_decoding_uses_it(setup):
    root, _, target, _ = setup
    trainer = Trainer(config(setup, "vocab", max_steps=2, draft_vocab=64), target=target, progress=False)
    trainer.fit()
    out = export_run(trainer, root / "exported-vocab")
    drafter = DFlashDrafter.from_pretrained(out)
    assert drafter.draft_vocab is not None and torch.equal(drafter.draft_vocab, trainer.subset.ids)
    assert "draft vocabulary: 64 of" in (out / "README.md").read_text()


def exported_after(setup, name, steps, **changes):
    """Train `steps` steps in run `name` and export it: (target, drafter folder)."""
    root, _, target, _ = setup
    trainer = Trainer(config(setup, name, max_steps=steps, **changes), target=target, progress=False)
    trainer.fit()
    return target, export_run(trainer, root / f"{name}-drafter")


def test_init_from_an_exported_drafter_starts_from_its_function(setup):
    target, folder = exported_after(setup, "warm-a", 20)
    warm = Trainer(config(setup, "warm-b", init_from=str(folder)), target=target, progress=False)
    cold = Trainer(config(setup, "warm-c"), target=target, progress=False)
    exported = Trainer(config(setup, "warm-d"), target=target, progress=False)
    exported.drafter.load_state_dict(DFlashDrafter.from_pretrained(folder).state_dict(), strict=False)
    exported.drafter.feature_scale.fill_(1.0)
    # Same held-out acceptance as the exported drafter itself (feature scale unfolded, bf16 weights).
    assert warm.evaluate() == exported.evaluate() != cold.evaluate()


def test_init_from_a_drafter_of_another_shape_is_refused(setup):
    from specflash.errors import InputError

    target, folder = exported_after(setup, "shape-a", 1)
    with pytest.raises(InputError, match="target_layer_ids"):
        Trainer(config(setup, "shape-b", target_layer_ids=[0, 2], init_from=str(folder)), target=target,
                progress=False)


def test_init_from_a_drafter_of_another_block_size_keeps_its_weights(setup):
    target, folder = exported_after(setup, "block-a", 5)
    smaller = Trainer(config(setup, "block-b", block_size=4, init_from=str(folder)), target=target, progress=False)
    same = Trainer(config(setup, "block-c", init_from=str(folder)), target=target, progress=False)
    assert smaller.drafter.block_size == 4 and same.drafter.block_size == 8
    theirs = same.drafter.state_dict()
    for name, weight in smaller.drafter.state_dict().items():
        assert torch.equal(weight, theirs[name]), name
    smaller.config.max_steps = 1
    smaller.fit()
    assert DFlashDrafter.from_pretrained(export_run(smaller)).block_size == 4


def test_init_from_a_drafter_with_fewer_layers_grows_it_and_keeps_its_function(setup):
    from specflash.errors import InputError

    target, folder = exported_after(setup, "grow-a", 20)
    same = Trainer(config(setup, "grow-b", init_from=str(folder)), target=target, progress=False)
    grown = Trainer(config(setup, "grow-c", num_layers=2, init_from=str(folder), max_steps=3), target=target,
                    progress=False)
    new_layer = grown.drafter.layers[1]
    assert new_layer.self_attn.o_proj.weight.abs().max() == 0 and new_layer.mlp.down_proj.weight.abs().max() == 0
    assert grown.evaluate() == same.evaluate()
    grown.fit()
    assert new_layer.self_attn.o_proj.weight.abs().max() > 0  # the new layer trains
    two = export_run(grown, setup[0] / "grow-c-drafter")
    with pytest.raises(InputError, match="grow by layers, not shrink"):
        Trainer(config(setup, "grow-d", num_layers=1, init_from=str(two)), target=target, progress=False)


def test_init_from_a_run_carries_its_weights_feature_scale_and_optimizer_moments(setup):
    target = setup[2]
    earlier = Trainer(config(setup, "carry-a", max_steps=6, save_every=3), target=target, progress=False)
    earlier.fit()
    for source in (setup[0] / "carry-a", earlier.checkpoint_path):
        warm = Trainer(config(setup, "carry-b", init_from=str(source)), target=target, progress=False)
        assert warm.step == 0
        assert torch.equal(warm.drafter.feature_scale, earlier.drafter.feature_scale)
        for (name, mine), theirs in zip(warm.drafter.named_parameters(), earlier.drafter.parameters()):
            assert torch.equal(mine, theirs), name
            assert torch.equal(warm.optimizer.state[mine]["exp_avg_sq"], earlier.optimizer.state[theirs]["exp_avg_sq"])
        assert warm.evaluate() == earlier.evaluate()


def test_carried_moments_make_the_first_update_smaller_than_a_fresh_optimizer(setup):
    target = setup[2]
    earlier = Trainer(config(setup, "moments-a", max_steps=30, save_every=30), target=target, progress=False)
    earlier.fit()
    drafter = setup[0] / "moments-a-drafter"
    export_run(earlier, drafter)

    def first_update(name, source):
        trainer = Trainer(config(setup, name, init_from=str(source), warmup_fraction=0.0, max_steps=1),
                          target=target, progress=False)
        before = [p.detach().clone() for p in trainer.drafter.parameters()]
        trainer.train_step()
        return sum((p.detach() - b).pow(2).sum() for p, b in zip(trainer.drafter.parameters(), before)).sqrt()

    # A fresh AdamW moves every weight by about the learning rate on its first step.
    assert first_update("moments-carried", setup[0] / "moments-a") < 0.5 * first_update("moments-fresh", drafter)


def test_init_from_a_run_with_more_layers_grows_it_keeping_the_old_weights_moments(setup):
    target = setup[2]
    earlier = Trainer(config(setup, "carry-one", max_steps=4, save_every=4), target=target, progress=False)
    earlier.fit()
    grown = Trainer(config(setup, "carry-grown", num_layers=2, init_from=str(setup[0] / "carry-one"), max_steps=2),
                    target=target, progress=False)
    theirs = dict(earlier.drafter.named_parameters())
    for name, mine in grown.drafter.named_parameters():
        if name.startswith("layers.1."):
            assert mine not in grown.optimizer.state  # a new layer starts without moments
            continue
        assert torch.equal(mine, theirs[name]), name
        for moment in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(grown.optimizer.state[mine][moment], earlier.optimizer.state[theirs[name]][moment])
    new_layer = grown.drafter.layers[1]
    assert new_layer.self_attn.o_proj.weight.abs().max() == 0 and new_layer.mlp.down_proj.weight.abs().max() == 0
    assert grown.evaluate() == earlier.evaluate()  # the grown drafter starts at its source's function
    grown.fit()
    assert new_layer.self_attn.o_proj.weight.abs().max() > 0


def test_init_from_a_run_into_fewer_layers_or_unreadable_is_refused(setup):
    from specflash.errors import InputError

    target = setup[2]
    Trainer(config(setup, "carry-two", num_layers=2, max_steps=2, save_every=2), target=target, progress=False).fit()
    with pytest.raises(InputError, match="grow by layers, not shrink"):
        Trainer(config(setup, "carry-shrunk", num_layers=1, init_from=str(setup[0] / "carry-two")), target=target,
                progress=False)
    broken = setup[0] / "broken.pt"
    broken.write_text("not a checkpoint")
    with pytest.raises(InputError, match="not a readable specflash training checkpoint"):
        Trainer(config(setup, "carry-three", init_from=str(broken)), target=target, progress=False)


def test_export_after_the_last_eval_reuses_its_estimates_and_a_step_renews_them(setup):
    trainer = Trainer(config(setup, "reuse", max_steps=4, eval_every=4, train_estimate=False), target=setup[2],
                      progress=False)
    calls = []
    evaluate = trainer.evaluate
    trainer.evaluate = lambda *a, **k: calls.append(trainer.step) or evaluate(*a, **k)
    trainer.fit()
    assert calls == [0, 4]
    export_run(trainer, setup[0] / "reuse-drafter")
    assert calls == [0, 4]
    trainer.train_step()
    trainer.estimates()
    assert calls == [0, 4, 5]


def test_data_without_stored_features_trains_on_features_the_target_recomputes(setup):
    from train_fixtures import prompt_records

    from specflash.train.regenerate import RegenConfig, regenerate

    root, folder, target, data = setup
    bare = root / "data-no-features"
    regenerate(target, prompt_records(96), bare, RegenConfig(max_new_tokens=40, batch_size=8, shard_size=16),
               progress=False)
    (bare / "meta.json").write_text(json.dumps({"layer_ids": [1, 3], "features": False}))
    assert not list(bare.glob("*.features.safetensors"))
    stored = Trainer(config(setup, "stored"), target=target, progress=False)
    recomputed = Trainer(config(setup, "recomputed", data=[str(bare)], cache_features=False), target=target,
                         progress=False)
    example = recomputed.dataset[recomputed.train_idx[0]]
    assert example.features is None
    twin = next(i for i in stored.train_idx if stored.dataset.rows[i].id == example.id)
    expected = stored.dataset[twin].features.float()  # float16 on disk
    assert torch.allclose(recomputed._features(example), expected, atol=2e-2, rtol=1e-2)
    recomputed.train_step()  # and a step runs on them


def test_a_warm_start_keeps_the_draft_vocabulary_its_drafter_was_trained_on(setup):
    target = setup[2]
    # The source counts its vocabulary over other training rows than the runs below.
    source = Trainer(config(setup, "vocab-a", draft_vocab=24, held_out_fraction=0.6, max_steps=2, save_every=2),
                     target=target, progress=False)
    source.fit()
    drafter = export_run(source, setup[0] / "vocab-a" / "drafter")
    recounted = Trainer(config(setup, "vocab-b", draft_vocab=24), target=target, progress=False)
    assert not torch.equal(recounted.subset.ids, source.subset.ids)  # what a recount would pick
    for origin in (drafter, setup[0] / "vocab-a"):
        warm = Trainer(config(setup, "vocab-c", draft_vocab=24, init_from=str(origin)), target=target, progress=False)
        assert torch.equal(warm.subset.ids, source.subset.ids), origin
        assert torch.equal(warm.drafter.draft_vocab, source.subset.ids)
    # Asking for another size recounts.
    other = Trainer(config(setup, "vocab-d", draft_vocab=32, init_from=str(drafter)), target=target, progress=False)
    assert other.subset.ids.numel() == 32


def test_loss_positions_out_of_range_is_refused(setup):
    from specflash.errors import InputError

    with pytest.raises(InputError, match="--loss-positions"):
        Trainer(config(setup, "lp", loss_positions=8), target=setup[2], progress=False)


def test_warmup_fraction_out_of_range_is_refused(setup):
    from specflash.errors import InputError

    for bad in (-0.1, 1.0):
        with pytest.raises(InputError, match="--warmup-fraction"):
            Trainer(config(setup, "wf", warmup_fraction=bad), target=setup[2], progress=False)


def test_a_run_logs_its_starting_held_out_estimate(setup):
    """Step 0 of the log is the held-out estimate before any update (a warm start's
    reference point); later records keep their losses and the plot still renders."""
    target = setup[2]
    run = config(setup, "start-eval", max_steps=4, eval_every=2, log_every=1)
    trainer = Trainer(run, target=target, progress=False)
    before = trainer.evaluate()["tau_estimate"]
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 0 and "loss" not in rows[0]
    assert rows[0]["eval_tau_estimate"] == before
    assert [r["step"] for r in rows[1:] if "eval_tau_estimate" in r] == [2, 4]
    assert (trainer.out / "loss.png").exists()


def test_human_answers_teach_the_target_through_its_greedy_labels(tmp_path_factory):
    """Trained only on teacher-forced human answers (text the target would not write),
    a drafter learns the target's own continuations when the answers carry the target's
    greedy labels, and far less when it learns the human tokens (labels stripped): judged
    on held-out responses the target wrote itself."""
    import random
    from dataclasses import replace

    from specflash.train.regenerate import RegenConfig, regenerate
    from train_fixtures import WORDS, prompt_records

    root = tmp_path_factory.mktemp("human")
    folder, target, _ = make_training_data(root, n_prompts=8)
    rng = random.Random(0)
    human = [replace(r, id=f"h{i}", response=" ".join(rng.choice(WORDS) for _ in range(30)))
             for i, r in enumerate(prompt_records(96))]
    regenerate(target, human, root / "human", RegenConfig(max_new_tokens=40, batch_size=8, layer_ids=(1, 3),
                                                          human_fraction=1.0), progress=False)
    regenerate(target, [replace(r, id=f"t{i}") for i, r in enumerate(prompt_records(120)[96:])], root / "own",
               RegenConfig(max_new_tokens=40, batch_size=8, layer_ids=(1, 3)), progress=False)
    for name in ("human", "own"):
        (root / name / "meta.json").write_text(json.dumps({"layer_ids": [1, 3]}))
    stripped = root / "stripped"
    stripped.mkdir()
    from specflash.data.corpus import read_rows, write_rows

    for f in (root / "human").iterdir():
        if f.suffix == ".npz":
            write_rows(stripped / f.name, [{k: v for k, v in r.items() if k != "target_greedy"} for r in read_rows(f)])
        else:
            (stripped / f.name).write_bytes(f.read_bytes())
    taus = {}
    for name in ("human", "stripped"):
        cfg = TrainConfig(data=[str(root / name), str(root / "own")], out=str(root / f"run-{name}"),
                          target=str(folder), num_layers=1, block_size=8, anchors_per_sequence=32, epochs=50,
                          lr=3e-3, grad_accum=2, draft_vocab=0, held_out_fraction=1.0, eval_every=0,
                          save_every=10_000, eval_sequences=32, precision="fp32", max_steps=150)
        trainer = Trainer(cfg, target=target, progress=False)
        assert all(trainer.dataset.rows[i].response_from == "human" for i in trainer.train_idx)
        assert all(trainer.dataset.rows[i].response_from == "target" for i in trainer.eval_idx)
        trainer.fit()
        taus[name] = trainer.evaluate()["tau_estimate"]
    assert taus["human"] > taus["stripped"] + 0.3, taus


def test_data_of_other_layers_is_refused_with_a_clear_error(setup, tmp_path):
    """Features tapped from other target layers than the drafter's: an InputError that
    names the folder and the widths, not a shape error deep in the first step."""
    from specflash.errors import InputError

    with pytest.raises(InputError, match="features stored in .* are 128 wide, but .* needs 192"):
        Trainer(config(setup, "other-layers", target_layer_ids=[0, 1, 2]), target=setup[2], progress=False)


def test_data_folders_that_tapped_different_layers_are_refused(tmp_path):
    from specflash.errors import InputError
    from specflash.train.loop import data_layer_ids

    for name, ids in (("a", [1, 3]), ("b", [0, 2])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "meta.json").write_text(json.dumps({"layer_ids": ids}))
    assert data_layer_ids([str(tmp_path / "a")]) == [1, 3]
    with pytest.raises(InputError, match="tapped different target layers"):
        data_layer_ids([str(tmp_path / "a"), str(tmp_path / "b")])


def test_training_set_estimate_uses_training_rows_only(setup):
    """The memorization check scores target-written training rows, spread over the
    training order, never a held-out one."""
    trainer = Trainer(config(setup, "fit-sample", eval_sequences=5), target=setup[2], progress=False)
    sample = trainer.train_eval_idx
    assert len(sample) == 5 and len(set(sample)) == 5
    assert set(sample) <= set(trainer.train_idx) and not set(sample) & set(trainer.eval_idx)
    assert all(trainer.dataset.rows[i].response_from == "target" for i in sample)
    assert sample[-1] > trainer.train_idx[len(trainer.train_idx) // 2]  # spread, not the first five


def test_log_records_the_training_set_estimate_beside_the_held_out_one(setup):
    target = setup[2]
    trainer = Trainer(config(setup, "fit-log", max_steps=2, eval_every=2, log_every=1), target=target,
                      progress=False)
    fitted = trainer.evaluate(trainer.train_eval_idx)["tau_estimate"]
    trainer.fit()
    rows = [json.loads(line) for line in (trainer.out / "log.jsonl").read_text().splitlines()]
    assert rows[0]["eval_train_tau_estimate"] == fitted
    assert "eval_train_tau_estimate" in rows[-1] and rows[-1]["step"] == 2
    off = Trainer(config(setup, "fit-log-off", max_steps=2, eval_every=2, log_every=1, train_estimate=False),
                  target=target, progress=False)
    off.fit()
    rows = [json.loads(line) for line in (off.out / "log.jsonl").read_text().splitlines()]
    assert not any("eval_train_tau_estimate" in r for r in rows)
    assert "eval_tau_estimate" in rows[0]


def test_card_states_the_training_set_estimate_of_the_exported_weights(setup):
    trainer = Trainer(config(setup, "fit-card", max_steps=2), target=setup[2], progress=False)
    trainer.fit()
    fitted = trainer.evaluate(trainer.train_eval_idx)["tau_estimate"]
    out = export_run(trainer, setup[0] / "fit-card-drafter")
    info = json.loads((out / "training_info.json").read_text())
    assert info["train_tau_estimate"] == fitted
    assert f"the same estimate on training sequences: {fitted:.3f} +- " in (out / "README.md").read_text()


def _seeds(trainer, epoch: int) -> list[int]:
    step = epoch * trainer.steps_per_epoch
    return [trainer._anchor_generator(step, i).initial_seed() for i in trainer.train_idx[:8]]


def test_no_two_passes_of_a_lineage_draw_the_same_anchors(setup):
    first = Trainer(config(setup, "lineage-1", epochs=2, max_steps=3, save_every=3), target=setup[2], progress=False)
    assert _seeds(first, 0) != _seeds(first, 1)
    first.fit()
    assert first.passes_total == 1  # 3 steps into its first pass
    second = Trainer(config(setup, "lineage-2", epochs=2, init_from=str(first.out)), target=setup[2],
                     progress=False)
    assert second.passes_before == 1
    made = set(_seeds(first, 0))  # the only pass the first run made
    assert not made & {s for epoch in (0, 1) for s in _seeds(second, epoch)}
    assert _seeds(second, 0) == _seeds(first, 1)  # the lineage's second pass, whichever run makes it


def test_a_rows_anchors_do_not_depend_on_the_rest_of_the_data(setup):
    trainer = Trainer(config(setup, "anchors-by-id"), target=setup[2], progress=False)
    index = trainer.train_idx[3]
    row_id = trainer.dataset.rows[index].id
    from specflash.train.loop import pass_seed

    assert trainer._anchor_generator(0, index).initial_seed() == pass_seed(0, 0, row_id)


def test_a_drafter_of_unknown_lineage_numbers_its_passes_beyond_any_earlier_run(setup):
    from specflash.train.loop import UNKNOWN_LINEAGE_PASSES

    source = Trainer(config(setup, "unknown-src", max_steps=1), target=setup[2], progress=False)
    source.fit()
    folder = export_run(source)
    assert json.loads((folder / "training_info.json").read_text())["passes_total"] == 1
    assert Trainer(config(setup, "known", init_from=str(folder)), target=setup[2], progress=False).passes_before == 1
    (folder / "training_info.json").unlink()  # as drafters exported before the count, e.g. the shipped one
    trainer = Trainer(config(setup, "unknown", init_from=str(folder)), target=setup[2], progress=False)
    assert trainer.passes_before == UNKNOWN_LINEAGE_PASSES


def test_held_out_estimate_comes_with_its_standard_error(setup):
    from specflash.train.loop import clustered_mean

    mean, se = clustered_mean([3.0, 8.0, 2.0], [2, 4, 1])
    assert mean == 13 / 7
    expected = (3 / 2 * sum((s - mean * n) ** 2 for s, n in ((3, 2), (8, 4), (2, 1)))) ** 0.5 / 7
    assert abs(se - expected) < 1e-12
    assert clustered_mean([4.0], [2]) == (2.0, None)
    trainer = Trainer(config(setup, "se", max_steps=60), target=setup[2], progress=False)
    trainer.fit()  # a drafter that is right on some blocks: the estimate varies by sequence
    result = trainer.evaluate()
    assert result["sequences"] == len([i for i in trainer.eval_idx[:32]]) > 2
    assert result["tau_estimate_se"] > 0


def test_default_split_holds_out_about_eval_sequences_rows(setup):
    from specflash.train.loop import held_out_fraction

    trainer = Trainer(config(setup, "auto-split", held_out_fraction=None, eval_sequences=12), target=setup[2],
                      progress=False)
    assert held_out_fraction(trainer.config, trainer.dataset) == 12 / 96
    assert 4 <= len(trainer.eval_idx) <= 24
    big = TrainConfig(data=[], out="", eval_sequences=256)
    assert held_out_fraction(big, trainer.dataset) == 0.2  # capped: most rows still train


def test_distillation_trains_on_data_with_the_targets_top_k(setup, tmp_path, capsys):
    from specflash.train.regenerate import RegenConfig, regenerate
    from train_fixtures import prompt_records

    data = tmp_path / "topk"
    regenerate(setup[2], prompt_records(24), data, RegenConfig(max_new_tokens=30, batch_size=8, layer_ids=(1, 3),
                                                               topk=8), progress=False)
    (data / "meta.json").write_text(json.dumps({"layer_ids": [1, 3]}))
    runs = {}
    for alpha in (0.0, 0.7):
        trainer = Trainer(config(setup, f"distill-{alpha}", data=[str(data)], max_steps=3, distill=alpha),
                          target=setup[2], progress=False)
        runs[alpha] = trainer.train_step()["loss"]
    assert runs[0.0] != runs[0.7] and all(v == v and v > 0 for v in runs.values())  # finite, and it mixed
    Trainer(config(setup, "distill-no-topk", distill=0.5), target=setup[2], progress=False)
    assert "--distill needs the target's top-k" in capsys.readouterr().out
    with pytest.raises(Exception, match="--distill must be between"):
        Trainer(config(setup, "distill-bad", distill=1.5), target=setup[2], progress=False)


def test_a_corpus_without_features_gets_them_cached_once_before_training(setup, tmp_path):
    from train_fixtures import prompt_records

    from specflash.train.regenerate import RegenConfig, regenerate

    root, folder, target, data = setup
    bare = tmp_path / "corpus"
    regenerate(target, prompt_records(24), bare, RegenConfig(max_new_tokens=30, batch_size=8, shard_size=8),
               progress=False)
    (bare / "meta.json").write_text(json.dumps({"layer_ids": [1, 3], "features": False}))
    full = tmp_path / "full"
    regenerate(target, prompt_records(24), full, RegenConfig(max_new_tokens=30, batch_size=8, shard_size=8,
                                                             layer_ids=(1, 3), topk=4), progress=False)
    assert not list(bare.glob("*.features.safetensors"))
    trainer = Trainer(config(setup, "cached", data=[str(bare)]), target=target, progress=False)
    assert len(list(bare.glob("*.features.safetensors"))) == 3  # one per shard
    from specflash.train.shards import ShardDataset

    generated = ShardDataset([full])
    reference = {r.id: i for i, r in enumerate(generated.rows)}
    for i in trainer.train_idx[:5]:
        example = trainer.dataset[i]
        twin = generated[reference[example.id]]
        assert torch.allclose(example.features.float(), twin.features.float(), atol=2e-2, rtol=1e-2)
        assert torch.equal(example.topk_ids[:, :4], twin.topk_ids)  # the same distribution, teacher-forced
    trainer.train_step()


def test_paired_difference_is_the_difference_of_estimates_with_a_smaller_error():
    from specflash.train.loop import clustered_mean, paired_difference

    a = {"s1": (30.0, 10), "s2": (12.0, 10), "s3": (55.0, 20), "s4": (20.0, 10)}
    b = {"s1": (32.0, 10), "s2": (13.0, 10), "s3": (58.0, 20), "s4": (21.0, 10), "extra": (9.0, 3)}
    diff, se = paired_difference(a, b)
    mean_a, se_a = clustered_mean([v[0] for v in a.values()], [v[1] for v in a.values()])
    mean_b, _ = clustered_mean([b[k][0] for k in a], [b[k][1] for k in a])
    assert abs(diff - (mean_b - mean_a)) < 1e-12 and se < se_a
    with pytest.raises(Exception, match="share no sequence"):
        paired_difference(a, {"other": (1.0, 1)})


def test_paired_difference_of_ratios_with_their_own_counts():
    """A decode walk's counts are each drafter's own verify steps: the difference is that of
    the two ratio estimates, and its error shrinks when the two move together."""
    from specflash.train.loop import clustered_mean, paired_difference

    a = {"s1": (40.0, 30), "s2": (40.0, 20), "s3": (40.0, 35), "s4": (40.0, 25)}
    b = {"s1": (40.0, 27), "s2": (40.0, 18), "s3": (40.0, 33), "s4": (40.0, 22)}
    diff, se = paired_difference(a, b)
    mean_a, se_a = clustered_mean([v[0] for v in a.values()], [v[1] for v in a.values()])
    mean_b, _ = clustered_mean([v[0] for v in b.values()], [v[1] for v in b.values()])
    assert abs(diff - (mean_b - mean_a)) < 1e-12 and 0 < se < se_a


def test_train_compare_scores_drafters_on_the_same_held_out_sequences(setup, capsys):
    root, folder, target, data = setup
    trainer = Trainer(config(setup, "compare-src", max_steps=40), target=target, progress=False)
    trainer.fit()
    trained = export_run(trainer)
    fresh = Trainer(config(setup, "compare-fresh", max_steps=0), target=target, progress=False)
    untrained = export_run(fresh)
    capsys.readouterr()
    assert main(["train", "compare", "--data", str(data), "--drafters", f"{untrained},{trained}", "--target",
                 str(folder), "--eval-sequences", "16", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    first, second = report["results"]
    assert first["difference_to_first"] == 0 and second["sequences"] == first["sequences"] > 2
    assert abs(second["difference_to_first"] - (second["tau_estimate"] - first["tau_estimate"])) < 1e-9
    assert second["difference_to_first"] > 0  # 40 steps of training beat none
    walk_first, walk_second = report["walk_results"]  # the decode walk, --walk-tokens 128 by default
    assert report["walk_tokens"] == 128 and walk_second["sequences"] == walk_first["sequences"] > 2
    assert walk_second["difference_to_first"] > 0
    assert abs(walk_second["difference_to_first"] - (walk_second["tau_estimate"] - walk_first["tau_estimate"])) < 1e-9


def test_train_compare_skips_the_decode_walk_with_walk_tokens_0(setup, capsys):
    root, folder, target, data = setup
    drafters = [export_run(Trainer(config(setup, f"no-walk-{seed}", max_steps=0, seed=seed), target=target,
                                   progress=False)) for seed in (0, 1)]
    capsys.readouterr()
    assert main(["train", "compare", "--data", str(data), "--drafters", ",".join(map(str, drafters)), "--target",
                 str(folder), "--eval-sequences", "8", "--walk-tokens", "0", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "walk_results" not in report and len(report["results"]) == 2


def test_by_source_groups_sequences_by_the_prompt_set_in_their_id():
    from specflash.train.loop import by_source

    groups = by_source({"sharegpt:a": (3.0, 2), "package-functions:m.f": (5.0, 2), "sharegpt:b": (1.0, 1),
                        "p7": (2.0, 1)})
    assert groups == {"other": {"p7": (2.0, 1)}, "package-functions": {"package-functions:m.f": (5.0, 2)},
                      "sharegpt": {"sharegpt:a": (3.0, 2), "sharegpt:b": (1.0, 1)}}


def test_train_compare_also_compares_within_each_prompt_set(setup, capsys, tmp_path):
    import dataclasses

    from specflash.train.regenerate import RegenConfig, regenerate
    from train_fixtures import prompt_records

    root, folder, target, _ = setup
    records = [dataclasses.replace(r, id=f"{'code' if i % 2 else 'chat'}:{r.id}", source="code" if i % 2 else "chat")
               for i, r in enumerate(prompt_records(40))]
    data = tmp_path / "two-sources"
    regenerate(target, records, data, RegenConfig(max_new_tokens=24, batch_size=8, layer_ids=(1, 3)), progress=False)
    drafters = [export_run(Trainer(config(setup, f"by-source-{seed}", max_steps=0, seed=seed), target=target,
                                   progress=False)) for seed in (0, 1)]
    capsys.readouterr()
    assert main(["train", "compare", "--data", str(data), "--drafters", ",".join(map(str, drafters)), "--target",
                 str(folder), "--eval-sequences", "40", "--device", "cpu"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    parts = report["by_source"]
    assert sorted(parts) == ["chat", "code"]
    total = report["results"][1]
    assert sum(p[1]["sequences"] for p in parts.values()) == total["sequences"] > 2
    for part in parts.values():
        base, other = part
        assert base["difference_to_first"] == 0
        assert abs(other["difference_to_first"] - (other["tau_estimate"] - base["tau_estimate"])) < 1e-9


def test_feature_noise_changes_training_steps_but_not_evaluation(setup):
    target = setup[2]
    runs = {}
    for name, noise in (("quiet", 0.0), ("noisy", 0.5), ("noisy-again", 0.5)):
        trainer = Trainer(config(setup, f"noise-{name}", max_steps=0, feature_noise=noise), target=target,
                          progress=False)
        evaluation = trainer.evaluate()["tau_estimate"]  # untrained weights: noise must not enter evaluation
        for _ in range(3):
            trainer.train_step()
        runs[name] = (evaluation, trainer.drafter.state_dict())
    assert runs["quiet"][0] == runs["noisy"][0]
    differs = any(not torch.equal(a, runs["noisy"][1][k]) for k, a in runs["quiet"][1].items())
    assert differs  # the noise reached the gradients
    for key, value in runs["noisy"][1].items():  # and is a pure function of (seed, step, row)
        assert torch.equal(value, runs["noisy-again"][1][key]), key


def test_training_settings_out_of_range_are_refused_with_the_flag(setup):
    from specflash.errors import InputError

    with pytest.raises(InputError, match="--feature-noise"):
        config(setup, "bad-noise", feature_noise=-0.1)
    with pytest.raises(InputError, match="--weight-decay"):
        config(setup, "bad-decay", weight_decay=1.5)
    for bad in (0, -1):
        with pytest.raises(InputError, match="--epochs"):
            config(setup, "bad-epochs", epochs=bad)


def test_a_fraction_of_an_epoch_trains_that_share_of_the_rows_once_with_the_schedule_ending_there(setup):
    trainer = Trainer(config(setup, "half", epochs=0.5), target=setup[2], progress=False)
    assert trainer.total_steps == round(trainer.steps_per_epoch * 0.5) < trainer.steps_per_epoch
    rows = [i for step in range(trainer.total_steps) for i in trainer._micro_indices(step)]
    assert len(rows) == len(set(rows)) == trainer.total_steps * 2  # no row twice; grad_accum 2
    assert set(rows) < set(trainer.train_idx)
    trainer.fit()
    assert trainer.step == trainer.total_steps and trainer.passes_total == trainer.passes_before + 1
    assert trainer.optimizer.param_groups[0]["lr"] < 0.05 * trainer.config.lr  # the schedule ended with the run


def test_train_compare_keeps_the_runs_split_whatever_it_scores(setup, capsys):
    from specflash.train.loop import held_out_fraction
    from specflash.train.shards import ShardDataset

    root, folder, target, data = setup
    drafters = [export_run(Trainer(config(setup, f"split-{seed}", max_steps=0, seed=seed), target=target,
                                   progress=False)) for seed in (0, 1)]
    common = ["train", "compare", "--data", str(data), "--drafters", ",".join(map(str, drafters)), "--target",
              str(folder), "--device", "cpu"]
    reports = {}
    for name, extra in (("all", ["--eval-sequences", "1000"]), ("tenth", ["--eval-sequences", "1000",
                                                                          "--held-out-fraction", "0.1"])):
        capsys.readouterr()
        assert main(common + extra) == 0
        reports[name] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # Scoring more rows does not widen the split: it stays what a default `fit` holds out.
    default = held_out_fraction(TrainConfig(data=[str(data)], out=""), ShardDataset([str(data)]))
    assert reports["all"]["held_out_fraction"] == default
    assert reports["tenth"]["held_out_fraction"] == 0.1
    assert reports["tenth"]["results"][0]["sequences"] < reports["all"]["results"][0]["sequences"]
    assert main(common + ["--held-out-fraction", "1.5"]) == 2


def test_train_sources_keeps_only_rows_of_the_named_prompt_sets():
    from types import SimpleNamespace

    from specflash.errors import InputError
    from specflash.train.loop import only_sources, source_of

    rows = [SimpleNamespace(id=i) for i in ("package-methods:a.B.c", "sharegpt:x", "package-functions:m.f",
                                            "sharegpt-turns:x:2", "p7")]
    dataset = SimpleNamespace(rows=rows)
    assert only_sources(dataset, [0, 1, 2, 3, 4], ("package-methods", "sharegpt-turns")) == [0, 3]
    with pytest.raises(InputError, match="package-functions, sharegpt, sharegpt-turns"):
        only_sources(dataset, [1, 2, 3], ("package-methods",))  # names the sets that are there
    assert [source_of(r.id) for r in rows] == ["package-methods", "sharegpt", "package-functions",
                                               "sharegpt-turns", "other"]


def test_train_sources_matching_no_row_is_refused_naming_the_sets_there(setup):
    from specflash.errors import InputError

    with pytest.raises(InputError, match="matches no training row.*other"):
        Trainer(config(setup, "sources-none", train_sources=("package-methods",)), target=setup[2], progress=False)
    everything = Trainer(config(setup, "sources-all"), target=setup[2], progress=False)
    named = Trainer(config(setup, "sources-other", train_sources=("other",)), target=setup[2], progress=False)
    assert named.train_idx == everything.train_idx and named.eval_idx == everything.eval_idx


def test_grown_layer_names_are_those_past_the_kept_layers():
    from specflash.errors import InputError
    from specflash.train.loop import in_grown_layer, refuse_shrinking

    assert in_grown_layer("layers.1.mlp.down_proj.weight", 1) and in_grown_layer("layers.12.self_attn.q_proj.weight", 2)
    assert not in_grown_layer("layers.0.mlp.down_proj.weight", 1) and not in_grown_layer("fc.weight", 0)
    refuse_shrinking("a", 1, 2)  # growing is fine
    with pytest.raises(InputError, match="pass --num-layers 3 or more"):
        refuse_shrinking("a", 3, 2)


def test_decode_walk_equals_speculative_decoding_of_the_answers(tmp_path):
    """The walk's tokens and verify steps on an answer are those of decoding its
    prompt with the same drafter and block (features recomputed by the target, as decoding
    computes them; the answers are the fp32 target's own greedy ones)."""
    from specflash.hf.target import TargetModel
    from specflash.runtime.config import DecodeConfig
    from specflash.runtime.decode import SpeculativeDecoder
    from specflash.runtime.proposers.dflash import DFlashProposer
    from specflash.train.regenerate import RegenConfig, regenerate
    from tiny import tiny_model_folder
    from train_fixtures import prompt_records

    folder = tiny_model_folder(tmp_path / "target", varied=False)  # a learnable target
    target = TargetModel.from_pretrained(str(folder))
    data = tmp_path / "data"
    regenerate(target, prompt_records(48), data, RegenConfig(max_new_tokens=30, batch_size=8), progress=False)
    base = dict(data=[str(data)], target=str(folder), num_layers=1, block_size=8, anchors_per_sequence=32,
                epochs=50, lr=3e-3, grad_accum=2, draft_vocab=0, held_out_fraction=0.25, eval_every=0,
                save_every=10_000, eval_sequences=12, precision="fp32", cache_features=False,
                target_layer_ids=[1, 3])
    trainer = Trainer(TrainConfig(out=str(tmp_path / "run"), max_steps=60, **base), target=target, progress=False)
    trainer.fit()
    exported = export_run(trainer, tmp_path / "drafter")
    scorer = Trainer(TrainConfig(out=str(tmp_path / "score"), init_from=str(exported), **base), target=target,
                     progress=False)
    decoder = SpeculativeDecoder(target, DFlashProposer(DFlashDrafter.from_pretrained(exported), target), 8)
    rows = scorer.eval_idx
    walked = scorer.evaluate(rows, per_sequence=True, walk_tokens=20)["walk_per_sequence"]
    assert len(walked) >= 6
    lengths = []
    for index in rows:
        row = scorer.dataset.rows[index]
        if row.id not in walked:
            continue
        prompt, answer = row.input_ids[: row.num_prompt_tokens], list(row.input_ids[row.num_prompt_tokens:])
        result = decoder.generate(prompt, DecodeConfig(max_new_tokens=min(20, len(answer))))
        assert result.token_ids == answer[:20]
        steps = result.stats.acceptance_lengths
        assert walked[row.id] == (float(sum(steps)), len(steps)), row.id
        lengths += steps
    assert sum(lengths) / len(lengths) > 1.5  # the walk jumped: it skipped anchors


def test_fit_holds_out_the_prompts_of_the_given_fraction(setup, capsys):
    from specflash.train.shards import ShardDataset

    root, folder, _, data = setup
    fit = ["train", "fit", "--data", str(data), "--target", str(folder), "--num-layers", "1", "--block-size", "8",
           "--draft-vocab", "0", "--max-steps", "1", "--eval-every", "0", "--threads", "1", "--precision", "fp32"]
    assert main(fit + ["--out", str(root / "fraction-half"), "--held-out-fraction", "0.5"]) == 0
    info = json.loads((root / "fraction-half" / "drafter" / "training_info.json").read_text())
    train, held = ShardDataset([str(data)]).split(0.5)
    assert info["data"]["held_out"] == len(held) and info["data"]["sequences"] == len(train)
    assert len(held) > 0.3 * (len(train) + len(held))  # not the default 20% of this small folder
    capsys.readouterr()
    assert main(fit + ["--out", str(root / "fraction-bad"), "--held-out-fraction", "1.5"]) != 0
    assert "--held-out-fraction must be in [0, 1], got 1.5" in capsys.readouterr().err


def test_train_compare_scores_a_folder_held_out_whole(setup, capsys):
    """A folder of held-out rows copied out of a corpus (`benchmarks/corpus_subset.py`) is
    compared with --held-out-fraction 1: no training rows, every row scored."""
    root, folder, target, data = setup
    drafters = [export_run(Trainer(config(setup, f"whole-{seed}", max_steps=0, seed=seed), target=target,
                                   progress=False)) for seed in (0, 1)]
    capsys.readouterr()
    assert main(["train", "compare", "--data", str(data), "--drafters", ",".join(map(str, drafters)), "--target",
                 str(folder), "--eval-sequences", "1000", "--held-out-fraction", "1", "--walk-tokens", "16",
                 "--device", "cpu"]) == 0
    from specflash.train.shards import ShardDataset

    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    greedy = sum(row.greedy_answer for row in ShardDataset([data]).rows)
    assert report["results"][0]["sequences"] == report["results"][1]["sequences"] == greedy
