"""OpenAI-compatible HTTP API: several runs' adapters on one base model, picked per request.

``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, streaming as
server-sent events; ``model`` names a run (its adapter) or the base. With no runs, ``--base
MODEL`` serves a bare base model (the endpoint of a prompting baseline, ``eval/endpoint.py``).
Chat messages are rendered by ``data/render.py``, the renderer training uses, so a tuned model
reads its prompts exactly as it was trained on them. Generation runs in ``ship/engine.py``
(continuous batching on one thread). A request is checked completely before it reaches the
model: problems come back as 4xx with OpenAI's error body ``{"error": {"message", "type",
"param", "code"}}``, never a 500.

What tunelab trains is served: ``tools`` and ``role: tool`` / assistant ``tool_calls`` turns go
through the same renderer, and the calls the model writes come back as ``message.tool_calls``
(``ship/tool_calls.py``: tool_choice, parsing, streaming). ``logprobs`` are the engine's, from
the logits each token was picked from. A parameter this server cannot honour is refused with a
400 that names it (``response_format`` json_object among them), never silently ignored.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import socket
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from tunelab.data.render import chat_template_of
from tunelab.errors import ConfigError, DataError, RunError
from tunelab.run.load import attach_adapter, load_run_base
from tunelab.ship.engine import Engine, Event, Request, Sampling, TokenLogprob, context_length
from tunelab.ship.served import ServedModel, common_base, open_runs, served_models
from tunelab.ship.tool_calls import (
    ToolCallStream,
    ToolChoiceError,
    ToolPlan,
    plan_tools,
    read_tool_calls,
)

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 16
MAX_STOP_STRINGS = 4
MAX_JSON_DEPTH = 64  # far more than any request needs; json.loads itself fails near 1,000
MAX_TOP_LOGPROBS = 20  # OpenAI's limits: 20 on chat, 5 on completions
MAX_COMPLETION_LOGPROBS = 5
DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's "up to the context" is minutes on a CPU
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

#: Request fields of OpenAI's API that this server does not implement, and their no-op values.
UNSUPPORTED = {"functions": (None, []), "function_call": (None, "none"),
               "logit_bias": (None, {}), "echo": (None, False), "suffix": (None, ""),
               "best_of": (None, 1), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
               "audio": (None,), "prediction": (None,), "modalities": (None, ["text"]),
               "store": (None, False), "web_search_options": (None,)}

RESPONSE_FORMAT_FIX = (
    "tunelab serve does not constrain generation to JSON, and it will not pretend to; ask for "
    "JSON in the prompt (a model tuned on JSON answers writes JSON) and parse the answer, or "
    "send response_format {\"type\": \"text\"}")


# --- loading -----------------------------------------------------------------------------------


def load_served_models(runs: list[str], *, base: str | None = None):
    """The base model with every run's adapter loaded under its own name, the tokenizer and
    the served model ids (the base first). ``NAME=RUN`` serves a run under another name; no
    runs and ``base`` serve that base model alone (a prompting baseline's endpoint).

    Runs need only their config, adapter and base here, not their data files; a QLoRA run's
    base is loaded in 4 bits, as it was trained."""
    if not runs:
        return _load_bare_base(base)
    opened = open_runs(runs)
    base_path, gguf_file = common_base(opened, base)
    model, tokenizer = load_run_base(opened[0][1], opened[0][2], base=(base_path, gguf_file))
    served = served_models(base_path if gguf_file is None else f"{base_path}/{gguf_file}",
                           opened)
    for model_id, (_, run, config) in zip(served[1:], opened, strict=True):
        model = attach_adapter(model, run, config, name=model_id.adapter)
    model.eval()
    return model, tokenizer, served


def _load_bare_base(base: str | None):
    """A base model served alone, under the reference it was given by (a local folder or
    GGUF file, a hub id, ``embedded:NAME``)."""
    from tunelab.model.load import load_model, load_tokenizer

    if base is None:
        raise RunError("there is nothing to serve: no run directory and no --base",
                       where="tunelab serve",
                       fix="name runs (tunelab serve RUN_DIR ...) or a base model "
                       "(tunelab serve --base MODEL)")
    tokenizer = load_tokenizer(base)
    model = load_model(base)
    model.eval()
    return model, tokenizer, [ServedModel(base, None)]


# --- requests ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: "0.5" is not a number and "true" is not a boolean; a field this server does not
    # know is an error (OpenAI's "Unrecognized request argument"), never silently ignored
    model_config = ConfigDict(strict=True, extra="forbid")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class FunctionCall(_Strict):
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCall(_Strict):
    id: str
    type: Literal["function"]
    function: FunctionCall


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None  # None only on an assistant turn of calls
    name: str | None = None  # a participant's name: OpenAI accepts it, templates do not read it
    tool_calls: list[ToolCall] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this result answers
    # what an assistant message returned by the openai client carries when sent back
    refusal: None = None
    annotations: list | None = None
    audio: None = None
    function_call: None = None


class FunctionDefinition(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema, shown to the model as it is
    strict: bool | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Strict):
    name: str


class NamedToolChoice(_Strict):
    type: Literal["function"]
    function: FunctionName


class ResponseFormat(BaseModel):
    # every type is read, so json_object and json_schema get their own clear refusal
    model_config = ConfigDict(extra="allow")
    type: str


class StreamOptions(_Strict):
    include_usage: bool = False


class _Generation(_Strict):
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # an end user's id, for the caller's own records: no effect here


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: ResponseFormat | None = None


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(min_length=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)


class ApiError(Exception):
    """A request the server refuses, rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (
            status, message, param, code, kind)

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _parse(model: type[BaseModel], body: dict) -> Any:
    """The request as ``model``, or a 400 naming every bad field."""
    for name, harmless in UNSUPPORTED.items():
        if name in body and body[name] not in harmless:
            raise ApiError(400, f"{name} is not supported by tunelab serve", param=name,
                           code="unsupported_parameter")
    try:
        return model.model_validate(body)
    except ValidationError as error:
        problems = [(_param(e["loc"]), "unrecognized request argument (this server does not "
                     "know it; leave it out)" if e["type"] == "extra_forbidden" else e["msg"])
                    for e in error.errors()]
        first = {}
        for param, message in problems:
            first.setdefault(param, message)
        text = "; ".join(f"{param}: {message}" for param, message in first.items())
        raise ApiError(400, f"invalid request: {text}", param=problems[0][0]) from None


def _param(location: tuple) -> str:
    """``messages.0.role`` from pydantic's location, without its union-member tags."""
    parts = [str(part) for part in location
             if isinstance(part, int) or re.fullmatch(r"[a-z_]+", str(part))
             and part not in {"str", "int", "float", "bool", "list", "dict", "none"}]
    return ".".join(parts) or "body"


async def _read_json(request: HttpRequest, max_body_bytes: int) -> dict:
    """The body as a JSON object: of a JSON content type, within the size and nesting limits."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip()
    if media and media.lower() != "application/json":
        raise ApiError(415, f"the request body is sent as {media!r}; this API reads JSON",
                       code="unsupported_media_type",
                       param=None) from None
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_body_bytes:
        raise ApiError(413, f"the request body is {declared} bytes; the limit is "
                       f"{max_body_bytes}", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > max_body_bytes:
            raise ApiError(413, f"the request body is over the {max_body_bytes}-byte limit",
                           code="request_too_large")
    try:
        parsed = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}",
                       code="invalid_json") from None
    except RecursionError:  # the decoder's own limit, near 1,000 levels
        parsed = too_deep = None
    else:
        too_deep = _depth_over(parsed, MAX_JSON_DEPTH)
    if too_deep is not False:
        logger.warning("refused a request body nested over %d levels deep (%d bytes)",
                       MAX_JSON_DEPTH, len(body))
        raise ApiError(400, f"the request body is nested over {MAX_JSON_DEPTH} levels deep",
                       code="invalid_json")
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return parsed


def _depth_over(value: Any, limit: int) -> bool:
    """Whether JSON ``value`` nests deeper than ``limit`` (walked without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict | list):
            if depth > limit:
                return True
            children = item.values() if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return False


# --- the app -----------------------------------------------------------------------------------


@dataclass
class _Context:
    engine: Engine
    tokenizer: Any
    models: dict[str, ServedModel]
    context_tokens: int
    max_body_bytes: int


def create_app(model, tokenizer, served: list[ServedModel], *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES, engine=None) -> FastAPI:
    """The FastAPI app; its engine thread starts and stops with the app's lifespan.
    ``engine``: another engine with Engine's interface (``ship/llamacpp.py``), ``model`` None."""
    engine = engine if engine is not None else Engine(model, tokenizer)
    context = _Context(engine, tokenizer, {m.name: m for m in served},
                       getattr(engine, "context_tokens", None) or context_length(model),
                       max_body_bytes)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        engine.start()
        yield
        engine.stop()

    app = FastAPI(title="tunelab serve", lifespan=lifespan)
    app.state.engine = engine
    router = APIRouter(prefix="/v1", dependencies=[Depends(_key_check(api_key))])
    created = int(time.time())

    @router.get("/models")
    async def list_models() -> dict:
        return {"object": "list", "data": [
            {"id": name, "object": "model", "created": created, "owned_by": "tunelab"}
            for name in context.models]}

    @router.post("/chat/completions")
    async def chat_completions(request: HttpRequest):
        body = await _read_json(request, max_body_bytes)
        parsed = _parse(ChatRequest, body)
        served_model = _served(context, parsed.model)
        _check_chat(parsed)
        template = chat_template_of(tokenizer, served_model.chat_template)
        plan = _tool_plan(parsed, template)
        prompt = _chat_prompt_ids(body["messages"], tokenizer, served_model.chat_template,
                                  served_model.chat_template_kwargs, tools=body.get("tools"))
        if plan.prefix:  # tokenized as the start of the answer training tokenized
            prompt = prompt + tokenizer(plan.prefix, add_special_tokens=False)["input_ids"]
        limit = parsed.max_completion_tokens or parsed.max_tokens
        logprobs = (parsed.top_logprobs or 0) if parsed.logprobs else None
        return await _respond(context, parsed, served_model, [prompt], limit,
                              _Answer(True, logprobs, plan))

    @router.post("/completions")
    async def completions(request: HttpRequest):
        parsed = _parse(CompletionRequest, await _read_json(request, max_body_bytes))
        served_model = _served(context, parsed.model)
        texts = [parsed.prompt] if isinstance(parsed.prompt, str) else parsed.prompt
        prompts = [_text_prompt_ids(text, tokenizer) for text in texts]
        return await _respond(context, parsed, served_model, prompts, parsed.max_tokens,
                              _Answer(False, parsed.logprobs))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    app.include_router(router)
    _install_error_handlers(app)
    return app


def _key_check(api_key: str | None):
    async def check(request: HttpRequest) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send the header "
                           "'Authorization: Bearer KEY' with the server's --api-key",
                           code="invalid_api_key")
    return check


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(HTTPException)
    async def http_error(_request, error: HTTPException) -> JSONResponse:
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(),
                            status_code=error.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse(ApiError(400, str(error)).body(), status_code=400)

    @app.exception_handler(Exception)
    async def bug(_request, error: Exception) -> JSONResponse:
        logger.exception("unexpected error")
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}",
                                     kind="server_error").body(), status_code=500)


