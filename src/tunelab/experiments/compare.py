"""``tunelab compare``: runs and sweeps side by side, on screen and as one HTML page.

Runs are ranked by the objective (the sweep's, or the primary metric of each run's validation
evaluation) with their 95% intervals; the best run's config is diffed against the base; a Pareto
chart puts the metric against what it cost (wall time, tokens trained, peak memory, from each
run's manifest and metrics); for sweeps, Optuna's fANOVA says which hyperparameters mattered.
"""

from __future__ import annotations

import base64
import io
import json
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure
from rich.console import Console
from rich.table import Table

from tunelab.errors import RunError
from tunelab.experiments.sweep import RECORD_FILE, describe, load_study, open_sweep
from tunelab.run.directory import RunDir
from tunelab.run.metrics import read_metrics

COSTS = (("wall_s", "wall time (s)"), ("tokens", "tokens trained"),
         ("peak_memory_bytes", "peak memory (GB)"))


def compare_runs(paths: list[Path]) -> dict[str, Any]:
    """Gather every run of the given run and sweep directories, ranked by the objective."""
    runs, sweeps = [], []
    for path in paths:
        path = Path(path)
        if (path / RECORD_FILE).is_file():
            sweep, trial_runs = _sweep_runs(path)
            sweeps.append(sweep)
            runs += trial_runs
        elif RunDir(path).is_run():
            runs.append(_run(RunDir(path), metric=None, source="run"))
        else:
            raise RunError(f"{path} is neither a run nor a sweep directory", where=str(path),
                           fix="pass folders made by tunelab train or tunelab sweep")
    if not runs:
        raise RunError("nothing to compare: no finished run", where=" ".join(map(str, paths)),
                       fix="pass run directories with a manifest, or a sweep with finished "
                       "trials")
    metric = sweeps[0]["metric"] if sweeps else runs[0]["metric"]
    direction = sweeps[0]["direction"] if sweeps else (
        "minimize" if metric == "val_loss" else "maximize")
    for run in runs:
        if run["metric"] != metric:  # a run judged by another metric cannot be ranked with these
            run["value"], run["ci"] = None, None
    sign = -1.0 if direction == "maximize" else 1.0
    runs.sort(key=lambda run: (run["value"] is None, sign * (run["value"] or 0.0)))
    base = _base_config(sweeps, runs, paths)
    best = runs[0] if runs[0]["value"] is not None else None
    return {"metric": metric, "direction": direction, "runs": runs, "sweeps": sweeps,
            "best": best["name"] if best else None,
            "diff": _config_diff(base, best["config"]) if best and base else [],
            "paths": [str(path) for path in paths]}


