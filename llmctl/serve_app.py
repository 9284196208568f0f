"""The web application of `llmctl serve`: FastAPI routes over one `BatchGenerator`.

Routes: `GET /` (the chat page, `llmctl/web/chat.html`), `GET /health`, and the OpenAI
ones under /v1 — `GET /v1/models`, `POST /v1/chat/completions`, `POST /v1/completions`,
streamed as server-sent events with `"stream": true`. Every request becomes one engine
`Stream` per choice; the engine batches them, so nothing here runs the model or blocks the
event loop. A client that goes away cancels its streams at once (a watcher polls the
connection, so a non-streaming request or a stream still in the queue is freed too).

Every failure is OpenAI's error object with a 4xx status; an unexpected exception is a 500
whose body names no internals (the traceback goes to the server's stderr).
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llmctl import serve_api as api
from llmctl.errors import ConfigError

MAX_BODY = 1 << 20  # bytes; a chat far past any small model's window still fits
RETRY_AFTER_S = 1  # what a 429 asks the client to wait: a slot frees as soon as any reply ends
DISCONNECT_POLL_S = 0.2
# The page is self-contained: nothing it loads or talks to may come from another origin.
PAGE_POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'")


def chat_page() -> str:
    return resources.files("llmctl").joinpath("web/chat.html").read_text(encoding="utf-8")


def create_app(loaded: Any, engine: Any, model_id: str, *, api_key: str | None = None,
               max_waiting: int = 64) -> FastAPI:
    """The app for one loaded model and its engine (already started)."""
    from llmctl.data.chat_template import ChatTemplate

    card = api.ModelCard(model_id, loaded.context_length, bool(loaded.template), max_waiting)
    template = ChatTemplate.from_state(loaded.template) if loaded.template else None
    tokenizer = loaded.tokenizer
    created = api.now()
    page = chat_page()
    # How the replies served so far ended, for /health: "cancelled" counts clients that left.
    finished = {reason: 0 for reason in ("stop", "length", "cancelled", "error")}
    tallies: set[asyncio.Task] = set()  # held, so the event loop does not drop them unfinished

    async def tally(stream: Any) -> None:
        try:
            async for _ in stream:
                pass
        except Exception:  # noqa: BLE001 (the request that read it has reported the failure)
            pass
        finished[stream.finish_reason if stream.finish_reason in finished else "error"] += 1
    app = FastAPI(title="llmctl serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(api.ApiError)
    async def api_error(_: Request, e: api.ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, e: StarletteHTTPException) -> JSONResponse:
        # An unknown path or a wrong method: OpenAI's error shape, not FastAPI's {"detail": ...}.
        message = {404: "no such route; see GET /v1/models, POST /v1/chat/completions, POST /v1/completions",
                   405: "method not allowed on this route"}.get(e.status_code, str(e.detail))
        return JSONResponse(api.ApiError(e.status_code, message).body(), status_code=e.status_code,
                            headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def server_error(_: Request, e: Exception) -> JSONResponse:
        # The client learns no internals; uvicorn writes the traceback to the server's stderr.
        return JSONResponse(api.ApiError(500, f"internal error ({type(e).__name__}); the server's log has the "
                                              f"details", kind="server_error").body(), status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken says nothing about how much of the key was right.
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
            raise api.ApiError(401, "missing or wrong API key; send the header 'Authorization: Bearer KEY' "
                                    "with the key the server was started with", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})

    @app.get("/", include_in_schema=False)
    async def index() -> HTMLResponse:
        return HTMLResponse(page, headers={"Content-Security-Policy": PAGE_POLICY, "Cache-Control": "no-store"})

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_id, "active": engine.active, "waiting": engine.waiting,
                "finished": dict(finished)}

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(authorize)])

    def model_object() -> dict[str, Any]:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "llmctl",
                "context_length": card.context_length, "chat_template": card.has_template}

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [model_object()]}

    @v1.get("/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        api.check_model(name, card)
        return model_object()

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = api.parse(api.ChatRequest, await read_body(request))
        api.check_model(req.model, card)
        api.unsupported(req)
        messages = api.message_list(req.messages)
        if template is not None:
            from llmctl.data.chat_template import prompt_ids

            ids = prompt_ids(messages, template, tokenizer)
        else:  # no chat template: the contents are continued as plain text (see serve_api)
            ids = tokenizer.encode("\n".join(content for _, content in messages))
        if not ids:
            raise api.bad("the messages encode to no tokens; give some text", "messages")
        streams = submit(req, ids, "messages", template)
        rid, when = api.new_id("chatcmpl"), api.now()
        if req.stream:
            def first(i: int) -> dict[str, Any]:
                return api.chat_chunk(rid, when, model_id, i, {"role": "assistant", "content": ""})

            def delta(i: int, text: str) -> dict[str, Any]:
                return api.chat_chunk(rid, when, model_id, i, {"content": text})

            def last(i: int, reason: str | None) -> dict[str, Any]:
                return api.chat_chunk(rid, when, model_id, i, {}, reason, done=True)

            return event_stream(request, streams, req, first, delta, last,
                                lambda counts: api.usage_chunk(rid, when, model_id, "chat.completion.chunk", counts))
        texts = await collect(request, streams)
        return JSONResponse(api.chat_response(rid, when, model_id, list(zip(texts, reasons(streams))),
                                              usage_of(streams)))

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        req = api.parse(api.CompletionRequest, await read_body(request))
        api.check_model(req.model, card)
        api.unsupported(req)
        ids = tokenizer.encode(api.completion_prompt(req.prompt))
        if not ids:
            raise api.bad("the prompt encodes to no tokens; give some text to continue", "prompt")
        streams = submit(req, ids, "prompt", None)
        rid, when = api.new_id("cmpl"), api.now()
        if req.stream:
            return event_stream(
                request, streams, req, None,
                lambda i, text: api.completion_chunk(rid, when, model_id, i, text),
                lambda i, reason: api.completion_chunk(rid, when, model_id, i, "", reason, done=True),
                lambda counts: api.usage_chunk(rid, when, model_id, "text_completion", counts))
        texts = await collect(request, streams)
        return JSONResponse(api.completion_response(rid, when, model_id, list(zip(texts, reasons(streams))),
                                                    usage_of(streams)))

    def submit(req: Any, ids: list[int], prompt_param: str, chat_template: Any) -> list[Any]:
        """One engine stream per choice, all or none: a full queue is a 429 and frees what was taken."""
        from llmctl.batching import QueueFull

        n = api.choice_count(req, card)
        options = api.sampling_options(req, api.max_tokens(req, len(ids), card, prompt_param), n)
        streams: list[Any] = []
        try:
            for sampling in options:
                streams.append(engine.submit(ids, sampling, template=chat_template))
        except QueueFull:
            cancel(streams)
            raise api.ApiError(429, f"the server is busy: {engine.active} replies are being written and "
                                    f"{engine.waiting} wait; retry in a moment", kind="requests",
                               code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ConfigError as e:  # the engine's own checks (a prompt past the window, ...)
            cancel(streams)
            raise api.bad(str(e), prompt_param) from None
        for stream in streams:
            task = asyncio.create_task(tally(stream))
            tallies.add(task)
            task.add_done_callback(tallies.discard)
        return streams

    app.include_router(v1)
    return app


async def read_body(request: Request) -> bytes:
    """The body, refused with a 413 past MAX_BODY before it is all read."""
    too_big = api.ApiError(413, f"the request body is larger than {MAX_BODY // 1024} KiB", code="request_too_large")
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY:
        raise too_big
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY:
            raise too_big
        chunks.append(chunk)
    return b"".join(chunks)


def cancel(streams: list[Any]) -> None:
    for stream in streams:
        stream.cancel()


def reasons(streams: list[Any]) -> list[str | None]:
    return [stream.finish_reason for stream in streams]


def usage_of(streams: list[Any]) -> dict[str, int]:
    """The prompt counts once for all n choices, as OpenAI counts it."""
    return api.usage(streams[0].prompt_tokens, sum(stream.completion_tokens for stream in streams))


async def watch_disconnect(request: Request, streams: list[Any]) -> None:
    """Cancel the streams the moment the client is gone: their batch slots go to others."""
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)
    cancel(streams)


async def collect(request: Request, streams: list[Any]) -> list[str]:
    """The whole text of each stream (a non-streaming reply), cancelled if the client leaves."""
    async def text(stream: Any) -> str:
        return "".join([delta async for delta in stream])

    watcher = asyncio.create_task(watch_disconnect(request, streams))
    try:
        return list(await asyncio.gather(*(text(stream) for stream in streams)))
    finally:
        watcher.cancel()
        cancel(streams)  # a no-op for finished streams; frees the rest if this task was cancelled


def event_stream(request: Request, streams: list[Any], req: Any, first: Any, delta: Any, last: Any,
                 usage_chunk: Any) -> StreamingResponse:
    """The n streams merged into one OpenAI server-sent event stream, ending with `data: [DONE]`."""
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    async def events() -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, stream: Any) -> None:
            try:
                async for text in stream:
                    if text:
                        await queue.put((i, text))
            except Exception as e:  # the engine failed: said in the stream, which has sent its 200 already
                await queue.put((i, e))
            finally:
                await queue.put((i, None))  # this choice is done

        watcher = asyncio.create_task(watch_disconnect(request, streams))
        pumps = [asyncio.create_task(pump(i, stream)) for i, stream in enumerate(streams)]
        try:
            if first is not None:
                for i in range(len(streams)):
                    yield api.sse(first(i))
            open_streams = len(streams)
            while open_streams:
                i, text = await queue.get()
                if text is None:
                    open_streams -= 1
                    yield api.sse(last(i, streams[i].finish_reason))
                elif isinstance(text, Exception):
                    yield api.sse(api.ApiError(500, f"generation failed ({type(text).__name__}); the server's "
                                                    f"log has the details", kind="server_error").body())
                    raise text  # to the server's log; the client sees the stream end without [DONE]
                else:
                    yield api.sse(delta(i, text))
            if include_usage:
                yield api.sse(usage_chunk(usage_of(streams)))
            yield api.sse("[DONE]")
        finally:  # also when the response is cancelled because the client left
            watcher.cancel()
            cancel(streams)
            for task in pumps:
                task.cancel()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