def _served(context: _Context, name: str) -> ServedModel:
    if name not in context.models:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves: "
                       f"{', '.join(context.models)}", param="model", code="model_not_found")
    return context.models[name]


def _check_chat(parsed: ChatRequest) -> None:
    """What a chat request's fields must agree on, beyond each field's own type."""
    if parsed.response_format is not None and parsed.response_format.type != "text":
        raise ApiError(400, f"response_format {parsed.response_format.type} is not supported by "
                       f"this server: {RESPONSE_FORMAT_FIX}", param="response_format",
                       code="unsupported_parameter")
    if parsed.top_logprobs is not None and not parsed.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
    if parsed.tool_choice not in (None, "none") and not parsed.tools:
        raise ApiError(400, "tool_choice is only allowed when tools are given",
                       param="tool_choice")
    names = [tool.function.name for tool in parsed.tools or []]
    if len(set(names)) < len(names):
        raise ApiError(400, "two tools have the same function name", param="tools")
    calls: set[str] = set()
    for number, message in enumerate(parsed.messages):
        _check_message(message, number)
        for index, call in enumerate(message.tool_calls or []):
            try:
                arguments = json.loads(call.function.arguments or "{}")
            except (json.JSONDecodeError, RecursionError):
                arguments = None
            if not isinstance(arguments, dict):
                raise ApiError(400, "a tool call's arguments must be the JSON text of an object",
                               param=f"messages.{number}.tool_calls.{index}.function.arguments")
        if message.role == "tool" and message.tool_call_id not in calls:
            raise ApiError(400, f"the tool message's tool_call_id {message.tool_call_id!r} "
                           "answers no call of the assistant turn before it",
                           param=f"messages.{number}.tool_call_id")
        if message.role == "assistant":
            calls = {call.id for call in message.tool_calls or []}


