"""`specflash serve` over HTTP on a loopback port, with a tiny random target and a random
drafter: answers equal `specflash generate`, the official `openai` client works, every
user mistake gets an OpenAI-style 4xx, concurrent clients each get their solo output,
a client that drops mid-stream frees its slot, and /metrics parses and counts."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from specflash.cli import main
from specflash.runtime.config import DecodeConfig
from specflash.runtime.pipeline import Pipeline
from specflash.runtime.proposers import OracleProposer
from specflash.serve import ServerThread, ServeSettings, create_app
from tiny import tiny_model_folder

PROMPT = "Hello, how are you today?"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(tiny_model_folder(tmp_path_factory.mktemp("serve") / "tiny"))


@pytest.fixture(scope="module")
def reference(folder):
    """Plain decoding of the same target, in its own pipeline: the solo outputs."""
    pipe = Pipeline.load(folder, draft="none")

    def solo(prompt, max_tokens, chat=True):
        result = pipe.generate(prompt, DecodeConfig(max_new_tokens=max_tokens), chat=chat)
        return result.text, len(result.token_ids), result.finish_reason

    return solo


@pytest.fixture(scope="module")
def server(folder):
    pipe = Pipeline.load(folder, draft="random", block_size=4)
    app = create_app(pipe, ServeSettings("tiny", draft="random", aliases=(folder,), max_concurrency=8))
    with ServerThread(app) as srv:
        yield srv


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def chat(client, content, max_tokens, **extra):
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
            "temperature": 0, **extra}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse_events(lines):
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream_chat(client, content, max_tokens, **extra):
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "temperature": 0,
            "stream": True, **extra}
    with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(list(r.iter_lines()))


def metric_samples(client):
    text = client.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


# ------------------------------------------------------------ equal to generate


def test_chat_answer_equals_specflash_generate(capsys, client, folder):
    assert main(["generate", "--json", "--target", folder, "--draft", "none", "--prompt", PROMPT,
                 "--max-new-tokens", "24"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = chat(client, PROMPT, 24)
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": expected["text"]}
    assert choice["finish_reason"] == expected["finish_reason"]
    assert data["usage"]["completion_tokens"] == expected["num_new_tokens"]
    assert data["usage"]["prompt_tokens"] == expected["num_prompt_tokens"]
    assert data["usage"]["total_tokens"] == expected["num_prompt_tokens"] + expected["num_new_tokens"]
    spec = data["speculative"]
    assert spec["block_size"] == 4 and spec["draft"] == "random"
    assert spec["drafted_tokens"] > 0 and 0 <= spec["accepted_tokens"] <= spec["drafted_tokens"]
    assert spec["mean_tau"] >= 1.0


def test_streamed_chat_concatenates_to_the_same_answer(client, reference):
    text, n_tokens, reason = reference(PROMPT, 24)
    events = stream_chat(client, PROMPT, 24, stream_options={"include_usage": True})
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    content = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert len([piece for piece in content if piece]) > 1  # streamed piece by piece, not in one go
    assert "".join(content) == text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == reason
    assert "speculative" in finals[0]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == n_tokens


def test_completion_answer_equals_specflash_generate_without_chat(capsys, client, folder):
    prompt = "def add(a, b):"
    assert main(["generate", "--json", "--no-chat", "--target", folder, "--draft", "none", "--prompt", prompt,
                 "--max-new-tokens", "20"]) == 0
    expected = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": 20, "temperature": 0})
    assert r.status_code == 200, r.text
    data = r.json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == expected["text"]
    assert data["usage"]["completion_tokens"] == expected["num_new_tokens"]
    with client.stream("POST", "/v1/completions", json={"prompt": prompt, "max_tokens": 20, "temperature": 0,
                                                         "stream": True}) as r:
        events = sse_events(list(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert "".join(e["choices"][0]["text"] for e in events[:-1]) == expected["text"]


def test_a_stop_string_ends_the_answer_before_it(client, reference):
    text, _, _ = reference(PROMPT, 24)
    # a two-character stop string whose first occurrence is in the middle of the answer
    i = next(i for i in range(len(text) // 3, len(text) - 2)
             if text.find(text[i:i + 2]) == i and "\ufffd" not in text[i:i + 2])
    stop = text[i:i + 2]
    data = chat(client, PROMPT, 24, stop=[stop, "never appears \u2603"])
    assert data["choices"][0]["message"]["content"] == text[:i]
    assert data["choices"][0]["finish_reason"] == "stop"
    events = stream_chat(client, PROMPT, 24, stop=stop)
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])
    assert content == text[:i]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"


def test_a_model_alias_and_token_id_prompts_are_accepted(client, folder, reference):
    pipe_ids = Pipeline.load(folder, draft="none").encode(PROMPT, chat=False)
    text, n, _ = reference(PROMPT, 10, chat=False)
    r = client.post("/v1/completions", json={"model": folder, "prompt": pipe_ids, "max_tokens": 10,
                                             "temperature": 0})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == text and r.json()["usage"]["prompt_tokens"] == len(pipe_ids)


# ------------------------------------------------------------- openai client


def test_the_official_openai_client_works(server, reference):
    oa = openai.OpenAI(base_url=server.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)
    assert [m.id for m in oa.models.list()] == ["tiny"]
    text, n_tokens, _ = reference(PROMPT, 16)
    resp = oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=16,
                                      temperature=0)
    assert resp.choices[0].message.content == text
    assert resp.usage.completion_tokens == n_tokens
    assert resp.model_extra["speculative"]["block_size"] == 4
    pieces = [c.choices[0].delta.content or "" for c in oa.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=16, temperature=0, stream=True)
        if c.choices]
    assert "".join(pieces) == text
    plain, _, _ = reference("Once upon a time", 12, chat=False)
    comp = oa.completions.create(model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0)
    assert comp.choices[0].text == plain
    streamed = "".join(c.choices[0].text for c in oa.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=12, temperature=0, stream=True))
    assert streamed == plain
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}], max_tokens=2)
    with pytest.raises(openai.BadRequestError) as info:
        oa.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], temperature=-1)
    assert info.value.body["param"] == "temperature"


# ----------------------------------------------------------------- bad input

LONG = "hello " * 600  # well past the tiny target's 512-token context
MSG = [{"role": "user", "content": "hi"}]

BAD_REQUESTS = [
    # (route, body: dict or raw text, status, param)
    ("chat", "{not json", 400, None),
    ("chat", "[1, 2]", 400, None),
    ("chat", {"messages": "hi"}, 400, "messages"),
    ("chat", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("chat", {"messages": [{"content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    ("chat", {}, 400, "messages"),
    ("chat", {"messages": []}, 400, "messages"),
    ("chat", {"messages": MSG, "max_tokens": "10"}, 400, "max_tokens"),
    ("chat", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("chat", {"messages": MSG, "max_tokens": 100000}, 400, "max_tokens"),
    ("chat", {"messages": MSG, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ("chat", {"messages": MSG, "temperature": -0.5}, 400, "temperature"),
    ("chat", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("chat", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("chat", {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("chat", {"messages": MSG, "top_k": -2}, 400, "top_k"),
    ("chat", {"messages": MSG, "n": 2}, 400, "n"),
    ("chat", {"messages": MSG, "stream": "yes"}, 400, "stream"),
    ("chat", {"messages": MSG, "stop": 7}, 400, "stop"),
    ("chat", {"messages": MSG, "stop": [""]}, 400, "stop"),
    ("chat", {"messages": MSG, "seed": 1.5}, 400, "seed"),
    ("chat", {"messages": MSG, "model": "gpt-4"}, 404, "model"),
    ("chat", {"messages": MSG, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    ("chat", {"messages": MSG, "logprobs": True}, 400, "logprobs"),
    ("chat", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("completions", {"prompt": LONG}, 400, "prompt"),
    ("completions", {"prompt": ""}, 400, "prompt"),
    ("completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
    ("completions", {"prompt": "hi", "max_tokens": 1000}, 400, "max_tokens"),
    ("completions", {"prompt": "hi", "n": 3}, 400, "n"),
    ("completions", {"prompt": "hi", "model": "other"}, 404, "model"),
    ("completions", {"prompt": "hi", "echo": True}, 400, "echo"),
]


@pytest.mark.parametrize("route, body, status, param", BAD_REQUESTS,
                         ids=[f"{r}-{i}" for i, (r, *_rest) in enumerate(BAD_REQUESTS)])
def test_bad_input_gets_a_4xx_naming_the_field(client, route, body, status, param):
    path = "/v1/chat/completions" if route == "chat" else "/v1/completions"
    content = body if isinstance(body, str) else json.dumps(body)
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"
    assert error["message"]


def test_bad_requests_in_stream_mode_fail_before_the_stream_starts(client):
    body = {"messages": MSG, "stream": True, "top_p": 2}
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == "top_p"


def test_unknown_routes_and_methods_get_openai_errors(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()
    r = client.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_the_server_stays_healthy_after_bad_input(client):
    assert client.get("/health").json()["status"] == "ok"
    assert chat(client, "still there?", 3)["usage"]["completion_tokens"] >= 1


# ------------------------------------------------- numbers, text, size limits

HUGE = "9" * 5000  # Python's json refuses to parse more than 4300 digits
OUT_OF_RANGE = [
    # (route, JSON fields as sent, the field the error must name)
    ("chat", '"temperature": 1e39', "temperature"),  # was a 500: float32 overflows to inf in the drafter
    ("chat", '"temperature": 1e308', "temperature"),
    ("chat", '"temperature": 1e400', "temperature"),  # beyond a double: read as inf
    ("chat", '"temperature": NaN', "temperature"),
    ("chat", '"temperature": Infinity', "temperature"),
    ("chat", '"temperature": 101', "temperature"),
    ("chat", f'"temperature": {HUGE}', "temperature"),
    ("chat", '"top_p": NaN', "top_p"),
    ("chat", '"top_p": 1e308', "top_p"),
    ("chat", '"top_p": -Infinity', "top_p"),
    ("chat", '"top_k": 1e308', "top_k"),
    ("chat", f'"top_k": {HUGE}', "top_k"),
    ("chat", '"max_tokens": NaN', "max_tokens"),
    ("chat", '"max_tokens": 1e308', "max_tokens"),
    ("chat", f'"max_tokens": {HUGE}', "max_tokens"),  # was param: null
    ("chat", f'"max_tokens": -{HUGE}', "max_tokens"),
    ("chat", f'"max_completion_tokens": {10**30}', "max_completion_tokens"),
    ("chat", f'"seed": {HUGE}', "seed"),
    ("chat", f'"seed": {2**64}', "seed"),
    ("chat", '"seed": Infinity', "seed"),
    ("chat", '"n": NaN', "n"),
    ("chat", '"stop": [NaN]', "stop[0]"),
    ("chat", '"frequency_penalty": NaN', "frequency_penalty"),
    ("completions", '"temperature": 1e39', "temperature"),
    ("completions", '"temperature": -Infinity', "temperature"),
    ("completions", f'"max_tokens": {HUGE}', "max_tokens"),
    ("completions", '"top_p": NaN', "top_p"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("route, fields, param", OUT_OF_RANGE, ids=[f"{r}-{i}" for i, (r, *_x) in
                                                                     enumerate(OUT_OF_RANGE)])
def test_numbers_out_of_range_get_a_400_naming_the_field(client, route, fields, param, stream):
    if route == "chat":
        path, prompt = "/v1/chat/completions", '"messages": [{"role": "user", "content": "hi"}]'
    else:
        path, prompt = "/v1/completions", '"prompt": "hi"'
    content = f'{{{prompt}, "max_tokens": 4, "stream": {json.dumps(stream)}, {fields}}}'
    if route == "completions" and "max_tokens" in fields:
        content = content.replace('"max_tokens": 4, ', "")
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text  # before any stream starts
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert param.split("[")[0] in error["message"] and len(error["message"]) < 300


def test_a_top_p_below_float32_precision_keeps_the_top_token(client, reference):
    text, _, _ = reference(PROMPT, 8)  # greedy
    for top_p in (1e-300, 1e-45):  # 1e-300 rounds to 0 in float32: it kept no token (a 500)
        data = chat(client, PROMPT, 8, temperature=1.0, top_p=top_p, seed=3)
        assert data["choices"][0]["message"]["content"] == text


LONE = "a lone \\ud800 surrogate"  # a JSON escape that decodes to no Unicode text
SURROGATES = [
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "{LONE}"}}]}}', "messages[0].content"),
    ("/v1/chat/completions", f'{{"messages": [{{"role": "user", "content": "hi"}}, {{"role": "user", "content": '
                             f'[{{"type": "text", "text": "{LONE}"}}]}}]}}', "messages[1].content[0].text"),
    ("/v1/completions", f'{{"prompt": "{LONE}"}}', "prompt"),
    ("/v1/completions", f'{{"prompt": "hi", "stop": "{LONE}"}}', "stop"),
    ("/v1/completions", '{"prompt": "hi", "stop": ["ok", "\\udc00"]}', "stop[1]"),
]


@pytest.mark.parametrize("path, content, param", SURROGATES)
def test_a_lone_surrogate_gets_a_400_naming_the_field(client, path, content, param):
    r = client.post(path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param
    assert "surrogate" in error["message"] and "TextEncodeInput" not in error["message"]


def test_deeply_nested_json_gets_a_400(client):
    r = client.post("/v1/completions", content='{"prompt": ' + "[" * 100000 + "]" * 100000 + "}",
                    headers={"content-type": "application/json"})
    assert r.status_code == 400 and "deeply" in r.json()["error"]["message"]


def test_the_default_character_limit_follows_the_context(client):
    r = client.post("/v1/completions", json={"prompt": "x" * (16 * 512 + 1)})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "prompt" and error["code"] == "context_length_exceeded"
    assert "8,192" in error["message"] and "512-token context" in error["message"]


@pytest.fixture(scope="module")
def limited(folder):
    """Small limits, and the pipeline at hand to watch its tokenizer."""
    pipe = Pipeline.load(folder, draft="none")
    settings = ServeSettings("tiny", max_body_bytes=4096, max_messages=8, max_prompt_chars=1000)
    with ServerThread(create_app(pipe, settings)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield srv, c, pipe


def _http(port, head, payload):
    """Send one raw request in one write; (status, JSON body) of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head.encode() + payload)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536) or b"\r\n\r\n"
        header, _, body = data.partition(b"\r\n\r\n")
        length = int(next(line.split(b":")[1] for line in header.split(b"\r\n")
                          if line.lower().startswith(b"content-length")))
        while len(body) < length:
            chunk = sock.recv(65536)
            assert chunk, "the server closed before the whole answer"
            body += chunk
    return int(header.split()[1]), json.loads(body)


