""""Should we fine-tune this task, and is more data worth it?": baselines, curve, fit, cost.

``assess(config)`` measures what the decision rests on, in one process:

1. prompting arms: the base model (and any OpenAI-compatible endpoint given, e.g. a bigger
   model) with zero and k demonstrations, every prompt variant measured on validation; per arm
   the variant best on validation, unless a cheaper one is within validation's noise of it
   (``verdict.choose_arm``); the chosen variant is measured on test;
2. a learning curve: the configured LoRA run on nested, seeded fractions of the training data
   (each subset holds the smaller ones), each fraction trained with one or more training seeds
   (data order and initialisation), each an ordinary run directory evaluated on test, with
   what it cost outside the task (``forgetting``);
3. the curve's fit (``curve.fit_curve``: a saturating form chosen on the points), the gain per
   doubling, the metric at 2x and 4x the data beside "no further gain", and the examples
   needed to reach a target;
4. cost: the planner's prediction against the measured time, tokens and peak memory per run,
   the predicted cost of more epochs and of twice the data, and the cost at use of each arm
   against the tuned model's;
5. the task's complexity and a verdict (``verdict.verdict``) against the validation-chosen arm
   and the strongest arm on test, "undecided" where a tuned run cannot be trusted.

Everything lands in ``<output_dir>/<name>-assess/`` (``assess.json``, ``curve-scores.json``
with every run's per-example test scores, ``report.html``, the curve alone as
``learning-curve.svg``, and one run directory per fraction, seed and prompting choice). A
second call reuses every finished run and evaluation, so an interrupted assessment resumes.

Intervals are one hierarchical bootstrap (``eval.stats.resampled_curve``): each resample
draws the test examples (the same rows for every run and arm, so comparisons are paired) and,
within each fraction, its training seeds with replacement. A fraction trained with one seed
carries the seed spread measured at the nearest fraction with several (seed noise shrinks, if
anything, with more data), so no interval leaves training noise out. Metrics are recomputed on
each resample from the task's own statistic (corpus chrF and entity F1 included).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from tunelab.banner import print_assessment_start
from tunelab.config import Config
from tunelab.errors import ConfigError, RunError
from tunelab.experiments.assess_cost import (
    complexity,
    cost_at_use,
    endpoint_costs,
    mean_prompt_tokens,
    projections,
    run_cost,
)
from tunelab.experiments.verdict import (
    MIN_EFFECT,
    MIN_GAIN_PER_DOUBLING,
    VERDICTS,
    choose_arm,
    degenerate_reasons,
    verdict,
)
from tunelab.run.directory import RunDir, create_run
from tunelab.run.trackers import log_assessment

DEFAULT_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
DEFAULT_SHOTS = (0, 4)
# Training seeds per fraction when --seeds is not given: the cheap fractions (up to a quarter
# of the data) get two, so the seed spread is measured, and the whole default assessment of the
# sentiment example stays within 25 minutes on a 2-core CPU.
SMALL_FRACTION, SMALL_FRACTION_SEEDS = 0.25, 2
CONFIDENCE = 0.95
# Metrics reported on 0..100 whose per-example scores are on 0..1 (sentence chrF / 100).
METRIC_SCALE = {"chrf": 100.0, "bleu": 100.0}
__all__ = ["VERDICTS", "assess", "default_seeds", "parse_seeds"]


# --- nested fractions ------------------------------------------------------------------------


def nested_subsets(n_examples: int, fractions: Sequence[float],
                   seed: int) -> dict[float, list[int]]:
    """Indices (in file order) of each fraction of ``n_examples``: one seeded permutation cut at
    ``ceil(fraction * n)``, so every subset contains each smaller one."""
    if n_examples < 1:
        raise ValueError("no training examples to take fractions of")
    order = list(range(n_examples))
    random.Random(seed).shuffle(order)
    return {fraction: sorted(order[:max(1, math.ceil(fraction * n_examples))])
            for fraction in sorted(fractions)}


def parse_fractions(text: str) -> list[float]:
    """``"1/8,1/4,1/2,1"`` or ``"0.125,0.5,1"`` → sorted fractions in (0, 1]."""
    fractions = []
    for part in (piece.strip() for piece in text.split(",") if piece.strip()):
        top, _, bottom = part.partition("/")
        try:
            value = float(top) / float(bottom) if bottom else float(top)
        except (ValueError, ZeroDivisionError):
            value = -1.0
        if not 0 < value <= 1:
            raise ConfigError(f"fraction {part!r} is not a number in (0, 1]", where="--fractions",
                              fix="write e.g. --fractions 1/8,1/4,1/2,1")
        fractions.append(value)
    if len(set(fractions)) < 2:
        raise ConfigError("a learning curve needs at least two different fractions",
                          where="--fractions", fix="write e.g. --fractions 1/8,1/4,1/2,1")
    return sorted(set(fractions))


def parse_shots(text: str) -> list[int]:
    """``"0,4"`` → [0, 4]: the numbers of demonstrations the prompting baselines use."""
    try:
        shots = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        shots = []
    if not shots or shots[0] < 0:
        raise ConfigError(f"--shots {text!r} is not a list of whole numbers ≥ 0",
                          where="--shots", fix="write e.g. --shots 0,4")
    return shots


def default_seeds(fractions: Sequence[float]) -> list[int]:
    """Training seeds per fraction: two for the cheap fractions (up to a quarter of the data),
    one above; those borrow the seed spread of the nearest fraction with two."""
    return [SMALL_FRACTION_SEEDS if fraction <= SMALL_FRACTION else 1 for fraction in fractions]


def parse_seeds(text: str, fractions: Sequence[float]) -> list[int]:
    """``"3"`` (every fraction) or ``"3,3,2,1"`` (one count per fraction, smallest first) →
    training seeds per fraction."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if len(counts) == 1:
        counts = counts * len(fractions)
    if len(counts) != len(fractions) or min(counts, default=0) < 1:
        raise ConfigError(f"--seeds {text!r} is not one whole number ≥ 1, or one per fraction "
                          f"({len(fractions)} fractions)", where="--seeds",
                          fix="write e.g. --seeds 2 (every fraction) or --seeds "
                          + ",".join(map(str, default_seeds(fractions))))
    return counts


