"""The evaluation pipeline: base and tuned model × prompt variants → metrics, comparison, JSON.

``evaluate(config, run_dir=...)`` answers "did fine-tuning help, and is it more than noise?":
every metric with a bootstrap 95% interval, the metric under each prompt variant (mean ± spread),
a paired comparison of tuned against base on the same examples (McNemar for accuracy), and the
outputs themselves, so the worst cases can be read. The result is an ``EvalResult``
(``eval/result.py``), written to ``<run>/eval/<split>.json`` and returned exactly as written.

Every data format is evaluated as it was trained: the evaluated split, the few-shot pool (the
run's train split) and the splits checked for leakage are read once by
``data/prepare.read_eval_splits``, records beside their examples, and prompts come from
``data/render.py`` through ``data/tokenize.eval_prompts`` (the ids training put before the
reference). Template data renders each prompt variant from the records already read; chat,
instruction and completion data are evaluated on the reference (the last trained assistant
turn, or the output / completion) after their prompt.

A thinking model (Qwen3) writes ``<think>...</think>`` before its answer; with
``eval.strip_thinking`` (the default) the block is removed before the answer is parsed and
scored, and the eval file counts the answers that held one (``thinking``), those cut inside it
apart: they are scored as empty answers.
"""

from __future__ import annotations

import random
import string
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from tunelab.banner import print_evaluation_start
from tunelab.config import Config, EvalConfig
from tunelab.data.formats import Example, example_prompt
from tunelab.data.preference import read_preference_splits
from tunelab.data.prepare import EvalSplits, Split, read_eval_splits, read_split, with_prompt
from tunelab.data.quality import leaked_examples
from tunelab.data.records import Record
from tunelab.data.render import reference_text
from tunelab.data.tokenize import EvalPrompt, eval_prompts
from tunelab.errors import ConfigError, RunError
from tunelab.eval.generate import generate_texts, score_continuations
from tunelab.eval.result import SCHEMA_VERSION, EvalResult, ModelOutcome
from tunelab.eval.stats import paired_comparison, spread
from tunelab.eval.tasks import Task
from tunelab.objectives import OBJECTIVES
from tunelab.progress import progress_bar
from tunelab.run.directory import RunDir, eval_name
from tunelab.run.trackers import log_evaluation

if TYPE_CHECKING:
    from tunelab.model.load import Preloaded


def evaluate(config: Config, *, run_dir: str | Path | RunDir | None = None, base: bool = True,
             tuned: bool = True, console: Console | None = None,
             task_name: str | None = None, preloaded: Preloaded | None = None) -> EvalResult:
    """Evaluate the base model and/or a run's tuned model on the config's test split.

    ``task_name``: the result is one task's of a multitask run (``eval/multitask.py``), named
    and filed as that task's. ``preloaded``: the caller's own base model and tokenizer, used
    instead of loading ``model.path`` (the run's adapter goes on it). Returns what the run's
    eval file (``RunDir.eval_file``) holds.
    """
    console = console or Console()
    if config.eval is None:
        raise ConfigError("the config has no eval section", where="eval",
                          fix="add e.g. eval: {task: classification, labels: [negative, "
                          "positive]}")
    eval_cfg, data = config.eval, config.data
    prompt, completion = _templates(config)
    if OBJECTIVES[config.method.objective].preference:
        splits = _preference_eval_splits(config)
    else:
        splits = read_eval_splits(data, split=eval_cfg.split, seed=config.train.seed,
                                  max_examples=eval_cfg.max_examples)
    records = splits.evaluated.records
    task = Task.from_config(eval_cfg)
    variants = eval_cfg.prompt_variants or [prompt]
    golds = [task.gold(reference_text(example)) for example in splits.evaluated.examples]

    def prompts_for(variant: str | None, tokenizer) -> list[EvalPrompt]:
        """Each record's prompt under one variant, few-shot demonstrations included."""
        examples, demos = with_prompt(splits.evaluated, data, variant), None
        if eval_cfg.shots and splits.train.records:
            demos = choose_demos(examples, with_prompt(splits.train, data, variant),
                                 shots=eval_cfg.shots, seed=eval_cfg.seed)
        return eval_prompts(examples, tokenizer, chat_template=data.chat_template,
                            chat_template_kwargs=data.chat_template_kwargs, demos=demos,
                            max_seq_len=config.train.max_seq_len)
    contexts = [_context(r, eval_cfg.context) for r in records]
    leakage = _split_leakage(splits, eval_cfg.split)
    models = _load_models(config, run_dir, want_base=base, want_tuned=tuned,
                          preloaded=preloaded)
    print_evaluation_start(console, models, config.model.device)
    started = time.perf_counter()
    result = {"name": eval_name(eval_cfg.split, task_name), "task": task.kind,
              "split": eval_cfg.split, "n": len(records), "primary_metric": task.primary,
              "shots": eval_cfg.shots, "ci_level": 0.95, "n_resamples": eval_cfg.bootstrap,
              "predict": eval_cfg.predict if task.scores_labels else "generate",
              "leakage": {key: value for key, value in leakage.items() if key != "indices"},
              "models": {}}
    for which, (model, tokenizer, context) in models.items():
        with context():
            result["models"][which] = _evaluate_model(
                model, tokenizer, task, eval_cfg, records, variants, completion, prompts_for,
                golds, contexts, leaked=leakage["indices"], label=which, console=console)
    result["comparison"] = _compare(result["models"], task)
    for outcome in result["models"].values():
        outcome.pop("paired")  # a function of resampled indices for corpus metrics: not data
        outcome.pop("paired_others")
    result["wall_s"] = round(time.perf_counter() - started, 1)
    result["schema_version"] = SCHEMA_VERSION
    # Validated as plain JSON data, so the caller holds exactly what the file holds (sets and
    # tensors as lists); a change of shape fails here, not in a report.
    typed = EvalResult.model_validate(EvalResult.jsonable(result))
    path = None
    if run_dir is not None:
        path = RunDir(run_dir).eval_file(eval_cfg.split, task_name)
        typed.write(path)
        log_evaluation(RunDir(run_dir), typed, path)  # to the run's trackers, if it has any
    render_eval(typed, console, path=path)
    return typed


