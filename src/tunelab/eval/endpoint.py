"""Prompting baselines from any OpenAI-compatible endpoint: the local evaluation's prompts,
demonstrations, parsing and scoring, with the answers asked over HTTP.

``evaluate_endpoint(config, endpoint, ...)`` measures what a hosted API, vLLM, Ollama,
llama.cpp's server or ``tunelab serve`` scores on the config's eval task. Examples, few-shot
demonstrations (``evaluate.choose_demos``) and prompts (``data/tokenize.eval_prompts`` with the
config's tokenizer) are built as ``tunelab eval`` builds them; template, instruction and
completion data go to ``/v1/completions`` as the rendered prompt text, chat data to
``/v1/chat/completions`` as the messages (the server applies its own chat template). Answers
are generated greedily (temperature 0) and parsed by ``Task.parse``, so ``predict: score``
(label log-likelihoods) becomes "generate a label and parse it": a budget of the longest label
plus ``LABEL_SLACK_TOKENS`` tokens, or ``eval.max_new_tokens`` with ``predict: generate``.

Answers are cached on disk, one JSONL file per endpoint and model, keyed by the model and the
request body (not the URL: a server that moved keeps its answers); each answer is appended and
flushed as it arrives, so an interrupted evaluation resumes and a rerun asks nothing. Requests
run on ``concurrency`` threads, are spaced to ``requests_per_minute``, and are retried with
exponential backoff and jitter on connection errors, 429 and 5xx (``Retry-After`` honoured).
The standard library's HTTP client is used, so no dependency is added.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.config import Config, EvalConfig
from tunelab.data.formats import Example, Message, last_trained_turn
from tunelab.data.prepare import read_eval_splits, with_prompt
from tunelab.data.render import bos_to_add
from tunelab.data.tokenize import EvalPrompt, eval_prompts
from tunelab.errors import ConfigError, RunError
from tunelab.eval.evaluate import choose_demos, render_eval, strip_thinking
from tunelab.eval.result import SCHEMA_VERSION, EvalResult
from tunelab.eval.stats import spread
from tunelab.eval.tasks import Task
from tunelab.run.directory import eval_name

#: Tokens a generated label may take beyond the longest label's own ("The answer: ...").
LABEL_SLACK_TOKENS = 8
#: OpenAI's API takes at most four stop strings; further ones are applied to the answer here.
MAX_STOP_STRINGS = 4
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
MAX_RETRY_AFTER_S = 300.0
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_ENDPOINT_FIX = ("write NAME=URL or NAME=URL#MODEL, e.g. --baseline "
                 "local=http://127.0.0.1:8000/v1 or --baseline big=https://api.openai.com/v1"
                 "#gpt-4o-mini")
_PRICE_FIX = "write NAME=IN/OUT in USD per 1M prompt / completion tokens, e.g. big=0.15/0.60"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server to ask, and how to ask it."""

    name: str  # names the baseline in results and the answer cache
    url: str  # the API's base URL, with or without its trailing /v1
    model: str | None = None  # None: the first id of GET /v1/models
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the key (optional)
    concurrency: int = 4  # requests in flight at once
    max_retries: int = 5  # further tries after a connection error, 429 or 5xx
    requests_per_minute: float | None = None  # None: as fast as concurrency allows
    timeout_s: float = 120.0  # per request

    @property
    def api_base(self) -> str:
        """The URL that ``/completions`` and ``/models`` follow: ends in ``/v1``."""
        base = self.url.rstrip("/")
        return base if base.endswith("/v1") else f"{base}/v1"


def parse_endpoint(text: str) -> Endpoint:
    """``"NAME=URL"`` or ``"NAME=URL#MODEL"`` → Endpoint; ConfigError when malformed."""
    name, sep, rest = text.partition("=")
    url, hash_sign, model = rest.partition("#")
    url, model = url.strip(), model.strip()
    if not sep or not _NAME.fullmatch(name.strip()):
        problem = f"{text!r} does not start with a name (letters, digits, . _ -) and '='"
    elif not re.fullmatch(r"https?://[^/\s#]+(/\S*)?", url):
        problem = f"{url!r} in {text!r} is not an http:// or https:// URL"
    elif hash_sign and not model:
        problem = f"{text!r} has '#' but no model name after it"
    else:
        return Endpoint(name.strip(), url, model or None)
    raise ConfigError(problem, where="--baseline", fix=_ENDPOINT_FIX)