def training_seeds(config: Config, count: int) -> list[int]:
    """The config's seed and the ``count - 1`` after it."""
    return [config.train.seed + offset for offset in range(count)]


# --- the old straight-line fit (kept as the calibration benchmark's reference) --------------


def fit_log2(n_examples: Sequence[float], values: Sequence[float]) -> tuple[float, float]:
    """Least-squares line ``value = intercept + slope * log2(n)``: (intercept, slope); the slope
    is the gain per doubling of the training data."""
    x = np.log2(np.asarray(n_examples, dtype=float))
    y = np.asarray(values, dtype=float)
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a fit needs at least two different numbers of examples")
    centred = x - x.mean()
    slope = float(centred @ (y - y.mean()) / (centred @ centred))
    return float(y.mean() - slope * x.mean()), slope


def examples_needed(intercept: float, slope: float, target: float) -> float:
    """Training examples at which the line reaches ``target``; ``inf`` when it never does."""
    if slope <= 0:
        return math.inf
    return float(2.0 ** ((target - intercept) / slope))


# --- the pipeline ----------------------------------------------------------------------------


def assess(config: Config, *, shots: Sequence[int] = DEFAULT_SHOTS,
           fractions: Sequence[float] = DEFAULT_FRACTIONS, seeds: Sequence[int] | None = None,
           target: float | None = None, endpoints: Sequence[Any] = (),
           endpoint_shots: Sequence[int] | None = None, prices: dict[str, Any] | None = None,
           device_cost_per_hour: float | None = None, overwrite: bool = False,
           console: Console | None = None) -> dict:
    """Run (or resume) the whole assessment of ``config`` and write ``assess.json`` and
    ``report.html`` under ``<output_dir>/<name>-assess/``; returns what ``assess.json`` holds.

    ``seeds``: training seeds per fraction (default ``default_seeds``); ``endpoints``:
    ``eval.endpoint.Endpoint`` arms measured beside the base model, with ``endpoint_shots``
    demonstrations (default ``shots``: a priced API may be asked fewer); ``prices``: endpoint
    name → ``eval.endpoint.Price``; ``device_cost_per_hour``: what this machine costs, for the
    tuned model's cost per request and the break-even against a priced endpoint.
    """
    console = console or Console()
    _check_config(config)
    fractions = sorted(fractions)
    seeds = default_seeds(fractions) if seeds is None else list(seeds)
    if len(seeds) != len(fractions):
        raise ConfigError(f"{len(seeds)} seed counts for {len(fractions)} fractions",
                          where="--seeds", fix="give one count, or one per fraction")
    folder = assessment_folder(config)
    _open_folder(folder, config, overwrite)
    print_assessment_start(console, config)
    progress = Progress(folder / "progress.json")
    started = time.perf_counter()
    records = _train_records(config)
    subsets = nested_subsets(len(records), fractions, seed=config.train.seed)
    arms = run_baselines(config, folder, list(shots), progress, console, endpoints=endpoints,
                         endpoint_shots=None if endpoint_shots is None else list(endpoint_shots))
    forgetting_cache: dict = {}
    runs = [run_fraction(config, folder, fraction, [records[i] for i in indices], progress,
                         console, seed=seed, forgetting_cache=forgetting_cache)
            for (fraction, indices), count in zip(subsets.items(), seeds, strict=True)
            for seed in training_seeds(config, count)]
    with progress.timed("fit, cost, complexity"):
        result = summarise(config, arms, runs, target=target, prices=prices or {},
                           device_cost_per_hour=device_cost_per_hour)
    wall_s = time.perf_counter() - started
    result["time"] = {"this_call_s": round(wall_s, 1), "phases_s": progress.phases,
                      "redone_this_call": progress.done_now,
                      "model_loads": progress.load_share(wall_s)}
    _write_json(folder / "curve-scores.json", curve_scores(result, runs))
    _write_json(folder / "assess.json", result)
    from tunelab.experiments.assess_report import write_assess_report, write_curve_svg

    write_assess_report(result, folder / "report.html")
    write_curve_svg(result, folder / "learning-curve.svg")
    log_assessment(folder, config, result)  # to a tracker run of its own (train.report_to)
    progress.save()
    render_assessment(result, folder, console)
    return result


