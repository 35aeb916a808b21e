"""Continuous batching for serving: one base model, several adapters, one token per turn.

One thread owns the model. Each turn of its loop admits the requests that arrived: the prompts
of all those for one adapter are prefilled together, left-padded, in one forward pass (split only
past ``max_prefill_tokens``). Then it advances every running sequence by one token with one
forward pass per adapter: the KV caches of all sequences on that adapter are left-padded to a
common length and stacked, so requests for the same adapter share forward passes, and a new
request starts on the next turn instead of waiting for an unrelated long generation to end. A
sequence leaves its batch when it finishes or its client goes away, and padding columns no row
needs are dropped.

Log-probabilities (``Sampling.logprobs``) are those of the model's own distribution: the
log-softmax of the very logits the token was picked from, before temperature and top-p (what
OpenAI and vLLM report). They are computed only for the rows that ask for them.
"""

from __future__ import annotations

import inspect
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked: greedy at temperature 0, else seeded nucleus sampling."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1  # choices per prompt
    # None: no log-probabilities (no extra work); k >= 0: each generated token's log-prob and
    # the k likeliest tokens' at its position
    logprobs: int | None = None


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability and the ``k`` likeliest at its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, log-prob), likeliest first


@dataclass(frozen=True)
class Event:
    """One report about one choice: text ``delta``s, then one ``done``; or an ``error``."""

    kind: str  # delta | done | error
    index: int = 0  # the choice: prompt number * n + choice number
    text: str = ""
    finish_reason: str | None = None  # stop | length
    completion_tokens: int = 0
    # the tokens generated since the choice's previous event (when Sampling.logprobs is set):
    # a delta's text may lag its tokens (held back for a stop string), the done event flushes
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass
class Request:
    """Prompt token ids for one adapter (``None``: the base model) and how to sample them.

    ``on_event`` is called from the engine's thread; setting ``cancelled`` drops the request's
    sequences at the next turn.
    """

    prompts: list[list[int]]
    adapter: str | None
    sampling: Sampling
    on_event: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class _Row:
    """One sequence being generated: a choice of a request."""

    request: Request
    index: int
    generator: torch.Generator  # shared by a request's choices: its samples depend on it alone
    tokens: list[int] = field(default_factory=list)
    sent_chars: int = 0
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet reported


@dataclass
class _Batch:
    """The running sequences of one adapter, their stacked KV cache and its padding mask."""

    rows: list[_Row]
    cache: DynamicCache
    mask: torch.Tensor  # [rows, columns]: 1 where the cache holds a real token, 0 for padding
    positions: torch.Tensor  # [rows]: the position id of each row's next input token


