"""What fine-tuning cost outside its task: general-text loss and a zero-shot probe, tuned − base.

Two small samples ship with the package (``tunelab/assets/forgetting/``, sources and licences
in the README there):

- ``general.jsonl``: 32 passages of encyclopedic English (one to three sentences, 22–44
  tokens, 1,050 in all) from 32 English Wikipedia articles (CC BY-SA). Their per-token loss is
  computed as training computes it: text-format examples tokenized by ``data/tokenize.py``,
  packed without padding, the summed cross-entropy of ``train/loss.py`` over all tokens
  (EOS included) divided by the number of target tokens.
- ``probe.jsonl``: 64 user-interface strings of Django's translations (BSD), 16 each in
  French, German, Spanish and Italian, no English original used twice, labelled with the
  language of the catalogue they come from. The probe asks zero-shot which language a string
  is in and scores each label by log-likelihood (``eval.generate.score_continuations``).

Why language identification: the offline labelled sets here are movie-review sentiment,
3-class tweet sentiment (the same skill as a sentiment tune), and Django's translation pairs.
Scoring the pairs by chrF would need generation, several times the cost of scoring labels;
their language, the file's own, is a gold label that needs no heuristic, and naming it draws
on what the model knows about other languages, a skill a review classifier is not trained on.
SmolLM2-135M-Instruct names 48 of the 64 (75%) with this prompt: room to lose, and to gain.

Why so small: an assessment runs the probe for about ten runs on two CPU cores within its
time budget, so one tuned pass is held to about 2,200 prompt and passage tokens (about 6 s for
a 135M model on two CPU cores, where 64 passages of 100–200 tokens would take half a minute);
the base model's numbers are computed once per assessment (``base_cache``). The intervals are
wide accordingly: the probe flags forgetting large enough to matter, not small drifts.
Intervals are paired bootstraps over passages and probe strings (``eval.stats``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from tunelab.data.formats import Example, to_examples
from tunelab.data.packing import collate, plan_batches
from tunelab.data.readers import read_records
from tunelab.data.tokenize import IGNORE_INDEX, eval_prompts, tokenize_examples
from tunelab.eval.generate import score_continuations
from tunelab.eval.stats import paired_bootstrap, ratio_statistic
from tunelab.model import varlen
from tunelab.model.adapters import METHODS, model_parts
from tunelab.run.directory import RunDir, open_run
from tunelab.run.load import load_run_model
from tunelab.train.loss import chunked_loss, hidden_states

SAMPLES = files("tunelab") / "assets" / "forgetting"
PROBE_NAME = "language identification (Django UI strings)"
PROBE_PROMPT = "Text: {text}\nLanguage:"
PROBE_COMPLETION = " {label}"
PROBE_LABELS = ("French", "German", "Spanish", "Italian")
BATCH_TOKENS = 2048  # tokens per packed row: the general sample is one row
MAX_PASSAGE_TOKENS = 512  # far above the passages' length: none is cut


@functools.lru_cache(maxsize=1)
def samples() -> tuple[list[Example], list[Example]]:
    """(general passages, probe examples) read from the shipped files, as ``Example``s."""
    general = to_examples(read_records(str(SAMPLES / "general.jsonl")), "text")
    probe = to_examples(read_records(str(SAMPLES / "probe.jsonl")), prompt=PROBE_PROMPT,
                        completion=PROBE_COMPLETION)
    return general, probe


def forgetting_probe(model: Any, tokenizer: Any, *, base_cache: dict | None = None,
                     base_key: str | None = None, n_resamples: int = 1000,
                     seed: int = 0) -> dict:
    """Tuned − base on the general text's per-token loss and on the probe task's accuracy.

    ``model`` carries a peft adapter; the base is the same model with it disabled. The base's
    per-example numbers are kept in ``base_cache`` under ``base_key`` (default: the base's
    path, dtype and quantisation), so the runs of one assessment measure the base once; a
    model without an adapter needs them there already (``forgetting_of_run`` does that).
    """
    key = base_key or base_reference(model)
    base = base_cache.get(key) if base_cache is not None and key else None
    if base is None:
        if not hasattr(model, "disable_adapter"):
            raise ValueError("forgetting_probe needs a peft model (its base is the adapter "
                             f"disabled) or the base's numbers in base_cache[{key!r}]")
        with model.disable_adapter():
            base = measure(model, tokenizer)
        if base_cache is not None and key:
            base_cache[key] = base
    return compare(base, measure(model, tokenizer), n_resamples=n_resamples, seed=seed)


def forgetting_of_run(run_dir: str | Path | RunDir, *, base_cache: dict | None = None,
                      console: Console | None = None) -> dict:
    """``forgetting_probe`` of a run's model, loaded as it was trained (``load_run_model``).

    A full fine-tuning run has no adapter to disable: its base is loaded on its own, once per
    ``base_cache``. The intervals take the run's ``eval.bootstrap`` and ``eval.seed`` where
    its config has an eval section.
    """
    run, config = open_run(run_dir, need_data=False)
    intervals = ({"n_resamples": config.eval.bootstrap, "seed": config.eval.seed}
                 if config.eval is not None else {})
    if METHODS[config.method.kind].adapter:
        model, tokenizer, _ = load_run_model(run)
        result = forgetting_probe(model, tokenizer, base_cache=base_cache, **intervals)
    else:
        cache = {} if base_cache is None else base_cache
        # known before loading anything, so a cached base is not loaded again
        key = f"{config.model.path} {config.model.gguf_file} {config.model.dtype} (full run)"
        if key not in cache:
            base_model, tokenizer, _ = load_run_model(run, base=True)
            cache[key] = measure(base_model, tokenizer)
            del base_model
        model, tokenizer, _ = load_run_model(run)
        result = forgetting_probe(model, tokenizer, base_cache=cache, base_key=key, **intervals)
    if console is not None:
        console.print(summary_line(result))
    return result


def base_reference(model: Any) -> str:
    """The cache key of a model's base: its path, dtype and 4-bit quantisation ("" if it
    has no path, which caches nothing)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    path = getattr(base, "name_or_path", "") or getattr(base.config, "_name_or_path", "")
    if not path:
        return ""
    quantised = getattr(base.config, "quantization_config", None) is not None
    return f"{path} {base.dtype}{' 4-bit' if quantised else ''}"