def assessment_folder(config: Config) -> Path:
    """Where the assessment of ``config`` lands: ``<output_dir>/<name>-assess/``."""
    return (Path(config.output_dir) / f"{config.name}-assess").resolve()


class Progress:
    """Wall time per phase and measured peak memory per run, kept in ``progress.json``, so a
    resumed assessment still reports the phases an earlier call did; counts model loads."""

    def __init__(self, path: Path):
        self.path = path
        saved = json.loads(path.read_text()) if path.is_file() else {}
        self.phases: dict[str, float] = saved.get("phases", {})
        self.peak_rss_bytes: dict[str, int] = saved.get("peak_rss_bytes", {})
        self.done_now: list[str] = []
        self.loads = 0
        self.load_s: dict[str, float] | None = None

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Time the phase ``name`` (when it finishes) and save it."""
        started = time.perf_counter()
        yield
        self.phases[name] = round(time.perf_counter() - started, 2)
        self.done_now.append(name)
        self.save()

    def before_load(self, config: Config) -> None:
        """Count a base-model load by train() or evaluate(); the first one also measures what a
        load costs in this process (a cold one, then a repeated one)."""
        if self.load_s is None:
            self.load_s = measure_load_s(config)
        self.loads += 1

    def load_share(self, wall_s: float) -> dict:
        """The loads of this call and their share of its wall time (the public train() and
        evaluate() load the base model themselves, once per call)."""
        if self.load_s is None:
            return {"count": 0}
        repeated_s = self.loads * self.load_s["repeat_s"]
        return {"count": self.loads, **self.load_s, "estimated_s": round(repeated_s, 2),
                "avoidable_s": round(max(0, self.loads - 1) * self.load_s["repeat_s"], 2),
                "share_of_wall": round(repeated_s / max(wall_s, 1e-9), 4)}

    def save(self) -> None:
        _write_json(self.path, {"phases": self.phases, "peak_rss_bytes": self.peak_rss_bytes})


def measure_load_s(config: Config) -> dict[str, float]:
    """Seconds to load the base model the first time in this process, and again."""
    from tunelab.model.load import load_model

    times = []
    for _ in range(2):
        started = time.perf_counter()
        load_model(config.model.path, dtype=config.model.dtype, device=config.model.device,
                   gguf_file=config.model.gguf_file,
                   attn_implementation=config.model.attn_implementation)
        times.append(round(time.perf_counter() - started, 2))
    return {"first_s": times[0], "repeat_s": times[1]}


def _check_config(config: Config) -> None:
    """An assessment needs an eval section, test data to report on and validation data to
    choose the prompt on (never test)."""
    if config.data.tasks:
        from tunelab.eval.multitask import multitask_refused

        raise multitask_refused("assess", config)
    problems = []
    if config.eval is None:
        problems.append(("eval", "the config has no eval section",
                         "add e.g. eval: {task: classification, labels: [negative, positive]}"))
    if not config.data.test:
        problems.append(("data.test", "no test data: the baselines and the curve are measured "
                         "on it", "add data.test: <file>"))
    if not config.data.validation:
        problems.append(("data.validation", "no validation files: the best prompt is chosen on "
                         "them, never on test", "add data.validation: <file>"))
    if problems:
        where, message, fix = problems[0]
        for other in problems[1:]:
            message += f"; also {other[0]}: {other[1]}"
        raise ConfigError(message, where=where, fix=fix)


def _open_folder(folder: Path, config: Config, overwrite: bool) -> None:
    """Create the assessment folder, or reuse it when it was made from the same config."""
    settings = config.model_dump(mode="json")
    for key in ("name", "output_dir"):
        settings.pop(key)
    saved_path = folder / "assess-config.yaml"
    if overwrite and folder.exists():
        shutil.rmtree(folder)
    if saved_path.is_file():
        saved = yaml.safe_load(saved_path.read_text())
        changed = _changed_keys(saved, settings)
        if changed:
            raise RunError(f"{folder} was assessed with another config (changed: "
                           f"{', '.join(changed[:5])}); its runs would not be comparable",
                           where=str(folder), fix="pass --overwrite to start again, or give "
                           "the config another name")
        return
    folder.mkdir(parents=True, exist_ok=True)
    saved_path.write_text(yaml.safe_dump(settings, sort_keys=False))


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        return [changed for key in sorted(set(old) | set(new))
                for changed in _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")]
    return [] if old == new else [prefix.rstrip(".")]


def _train_records(config: Config) -> list:
    from tunelab.data.readers import read_records

    return [record for path in config.data.train for record in read_records(path)]


def _evaluation_config(config: Config, *, shots: int, split: str,
                       variant: int | None = None) -> Config:
    """``config`` evaluated on ``split`` with ``shots`` demonstrations; with ``variant``, only
    that one of the configured prompt variants."""
    copy = config.model_copy(deep=True)
    copy.eval.shots, copy.eval.split = shots, split
    if variant is not None and config.eval.prompt_variants:
        copy.eval.prompt_variants = [config.eval.prompt_variants[variant]]
    return copy


def run_baselines(config: Config, folder: Path, shots: list[int], progress: Progress,
                  console: Console, *, endpoints: Sequence[Any] = (),
                  endpoint_shots: list[int] | None = None) -> list[dict]:
    """Every prompting arm: for the base model (``shots``) and each endpoint
    (``endpoint_shots``, default ``shots``), and each number of shots, every prompt variant on
    validation, then the one ``choose_arm`` takes on test."""
    from tunelab.eval.tasks import Task
    from tunelab.model.load import load_tokenizer

    task = Task.from_config(config.eval)
    tokenizer = load_tokenizer(config.model.path, config.model.gguf_file)
    variants = config.eval.prompt_variants or [config.data.prompt]
    tokens: dict[tuple[int, int], float] = {}
    arms = []
    for endpoint in [None, *endpoints]:
        for k in shots if endpoint is None or endpoint_shots is None else endpoint_shots:
            name = f"{'base' if endpoint is None else endpoint.name} {k}-shot"
            candidates = []
            for index, variant in enumerate(variants):
                if (k, index) not in tokens:
                    tokens[k, index] = mean_prompt_tokens(config, tokenizer, prompt=variant,
                                                          shots=k)
                evaluation = _prompting(config, folder, endpoint, k, index, "validation",
                                        progress, console)
                outcome = evaluation["models"]["base"]
                metric = outcome["metrics"][task.primary]
                candidates.append({"name": f"{name}, variant {index}", "variant": index,
                                   "prompt": variant, "validation": metric["value"],
                                   "ci": metric["ci"], "cost": (k, tokens[k, index]),
                                   "measure": outcome_measure(outcome, task),
                                   "n": evaluation["n"]})
            chosen = choose_arm(candidates, _separated(config, "measure"))
            test = _prompting(config, folder, endpoint, k, chosen["variant"], "test", progress,
                              console)
            outcome = test["models"]["base"]
            metric = outcome["metrics"][task.primary]
            arms.append({
                "name": name, "source": "base" if endpoint is None else endpoint.name,
                "endpoint": None if endpoint is None else {"url": endpoint.url,
                                                           "model": test.get("endpoint", {})
                                                           .get("model") or endpoint.model},
                "shots": k, "primary_metric": task.primary,
                "validation": [{"prompt": c["prompt"], "value": c["validation"], "ci": c["ci"]}
                               for c in candidates],
                "chosen_variant": chosen["variant"], "prompt": chosen["prompt"],
                "selection": chosen["selection"], "tied_with": chosen["tied_with"],
                "validation_value": chosen["validation"], "validation_measure":
                chosen["measure"], "validation_n": chosen["n"],
                "test": {"value": metric["value"], "ci": metric["ci"], "n": test["n"]},
                "measure": outcome_measure(outcome, task), "scores": _scores(outcome),
                "parse_failure_rate": (outcome.get("parse_failures") or {}).get("rate"),
                "prompt_tokens_per_request": chosen["cost"][1],
                "eval_wall_s": test["wall_s"], "usage": test.get("usage"),
                "run": test.get("run_dir")})
    return arms


def _separated(config: Config, key: str):
    """``separated(a, b)``: does validation tell ``a`` from ``b`` (their paired interval
    excludes 0)?"""
    from tunelab.eval.stats import paired_comparison

    def separated(a: dict, b: dict) -> bool:
        n = a.get("n") or a.get("validation_n")
        return paired_comparison([b[key]], [a[key]], n=n, n_resamples=config.eval.bootstrap,
                                 seed=config.eval.seed)["significant"]

    return separated


def _prompting(config: Config, folder: Path, endpoint: Any, shots: int, variant: int,
               split: str, progress: Progress, console: Console) -> dict:
    """One prompting choice (base model or endpoint, shots, prompt variant) evaluated on
    ``split``: read back when an earlier call measured it, else measured now."""
    variants = config.eval.prompt_variants or [config.data.prompt]
    run_config = config.model_copy(deep=True)
    source = "base" if endpoint is None else endpoint.name
    run_config.name = f"{config.name}-prompting-{source}-{shots}shot-v{variant}"
    run_config.output_dir = str(folder)
    run_config = _evaluation_config(run_config, shots=shots, split=split, variant=variant)
    phase = f"prompting {source} {shots}-shot v{variant}: {split}"
    if endpoint is None:
        run_dir = _baseline_run(run_config)
        evaluation = evaluated(run_config, run_dir, [variants[variant]], base=True,
                               progress=progress, phase=phase, console=console)
        return {**evaluation, "run_dir": str(run_dir)}
    from tunelab.eval.endpoint import evaluate_endpoint

    with progress.timed(phase):  # answers are cached on disk: a rerun sends no request
        evaluation = evaluate_endpoint(run_config, endpoint, split=split, shots=shots,
                                       prompt=variants[variant],
                                       cache_dir=folder / "endpoint-cache", console=console)
    return _plain(evaluation)


def outcome_measure(outcome: dict, task) -> Any:
    """One evaluated model's primary metric as ``eval.stats`` resamples it: its per-example
    scores where the metric is their mean, else the task's own statistic of its answers
    (corpus chrF, entity F1), else (answers that do not reproduce the metric) the metric
    shifted by its per-example scores' resampled change."""
    predictions = sorted(outcome["predictions"], key=lambda p: p["index"])
    value = outcome["metrics"][task.primary]["value"]
    scores = np.array([p.get("score") if p.get("score") is not None else np.nan
                       for p in predictions], dtype=float)
    if np.all(np.isfinite(scores)) and math.isclose(float(scores.mean()), value,
                                                    rel_tol=1e-9, abs_tol=1e-12):
        return scores
    try:
        golds = [task.gold(p["gold"]) for p in predictions]
        scored = task.score(golds, [task.parse(p["prediction"])[0] for p in predictions],
                            [None] * len(predictions))
        if math.isclose(scored.metrics[task.primary]["value"], value, rel_tol=1e-9,
                        abs_tol=1e-9):
            return scored.paired
    except Exception:  # answers shown in a form the task does not parse back
        pass
    if not np.all(np.isfinite(scores)):
        raise RunError(f"an evaluation's {task.primary} cannot be resampled: its per-example "
                       "scores are missing", where="assess",
                       fix="run tunelab assess again with --overwrite")
    scale, mean = METRIC_SCALE.get(task.primary, 1.0), float(scores.mean())
    return lambda rows: value + scale * (float(scores[rows].mean()) - mean)


