"""The providers' wire formats, as far as the gateway reads and writes them: which field
names the model, the stream flag and the output cap; an upper bound of a request's
prompt tokens; the usage of an answer, whole or streamed; and errors in each format.

OpenAI: `POST /v1/chat/completions`, `/v1/responses`, `/v1/embeddings`; Anthropic:
`POST /v1/messages`. Bodies are JSON objects; streams are server-sent events.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson

from services.common.convert import RESPONSE_ID

OPENAI, ANTHROPIC = "openai", "anthropic"
CHAT, RESPONSES, EMBEDDINGS, MESSAGES = "chat.completions", "responses", "embeddings", "messages"

# path -> (operation, the wire format it speaks)
OPERATIONS = {
    "/v1/chat/completions": (CHAT, OPENAI),
    "/v1/responses": (RESPONSES, OPENAI),
    "/v1/embeddings": (EMBEDDINGS, OPENAI),
    "/v1/messages": (MESSAGES, ANTHROPIC),
}
# The request field that caps the output, by operation: the first one present is used;
# when none is, the gateway sends the first one.
CAP_FIELDS = {
    CHAT: ("max_completion_tokens", "max_tokens"),
    RESPONSES: ("max_output_tokens",),
    MESSAGES: ("max_tokens",),
    EMBEDDINGS: (),
}
IMAGE_TYPES = frozenset({"image_url", "input_image", "image"})
TOOL_OVERHEAD = 1_000  # tokens a provider may add for tool definitions (Anthropic: ~350)
REQUEST_OVERHEAD = 16  # a request's fixed framing (reply priming, BOS)
# Where streamed text is (its UTF-8 bytes bound the tokens streamed so far).
TEXT_KEYS = frozenset(
    {"content", "text", "arguments", "partial_json", "thinking", "refusal", "delta"}
)


class WireError(Exception):
    """A request the gateway refuses: HTTP status, machine-readable code, message, and
    the field at fault (OpenAI's `param`)."""

    def __init__(self, status: int, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param


@dataclass(slots=True)
class Request:
    """A parsed model request."""

    operation: str
    api: str  # the wire format the client speaks
    body: dict[str, Any]
    model: str
    stream: bool
    prompt_bound: int
    cap: int | None  # the output cap the request names, if any
    wants_usage: bool = False  # an OpenAI chat stream whose client asked for the usage chunk

    def upstream_body(self, cap: int | None) -> bytes:
        """The body sent upstream: the output cap set (lowered to what the budgets allow),
        and for an OpenAI chat stream the usage chunk asked for."""
        body = self.body
        fields = CAP_FIELDS[self.operation]
        if cap is not None and fields:
            present = [f for f in fields if f in body]
            for name in present[1:]:
                body.pop(name)
            body[present[0] if present else fields[0]] = cap
        if self.operation == CHAT and self.stream:
            options = body.get("stream_options")
            body["stream_options"] = {**(options if isinstance(options, dict) else {}),
                                      "include_usage": True}  # fmt: skip
        return orjson.dumps(body)


def parse(operation: str, api: str, raw: bytes, image_tokens: int) -> Request:
    """Check a request body far enough to meter it; the provider checks the rest."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise WireError(400, "invalid_json", f"malformed JSON body: {exc}") from None
    if not isinstance(body, dict):
        raise WireError(400, "invalid_request", "the body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model or len(model) > 256 or "|" in model:
        raise WireError(400, "invalid_request", "model: a model name is required", "model")
    stream = body.get("stream", False)
    if not isinstance(stream, bool) or (stream and operation == EMBEDDINGS):
        raise WireError(400, "invalid_request", "stream: must be a boolean", "stream")
    options = body.get("stream_options")
    wants_usage = (
        operation == CHAT and isinstance(options, dict) and options.get("include_usage") is True
    )
    return Request(
        operation, api, body, model, stream, prompt_bound(raw, body, image_tokens),
        _cap(operation, body), wants_usage,
    )  # fmt: skip


def _cap(operation: str, body: dict[str, Any]) -> int | None:
    """The output cap a request names (the least, if it names two), or None."""
    cap = None
    for name in CAP_FIELDS[operation]:
        if name in body:
            value = body[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise WireError(400, "invalid_request", f"{name}: a positive integer", name)
            cap = value if cap is None else min(cap, value)
    if operation == MESSAGES and cap is None:
        raise WireError(400, "invalid_request", "max_tokens: required", "max_tokens")
    return cap


def prompt_bound(raw: bytes, body: dict[str, Any], image_tokens: int) -> int:
    """An upper bound of the prompt tokens: the UTF-8 bytes of the whole request body,
    plus fixed framing. Every token of a byte-level BPE covers at least one byte of
    text, and the JSON around each message (`{"role":"user","content":""}`, 29 bytes) is
    more than the tokens a chat template adds per message (3-4). Images are counted as
    `image_tokens` each instead of their bytes (a URL is short; a base64 image is far
    longer than its tokens), and tool definitions add TOOL_OVERHEAD."""
    images, image_bytes = _images(body)
    bound = len(raw) - image_bytes + images * image_tokens + REQUEST_OVERHEAD
    if body.get("tools"):
        bound += TOOL_OVERHEAD
    return bound


def _images(node: Any) -> tuple[int, int]:
    """(images, the bytes of their JSON) anywhere in a request body."""
    if isinstance(node, dict):
        if node.get("type") in IMAGE_TYPES:
            return 1, len(orjson.dumps(node))
        found = [_images(v) for v in node.values() if isinstance(v, dict | list)]
    elif isinstance(node, list):
        found = [_images(v) for v in node if isinstance(v, dict | list)]
    else:
        return 0, 0
    return sum(f[0] for f in found), sum(f[1] for f in found)


@dataclass(slots=True)
class Usage:
    """A call's usage in agentplane's terms: cached and cache-write tokens are parts of
    `prompt`, reasoning tokens part of `completion`."""

    prompt: int = 0
    completion: int = 0
    cached: int = 0
    cache_write: int = 0
    reasoning: int = 0


def _int(node: Any, *path: str) -> int:
    for key in path:
        if not isinstance(node, dict):
            return 0
        node = node.get(key)
    return node if isinstance(node, int) and not isinstance(node, bool) and node > 0 else 0


def usage_of(operation: str, data: Any) -> Usage | None:
    """The usage an answer (or a streamed event's object) reports, or None."""
    if not isinstance(data, dict):
        return None
    u = data.get("usage")
    if not isinstance(u, dict):
        return None
    if operation == MESSAGES:  # input_tokens exclude the cache reads and writes
        read, write = _int(u, "cache_read_input_tokens"), _int(u, "cache_creation_input_tokens")
        return Usage(_int(u, "input_tokens") + read + write, _int(u, "output_tokens"), read, write)
    if operation == RESPONSES:
        return Usage(
            _int(u, "input_tokens"), _int(u, "output_tokens"),
            _int(u, "input_tokens_details", "cached_tokens"), 0,
            _int(u, "output_tokens_details", "reasoning_tokens"),
        )  # fmt: skip
    return Usage(  # chat completions and embeddings: prompt_tokens include the cached ones
        _int(u, "prompt_tokens"), _int(u, "completion_tokens"),
        _int(u, "prompt_tokens_details", "cached_tokens"), 0,
        _int(u, "completion_tokens_details", "reasoning_tokens"),
    )  # fmt: skip


# The last event of a Responses or Messages stream (a chat stream ends with `[DONE]`).
LAST_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed", "message_stop"}
)


def response_id(data: Any) -> str:
    """The provider's id of an answer (`chatcmpl-...`, `resp_...`, `msg_...`), when it
    has a sane one: OTLP ingestion skips the client spans that report it (SPEC §16)."""
    found = data.get("id") if isinstance(data, dict) else None
    return found if isinstance(found, str) and RESPONSE_ID.fullmatch(found) else ""


def text_bytes(node: Any) -> int:
    """UTF-8 bytes of the generated text in a streamed event (an upper bound of its
    tokens, as for prompts)."""
    if isinstance(node, dict):
        total = 0
        for key, value in node.items():
            if isinstance(value, str):
                if key in TEXT_KEYS:
                    total += len(value.encode())
            elif isinstance(value, dict | list):
                total += text_bytes(value)
        return total
    if isinstance(node, list):
        return sum(text_bytes(v) for v in node)
    return 0


@dataclass(slots=True)
class StreamMeter:
    """Reads a provider's event stream as it passes: its usage (when the provider
    reports it), the model that answered, and how much text was streamed. `keep` says
    whether an event goes on to the client (an OpenAI chat stream's usage chunk does not
    when the client did not ask for it)."""

    request: Request
    usage: Usage | None = None
    model: str = ""
    response_id: str = ""
    streamed: int = 0
    events: int = 0
    done: bool = False  # the stream's last event came (`[DONE]`, message_stop, ...)
    _start: Usage | None = field(default=None)

    def keep(self, event: bytes) -> bool:
        self.events += 1
        data = _event_data(event)
        if data is None or not isinstance(data, dict):
            self.done = self.done or b"data: [DONE]" in event
            return True
        operation = self.request.operation
        self.done = self.done or data.get("type") in LAST_EVENTS
        self.streamed += text_bytes(data.get("choices") if operation == CHAT else data)
        if operation == CHAT:
            return self._chat(data)
        if operation == RESPONSES:
            response = data.get("response")
            if isinstance(response, dict):
                self.model = str(response.get("model") or self.model)
                self.response_id = self.response_id or response_id(response)
                found = usage_of(RESPONSES, response)
                self.usage = found or self.usage
            return True
        self._messages(data)
        return True

    def _chat(self, data: dict[str, Any]) -> bool:
        self.model = str(data.get("model") or self.model)
        self.response_id = self.response_id or response_id(data)
        found = usage_of(CHAT, data)
        if found is None:
            return True
        self.usage = found
        return self.request.wants_usage or bool(data.get("choices"))

    def _messages(self, data: dict[str, Any]) -> None:
        kind = data.get("type")
        if kind == "message_start":
            message = data.get("message")
            self._start = usage_of(MESSAGES, message)
            if isinstance(message, dict):
                self.model = str(message.get("model") or self.model)
                self.response_id = response_id(message)
            self.usage = self._start
        elif kind == "message_delta":
            given = data.get("usage")
            delta: dict[str, Any] = given if isinstance(given, dict) else {}
            start = self._start or Usage()
            read = _int(delta, "cache_read_input_tokens") or start.cached
            write = _int(delta, "cache_creation_input_tokens") or start.cache_write
            prompt = (
                (_int(delta, "input_tokens") + read + write)
                if "input_tokens" in delta
                else start.prompt
            )
            self.usage = Usage(prompt, _int(delta, "output_tokens"), read, write)


def _event_data(event: bytes) -> Any:
    """The JSON of an event's `data:` lines (None for none, `[DONE]` or not JSON)."""
    lines = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not lines or lines == [b"[DONE]"]:
        return None
    try:
        return orjson.loads(b"\n".join(lines))
    except orjson.JSONDecodeError:
        return None


# Errors ------------------------------------------------------------------------------
OPENAI_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
}  # fmt: skip
ANTHROPIC_TYPES = {
    400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
    404: "not_found_error", 413: "request_too_large", 429: "rate_limit_error",
    504: "timeout_error", 529: "overloaded_error",
}  # fmt: skip


def error_body(api: str, status: int, code: str, message: str, param: str | None = None) -> bytes:
    """An error in the client's wire format, with a machine-readable `code` (OpenAI's
    own field; added to Anthropic's error object, whose SDK keeps unknown fields)."""
    if api == ANTHROPIC:
        kind = ANTHROPIC_TYPES.get(status, "api_error")
        return orjson.dumps(
            {"type": "error", "error": {"type": kind, "message": message, "code": code}}
        )
    kind = (
        "insufficient_quota" if code == "budget_exceeded" else OPENAI_TYPES.get(status, "api_error")
    )
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})
