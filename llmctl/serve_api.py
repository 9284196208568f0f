"""The OpenAI-compatible side of `llmctl serve`: request shapes, their checks, response objects.

Nothing here knows about HTTP: bodies come in as bytes, go out as plain dicts, and every
mistake in a request is an `ApiError` carrying the status and the OpenAI error object
(`{"error": {"message", "type", "param", "code"}}`) that `llmctl.serve_app` sends back.
That keeps the rules — what a request may hold, how messages become token ids, what each
sampling option is checked against — testable without a server.

Choices that differ from OpenAI's, on purpose:
- Defaults are `llmctl generate`'s (temperature 0.8, top_p 0.95), not 1 and 1.
- `max_tokens` defaults to what fits the model's window after the prompt, at most 256;
  asking for more than fits is refused (the window does not slide here, as in `generate`).
- A checkpoint without a chat template (pretrain only, or a transformers model) still
  answers /v1/chat/completions: the message contents, one per line, are continued as plain
  text, exactly as `llmctl generate --prompt` would continue them.
- /v1/completions always feeds the prompt as it is, also to an SFT checkpoint (`generate --raw`).
- Extensions vLLM also accepts: `top_k` and `repetition_penalty`.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from llmctl.errors import ConfigError

DEFAULT_MAX_TOKENS = 256  # the reply length when a request names none (and the window allows it)
MAX_N = 128  # OpenAI's own bound on n; the queue (--max-waiting) usually binds first
MAX_STOPS = 16
MAX_SEED = 2**62  # seeds of the n choices are seed .. seed + n - 1


class ApiError(Exception):
    """A request that cannot be served; becomes `status` and OpenAI's error object."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


# --------------------------------------------------------------------------- request shapes

class _Shape(BaseModel):
    # strict: "0.5" is not a temperature and true is not an n; extra keys (user, metadata...)
    # are ignored as OpenAI's own optional fields that change nothing here.
    model_config = ConfigDict(extra="ignore", strict=True)


class ContentPart(_Shape):
    type: str
    text: str | None = None


class Message(_Shape):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Shape):
    include_usage: bool = False


class _Common(_Shape):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, Any] | None = None


class ChatRequest(_Common):
    messages: list[Message]
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(_Common):
    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None


UNION_BRANCHES = {"str", "list[str]", "list[ContentPart]"}  # how pydantic names the branches in an error path
# How a field of two shapes is described when a value fits neither (pydantic names its branches).
EXPECTED = {
    "content": 'a string or a list of {"type": "text", "text": ...} parts',
    "stop": "a string or a list of strings",
    "prompt": "a string or a list of one string",
}


def parse(shape: type[_Shape], body: bytes) -> Any:
    """The request object, or a 400 naming the first field at fault."""
    try:
        return shape.model_validate_json(body or b"")
    except ValidationError as e:
        raise _validation_error(e) from None


def _validation_error(e: ValidationError) -> ApiError:
    errors = e.errors()
    first = errors[0]
    if first["type"] == "json_invalid":
        return bad(f"the request body is not valid JSON ({first['msg'].removeprefix('Invalid JSON: ')})")
    if not first["loc"]:
        return bad("the request body must be a JSON object")
    # A value that fits no branch of a union (content, stop, prompt) is reported once per
    # branch, the branch's name last in its path: the field is the path before it.
    loc = list(first["loc"])
    union = loc[-1] in UNION_BRANCHES
    if union:
        loc = loc[:-1]
    param = _param(loc)
    field = next((part for part in reversed(loc) if isinstance(part, str)), "")
    if first["type"] == "missing":
        return bad(f"{param} is required", param)
    if union and field in EXPECTED:
        return bad(f"{param} must be {EXPECTED[field]}", param)
    return bad(f"{param}: {first['msg'][:1].lower()}{first['msg'][1:]}", param)


