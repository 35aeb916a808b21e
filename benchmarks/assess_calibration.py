"""Learning-curve predictions checked against what was measured: published curves, assessments.

    python benchmarks/assess_calibration.py                    # (a) and synthetic (b), ~1 min
    python benchmarks/assess_calibration.py --assess DIR ...   # (b) on assessments' curve files
    python benchmarks/assess_calibration.py --smoke            # seconds: a few curves of each

(a) The published fine-tuning loss tables of Lin et al. (ICML 2024, "Selecting Large Language
Model to Fine-tune via Rectified Scaling Law"; ``data/lin2024-finetune-loss.json``, copied from
their repository with its source): 30 models × 3 datasets, the test loss after fine-tuning on
200 … 1,638,400 examples (doublings). Each curve is fitted on the sizes up to 1/4 and up to 1/2
of the largest, and the largest size's loss is predicted: by ``tunelab.experiments.curve``
(``fit_curve``), by the old log-linear line (``assess.fit_log2``), by persistence (no further
gain) and by the line through the last two points. Two windows: every size up to the cut (12
or 13 points) and its last 4 (what an assessment's 4 fractions see). The tables hold one loss
per size, no per-example scores: the intervals come from the fit's misfit alone (residuals,
backtest, rival forms), and the old line and persistence have none.

(b) Assessments: each ``--assess`` folder holds ``curve-scores.json`` (written by ``tunelab
assess`` beside its ``assess.json``): per fraction, each training seed's metric and per-example
test scores. The curve is fitted on the fractions up to 1/4 and up to 1/2 of the largest, with
a hierarchical bootstrap (test examples resampled once for all fractions and seeds, seeds with
replacement within each fraction: ``curve.hierarchical_resamples``), and the prediction for the
largest fraction is compared with each seed's measured value there. Without ``--assess`` the
same runs on synthetic assessments drawn from known curves (named as such in the result); the
smoke mode writes one synthetic folder and reads it back through the same reader.

Goals (the issue's): median |error| from a quarter of the data to all of it ≤ 0.025 on 0–1
metrics (≤ 2 chrF), nominal 95% intervals holding the outcome ≥ 90% over at least 12 cases, and
the predicted gain within ±25% of the measured gain in most cases.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import smoke  # benchmarks/smoke.py, beside this script
from provenance import provenance  # benchmarks/provenance.py, beside this script

from tunelab.experiments.assess import fit_log2
from tunelab.experiments.curve import fit_curve, hierarchical_resamples

DATA = Path(__file__).parent / "data" / "lin2024-finetune-loss.json"
RESULT = Path(__file__).parent / "results" / "assess-calibration.json"
CURVE_FILE = "curve-scores.json"
CUTS = {"1/4": 4, "1/2": 2}
WINDOWS = {"all": None, "last 4": 4}
METHODS = ("curve", "log-linear (old)", "persistence", "two-point")
ERROR_GOAL = {1.0: 0.025, 100.0: 2.0}  # median |error| from a quarter of the data, by scale
COVERAGE_GOAL, MIN_CASES, GAIN_BAND = 0.90, 12, 0.25


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--assess", nargs="+", type=Path, default=[], metavar="DIR",
                        help=f"assessment folders holding {CURVE_FILE} (part b)")
    parser.add_argument("--synthetic", type=int, default=24,
                        help="synthetic assessments for part (b) when no --assess is given")
    parser.add_argument("--resamples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: 2 models a dataset, one synthetic "
                             "assessment written and read back, 200 resamples, the result in a "
                             "temporary folder")
    parser.add_argument("--out", type=Path, help=f"result file (default {RESULT})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    origin = provenance()
    published = json.loads(DATA.read_text())
    models_per_table = 2 if args.smoke else None
    with tempfile.TemporaryDirectory(prefix="tunelab-calibration-") as scratch:
        folders, synthetic = list(args.assess), not args.assess
        if synthetic:
            count = 1 if args.smoke else args.synthetic
            folders = write_synthetic(Path(scratch), count, seed=args.seed)
        n_resamples = 200 if args.smoke else args.resamples
        part_a = replay_published(published, models_per_table=models_per_table)
        part_b = replay_assessments(folders, n_resamples=n_resamples, seed=args.seed)
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    result = {**origin, "source": published["source"], "smoke": args.smoke,
              "published": part_a, "assessments": {**part_b, "synthetic": synthetic},
              "goals": goals(part_a, part_b, synthetic),
              "wall_s": round(time.perf_counter() - started, 2)}
    print_report(result)
    # Cases that can be redrawn (the committed tables, seeded synthetic curves) are kept only
    # where the interval missed; real assessments' cases are kept whole.
    result["published"] = kept_cases(part_a, keep_all=False)
    result["assessments"] = {**kept_cases(part_b, keep_all=not synthetic),
                             "synthetic": synthetic}
    out = smoke.result_path(args.out, RESULT.name) if args.smoke else args.out or RESULT
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out} ({result['wall_s']} s)")
    return 0


# --- (a) the published loss tables ------------------------------------------------------------


def replay_published(published: dict, *, models_per_table: int | None = None) -> dict:
    """Every (dataset, model) curve fitted up to each cut in each window, the largest size's
    loss predicted by each method: the cases and their summary."""
    cases = []
    for dataset, table in published["tables"].items():
        sizes = np.asarray(table["n_examples"], dtype=float)
        for model, row in list(table["models"].items())[:models_per_table]:
            losses = np.asarray(row["loss"], dtype=float)
            trained = sizes > 0  # size 0 is the model before fine-tuning: no log2
            for cut_name, cut in CUTS.items():
                for window_name, window in WINDOWS.items():
                    cases.append(published_case(sizes[trained], losses[trained], cut, window, {
                        "dataset": dataset, "model": model, "cut": cut_name,
                        "window": window_name}))
    return {"what": "loss after fine-tuning; lower is better; the largest size predicted",
            "cases": cases,
            "summary": {f"{cut} {window}": summarise([c for c in cases if c["cut"] == cut
                                                      and c["window"] == window])
                        for cut in CUTS for window in WINDOWS}}


def published_case(sizes: np.ndarray, losses: np.ndarray, cut: int, window: int | None,
                   labels: dict) -> dict:
    """One curve, fitted on the sizes up to 1/cut of the largest (their last ``window``)."""
    largest, outcome = sizes[-1], float(losses[-1])
    keep = sizes <= largest / cut
    n, y = sizes[keep][-(window or 0):], losses[keep][-(window or 0):]
    fit = fit_curve(n, y, ceiling=None, floor=0.0, lower_is_better=True,
                    predict_at=[largest])
    intercept, slope = fit_log2(n, y)
    last = float(y[-1])
    predicted = {
        "curve": (fit["at"][0]["value"], fit["at"][0]["ci"]),
        "log-linear (old)": (max(intercept + slope * math.log2(largest), 0.0), None),
        "persistence": (last, None),
        "two-point": (max(last + fit["two_point"]["gain_per_doubling"]["value"]
                          * math.log2(largest / n[-1]), 0.0), None),
    }
    return {**labels, "n_points": int(len(n)), "fitted_up_to": int(n[-1]),
            "predicted_n": int(largest), "outcome": outcome, "last": last,
            "form": fit["form"]["name"], "flags": [flag["kind"] for flag in fit["flags"]],
            "methods": {name: method_entry(value, ci, outcome, last)
                        for name, (value, ci) in predicted.items()}}


def method_entry(value: float, ci: list | None, outcome: float, last: float, *,
                 gain_outcome: float | None = None) -> dict:
    """A prediction against the outcome: error, whether the interval held it, and the ratio of
    the predicted gain over ``last`` to the measured one (to ``gain_outcome``, default the
    outcome)."""
    true_gain = (outcome if gain_outcome is None else gain_outcome) - last
    return {"value": float(value), "ci": ci, "error": float(value - outcome),
            "gain_ratio": float((value - last) / true_gain) if true_gain else None,
            "covered": None if ci is None else bool(ci[0] <= outcome <= ci[1]),
            "relative_width": None if ci is None else float((ci[1] - ci[0]) / abs(outcome))
            if outcome else None}


def kept_cases(part: dict, *, keep_all: bool) -> dict:
    """``part`` for the result file: its cases whole (``keep_all``), else only those whose
    interval from the new fit missed the outcome, and the forms chosen per summary."""
    cases = part["cases"]
    forms = {}
    for case in cases:
        key = " ".join(case[k] for k in ("cut", "window") if k in case)
        forms.setdefault(key, {}).setdefault(case["form"], 0)
        forms[key][case["form"]] += 1
    if keep_all:
        return {**part, "forms": forms}
    missed = [case for case in cases if case["methods"]["curve"]["covered"] is False]
    return {**{k: v for k, v in part.items() if k != "cases"}, "forms": forms,
            "n_cases": len(cases), "missed_cases": missed}


def summarise(cases: list[dict], goal: dict | None = None) -> dict:
    """Per method: median |error|, gain ratio (median, share within ±25%), interval coverage;
    ``goal``: each case's |error| goal, for the share of cases whose error meets it."""
    summary = {"n_cases": len(cases)}
    for method in METHODS:
        entries = [case["methods"][method] for case in cases if method in case["methods"]]
        if not entries:
            continue
        errors = np.abs([e["error"] for e in entries])
        ratios = np.asarray([e["gain_ratio"] for e in entries if e["gain_ratio"] is not None])
        covered = [e["covered"] for e in entries if e["covered"] is not None]
        widths = [e["relative_width"] for e in entries if e["relative_width"] is not None]
        summary[method] = {
            "median_abs_error": float(np.median(errors)),
            "median_abs_relative_error": float(np.median(errors / np.abs(
                [case["outcome"] for case in cases]))),
            "gain_ratio_median": float(np.median(ratios)) if len(ratios) else None,
            "gain_within_25pct": float(np.mean(np.abs(ratios - 1) <= GAIN_BAND))
            if len(ratios) else None,
            "coverage": float(np.mean(covered)) if covered else None,
            "n_intervals": len(covered),
            "median_relative_width": float(np.median(widths)) if widths else None}
        if goal is not None:
            summary[method]["median_error_over_goal"] = float(np.median(
                errors / np.asarray([goal[case["scale"]] for case in cases])))
    return summary