def test_the_body_limit_counts_the_bytes_read_even_without_content_length(limited):
    srv, c, _ = limited
    body = json.dumps({"prompt": "hello " * 1000, "max_tokens": 2}).encode()  # 6 kB
    chunked = b"".join(f"{len(part):x}\r\n".encode() + part + b"\r\n"
                       for part in (body[i:i + 1000] for i in range(0, len(body), 1000))) + b"0\r\n\r\n"
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    status, answer = _http(srv.port, head + "Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 413, answer
    assert answer["error"]["code"] == "request_too_large" and "4,096 bytes" in answer["error"]["message"]
    status, answer = _http(srv.port, head + f"Content-Length: {len(body)}\r\n\r\n", body)
    assert status == 413 and f"{len(body):,} bytes" in answer["error"]["message"]
    assert c.get("/health").json()["status"] == "ok"
    small = json.dumps({"prompt": "hello " * 20, "max_tokens": 2}).encode()
    chunked = f"{len(small):x}\r\n".encode() + small + b"\r\n0\r\n\r\n"
    status, answer = _http(srv.port, head + "Transfer-Encoding: chunked\r\n\r\n", chunked)
    assert status == 200 and answer["usage"]["completion_tokens"] == 2, answer


def test_too_many_messages_or_characters_are_refused_before_tokenizing(limited, monkeypatch):
    _, c, pipe = limited
    calls = []
    monkeypatch.setattr(pipe, "encode", lambda *a, **k: calls.append(a) or [1, 2, 3])
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}] * 9})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages" and error["code"] == "too_many_messages" and "at most 8" in error["message"]
    r = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x" * 600}] * 2})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "messages" and "1,200 characters" in error["message"]
    assert "at most 1,000" in error["message"] and "--max-prompt-chars" in error["message"]
    r = c.post("/v1/completions", json={"prompt": "x" * 1001})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    assert calls == []
    r = c.post("/v1/completions", json={"prompt": "x" * 1000, "max_tokens": 1})
    assert r.status_code == 200 and calls