def _check_message(message: ChatMessage, number: int) -> None:
    """The fields a message of its role has, and only those."""
    where = f"messages.{number}"
    if message.content is None and not (message.role == "assistant" and message.tool_calls):
        raise ApiError(400, f"{where}.content is missing; only an assistant turn that calls "
                       "tools may leave it out", param=f"{where}.content")
    if message.tool_calls is not None and message.role != "assistant":
        raise ApiError(400, f"{where} is a {message.role} message with tool_calls; only "
                       "assistant turns call tools", param=f"{where}.tool_calls")
    if message.role == "tool" and message.tool_call_id is None:
        raise ApiError(400, f"{where} is a tool message without tool_call_id (the call it "
                       "answers)", param=f"{where}.tool_call_id")
    if message.role != "tool" and message.tool_call_id is not None:
        raise ApiError(400, f"{where} is a {message.role} message with tool_call_id; only tool "
                       "messages answer calls", param=f"{where}.tool_call_id")


def _tool_plan(parsed: ChatRequest, template: str) -> ToolPlan:
    if not parsed.tools:
        return ToolPlan()
    named = parsed.tool_choice.function.name if isinstance(parsed.tool_choice,
                                                           NamedToolChoice) else None
    choice = None if named else parsed.tool_choice
    try:
        return plan_tools([tool.function.name for tool in parsed.tools], choice, named,
                          parsed.parallel_tool_calls, template)
    except ToolChoiceError as error:
        raise ApiError(400, str(error), param="tool_choice") from None