@dataclass(frozen=True)
class Price:
    """What an endpoint charges, in USD per million prompt and completion tokens."""

    name: str
    prompt_usd_per_million: float
    completion_usd_per_million: float


def parse_price(text: str) -> Price:
    """``"NAME=IN/OUT"`` (e.g. ``big=0.15/0.60``) → Price; ConfigError when malformed."""
    name, sep, rest = text.partition("=")
    prompt, slash, completion = rest.partition("/")
    try:
        prices = (float(prompt), float(completion)) if slash else None
    except ValueError:
        prices = None
    if not sep or not _NAME.fullmatch(name.strip()):
        problem = f"{text!r} does not start with a name (letters, digits, . _ -) and '='"
    elif prices is None or not all(0 <= price < float("inf") for price in prices):
        problem = f"{rest!r} in {text!r} is not two prices ≥ 0 as IN/OUT"
    else:
        return Price(name.strip(), *prices)
    raise ConfigError(problem, where="--price", fix=_PRICE_FIX)


def cost_per_request(usage: dict, price: Price) -> dict:
    """USD per request from ``usage["per_request"]`` (as ``evaluate_endpoint`` reports it);
    None where the endpoint did not report token counts."""
    per_request = usage.get("per_request") or {}
    prompt_tokens, completion_tokens = (per_request.get("prompt_tokens"),
                                        per_request.get("completion_tokens"))
    prompt_usd = (None if prompt_tokens is None
                  else prompt_tokens * price.prompt_usd_per_million / 1e6)
    completion_usd = (None if completion_tokens is None
                      else completion_tokens * price.completion_usd_per_million / 1e6)
    total = None if prompt_usd is None or completion_usd is None else prompt_usd + completion_usd
    return {"price": price.name, "prompt_usd": prompt_usd, "completion_usd": completion_usd,
            "total_usd": total}


# --- the evaluation ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _Query:
    """One request: its path under /v1, its JSON body, and the answer cache's key for it."""

    path: str
    body: dict

    @property
    def key(self) -> str:
        # the body names the model; the URL is left out on purpose
        text = json.dumps({"path": self.path, "body": self.body}, sort_keys=True,
                          ensure_ascii=False)
        return hashlib.sha256(text.encode()).hexdigest()


def evaluate_endpoint(config: Config, endpoint: Endpoint, *, split: str, shots: int,
                      prompt: str | None, cache_dir: str | Path,
                      console: Console | None = None) -> dict:
    """The config's eval task on ``split`` ("validation" or "test") with ``shots``
    demonstrations under ``prompt`` (None: data.prompt), answered by ``endpoint``.

    Returns a base-only evaluation's result as ``tunelab eval`` writes it (``EvalResult``
    as plain data, its model named "base") plus ``usage`` (token counts as the endpoint
    reported them, None where it did not; ``requests``: answers asked now, not from the cache)
    and ``endpoint`` (name, url, model).
    """
    console = console or Console()
    eval_cfg = _eval_settings(config, split, shots)
    template = _prompt_template(config, prompt)
    task = Task.from_config(eval_cfg)
    splits = read_eval_splits(config.data, split=split, seed=config.train.seed,
                              max_examples=eval_cfg.max_examples)
    examples = with_prompt(splits.evaluated, config.data, template)
    demos = None
    if shots and splits.train.records:
        demos = choose_demos(examples, with_prompt(splits.train, config.data, template),
                             shots=shots, seed=eval_cfg.seed)
    from tunelab.model.load import load_tokenizer

    tokenizer = load_tokenizer(config.model.path, config.model.gguf_file)
    prompts = eval_prompts(examples, tokenizer, chat_template=config.data.chat_template,
                           chat_template_kwargs=config.data.chat_template_kwargs, demos=demos,
                           max_seq_len=config.train.max_seq_len)
    client = _Client(endpoint)
    model = endpoint.model or client.first_model()
    settings = _request_settings(task, eval_cfg, tokenizer, model)
    queries = [_query(example, shown, rendered, tokenizer, settings)
               for example, shown, rendered in zip(examples, demos or [[]] * len(examples),
                                                   prompts, strict=True)]
    cache = AnswerCache(Path(cache_dir) / _cache_name(endpoint.name, model))
    started = time.perf_counter()
    console.print(f"Asking {endpoint.name} ({model} at {endpoint.api_base}): "
                  f"{len(queries)} prompts, {cache.count([q.key for q in queries])} cached")
    answers = _ask_all(client, cache, queries, endpoint.concurrency)
    outcome = _outcome(task, eval_cfg, splits.evaluated.records, examples, prompts, template,
                       [answer["text"] for answer in answers])
    result = {"name": eval_name(split), "task": task.kind, "split": split,
              "n": len(examples), "primary_metric": task.primary, "shots": shots,
              "ci_level": 0.95, "n_resamples": eval_cfg.bootstrap, "predict": "generate",
              "leakage": None, "models": {"base": outcome}, "comparison": {},
              "wall_s": round(time.perf_counter() - started, 1),
              "schema_version": SCHEMA_VERSION}
    typed = EvalResult.model_validate(EvalResult.jsonable(result))
    render_eval(typed, console)
    plain = typed.to_dict()
    for prediction, answer in zip(plain["models"]["base"]["predictions"], answers, strict=True):
        prediction["finish_reason"] = answer.get("finish_reason")
    return {**plain, "usage": _usage(answers, client),
            "endpoint": {"name": endpoint.name, "url": endpoint.api_base, "model": model}}