# --- (b) assessments --------------------------------------------------------------------------


def read_curve_scores(folder: Path) -> dict:
    """``folder/curve-scores.json``, checked: fractions sorted by size, every seed scored on the
    same test examples; a SystemExit naming the file and field otherwise."""
    path = Path(folder) / CURVE_FILE
    if not path.is_file():
        raise SystemExit(f"{path}: no such file; --assess takes folders holding {CURVE_FILE} "
                         "(tunelab assess writes it beside assess.json)")
    curve = json.loads(path.read_text())
    for key in ("metric", "scale", "ceiling", "fractions"):
        if key not in curve:
            raise SystemExit(f"{path}: the field {key!r} is missing")
    fractions = sorted(curve["fractions"], key=lambda fraction: fraction["n_examples"])
    for fraction in fractions:
        for seed in fraction["seeds"]:
            if seed.get("scores") is None:
                raise SystemExit(f"{path}: fraction n_examples={fraction['n_examples']}, seed "
                                 f"{seed.get('seed')} has no per-example scores (the metric "
                                 "has none); this assessment cannot be resampled")
    lengths = {len(seed["scores"]) for fraction in fractions for seed in fraction["seeds"]}
    if len(fractions) < 3 or len(lengths) != 1 or any(not f["seeds"] for f in fractions):
        raise SystemExit(f"{path}: needs 3 or more fractions, each with seeds scored on the same "
                         f"test examples (found {len(fractions)} fractions, score lengths "
                         f"{sorted(lengths)})")
    return {**curve, "fractions": fractions, "path": str(path)}