def test_tokenizing_runs_off_the_event_loop_and_off_the_decoding_thread(limited, monkeypatch):
    """While one request's tokenization is stuck, /health answers and a request sent as
    token ids is decoded to text (the decoding thread has its own tokenizer)."""
    srv, c, pipe = limited
    entered, release = threading.Event(), threading.Event()
    encode = pipe.encode

    def slow_encode(*args, **kwargs):
        entered.set()
        release.wait(30)
        return encode(*args, **kwargs)

    monkeypatch.setattr(pipe, "encode", slow_encode)
    results = {}
    stuck = threading.Thread(target=lambda: results.setdefault("stuck", httpx.post(
        srv.url + "/v1/completions", json={"prompt": "Once upon a time", "max_tokens": 3}, timeout=60)))
    stuck.start()
    try:
        assert entered.wait(30)
        assert c.get("/health", timeout=10).json()["status"] == "ok"
        r = c.post("/v1/completions", json={"prompt": [5, 6, 7], "max_tokens": 4, "temperature": 0}, timeout=20)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        assert not release.is_set() and stuck.is_alive()
    finally:
        release.set()
        stuck.join(60)
    assert results["stuck"].status_code == 200


# ---------------------------------------------------------------- concurrency


def test_32_concurrent_streaming_clients_each_get_their_solo_output(server, client, reference):
    prompts = [f"Tell me about item number {i}." for i in range(32)]
    lengths = [8 + (i % 5) * 4 for i in range(32)]
    solo = [reference(p, n)[0] for p, n in zip(prompts, lengths)]
    before = metric_samples(client)

    async def one(c, prompt, n):
        body = {"model": "tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": n,
                "temperature": 0, "stream": True}
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            events = sse_events([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        return "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1] if e["choices"])

    async def run_all():
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, p, n) for p, n in zip(prompts, lengths)))

    answers = asyncio.run(run_all())
    assert answers == solo
    after = metric_samples(client)
    finished = sum(after.get(("specflash_requests_finished_total", (("finish_reason", r),)), 0)
                   - before.get(("specflash_requests_finished_total", (("finish_reason", r),)), 0)
                   for r in ("stop", "length"))
    assert finished == 32