def _eval_settings(config: Config, split: str, shots: int) -> EvalConfig:
    """The config's eval section evaluated on ``split`` with ``shots`` demonstrations."""
    if config.eval is None:
        raise ConfigError("the config has no eval section", where="eval",
                          fix="add e.g. eval: {task: classification, labels: [negative, "
                          "positive]}")
    if split not in ("validation", "test"):
        raise ConfigError(f"split {split!r} is neither validation nor test", where="split",
                          fix="evaluate the validation split (to choose a prompt) or test")
    if shots < 0:
        raise ConfigError(f"shots is {shots}", where="shots", fix="pass 0 or more")
    return config.eval.model_copy(update={"split": split, "shots": shots})


def _prompt_template(config: Config, prompt: str | None) -> str | None:
    """The prompt template the records are read with: ``prompt``, else data.prompt; None for
    data in a format of its own (chat, instruction, completion), which takes no template."""
    data = config.data
    if data.format == "text":
        raise ConfigError("plain text data (data.format text) has no prompt and reference to "
                          "evaluate", where="data.format",
                          fix="evaluate chat, instruction, completion or template data")
    if prompt is not None and data.prompt is None:
        raise ConfigError(f"a prompt template is given, but the data is read as {data.format!r}"
                          ", which brings its own prompts", where="prompt",
                          fix="leave the prompt out, or use template data (data.prompt and "
                          "data.completion)")
    return data.prompt if prompt is None else prompt


@dataclass(frozen=True)
class _Settings:
    """What every request of one evaluation shares."""

    model: str
    max_tokens: int
    stop: tuple[str, ...]


def _request_settings(task: Task, eval_cfg: EvalConfig, tokenizer, model: str) -> _Settings:
    """The model, the answer's token budget and the stop strings (eval.stop)."""
    max_tokens = eval_cfg.max_new_tokens
    if task.scores_labels and eval_cfg.predict != "generate":
        # predict: score needs log-likelihoods, which endpoints rarely give: a label is
        # generated instead, with room for the longest label and a few words around it
        longest = max(len(tokenizer(" " + label, add_special_tokens=False)["input_ids"])
                      for label in eval_cfg.labels)
        max_tokens = min(max_tokens, longest + LABEL_SLACK_TOKENS)
    return _Settings(model, max_tokens, tuple(eval_cfg.stop))


def _query(example: Example, demos: list[Example], prompt: EvalPrompt, tokenizer,
           settings: _Settings) -> _Query:
    """The request for one example: chat data as messages, the rest as the rendered text."""
    body: dict[str, Any] = {"model": settings.model, "max_tokens": settings.max_tokens,
                            "temperature": 0}
    if settings.stop:
        body["stop"] = list(settings.stop[:MAX_STOP_STRINGS])
    if example.messages is not None:
        body["messages"] = [_openai_message(m) for m in _chat_messages(example, demos)]
        if example.tools:
            body["tools"] = example.tools
        return _Query("/chat/completions", body)
    text = prompt.text
    bos = tokenizer.bos_token if bos_to_add(tokenizer) is not None else None
    if bos and text.startswith(bos):  # a truncated prompt's decoded text: the server adds BOS
        text = text[len(bos):]
    return _Query("/completions", {**body, "prompt": text})


