"""Answers in the providers' wire formats, and the built-in `echo` provider that uses them.

`render` writes a model's answer — text and usage — as OpenAI chat completions,
responses, embeddings or Anthropic messages, whole or as the server-sent events of a
stream, the way the providers do. The `echo` provider (api: echo) answers every call
without a network: its text is "echo:" and the words of the last user message, one
token per word, cut at the output cap; its usage is counted the same way. It lets a
newcomer try the gateway with the official SDKs offline; the tests' fake provider
renders its answers with the same functions.
"""

from __future__ import annotations

import base64
import hashlib
import struct
import time
from typing import Any

import orjson

from gateway.models.wire import CHAT, EMBEDDINGS, RESPONSES, Request, Usage


def sse(data: Any, event: str | None = None) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _openai_usage(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt, "completion_tokens": usage.completion,
        "total_tokens": usage.prompt + usage.completion,
        "prompt_tokens_details": {"cached_tokens": usage.cached},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning},
    }  # fmt: skip


def _responses_usage(usage: Usage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt, "input_tokens_details": {"cached_tokens": usage.cached},
        "output_tokens": usage.completion,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning},
        "total_tokens": usage.prompt + usage.completion,
    }  # fmt: skip


def _anthropic_usage(usage: Usage, output: int) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt - usage.cached - usage.cache_write,
        "cache_creation_input_tokens": usage.cache_write,
        "cache_read_input_tokens": usage.cached, "output_tokens": output,
    }  # fmt: skip


def render(request: Request, model: str, pieces: list[str], usage: Usage, call_id: str) -> Any:
    """The answer as the provider sends it: bytes of a JSON body, or the list of a
    stream's events (each already framed as server-sent events)."""
    text = "".join(pieces)
    if request.operation == EMBEDDINGS:
        return _embeddings(request, model, usage)
    if request.operation == CHAT:
        if request.stream:
            return _chat_stream(request, model, pieces, usage, call_id)
        message = {"role": "assistant", "content": text, "refusal": None}
        return orjson.dumps({
            "id": f"chatcmpl-{call_id}", "object": "chat.completion", "created": int(time.time()),
            "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message, "logprobs": None,
                         "finish_reason": "stop"}],
            "usage": _openai_usage(usage),
        })  # fmt: skip
    if request.operation == RESPONSES:
        if request.stream:
            return _responses_stream(model, pieces, usage, call_id)
        return orjson.dumps(_response(model, text, usage, call_id, "completed"))
    if request.stream:
        return _messages_stream(model, pieces, usage, call_id)
    return orjson.dumps({
        "id": f"msg_{call_id}", "type": "message", "role": "assistant", "model": model,
        "content": [{"type": "text", "text": text}], "stop_reason": "end_turn",
        "stop_sequence": None, "usage": _anthropic_usage(usage, usage.completion),
    })  # fmt: skip


def _chat_stream(
    request: Request, model: str, pieces: list[str], usage: Usage, call_id: str
) -> list[bytes]:
    with_usage = request.body.get("stream_options", {}).get("include_usage") is True
    base = {"id": f"chatcmpl-{call_id}", "object": "chat.completion.chunk",
            "created": int(time.time()), "model": model, "system_fingerprint": None}  # fmt: skip
    extra = {"usage": None} if with_usage else {}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return sse({**base, "choices": [choice], **extra})

    events = [chunk({"role": "assistant", "content": "", "refusal": None})]
    events += [chunk({"content": piece}) for piece in pieces]
    events.append(chunk({}, "stop"))
    if with_usage:
        events.append(sse({**base, "choices": [], "usage": _openai_usage(usage)}))
    events.append(b"data: [DONE]\n\n")
    return events


def _response(
    model: str, text: str, usage: Usage | None, call_id: str, status: str
) -> dict[str, Any]:
    output = []
    if status == "completed":
        output = [{
            "type": "message", "id": f"msg_{call_id}", "status": "completed", "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": []}],
        }]  # fmt: skip
    return {
        "id": f"resp_{call_id}", "object": "response", "created_at": int(time.time()),
        "status": status, "model": model, "output": output, "parallel_tool_calls": True,
        "tool_choice": "auto", "tools": [], "error": None, "incomplete_details": None,
        "usage": _responses_usage(usage) if usage else None,
    }  # fmt: skip