def _evaluate_model(model, tokenizer, task: Task, eval_cfg: EvalConfig, records: list[Record],
                    variants: list[str | None], completion: str | None,
                    prompts_for: Callable[[str | None, object], list[EvalPrompt]], golds: list,
                    contexts: list, leaked: set[int], label: str, console: Console) -> dict:
    outcome = {"variants": []}
    for number, template in enumerate(variants):
        prompts = prompts_for(template, tokenizer)
        which = f"{label}, variant {number + 1}/{len(variants)}" if len(variants) > 1 else label
        with progress_bar(console, f"eval {which}", len(prompts)) as advance:
            raw, predictions, failures, thinking = _predict(model, tokenizer, task, eval_cfg,
                                                            prompts, completion, advance)
        scored = task.score(golds, predictions, contexts)
        outcome["variants"].append({"prompt": template, "metrics": scored.metrics,
                                    "parse_failures": {"count": failures,
                                                       "rate": failures / max(1, len(records))}})
        if number == 0:
            outcome.update(metrics=scored.metrics, paired=scored.paired,
                           paired_others=scored.paired_others, **scored.extra)
            clean = [i for i in range(len(records)) if i not in leaked]
            if leaked and clean:  # the same metric on the examples that do not leak
                outcome["metrics_without_leaked"] = task.score(
                    [golds[i] for i in clean], [predictions[i] for i in clean],
                    [contexts[i] for i in clean]).metrics
            outcome["parse_failures"] = outcome["variants"][0]["parse_failures"]
            if thinking is not None:
                outcome["thinking"] = thinking
                if thinking["unterminated"] and thinking["stripped"]:
                    outcome.setdefault("notes", []).append(_UNTERMINATED_NOTE.format(
                        count=thinking["unterminated"], limit=eval_cfg.max_new_tokens))
            outcome["predictions"] = [
                {"index": i, "input": p.text[-600:], "gold": _show(g), "prediction": _show(r),
                 "score": s}
                for i, (p, g, r, s) in enumerate(zip(prompts, golds, raw, scored.per_example,
                                                     strict=True))]
    outcome["sensitivity"] = {
        name: spread([v["metrics"][name]["value"] for v in outcome["variants"]])
        for name in outcome["metrics"]}
    return outcome


def choose_demos(examples: list[Example], pool: list[Example], *, shots: int, seed: int
                 ) -> list[list[Example]]:
    """``shots`` solved examples from ``pool`` for each example: drawn with a fixed seed per
    example, never one with the same prompt as the example itself."""
    chosen = []
    for index, example in enumerate(examples):
        query = example_prompt(example)
        demos = []
        if shots and pool:
            rng = random.Random(seed * 1_000_003 + index)
            for choice in rng.sample(range(len(pool)), min(len(pool), shots * 3 + 3)):
                if example_prompt(pool[choice]) != query:
                    demos.append(pool[choice])
                if len(demos) == shots:
                    break
        chosen.append(demos)
    return chosen


