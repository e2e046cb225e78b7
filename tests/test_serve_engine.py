"""The server's decoding side without HTTP: text assembly with stop strings, the
one-at-a-time round-robin scheduler (`serve --exact`, `Engine(batched=False)`), the queue
bound and cancellation in both modes, and the Prometheus metrics. The batched engine (the
default) has its own file, test_serve_batched.py."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specflash.runtime.config import DecodeConfig
from specflash.runtime.pipeline import Pipeline
from specflash.serve.engine import Engine, Job, QueueFullError, TextAssembler
from specflash.serve.stats import ServerMetrics
from tiny import tiny_model_folder

# A fake tokenizer: each id is one piece of text; id 9 is half of a two-token character.
PIECES = {0: "Hel", 1: "lo", 2: " wor", 3: "ld", 4: "!", 5: "\n", 6: "EN", 7: "D", 9: "\ufffd"}


def fake_decode(ids):
    text = "".join(PIECES[i] for i in ids)
    return text.replace("\ufffd\ufffd", "é")  # two halves make one character


def feed(assembler, steps):
    out = []
    for i, step in enumerate(steps):
        out.append(assembler.push(step, final=i == len(steps) - 1))
    return out


def test_text_without_stop_strings_arrives_whole():
    a = TextAssembler(fake_decode)
    assert feed(a, [[0], [1, 2], [3, 4]]) == ["Hel", "lo wor", "ld!"]
    assert a.text == "Hello world!" and not a.stopped


def test_an_incomplete_character_is_held_back_until_it_completes():
    a = TextAssembler(fake_decode)
    assert feed(a, [[0], [9], [9, 1], [4]]) == ["Hel", "", "élo", "!"]


def test_a_stop_string_cuts_the_text_and_ends_the_stream():
    a = TextAssembler(fake_decode, stop=["wor"])
    assert a.push([0, 1]) == "Hello"
    assert a.push([2, 3]) == " "
    assert a.stopped and a.text == "Hello "
    assert a.push([4]) == ""


def test_a_tail_that_may_start_a_stop_string_is_held_back():
    a = TextAssembler(fake_decode, stop=["END"])
    assert a.push([0, 1, 5, 6]) == "Hello\n"  # "EN" could begin "END"
    assert a.push([7]) == ""
    assert a.stopped and a.text == "Hello\n"


def test_a_held_back_tail_is_released_when_it_is_not_a_stop_string():
    a = TextAssembler(fake_decode, stop=["END"])
    assert a.push([6]) == ""
    assert a.push([4]) == "EN!"
    assert a.push([6], final=True) == "EN"  # the end of the generation flushes everything
    assert a.text == "EN!EN" and not a.stopped


def test_the_earliest_of_several_stop_strings_wins():
    a = TextAssembler(fake_decode, stop=["ld", "lo"])
    a.push([0, 1, 2, 3], final=True)
    assert a.text == "Hel" and a.stopped


# ------------------------------------------------------------------ scheduler


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = tiny_model_folder(tmp_path_factory.mktemp("engine") / "tiny")
    return Pipeline.load(str(folder), draft="random", block_size=4)


def run_engine_to_completion(engine, jobs, max_rounds=2000):
    order = []
    for job in jobs:
        job.on_event = (lambda j: (lambda event: order.append((j, event))))(job)
        engine.submit(job)
    for _ in range(max_rounds):
        if not engine.run_once():
            break
    return order


def test_jobs_in_slots_advance_in_turn_and_each_gets_its_solo_tokens(pipe):
    prompts = [[5, 6, 7], [9, 8, 7, 6, 5], [42] * 4]
    solo = [pipe.decoder.generate(p, DecodeConfig(max_new_tokens=12)).token_ids for p in prompts]
    engine = Engine(pipe, max_concurrency=3, batched=False)
    jobs = [Job(p, DecodeConfig(max_new_tokens=12)) for p in prompts]
    order = run_engine_to_completion(engine, jobs)
    assert [j for j, _ in order[:3]] == jobs  # round-robin: every job has a step before any has two
    for job, expected in zip(jobs, solo):
        assert job.finish_reason in ("length", "stop")
        assert job._assembler.tokens == expected
        assert job.num_tokens == len(expected)


@pytest.mark.parametrize("batched", [False, True], ids=["exact", "batched"])
def test_a_single_slot_runs_jobs_one_after_the_other(pipe, batched):
    engine = Engine(pipe, max_concurrency=1, batched=batched)
    jobs = [Job([1, 2, 3], DecodeConfig(max_new_tokens=6)), Job([3, 2, 1], DecodeConfig(max_new_tokens=6))]
    order = run_engine_to_completion(engine, jobs)
    owners = [j for j, _ in order]
    assert owners == sorted(owners, key=jobs.index)  # all of job 0's events come first


@pytest.mark.parametrize("batched", [False, True], ids=["exact", "batched"])
def test_a_cancelled_job_leaves_its_slot_before_its_next_step(pipe, batched):
    engine = Engine(pipe, max_concurrency=1, batched=batched)
    first, second = Job([1, 2, 3], DecodeConfig(max_new_tokens=50)), Job([4, 5], DecodeConfig(max_new_tokens=3))
    events = []
    first.on_event = events.append
    engine.submit(first)
    engine.submit(second)
    engine.run_once()
    engine.cancel(first)
    engine.run_once()  # retires `first`
    assert first.finish_reason == "abort" and first.num_tokens == 1
    assert events[-1].finish_reason == "abort"  # whoever waits on the job is told
    while engine.run_once():
        pass
    assert second.finish_reason == "length" and second.num_tokens == 3
    assert engine.metrics.value("specflash_requests_finished_total", finish_reason="abort") == 1


@pytest.mark.parametrize("batched", [False, True], ids=["exact", "batched"])
def test_the_queue_refuses_work_beyond_slots_plus_queue(pipe, batched):
    engine = Engine(pipe, max_concurrency=1, max_queue=1, batched=batched)
    engine.submit(Job([1], DecodeConfig(max_new_tokens=2)))
    engine.submit(Job([2], DecodeConfig(max_new_tokens=2)))
    with pytest.raises(QueueFullError):
        engine.submit(Job([3], DecodeConfig(max_new_tokens=2)))


# ----------------------------------------------------------------- prometheus

METRIC_NAMES = {  # every series /metrics has always had, and the forward histograms
    "specflash_http_requests": "counter", "specflash_requests_finished": "counter",
    "specflash_requests_running": "gauge", "specflash_requests_waiting": "gauge",
    "specflash_prompt_tokens": "counter", "specflash_generation_tokens": "counter",
    "specflash_verify_steps": "counter", "specflash_draft_tokens": "counter", "specflash_accepted_tokens": "counter",
    "specflash_draft_tokens_by_position": "counter", "specflash_accepted_tokens_by_position": "counter",
    "specflash_acceptance_length": "histogram", "specflash_time_to_first_token_seconds": "histogram",
    "specflash_time_per_output_token_seconds": "histogram", "specflash_request_latency_seconds": "histogram",
    "specflash_batch_size": "histogram", "specflash_forward_rows": "histogram",
}


def samples_of(text):
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def test_metrics_text_parses_and_has_every_name_with_its_type():
    m = ServerMetrics(block_size=4)
    m.http_requests.labels(route='/v1/a"b\\', status=200).inc()
    m.record_forward(1, 7)
    m.record_step(0, 0, 1, verify=False)
    text = m.render()
    families = {f.name: f.type for f in text_string_to_metric_families(text)}
    assert families == METRIC_NAMES  # and nothing else: no _created series
    samples = samples_of(text)
    assert samples[("specflash_http_requests_total", (("route", '/v1/a"b\\'), ("status", "200")))] == 1
    assert samples[("specflash_requests_finished_total", (("finish_reason", "abort"),))] == 0  # there from the start
    assert samples[("specflash_forward_rows_bucket", (("le", "4.0"),))] == 0
    assert samples[("specflash_forward_rows_bucket", (("le", "8.0"),))] == 1
    assert samples[("specflash_forward_rows_sum", ())] == 7


def test_server_metrics_count_a_verify_step_per_position():
    m = ServerMetrics(block_size=4)
    m.record_step(0, 0, 1, verify=False)
    m.record_step(3, 2, 3, verify=True)
    assert m.value("specflash_generation_tokens_total") == 4
    assert m.value("specflash_verify_steps_total") == 1 and m.value("specflash_acceptance_length_count") == 1
    assert [m.value("specflash_draft_tokens_by_position_total", position=i) for i in (1, 2, 3)] == [1, 1, 1]
    assert [m.value("specflash_accepted_tokens_by_position_total", position=i) for i in (1, 2, 3)] == [1, 1, 0]


def test_each_server_has_its_own_registry():
    a, b = ServerMetrics(block_size=4), ServerMetrics(block_size=8)  # the same names twice: no clash
    a.record_step(0, 0, 5, verify=False)
    assert a.value("specflash_generation_tokens_total") == 5 and b.value("specflash_generation_tokens_total") == 0
    assert "specflash_generation_tokens_total 0.0" in b.render()


def test_the_exact_engine_counts_each_target_forward_with_its_batch_size_and_rows(pipe):
    engine = Engine(pipe, max_concurrency=2, batched=False)
    jobs = [Job([5, 6, 7], DecodeConfig(max_new_tokens=10)), Job([1, 2, 3, 4, 5], DecodeConfig(max_new_tokens=7))]
    run_engine_to_completion(engine, jobs)
    m = engine.metrics
    forwards = sum(1 + job.verify_steps for job in jobs)  # a prefill, then the verify steps
    assert m.value("specflash_batch_size_count") == forwards
    assert m.value("specflash_batch_size_sum") == forwards  # --exact: one generation per forward
    assert m.value("specflash_batch_size_bucket", le="1.0") == forwards
    assert m.value("specflash_forward_rows_count") == forwards
    rows = sum(len(job.prompt_ids) + job.verify_steps + job.drafted for job in jobs)  # prompt; anchor + drafts
    assert m.value("specflash_forward_rows_sum") == rows == 3 + 5 + m.value("specflash_verify_steps_total") \
        + m.value("specflash_draft_tokens_total")