def _baseline_run(config: Config) -> Path:
    if RunDir(config.run_dir).is_run():
        return config.run_dir
    return create_run(config, overwrite=True).path


def evaluated(config: Config, run_dir: Path, prompts: list[str | None], *, base: bool,
              progress: Progress, phase: str, console: Console) -> dict:
    """``evaluate()``'s result for ``run_dir`` on the config's split: read back when an earlier
    call wrote it for the same prompts and shots, else evaluated now."""
    from tunelab.eval.evaluate import evaluate

    try:
        saved = RunDir(run_dir).read_eval(config.eval.split)
    except RunError:  # not a result this tunelab reads (another schema): measured again
        saved = None
    outcome = saved.models.get("base" if base else "tuned") if saved else None
    if outcome and saved.shots == config.eval.shots and \
            [variant.prompt for variant in outcome.variants] == prompts:
        return saved.to_dict()
    progress.before_load(config)
    with progress.timed(phase):
        result = evaluate(config, run_dir=run_dir, base=base, tuned=not base, console=console)
    return _plain(result)


def _plain(result: Any) -> dict:
    """An evaluation result as plain JSON data, whether evaluate() returned a dict or a typed
    result."""
    if isinstance(result, dict):
        return json.loads(json.dumps(result, default=_jsonable))
    return result.to_dict()