def _responses_stream(model: str, pieces: list[str], usage: Usage, call_id: str) -> list[bytes]:
    text = "".join(pieces)
    item_id = f"msg_{call_id}"
    part = {"type": "output_text", "text": "", "annotations": []}
    item = {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant",
            "content": []}  # fmt: skip
    done_item = {**item, "status": "completed",
                 "content": [{**part, "text": text}]}  # fmt: skip
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    steps: list[dict[str, Any]] = [
        {"type": "response.created",
         "response": _response(model, "", None, call_id, "in_progress")},
        {"type": "response.output_item.added", "output_index": 0, "item": item},
        {"type": "response.content_part.added", **where, "part": part},
        *({"type": "response.output_text.delta", **where, "delta": p} for p in pieces),
        {"type": "response.output_text.done", **where, "text": text},
        {"type": "response.content_part.done", **where, "part": {**part, "text": text}},
        {"type": "response.output_item.done", "output_index": 0, "item": done_item},
        {"type": "response.completed",
         "response": _response(model, text, usage, call_id, "completed")},
    ]  # fmt: skip
    return [sse({**step, "sequence_number": n}, step["type"]) for n, step in enumerate(steps)]


def _messages_stream(model: str, pieces: list[str], usage: Usage, call_id: str) -> list[bytes]:
    message: dict[str, Any] = {
        "id": f"msg_{call_id}", "type": "message", "role": "assistant", "model": model,
        "content": [], "stop_reason": None, "stop_sequence": None,
        "usage": _anthropic_usage(usage, 1),
    }  # fmt: skip
    steps: list[dict[str, Any]] = [
        {"type": "message_start", "message": message},
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
        {"type": "ping"},
        *({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": p}}
          for p in pieces),
        {"type": "content_block_stop", "index": 0},
        {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
         "usage": {"output_tokens": usage.completion}},
        {"type": "message_stop"},
    ]  # fmt: skip
    return [sse(step, step["type"]) for step in steps]


def _embeddings(request: Request, model: str, usage: Usage) -> bytes:
    given = request.body.get("input")
    inputs = (
        given if isinstance(given, list) and given and not isinstance(given[0], int) else [given]
    )
    as_base64 = request.body.get("encoding_format") == "base64"
    data = []
    for index, item in enumerate(inputs):
        digest = hashlib.sha256(orjson.dumps(item)).digest()
        vector = [b / 255 for b in digest[:8]]
        if as_base64:
            packed: Any = base64.b64encode(struct.pack("<8f", *vector)).decode()
        else:
            packed = vector
        data.append({"object": "embedding", "index": index, "embedding": packed})
    return orjson.dumps({
        "object": "list", "data": data, "model": model,
        "usage": {"prompt_tokens": usage.prompt, "total_tokens": usage.prompt},
    })  # fmt: skip


# The echo provider ------------------------------------------------------------------
def _words(node: Any) -> list[str]:
    """The words of every text in a request's prompt fields."""
    if isinstance(node, str):
        return node.split()
    if isinstance(node, dict):
        return [w for k, v in node.items() if k not in ("role", "type") for w in _words(v)]
    if isinstance(node, list):
        return [w for v in node for w in _words(v)]
    return []


def _last_user_words(request: Request) -> list[str]:
    body = request.body
    conversation = body.get("messages") or body.get("input") or []
    if isinstance(conversation, str):
        return conversation.split()
    for message in reversed(conversation if isinstance(conversation, list) else []):
        if isinstance(message, dict) and message.get("role", "user") == "user":
            return _words(message.get("content"))
    return []


def echo_answer(request: Request, cap: int | None, call_id: str) -> Any:
    """The echo provider's answer: one token per word, the output cut at `cap`."""
    prompt_fields = {
        k: request.body.get(k) for k in ("messages", "input", "system", "instructions")
    }
    prompt = len(_words(prompt_fields)) + 1
    if request.operation == EMBEDDINGS:
        return render(request, request.model, [], Usage(prompt=prompt), call_id)
    words = ["echo:", *_last_user_words(request)][: max(1, cap or 1)]
    pieces = [words[0]] + [f" {w}" for w in words[1:]]
    usage = Usage(prompt=prompt, completion=len(words))
    return render(request, request.model, pieces, usage, call_id)