def strip_thinking(output: str) -> tuple[str, str | None]:
    """A generated answer without its reasoning, and which kind it had: "closed", "unterminated"
    or None. The answer is the text after the last ``</think>`` (a template may open the block
    in the prompt, so ``<think>`` itself is optional), cut before a ``<think>`` left open, so
    an answer cut by max_new_tokens while reasoning is empty."""
    kind = None
    if THINK_CLOSE in output:
        output, kind = output.rsplit(THINK_CLOSE, 1)[1].lstrip(), "closed"
    if THINK_OPEN in output:
        output, kind = output.split(THINK_OPEN, 1)[0], "unterminated"
    return output, kind


def _predict(model, tokenizer, task: Task, eval_cfg: EvalConfig, prompts: list[EvalPrompt],
             completion: str | None, progress: Callable[[int], None] | None = None
             ) -> tuple[list[str], list, int, dict | None]:
    """Outputs as scored, parsed predictions, the number of unparseable outputs, and the
    count of ``<think>`` blocks in generated ones (None when labels were scored)."""
    ids = [prompt.ids for prompt in prompts]
    if task.scores_labels and eval_cfg.predict in ("score", "both"):
        # A label continues the prompt as training's target did: through the completion
        # template, or (chat, instruction, completion data) as the reply itself.
        options = [_label_completion(completion or "{label}", label) for label in eval_cfg.labels]
        scores = score_continuations(model, tokenizer, ids, options, progress=progress)
        chosen = [eval_cfg.labels[i] for i in scores.argmax(1).tolist()]
        return chosen, chosen, 0, None
    outputs = generate_texts(model, tokenizer, ids, max_new_tokens=eval_cfg.max_new_tokens,
                             batch_size=eval_cfg.batch_size, stop=eval_cfg.stop,
                             progress=progress)
    stripped = [strip_thinking(output) for output in outputs]
    kinds = [kind for _, kind in stripped]
    thinking = {"closed": kinds.count("closed"), "unterminated": kinds.count("unterminated"),
                "stripped": eval_cfg.strip_thinking}
    if eval_cfg.strip_thinking:
        outputs = [answer for answer, _ in stripped]
    parsed = [task.parse(output) for output in outputs]
    return outputs, [p for p, _ in parsed], sum(failed for _, failed in parsed), thinking


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_UNTERMINATED_NOTE = (
    "{count} answers ended inside a <think> block (cut by eval.max_new_tokens {limit} or a "
    "stop string of eval.stop) and count as empty: raise eval.max_new_tokens, take the "
    "blank-line stop out of eval.stop, or turn thinking off (Qwen3: data.chat_template_kwargs "
    "{{enable_thinking: false}})")


def _compare(models: dict, task: Task) -> dict:
    """Tuned minus base on the same examples: paired bootstrap (of the primary metric and of
    those the task pairs too), McNemar for a right/wrong primary metric."""
    if not {"base", "tuned"} <= models.keys():
        return {}
    base, tuned = models["base"], models["tuned"]
    series = {task.primary: (base["paired"], tuned["paired"])}
    series.update({name: (base["paired_others"][name], values)
                   for name, values in tuned["paired_others"].items()})
    comparison = {}
    for name, tuned_metric in tuned["metrics"].items():
        entry = {"base": base["metrics"][name]["value"], "tuned": tuned_metric["value"],
                 "delta": tuned_metric["value"] - base["metrics"][name]["value"]}
        if name in series:
            paired = paired_comparison([series[name][0]], [series[name][1]],
                                       n=tuned_metric["n"],
                                       exact_test=name == task.primary and task.exact_test,
                                       n_resamples=task.n_resamples, seed=task.seed)
            entry.update({key: paired[key] for key in ("ci", "p_value", "p_floor", "p_text",
                                                       "significant", "test")})
            if "discordant" in paired:
                entry["discordant"] = paired["discordant"]
        comparison[name] = entry
    return comparison