def _sweep_runs(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    opened = open_sweep(directory)
    study = load_study(opened)
    summary = describe(study, opened)
    runs = []
    for trial in summary["trials"]:
        run_dir = trial["run_dir"] and RunDir(trial["run_dir"])
        if trial["state"] == "complete" and run_dir and run_dir.is_run():
            run = _run(run_dir, metric=opened.sweep.metric, source=directory.name)
            run.update(value=trial["value"], ci=trial["ci"], params=trial["params"])
            runs.append(run)
    final_path = directory / "final.json"
    summary.update(directory=str(directory), importance=_importance(study),
                   base_config=opened.sweep.base.model_dump(mode="json"),
                   final=json.loads(final_path.read_text()) if final_path.is_file() else None,
                   states={state: sum(t["state"] == state for t in summary["trials"])
                           for state in ("complete", "pruned", "fail", "running", "waiting")})
    return summary, runs


def _run(run: RunDir, *, metric: str | None, source: str) -> dict[str, Any]:
    """One run: its objective (validation evaluation, else loss), cost and config."""
    manifest = run.read_manifest()
    config = run.read_config(need_data=False).model_dump(mode="json")
    value, ci, found = None, None, metric
    for split in ("validation", "test"):
        result = run.read_eval(split) if metric != "val_loss" else None
        if result is not None:
            found = metric or result.primary_metric
            tuned = result.models.get("tuned")
            entry = tuned.metrics.get(found) if tuned else None
            if entry:
                value, ci = entry.value, entry.ci
                break
    if value is None and (found in (None, "val_loss")):
        found, value = "val_loss", manifest.val_loss_after if manifest else None
    tokens = sum(record.get("tokens", 0) for record in read_metrics(run))
    return {"name": run.name, "source": source, "run_dir": str(run), "metric": found,
            "value": value, "ci": ci, "params": {}, "config": config,
            "cost": {"wall_s": manifest.wall_s if manifest else None, "tokens": tokens or None,
                     "peak_memory_bytes": manifest.measured_peak_rss_bytes if manifest
                     else None}}


def _importance(study) -> dict[str, Any]:
    """fANOVA importance of each searched key for the objective (needs ≥ 3 finished trials)."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 3:
        return {"note": f"{len(complete)} finished trials: too few to say what mattered"}
    try:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=0)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
    except ImportError:
        return {"note": "no importance: Optuna's fANOVA needs scikit-learn (pip install "
                        '"tunelab[sweep]")'}
    except (RuntimeError, ValueError) as error:
        return {"note": f"no importance: {error}"}
    return {"fanova": {key: float(value) for key, value in values.items()}}


def _base_config(sweeps: list[dict], runs: list[dict], paths: list[Path]) -> dict | None:
    """What the best is compared with: a sweep's base config, else the first run given."""
    if sweeps:
        return sweeps[0]["base_config"]
    first = Path(paths[0]).name
    return next((run["config"] for run in runs if run["name"] == first), None)


def _config_diff(base: dict[str, Any], best: dict[str, Any]) -> list[dict[str, Any]]:
    ignore = {"name", "output_dir"}
    flat_base, flat_best = _flat(base), _flat(best)
    keys = sorted((set(flat_base) | set(flat_best)) - ignore)
    return [{"key": key, "base": flat_base.get(key), "best": flat_best.get(key)}
            for key in keys if flat_base.get(key) != flat_best.get(key)]


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in (tree or {}).items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def pareto_front(points: list[tuple[float, float]], maximize: bool) -> list[int]:
    """Indices of the points no other point beats on both cost (lower) and metric."""
    better = (lambda a, b: a >= b) if maximize else (lambda a, b: a <= b)
    front = []
    for i, (cost, value) in enumerate(points):
        dominated = any(other_cost <= cost and better(other_value, value)
                        and (other_cost, other_value) != (cost, value)
                        for other_cost, other_value in points)
        if not dominated:
            front.append(i)
    return front


def render_comparison(comparison: dict[str, Any], console: Console) -> None:
    """The ranking, the config diff and the importance as tables on screen."""
    metric = comparison["metric"]
    table = Table(title=f"Runs ranked by {metric} ({comparison['direction']})")
    for column in ("#", "run", metric, "95% interval", "wall s", "tokens", "params"):
        table.add_column(column, overflow="fold")
    for rank, run in enumerate(comparison["runs"], start=1):
        table.add_row(str(rank), f"{run['source']}/{run['name']}", _number(run["value"]),
                      _interval(run["ci"]), _seconds(run["cost"]["wall_s"]),
                      _number(run["cost"]["tokens"]),
                      _params(run["params"]))
    console.print(table)
    if comparison["diff"]:
        diff = Table(title=f"Config of the best ({comparison['best']}) against the base")
        for column in ("key", "base", "best"):
            diff.add_column(column, overflow="fold")
        for row in comparison["diff"]:
            diff.add_row(row["key"], _short(row["base"]), _short(row["best"]))
        console.print(diff)
    for sweep in comparison["sweeps"]:
        importance = sweep["importance"]
        states = ", ".join(f"{count} {state}" for state, count in sweep["states"].items() if count)
        console.print(f"Sweep {sweep['name']}: {states}")
        if "fanova" in importance:
            console.print("  importance (fANOVA): " + ", ".join(
                f"{key} {value:.2f}" for key, value in importance["fanova"].items()))
        else:
            console.print(f"  {importance['note']}")


def write_comparison(comparison: dict[str, Any], output: Path | None = None) -> Path:
    """The comparison as one self-contained HTML page; returns its path."""
    if output is None:
        sweeps = comparison["sweeps"]
        output = Path(sweeps[0]["directory"]) / "compare.html" if len(sweeps) == 1 and len(
            comparison["paths"]) == 1 else Path("compare.html")
    output.write_text(render_html(comparison), encoding="utf-8")
    return output


def render_html(comparison: dict[str, Any]) -> str:
    from tunelab.report.html import CSS

    metric = comparison["metric"]
    rows = [[str(rank), escape(f"{run['source']}/{run['name']}"), _number(run["value"]),
             _interval(run["ci"]), _seconds(run["cost"]["wall_s"]),
             _number(run["cost"]["tokens"]), _gigabytes(run["cost"]["peak_memory_bytes"]),
             escape(_params(run["params"]))]
            for rank, run in enumerate(comparison["runs"], start=1)]
    sections = [_section(f"Runs ranked by {metric}", _table(
        ["#", "run", metric, "95% interval", "wall s", "tokens", "peak GB", "params"], rows))]
    if comparison["diff"]:
        diff_rows = [[f"<code>{escape(row['key'])}</code>", escape(_short(row["base"])),
                      escape(_short(row["best"]))] for row in comparison["diff"]]
        sections.append(_section(f"Best ({escape(str(comparison['best']))}) against the base",
                                 _table(["key", "base", "best"], diff_rows)))
    sections.append(_section(f"{metric} against cost", _image(_pareto_figure(comparison))))
    for sweep in comparison["sweeps"]:
        sections.append(_section(f"Sweep {sweep['name']}", _sweep_html(sweep, metric)))
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f"<title>tunelab comparison</title><style>{CSS}</style></head><body><main>"
            f"<header><h1>Comparison of {len(comparison['runs'])} runs</h1></header>"
            f"{''.join(sections)}<footer>Written by tunelab on "
            f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from "
            f"{escape(', '.join(comparison['paths']))}.</footer></main></body></html>\n")


