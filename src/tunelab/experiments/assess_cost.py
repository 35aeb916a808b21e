"""What an assessment costs and what makes its task hard: the planner's prediction against
each run's measurements, the cost of more training, the cost at use of prompting against the
tuned model (and of each endpoint arm, priced), and the task's complexity."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from tunelab.config import Config
from tunelab.run.manifest import Manifest, Prediction


def label_entropy_bits(labels: Sequence[Any]) -> float | None:
    """Shannon entropy of the label distribution, in bits (None without labels)."""
    counts = Counter(labels)
    total = sum(counts.values())
    if not total:
        return None
    return float(-sum(c / total * math.log2(c / total) for c in counts.values()))


def break_even_requests(training_s: float, prompting_s_per_request: float,
                        tuned_s_per_request: float) -> float | None:
    """Requests after which the one-off training time is paid back by faster requests; None
    when the tuned model is not faster per request."""
    saved = prompting_s_per_request - tuned_s_per_request
    return math.ceil(training_s / saved) if saved > 0 else None


def run_cost(run: dict) -> dict:
    """The planner's prediction against what the run measured."""
    manifest: Manifest = run["manifest"]
    predicted = manifest.plan or Prediction()
    tokens_per_second, train_s = manifest.tokens_per_second, manifest.train_s
    return {
        "n_examples": run["n_examples"], "steps": manifest.steps,
        "predicted_wall_s": predicted.predicted_wall_s,
        "predicted_peak_bytes": predicted.predicted_peak_bytes,
        "predicted_tokens_per_second": predicted.predicted_tokens_per_second,
        "measured_wall_s": manifest.wall_s, "train_s": train_s,
        # the count itself: a rate times a rounded duration is far off for short runs
        "tokens": manifest.train_tokens or (
            round(tokens_per_second * train_s) if tokens_per_second and train_s else None),
        "tokens_per_second": tokens_per_second,
        "measured_peak_bytes": run["measured_peak_rss_bytes"]
        or manifest.measured_peak_rss_bytes,
        "eval_wall_s": run["eval_wall_s"],
    }


def projections(run_config: Config, manifest: Manifest) -> list[dict]:
    """The planner's cost of the largest run with twice the epochs and of twice its data,
    also scaled by how far the full run's prediction was off (measured / predicted)."""
    from tunelab.model.load import load_tokenizer
    from tunelab.planner.predict import plan_counts
    from tunelab.planner.workload import TokenCounts, count_tokens

    predicted_s = manifest.plan.predicted_wall_s if manifest.plan else None
    ratio = manifest.wall_s / predicted_s if predicted_s and manifest.wall_s else None
    more_epochs = run_config.model_copy(deep=True)
    more_epochs.train.epochs = run_config.train.epochs * 2
    if run_config.train.max_steps:
        more_epochs.train.max_steps = run_config.train.max_steps * 2
    try:
        counts = count_tokens(run_config, load_tokenizer(run_config.model.path,
                                                         run_config.model.gguf_file))
        doubled = TokenCounts(counts.lengths * 2, counts.targets * 2, counts.validation_tokens)
        n = len(counts.lengths)
        cases = ((f"{n} examples (the largest run), 2x epochs", more_epochs, counts),
                 (f"{2 * n} examples (2x data)", run_config, doubled))
        projected = []
        for what, config, data in cases:
            plan = plan_counts(config, data)
            wall_s = plan.predicted_wall_s
            projected.append({"what": what, "examples": len(data.lengths),
                              "epochs": config.train.epochs, "predicted_wall_s": wall_s,
                              "predicted_peak_bytes": plan.predicted_peak_bytes,
                              "scaled_wall_s": wall_s * ratio if ratio else None})
        return projected
    except Exception as error:  # the planner describes; it must not sink the assessment
        return [{"what": "projection", "error": f"{type(error).__name__}: {error}"}]


def cost_at_use(config: Config, tokenizer, best: dict, full: dict) -> dict:
    """Prompt tokens and measured time per request of best prompting and of the tuned model,
    and after how many requests the one-off fine-tuning is paid back."""
    prompting_tokens = mean_prompt_tokens(config, tokenizer, prompt=best["prompt"],
                                          shots=best["shots"])
    tuned_tokens = mean_prompt_tokens(config, tokenizer, prompt=config.data.prompt, shots=0)
    n = full["n_test"]
    prompting_s, tuned_s = best["eval_wall_s"] / n, full["eval_wall_s"] / n
    training_s = full["manifest"].wall_s or 0.0
    saved_tokens = prompting_tokens - tuned_tokens
    training_tokens = run_cost(full)["tokens"] or 0
    return {
        "prompting": {"shots": best["shots"], "prompt_tokens_per_request": prompting_tokens,
                      "s_per_request": prompting_s},
        "tuned": {"prompt_tokens_per_request": tuned_tokens, "s_per_request": tuned_s},
        "training_s": training_s,
        "break_even_requests_by_time": break_even_requests(training_s, prompting_s, tuned_s),
        # a training token costs about three forward tokens (forward and backward pass)
        "break_even_requests_by_tokens": math.ceil(3 * training_tokens / saved_tokens)
        if saved_tokens > 0 else None,
        "note": "time per request: the batched evaluation's wall time over the test examples, "
                "on this device, the adapter unmerged",
    }


