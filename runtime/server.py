"""`qwen2-onnx serve`: OpenAI's API over one artifact, its requests batched continuously (runtime/batcher.py).

    GET  /health                liveness
    GET  /metrics               the batcher's counters, in Prometheus' text format
    GET  /v1/models             the served model
    POST /v1/chat/completions   chat (the checkpoint's template), streaming, tools (Qwen2.5's <tool_call>)
    POST /v1/completions        text or token ids in

Starlette and uvicorn (the `serve` extra): the ASGI core FastAPI and vLLM's server are built on, and
enough here, since bodies are checked by runtime/openai_api.py to give OpenAI's error objects. The
graph runs in an engine process of its own (runtime/engine.py); this process renders, tokenizes and
streams, and each request hears its tokens through an asyncio queue. Bad requests get 400 (401
without the key, 404 for another model, 413 past the body cap), never a traceback; an unexpected
failure is logged and answered 500 with a plain message, and /health answers 503 once the engine has
failed. On SIGTERM uvicorn stops taking connections and gives open requests SHUTDOWN_GRACE_S to
finish; then the engine cancels the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import sys
import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, AsyncIterator

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import openai_api as api
from .api import ModelText
from .batcher import FAILED, BatchRequest, BatcherStats, TokenSink
from .engine import Engine, EngineProcess, EngineSpec
from .errors import RuntimeInputError
from .reply import Delta, ReplyText

log = logging.getLogger("qwen2_onnx.serve")
MAX_BODY_BYTES = 4 << 20
SHUTDOWN_GRACE_S = 30
FINISH_REASONS = {"stop_token": "stop", "length": "length", "cancelled": "stop"}


@dataclass(frozen=True)
class ServeConfig:
    served_model_name: str
    api_key: str | None = None
    max_body_bytes: int = MAX_BODY_BYTES


@dataclass
class Prepared:
    """A request ready for the batcher: its prompt ids and how its reply text is read."""

    ids: list[int]
    max_tokens: int
    batch_request_options: dict[str, Any]
    reply: ReplyText


class Relay:
    """Hands the engine's tokens (called from its thread) to the event loop with one wake-up per burst (a
    step's tokens for every stream) instead of one per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.lock = loop, threading.Lock()
        self.pending: list[tuple[asyncio.Queue, tuple[int | None, str | None]]] = []

    def sink(self, queue: asyncio.Queue) -> TokenSink:
        def put(token: int | None, reason: str | None) -> None:
            with self.lock:
                self.pending.append((queue, (token, reason)))
                first = len(self.pending) == 1
            if first:
                self.loop.call_soon_threadsafe(self.flush)
        return put

    def flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


class Running:
    """One request in the batcher, heard from the event loop: `events` yields (token, finish reason) pairs."""

    def __init__(self, engine: Engine, relay: Relay, prepared: Prepared):
        self.queue: asyncio.Queue[tuple[int | None, str | None]] = asyncio.Queue()
        self.request = BatchRequest(prepared.ids, max_new_tokens=prepared.max_tokens, sink=relay.sink(self.queue),
                                    **prepared.batch_request_options)
        self.engine = engine
        engine.submit(self.request)
        self.reply, self.completion_tokens, self.finish_reason, self.tail = prepared.reply, 0, "stop", Delta()

    async def deltas(self) -> AsyncIterator[list[Delta]]:
        """What each token made final, one delta per token, in batches: what had arrived when the stream
        was ready to send again (one token while it keeps up, several when it lags, so a busy server
        writes once for them). Afterwards `tail` (what the end released), `finish_reason` and
        `completion_tokens`."""
        try:
            ended = False
            while not ended:
                batch, item = [], await self.queue.get()
                while item is not None:
                    token, reason = item
                    if reason == FAILED:
                        raise RuntimeError("the batcher failed under this request; see the server's log")
                    if token is None:
                        self.finish_reason, ended = FINISH_REASONS[reason], True
                        break
                    self.completion_tokens += 1
                    batch.append(self.reply.push(token))
                    if self.reply.stopped:  # a stop string: the batcher may stop this row
                        self.finish_reason, ended = "stop", True
                        break
                    item = None if self.queue.empty() else self.queue.get_nowait()
                if batch:
                    yield batch
            self.tail = self.reply.finish()
        finally:
            self.engine.cancel(self.request)  # a client gone mid-stream frees its row at the next step
        if self.reply.calls:
            self.finish_reason = "tool_calls"