def replay_assessments(folders: list[Path], *, n_resamples: int, seed: int) -> dict:
    """Every assessment's curve fitted up to each cut, each seed's full-data value the outcome."""
    cases = []
    for folder in folders:
        curve = read_curve_scores(folder)
        for cut_name, cut in CUTS.items():
            cases.extend(assessment_cases(curve, cut_name, cut, n_resamples=n_resamples,
                                          seed=seed))
    goal = {scale: ERROR_GOAL.get(scale, 0.025 * scale) for scale in {c["scale"] for c in cases}}
    summary = {}
    for cut in CUTS:
        at_cut = [c for c in cases if c["cut"] == cut]
        for metric in sorted({c["metric"] for c in at_cut}):
            summary[f"{cut} {metric}"] = summarise([c for c in at_cut if c["metric"] == metric],
                                                   goal)
        summary[f"{cut} all"] = summarise(at_cut, goal)
    summary["all"] = summarise(cases, goal)
    return {"folders": [str(folder) for folder in folders], "cases": cases, "summary": summary,
            "error_goal": {str(scale): value for scale, value in goal.items()},
            "gain_ratio_against": "the mean over the largest fraction's seeds (one seed's value "
                                  "carries its seed noise into the measured gain)"}


def assessment_cases(curve: dict, cut_name: str, cut: int, *, n_resamples: int,
                     seed: int) -> list[dict]:
    """The fractions up to 1/cut of the largest fitted with the hierarchical bootstrap; one
    case per seed of the largest fraction."""
    fractions, scale = curve["fractions"], float(curve["scale"])
    full = fractions[-1]
    fitted = [f for f in fractions if f["n_examples"] <= full["n_examples"] / cut]
    if len(fitted) < 2:
        return []
    values = [[s["value"] for s in f["seeds"]] for f in fitted]
    scores = [np.asarray([s["scores"] for s in f["seeds"]], dtype=float) for f in fitted]
    n = [f["n_examples"] for f in fitted]
    means = [float(np.mean(v)) for v in values]
    resampled = hierarchical_resamples(values, scores, scale=scale, n_resamples=n_resamples,
                                       seed=seed)
    fit = fit_curve(n, means, resampled=resampled, ceiling=float(curve["ceiling"]), floor=0.0,
                    test_se=[scale * float(np.std(s.mean(axis=0), ddof=1)) / math.sqrt(
                        s.shape[1]) for s in scores],
                    seed_sd=seed_spread(values), predict_at=[full["n_examples"]], seed=seed)
    old = old_line(n, means, resampled, math.log2(full["n_examples"]), float(curve["ceiling"]))
    step = math.log2(full["n_examples"] / n[-1])
    two = fit["two_point"]["gain_per_doubling"]
    two_value = min(means[-1] + two["value"] * step, float(curve["ceiling"]))
    full_mean = float(np.mean([s["value"] for s in full["seeds"]]))
    predicted = {"curve": (fit["at"][0]["value"], fit["at"][0]["ci"]), "log-linear (old)": old,
                 "persistence": (fit["persistence"]["value"], fit["persistence"]["ci"]),
                 "two-point": (two_value, None)}
    return [{"assessment": curve["path"], "metric": curve["metric"], "scale": scale,
             "cut": cut_name, "n_points": len(n), "fitted_up_to": int(n[-1]),
             "predicted_n": int(full["n_examples"]), "seed": s["seed"],
             "outcome": float(s["value"]), "last": means[-1], "form": fit["form"]["name"],
             "flags": [flag["kind"] for flag in fit["flags"]],
             "methods": {name: method_entry(value, ci, float(s["value"]), means[-1],
                                            gain_outcome=full_mean)
                         for name, (value, ci) in predicted.items()}}
            for s in full["seeds"]]