def _chat_messages(example: Example, demos: list[Example]) -> list[Message]:
    """The conversation before the reference turn, demonstrations as earlier solved turns
    after the query's leading system messages (as ``render.prompt_segments`` lays them out)."""
    query = example.messages[:last_trained_turn(example.messages)]
    lead = 0
    while lead < len(query) and query[lead].role == "system":
        lead += 1
    shown = []
    for demo in demos:
        solved = demo.messages[:last_trained_turn(demo.messages) + 1]
        shown += [message for message in solved if message.role != "system"]
    return query[:lead] + shown + query[lead:]


def _openai_message(message: Message) -> dict:
    """A Message as OpenAI's chat API takes it (tool-call arguments as JSON text)."""
    turn: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        turn["tool_calls"] = [
            {**call, "function": {**call["function"],
                                  "arguments": json.dumps(call["function"]["arguments"])}}
            for call in message.tool_calls]
    if message.tool_call_id is not None:
        turn["tool_call_id"] = message.tool_call_id
    return turn


def _outcome(task: Task, eval_cfg: EvalConfig, records: list, examples: list[Example],
             prompts: list[EvalPrompt], template: str | None, outputs: list[str]) -> dict:
    """The answers parsed and scored as ``evaluate`` scores a generated answer."""
    outputs = [_cut_at_stop(output, eval_cfg.stop) for output in outputs]
    stripped = [strip_thinking(output) for output in outputs]
    kinds = [kind for _, kind in stripped]
    if eval_cfg.strip_thinking:
        outputs = [answer for answer, _ in stripped]
    parsed = [task.parse(output) for output in outputs]
    predictions = [prediction for prediction, _ in parsed]
    failures = sum(failed for _, failed in parsed)
    golds = [task.gold(prompt.target) for prompt in prompts]
    contexts = [eval_cfg.context.format_map(record.fields) if eval_cfg.context else None
                for record in records]
    scored = task.score(golds, predictions, contexts)
    parse_failures = {"count": failures, "rate": failures / max(1, len(examples))}
    return {
        "metrics": scored.metrics, **scored.extra,
        "variants": [{"prompt": template, "metrics": scored.metrics,
                      "parse_failures": parse_failures}],
        "parse_failures": parse_failures,
        "thinking": {"closed": kinds.count("closed"), "unterminated": kinds.count("unterminated"),
                     "stripped": eval_cfg.strip_thinking},
        "sensitivity": {name: spread([metric["value"]]) for name, metric in
                        scored.metrics.items()},
        "predictions": [{"index": i, "input": p.text[-600:], "gold": _shown(g),
                         "prediction": output, "score": s}
                        for i, (p, g, output, s) in enumerate(zip(
                            prompts, golds, outputs, scored.per_example, strict=True))],
    }


def _cut_at_stop(text: str, stop: list[str]) -> str:
    """The answer before its first stop string (a server may ignore stop strings past four)."""
    cuts = [index for index in (text.find(marker) for marker in stop) if index >= 0]
    return text[:min(cuts)] if cuts else text


def _shown(gold: Any) -> str:
    """A gold answer as an eval file shows it (NER's spans one per line)."""
    if isinstance(gold, (set, frozenset)):
        return "\n".join(f"{kind}: {span}" for kind, span in sorted(gold))
    return str(gold)


def _usage(answers: list[dict], client: _Client) -> dict:
    """Token counts summed over the answers (None when any answer lacks them), per answer."""
    reported = [answer.get("usage") for answer in answers]
    totals = {}
    for field in ("prompt_tokens", "completion_tokens"):
        values = [usage.get(field) if usage else None for usage in reported]
        totals[field] = None if not values or None in values else sum(values)
    latencies = [answer["latency_s"] for answer in answers if answer.get("latency_s") is not None]
    per_request = {field: None if total is None else total / len(answers)
                   for field, total in totals.items()}
    per_request["latency_s"] = sum(latencies) / len(latencies) if latencies else None
    return {**totals, "requests": client.answered, "cached": len(answers) - client.answered,
            "retries": client.retries, "per_request": per_request}


