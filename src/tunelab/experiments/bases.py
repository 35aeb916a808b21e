"""Which base model to tune: one assessment per base (``assess --base A --base B``), side by side,
and the cheapest base that meets the target.

A base "meets" the target when the lower end of its tuned metric's interval (all training data)
is at or above ``target``; without a target, when its assessment's verdict is for fine-tuning.
Among those that meet it, the cheapest wins: the full-data run's training time, then the tuned
model's time per request. Two bases whose intervals overlap cannot be told apart on the metric,
and the summary says so instead of calling one better.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from rich.console import Console

from tunelab.errors import RunError
from tunelab.experiments.verdict import GOES, VERDICTS


def compare_bases(results: list[dict], *, bases: list[str],
                  target: float | None = None) -> dict:
    """One row per base from its assessment (``results[i]``, what ``assess.json`` holds, for
    ``bases[i]``, the model path as given), the chosen base (``choice``, None when no base
    meets the rule), ``why`` in one sentence and ``text``, a paragraph naming the choice."""
    if len(results) != len(bases) or not results:
        raise ValueError(f"{len(results)} assessments for {len(bases)} bases")
    metrics = {result["primary_metric"] for result in results}
    if len(metrics) > 1:
        raise RunError(f"the assessments measure different metrics ({sorted(metrics)}); bases "
                       "are compared on one", where="assess --base",
                       fix="assess every base with the same config (eval.task)")
    metric = results[0]["primary_metric"]
    rows = [_row(result, base, target) for result, base in zip(results, bases, strict=True)]
    meeting = sorted((row for row in rows if row["meets"]), key=_cost_key)
    chosen = meeting[0] if meeting else None
    why = (_why_chosen(chosen, rows, metric, target) if chosen
           else _why_none(rows, metric, target))
    summary = {
        "metric": metric, "target": target, "rule": _rule(target, metric),
        "rows": rows, "choice": chosen["base"] if chosen else None, "why": why,
        "not_told_apart": _overlapping_pairs(rows),
    }
    summary["text"] = _paragraph(summary, chosen)
    return summary


def _row(result: dict, base: str, target: float | None) -> dict:
    """The numbers that decide between bases, from one assessment."""
    tuned = result["learning_curve"][-1]
    strongest = result["baselines"]["strongest_on_test"]
    arm = next(arm for arm in result["baselines"]["arms"] if arm["name"] == strongest)
    runs = result["cost"]["runs"]
    full = [run for run in runs if run["n_examples"] == tuned["n_examples"]]
    at_use = result["cost"].get("at_use") or {}
    tuned_use = at_use.get("tuned") or {}
    row = {
        "base": base, "name": result["name"], "n_test": result["n_test"],
        "tuned": {"value": tuned["value"], "ci": tuned.get("ci"),
                  "n_examples": tuned["n_examples"]},
        "strongest_arm": {"name": strongest, "value": arm["test"]["value"],
                          "ci": arm["test"].get("ci"),
                          "prompt_tokens_per_request": arm.get("prompt_tokens_per_request")},
        "tuned_minus_strongest": result["tuned_vs_arms"][strongest],
        "verdict": result["verdict"]["kind"],
        "training_s": _mean([run.get("measured_wall_s") or run.get("train_s") for run in full]),
        "assessment_wall_s": _assessment_wall_s(result.get("time") or {}),
        "peak_bytes": max((run["measured_peak_bytes"] for run in full
                           if run.get("measured_peak_bytes")), default=None),
        "s_per_request": tuned_use.get("s_per_request"),
        "prompt_tokens_per_request": tuned_use.get("prompt_tokens_per_request"),
    }
    row["meets"] = _meets(row, target)
    return row


def _meets(row: dict, target: float | None) -> bool:
    if target is None:
        return row["verdict"] in GOES
    ci = row["tuned"]["ci"]
    return bool(ci) and ci[0] is not None and ci[0] >= target


def _assessment_wall_s(time_info: dict) -> float | None:
    """The whole assessment's wall time: a resumed call's ``this_call_s`` counts only what it
    redid, the phases (kept across calls) count all of it; the larger of the two."""
    phases = sum((time_info.get("phases_s") or {}).values())
    this_call = time_info.get("this_call_s")
    if this_call is None and not phases:
        return None
    return max(this_call or 0.0, phases)


def _mean(values: list[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return sum(known) / len(known) if known else None


def _cost_key(row: dict) -> tuple[float, float]:
    """Cheapest first: training time of the full-data run, then seconds per request; unknown
    costs last (an unmeasured cost is not a low one)."""
    def known(value: float | None) -> float:
        return math.inf if value is None else value
    return known(row["training_s"]), known(row["s_per_request"])


def _rule(target: float | None, metric: str) -> str:
    if target is None:
        return ("meets the rule: its assessment's verdict is 'fine-tune' or 'fine-tune and "
                "collect more data'")
    return (f"meets the target: the lower end of the tuned {metric}'s 95% interval is at or "
            f"above {target:g}")


# --- the sentences ----------------------------------------------------------------------------


def overlap(first: dict, second: dict) -> bool:
    """Whether two tuned metrics cannot be told apart: their intervals overlap (a metric with
    no interval cannot be told apart from any)."""
    a, b = first["tuned"]["ci"], second["tuned"]["ci"]
    if not a or not b or None in (*a, *b):
        return True
    return a[0] <= b[1] and b[0] <= a[1]


def _overlapping_pairs(rows: list[dict]) -> list[list[str]]:
    return [[a["base"], b["base"]] for i, a in enumerate(rows) for b in rows[i + 1:]
            if overlap(a, b)]


def _why_chosen(chosen: dict, rows: list[dict], metric: str, target: float | None) -> str:
    """Why ``chosen``: it meets the rule and costs least; how it stands against the others."""
    meeting = [row for row in rows if row["meets"]]
    what = f"the target {target:g}" if target is not None else "the rule (a verdict to tune)"
    if len(meeting) == 1:
        first = f"{chosen['base']} meets {what}, the only base that does ({_cost_text(chosen)})"
    else:
        costlier = ", ".join(f"{row['base']}'s {_cost_text(row)}" for row in meeting
                             if row is not chosen)
        first = (f"{chosen['base']} meets {what} and is the cheapest of the {len(meeting)} "
                 f"bases that do ({_cost_text(chosen)} against {costlier})")
    parts = [first]
    others = [row for row in rows if row is not chosen]
    tied = [row for row in others if overlap(chosen, row)]
    if tied:
        parts.append(f"on {metric} its {_metric_text(chosen)} cannot be told apart from "
                     + _and(f"{row['base']}'s {_metric_text(row)}" for row in tied)
                     + " (the intervals overlap), so the choice rests on cost, not on the "
                     "metric")
    for row in others:
        if any(row is other for other in tied):
            continue
        if row["tuned"]["value"] > chosen["tuned"]["value"]:
            parts.append(f"{row['base']} is better on {metric} ({_metric_text(row)}, the "
                         "intervals do not overlap) but "
                         + ("costs more" if row["meets"] else _fails_text(row, target)))
        else:
            parts.append(f"it is better on {metric} than {row['base']} ({_metric_text(row)}, "
                         "the intervals do not overlap)")
    return "; ".join(parts) + "."


def _why_none(rows: list[dict], metric: str, target: float | None) -> str:
    """Why no base is chosen, and which came closest."""
    if target is not None:
        closest = max(rows, key=lambda row: _low(row))
        low = _low(closest)
        shortfall = (f"its lower end is {target - low:.3g} short of the target"
                     if math.isfinite(low) else "it has no interval")
        sentence = (f"No base meets the target {target:g} (the lower end of the tuned "
                    f"{metric}'s 95% interval at or above it): the closest is "
                    f"{closest['base']} at {_metric_text(closest)}; {shortfall}")
    else:
        order = {kind: rank for rank, kind in enumerate(VERDICTS)}
        closest = min(rows, key=lambda row: (order.get(row["verdict"], len(VERDICTS)),
                                             -row["tuned_minus_strongest"]["value"]))
        sentence = ("No base's assessment says to fine-tune (" + "; ".join(
            f"{row['base']}: {row['verdict']}" for row in rows) + f"): the closest is "
            f"{closest['base']}, tuned − {closest['strongest_arm']['name']} = "
            f"{_delta_text(closest)}")
    tied = [row for row in rows if row is not closest and overlap(closest, row)]
    if tied:
        sentence += (f"; on {metric} its {_metric_text(closest)} cannot be told apart from "
                     + _and(f"{row['base']}'s {_metric_text(row)}" for row in tied)
                     + " (the intervals overlap)")
    return sentence + "."


def _and(items: Iterable[str]) -> str:
    items = list(items)
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _low(row: dict) -> float:
    ci = row["tuned"]["ci"]
    return ci[0] if ci and ci[0] is not None else -math.inf


def _fails_text(row: dict, target: float | None) -> str:
    if target is not None:
        return f"its interval's lower end is below {target:g}"
    return f"its verdict is '{row['verdict']}'"


def _paragraph(summary: dict, chosen: dict | None) -> str:
    """One paragraph: the choice and its numbers, then why."""
    metric = summary["metric"]
    if chosen is None:
        measured = "; ".join(f"{row['base']}: {metric} {_metric_text(row)}, {row['verdict']}"
                             for row in summary["rows"])
        return f"No base to tune yet. {summary['why']} Measured: {measured}."
    return (f"Tune {chosen['base']}: {metric} {_metric_text(chosen)} with all "
            f"{chosen['tuned']['n_examples']} training examples, on {chosen['n_test']} test "
            f"examples; tuned − {chosen['strongest_arm']['name']} (its strongest prompting arm) "
            f"= {_delta_text(chosen)}; verdict: {chosen['verdict']}. The full-data run trained "
            f"in {_seconds(chosen['training_s'])} (the whole assessment took "
            f"{_seconds(chosen['assessment_wall_s'])}), peak memory {_gib(chosen['peak_bytes'])}"
            f"; the tuned model answers in {_per_request(chosen['s_per_request'])} per request "
            f"with {_number(chosen['prompt_tokens_per_request'])} prompt tokens. Why: "
            f"{summary['why']}")


def _metric_text(row: dict) -> str:
    return f"{_number(row['tuned']['value'])} {_ci(row['tuned']['ci'])}"


def _delta_text(row: dict) -> str:
    delta = row["tuned_minus_strongest"]
    return f"{_number(delta['value'], signed=True)} {_ci(delta.get('ci'), signed=True)}"


def _cost_text(row: dict) -> str:
    return (f"{_seconds(row['training_s'])} to train, {_per_request(row['s_per_request'])} per "
            "request")


# --- formatting -------------------------------------------------------------------------------


def _number(value: Any, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:+.3g}" if signed else f"{value:.3g}"


def _ci(ci: list | None, signed: bool = False) -> str:
    if not ci:
        return "(no interval)"
    return "[" + ", ".join("∞" if v is None else _number(v, signed) for v in ci) + "]"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _per_request(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g} s"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


# --- output -----------------------------------------------------------------------------------

COLUMNS = ("base", "tuned", "95% interval", "strongest arm", "tuned − arm", "verdict", "meets",
           "training", "assessment", "peak memory", "s / request", "prompt tokens")


def _cells(row: dict, chosen: str | None) -> list[str]:
    """One row's cells as text, in ``COLUMNS`` order."""
    delta = row["tuned_minus_strongest"]
    return [row["base"] + (" (chosen)" if row["base"] == chosen else ""),
            _number(row["tuned"]["value"]), _ci(row["tuned"]["ci"]),
            f"{row['strongest_arm']['name']} {_number(row['strongest_arm']['value'])}",
            f"{_number(delta['value'], signed=True)} {_ci(delta.get('ci'), signed=True)}",
            row["verdict"], "yes" if row["meets"] else "no", _seconds(row["training_s"]),
            _seconds(row["assessment_wall_s"]), _gib(row["peak_bytes"]),
            _per_request(row["s_per_request"]), _number(row["prompt_tokens_per_request"])]