def _load_models(config: Config, run_dir, *, want_base: bool, want_tuned: bool,
                 preloaded: Preloaded | None = None) -> dict:
    """name → (model, tokenizer, context manager factory) sharing one base model for LoRA."""
    from contextlib import nullcontext

    from tunelab.model import varlen
    from tunelab.model.adapters import METHODS
    from tunelab.model.load import with_pad_token
    from tunelab.run.load import attach_adapter, load_base, load_run_base

    if want_tuned and run_dir is None:
        raise RunError("a tuned model needs a run directory", where="--run",
                       fix="pass --run runs/<name>, or --base alone to measure the base model")
    run = RunDir(run_dir) if run_dir is not None else None
    method = METHODS[config.method.kind]
    models = {}
    if preloaded is not None:  # the caller's own base (tunelab.evaluate(model=...))
        base_model, tokenizer = preloaded.model, with_pad_token(preloaded.tokenizer,
                                                                "the tokenizer given")
    elif want_tuned and method.adapter:
        # the base as the adapter trained on it (4 bits again for QLoRA; the base row then
        # measures the NF4 base), else the tuned row is another model
        base_model, tokenizer = load_run_base(run, config,
                                              base=(config.model.path, config.model.gguf_file))
    else:
        base_model, tokenizer = load_base(config)
    varlen.enable(base_model)
    if want_tuned and not method.adapter:  # full fine-tuning: a whole second model
        weights = run.final_weights(config.method.kind)
        tuned, _ = load_base(config, reference=(str(weights), None))
        varlen.enable(tuned)
        if want_base:
            models["base"] = (base_model, tokenizer, nullcontext)
        models["tuned"] = (tuned, tokenizer, nullcontext)
    elif want_tuned:
        tuned = attach_adapter(base_model, run, config)
        if want_base:
            models["base"] = (tuned, tokenizer, tuned.disable_adapter)
        models["tuned"] = (tuned, tokenizer, nullcontext)
    else:
        models["base"] = (base_model, tokenizer, nullcontext)
    for model, _, _ in models.values():
        model.eval()
    return models


def _preference_eval_splits(config: Config) -> EvalSplits:
    """A preference run's data as evaluation reads it: the evaluated split's examples (a test
    file of ordinary examples, or the chosen answers of preference pairs) and the run's own
    train and validation pairs as examples of their chosen answers (the few-shot pool and the
    leakage check's earlier splits)."""
    data, eval_cfg = config.data, config.eval
    objective = OBJECTIVES[config.method.objective]
    splits = read_preference_splits(data, seed=config.train.seed, objective=objective,
                                    test=eval_cfg.split == "test")
    as_split = lambda examples: Split(  # noqa: E731 (records: where each example came from)
        [Record({}, ex.source, ex.line) for ex in examples], examples)
    train = as_split([example.chosen for example in splits.train])
    validation = as_split([example.chosen for example in splits.validation])
    if eval_cfg.split == "test":
        if not data.test:
            raise ConfigError("eval.split is 'test' but data.test is empty", where="data.test",
                              fix="add data.test: <file>, or set eval.split")
        evaluated = read_split(data.test, data) if not splits.test else as_split(
            splits.test_examples)
    else:
        evaluated = validation
    if eval_cfg.max_examples:
        evaluated = evaluated.pick(range(min(eval_cfg.max_examples, len(evaluated.records))))
    return EvalSplits(evaluated, train, validation)


def _split_leakage(splits: EvalSplits, split: str) -> dict:
    """Evaluation examples that also appear in the training data (or, for the test split, in
    validation): the same text, a near-duplicate, or the same prompt. Their scores say what the
    model memorised, not how it generalises, so the metric is also reported without them.

    The earlier splits are the run's own examples (``prepare.read_eval_splits``: the same
    format, templates and validation split as training), so chat and instruction data are
    compared as they were trained."""
    evaluated = splits.evaluated.examples
    sources = {"train": splits.train.examples}
    if split == "test":
        sources["validation"] = splits.validation.examples
    leaked: dict[int, dict] = {}
    for split_name, earlier in sources.items():
        for index, how in leaked_examples(earlier, evaluated).items():
            leaked.setdefault(index, {"index": index, "where": evaluated[index].where,
                                      "split": split_name, **how})
    places = [leaked[index] for index in sorted(leaked)]
    return {"count": len(places), "examples": places[:20], "indices": set(leaked)}


def _templates(config: Config) -> tuple[str | None, str | None]:
    """(prompt template, completion template) the evaluated records are read with; None for
    data in a format of its own (chat, instruction, completion)."""
    data, eval_cfg = config.data, config.eval
    if data.prompt is not None:
        return data.prompt, data.completion
    if data.format == "text":
        raise ConfigError("plain text data (data.format text) has no prompt and reference to "
                          "evaluate", where="data.format",
                          fix="evaluate chat, instruction, completion or template data")
    if eval_cfg.prompt_variants:
        raise ConfigError("eval.prompt_variants are format strings over a record's columns, "
                          f"for template data; this data is read as {data.format!r}",
                          where="eval.prompt_variants",
                          fix="remove eval.prompt_variants, or use template data (data.prompt "
                          "and data.completion)")
    return None, None


