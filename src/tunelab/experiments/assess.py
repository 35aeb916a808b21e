""""Should we fine-tune this task, and is more data worth it?": baselines, curve, fit, cost.

``assess(config)`` measures what the decision rests on, in one process:

1. prompting baselines of the base model, zero- and k-shot over the configured prompt variants;
   the best (shots, variant) is chosen on the validation split and reported on test;
2. a learning curve: the configured LoRA run on nested, seeded fractions of the training data
   (each subset holds the smaller ones), each an ordinary run directory evaluated on test;
3. the fit of the metric against log2(training examples), the gain per doubling with a
   bootstrap interval (test examples resampled, the line refitted per resample), the metric
   predicted at 2x and 4x the data, and the examples needed to reach a target;
4. cost: the planner's prediction against the measured time, tokens and peak memory per run,
   the predicted cost of more epochs and of twice the data, and the cost at use (prompt tokens
   and time per request of best prompting against the tuned model);
5. the task's complexity and a verdict from the rules in ``verdict``.

Everything lands in ``<output_dir>/<name>-assess/`` (``assess.json``, ``report.html``, the curve
alone as ``learning-curve.svg``, and one run directory per fraction and per baseline). A second
call reuses every finished run and evaluation, so an interrupted assessment resumes where it
stopped.

Bootstrap intervals resample the per-example scores of the evaluation (its ``predictions``):
exact for metrics that are the mean of those scores (accuracy, exact match, ROUGE-L); for corpus
metrics (micro entity F1, corpus chrF/BLEU) the resampled metric is the observed one shifted by
the resampled change of the per-example scores, a first-order approximation (named in the
result as ``interval_method``). The intervals cover which test examples were drawn, not the
run-to-run noise of training (one seeded run per fraction): two runs that answer every test
example alike give a gain per doubling of exactly [0, 0].
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from rich.console import Console

from tunelab.config import Config
from tunelab.errors import ConfigError, RunError
from tunelab.run.directory import RunDir, create_run
from tunelab.run.manifest import Manifest, Prediction

DEFAULT_FRACTIONS = (0.125, 0.25, 0.5, 1.0)
DEFAULT_SHOTS = (0, 4)
CONFIDENCE = 0.95
# Metrics reported on 0..100 whose per-example scores are on 0..1 (sentence chrF / 100).
METRIC_SCALE = {"chrf": 100.0, "bleu": 100.0}
# Verdict thresholds, in units of a 0..1 metric (times METRIC_SCALE for 0..100 metrics): a gain
# over prompting below MIN_EFFECT is not worth a fine-tuning run; a curve whose gain per doubling
# of data stays below MIN_GAIN_PER_DOUBLING is flat.
MIN_EFFECT = 0.02
MIN_GAIN_PER_DOUBLING = 0.01
VERDICTS = ("fine-tune and collect more data", "fine-tune", "undecided", "not worth it yet",
            "prompting is enough")


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


# --- fit and extrapolation -------------------------------------------------------------------


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


def resampled_values(value: float, scores: Sequence[float], rows: np.ndarray,
                     scale: float = 1.0) -> np.ndarray:
    """The metric on each resample of the test examples (``rows``: index matrix).

    ``value`` shifted by the resampled change of the per-example scores' mean (times ``scale``
    when the metric is on 0..100 and the scores on 0..1); exactly the resampled metric when the
    metric is the mean of those scores.
    """
    per_example = np.asarray(scores, dtype=float)
    return value + scale * (per_example[rows].mean(axis=1) - per_example.mean())


def resample_rows(n: int, n_resamples: int, seed: int) -> np.ndarray:
    """``n_resamples`` bootstrap index rows over ``n`` test examples (seeded)."""
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def extrapolate(n_examples: Sequence[int], values: Sequence[float],
                scores: Sequence[Sequence[float]] | None, *, scale: float = 1.0,
                target: float | None = None, n_resamples: int = 1000, seed: int = 0,
                ceiling: float | None = 1.0) -> dict:
    """The learning curve's fit, gain per doubling, predictions at 2x and 4x the data and the
    examples needed for ``target``, each with a bootstrap interval when ``scores`` (per fraction,
    the per-example scores on the same test examples) are given.

    Predictions are clipped to ``ceiling`` (the metric's best value), which a line ignores.
    """
    intercept, slope = fit_log2(n_examples, values)
    largest = max(n_examples)
    x = np.log2(np.asarray(n_examples, dtype=float))
    resampled = None
    if scores is not None:
        rows = resample_rows(len(scores[0]), n_resamples, seed)
        curves = np.stack([resampled_values(v, s, rows, scale) for v, s in
                           zip(values, scores, strict=True)], axis=1)  # [resamples, fractions]
        centred = x - x.mean()
        slopes = (curves - curves.mean(axis=1, keepdims=True)) @ centred / (centred @ centred)
        resampled = (curves.mean(axis=1) - slopes * x.mean(), slopes)
    clip = (lambda v: np.minimum(v, ceiling)) if ceiling is not None else (lambda v: v)

    def at(n: float) -> dict:
        point = float(clip(intercept + slope * math.log2(n)))
        ci = None if resampled is None else _interval(clip(resampled[0] + resampled[1]
                                                           * math.log2(n)))
        return {"n": int(round(n)), "value": point, "ci": ci}

    fit = {"intercept": intercept, "gain_per_doubling": {
        "value": slope, "ci": None if resampled is None else _interval(resampled[1])},
        "predicted": {"2x": at(2 * largest), "4x": at(4 * largest)},
        "band": [at(n) for n in np.geomspace(min(n_examples), 4 * largest, 24)],
        "residual_rmse": float(np.sqrt(np.mean((intercept + slope * x
                                                - np.asarray(values)) ** 2))),
        "n_resamples": n_resamples if resampled is not None else 0, "confidence": CONFIDENCE}
    if target is not None:
        fit["target"] = _target(target, intercept, slope, resampled, ceiling)
    return fit


def _target(target: float, intercept: float, slope: float, resampled, ceiling) -> dict:
    """Examples needed to reach ``target``, with an interval; "not reachable" where the line
    never gets there (flat or falling, or a target above the metric's best value)."""
    if ceiling is not None and target > ceiling:
        return {"target": target, "reachable": False, "n": None, "ci": None,
                "note": f"the target is above the metric's best value {ceiling:g}"}
    needed = examples_needed(intercept, slope, target)
    ci = None
    if resampled is not None:
        with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
            per_resample = np.where(resampled[1] > 0, 2.0 ** ((target - resampled[0])
                                                              / resampled[1]), np.inf)
        # no interpolation between resamples: two unreachable (infinite) ones make no NaN
        low, high = np.quantile(per_resample, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2],
                                method="inverted_cdf")
        ci = [_finite(low), _finite(high)]  # None: not reachable at that end of the interval
    if math.isinf(needed):
        return {"target": target, "reachable": False, "n": None, "ci": ci,
                "note": "not reachable on this curve: it does not rise"}
    return {"target": target, "reachable": True, "n": round(needed), "ci": ci,
            "note": None if ci is None or ci[1] is not None else
            "the interval's upper end is not reachable on this curve"}


def paired_delta(tuned_value: float, tuned_scores: Sequence[float] | None, other_value: float,
                 other_scores: Sequence[float] | None, *, scale: float = 1.0,
                 n_resamples: int = 1000, seed: int = 0) -> dict:
    """tuned − other on the same test examples, with a paired bootstrap interval."""
    delta = tuned_value - other_value
    if tuned_scores is None or other_scores is None:
        return {"value": delta, "ci": None}
    if len(tuned_scores) != len(other_scores):
        raise RunError(f"the tuned model was scored on {len(tuned_scores)} test examples and "
                       f"best prompting on {len(other_scores)}; a paired comparison needs the "
                       "same examples", where="assess",
                       fix="run tunelab assess again with --overwrite")
    rows = resample_rows(len(tuned_scores), n_resamples, seed)
    deltas = (resampled_values(tuned_value, tuned_scores, rows, scale)
              - resampled_values(other_value, other_scores, rows, scale))
    return {"value": delta, "ci": _interval(deltas)}


def _interval(samples: np.ndarray) -> list[float]:
    low, high = np.quantile(samples, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return [float(low), float(high)]


def _finite(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# --- the verdict -----------------------------------------------------------------------------


def verdict(delta: dict, gain: dict | None, *, metric: str, n_test: int,
            min_effect: float = MIN_EFFECT, min_gain: float = MIN_GAIN_PER_DOUBLING,
            predicted_4x: dict | None = None, prompting_value: float | None = None) -> dict:
    """The decision, from the paired interval of tuned (full data) − best prompting (``delta``)
    and of the gain per doubling (``gain``), checked in this order:

    1. fine-tune and collect more data: tuned is better (delta's interval above 0) and the
       gain per doubling's interval is above ``min_gain``;
    2. fine-tune: tuned is better (delta's interval above 0);
    3. undecided, evaluate on more test examples: delta's interval includes 0 but also gains of
       ``min_effect`` or more (no interval: undecided too);
    4. not worth it yet: no gain over prompting (delta's upper end below ``min_effect``) and a
       flat curve (the gain per doubling's upper end below ``min_gain``);
    5. prompting is enough: no gain over prompting (delta's upper end below ``min_effect``).
    """
    low, high = delta["ci"] if delta.get("ci") else (None, None)
    gain_ci = gain["ci"] if gain and gain.get("ci") else None
    numbers = {"metric": metric, "delta": delta["value"], "delta_ci": delta.get("ci"),
               "gain_per_doubling": gain["value"] if gain else None,
               "gain_per_doubling_ci": gain_ci, "min_effect": min_effect, "min_gain": min_gain,
               "n_test": n_test}
    d = f"tuned − best prompting = {delta['value']:+.3g}" + (
        f" [{low:+.3g}, {high:+.3g}]" if low is not None else " (no interval)")
    g = "" if not gain else f"gain per doubling {gain['value']:+.3g}" + (
        f" [{gain_ci[0]:+.3g}, {gain_ci[1]:+.3g}]" if gain_ci else " (no interval)")
    if low is not None and low > 0 and gain_ci and gain_ci[0] > min_gain:
        kind = VERDICTS[0]
        text = (f"Fine-tune, and more data pays: {metric} {d} on {n_test} test examples; "
                f"{g} (above {min_gain:g}).")
    elif low is not None and low > 0:
        kind = VERDICTS[1]
        text = (f"Fine-tune: it beats the best prompting; {metric} {d} on {n_test} test "
                f"examples." + (f" More data is not shown to pay: {g}." if g else ""))
    elif low is None or high >= min_effect:
        kind = VERDICTS[2]
        text = (f"Undecided, evaluate on more test examples: {metric} {d} on {n_test} test "
                f"examples" + (_more_examples(low, high, n_test, min_effect)
                               if low is not None else "") + ".")
    elif gain_ci and gain_ci[1] < min_gain:
        kind = VERDICTS[3]
        text = (f"Not worth it yet: no gain over prompting ({metric} {d}, below "
                f"{min_effect:g}) and a flat curve ({g}, below {min_gain:g}).")
    else:
        kind = VERDICTS[4]
        text = (f"Prompting is enough: {metric} {d} on {n_test} test examples (no gain of "
                f"{min_effect:g} or more)." + (f" The curve is not shown to be flat: {g}"
                                                if g else ""))
        if predicted_4x and prompting_value is not None and g:
            text += (f"; at 4x the data ({predicted_4x['n']} examples) it is predicted at "
                     f"{predicted_4x['value']:.3g} against prompting's {prompting_value:.3g}.")
        elif g:
            text += "."
    return {"kind": kind, "text": text, "numbers": numbers}


def _more_examples(low: float, high: float, n_test: int, min_effect: float) -> str:
    """How many test examples would narrow the interval to ±min_effect/2 (intervals shrink as
    1/sqrt(n))."""
    half_width = (high - low) / 2
    wanted = math.ceil(n_test * (half_width / (min_effect / 2)) ** 2)
    return (f"; the interval includes 0 and gains up to {high:+.3g}: about {wanted} test examples "
            f"would narrow it to ±{min_effect / 2:g}")


# --- complexity and cost ---------------------------------------------------------------------


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


# --- the pipeline ----------------------------------------------------------------------------


def assess(config: Config, *, shots: Sequence[int] = DEFAULT_SHOTS,
           fractions: Sequence[float] = DEFAULT_FRACTIONS, target: float | None = None,
           overwrite: bool = False, console: Console | None = None) -> dict:
    """Run (or resume) the whole assessment of ``config`` and write ``assess.json`` and
    ``report.html`` under ``<output_dir>/<name>-assess/``; returns what ``assess.json`` holds."""
    console = console or Console()
    _check_config(config)
    folder = (Path(config.output_dir) / f"{config.name}-assess").resolve()
    _open_folder(folder, config, overwrite)
    progress = Progress(folder / "progress.json")
    started = time.perf_counter()
    records = _train_records(config)
    subsets = nested_subsets(len(records), fractions, seed=config.train.seed)
    baselines = run_baselines(config, folder, list(shots), progress, console)
    runs = [run_fraction(config, folder, fraction, [records[i] for i in indices], progress,
                         console) for fraction, indices in subsets.items()]
    with progress.timed("fit, cost, complexity"):
        result = summarise(config, baselines, runs, target=target)
    wall_s = time.perf_counter() - started
    result["time"] = {"this_call_s": round(wall_s, 1), "phases_s": progress.phases,
                      "redone_this_call": progress.done_now,
                      "model_loads": progress.load_share(wall_s)}
    _write_json(folder / "assess.json", result)
    from tunelab.experiments.assess_report import write_assess_report, write_curve_svg

    write_assess_report(result, folder / "report.html")
    write_curve_svg(result, folder / "learning-curve.svg")
    progress.save()
    render_assessment(result, folder, console)
    return result


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
                  console: Console) -> dict:
    """The base model with k demonstrations for each k in ``shots``: every prompt variant on
    validation, then the variant best on validation on test; the best (k, variant) on
    validation is "best prompting"."""
    variants = config.eval.prompt_variants or [config.data.prompt]
    baselines = {"by_shots": [], "chosen_on": "validation"}
    for k in shots:
        run_config = config.model_copy(deep=True)
        run_config.name, run_config.output_dir = f"{config.name}-prompting-{k}shot", str(folder)
        run_config.eval.shots = k
        run_dir = _baseline_run(run_config)
        validation = evaluated(_evaluation_config(run_config, shots=k, split="validation"),
                               run_dir, variants, base=True, progress=progress,
                               phase=f"prompting {k}-shot: validation", console=console)
        primary = validation["primary_metric"]
        scored = [(variant["metrics"][primary]["value"], -index) for index, variant in
                  enumerate(validation["models"]["base"]["variants"])]
        chosen = -max(scored)[1]
        test = evaluated(_evaluation_config(run_config, shots=k, split="test", variant=chosen),
                         run_dir, [variants[chosen]], base=True, progress=progress,
                         phase=f"prompting {k}-shot: test", console=console)
        outcome = test["models"]["base"]
        baselines["by_shots"].append({
            "shots": k, "run": str(run_dir), "primary_metric": primary,
            "validation": [{"prompt": variant["prompt"],
                            "value": variant["metrics"][primary]["value"],
                            "ci": variant["metrics"][primary]["ci"]}
                           for variant in validation["models"]["base"]["variants"]],
            "chosen_variant": chosen, "prompt": variants[chosen],
            "test": {"value": outcome["metrics"][primary]["value"],
                     "ci": outcome["metrics"][primary]["ci"], "n": test["n"]},
            "scores": _scores(outcome), "eval_wall_s": test["wall_s"]})
    best = max(baselines["by_shots"], key=lambda b: (b["validation"][b["chosen_variant"]]
                                                     ["value"], -b["shots"]))
    baselines["best"] = {"shots": best["shots"], "prompt": best["prompt"],
                         "validation": best["validation"][best["chosen_variant"]]["value"],
                         "test": best["test"]}
    return baselines


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
                 progress: Progress, console: Console) -> dict:
    """Train (or resume, or reuse) the run on ``records`` and evaluate it on test."""
    from tunelab.peak_memory import peak_rss_bytes
    from tunelab.train.checkpoint import list_checkpoints
    from tunelab.train.loop import train

    n = len(records)
    run_config = config.model_copy(deep=True)
    run_config.name, run_config.output_dir = f"{config.name}-n{n}", str(folder)
    run_config.data.train = [str(_write_subset(folder / "data" / f"train-n{n}.jsonl", records))]
    # Same hyperparameters and epochs; no validation loss (before, during, after) and no
    # samples: the curve is measured on test, validation only chooses prompts, and the loss
    # before training is the same base model's for every fraction (a third of a small run).
    run_config.train.eval_every, run_config.train.samples = 0, 0
    run_config.data.validation, run_config.data.validation_split = [], 0.0
    run_config.eval.shots, run_config.eval.split, run_config.eval.prompt_variants = 0, "test", []
    run = RunDir(run_config.run_dir)
    run_dir = run.path
    if not run.finished():
        resume = run_dir if list_checkpoints(run.checkpoints) else None
        progress.before_load(run_config)
        _reset_peak_rss()
        with progress.timed(f"train n={n}"):
            train(run_config, resume=resume, overwrite=resume is None, console=console)
        progress.peak_rss_bytes[run_config.name] = peak_rss_bytes()
    evaluation = evaluated(run_config, run_dir, [run_config.data.prompt], base=False,
                           progress=progress, phase=f"evaluate n={n}", console=console)
    outcome = evaluation["models"]["tuned"]
    primary = evaluation["primary_metric"]
    return {"fraction": fraction, "n_examples": n, "run": str(run_dir),
            "primary_metric": primary, "value": outcome["metrics"][primary]["value"],
            "ci": outcome["metrics"][primary]["ci"], "n_test": evaluation["n"],
            "scores": _scores(outcome), "eval_wall_s": evaluation["wall_s"],
            "manifest": run.read_manifest(),
            "measured_peak_rss_bytes": progress.peak_rss_bytes.get(run_config.name),
            "config": run_config}


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


def summarise(config: Config, baselines: dict, runs: list[dict], *,
              target: float | None = None) -> dict:
    """Fit, paired comparison, cost, complexity and verdict from the baselines and the runs
    (ordered by size); what ``assess.json`` holds."""
    from tunelab.model.load import load_tokenizer

    full = runs[-1]
    primary = full["primary_metric"]
    scale = METRIC_SCALE.get(primary, 1.0)
    resampling = {"n_resamples": config.eval.bootstrap, "seed": config.eval.seed}
    curve_scores = [run["scores"] for run in runs]
    fit = extrapolate([run["n_examples"] for run in runs], [run["value"] for run in runs],
                      None if any(s is None for s in curve_scores) else curve_scores,
                      scale=scale, target=target, ceiling=scale, **resampling)
    best = next(b for b in baselines["by_shots"] if b["shots"] == baselines["best"]["shots"])
    delta = paired_delta(full["value"], full["scores"], best["test"]["value"], best["scores"],
                         scale=scale, **resampling)
    decision = verdict(delta, fit["gain_per_doubling"], metric=primary, n_test=full["n_test"],
                       min_effect=MIN_EFFECT * scale, min_gain=MIN_GAIN_PER_DOUBLING * scale,
                       predicted_4x=fit["predicted"]["4x"], prompting_value=best["test"]["value"])
    tokenizer = load_tokenizer(config.model.path, config.model.gguf_file)
    return {
        "name": config.name, "task": config.eval.task, "primary_metric": primary,
        "metric_scale": scale, "n_test": full["n_test"],
        "interval_method": _interval_method(runs + baselines["by_shots"], scale),
        "baselines": {**baselines, "by_shots": [_without_scores(b)
                                                for b in baselines["by_shots"]]},
        "learning_curve": [{key: run[key] for key in ("fraction", "n_examples", "value", "ci",
                                                      "run")} for run in runs],
        "fit": fit, "tuned_vs_best_prompting": delta,
        "cost": {"runs": [run_cost(run) for run in runs],
                 "projections": projections(full["config"], full["manifest"]),
                 "at_use": cost_at_use(config, tokenizer, best, full)},
        "complexity": complexity(config, baselines, full, fit),
        "verdict": decision,
    }


def _without_scores(baseline: dict) -> dict:
    return {key: value for key, value in baseline.items() if key != "scores"}


def _interval_method(measured: list[dict], scale: float) -> str:
    """"exact" when every metric is the mean of its per-example scores, else the shift
    approximation (see the module docstring)."""
    for item in measured:
        scores = item["scores"]
        value = item["value"] if "value" in item else item["test"]["value"]
        if scores is None:
            return "none: per-example scores missing"
        if abs(scale * float(np.mean(scores)) - value) > 1e-6 * scale:
            return "per-example approximation"
    return "exact"


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


def complexity(config: Config, baselines: dict, full: dict, fit: dict) -> dict:
    """What makes the task easy or hard, next to the verdict."""
    from tunelab.data.prepare import read_splits
    from tunelab.data.render import reference_text
    from tunelab.eval.tasks import Task

    eval_cfg = config.eval
    zero = next((b for b in baselines["by_shots"] if b["shots"] == 0), None)
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
        "best_prompting": baselines["best"]["test"]["value"],
        "best_prompting_shots": baselines["best"]["shots"],
        "n_labels": n_labels, "label_entropy_bits": label_entropy_bits(labels),
        "target_tokens_mean": report["train_target_tokens"] / report["train_examples"]
        if report.get("train_examples") else None,
        "gain_per_doubling": fit["gain_per_doubling"]["value"],
        "train_examples": full["n_examples"],
    }