def write_bases_report(summary: dict, folder: Path) -> tuple[Path, Path]:
    """Write ``bases.json`` and the self-contained ``bases.html`` under ``folder``, each
    atomically (a temporary file, then replaced); returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = _write_atomic(folder / "bases.json", json.dumps(summary, indent=2) + "\n")
    html_path = _write_atomic(folder / "bases.html", render_bases_html(summary))
    return json_path, html_path


def _write_atomic(path: Path, text: str) -> Path:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    temporary.replace(path)
    return path


def render_bases_html(summary: dict) -> str:
    """The comparison as one HTML page: the choice, the paragraph, the table of bases."""
    from tunelab.report.html import CSS

    chosen = summary["choice"]
    head = "".join(f"<th>{escape(column)}</th>" for column in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>"
                                    for cell in _cells(row, chosen)) + "</tr>"
                   for row in summary["rows"])
    verdict = (f'<span class="badge good">tune {escape(chosen)}</span>' if chosen
               else '<span class="badge bad">no base meets the rule</span>')
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            "<title>Which base to tune · tunelab assess</title>"
            f"<style>{CSS}</style></head><body><main>"
            f'<header><div class="title"><h1>Which base to tune</h1>{verdict}</div>'
            f'<p class="muted">{escape(summary["metric"])}; a base '
            f'{escape(summary["rule"])}; cheapest by the full-data run\'s training time, then '
            "time per request; intervals are 95% bootstrap</p>"
            f"<p>{escape(summary['text'])}</p></header>"
            f"<section><h2>Bases</h2><table><thead><tr>{head}</tr></thead><tbody>{body}"
            "</tbody></table></section>"
            f"<footer>Written by tunelab assess on {datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
            " UTC.</footer></main></body></html>\n")


def render_bases(summary: dict, console: Console) -> None:
    """The table of bases and the paragraph on screen."""
    from rich.table import Table

    target = summary["target"]
    table = Table(title=f"Which base to tune: {summary['metric']}"
                  + (f", target {target:g}" if target is not None else ""))
    for column in COLUMNS:
        table.add_column(column, overflow="fold")
    for row in summary["rows"]:
        table.add_row(*_cells(row, summary["choice"]))
    console.print(table)
    console.print(summary["text"], markup=False, highlight=False)