def _label_completion(completion: str, label: str) -> str:
    """The completion template with the label in its one field (e.g. " {label}" → " positive")."""
    fields = [name for _, name, _, _ in string.Formatter().parse(completion) if name]
    if len(set(fields)) == 1:
        return completion.format_map({fields[0]: label})
    return " " + label


def _context(record: Record, template: str | None) -> str | None:
    return template.format_map(record.fields) if template else None


def _show(value) -> str:
    if isinstance(value, (set, frozenset)):
        return "\n".join(f"{kind}: {span}" for kind, span in sorted(value))
    return str(value)


def render_eval(result: EvalResult, console: Console, *, path: Path | None = None) -> None:
    """The metric table on screen: base, tuned, and the delta with its interval."""
    models = result.models
    table = Table(title=f"{result.task} on {result.split} (n={result.n}, "
                  f"{result.shots}-shot, {result.predict})")
    table.add_column("metric")
    for which in models:
        table.add_column(which, justify="right")
    if result.comparison:
        table.add_column("tuned − base", justify="right")
    for name in next(iter(models.values())).metrics:
        row = [name]
        for outcome in models.values():
            metric = outcome.metrics[name]
            row.append(f"{_num(metric.value)} [{_num(metric.ci[0])}, {_num(metric.ci[1])}]")
        entry = result.comparison.get(name)
        if entry:
            text = f"{entry.delta:+.3f}"
            if entry.ci is not None:
                mark = "significant" if entry.significant else "not significant"
                text += (f" [{entry.ci[0]:+.3f}, {entry.ci[1]:+.3f}] "
                         f"{entry.p_text or f'p = {entry.p_value:.2g}'} ({entry.test}, {mark})")
            row.append(text)
        table.add_row(*row)
    console.print(table)
    for which, outcome in models.items():
        _render_notes(which, outcome, result.primary_metric, console)
    _render_leakage(result, console)
    if path is not None:
        console.print(f"Written to {path}")


def _render_notes(which: str, outcome: ModelOutcome, primary: str, console: Console) -> None:
    """What the table does not show: spread over prompt variants, unparsed outputs, the task's
    own details (hallucinated spans, output lengths, notes)."""
    variation = outcome.sensitivity[primary]
    if variation.n_variants > 1:
        console.print(f"{which}: {primary} over {variation.n_variants} prompt variants "
                      f"{_num(variation.mean)} ± {_num(variation.std)} (min "
                      f"{_num(variation.min)}, max {_num(variation.max)})")
    failures = outcome.parse_failures
    if failures.count:
        console.print(f"[yellow]{which}: {failures.count} outputs ({failures.rate:.1%}) could "
                      "not be parsed; they count as wrong.")
    if outcome.detail("hallucination"):
        console.print(f"{which}: hallucination rate {outcome.detail('hallucination')['rate']:.1%}"
                      " of predicted spans not in the input")
    lengths = outcome.detail("output_length")
    if lengths:
        console.print(f"{which}: outputs {lengths['mean_words']:.1f} words on average "
                      f"(median {lengths['median_words']:.0f}, max {lengths['max_words']}); "
                      f"references {lengths['reference_mean_words']:.1f}")
    thinking = outcome.thinking
    if thinking is not None and thinking.closed + thinking.unterminated:
        done = "removed before scoring" if thinking.stripped else "scored as written"
        console.print(f"{which}: {thinking.closed + thinking.unterminated} answers held a "
                      f"<think> block ({thinking.unterminated} unterminated), {done}")
    for note in outcome.detail("notes", []):
        console.print(f"[yellow]{which}: {note}")


def _render_leakage(result: EvalResult, console: Console) -> None:
    """Say loudly when evaluated examples leak from training data, and what the metric is
    without them."""
    leakage = result.leakage
    if not leakage or not leakage.count:
        return
    primary = result.primary_metric
    first = leakage.examples[0]
    console.print(f"[yellow]warning: {leakage.count} of {result.n} {result.split} "
                  f"examples leak from the training data (e.g. {first['where']}: "
                  f"{first['kind']} as {first['source']}); they measure memory, not "
                  "generalisation. Remove them from the split (tunelab data check lists them).")
    for which, outcome in result.models.items():
        clean = (outcome.metrics_without_leaked or {}).get(primary)
        if clean:
            console.print(f"[yellow]{which}: {primary} {_num(outcome.metrics[primary].value)}"
                          f" with them, {_num(clean.value)} [{_num(clean.ci[0])}, "
                          f"{_num(clean.ci[1])}] without them (n={clean.n})")


def _num(value: float) -> str:
    return f"{value:.3f}" if abs(value) <= 1.5 else f"{value:.1f}"