def _raw_request(port, path, body):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    payload = json.dumps(body).encode()
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    return sock


def _wait_for(predicate, what, limit_s=60.0):
    """Poll (bounded) until predicate() holds; not a timing assertion."""
    for _ in range(int(limit_s / 0.05)):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what}")


@pytest.fixture(scope="module")
def long_server(tmp_path_factory):
    """One slot, a long context: a generation that would take many seconds if not cancelled."""
    folder = str(tiny_model_folder(tmp_path_factory.mktemp("long") / "tiny", max_positions=4096))
    pipe = Pipeline.load(folder, draft="random", block_size=4)
    app = create_app(pipe, ServeSettings("tiny", draft="random", max_concurrency=1))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield srv, c, pipe


@pytest.mark.parametrize("stream", [True, False])
def test_a_client_that_drops_mid_request_frees_its_slot(long_server, stream):
    srv, c, _ = long_server
    aborted = ("specflash_requests_finished_total", (("finish_reason", "abort"),))
    before = metric_samples(c)
    body = {"messages": [{"role": "user", "content": "Talk for a long time."}], "max_tokens": 4000,
            "temperature": 0, "stream": stream}
    sock = _raw_request(srv.port, "/v1/chat/completions", body)
    if stream:
        received = b""
        while received.count(b"data: ") < 3:  # the stream is flowing
            chunk = sock.recv(65536)
            assert chunk
            received += chunk
    else:
        _wait_for(lambda: metric_samples(c).get(("specflash_requests_running", ()), 0) == 1, "the request to run")
    sock.close()
    _wait_for(lambda: metric_samples(c).get(aborted, 0) == before.get(aborted, 0) + 1, "the request to be aborted")
    after = metric_samples(c)
    assert after[("specflash_requests_running", ())] == 0
    generated = after[("specflash_generation_tokens_total", ())] - before[("specflash_generation_tokens_total", ())]
    assert generated < 4000
    assert c.get("/health").json() == {"status": "ok", "model": "tiny", "running": 0, "waiting": 0}
    data = chat(c, "And now?", 5)  # the single slot is free again
    assert data["usage"]["completion_tokens"] == 5 or data["choices"][0]["finish_reason"] == "stop"


