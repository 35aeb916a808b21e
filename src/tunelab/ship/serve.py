"""OpenAI-compatible HTTP API: several runs' adapters on one base model, picked per request.

``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, streaming as
server-sent events; ``model`` names a run (its adapter) or the base. With no runs, ``--base
MODEL`` serves a bare base model (the endpoint of a prompting baseline, ``eval/endpoint.py``).
Chat messages are rendered by ``data/render.py``, the renderer training uses, so a tuned model
reads its prompts exactly as it was trained on them. Generation runs in ``ship/engine.py``
(continuous batching on one thread). A request is checked completely before it reaches the
model: problems come back as 4xx with OpenAI's error body ``{"error": {"message", "type",
"param", "code"}}``, never a 500.
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
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException

from tunelab.errors import ConfigError, DataError, RunError
from tunelab.run.directory import RunDir, open_run
from tunelab.run.load import attach_adapter, load_run_base, run_base
from tunelab.ship.engine import Engine, Event, Request, Sampling, context_length

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
MAX_CHOICES = 16
MAX_STOP_STRINGS = 4
DEFAULT_CHAT_MAX_TOKENS = 256  # OpenAI's "up to the context" is minutes on a CPU
DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's documented default for /v1/completions

#: Request fields of OpenAI's API that this server does not implement, and their no-op values.
UNSUPPORTED = {"tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
               "function_call": (None, "none"), "logprobs": (None, False, 0),
               "top_logprobs": (None, 0), "logit_bias": (None, {}), "echo": (None, False),
               "suffix": (None, ""), "best_of": (None, 1), "presence_penalty": (None, 0),
               "frequency_penalty": (None, 0), "response_format": (None, {"type": "text"}),
               "audio": (None,), "prediction": (None,)}


@dataclass(frozen=True)
class ServedModel:
    """A model id clients ask for: a run's adapter, or the base (``adapter`` None)."""

    name: str
    adapter: str | None
    chat_template: str | None = None  # the run's data.chat_template, as training used it
    chat_template_kwargs: dict | None = None  # and its data.chat_template_kwargs


# --- loading -----------------------------------------------------------------------------------


def load_served_models(runs: list[str], *, base: str | None = None):
    """The base model with every run's adapter loaded under its own name, the tokenizer and
    the served model ids (the base first). ``NAME=RUN`` serves a run under another name; no
    runs and ``base`` serve that base model alone (a prompting baseline's endpoint).

    Runs need only their config, adapter and base here, not their data files; a QLoRA run's
    base is loaded in 4 bits, as it was trained."""
    if not runs:
        return _load_bare_base(base)
    opened = []
    for argument in runs:
        name, path = _named_run(argument)
        run, config = open_run(path, need_data=False)
        opened.append((name or config.name, run, config))
    for _, run, config in opened:
        _check_servable(run, config)
    names = [name for name, _, _ in opened]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise RunError(f"two runs would be served as {duplicates[0]!r}", where="tunelab serve",
                       fix="give one another name: tunelab serve NEWNAME=RUN_DIR ...")
    base_path, gguf_file = _common_base(opened, base)
    model, tokenizer = load_run_base(opened[0][1], opened[0][2], base=(base_path, gguf_file))
    served = [ServedModel(base_path if gguf_file is None else f"{base_path}/{gguf_file}", None)]
    for number, (name, run, config) in enumerate(opened):
        adapter = f"adapter{number}"  # peft keys modules by adapter name: no dots allowed
        model = attach_adapter(model, run, config, name=adapter)
        served.append(ServedModel(name, adapter, config.data.chat_template,
                                  config.data.chat_template_kwargs))
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


def _named_run(argument: str) -> tuple[str | None, Path]:
    name, sep, path = argument.partition("=")
    if sep and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name):
        return name, Path(path)
    return None, Path(argument)