def error_response(error: api.ApiError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def build_app(model: ModelText, engine: Engine, config: ServeConfig) -> Starlette:
    relays: list[Relay] = []  # the one for the running event loop, made at startup
    def check_key(request: Request) -> None:
        if config.api_key is not None:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {config.api_key}".encode()):
                raise api.ApiError("missing or wrong API key (Authorization: Bearer KEY)", None, 401, "AuthenticationError")

    async def read_body(request: Request) -> dict[str, Any]:
        check_key(request)
        size, chunks = 0, []
        async for chunk in request.stream():
            size += len(chunk)
            if size > config.max_body_bytes:
                raise api.ApiError(f"the request body is larger than {config.max_body_bytes:,} bytes", None, 413)
            chunks.append(chunk)
        return api.parse_json_object(b"".join(chunks))

    def handled(handler):
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except api.ApiError as error:
                return error_response(error)
            except RuntimeInputError as error:  # a prompt past the context, a template that failed, ...
                return error_response(api.ApiError(str(error)))
            except Exception:  # never a traceback in a response
                log.exception("request failed")
                return error_response(api.ApiError("the server failed on this request; see its log", None, 500,
                                                   "InternalServerError"))
        return endpoint

    async def health(request: Request) -> Response:
        return Response(status_code=503 if engine.ended else 200)

    async def metrics(request: Request) -> Response:
        return Response(metrics_text(*engine.load()), media_type="text/plain; version=0.0.4")

    async def models(request: Request) -> Response:
        check_key(request)
        return JSONResponse({"object": "list", "data": [{
            "id": config.served_model_name, "object": "model", "created": 0, "owned_by": "qwen2-onnx",
            "max_model_len": engine.capacity}]})

    async def chat(request: Request) -> Response:
        parsed = api.parse_chat(await read_body(request), config.served_model_name)
        prepared = await run_in_threadpool(prepare_chat, model, engine.capacity, parsed)
        return await respond(parsed, prepared, "chat.completion")

    async def completions(request: Request) -> Response:
        parsed = api.parse_completion(await read_body(request), config.served_model_name)
        prepared = await run_in_threadpool(prepare_completion, model, engine.capacity, parsed)
        return await respond(parsed, prepared, "text_completion")

    async def respond(parsed, prepared: Prepared, kind: str) -> Response:
        generation = Running(engine, relays[-1], prepared)
        name, request_id = config.served_model_name, api.new_id("chatcmpl" if kind == "chat.completion" else "cmpl")
        prompt_tokens = len(prepared.ids)
        if not parsed.stream:
            async for _ in generation.deltas():
                pass
            counts = api.usage(prompt_tokens, generation.completion_tokens)
            reply = generation.reply
            if kind == "text_completion":
                return JSONResponse(api.completion_response(request_id, name, reply.content, generation.finish_reason, counts))
            calls = [api.tool_call_object(i, n, a) for i, (n, a) in enumerate(reply.calls)]
            content = reply.content if reply.content or not calls else None
            return JSONResponse(api.chat_response(request_id, name, content, calls, generation.finish_reason, counts))
        return StreamingResponse(events(parsed, generation, kind, request_id, prompt_tokens),
                                 media_type="text/event-stream")

    async def events(parsed, generation: Running, kind: str, request_id: str, prompt_tokens: int) -> AsyncIterator[str]:
        name, chat_kind = config.served_model_name, kind == "chat.completion"
        if chat_kind:
            yield sse(api.chat_chunk(request_id, name, {"role": "assistant", "content": ""}))
        def call_events(made: list[tuple[str, str]], first: int) -> list[str]:
            return [sse(api.chat_chunk(request_id, name, {"tool_calls": [api.tool_call_object(first + i, *call)]}))
                    for i, call in enumerate(made)]

        calls = 0
        async for batch in generation.deltas():  # an event per token, its text empty while nothing became final
            written = []
            for delta in batch:
                if not chat_kind:
                    written.append(sse(api.completion_response(request_id, name, delta.content, None, None, stream=True)))
                    continue
                if delta.content or not delta.tool_calls:
                    written.append(sse(api.chat_chunk(request_id, name, {"content": delta.content})))
                written += call_events(delta.tool_calls, calls)
                calls += len(delta.tool_calls)
            yield "".join(written)  # one write for the batch
        tail = generation.tail  # the last event carries what the end released
        if chat_kind:
            for event in call_events(tail.tool_calls, calls):
                yield event
            yield sse(api.chat_chunk(request_id, name, {"content": tail.content} if tail.content else {},
                                     generation.finish_reason))
        else:
            yield sse(api.completion_response(request_id, name, tail.content, generation.finish_reason, None, stream=True))
        if parsed.include_usage:
            chunk_kind = "chat.completion.chunk" if chat_kind else "text_completion"
            yield sse(api.usage_chunk(request_id, name, chunk_kind, api.usage(prompt_tokens, generation.completion_tokens)))
        yield "data: [DONE]\n\n"

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        relays.append(Relay(asyncio.get_running_loop()))
        yield
        engine.stop()  # after uvicorn's grace period: what still runs is cancelled

    return Starlette(routes=[
        Route("/health", handled(health), methods=["GET"]),
        Route("/metrics", handled(metrics), methods=["GET"]),
        Route("/v1/models", handled(models), methods=["GET"]),
        Route("/v1/chat/completions", handled(chat), methods=["POST"]),
        Route("/v1/completions", handled(completions), methods=["POST"]),
    ], lifespan=lifespan)


def metrics_text(stats: BatcherStats, running: int, waiting: int) -> str:
    """Prometheus' text format: a counter per BatcherStats field (qwen2_onnx_FIELD_total) and two gauges."""
    lines = []
    for name, kind, value in [*((f"{field}_total", "counter", value) for field, value in asdict(stats).items()),
                              ("requests_running", "gauge", running), ("requests_waiting", "gauge", waiting)]:
        lines += [f"# TYPE qwen2_onnx_{name} {kind}", f"qwen2_onnx_{name} {value}"]
    return "\n".join(lines) + "\n"


def sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def prepare_chat(model: ModelText, capacity: int, request: api.ChatRequest) -> Prepared:
    """Render the messages with the chat template (tools unless tool_choice is none; a named choice opens
    that call in the prompt), tokenize, and fix the sampling and the token budget."""
    if model.chat_template is None:
        raise api.ApiError("this model has no chat template; use /v1/completions", "messages")
    tools = request.tools if request.tool_choice.mode != "none" else None
    text = model.chat_template.render(request.messages, tools=tools, add_generation_prompt=True)
    prefix = ""
    if request.tool_choice.mode == "named":
        prefix = f'<tool_call>\n{{"name": {json.dumps(request.tool_choice.name)}, "arguments": '
    ids = model.tokenizer.encode(model.fitting(text + prefix), add_special_tokens=False)
    reply = ReplyText(model.tokenizer, request.stop, tools=tools is not None, prefix=prefix)
    return prepared(model, capacity, ids, request, reply, "messages")


def prepare_completion(model: ModelText, capacity: int, request: api.CompletionRequest) -> Prepared:
    ids = model.encode(request.prompt)
    return prepared(model, capacity, ids, request, ReplyText(model.tokenizer, request.stop), "prompt")


def prepared(model: ModelText, capacity: int, ids: list[int], request: api.ChatRequest | api.CompletionRequest,
             reply: ReplyText, prompt_param: str) -> Prepared:
    """The token budget (what is left of a row when max_tokens is not given), sampling and stop tokens."""
    max_tokens, room = request.max_tokens, capacity - len(ids)
    if room < 1 or (max_tokens or 0) > room:
        raise api.ApiError(f"This model's maximum context length is {capacity} tokens. However, you requested "
                           f"{len(ids) + (max_tokens or 1)} tokens ({len(ids)} in the {prompt_param}, {max_tokens or 1} "
                           "for the completion). Please reduce the length of the messages or completion.",
                           prompt_param if room < 1 else "max_tokens")
    stop_ids = () if request.ignore_eos else model.manifest.tokenizer.stop_token_ids
    return Prepared(ids, max_tokens or room, {"sampling": model.sampling(**request.sampling.options()),
                                              "stop_token_ids": stop_ids}, reply)


def serve(model: ModelText, spec: EngineSpec, host: str, port: int, config: ServeConfig) -> None:
    """Start the engine process (it loads the graph), then run the server until SIGTERM or Ctrl-C."""
    import uvicorn

    began = time.perf_counter()
    engine = EngineProcess(spec, model.manifest)
    # the warm-up runs every padded prefill shape on CUDA (tens of seconds for a 7B graph): say what it was
    print(f"engine ready in {time.perf_counter() - began:.1f} s: graph loaded, prefill shapes and decode batch sizes "
          "warmed up", file=sys.stderr, flush=True)
    app = build_app(model, engine, config)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