def _chat_prompt_ids(messages: list[dict], tokenizer, chat_template: str | None,
                     chat_template_kwargs: dict | None = None, *,
                     tools: list[dict] | None = None) -> list[int]:
    """The conversation (OpenAI message dicts, checked) and its tools as the ids the model
    reads next, rendered as training rendered them (the tools as the client wrote them)."""
    from tunelab.data.render import chat_prompt

    turns = [{"role": "system" if m["role"] == "developer" else m["role"],
              "content": m.get("content") or "", "tool_calls": m.get("tool_calls"),
              "tool_call_id": m.get("tool_call_id")} for m in messages]
    try:
        return chat_prompt(turns, tokenizer, chat_template=chat_template,
                           chat_template_kwargs=chat_template_kwargs, tools=tools or None).ids
    except DataError as error:
        raise ApiError(400, error.message, param="messages") from None


def _text_prompt_ids(text: str, tokenizer) -> list[int]:
    """A raw prompt's ids: BOS first where the tokenizer's models expect one, as in training."""
    from tunelab.data.render import bos_to_add

    bos = bos_to_add(tokenizer)
    return ([bos] if bos is not None else []) + tokenizer(text, add_special_tokens=False)[
        "input_ids"]


def _sampling(parsed: _Generation, prompts: list[list[int]], max_tokens: int | None,
              context_tokens: int, answer: _Answer) -> Sampling:
    """Sampling settings, with max_tokens checked against the room the context leaves."""
    chat = answer.chat
    longest = max(len(prompt) for prompt in prompts)
    room = context_tokens - longest
    if room < 1:
        raise ApiError(400, f"the prompt is {longest} tokens long; this model's context is "
                       f"{context_tokens} tokens, which leaves no room for a completion",
                       param="messages" if chat else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(room, DEFAULT_CHAT_MAX_TOKENS if chat else DEFAULT_COMPLETION_MAX_TOKENS)
    elif max_tokens > room:
        raise ApiError(400, f"max_tokens is {max_tokens}, but the prompt is {longest} tokens "
                       f"long and the context {context_tokens}, so at most {room} can follow",
                       param="max_tokens", code="context_length_exceeded")
    stop = [parsed.stop] if isinstance(parsed.stop, str) else list(parsed.stop or [])
    if len(stop) > MAX_STOP_STRINGS or "" in stop:
        raise ApiError(400, f"stop takes up to {MAX_STOP_STRINGS} non-empty strings",
                       param="stop")
    return Sampling(max_new_tokens=max_tokens, temperature=parsed.temperature,
                    top_p=parsed.top_p, stop=tuple(stop) + answer.tools.stop, seed=parsed.seed,
                    n=parsed.n, logprobs=answer.logprobs)


# --- responses ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Answer:
    """What a request's answers are: chat or text, their log-probs (None: none; k: the top k
    too), and how tool calls are generated and read."""

    chat: bool
    logprobs: int | None = None
    tools: ToolPlan = ToolPlan()


async def _respond(context: _Context, parsed: _Generation, served_model: ServedModel,
                   prompts: list[list[int]], max_tokens: int | None, answer: _Answer):
    sampling = _sampling(parsed, prompts, max_tokens, context.context_tokens, answer)
    events = _generate(context.engine, prompts, served_model.adapter, sampling)
    chat = answer.chat
    header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
              "created": int(time.time()), "model": served_model.name}
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    tokens = _TokenTexts(context.tokenizer)
    if parsed.stream:
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return StreamingResponse(
            _sse(events, header, len(prompts) * sampling.n, prompt_tokens, answer, tokens,
                 include_usage),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts: dict[int, list[str]] = {}
    logprobs: dict[int, list[TokenLogprob]] = {}
    finished: dict[int, Event] = {}
    async for event in events:
        logprobs.setdefault(event.index, []).extend(event.logprobs)
        if event.kind == "delta":
            texts.setdefault(event.index, []).append(event.text)
        else:
            finished[event.index] = event
    choices = []
    for index in sorted(finished):
        text = answer.tools.prefix + "".join(texts.get(index, []))
        reason = finished[index].finish_reason
        if chat:
            content, calls = (read_tool_calls(text, answer.tools.single) if answer.tools.parse
                              else (text, None))
            message = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"], reason = calls, "tool_calls"
            content = {"message": message}
        else:
            content = {"text": text}
        choices.append({"index": index, **content,
                        "logprobs": _logprobs(logprobs.get(index, []), answer, tokens),
                        "finish_reason": reason})
    return {**header, "object": "chat.completion" if chat else "text_completion",
            "choices": choices, "usage": _usage(prompt_tokens, finished.values())}


class _TokenTexts:
    """Token ids as OpenAI's log-prob entries name them: the token's text and its bytes (a
    byte-level BPE token's own bytes, which may be part of one character)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = type(decoder).__name__ == "ByteLevel"

    def __call__(self, token_id: int) -> tuple[str, list[int]]:
        if self.byte_level:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if all(char in _UNICODE_TO_BYTE for char in piece):
                raw = bytes(_UNICODE_TO_BYTE[char] for char in piece)
                return raw.decode("utf-8", errors="replace"), list(raw)
        text = self.tokenizer.decode([token_id])
        return text, list(text.encode())


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in for each byte (byte-level BPE vocabularies spell tokens so)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    spare = iter(range(256, 512))
    return {chr(code if code in printable else next(spare)): code for code in range(256)}


_UNICODE_TO_BYTE = _byte_level_alphabet()


def _logprobs(entries: list[TokenLogprob], answer: _Answer, tokens: _TokenTexts) -> dict | None:
    """OpenAI's ``logprobs`` of a choice: chat's ``content`` list, or the legacy completion
    lists (``text_offset`` counted from the completion's start)."""
    if answer.logprobs is None:
        return None
    if answer.chat:
        def item(token_id: int, logprob: float) -> dict:
            text, raw = tokens(token_id)
            return {"token": text, "logprob": _finite(logprob), "bytes": raw}
        return {"content": [{**item(entry.token_id, entry.logprob),
                             "top_logprobs": [item(*top) for top in entry.top]}
                            for entry in entries], "refusal": None}
    texts = [tokens(entry.token_id)[0] for entry in entries]
    offsets = [sum(len(text) for text in texts[:i]) for i in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [_finite(e.logprob) for e in entries],
            "top_logprobs": [{tokens(token_id)[0]: _finite(value) for token_id, value in e.top}
                             for e in entries] if answer.logprobs else None,
            "text_offset": offsets}


def _finite(logprob: float) -> float:
    return max(logprob, -9999.0)  # OpenAI's floor: JSON has no -inf


async def _generate(engine: Engine, prompts: list[list[int]], adapter: str | None,
                    sampling: Sampling) -> AsyncGenerator[Event, None]:
    """The engine's events for one request; leaving early (a client gone) cancels it."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Event] = asyncio.Queue()

    def deliver(event: Event) -> None:  # called on the engine's thread
        try:
            loop.call_soon_threadsafe(queue.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    request = Request(prompts, adapter, sampling, deliver)
    engine.submit(request)
    remaining = len(prompts) * sampling.n
    try:
        while remaining:
            event = await queue.get()
            if event.kind == "error":
                raise ApiError(500, f"generation failed: {event.text}", kind="server_error")
            remaining -= event.kind == "done"
            yield event
    finally:
        request.cancelled.set()  # frees the sequences of a client that went away


async def _sse(events: AsyncGenerator[Event, None], header: dict, n_choices: int,
               prompt_tokens: int, answer: _Answer, tokens: _TokenTexts,
               include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk per choice (chat), text deltas (a choice's tool calls,
    once read, as one ``tool_calls`` delta), finish reasons, [DONE]."""
    chat = answer.chat
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**header, 'object': kind, 'choices': choices, **extra})}\n\n"

    def choice(index: int, delta: dict, entries: tuple = (), reason: str | None = None) -> dict:
        logprobs = _logprobs(list(entries), answer, tokens) if entries else None
        if chat:
            return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
        return {"index": index, "text": delta.get("content", ""), "logprobs": logprobs,
                "finish_reason": reason}

    streams = {index: ToolCallStream(answer.tools.prefix, answer.tools.single)
               for index in range(n_choices)} if chat and answer.tools.parse else {}
    if chat:
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for index in range(n_choices)])
    finished = []
    try:
        async for event in events:
            stream = streams.get(event.index)
            if event.kind == "delta":
                text = stream.feed(event.text) if stream else event.text
                if text or event.logprobs:
                    yield chunk([choice(event.index, {"content": text} if text else {},
                                        event.logprobs)])
                continue
            finished.append(event)
            reason, entries = event.finish_reason, event.logprobs
            if stream:
                rest, calls = stream.finish()
                if rest or entries:
                    yield chunk([choice(event.index, {"content": rest} if rest else {},
                                        entries)])
                    entries = ()
                if calls:
                    reason = "tool_calls"
                    yield chunk([choice(event.index, {"tool_calls": [
                        {"index": number, **call} for number, call in enumerate(calls)]})])
            yield chunk([choice(event.index, {}, entries, reason)])
    except ApiError as error:  # the status line is sent already: report it in the stream
        yield f"data: {json.dumps(error.body())}\n\n"
        return
    finally:
        await events.aclose()  # a client that left: cancel its request now, not at GC time
    if include_usage:
        yield chunk([], usage=_usage(prompt_tokens, finished))
    yield "data: [DONE]\n\n"