def _check_servable(run: RunDir, config) -> None:
    from tunelab.model.adapters import METHODS

    if not METHODS[config.method.kind].adapter:
        raise RunError(f"{run} is a {config.method.kind} fine-tune, not an adapter; tunelab "
                       "serve serves adapters on a shared base", where=str(run),
                       fix=f"serve its weights as the base: tunelab serve OTHER_RUN --base "
                       f"{run.final_folder(config.method.kind)}, or train with method.kind lora")
    run.final_weights(config.method.kind)  # a RunError when the run has no final adapter


def _common_base(opened: list, base: str | None) -> tuple[str, str | None]:
    """The one base every run was trained on (each found as :func:`run.load.run_base` finds
    it), or ``base``; QLoRA runs (a 4-bit base) and others never share one."""
    from tunelab.model.adapters import METHODS

    in_4bit = {METHODS[config.method.kind].load_in_4bit for _, _, config in opened}
    bases = {run_base(run, config) for _, run, config in opened}
    if len(in_4bit) > 1 or (base is None and len(bases) > 1):
        listing = "; ".join(f"{run}: {config.model.path}"
                            + (" in 4 bits (QLoRA)" if METHODS[config.method.kind].load_in_4bit
                               else "") for _, run, config in opened)
        raise RunError(f"these runs were trained on different base models ({listing})",
                       where="tunelab serve",
                       fix="serve runs of one base together (one server per base), or pass "
                       "--base MODEL if the bases are the same model at different paths")
    return (base, None) if base is not None else bases.pop()


# --- requests ----------------------------------------------------------------------------------


class _Strict(BaseModel):
    # strict: "0.5" is not a number and "true" is not a boolean; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class ContentPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]


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


class ChatRequest(_Generation):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Generation):
    prompt: str | list[str] = Field(min_length=1)


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
        problems = [(_param(e["loc"]), e["msg"]) for e in error.errors()]
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
    if not isinstance(parsed, dict):
        raise ApiError(400, "the request body must be a JSON object", code="invalid_json")
    return parsed


# --- the app -----------------------------------------------------------------------------------


@dataclass
class _Context:
    engine: Engine
    tokenizer: Any
    models: dict[str, ServedModel]
    context_tokens: int
    max_body_bytes: int


def create_app(model, tokenizer, served: list[ServedModel], *, api_key: str | None = None,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI app; its engine thread starts and stops with the app's lifespan."""
    engine = Engine(model, tokenizer)
    context = _Context(engine, tokenizer, {m.name: m for m in served},
                       context_length(model), max_body_bytes)

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
        parsed = _parse(ChatRequest, await _read_json(request, max_body_bytes))
        served_model = _served(context, parsed.model)
        prompt = _chat_prompt_ids(parsed.messages, tokenizer, served_model.chat_template,
                                  served_model.chat_template_kwargs)
        limit = parsed.max_completion_tokens or parsed.max_tokens
        return await _respond(context, parsed, served_model, [prompt], limit, chat=True)

    @router.post("/completions")
    async def completions(request: HttpRequest):
        parsed = _parse(CompletionRequest, await _read_json(request, max_body_bytes))
        served_model = _served(context, parsed.model)
        texts = [parsed.prompt] if isinstance(parsed.prompt, str) else parsed.prompt
        prompts = [_text_prompt_ids(text, tokenizer) for text in texts]
        return await _respond(context, parsed, served_model, prompts, parsed.max_tokens,
                              chat=False)

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


def _chat_prompt_ids(messages: list[ChatMessage], tokenizer, chat_template: str | None,
                     chat_template_kwargs: dict | None = None) -> list[int]:
    """The conversation as the ids the model reads next, rendered as training rendered it."""
    from tunelab.data.render import chat_prompt

    turns = [{"role": "system" if m.role == "developer" else m.role,
              "content": m.content if isinstance(m.content, str)
              else "".join(part.text for part in m.content)} for m in messages]
    try:
        return chat_prompt(turns, tokenizer, chat_template=chat_template,
                           chat_template_kwargs=chat_template_kwargs).ids
    except DataError as error:
        raise ApiError(400, error.message, param="messages") from None


def _text_prompt_ids(text: str, tokenizer) -> list[int]:
    """A raw prompt's ids: BOS first where the tokenizer's models expect one, as in training."""
    from tunelab.data.render import bos_to_add

    bos = bos_to_add(tokenizer)
    return ([bos] if bos is not None else []) + tokenizer(text, add_special_tokens=False)[
        "input_ids"]


def _sampling(parsed: _Generation, prompts: list[list[int]], max_tokens: int | None,
              context_tokens: int, chat: bool) -> Sampling:
    """Sampling settings, with max_tokens checked against the room the context leaves."""
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
                    top_p=parsed.top_p, stop=tuple(stop), seed=parsed.seed, n=parsed.n)