# -------------------------------------------------------------------- metrics


@pytest.fixture(scope="module")
def oracle_server(folder):
    """A server whose proposer knows half of the right answer: acceptance is neither 0 nor all."""
    base = Pipeline.load(folder, draft="none")
    prompt = base.encode("Count with me", chat=False)
    truth = base.decoder.generate(prompt, DecodeConfig(max_new_tokens=30)).token_ids
    pipe = Pipeline(base.target, OracleProposer(prompt + truth, base.target.vocab_rows, p_correct=0.7), 4)
    app = create_app(pipe, ServeSettings("tiny", draft="oracle"))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c, prompt, truth


def test_metrics_parse_as_prometheus_text_and_count_a_request(oracle_server):
    c, prompt, truth = oracle_server
    before = metric_samples(c)
    r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 30, "temperature": 0})
    assert r.status_code == 200
    data = r.json()
    after = metric_samples(c)

    def delta(name, **labels):
        key = (name, tuple(sorted(labels.items())))
        return after.get(key, 0) - before.get(key, 0)

    spec, use = data["speculative"], data["usage"]
    assert use["completion_tokens"] == len(truth) == 30
    assert 0 < spec["accepted_tokens"] < spec["drafted_tokens"]
    assert delta("specflash_requests_finished_total", finish_reason=data["choices"][0]["finish_reason"]) == 1
    assert delta("specflash_prompt_tokens_total") == use["prompt_tokens"] == len(prompt)
    assert delta("specflash_generation_tokens_total") == use["completion_tokens"]
    assert delta("specflash_draft_tokens_total") == spec["drafted_tokens"]
    assert delta("specflash_accepted_tokens_total") == spec["accepted_tokens"]
    assert delta("specflash_verify_steps_total") == spec["verify_steps"]
    assert delta("specflash_acceptance_length_count") == spec["verify_steps"]
    assert delta("specflash_acceptance_length_sum") == spec["accepted_tokens"] + spec["verify_steps"]
    assert spec["mean_tau"] == pytest.approx((spec["accepted_tokens"] + spec["verify_steps"]) / spec["verify_steps"])
    assert sum(delta("specflash_draft_tokens_by_position_total", position=str(i)) for i in (1, 2, 3)) \
        == spec["drafted_tokens"]
    assert sum(delta("specflash_accepted_tokens_by_position_total", position=str(i)) for i in (1, 2, 3)) \
        == spec["accepted_tokens"]
    assert delta("specflash_time_to_first_token_seconds_count") == 1
    assert delta("specflash_time_per_output_token_seconds_count") == 1
    assert delta("specflash_request_latency_seconds_count") == 1
    assert delta("specflash_http_requests_total", route="/v1/completions", status="200") == 1
    # one forward per step (a prefill, then verify steps), one request each; rows: prompt, then anchor + drafts
    forwards = 1 + spec["verify_steps"]
    assert delta("specflash_batch_size_count") == delta("specflash_batch_size_sum") == forwards
    assert delta("specflash_forward_rows_count") == forwards
    assert delta("specflash_forward_rows_sum") == len(prompt) + spec["verify_steps"] + spec["drafted_tokens"]
    r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    names = {family.name for family in text_string_to_metric_families(r.text)}
    assert names >= {"specflash_" + name for name in (
        "http_requests", "requests_finished", "requests_running", "requests_waiting", "prompt_tokens",
        "generation_tokens", "verify_steps", "draft_tokens", "accepted_tokens", "draft_tokens_by_position",
        "accepted_tokens_by_position", "acceptance_length", "time_to_first_token_seconds",
        "time_per_output_token_seconds", "request_latency_seconds", "batch_size", "forward_rows")}