def render_assessment(result: dict, folder: Path, console: Console) -> None:
    """The learning curve, the baselines and the verdict on screen."""
    from rich.table import Table

    metric = result["primary_metric"]
    table = Table(title=f"{result['name']}: {metric} on {result['n_test']} test examples")
    for column in ("what", metric, "95% interval"):
        table.add_column(column)
    for baseline in result["baselines"]["by_shots"]:
        test = baseline["test"]
        table.add_row(f"base, {baseline['shots']}-shot (prompt chosen on validation)",
                      f"{test['value']:.3f}", _ci_text(test["ci"]))
    for point in result["learning_curve"]:
        table.add_row(f"tuned on {point['n_examples']} examples", f"{point['value']:.3f}",
                      _ci_text(point["ci"]))
    for label, predicted in result["fit"]["predicted"].items():
        table.add_row(f"predicted at {label} data ({predicted['n']} examples)",
                      f"{predicted['value']:.3f}", _ci_text(predicted["ci"]))
    console.print(table)
    gain = result["fit"]["gain_per_doubling"]
    console.print(f"Gain per doubling of the data: {gain['value']:+.3f} {_ci_text(gain['ci'])}")
    target = result["fit"].get("target")
    if target:
        console.print(f"Target {target['target']:g}: " + (
            f"about {target['n']} examples {_ci_text(target['ci'])}" if target["reachable"]
            else target["note"]))
    console.print(f"[bold]Verdict: {result['verdict']['kind']}[/]")
    console.print(result["verdict"]["text"], markup=False, highlight=False)
    console.print(f"Written to {folder / 'assess.json'} and {folder / 'report.html'}")


def _ci_text(ci: list | None) -> str:
    if not ci:
        return "(no interval)"
    return "[" + ", ".join("∞" if v is None else f"{v:.3g}" for v in ci) + "]"