def _jsonable(value: Any) -> Any:
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return value.tolist() if hasattr(value, "tolist") else str(value)


def _scores(outcome: dict) -> list[float] | None:
    """Per-example scores of the evaluated variant, in test order (None if any is missing)."""
    scores = [p.get("score") for p in sorted(outcome["predictions"], key=lambda p: p["index"])]
    return None if any(s is None for s in scores) else scores


def run_fraction(config: Config, folder: Path, fraction: float, records: list,
                 progress: Progress, console: Console, *, seed: int,
                 forgetting_cache: dict | None = None) -> dict:
    """Train (or resume, or reuse) the run on ``records`` with training seed ``seed``, evaluate
    it on test and measure what it cost outside the task."""
    from tunelab.eval.tasks import Task
    from tunelab.peak_memory import peak_rss_bytes
    from tunelab.run.metrics import read_metrics
    from tunelab.train.checkpoint import list_checkpoints
    from tunelab.train.loop import train

    n = len(records)
    run_config = config.model_copy(deep=True)
    run_config.name = f"{config.name}-n{n}" + ("" if seed == config.train.seed
                                               else f"-seed{seed}")
    run_config.output_dir, run_config.train.seed = str(folder), seed
    run_config.data.train = [str(_write_subset(folder / "data" / f"train-n{n}.jsonl", records))]
    # Same hyperparameters and epochs; no validation loss (before, during, after) and no
    # samples: the curve is measured on test, validation only chooses prompts, and the loss
    # before training is the same base model's for every fraction (a third of a small run).
    run_config.train.eval_every, run_config.train.samples = 0, 0
    run_config.data.validation, run_config.data.validation_split = [], 0.0
    run_config.eval.shots, run_config.eval.split, run_config.eval.prompt_variants = 0, "test", []
    run = RunDir(run_config.run_dir)
    label = f"n={n}" + ("" if seed == config.train.seed else f" seed {seed}")
    if not run.finished():
        resume = run.path if list_checkpoints(run.checkpoints) else None
        progress.before_load(run_config)
        _reset_peak_rss()
        with progress.timed(f"train {label}"):
            train(run_config, resume=resume, overwrite=resume is None, console=console)
        progress.peak_rss_bytes[run_config.name] = peak_rss_bytes()
    evaluation = evaluated(run_config, run.path, [run_config.data.prompt], base=False,
                           progress=progress, phase=f"evaluate {label}", console=console)
    outcome = evaluation["models"]["tuned"]
    primary = evaluation["primary_metric"]
    manifest = run.read_manifest()
    predictions = sorted(outcome["predictions"], key=lambda p: p["index"])
    losses = [record["loss"] for record in read_metrics(run) if "loss" in record]
    return {"fraction": fraction, "n_examples": n, "seed": seed, "run": str(run.path),
            "name": run_config.name, "primary_metric": primary,
            "value": outcome["metrics"][primary]["value"],
            "ci": outcome["metrics"][primary]["ci"], "n_test": evaluation["n"],
            "measure": outcome_measure(outcome, Task.from_config(config.eval)),
            "scores": _scores(outcome), "eval_wall_s": evaluation["wall_s"],
            "manifest": manifest,
            "degenerate": degenerate_reasons([p["prediction"] for p in predictions],
                                             [p["gold"] for p in predictions],
                                             steps=manifest.steps, losses=losses),
            "forgetting": _forgetting(folder, run, run_config.name, progress, label,
                                      forgetting_cache),
            "measured_peak_rss_bytes": progress.peak_rss_bytes.get(run_config.name),
            "config": run_config}


