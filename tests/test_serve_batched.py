"""The server's engine with `batched=True`: the jobs in its slots share one target forward
per step (runtime/batchdecode.py), each still gets its solo tokens, a job that ends or
is cancelled leaves the batch and frees its slot, and the forward metrics count the rows
of each shared forward."""

import pytest

from specflash.runtime.config import DecodeConfig
from specflash.runtime.pipeline import Pipeline
from specflash.runtime.treepolicy import FixedTree
from specflash.serve.engine import Engine, Job
from tiny import tiny_model_folder


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("batched") / "tiny")
    return Pipeline.load(str(folder), draft="random", block_size=4)


def solo_tokens(pipe, prompt, config):
    return pipe.decoder.generate(prompt, config).token_ids


def run(engine, jobs, on_round=None, max_rounds=2000):
    for job in jobs:
        engine.submit(job)
    for round_ in range(max_rounds):
        if on_round is not None:
            on_round(round_)
        if not engine.run_once():
            return round_
    raise AssertionError("the engine did not finish")


PROMPTS = [[5, 6, 7], [9, 8, 7, 6, 5, 4, 3, 2, 1, 11, 12, 13], [42] * 4, [17, 18]]


def test_batched_jobs_share_forwards_and_each_gets_its_solo_tokens(pipe):
    configs = [DecodeConfig(max_new_tokens=n, stop_token_ids=()) for n in (12, 9, 15, 6)]
    engine = Engine(pipe, max_concurrency=3, batched=True, prefill_chunk=5)
    assert engine.batched
    jobs = [Job(p, c) for p, c in zip(PROMPTS, configs)]
    run(engine, jobs)
    for job, prompt, config in zip(jobs, PROMPTS, configs):
        assert job.finish_reason == "length"
        assert job._assembler.tokens == solo_tokens(pipe, prompt, config)
        assert job.num_tokens == config.max_new_tokens and job.verify_steps == job.stats.num_steps
    m = engine.metrics
    forwards = m.value("specflash_batch_size_count")
    assert m.value("specflash_batch_size_sum") > forwards  # several jobs per forward
    assert m.value("specflash_batch_size_bucket", le="1.0") < forwards
    rows = sum(len(p) for p in PROMPTS) + m.value("specflash_verify_steps_total") + \
        m.value("specflash_draft_tokens_total")
    assert m.value("specflash_forward_rows_sum") == rows  # prompt chunks; anchors and drafts
    assert engine._batch.cache.num_free == 3


def test_a_cancelled_job_leaves_the_batch_and_the_others_continue_identically(pipe):
    config = DecodeConfig(max_new_tokens=20, stop_token_ids=())
    engine = Engine(pipe, max_concurrency=2, batched=True)
    jobs = [Job(p, config) for p in PROMPTS[:3]]
    events = []
    jobs[0].on_event = events.append

    def cancel_first(round_):
        if round_ == 3:
            engine.cancel(jobs[0])

    run(engine, jobs, on_round=cancel_first)
    assert jobs[0].finish_reason == "abort" and events[-1].finish_reason == "abort"
    assert 0 < jobs[0].num_tokens < 20
    assert jobs[0]._assembler.tokens == solo_tokens(pipe, PROMPTS[0], config)[: jobs[0].num_tokens]
    for job, prompt in zip(jobs[1:], PROMPTS[1:3]):  # the third took the freed slot
        assert job.finish_reason == "length" and job._assembler.tokens == solo_tokens(pipe, prompt, config)
    assert engine._batch.cache.num_free == 2
    assert engine.metrics.value("specflash_requests_finished_total", finish_reason="abort") == 1


def test_a_stop_string_ends_a_batched_job_and_frees_its_slot(pipe):
    config = DecodeConfig(max_new_tokens=30, stop_token_ids=())
    free = solo_tokens(pipe, PROMPTS[1], config)
    text = pipe.target.decode(free)
    stop = text[len(text) // 3: len(text) // 3 + 2]
    assert stop.strip()
    engine = Engine(pipe, max_concurrency=2, batched=True)
    stopped, other = Job(PROMPTS[1], config, stop=(stop,)), Job(PROMPTS[0], config)
    run(engine, [stopped, other])
    assert stopped.finish_reason == "stop" and stop not in stopped.text and stopped.num_tokens < 30
    assert other._assembler.tokens == solo_tokens(pipe, PROMPTS[0], config)
    assert engine._batch.running == [] and engine._batch.cache.num_free == 2


def test_a_tree_policy_keeps_one_at_a_time_stepping(pipe, monkeypatch):
    monkeypatch.setattr(pipe.decoder, "policy", FixedTree(3))
    engine = Engine(pipe, max_concurrency=2, batched=True)
    assert not engine.batched


def test_the_engine_batches_by_default_and_exact_steps_one_at_a_time(pipe):
    assert Engine(pipe).batched and "batched" in Engine(pipe).describe()
    exact = Engine(pipe, batched=False)
    assert not exact.batched and "--exact" in exact.describe()


def test_a_long_prompt_prefills_in_chunks_while_another_job_streams(pipe):
    """The long prompt takes one chunk per step, each in a forward of its own, and the
    streaming job gets a token at every one of those steps."""
    config = DecodeConfig(max_new_tokens=40, stop_token_ids=())
    engine = Engine(pipe, max_concurrency=2, prefill_chunk=8)
    streaming = Job(PROMPTS[0], config)
    tokens_per_round: list[int] = []
    streaming.on_event = lambda event: tokens_per_round.append(len(event.text))
    engine.submit(streaming)
    for _ in range(3):
        engine.run_once()
    long_prompt = [(7 * i) % 200 + 3 for i in range(60)]
    late = Job(long_prompt, DecodeConfig(max_new_tokens=5, stop_token_ids=()))
    engine.submit(late)
    before = streaming.num_tokens
    for _ in range(8):  # 60 tokens in chunks of 8: the prompt is in after 8 steps
        engine.run_once()
    assert late.num_tokens == 1 and late.first_token_at is not None
    assert streaming.num_tokens >= before + 8  # a token (or more) at every step of the prefill
    run(engine, [])
    assert streaming._assembler.tokens == solo_tokens(pipe, PROMPTS[0], config)
    assert late._assembler.tokens == solo_tokens(pipe, long_prompt, late.config)
    batch = engine._batch
    forwards = list(zip(batch.rows_per_step, batch.tokens_per_step))
    assert forwards.count((1, 8)) >= 7  # the chunks ran in forwards of their own (the streaming
    assert batch.num_forwards > batch.num_steps  # job's rows are shorter than a chunk)


def test_with_block_size_auto_the_engine_speculates_load_aware(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("auto") / "tiny")
    auto = Pipeline.load(str(folder), draft="random", block_size="auto", tree="off")
    engine = Engine(auto, max_concurrency=3)
    assert engine._batch.batch_policy.name == "load-aware" and "load-aware" in engine.describe()
    config = DecodeConfig(max_new_tokens=10, stop_token_ids=())
    jobs = [Job(p, config) for p in PROMPTS]
    run(engine, jobs)
    for job, prompt in zip(jobs, PROMPTS):
        assert job._assembler.tokens == solo_tokens(auto, prompt, config)
