"""The OpenAI wire format: request schemas, their checks, error bodies, response shapes.

Requests are parsed in three passes. `parse_json` reads the body, keeping numbers no
field could take (NaN, 1e400, 5000 digits) as `BadNumber`s so that their field can be
named; Pydantic (strict: no string-to-number coercion) checks types and shapes;
`check_*` functions then check values and name the offending field. Every user
mistake becomes an `ApiError` with an HTTP status in the 4xx range and an OpenAI-style
body:
``{"error": {"message": ..., "type": "invalid_request_error", "param": "top_p", "code": null}}``.
Fields the server cannot honour without changing the target's output distribution
(penalties, logit bias, logprobs, tools, n > 1) are refused, never silently ignored;
unknown fields are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

# ---------------------------------------------------------------- errors


class ApiError(Exception):
    """An error answered with `status` and an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def bad(param: str | None, message: str, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# Union branches appear in pydantic error locations as type names ("str", "list[str]").
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance"}


def _is_tag(item: Any) -> bool:
    text = str(item)
    return not isinstance(item, int) and (text in _TYPE_TAGS or "[" in text or "-" in text)


def param_from_loc(loc: tuple[Any, ...], through_unions: bool = False) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'. A union branch
    ends the path, unless `through_unions` (then ('prompt', 'list[int]', 2) -> 'prompt[2]')."""
    parts: list[str] = []
    for item in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
            continue
        if _is_tag(item):
            if through_unions:
                continue
            break
        parts.append(("." if parts else "") + str(item))
    return "".join(parts) or None


# --------------------------------------------------------------- the body

MAX_INT_DIGITS = 24  # every integer field fits in 64 bits (20 digits); longer ones are refused unparsed


class BadNumber:
    """A JSON number no field takes, kept as written so that the field it was sent in can
    be named: NaN / Infinity (which Python's json reads but JSON has not), a literal that
    overflows a double (1e400), an integer longer than MAX_INT_DIGITS (never converted:
    Python refuses to parse more than 4300 digits)."""

    def __init__(self, text: str, why: str):
        self.text = text
        self.why = why

    def __repr__(self) -> str:
        shown = self.text if len(self.text) <= 24 else f"{self.text[:12]}...{self.text[-4:]}"
        return f"{shown} ({self.why})"


def _parse_int(text: str) -> int | BadNumber:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        return BadNumber(text, f"a {digits}-digit integer")
    return int(text)


def _parse_float(text: str) -> float | BadNumber:
    value = float(text)
    return value if math.isfinite(value) else BadNumber(text, "beyond the range of a 64-bit float")


def _parse_constant(name: str) -> BadNumber:
    return BadNumber(name, "not a JSON number")


def parse_json(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object; numbers that no field could take become BadNumber."""
    try:
        body = json.loads(raw, parse_int=_parse_int, parse_float=_parse_float, parse_constant=_parse_constant)
    except json.JSONDecodeError as exc:
        raise bad(None, f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") \
            from None
    except UnicodeDecodeError:
        raise bad(None, "the request body is not valid UTF-8 text") from None
    except RecursionError:
        raise bad(None, "the request body nests arrays or objects too deeply") from None
    if not isinstance(body, dict):
        raise bad(None, "the request body must be a JSON object")
    return body


def parse_request(model: type[BaseModel], body: dict[str, Any]):
    """`body` checked against the request schema `model`."""
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise validation_error(list(exc.errors())) from None


def validation_error(errors: list[dict[str, Any]]) -> ApiError:
    """The first of pydantic's / FastAPI's validation errors as an ApiError."""
    if not errors:
        return bad(None, "invalid request body")
    # A number out of every range: name the field it was sent in (a numeric branch first).
    odd = [e for e in errors if isinstance(e.get("input"), BadNumber)]
    numeric = [e for e in odd if "int" in e.get("type", "") or "float" in e.get("type", "")]
    if odd:
        err = (numeric or odd)[0]
        param = param_from_loc(tuple(err.get("loc", ())), through_unions=True)
        if numeric:
            return bad(param, f"{param} must be a finite number within its range (got {err['input']!r})")
        return bad(param, f"invalid {param}: {err.get('msg', 'wrong type')} (got {err['input']!r})")
    err = errors[0]
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return bad(None, f"the request body is not valid JSON{': ' + str(detail) if detail else ''}")
    loc = tuple(err.get("loc", ()))
    param = param_from_loc(loc)
    if param is None:
        return bad(None, "the request body must be a JSON object")
    if kind == "missing":
        return bad(param, f"{param} is required")
    if kind == "extra_forbidden":
        return bad(param, f"unknown field {param}")
    value = err.get("input")
    shown = repr(value) if not isinstance(value, (dict, list)) else type(value).__name__
    return bad(param, f"invalid {param}: {err.get('msg', 'wrong type')} (got {shown[:80]})")


# --------------------------------------------------------------- schemas


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")


class StreamOptions(_Strict):
    include_usage: bool = False


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: str
    content: str | list[ContentPart] | None = None


class _SamplingRequest(_Strict):
    model: str | None = None
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Accepted only at their neutral values (see check_unsupported).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    logprobs: bool | int | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = None


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage]


class CompletionRequest(_SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    best_of: int | None = None
    suffix: str | None = None


# ----------------------------------------------------------------- checks

ROLES = ("system", "user", "assistant", "developer", "tool")
MAX_SEED = 2**63 - 1
GREEDY_BELOW = 1e-5  # smaller temperatures overflow the softmax; they mean greedy decoding
# Beyond it every token is close to equally likely; far beyond (float32's 3.4e38) the
# sampler divides by infinity.
MAX_TEMPERATURE = 100.0
# The most likely token has probability >= 1 / vocabulary > TOP_P_FLOOR (for any vocabulary
# under 10 million), so any top_p at or below it keeps that token alone: raising a smaller
# top_p to it changes nothing, and keeps it from rounding to 0 in float32 (which would keep
# no token at all).
TOP_P_FLOOR = 1e-7
MAX_STOP_STRINGS = 16  # stop strings are matched on the decoding thread at every step
MAX_STOP_CHARS = 1000


@dataclass
class Sampling:
    """The checked sampling fields of a request (max_tokens resolved later, once the
    prompt length is known)."""

    max_tokens: int | None
    max_tokens_param: str
    temperature: float
    top_p: float
    top_k: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool


def _finite(name: str, value: float | None) -> None:
    if value is not None and not math.isfinite(value):
        raise bad(name, f"{name} must be a finite number (got {value})")


def check_unsupported(req: _SamplingRequest) -> None:
    if req.n is not None and req.n != 1:
        if req.n < 1:
            raise bad("n", f"n must be 1 (got {req.n})")
        raise bad("n", f"n > 1 is not supported (got {req.n}); send {req.n} requests, each with its own seed")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value is not None and value != 0:
            raise bad(name, f"{name} is not supported: specflash samples exactly the target's distribution; "
                            "leave it out or send 0")
    if req.repetition_penalty is not None and req.repetition_penalty != 1:
        raise bad("repetition_penalty", "repetition_penalty is not supported; leave it out or send 1")
    if req.logit_bias:
        raise bad("logit_bias", "logit_bias is not supported; leave it out")
    if req.logprobs or req.top_logprobs:
        raise bad("logprobs", "logprobs are not supported; leave logprobs and top_logprobs out")
    if req.tools or req.functions:
        raise bad("tools", "tool calling is not supported by this server")
    if req.response_format and req.response_format.get("type", "text") != "text":
        raise bad("response_format", "only response_format {\"type\": \"text\"} is supported")


def check_sampling(req: _SamplingRequest) -> Sampling:
    check_unsupported(req)
    if req.max_completion_tokens is not None:
        max_tokens, max_param = req.max_completion_tokens, "max_completion_tokens"
    else:
        max_tokens, max_param = req.max_tokens, "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad(max_param, f"{max_param} must be >= 1 (got {max_tokens})")
    temperature = 1.0 if req.temperature is None else req.temperature
    _finite("temperature", temperature)
    if temperature < 0:
        raise bad("temperature", f"temperature must be >= 0 (got {temperature}); use 0 for greedy decoding")
    if temperature > MAX_TEMPERATURE:
        raise bad("temperature", f"temperature must be at most {MAX_TEMPERATURE:g} (got {temperature:g}); "
                                 "at that temperature sampling is already close to uniform")
    if temperature < GREEDY_BELOW:
        temperature = 0.0
    top_p = 1.0 if req.top_p is None else req.top_p
    _finite("top_p", top_p)
    if not 0 < top_p <= 1:
        raise bad("top_p", f"top_p must be in (0, 1] (got {top_p}); use 1 to disable it")
    top_p = max(top_p, TOP_P_FLOOR)
    top_k = 0 if req.top_k is None or req.top_k == -1 else req.top_k
    if top_k < 0:
        raise bad("top_k", f"top_k must be >= 0, or -1 to disable it (got {req.top_k})")
    if req.stop is None:
        stop: tuple[str, ...] = ()
    elif isinstance(req.stop, str):
        stop = (req.stop,) if req.stop else ()
    else:
        if any(not s for s in req.stop):
            raise bad("stop", "stop strings must not be empty")
        if len(req.stop) > MAX_STOP_STRINGS:
            raise bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed (got {len(req.stop)})")
        stop = tuple(req.stop)
    for i, text in enumerate(stop):
        if len(text) > MAX_STOP_CHARS:
            raise bad("stop", f"stop strings may have at most {MAX_STOP_CHARS} characters (got {len(text)})")
        check_text("stop" if isinstance(req.stop, str) else f"stop[{i}]", text)
    if req.seed is not None and not -MAX_SEED - 1 <= req.seed <= MAX_SEED:
        raise bad("seed", f"seed must fit in 64 bits (got {req.seed})")
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    if req.stream_options is not None and not req.stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    return Sampling(max_tokens, max_param, float(temperature), float(top_p), int(top_k), stop, req.seed,
                    bool(req.stream), include_usage)


def check_text(param: str, text: str) -> None:
    """Text the tokenizer can take: UTF-8 encodable (JSON can carry a lone surrogate
    escape, \\ud800, that no Unicode text has)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise bad(param, f"{param} is not valid Unicode: it has a lone surrogate \\u{ord(text[exc.start]):04x} at "
                         f"character {exc.start} (the JSON escapes \\ud800-\\udfff must come in high-low pairs)") \
            from None


def check_message_count(body: dict[str, Any], max_messages: int) -> None:
    """Refuse too many messages before any work is spent on them."""
    messages = body.get("messages")
    if isinstance(messages, list) and len(messages) > max_messages:
        raise bad("messages", f"the request has {len(messages):,} messages; this server takes at most "
                              f"{max_messages:,} per request (serve --max-messages)", code="too_many_messages")


def check_prompt_chars(param: str, chars: int, max_chars: int, note: str = "") -> None:
    """Refuse a prompt of more than `max_chars` characters before tokenizing it."""
    if chars > max_chars:
        what = "the messages have" if param == "messages" else f"the {param} has"
        raise bad(param, f"{what} {chars:,} characters; this server takes at most {max_chars:,}"
                         f"{' (' + note + ')' if note else ''}; shorten it", code="context_length_exceeded")


def chat_messages(req: ChatCompletionRequest, max_chars: int | None = None, note: str = "") -> list[dict[str, str]]:
    """The messages as plain {'role', 'content'} dicts for the chat template; at most
    `max_chars` characters of content in all."""
    if not req.messages:
        raise bad("messages", "messages must not be empty; send at least one {\"role\": \"user\", \"content\": ...}")
    out = []
    chars = 0
    for i, msg in enumerate(req.messages):
        if msg.role not in ROLES:
            raise bad(f"messages[{i}].role", f"unknown role {msg.role!r} in messages[{i}]; use one of "
                                             + ", ".join(ROLES))
        content = msg.content
        if isinstance(content, list):
            texts = []
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad(f"messages[{i}].content[{j}]",
                              f"only text content parts are supported (got type {part.type!r})")
                check_text(f"messages[{i}].content[{j}].text", part.text)
                texts.append(part.text)
            content = "".join(texts)
        elif content is not None:
            check_text(f"messages[{i}].content", content)
        if content is None:
            raise bad(f"messages[{i}].content", f"messages[{i}].content is required")
        chars += len(content)
        out.append({"role": msg.role, "content": content})
    if max_chars is not None:
        check_prompt_chars("messages", chars, max_chars, note)
    if not any(m["content"].strip() for m in out):
        raise bad("messages", "every message is empty; send some text")
    return out


def completion_prompt(req: CompletionRequest, vocab_rows: int, max_chars: int | None = None,
                      note: str = "") -> str | list[int]:
    """The prompt as text (at most `max_chars` characters) or token ids; one prompt per request."""
    if req.echo:
        raise bad("echo", "echo is not supported; leave it out")
    if req.best_of is not None and req.best_of != 1:
        raise bad("best_of", "best_of > 1 is not supported")
    if req.suffix:
        raise bad("suffix", "suffix is not supported")
    prompt = req.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        if len(prompt) != 1:
            raise bad("prompt", f"one prompt per request (got {len(prompt)}); send them as separate requests")
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt.strip():
            raise bad("prompt", "prompt is empty; send some text")
        if max_chars is not None:
            check_prompt_chars("prompt", len(prompt), max_chars, note)
        check_text("prompt", prompt)
        return prompt
    if not prompt:
        raise bad("prompt", "prompt is empty; send some text or token ids")
    bad_ids = [t for t in prompt if not 0 <= t < vocab_rows]
    if bad_ids:
        raise bad("prompt", f"token ids {bad_ids[:4]} are outside the vocabulary [0, {vocab_rows})")
    return list(prompt)


def resolve_max_tokens(sampling: Sampling, prompt_len: int, max_context: int, default: int,
                       prompt_param: str) -> int:
    """The number of tokens to generate; a prompt or a request that does not fit is a 400."""
    if prompt_len >= max_context:
        raise bad(prompt_param, f"the prompt has {prompt_len} tokens but the model's context is {max_context} "
                                "tokens; shorten it", code="context_length_exceeded")
    room = max_context - prompt_len
    if sampling.max_tokens is None:
        return max(1, min(default, room))
    if sampling.max_tokens > room:
        raise bad(sampling.max_tokens_param,
                  f"{sampling.max_tokens_param} is {sampling.max_tokens} but the context is {max_context} tokens "
                  f"and the prompt uses {prompt_len}; ask for at most {room}", code="context_length_exceeded")
    return sampling.max_tokens


# ---------------------------------------------------------------- responses


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