def _forgetting(folder: Path, run: RunDir, name: str, progress: Progress, label: str,
                cache: dict | None) -> dict | None:
    """What the run cost outside its task (``forgetting.forgetting_of_run``), measured once and
    kept in ``forgetting/<run>.json``."""
    from tunelab.experiments.forgetting import forgetting_of_run

    path = folder / "forgetting" / f"{name}.json"
    if path.is_file():
        return json.loads(path.read_text())
    path.parent.mkdir(exist_ok=True)
    with progress.timed(f"forgetting {label}"):
        measured = forgetting_of_run(run.path, base_cache=cache)
    _write_json(path, measured)
    return json.loads(path.read_text())


def _write_subset(path: Path, records: list) -> Path:
    """The training subset as JSONL (the records' own fields), written once, atomically."""
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text("".join(json.dumps(r.fields, ensure_ascii=False,
                                                default=_jsonable) + "\n" for r in records))
        temporary.replace(path)
    return path


def _reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) so a run's peak is its own, not an earlier run's;
    where the kernel refuses, the peak stays the process's so far (a bound from above)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def _write_json(path: Path, data: Any) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=1, default=_jsonable))
    temporary.replace(path)


# --- from measurements to the answer ---------------------------------------------------------


def summarise(config: Config, arms: list[dict], runs: list[dict], *,
              target: float | None = None, prices: dict[str, Any] | None = None,
              device_cost_per_hour: float | None = None) -> dict:
    """Curve, fit, paired comparisons, cost, complexity and verdict from the prompting arms and
    the runs (ordered by size, then seed); what ``assess.json`` holds."""
    from tunelab.eval.stats import resampled_curve
    from tunelab.experiments.curve import fit_curve
    from tunelab.model.load import load_tokenizer

    primary = runs[-1]["primary_metric"]
    scale = METRIC_SCALE.get(primary, 1.0)
    n_test = runs[-1]["n_test"]
    for item in [*runs, *arms]:
        n = item["n_test"] if "n_test" in item else item["test"]["n"]
        if n != n_test:
            raise RunError(f"{item.get('name')} was scored on {n} test examples and the "
                           f"largest run on {n_test}; a paired comparison needs the same "
                           "examples", where="assess", fix="run tunelab assess again with "
                           "--overwrite")
    groups = _by_fraction(runs)
    samples = resampled_curve([[run["measure"] for run in group] for group in groups]
                              + [[arm["measure"]] for arm in arms], n=n_test,
                              n_resamples=config.eval.bootstrap, seed=config.eval.seed)
    curve, arm_samples = samples[:, :len(groups)].copy(), samples[:, len(groups):]
    spreads = [seed_spread(group) for group in groups]
    seed_note = borrow_seed_noise(curve, spreads, seed=config.eval.seed)
    points = [{"fraction": group[0]["fraction"], "n_examples": group[0]["n_examples"],
               "value": spread_["mean"], "ci": _interval(curve[:, index]),
               "seeds": spread_, "run": group[0]["run"],
               "runs": [run["run"] for run in group],
               "distrust": [{"run": run["name"], **reason} for run in group
                            for reason in run["degenerate"]]}
              for index, (group, spread_) in enumerate(zip(groups, spreads, strict=True))]
    usable = [index for index, point in enumerate(points) if not point["distrust"]]
    distrust = list(points[-1]["distrust"])
    fit = None
    if len(usable) >= 2:
        fit = fit_curve([points[i]["n_examples"] for i in usable],
                        [points[i]["value"] for i in usable], resampled=curve[:, usable],
                        ceiling=scale, floor=0.0, target=target, confidence=CONFIDENCE,
                        test_se=[float(np.std(curve[:, i])) for i in usable],
                        seed_sd=max((s["std"] for s in spreads if s["std"] is not None),
                                    default=None), seed=config.eval.seed)
        fit["fractions_left_out"] = [points[i]["n_examples"] for i in range(len(points))
                                     if i not in usable]
    else:
        distrust.append({"run": "the curve", "kind": "too few points",
                         "text": f"{len(usable)} of {len(points)} fractions can be trusted, "
                                 "too few to fit a curve",
                         "fix": "give the small fractions more steps (train.epochs)"})
    chosen = choose_arm([{**arm, "validation": arm["validation_value"],
                          "cost": (arm["source"] != "base", arm["shots"],
                                   arm["prompt_tokens_per_request"])} for arm in arms],
                        _separated(config, "validation_measure"))
    strongest = max(arms, key=lambda arm: arm["test"]["value"])
    index_of = {arm["name"]: number for number, arm in enumerate(arms)}
    tuned = points[-1]
    versus = {arm["name"]: {"value": tuned["value"] - arm["test"]["value"],
                            "ci": _interval(curve[:, -1] - arm_samples[:, index_of[arm["name"]]])}
              for arm in arms}
    deltas = {name: versus[name] for name in dict.fromkeys([chosen["name"], strongest["name"]])}
    decision = verdict(deltas, fit["gain_per_doubling"] if fit else None, metric=primary,
                       n_test=n_test, min_effect=MIN_EFFECT * scale,
                       min_gain=MIN_GAIN_PER_DOUBLING * scale, distrust=distrust,
                       predicted_4x=fit["predicted"]["4x"] if fit else None,
                       prompting_value=strongest["test"]["value"],
                       target=fit.get("target") if fit else None)
    full = groups[-1][0]
    local = chosen if chosen["source"] == "base" else max(
        (arm for arm in arms if arm["source"] == "base"), key=lambda arm: arm["test"]["value"])
    tokenizer = load_tokenizer(config.model.path, config.model.gguf_file)
    return {
        "name": config.name, "task": config.eval.task, "primary_metric": primary,
        "metric_scale": scale, "n_test": n_test,
        "interval_method": _interval_method(spreads, seed_note),
        "baselines": {
            "arms": [_public(arm) for arm in arms], "chosen": chosen["name"],
            "chosen_selection": chosen["selection"], "strongest_on_test": strongest["name"],
            "chosen_on": "validation",
            "by_shots": [_public(arm) for arm in arms if arm["source"] == "base"],
            "best": {"name": chosen["name"], "shots": chosen["shots"],
                     "prompt": chosen["prompt"], "validation": chosen["validation_value"],
                     "test": chosen["test"]}},
        "learning_curve": points,
        "seeds": {"per_fraction": [{"n_examples": p["n_examples"], **p["seeds"]}
                                   for p in points], "note": seed_note},
        "fit": fit, "tuned_vs_best_prompting": versus[chosen["name"]],
        "tuned_vs_arms": versus,
        "forgetting": [{**(run["forgetting"] or {}), "n_examples": run["n_examples"],
                        "training_seed": run["seed"]} for run in runs],
        "cost": {"runs": [run_cost(run) for run in runs],
                 "projections": projections(full["config"], full["manifest"]),
                 "at_use": cost_at_use(config, tokenizer, local, full),
                 "endpoints": endpoint_costs(arms, full, prices or {}, device_cost_per_hour)},
        "complexity": complexity(config, arms, tuned, full, fit),
        "verdict": decision,
    }


