"""OpenAI's API as vLLM serves it: request bodies checked and turned into typed requests, and the response
objects built from results. Pure functions, no web framework (runtime/server.py routes them).

A field of the wrong type or out of range, or a feature this server does not have (n > 1, logprobs,
presence and frequency penalties) is an ApiError, which the server answers with status 400 and OpenAI's
error object; fields it does not know are ignored, as OpenAI's and vLLM's servers do.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any


class ApiError(Exception):
    """An error answered with OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, message: str, param: str | None = None, status: int = 400, kind: str = "BadRequestError"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.status}}


ROLES = ("system", "user", "assistant", "tool")
MAX_STOP_STRINGS = 4


@dataclass(frozen=True)
class Sampling:
    """The request's sampling fields (None: the artifact's generation_config.json default)."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None

    def options(self) -> dict[str, Any]:
        """Model.sampling's options: temperature 0 is greedy and any other samples, as OpenAI defines it and
        vLLM does (whatever do_sample generation_config.json holds)."""
        options = {key: value for key, value in self.__dict__.items() if value is not None and key != "temperature"}
        if self.temperature == 0:
            options["do_sample"] = False
        elif self.temperature is not None:
            options["temperature"], options["do_sample"] = self.temperature, True
        if self.top_k == -1:  # vLLM's "off"
            options["top_k"] = 0
        return options


@dataclass(frozen=True)
class ToolChoice:
    mode: str  # "auto", "none" or "named"
    name: str | None = None


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool
    tools: list[dict[str, Any]] | None
    tool_choice: ToolChoice


@dataclass(frozen=True)
class CompletionRequest:
    prompt: str | list[int]
    max_tokens: int
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool  # vLLM's extra: run to max_tokens through stop tokens (benchmarks)


def parse_json_object(body: bytes) -> dict[str, Any]:
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(f"the request body is not valid JSON ({error})") from error
    if not isinstance(value, dict):
        raise ApiError(f"the request body must be a JSON object, not a JSON {type(value).__name__}")
    return value


TYPE_NAMES = {str: "a string", int: "an integer", float: "a finite number", bool: "a boolean", list: "an array",
              dict: "an object"}


def field(body: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    """body[name] when present and not null, of type `kind` (float: any finite number; a boolean is no number)."""
    value = body.get(name)
    if value is None:
        return default
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    else:
        ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        raise ApiError(f"'{name}' must be {TYPE_NAMES[kind]}, not {json.dumps(value)[:80]}", name)
    return value


def in_range(name: str, value: float | int | None, low: float, high: float, low_open: bool = False) -> None:
    """Refuse `value` (when given) outside [low, high], or (low, high] with `low_open`."""
    if value is None:
        return
    above_low = low < value if low_open else low <= value
    if not (above_low and value <= high):
        bound = f"({low}" if low_open else f"[{low}"
        raise ApiError(f"'{name}' is {value}; it must lie in {bound}, {high}]", name)


def parse_sampling(body: dict[str, Any]) -> Sampling:
    sampling = Sampling(
        temperature=field(body, "temperature", float), top_p=field(body, "top_p", float),
        top_k=field(body, "top_k", int), min_p=field(body, "min_p", float),
        repetition_penalty=field(body, "repetition_penalty", float), seed=field(body, "seed", int))
    in_range("temperature", sampling.temperature, 0, 2)
    in_range("top_p", sampling.top_p, 0, 1, low_open=True)
    in_range("min_p", sampling.min_p, 0, 1)
    in_range("repetition_penalty", sampling.repetition_penalty, 0, 100, low_open=True)
    if sampling.top_k is not None and sampling.top_k < -1:
        raise ApiError(f"'top_k' is {sampling.top_k}; it must be -1 or 0 (off) or a positive count", "top_k")
    if sampling.seed is not None and not 0 <= sampling.seed < 2**63:
        raise ApiError(f"'seed' is {sampling.seed}; it must lie in [0, 2**63)", "seed")
    for name in ("presence_penalty", "frequency_penalty"):
        if field(body, name, float, 0) != 0:
            raise ApiError(f"'{name}' is not supported by this server (use 'repetition_penalty')", name)
    if field(body, "n", int, 1) != 1:
        raise ApiError("'n' must be 1: this server returns one choice per request", "n")
    if field(body, "logprobs", bool, False) or body.get("top_logprobs"):
        raise ApiError("'logprobs' is not supported by this server", "logprobs")
    return sampling


def parse_stop(body: dict[str, Any]) -> tuple[str, ...]:
    stop = body.get("stop") or []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP_STRINGS or not all(isinstance(item, str) and item for item in stop):
        raise ApiError(f"'stop' must be a string or up to {MAX_STOP_STRINGS} non-empty strings", "stop")
    return tuple(stop)


def parse_stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = field(body, "stream", bool, False)
    options = field(body, "stream_options", dict, {})
    include_usage = options.get("include_usage", False)
    if not isinstance(include_usage, bool):
        raise ApiError("'stream_options.include_usage' must be a boolean", "stream_options")
    if options and not stream:
        raise ApiError("'stream_options' is only allowed with 'stream': true", "stream_options")
    return stream, include_usage


def parse_max_tokens(body: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = field(body, name, int)
        if value is not None:
            if value < 1:
                raise ApiError(f"'{name}' is {value}; it must be at least 1", name)
            return value
    return None


def check_model(body: dict[str, Any], served: str) -> None:
    model = field(body, "model", str)
    if model is None:
        raise ApiError("'model' is required", "model")
    if model != served:
        raise ApiError(f"The model `{model}` does not exist; this server serves `{served}`", "model", 404, "NotFoundError")


def parse_message(index: int, message: Any) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise ApiError(f"'{where}' must be an object", "messages")
    role = message.get("role")
    if role not in ROLES:
        raise ApiError(f"'{where}.role' is {json.dumps(role)}; it must be one of {list(ROLES)}", "messages")
    content = message.get("content")
    if isinstance(content, list):  # content parts: text only
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise ApiError(f"'{where}.content' parts must be text parts ({{'type': 'text', 'text': ...}})", "messages")
        content = "".join(part["text"] for part in content)
    if content is not None and not isinstance(content, str):
        raise ApiError(f"'{where}.content' must be a string, a list of text parts or null", "messages")
    parsed: dict[str, Any] = {"role": role, "content": content or ""}
    calls = message.get("tool_calls")
    if calls is not None:
        if role != "assistant" or not isinstance(calls, list):
            raise ApiError(f"'{where}.tool_calls' must be a list, on an assistant message", "messages")
        parsed["tool_calls"] = [template_tool_call(where, call) for call in calls]
    for key in ("name", "tool_call_id"):
        if isinstance(message.get(key), str):
            parsed[key] = message[key]
    return parsed


def template_tool_call(where: str, call: Any) -> dict[str, Any]:
    """An earlier tool call as chat templates read it: arguments as an object, not the JSON text OpenAI sends."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(f"'{where}.tool_calls' entries need a function with a name", "messages")
    arguments = function.get("arguments", "{}")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as error:
            raise ApiError(f"'{where}.tool_calls' arguments are not JSON ({error})", "messages") from error
    return {"type": "function", "function": {"name": function["name"], "arguments": arguments}}