def mean_prompt_tokens(config: Config, tokenizer, *, prompt: str | None, shots: int) -> float:
    """Mean prompt length in tokens over the evaluated test examples, rendered as evaluation
    renders them (same demonstrations, same template)."""
    from tunelab.data.prepare import read_eval_splits, with_prompt
    from tunelab.data.tokenize import eval_prompts
    from tunelab.eval.evaluate import choose_demos

    splits = read_eval_splits(config.data, split="test", seed=config.train.seed,
                              max_examples=config.eval.max_examples)
    examples = with_prompt(splits.evaluated, config.data, prompt)
    demos = choose_demos(examples, with_prompt(splits.train, config.data, prompt), shots=shots,
                         seed=config.eval.seed) if shots else None
    prompts = eval_prompts(examples, tokenizer, chat_template=config.data.chat_template,
                           chat_template_kwargs=config.data.chat_template_kwargs,
                           demos=demos, max_seq_len=config.train.max_seq_len)
    return float(np.mean([len(p.ids) for p in prompts]))


def endpoint_costs(arms: list[dict], full: dict, prices: dict[str, Any],
                   device_cost_per_hour: float | None) -> list[dict]:
    """Per endpoint arm: tokens per request as the endpoint reported them, its price per
    request (``prices``), the tuned model's on this device (``device_cost_per_hour``), and the
    requests after which the fine-tuning run is paid back."""
    from tunelab.eval.endpoint import cost_per_request

    tuned_s = full["eval_wall_s"] / max(1, full["n_test"])
    training_s = full["manifest"].wall_s or 0.0
    per_second = device_cost_per_hour / 3600 if device_cost_per_hour else None
    tuned_usd = tuned_s * per_second if per_second else None
    training_usd = training_s * per_second if per_second else None
    costs = []
    for arm in arms:
        if arm["source"] == "base":
            continue
        usage = arm.get("usage") or {}
        price = prices.get(arm["source"])
        per_request = cost_per_request(usage, price) if price else None
        usd = per_request["total_usd"] if per_request else None
        saved = usd - tuned_usd if usd is not None and tuned_usd is not None else None
        costs.append({
            "arm": arm["name"], "usage_per_request": usage.get("per_request"),
            "usd_per_request": usd, "tuned_usd_per_request": tuned_usd,
            "tuned_s_per_request": tuned_s, "training_usd": training_usd,
            "break_even_requests": math.ceil(training_usd / saved)
            if saved and saved > 0 else None,
            "note": None if price else f"no --price for {arm['source']}: tokens only"})
    return costs


def complexity(config: Config, arms: list[dict], tuned: dict, full: dict, fit: dict | None
               ) -> dict:
    """What makes the task easy or hard, next to the verdict."""
    from tunelab.data.prepare import read_splits
    from tunelab.data.render import reference_text
    from tunelab.eval.tasks import Task

    eval_cfg = config.eval
    zero = next((arm for arm in arms if arm["source"] == "base" and arm["shots"] == 0), None)
    strongest = max(arms, key=lambda arm: arm["test"]["value"])
    task = Task.from_config(eval_cfg)
    examples = read_splits(config.data, seed=config.train.seed).train
    golds = [task.gold(reference_text(example)) for example in examples]
    if eval_cfg.task == "classification":
        labels, n_labels = golds, len(eval_cfg.labels)
    elif eval_cfg.task == "ner":
        labels = [kind for gold in golds for kind, _ in gold]
        n_labels = len(eval_cfg.entity_types) or len(set(labels))
    else:
        labels, n_labels = [], None
    report = full["manifest"].data_report
    return {
        "base_zero_shot": zero["test"]["value"] if zero else None,
        "best_prompting": strongest["test"]["value"], "best_prompting_arm": strongest["name"],
        "best_prompting_shots": strongest["shots"],
        "n_labels": n_labels, "label_entropy_bits": label_entropy_bits(labels),
        "target_tokens_mean": report["train_target_tokens"] / report["train_examples"]
        if report.get("train_examples") else None,
        "gain_per_doubling": fit["gain_per_doubling"]["value"] if fit else None,
        "train_examples": tuned["n_examples"],
    }