class Engine:
    """Generates for queued requests on a background thread; see the module docstring."""

    def __init__(self, model: nn.Module, tokenizer, *, max_prefill_tokens: int = 8192):
        self.model = model
        self.tokenizer = tokenizer
        self.device = next(model.parameters()).device
        self.eos_ids = {tokenizer.eos_token_id} - {None}
        self.pad_id = next((token for token in (tokenizer.pad_token_id, tokenizer.eos_token_id)
                            if token is not None), 0)
        # one prefill holds rows x longest prompt tokens (padding included) and their logits
        self.max_prefill_tokens = max_prefill_tokens
        # transformers 5 renamed past_key_values to cache; older releases know only the former
        body = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_argument = ("cache" if "cache" in inspect.signature(body.forward).parameters
                                else "past_key_values")
        self._inbox: queue.Queue[Request | None] = queue.Queue()
        self._batches: dict[str | None, _Batch] = {}
        self._thread = threading.Thread(target=self._loop, name="tunelab-engine", daemon=True)
        self.prefill_passes = 0  # one per adapter per turn in which its requests arrived
        self.decode_passes = 0  # forward passes after the prefills: one per adapter per turn
        self.cancelled_sequences = 0  # dropped because their client went away

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._inbox.put(None)
        self._thread.join(timeout_s)

    def submit(self, request: Request) -> None:
        self._inbox.put(request)

    def running_sequences(self) -> int:
        """How many sequences are being generated now (a cancelled one leaves at the next turn)."""
        return sum(len(batch.rows) for batch in list(self._batches.values()))

    def _loop(self) -> None:
        while True:
            arrived = [] if self._batches else [self._inbox.get()]  # idle: sleep until work
            while not self._inbox.empty():
                arrived.append(self._inbox.get_nowait())
            if None in arrived:
                return
            for group in _prefill_groups(arrived, self.max_prefill_tokens):
                self._guarded(group, self._admit, group)
            for adapter, batch in list(self._batches.items()):
                self._guarded([row.request for row in batch.rows], self._step, adapter)

    def _guarded(self, requests: list[Request], work: Callable, *args) -> None:
        """Run one piece of work; a failure fails the requests involved, not the server."""
        try:
            with torch.inference_mode():
                work(*args)
        except Exception as error:  # a bug or out-of-memory: report it, keep serving the rest
            logger.exception("generation failed")
            failed = {id(request): request for request in requests}
            for batch_adapter, batch in list(self._batches.items()):
                if any(id(row.request) in failed for row in batch.rows):
                    # the batch's cache may be half-updated: its other requests fail too
                    del self._batches[batch_adapter]
                    failed.update((id(row.request), row.request) for row in batch.rows)
            for request in failed.values():
                request.on_event(Event("error", text=f"{type(error).__name__}: {error}"))

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the prompts of ``requests`` (one adapter) in one forward pass, pick the first
        token of each choice, and join the adapter's running batch.

        The prompts are left-padded to the longest, with the padding masked and position ids
        counted from each prompt's first real token, so each row computes what its prompt alone
        would; a prompt with ``n`` choices is prefilled once and its cache row repeated.
        """
        live = []
        for request in requests:
            if request.cancelled.is_set():  # its client left before its prompts were read
                self.cancelled_sequences += len(request.prompts) * request.sampling.n
            else:
                live.append(request)
        if not live:
            return
        prompts = [(request, number, prompt) for request in live
                   for number, prompt in enumerate(request.prompts)]
        width = max(len(prompt) for _, _, prompt in prompts)
        input_ids = torch.tensor([[self.pad_id] * (width - len(prompt)) + prompt
                                  for _, _, prompt in prompts], device=self.device)
        lengths = torch.tensor([len(prompt) for _, _, prompt in prompts], device=self.device)
        mask = (torch.arange(width, device=self.device) >= width - lengths[:, None]).long()
        cache = DynamicCache()
        self.prefill_passes += 1
        logits = self._forward(live[0].adapter, cache, logits_to_keep=1, input_ids=input_ids,
                               attention_mask=mask,
                               position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
        generators = {id(request): _generator(request.sampling.seed) for request in live}
        rows = [_Row(request, number * request.sampling.n + choice, generators[id(request)])
                for request, number, _ in prompts for choice in range(request.sampling.n)]
        choices = torch.tensor([request.sampling.n for request, _, _ in prompts],
                               device=self.device)
        index = torch.repeat_interleave(torch.arange(len(prompts), device=self.device), choices)
        layers = [(keys[index], values[index]) for keys, values in _layers(cache)]
        batch = _Batch(rows, DynamicCache(layers), mask[index], lengths[index])
        self._advance(batch, logits[index])
        self._join(live[0].adapter, batch)

    def _step(self, adapter: str | None) -> None:
        """One forward pass for every running sequence of ``adapter``: one new token each."""
        batch = self._batches.pop(adapter)
        running = [i for i, row in enumerate(batch.rows) if not row.request.cancelled.is_set()]
        self.cancelled_sequences += len(batch.rows) - len(running)
        batch = _select(batch, running)
        if not batch.rows:
            return
        self.decode_passes += 1
        inputs = torch.tensor([[row.tokens[-1]] for row in batch.rows], device=self.device)
        batch.mask = F.pad(batch.mask, (0, 1), value=1)
        logits = self._forward(adapter, batch.cache, input_ids=inputs, attention_mask=batch.mask,
                               position_ids=batch.positions[:, None])
        batch.positions = batch.positions + 1
        self._advance(batch, logits)
        self._join(adapter, batch)

    def _advance(self, batch: _Batch, logits: torch.Tensor) -> None:
        """Pick each row's next token, report its text, and drop the rows that finished."""
        greedy = logits.argmax(-1).tolist()
        picked = []
        for number, row in enumerate(batch.rows):
            sampling = row.request.sampling
            picked.append(greedy[number] if sampling.temperature == 0 else _sample(
                logits[number], sampling.temperature, sampling.top_p, row.generator))
        _record_logprobs(batch.rows, logits, picked)
        running = []
        for number, row in enumerate(batch.rows):
            token = picked[number]
            row.tokens.append(token)
            if self._report(row, token):
                continue
            if row.request.cancelled.is_set():
                self.cancelled_sequences += 1
            else:
                running.append(number)
        if len(running) < len(batch.rows):
            replacement = _select(batch, running)
            batch.rows, batch.cache = replacement.rows, replacement.cache
            batch.mask, batch.positions = replacement.mask, replacement.positions

    def _report(self, row: _Row, token: int) -> bool:
        """Send the row's new text (held back while it may be the start of a stop string).

        Returns whether the row finished: end of sequence, a stop string, or its token budget.
        """
        text, ready, reason = settle(self.tokenizer.decode(row.tokens, skip_special_tokens=True),
                                     row.request.sampling, ended=token in self.eos_ids,
                                     produced=len(row.tokens))
        if ready > row.sent_chars:
            row.request.on_event(Event("delta", row.index, text[row.sent_chars:ready],
                                       logprobs=_take(row.pending_logprobs)))
            row.sent_chars = ready
        if reason:
            row.request.on_event(Event("done", row.index, finish_reason=reason,
                                       completion_tokens=len(row.tokens),
                                       logprobs=_take(row.pending_logprobs)))
        return reason is not None

    def _join(self, adapter: str | None, batch: _Batch) -> None:
        if not batch.rows:
            return
        running = self._batches.get(adapter)
        self._batches[adapter] = batch if running is None else _merge(running, batch)

    def _forward(self, adapter: str | None, cache: DynamicCache, **inputs) -> torch.Tensor:
        """The next-token logits of each row, with ``adapter`` on, extending ``cache``."""
        with self._adapter(adapter):
            output = self.model(**inputs, **{self._cache_argument: cache}, use_cache=True)
        return output.logits[:, -1]

    @contextmanager
    def _adapter(self, adapter: str | None) -> Iterator[None]:
        """Run the model with ``adapter`` active, or with every adapter off for the base."""
        if not hasattr(self.model, "disable_adapter"):  # a plain model: the base alone
            yield
        elif adapter is None:
            with self.model.disable_adapter():
                yield
        else:
            if self.model.active_adapter != adapter:
                self.model.set_adapter(adapter, inference_mode=True)
            yield