# --- responses ---------------------------------------------------------------------------------


async def _respond(context: _Context, parsed: _Generation, served_model: ServedModel,
                   prompts: list[list[int]], max_tokens: int | None, *, chat: bool):
    sampling = _sampling(parsed, prompts, max_tokens, context.context_tokens, chat)
    events = _generate(context.engine, prompts, served_model.adapter, sampling)
    header = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}",
              "created": int(time.time()), "model": served_model.name}
    prompt_tokens = sum(len(prompt) for prompt in prompts)
    if parsed.stream:
        include_usage = bool(parsed.stream_options and parsed.stream_options.include_usage)
        return StreamingResponse(
            _sse(events, header, len(prompts) * sampling.n, prompt_tokens, chat, include_usage),
            media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    texts: dict[int, list[str]] = {}
    finished: dict[int, Event] = {}
    async for event in events:
        if event.kind == "delta":
            texts.setdefault(event.index, []).append(event.text)
        else:
            finished[event.index] = event
    choices = []
    for index in sorted(finished):
        text = "".join(texts.get(index, []))
        content = {"message": {"role": "assistant", "content": text}} if chat else {"text": text}
        choices.append({"index": index, **content, "logprobs": None,
                        "finish_reason": finished[index].finish_reason})
    return {**header, "object": "chat.completion" if chat else "text_completion",
            "choices": choices, "usage": _usage(prompt_tokens, finished.values())}


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
               prompt_tokens: int, chat: bool, include_usage: bool) -> AsyncIterator[str]:
    """OpenAI's stream: a role chunk per choice (chat), text deltas, finish reasons, [DONE]."""
    kind = "chat.completion.chunk" if chat else "text_completion"

    def chunk(choices: list[dict], **extra) -> str:
        return f"data: {json.dumps({**header, 'object': kind, 'choices': choices, **extra})}\n\n"

    def choice(index: int, text: str | None, reason: str | None) -> dict:
        if chat:
            delta = {} if text is None else {"content": text}
            return {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
        return {"index": index, "text": text or "", "logprobs": None, "finish_reason": reason}

    if chat:
        yield chunk([{"index": index, "delta": {"role": "assistant", "content": ""},
                      "logprobs": None, "finish_reason": None} for index in range(n_choices)])
    finished = []
    try:
        async for event in events:
            if event.kind == "delta":
                yield chunk([choice(event.index, event.text, None)])
            else:
                finished.append(event)
                yield chunk([choice(event.index, None, event.finish_reason)])
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
          host: str = "127.0.0.1", port: int = 8000, console=None) -> None:
    """Load the runs' adapters on their base (or, with no runs, the ``base`` model alone) and
    answer OpenAI API requests until Ctrl-C."""
    import uvicorn

    listener = bind_socket(host, port)  # before the slow model load: a busy port fails fast
    model, tokenizer, served = load_served_models(runs, base=base)
    app = create_app(model, tokenizer, served, api_key=api_key)
    if console is not None:
        console.print(f"Serving {', '.join(m.name for m in served)} on "
                      f"http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="info"))
    try:
        server.run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C after its graceful shutdown
        pass