def _sweep_html(sweep: dict[str, Any], metric: str) -> str:
    states = ", ".join(f"{count} {state}" for state, count in sweep["states"].items() if count)
    parts = [f"<p>Trials: {escape(states)}.</p>"]
    importance = sweep["importance"]
    if "fanova" in importance:
        parts.append(_image(_importance_figure(importance["fanova"])))
    else:
        parts.append(f"<p>{escape(importance['note'])}</p>")
    pruned = [trial for trial in sweep["trials"] if trial["state"] == "pruned"]
    if pruned:
        parts.append("<p>Pruned on the validation loss: " + ", ".join(
            f"trial {trial['number']} at step {trial['last_step']}" for trial in pruned)
            + ".</p>")
    final = sweep.get("final")
    if final and final.get("test"):
        test, delta = final["test"], final["test"]["best_minus_base_config"]
        parts.append(
            f"<p>The final word, on the test split (n={test['n']}): best trial "
            f"{final['best']['trial']} {_number(test['best']['value'])} "
            f"{_interval(test['best']['ci'])}, base config "
            f"{_number(test['base_config']['value'])} {_interval(test['base_config']['ci'])}; "
            f"best − base {delta['delta']:+.3f} {_interval(delta['ci'])}, "
            f"p = {delta['p_value']:.3g}.</p>")
    return "".join(parts)


def _pareto_figure(comparison: dict[str, Any]) -> Figure:
    from tunelab.report.html import BASE_COLOUR, PLOT_STYLE, TUNED_COLOUR

    maximize = comparison["direction"] == "maximize"
    with rc_context(PLOT_STYLE):
        figure = Figure(figsize=(9.2, 2.8))
        for index, (key, label) in enumerate(COSTS):
            axes = figure.add_subplot(1, len(COSTS), index + 1)
            runs = [run for run in comparison["runs"]
                    if run["value"] is not None and run["cost"][key] is not None]
            scale = 1e-9 if key == "peak_memory_bytes" else 1.0
            points = [(run["cost"][key] * scale, run["value"]) for run in runs]
            front = set(pareto_front(points, maximize))
            for i, (cost, value) in enumerate(points):
                axes.scatter([cost], [value], s=22, zorder=3,
                             color=TUNED_COLOUR if i in front else BASE_COLOUR)
            ordered = sorted(points[i] for i in front)
            if ordered:
                axes.plot(*zip(*ordered, strict=True), color=TUNED_COLOUR, linewidth=1)
            axes.ticklabel_format(axis="x", style="plain", useOffset=False)  # GB, not 1e9+…
            axes.set_xlabel(label)
            axes.set_ylabel(comparison["metric"] if index == 0 else "")
        figure.suptitle("Pareto front (blue): no other run is both cheaper and better",
                        fontsize=9)
        figure.tight_layout()
    return figure


def _importance_figure(importance: dict[str, float]) -> Figure:
    from tunelab.report.html import PLOT_STYLE, TUNED_COLOUR

    with rc_context(PLOT_STYLE):
        figure = Figure(figsize=(6.0, 0.5 + 0.35 * len(importance)))
        axes = figure.add_subplot(1, 1, 1)
        keys = list(importance)[::-1]
        axes.barh(keys, [importance[key] for key in keys], color=TUNED_COLOUR)
        axes.set_xlabel("share of the objective's variance (fANOVA)")
        figure.tight_layout()
    return figure


def _image(figure: Figure) -> str:
    from tunelab.report.html import DPI

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img class="plot" src="data:image/png;base64,{data}" alt="plot">'


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _number(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and abs(value) < 100:
        return f"{value:.4f}"
    return f"{value:,.0f}" if isinstance(value, (int, float)) else str(value)


def _interval(ci: Any) -> str:
    if not ci or ci[0] is None:
        return ""
    return f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _seconds(value: Any) -> str:
    return "–" if value is None else f"{value:,.1f}"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{key}={value:.3g}" if isinstance(value, float) else f"{key}={_short(value)}"
                     for key, value in params.items())


def _gigabytes(value: Any) -> str:
    return "–" if value is None else f"{value / 1e9:.2f}"


def _short(value: Any, limit: int = 60) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"