def context_length(model: nn.Module) -> int:
    """How many tokens (prompt and completion together) the model's positions cover."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    return int(getattr(config, "max_position_embeddings", None) or 2048)


def _generator(seed: int | None) -> torch.Generator:
    """A request's own random numbers: seeded by the client, else from the OS."""
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed & 0xFFFF_FFFF_FFFF_FFFF)
    return generator


def _prefill_groups(requests: list[Request], max_tokens: int) -> list[list[Request]]:
    """The requests of each adapter in arrival order, cut where one prefill would exceed
    ``max_tokens`` (rows x longest prompt, padding included; a larger request goes alone)."""
    by_adapter: dict[str | None, list[list[Request]]] = {}
    for request in requests:
        groups = by_adapter.setdefault(request.adapter, [[]])
        rows = sum(len(r.prompts) for r in groups[-1]) + len(request.prompts)
        width = max(len(prompt) for r in [*groups[-1], request] for prompt in r.prompts)
        if groups[-1] and rows * width > max_tokens:
            groups.append([])
        groups[-1].append(request)
    return [group for groups in by_adapter.values() for group in groups]


def _sample(logits: torch.Tensor, temperature: float, top_p: float,
            generator: torch.Generator) -> int:
    """A token from softmax(logits / temperature), limited to the top-``top_p`` mass."""
    probabilities = torch.softmax(logits.float().cpu() / temperature, -1)
    if top_p < 1.0:
        sorted_probabilities, order = probabilities.sort(descending=True)
        # keep the most likely tokens until their mass reaches top_p (always at least one)
        outside = sorted_probabilities.cumsum(-1) - sorted_probabilities >= top_p
        sorted_probabilities[outside] = 0
        probabilities = torch.zeros_like(probabilities).scatter(-1, order, sorted_probabilities)
    return int(torch.multinomial(probabilities, 1, generator=generator))