@torch.no_grad()
def measure(model: Any, tokenizer: Any) -> dict:
    """The model's per-example numbers on both samples, as it is (adapter on or off):
    ``{"loss_sums", "target_tokens"}`` per passage and ``"correct"`` (0/1) per probe string."""
    general, probe = samples()
    was_training = model.training
    model.eval()
    try:
        with _packed_attention(model):
            loss_sums, target_tokens = passage_losses(model, tokenizer, general)
        prompts = eval_prompts(probe, tokenizer)
        options = [PROBE_COMPLETION.format(label=label) for label in PROBE_LABELS]
        scores = score_continuations(model, tokenizer, [p.ids for p in prompts], options)
    finally:
        model.train(was_training)
    gold = [PROBE_LABELS.index(example.label.strip()) for example in probe]
    chosen = scores.argmax(1).tolist()
    return {"loss_sums": loss_sums, "target_tokens": target_tokens,
            "correct": [float(c == g) for c, g in zip(chosen, gold, strict=True)]}


def passage_losses(model: Any, tokenizer: Any,
                   passages: list[Example]) -> tuple[list[float], list[int]]:
    """Each passage's summed token loss and number of target tokens, the passages packed
    into rows of BATCH_TOKENS as training packs them (no padding, no cross-attention)."""
    tokenized = tokenize_examples(passages, tokenizer, max_seq_len=MAX_PASSAGE_TOKENS,
                                  train_on="all")
    _, output_layer, softcap = model_parts(model)
    device = next(model.parameters()).device
    loss_sums = [0.0] * len(tokenized)
    target_tokens = [0] * len(tokenized)
    for indices in plan_batches([len(t.input_ids) for t in tokenized],
                                batch_tokens=BATCH_TOKENS, packing=True):
        batch = collate([tokenized[i] for i in indices], packing=True).to(device)
        hidden = hidden_states(model, batch)
        start = 0
        for index in indices:
            end = start + len(tokenized[index].input_ids)
            # the passage's own slice: its first token's label is −100 in a packed row
            labels = batch.labels[:, start:end]
            loss_sums[index] = float(chunked_loss(hidden[:, start:end], labels, output_layer,
                                                  softcap=softcap))
            target_tokens[index] = int((labels[:, 1:] != IGNORE_INDEX).sum())
            start = end
    return loss_sums, target_tokens


def compare(base: dict, tuned: dict, *, n_resamples: int = 1000, seed: int = 0) -> dict:
    """The report of two ``measure`` results on the same samples: values, tuned − base and
    its paired bootstrap interval, for the general loss and the probe."""
    tokens = base["target_tokens"]
    loss = paired_bootstrap(ratio_statistic(base["loss_sums"], tokens),
                            ratio_statistic(tuned["loss_sums"], tokens), n=len(tokens),
                            n_resamples=n_resamples, seed=seed)
    probe = paired_bootstrap(base["correct"], tuned["correct"], n_resamples=n_resamples,
                             seed=seed)
    return {
        "general_loss": {**_paired(loss), "unit": "nats per token", "tokens": int(sum(tokens))},
        "probe_task": {"name": PROBE_NAME, "metric": "accuracy", **_paired(probe),
                       "labels": list(PROBE_LABELS)},
        "n_passages": len(tokens), "n_probe": len(base["correct"]),
        "n_resamples": n_resamples, "seed": seed,
    }


def _paired(comparison: dict) -> dict:
    return {key: comparison[key] for key in
            ("base", "tuned", "delta", "ci", "p_value", "significant")}


def summary_line(result: dict) -> str:
    """One line for the console: both deltas with their intervals."""
    loss, probe = result["general_loss"], result["probe_task"]
    return (f"Outside the task: general-text loss {loss['delta']:+.3f} nats/token "
            f"[{loss['ci'][0]:+.3f}, {loss['ci'][1]:+.3f}]; {probe['name']} accuracy "
            f"{probe['delta']:+.3f} [{probe['ci'][0]:+.3f}, {probe['ci'][1]:+.3f}]")


@contextlib.contextmanager
def _packed_attention(model: Any) -> Iterator[None]:
    """Per-example attention over packed rows (model/varlen.py) while inside, as training
    uses it; the model's own attention afterwards."""
    previous = getattr(model.config, "_attn_implementation", None)
    switched = varlen.enable(model)
    try:
        yield
    finally:
        if switched:
            model.set_attn_implementation(previous)