def _by_fraction(runs: list[dict]) -> list[list[dict]]:
    groups: dict[int, list[dict]] = {}
    for run in runs:
        groups.setdefault(run["n_examples"], []).append(run)
    return [groups[n] for n in sorted(groups)]


def seed_spread(group: list[dict]) -> dict:
    """The fraction's metric per training seed: mean, sample standard deviation, range."""
    values = [run["value"] for run in group]
    return {"n_seeds": len(values), "seeds": [run["seed"] for run in group], "values": values,
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
            "range": float(max(values) - min(values))}


def borrow_seed_noise(curve: np.ndarray, spreads: list[dict], *, seed: int) -> str:
    """Give each one-seed fraction's resamples the seed spread measured at the nearest fraction
    with several seeds (``curve`` changed in place, and the spread it borrowed recorded in that
    fraction's ``spreads`` entry); returns what was done, in words."""
    measured = [index for index, s in enumerate(spreads) if s["std"] is not None]
    single = [index for index, s in enumerate(spreads) if s["std"] is None]
    if not measured:
        return ("one training seed per fraction: the intervals cover the test examples only, "
                "not training noise (run with --seeds 2 or more)")
    rng = np.random.default_rng([seed, 2])
    for index in single:
        nearest = min(measured, key=lambda m: (abs(m - index), -m))
        curve[:, index] += spreads[nearest]["std"] * rng.standard_normal(curve.shape[0])
        spreads[index]["borrowed_std"] = spreads[nearest]["std"]
        spreads[index]["borrowed_from_fraction"] = nearest
    if not single:
        return "every fraction trained with several seeds, resampled with the test examples"
    return (f"{len(single)} fraction(s) trained with one seed carry the seed spread of the "
            "nearest fraction with several (added to each resample), "
            + ", ".join(f"{spreads[m]['std']:.3g} measured over {spreads[m]['n_seeds']} seeds"
                        for m in measured))