def seed_spread(values: list[list[float]]) -> float | None:
    """One run's spread over training seeds: the pooled within-fraction standard deviation."""
    squares, dof = 0.0, 0
    for seed_values in values:
        if len(seed_values) > 1:
            squares += float(np.var(seed_values, ddof=1)) * (len(seed_values) - 1)
            dof += len(seed_values) - 1
    return math.sqrt(squares / dof) if dof else None


def old_line(n: list, means: list, resampled: np.ndarray, x: float,
             ceiling: float) -> tuple[float, list]:
    """The old fit: the log2 line, its interval from refitting it to the resampled curves only
    (what assess.extrapolate does with one seed's test examples)."""
    intercept, slope = fit_log2(n, means)
    logs = np.log2(np.asarray(n, dtype=float))
    centred = logs - logs.mean()
    slopes = (resampled - resampled.mean(axis=1, keepdims=True)) @ centred / (centred @ centred)
    draws = np.minimum(resampled.mean(axis=1) + slopes * (x - logs.mean()), ceiling)
    low, high = np.quantile(draws, [0.025, 0.975])
    return min(intercept + slope * x, ceiling), [float(low), float(high)]


# --- synthetic assessments --------------------------------------------------------------------


def write_synthetic(folder: Path, count: int, *, seed: int) -> list[Path]:
    """``count`` assessment folders with a synthetic ``curve-scores.json`` each (half accuracy,
    half chrF-like), drawn from known saturating curves; their paths."""
    rng = np.random.default_rng(seed)
    folders = []
    for index in range(count):
        path = folder / f"synthetic-{index}"
        path.mkdir(parents=True)
        curve = synthetic_curve(rng, chrf=index % 2 == 1)
        (path / CURVE_FILE).write_text(json.dumps(curve))
        folders.append(path)
    return folders