# --- asking ------------------------------------------------------------------------------------


def _ask_all(client: _Client, cache: AnswerCache, queries: list[_Query],
             concurrency: int) -> list[dict]:
    """Every query's answer: from the cache, else asked on ``concurrency`` threads and cached
    as it arrives. The first request that fails for good stops the rest."""
    answers = [cache.get(query.key) for query in queries]
    missing = [index for index, answer in enumerate(answers) if answer is None]
    if not missing:
        return answers
    pool = ThreadPoolExecutor(max_workers=max(1, concurrency))
    try:
        futures = {pool.submit(client.answer, queries[index]): index for index in missing}
        for future in as_completed(futures):
            index = futures[future]
            answers[index] = future.result()
            cache.put(queries[index], answers[index])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return answers


class _Retryable(Exception):
    """A failure worth another try (connection error, 429, 5xx), and how long to wait."""

    def __init__(self, problem: str, retry_after_s: float | None = None):
        super().__init__(problem)
        self.retry_after_s = retry_after_s


class _Client:
    """HTTP requests to one endpoint: key, retries with backoff, the rate limit, counts."""

    _jitter = random.Random()  # unseeded on purpose: clients that back off together spread out

    def __init__(self, endpoint: Endpoint):
        self.endpoint = endpoint
        self.key = os.environ.get(endpoint.api_key_env) or None
        self.answered = 0  # generation requests answered (not from the cache)
        self.retries = 0
        self._lock = threading.Lock()
        self._next_start = 0.0

    def first_model(self) -> str:
        """The first model id the endpoint lists (GET /v1/models)."""
        listing = self.request("GET", "/models")
        models = [entry.get("id") for entry in listing.get("data") or []
                  if isinstance(entry, dict) and entry.get("id")]
        if not models:
            raise RunError(f"{self.endpoint.api_base}/models lists no model",
                           where=f"--baseline {self.endpoint.name}",
                           fix="name the model: --baseline NAME=URL#MODEL")
        return models[0]

    def answer(self, query: _Query) -> dict:
        """One generated answer: its text, finish reason, usage (None if unreported), time."""
        started = time.perf_counter()
        response = self.request("POST", query.path, query.body)
        latency_s = time.perf_counter() - started
        choices = response.get("choices") or []
        if not choices or not isinstance(choices[0], dict):
            raise RunError(f"{self.endpoint.api_base}{query.path} answered without choices: "
                           f"{json.dumps(response)[:300]}", where=f"--baseline "
                           f"{self.endpoint.name}", fix="check that the URL is an "
                           "OpenAI-compatible API (its base, e.g. http://HOST:PORT/v1)")
        choice = choices[0]
        text = ((choice.get("message") or {}).get("content") if "message" in choice
                else choice.get("text")) or ""
        usage = response.get("usage") or None
        if usage:
            usage = {"prompt_tokens": usage.get("prompt_tokens"),
                     "completion_tokens": usage.get("completion_tokens")}
        with self._lock:
            self.answered += 1
        return {"text": text, "finish_reason": choice.get("finish_reason"), "usage": usage,
                "latency_s": round(latency_s, 3)}

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """The JSON answer to one request, retried on connection errors, 429 and 5xx."""
        url = f"{self.endpoint.api_base}{path}"
        attempts = self.endpoint.max_retries + 1
        for attempt in range(attempts):
            self._wait_turn()
            try:
                return self._send(method, url, body)
            except _Retryable as problem:
                last = problem
            if attempt + 1 < attempts:
                with self._lock:
                    self.retries += 1
                time.sleep(last.retry_after_s if last.retry_after_s is not None
                           else min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2 ** attempt)
                           * self._jitter.uniform(0.5, 1.5))
        raise RunError(f"the endpoint {self.endpoint.name} at {url} could not be reached "
                       f"after {attempts} attempts (last: {last})",
                       where=f"--baseline {self.endpoint.name}",
                       fix="check that the server is running and the URL (its API base, e.g. "
                       "http://127.0.0.1:8000/v1 for tunelab serve), or raise max_retries for "
                       "a busy server")

    def _wait_turn(self) -> None:
        """Space request starts to requests_per_minute (shared by every thread)."""
        if not self.endpoint.requests_per_minute:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next_start)
            self._next_start = start + 60.0 / self.endpoint.requests_per_minute
        time.sleep(max(0.0, start - now))

    def _send(self, method: str, url: str, body: dict | None) -> dict:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.key:
            headers["Authorization"] = f"Bearer {self.key}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(url, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.endpoint.timeout_s) as response:
                raw = response.read()
        except urllib.error.HTTPError as error:
            message = _error_message(error.read())
            if error.code == 429 or error.code >= 500:
                raise _Retryable(f"HTTP {error.code}: {message}",
                                 _retry_after_s(error.headers.get("Retry-After"))) from None
            raise self._refused(url, error.code, message) from None
        except OSError as error:  # refused, reset, timed out, DNS (URLError is an OSError)
            raise _Retryable(str(getattr(error, "reason", None) or error)) from None
        try:
            return json.loads(raw)
        except ValueError:
            raise RunError(f"{url} answered something that is not JSON: {raw[:200]!r}",
                           where=f"--baseline {self.endpoint.name}",
                           fix="check that the URL is an OpenAI-compatible API's base "
                           "(e.g. http://HOST:PORT/v1)") from None

    def _refused(self, url: str, status: int, message: str) -> RunError:
        """The error for a 4xx that another try would not change: key, model, request."""
        where, env = f"--baseline {self.endpoint.name}", self.endpoint.api_key_env
        if status in (401, 403):
            sent = f"the key from ${env}" if self.key else f"no key (${env} is not set)"
            return RunError(f"{url} refused {sent} with HTTP {status}: {message}", where=where,
                            fix=f"export {env}=<this endpoint's API key>")
        if status == 404:
            return RunError(f"{url} answered HTTP 404: {message}", where=where,
                            fix="check the model after # in NAME=URL#MODEL (GET "
                            f"{self.endpoint.api_base}/models lists them) and that the URL is "
                            "the API's base")
        return RunError(f"{url} refused a request with HTTP {status}: {message}", where=where,
                        fix="check the endpoint's limits (context length, max_tokens); "
                        "prompts are cut to train.max_seq_len, answers to eval.max_new_tokens")