def _interval(samples: np.ndarray) -> list[float]:
    low, high = np.quantile(samples, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return [float(low), float(high)]


def _public(arm: dict) -> dict:
    return {key: value for key, value in arm.items()
            if key not in ("measure", "validation_measure", "scores")}


def _interval_method(spreads: list[dict], seed_note: str) -> str:
    seeds = "/".join(str(s["n_seeds"]) for s in spreads)
    return (f"hierarchical bootstrap over test examples and training seeds ({seeds} seeds per "
            f"fraction); {seed_note}")


def curve_scores(result: dict, runs: list[dict]) -> dict:
    """Every run's per-example test scores by fraction and seed: what the calibration benchmark
    (benchmarks/assess_calibration.py) refits."""
    return {"metric": result["primary_metric"], "scale": result["metric_scale"],
            "ceiling": result["metric_scale"],
            "fractions": [{"n_examples": group[0]["n_examples"],
                           "seeds": [{"seed": run["seed"], "value": run["value"],
                                      "scores": run["scores"]} for run in group]}
                          for group in _by_fraction(runs)]}


def render_assessment(result: dict, folder: Path, console: Console) -> None:
    """Every arm, the learning curve with its seeds, the fit and the verdict on screen."""
    from rich.table import Table

    metric = result["primary_metric"]
    table = Table(title=f"{result['name']}: {metric} on {result['n_test']} test examples")
    for column in ("what", metric, "95% interval", "note"):
        table.add_column(column)
    baselines = result["baselines"]
    for arm in baselines["arms"]:
        notes = [n for n, on in (("chosen on validation", arm["name"] == baselines["chosen"]),
                                 ("strongest on test",
                                  arm["name"] == baselines["strongest_on_test"])) if on]
        if arm.get("parse_failure_rate"):
            notes.append(f"{arm['parse_failure_rate']:.0%} of its answers not an answer")
        table.add_row(f"{arm['name']} (variant {arm['chosen_variant']})",
                      f"{arm['test']['value']:.3f}", _ci_text(arm["test"]["ci"]),
                      ", ".join(notes))
    for point in result["learning_curve"]:
        seeds = point["seeds"]
        spread = (f"{seeds['n_seeds']} seeds, range {seeds['range']:.3f}"
                  if seeds["n_seeds"] > 1 else "1 seed")
        if point["distrust"]:
            spread += "; not trusted: " + "; ".join(r["kind"] for r in point["distrust"])
        table.add_row(f"tuned on {point['n_examples']} examples", f"{point['value']:.3f}",
                      _ci_text(point["ci"]), spread)
    fit = result["fit"]
    if fit:
        for label, predicted in fit["predicted"].items():
            table.add_row(f"predicted at {label} data ({predicted['n']} examples)",
                          f"{predicted['value']:.3f}", _ci_text(predicted["ci"]),
                          fit.get("form", {}).get("name", "") if isinstance(fit.get("form"),
                                                                            dict) else "")
    console.print(table)
    if fit:
        gain = fit["gain_per_doubling"]
        console.print(f"Gain per doubling of the data: {gain['value']:+.3f} "
                      f"{_ci_text(gain['ci'])}")
        for flag in fit.get("flags", []):
            console.print(f"[yellow]Curve: {flag['text']}", highlight=False)
        target = fit.get("target")
        if target:
            console.print(f"Target {target['target']:g}: " + (
                f"about {target['n']} examples {_ci_text(target['ci'])}" if target["reachable"]
                else target["note"]))
    console.print(f"Intervals: {result['interval_method']}", highlight=False)
    console.print(f"[bold]Verdict: {result['verdict']['kind']}[/]")
    console.print(result["verdict"]["text"], markup=False, highlight=False)
    console.print(f"Written to {folder / 'assess.json'} and {folder / 'report.html'}")


def _ci_text(ci: list | None) -> str:
    if not ci:
        return "(no interval)"
    return "[" + ", ".join("∞" if v is None else f"{v:.3g}" for v in ci) + "]"