def synthetic_curve(rng: np.random.Generator, *, chrf: bool, n_test: int = 300,
                    n_seeds: int = 3) -> dict:
    """One assessment's curve: 6 doublings from 100 examples, ``n_seeds`` seeds a fraction.

    The mean metric follows ``c − (c − m)·(n/100)^(−α)`` (m, c, α drawn); each test example a fixed
    difficulty (logit offset) shared by every run, each run a seed offset; accuracy scores are
    0/1 draws, chrF-like scores continuous in 0..1 (value: 100 × their mean).
    """
    start, asymptote, alpha = rng.uniform(0.3, 0.55), rng.uniform(0.8, 0.97), rng.uniform(0.15, 0.5)
    difficulty = rng.normal(0.0, 1.5, n_test)
    fractions = []
    for n in 100 * 2 ** np.arange(6):
        mean = asymptote - (asymptote - start) * (n / 100) ** -alpha
        seeds = []
        for seed in range(n_seeds):
            logit = np.log(mean / (1 - mean)) + difficulty + rng.normal(0.0, 0.08)
            chance = 1 / (1 + np.exp(-logit))
            scores = (np.clip(chance + rng.normal(0.0, 0.1, n_test), 0.0, 1.0) if chrf
                      else (rng.random(n_test) < chance).astype(float))
            value = (100.0 if chrf else 1.0) * float(scores.mean())
            seeds.append({"seed": seed, "value": value,
                          "scores": [round(float(v), 4) for v in scores]})
        fractions.append({"n_examples": int(n), "seeds": seeds})
    return {"metric": "chrf" if chrf else "accuracy", "scale": 100.0 if chrf else 1.0,
            "ceiling": 100.0 if chrf else 1.0, "fractions": fractions,
            "synthetic": {"mean_at_100": start, "asymptote": asymptote, "alpha": alpha}}


# --- goals and the report ---------------------------------------------------------------------