def _param(loc: list) -> str:
    """('messages', 0, 'content') -> 'messages[0].content', as OpenAI names params."""
    text = ""
    for part in loc:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


# --------------------------------------------------------------------------- what to generate

@dataclass(frozen=True)
class ModelCard:
    """What the request checks need to know about the served model."""

    id: str
    context_length: int
    has_template: bool
    max_waiting: int  # the queue bound: n choices must fit in it at once


def check_model(requested: str | None, card: ModelCard) -> None:
    """A missing model name means the one served (handy with curl); another name is a 404, as OpenAI does."""
    if requested not in (None, "", card.id):
        raise ApiError(404, f"the model {requested!r} does not exist; this server serves {card.id!r} "
                            f"(GET /v1/models)", param="model", code="model_not_found")


def message_list(messages: list[Message]) -> list[tuple[str, str]]:
    """[(role, content)] with roles system/user/assistant; "developer" is OpenAI's new name for system."""
    if not messages:
        raise bad("messages must hold at least one message", "messages")
    out = []
    for i, message in enumerate(messages):
        role = "system" if message.role == "developer" else message.role
        if role not in ("system", "user", "assistant"):
            raise bad(f"messages[{i}].role {message.role!r} is not supported; use system, user or assistant",
                      f"messages[{i}].role")
        content = message.content
        if isinstance(content, list):
            for j, part in enumerate(content):
                if part.type != "text" or part.text is None:
                    raise bad(f"messages[{i}].content[{j}]: only text parts are supported, got type {part.type!r}",
                              f"messages[{i}].content[{j}]")
            content = "".join(part.text for part in content)
        out.append((role, content or ""))
    return out


def completion_prompt(prompt: str | list[str]) -> str:
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise bad(f"prompt must be a string or a list of one string (batches: send one request each), "
                      f"got a list of {len(prompt)}", "prompt")
        prompt = prompt[0]
    if not prompt:
        raise bad("prompt is empty; give some text to continue", "prompt")
    return prompt


def unsupported(request: _Common) -> None:
    """Options whose effect cannot be given are refused rather than silently ignored."""
    if request.presence_penalty or request.frequency_penalty:
        param = "presence_penalty" if request.presence_penalty else "frequency_penalty"
        raise bad(f"{param} is not supported; use repetition_penalty (above 1 discourages repeats)", param)
    if request.logit_bias:
        raise bad("logit_bias is not supported", "logit_bias")
    if isinstance(request, ChatRequest):
        if request.logprobs or request.top_logprobs:
            raise bad("logprobs is not supported", "logprobs")
        if request.tools or request.functions:
            raise bad("tools and functions are not supported", "tools")
        if request.response_format and request.response_format.get("type", "text") != "text":
            raise bad("response_format: only {\"type\": \"text\"} is supported", "response_format")
    if isinstance(request, CompletionRequest):
        if request.echo:
            raise bad("echo is not supported", "echo")
        if request.suffix:
            raise bad("suffix is not supported", "suffix")
        if request.best_of not in (None, 1):
            raise bad("best_of is not supported; use n", "best_of")
        if request.logprobs:
            raise bad("logprobs is not supported", "logprobs")


def choice_count(request: _Common, card: ModelCard) -> int:
    n = 1 if request.n is None else request.n
    limit = min(MAX_N, card.max_waiting)
    if not 1 <= n <= limit:
        why = f" (this server queues at most {card.max_waiting} at once: --max-waiting)" if limit < MAX_N else ""
        raise bad(f"n must be between 1 and {limit}{why}, got {n}", "n")
    return n