def parse_tools(body: dict[str, Any]) -> tuple[list[dict[str, Any]] | None, ToolChoice]:
    tools = field(body, "tools", list)
    if tools is not None and not all(isinstance(tool, dict) and tool.get("type") == "function"
                                     and isinstance(tool.get("function"), dict)
                                     and isinstance(tool["function"].get("name"), str) for tool in tools):
        raise ApiError("'tools' must be a list of {'type': 'function', 'function': {'name': ..., ...}}", "tools")
    choice = body.get("tool_choice")
    if choice is None or choice == "auto":
        return tools or None, ToolChoice("auto" if tools else "none")
    if choice == "none":
        return tools or None, ToolChoice("none")
    name = choice.get("function", {}).get("name") if isinstance(choice, dict) and choice.get("type") == "function" else None
    if not isinstance(name, str):
        raise ApiError("'tool_choice' must be 'auto', 'none' or {'type': 'function', 'function': {'name': ...}}",
                       "tool_choice")
    if not any(tool["function"]["name"] == name for tool in tools or []):
        raise ApiError(f"'tool_choice' names the function {name!r}, which is not in 'tools'", "tool_choice")
    return tools, ToolChoice("named", name)


def parse_chat(body: dict[str, Any], served: str) -> ChatRequest:
    check_model(body, served)
    messages = field(body, "messages", list)
    if not messages:
        raise ApiError("'messages' must be a non-empty list", "messages")
    stream, include_usage = parse_stream(body)
    tools, choice = parse_tools(body)
    return ChatRequest([parse_message(i, m) for i, m in enumerate(messages)],
                       parse_max_tokens(body, "max_completion_tokens", "max_tokens"), parse_sampling(body),
                       parse_stop(body), stream, include_usage, field(body, "ignore_eos", bool, False), tools, choice)


DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default for /v1/completions


def parse_completion(body: dict[str, Any], served: str) -> CompletionRequest:
    check_model(body, served)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    ids = isinstance(prompt, list) and prompt and all(isinstance(i, int) and not isinstance(i, bool) for i in prompt)
    if not (isinstance(prompt, str) and prompt) and not ids:
        raise ApiError("'prompt' must be a non-empty string or list of token ids (one prompt per request)", "prompt")
    if field(body, "echo", bool, False) or body.get("suffix") is not None:
        raise ApiError("'echo' and 'suffix' are not supported by this server", "echo")
    stream, include_usage = parse_stream(body)
    max_tokens = parse_max_tokens(body, "max_tokens")
    return CompletionRequest(prompt, DEFAULT_COMPLETION_TOKENS if max_tokens is None else max_tokens,
                             parse_sampling(body), parse_stop(body), stream, include_usage,
                             field(body, "ignore_eos", bool, False))


# ---- responses --------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tool_call_object(index: int, name: str, arguments: str) -> dict[str, Any]:
    return {"index": index, "id": new_id("call"), "type": "function", "function": {"name": name, "arguments": arguments}}


def chat_response(request_id: str, model: str, content: str | None, tool_calls: list[dict[str, Any]],
                  finish_reason: str, counts: dict[str, int]) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = [{key: value for key, value in call.items() if key != "index"} for call in tool_calls]
    return {"id": request_id, "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": counts}


def chat_chunk(request_id: str, model: str, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
    return {"id": request_id, "object": "chat.completion.chunk", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def completion_response(request_id: str, model: str, text: str, finish_reason: str | None,
                        counts: dict[str, int] | None, stream: bool = False) -> dict[str, Any]:
    response = {"id": request_id, "object": "text_completion", "created": int(time.time()), "model": model,
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}]}
    if counts is not None or not stream:
        response["usage"] = counts
    return response


def usage_chunk(request_id: str, model: str, kind: str, counts: dict[str, int]) -> dict[str, Any]:
    return {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": [], "usage": counts}