# ---------------------------------------------------------------- models, auth


def test_models_and_health(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]
    assert client.get("/v1/models/tiny").json()["max_model_len"] == 512
    r = client.get("/v1/models/other")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert client.get("/health").json()["status"] == "ok"


def test_an_api_key_is_required_on_v1_when_set(folder):
    pipe = Pipeline.load(folder, draft="none")
    app = create_app(pipe, ServeSettings("tiny", api_key="s3cret"))
    with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        r = c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/metrics").status_code == 200
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()
        oa = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        resp = oa.chat.completions.create(model="tiny", messages=MSG, max_tokens=3, temperature=0)
        assert resp.usage.completion_tokens >= 1


# ------------------------------------------------------------------- the CLI


def test_serve_command_rejects_bad_flags_with_one_line(capsys, folder):
    assert main(["serve", "--target", folder, "--max-concurrency", "0"]) == 2
    err = capsys.readouterr().err
    assert "--max-concurrency must be >= 1" in err and len(err.strip().splitlines()) == 1


def test_serve_command_answers_on_loopback(folder, tmp_path):
    env = dict(os.environ, SPECFLASH_API_KEY="k3y")
    proc = subprocess.Popen([sys.executable, "-m", "specflash.cli", "serve", "--target", folder, "--draft", "random",
                             "--block-size", "4", "--port", "0", "--log-level", "warning"],
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        line = ""
        for _ in range(200):  # bounded: the banner is among the first lines
            line = proc.stderr.readline()
            if "serving" in line or not line:
                break
        assert "http://127.0.0.1:" in line and "API key required" in line, line
        assert "batched: up to 8 requests per forward" in line, line  # the default; --exact steps one at a time
        url = line.split("on ")[-1].split("/v1")[0]
        oa = openai.OpenAI(base_url=url + "/v1", api_key="k3y", max_retries=0, timeout=60)
        resp = oa.chat.completions.create(model=folder, messages=MSG, max_tokens=4, temperature=0)
        assert resp.choices[0].finish_reason in ("length", "stop")
        oa.close()  # no idle keep-alive connection for the server to wait on
    finally:
        proc.terminate()
        proc.wait(30)