def goals(part_a: dict, part_b: dict, synthetic: bool) -> list[dict]:
    """The issue's goals for the new fit, each met or missed and by how much."""
    rows = []
    where = "synthetic assessments" if synthetic else "assessments"
    quarter, everything = part_b["summary"].get("1/4 all", {}), part_b["summary"]["all"]
    if "curve" in quarter:
        ratio = quarter["curve"]["median_error_over_goal"]
        rows.append(goal_row(f"{where}: median |error| from 1/4 of the data ≤ goal "
                             f"({part_b['error_goal']})", ratio, 1.0, higher_is_better=False,
                             unit="× the goal"))
    if "curve" in everything:
        curve = everything["curve"]
        rows.append(goal_row(f"{where}: 95% intervals holding the outcome (≥ {MIN_CASES} "
                             f"cases; {curve['n_intervals']} here)", curve["coverage"],
                             COVERAGE_GOAL, enough=curve["n_intervals"] >= MIN_CASES))
        rows.append(goal_row(f"{where}: predicted gain within ±25% of the measured, share",
                             curve["gain_within_25pct"], 0.5))
    for key, summary in part_a["summary"].items():
        if summary["n_cases"] and summary["curve"]["coverage"] is not None:
            rows.append(goal_row(f"published loss curves, cut {key}: 95% intervals holding the "
                                 f"outcome ({summary['curve']['n_intervals']} cases)",
                                 summary["curve"]["coverage"], COVERAGE_GOAL,
                                 enough=summary["curve"]["n_intervals"] >= MIN_CASES))
    return rows


def goal_row(what: str, value: float | None, goal: float, *, higher_is_better: bool = True,
             enough: bool = True, unit: str = "") -> dict:
    if value is None:
        return {"goal": what, "value": None, "target": goal, "met": False, "by": None,
                "note": "no cases"}
    met = (value >= goal if higher_is_better else value <= goal) and enough
    return {"goal": what, "value": value, "target": goal, "met": met, "by": value - goal,
            "note": None if enough else f"fewer than {MIN_CASES} cases", "unit": unit}


def print_report(result: dict) -> None:
    """The summaries side by side, then the goals."""
    for title, part in (("(a) published loss curves (Lin et al. 2024)", result["published"]),
                        ("(b) " + ("synthetic " if result["assessments"]["synthetic"] else "")
                         + "assessments", result["assessments"])):
        print(f"\n{title}")
        print(f"{'cut window':<12} {'method':<18} {'cases':>5} {'med|err|':>9} {'÷goal':>6} "
              f"{'rel':>7} {'gain ratio':>10} {'±25%':>6} {'95% holds':>9} {'width':>7}")
        for key, summary in part["summary"].items():
            for method in METHODS:
                row = summary.get(method)
                if not row:
                    continue
                pooled = key.endswith("all") and "all" in part["summary"]  # units mixed
                print(f"{key:<12} {method:<18} {summary['n_cases']:>5} "
                      f"{'—' if pooled else format(row['median_abs_error'], '.4f'):>9} "
                      f"{_num(row.get('median_error_over_goal')):>6} "
                      f"{row['median_abs_relative_error']:>7.2%} "
                      f"{_num(row['gain_ratio_median']):>10} {_pct(row['gain_within_25pct']):>6} "
                      f"{_pct(row['coverage']):>9} {_pct(row['median_relative_width']):>7}")
    print("\ngoals")
    for row in result["goals"]:
        state = "MET " if row["met"] else "MISS"
        unit = f" {row['unit']}" if row.get("unit") else ""
        by = "" if row["by"] is None else f" (by {row['by']:+.3f}{unit})"
        print(f"  {state} {row['goal']}: {_num(row['value'])} against {row['target']:g}{by}"
              + (f" — {row['note']}" if row["note"] else ""))
    sys.stdout.flush()


def _num(value: float | None) -> str:
    return "—" if value is None else f"{value:.3g}"


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{value:.0%}"


if __name__ == "__main__":
    sys.exit(main())