def _usage(prompt_tokens: int, finished) -> dict:
    completion_tokens = sum(event.completion_tokens for event in finished)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# --- the command -------------------------------------------------------------------------------


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``, or a clear error when it cannot be had."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as error:
        listener.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror}",
                          where="--host/--port",
                          fix="pick a free port (--port 8001) or an address of this machine"
                          ) from None
    listener.listen(2048)
    return listener


def serve(runs: list[str], *, base: str | None = None, api_key: str | None = None,
          host: str = "127.0.0.1", port: int = 8000, console=None,
          engine: str = "own") -> None:
    """Load the runs' adapters on their base (or, with no runs, the ``base`` model alone) and
    answer OpenAI API requests until Ctrl-C; ``engine`` llama.cpp or vllm generates elsewhere
    (``ship/engines.py``) behind the same API."""
    import uvicorn

    listener = bind_socket(host, port)  # before the slow model load: a busy port fails fast
    if engine == "own":
        model, tokenizer, served = load_served_models(runs, base=base)
        app = create_app(model, tokenizer, served, api_key=api_key)
    else:
        from tunelab.ship.engines import load_engine

        tokenizer, served, other = load_engine(engine, runs, base=base, console=console)
        app = create_app(None, tokenizer, served, api_key=api_key, engine=other)
    if console is not None:
        console.print(f"Serving {', '.join(m.name for m in served)} on "
                      f"http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