def max_tokens(request: _Common, prompt_tokens: int, card: ModelCard, prompt_param: str) -> int:
    """The reply length: asked for, or what fits (at most DEFAULT_MAX_TOKENS)."""
    room = card.context_length - prompt_tokens
    if room < 1:
        raise bad(f"the prompt is {prompt_tokens} tokens and this model's context window is {card.context_length} "
                  f"tokens, which leaves no room for a reply; shorten it", prompt_param, "context_length_exceeded")
    asked = getattr(request, "max_completion_tokens", None)
    param = "max_completion_tokens" if asked is not None else "max_tokens"
    asked = asked if asked is not None else request.max_tokens
    if asked is None:
        return min(DEFAULT_MAX_TOKENS, room)
    if asked < 1:
        raise bad(f"{param} must be >= 1, got {asked}", param)
    if asked > room:
        raise bad(f"{param}={asked} does not fit: the prompt is {prompt_tokens} tokens and this model's context "
                  f"window is {card.context_length}, so at most {room} new tokens", param, "context_length_exceeded")
    return asked


def sampling_options(request: _Common, new_tokens: int, n: int) -> list[Any]:
    """One `generate.Sampling` per choice; with a seed, choice i uses seed + i (as `generate -n`)."""
    from llmctl.generate import Sampling

    for name in ("temperature", "top_p", "repetition_penalty"):
        value = getattr(request, name)
        if value is not None and not math.isfinite(value):
            raise bad(f"{name} must be a finite number, got {value}", name)
    if request.temperature is not None and request.temperature < 0:
        raise bad(f"temperature must be >= 0 (0 = greedy), got {request.temperature}", "temperature")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise bad(f"top_p must be in (0, 1] (1 = off), got {request.top_p}", "top_p")
    if request.top_k is not None and request.top_k < 0:
        raise bad(f"top_k must be >= 0 (0 = off), got {request.top_k}", "top_k")
    if request.repetition_penalty is not None and request.repetition_penalty <= 0:
        raise bad(f"repetition_penalty must be > 0 (1 = off), got {request.repetition_penalty}", "repetition_penalty")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    if len(stop) > MAX_STOPS or not all(stop):
        raise bad(f"stop must be at most {MAX_STOPS} non-empty strings", "stop")
    if request.seed is not None and not 0 <= request.seed < MAX_SEED:
        raise bad(f"seed must be between 0 and {MAX_SEED - 1}, got {request.seed}", "seed")
    given = {name: getattr(request, name) for name in ("temperature", "top_p", "top_k", "repetition_penalty")
             if getattr(request, name) is not None}
    try:
        return [Sampling(max_new_tokens=new_tokens, stop=tuple(stop), **given,
                         seed=None if request.seed is None else request.seed + i) for i in range(n)]
    except ConfigError as e:  # any rule of Sampling's not mirrored above
        raise bad(str(e)) from None


# --------------------------------------------------------------------------- responses

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def finish(reason: str | None) -> str:
    """OpenAI knows stop and length; a stream cut short by shutdown ends as stop."""
    return "length" if reason == "length" else "stop"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def chat_response(rid: str, created: int, model: str, choices: list[tuple[str, str | None]],
                  counts: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None,
                         "finish_reason": finish(reason)} for i, (text, reason) in enumerate(choices)],
            "usage": counts}


def completion_response(rid: str, created: int, model: str, choices: list[tuple[str, str | None]],
                        counts: dict[str, int]) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": i, "text": text, "logprobs": None, "finish_reason": finish(reason)}
                        for i, (text, reason) in enumerate(choices)],
            "usage": counts}


def chat_chunk(rid: str, created: int, model: str, index: int, delta: dict[str, str],
               reason: str | None = None, done: bool = False) -> dict[str, Any]:
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": None,
                         "finish_reason": finish(reason) if done else None}]}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     reason: str | None = None, done: bool = False) -> dict[str, Any]:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None,
                         "finish_reason": finish(reason) if done else None}]}


def usage_chunk(rid: str, created: int, model: str, kind: str, counts: dict[str, int]) -> dict[str, Any]:
    """stream_options.include_usage: a last chunk with no choices and the usage."""
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [], "usage": counts}


def sse(obj: dict[str, Any] | str) -> str:
    """One server-sent event; `[DONE]` ends an OpenAI stream."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"