def _error_message(raw: bytes) -> str:
    """The message of an OpenAI error body, else the body's start."""
    try:
        error = json.loads(raw).get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
    except (ValueError, AttributeError):
        pass
    return raw[:300].decode(errors="replace").strip() or "(no body)"


def _retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), capped; None when absent."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            return None
    return min(MAX_RETRY_AFTER_S, max(0.0, seconds))


# --- the answer cache --------------------------------------------------------------------------


def _cache_name(endpoint_name: str, model: str) -> str:
    """One file per endpoint and model; model ids may hold slashes (hub ids, paths)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_")[-60:]
    return f"{endpoint_name}--{readable}-{hashlib.sha256(model.encode()).hexdigest()[:8]}.jsonl"


class AnswerCache:
    """Answers on disk as JSONL (``{"key", "request", "answer"}`` per line), appended and
    flushed one by one; a line torn by an interruption is skipped when read back."""

    def __init__(self, path: Path):
        self.path = path
        self._answers: dict[str, dict] = {}
        self._lock = threading.Lock()
        raw = path.read_bytes() if path.is_file() else b""
        for line in raw.decode("utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                self._answers[entry["key"]] = entry["answer"]
            except (ValueError, KeyError, TypeError):
                continue  # torn by an interruption: asked again
        self._torn_end = bool(raw) and not raw.endswith(b"\n")

    def count(self, keys: list[str]) -> int:
        """How many of ``keys`` are answered already."""
        return sum(key in self._answers for key in keys)

    def get(self, key: str) -> dict | None:
        """The answer cached under ``key``, or None."""
        return self._answers.get(key)

    def put(self, query: _Query, answer: dict) -> None:
        """Remember an answer, on disk before this returns."""
        line = json.dumps({"key": query.key, "request": {"path": query.path, **query.body},
                           "answer": answer}, ensure_ascii=False)
        with self._lock:
            self._answers[query.key] = answer
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a", encoding="utf-8") as handle:
                if self._torn_end:  # a torn last line must not swallow the next one
                    handle.write("\n")
                    self._torn_end = False
                handle.write(line + "\n")
                handle.flush()
                os.fsync(handle.fileno())