def _record_logprobs(rows: list[_Row], logits: torch.Tensor, picked: list[int]) -> None:
    """Each asking row's picked token's log-prob and its top-k, from the logits it was picked
    from (the model's distribution: no temperature, no top-p); nothing for the other rows."""
    asking = [number for number, row in enumerate(rows)
              if row.request.sampling.logprobs is not None]
    if not asking:
        return
    logprobs = torch.log_softmax(logits[asking].float(), -1)
    chosen = logprobs.gather(-1, torch.tensor([[picked[i]] for i in asking],
                                              device=logprobs.device))[:, 0].tolist()
    k = max(rows[i].request.sampling.logprobs for i in asking)
    top_values, top_ids = (logprobs.topk(k, -1) if k else (logprobs[:, :0], logprobs[:, :0]))
    top_values, top_ids = top_values.tolist(), top_ids.long().tolist()
    for place, number in enumerate(asking):
        row = rows[number]
        wanted = row.request.sampling.logprobs
        top = tuple(zip(top_ids[place][:wanted], top_values[place][:wanted], strict=True))
        row.pending_logprobs.append(TokenLogprob(picked[number], chosen[place], top))


def _take(pending: list[TokenLogprob]) -> tuple[TokenLogprob, ...]:
    taken = tuple(pending)
    pending.clear()
    return taken


def settle(text: str, sampling: Sampling, *, ended: bool,
           produced: int) -> tuple[str, int, str | None]:
    """A sequence's text so far → (the text cut at its first stop string, how many of its
    characters may be sent now, the finish reason or None): what every engine streams by."""
    reason = "stop" if ended else None
    cut = min((i for i in (text.find(s) for s in sampling.stop) if i >= 0), default=-1)
    if cut >= 0:
        text, reason = text[:cut], "stop"
    elif reason is None and produced >= sampling.max_new_tokens:
        reason = "length"
    return text, (len(text) if reason else safe_length(text, sampling.stop)), reason


def safe_length(text: str, stop: tuple[str, ...]) -> int:
    """How much of ``text`` can be sent: not a partial character, nor a stop string's start."""
    safe = len(text.rstrip("\ufffd"))  # an incomplete UTF-8 character decodes as U+FFFD
    for marker in stop:
        for size in range(min(len(marker) - 1, len(text)), 0, -1):
            if text.endswith(marker[:size]):
                safe = min(safe, len(text) - size)
                break
    return safe


def _layers(cache: DynamicCache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def _select(batch: _Batch, keep: list[int]) -> _Batch:
    """The batch with only rows ``keep``, minus the left padding columns no kept row needs."""
    if len(keep) == len(batch.rows):
        return batch
    if not keep:
        return _Batch([], DynamicCache(), batch.mask[:0], batch.positions[:0])
    index = torch.tensor(keep, device=batch.mask.device)
    mask = batch.mask[index]
    first = int(mask.any(0).int().argmax())  # the first column some kept row uses
    layers = [(keys[index, :, first:], values[index, :, first:])
              for keys, values in _layers(batch.cache)]
    return _Batch([batch.rows[i] for i in keep], DynamicCache(layers), mask[:, first:],
                  batch.positions[index])


def _merge(left: _Batch, right: _Batch) -> _Batch:
    """Stack two batches of one adapter, left-padding the shorter cache to the longer one."""
    width = max(left.mask.shape[1], right.mask.shape[1])

    def pad(tensor: torch.Tensor, dim_from_end: int) -> torch.Tensor:
        missing = width - tensor.shape[-dim_from_end]
        return F.pad(tensor, (0, 0) * (dim_from_end - 1) + (missing, 0)) if missing else tensor

    layers = [(torch.cat([pad(left_keys, 2), pad(right_keys, 2)]),
               torch.cat([pad(left_values, 2), pad(right_values, 2)]))
              for (left_keys, left_values), (right_keys, right_values)
              in zip(_layers(left.cache), _layers(right.cache), strict=True)]
    return _Batch(left.rows + right.rows, DynamicCache(layers),
                  torch.cat([pad(left.mask, 1), pad(right.mask, 1)]),
                  torch.cat([left.positions, right.positions]))
