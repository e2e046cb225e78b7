"""The server's decoding side without HTTP: text assembly with stop strings, the
step-by-step round-robin scheduler, its queue bound, and the Prometheus text writer."""

import pytest
from prometheus_client.parser import text_string_to_metric_families

from specflash.runtime.config import DecodeConfig
from specflash.runtime.pipeline import Pipeline
from specflash.serve.engine import Engine, Job, QueueFullError, TextAssembler
from specflash.serve.prometheus import Counter, Gauge, Histogram, Registry
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
    engine = Engine(pipe, max_concurrency=3)
    jobs = [Job(p, DecodeConfig(max_new_tokens=12)) for p in prompts]
    order = run_engine_to_completion(engine, jobs)
    assert [j for j, _ in order[:3]] == jobs  # round-robin: every job has a step before any has two
    for job, expected in zip(jobs, solo):
        assert job.finish_reason in ("length", "stop")
        assert job._assembler.tokens == expected
        assert job.num_tokens == len(expected)


def test_a_single_slot_runs_jobs_one_after_the_other(pipe):
    engine = Engine(pipe, max_concurrency=1)
    jobs = [Job([1, 2, 3], DecodeConfig(max_new_tokens=6)), Job([3, 2, 1], DecodeConfig(max_new_tokens=6))]
    order = run_engine_to_completion(engine, jobs)
    owners = [j for j, _ in order]
    assert owners == sorted(owners, key=jobs.index)  # all of job 0's events come first


def test_a_cancelled_job_leaves_its_slot_before_its_next_step(pipe):
    engine = Engine(pipe, max_concurrency=1)
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
    assert engine.metrics.requests_finished.value(finish_reason="abort") == 1


def test_the_queue_refuses_work_beyond_slots_plus_queue(pipe):
    engine = Engine(pipe, max_concurrency=1, max_queue=1)
    engine.submit(Job([1], DecodeConfig(max_new_tokens=2)))
    engine.submit(Job([2], DecodeConfig(max_new_tokens=2)))
    with pytest.raises(QueueFullError):
        engine.submit(Job([3], DecodeConfig(max_new_tokens=2)))


# ----------------------------------------------------------------- prometheus


def test_prometheus_text_parses_with_the_reference_parser():
    r = Registry()
    c = Counter(r, "demo_requests_total", 'requests with "quotes" and \\ backslash', ("route",))
    g = Gauge(r, "demo_running", "running")
    h = Histogram(r, "demo_latency_seconds", "latency", buckets=(0.1, 1.0))
    c.inc(route='/v1/a"b')
    c.inc(2, route="/x")
    g.set(3)
    for v in (0.05, 0.5, 5.0):
        h.observe(v)
    families = {f.name: f for f in text_string_to_metric_families(r.render())}
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families.values() for s in f.samples}
    assert families["demo_requests"].type == "counter"
    assert samples[("demo_requests_total", (("route", '/v1/a"b'),))] == 1
    assert samples[("demo_requests_total", (("route", "/x"),))] == 2
    assert samples[("demo_running", ())] == 3
    assert samples[("demo_latency_seconds_bucket", (("le", "0.1"),))] == 1
    assert samples[("demo_latency_seconds_bucket", (("le", "1.0"),))] == 2
    assert samples[("demo_latency_seconds_bucket", (("le", "+Inf"),))] == 3
    assert samples[("demo_latency_seconds_count", ())] == 3
    assert samples[("demo_latency_seconds_sum", ())] == pytest.approx(5.55)


def test_server_metrics_count_a_verify_step_per_position():
    m = ServerMetrics(block_size=4)
    m.record_step(0, 0, 1, verify=False)
    m.record_step(3, 2, 3, verify=True)
    assert m.generation_tokens.value() == 4
    assert m.verify_steps.value() == 1 and m.acceptance_length.count() == 1
    assert [m.draft_tokens_by_position.value(position=i) for i in (1, 2, 3)] == [1, 1, 1]
    assert [m.accepted_tokens_by_position.value(position=i) for i in (1, 2, 3)] == [1, 1, 0]
