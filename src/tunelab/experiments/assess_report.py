"""The assessment as one self-contained HTML page: verdict, learning curve, baselines, cost.

Same look as a run's report (``report/html.py``: its CSS and plot style); the learning curve
shows each run's metric with its interval, the fitted line with its bootstrap band and the
extrapolation to 4x the data, and each prompting baseline as a horizontal band.
"""

from __future__ import annotations

import base64
import io
import math
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

from matplotlib import rc_context
from matplotlib.figure import Figure

from tunelab.report.html import CSS, DPI, PLOT_STYLE, TUNED_COLOUR, WIDE_IN

BASELINE_COLOURS = ("#6b7280", "#d97706", "#059669", "#7c3aed")
EXTRA_CSS = """
.verdict { font-size: 22px; font-weight: 650; margin: 4px 0 6px; }
.verdict.go { color: var(--good); } .verdict.stop { color: var(--bad); }
.verdict.wait { color: #b45309; }
"""
TONE = {"fine-tune and collect more data": "go", "fine-tune": "go", "undecided": "wait",
        "not worth it yet": "stop", "prompting is enough": "stop"}


def write_assess_report(result: dict, path: Path) -> Path:
    """Write the page for ``result`` (what ``assess.json`` holds) atomically; returns its path."""
    with rc_context(PLOT_STYLE):
        page = render_assess_report(result)
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(page, encoding="utf-8")
    temporary.replace(path)
    return path


def render_assess_report(result: dict) -> str:
    """The whole HTML page."""
    metric = escape(result["primary_metric"])
    verdict = result["verdict"]
    sections = [
        _section("Learning curve", f'<img class="plot" alt="learning curve" '
                 f'src="{_curve_png(result)}">' + _curve_table(result)),
        _section("Prompting arms", _baselines_table(result)),
        _section("Training seeds", _seeds_table(result)),
        _section("Outside the task (forgetting)", _forgetting_table(result)),
        _section("Cost", _cost_tables(result["cost"])),
        _section("Task complexity", _complexity_table(result["complexity"])),
        _section("Where the time went", _time_table(result.get("time", {}))),
    ]
    header = (f'<header><h1>Should we fine-tune {escape(result["name"])}?</h1>'
              f'<p class="muted">{escape(result["task"])}, {metric} on {result["n_test"]} test '
              f"examples; intervals are 95% bootstrap ({escape(result['interval_method'])})</p>"
              f'<div class="verdict {TONE.get(verdict["kind"], "wait")}">'
              f'{escape(verdict["kind"].capitalize())}</div><p>{escape(verdict["text"])}</p>'
              "</header>")
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{escape(result['name'])} · tunelab assess</title>"
            f"<style>{CSS}{EXTRA_CSS}</style></head><body><main>{header}{''.join(sections)}"
            f"<footer>Written by tunelab assess on {datetime.now(timezone.utc):%Y-%m-%d %H:%M}"
            " UTC.</footer></main></body></html>\n")


def _section(title: str, body: str) -> str:
    return f"<section><h2>{escape(title)}</h2>{body}</section>"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(cell)}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(str(cell))}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _num(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, str):
        return value
    return f"{value:.{digits}g}" if isinstance(value, float) else f"{value:,}"


def _ci(ci: list | None) -> str:
    if not ci:
        return "n/a"
    return "[" + ", ".join("∞" if v is None else _num(float(v)) for v in ci) + "]"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.0f} s" if value < 120 else f"{value / 60:.1f} min"


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / 2**30:.2f} GiB"


def write_curve_svg(result: dict, path: Path) -> Path:
    """The learning-curve plot alone as an SVG file (for a README), written atomically; the
    same figure as the page's, without dates or random ids, so an unchanged result gives an
    unchanged file."""
    buffer = io.StringIO()
    with rc_context({**PLOT_STYLE, "svg.hashsalt": "tunelab-assess"}):
        _curve_figure(result).savefig(buffer, format="svg", bbox_inches="tight",
                                      pad_inches=0.08, metadata={"Date": None})
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(buffer.getvalue(), encoding="utf-8")
    temporary.replace(path)
    return path


def _curve_png(result: dict) -> str:
    """The learning curve as an inline PNG for the page."""
    buffer = io.BytesIO()
    _curve_figure(result).savefig(buffer, format="png", dpi=DPI, bbox_inches="tight",
                                  pad_inches=0.08)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _curve_figure(result: dict) -> Figure:
    """Runs with intervals, the fit's band and extrapolation, baselines as horizontal bands."""
    figure = Figure(figsize=(WIDE_IN, 3.6))
    axes = figure.subplots()
    fit = result["fit"] or {}
    band = fit.get("band") or []
    if band:
        ns = [point["n"] for point in band]
        axes.plot(ns, [point["value"] for point in band], color=TUNED_COLOUR, linestyle="--",
                  linewidth=1.2, label=f"fit ({_form_name(fit)})")
        if band[0]["ci"]:
            axes.fill_between(ns, [p["ci"][0] for p in band], [p["ci"][1] for p in band],
                              color=TUNED_COLOUR, alpha=0.12, linewidth=0, label="fit, 95% band")
    curve = result["learning_curve"]
    axes.errorbar([p["n_examples"] for p in curve], [p["value"] for p in curve],
                  yerr=[[max(0.0, p["value"] - p["ci"][0]) for p in curve],
                        [max(0.0, p["ci"][1] - p["value"]) for p in curve]],
                  fmt="o", color=TUNED_COLOUR, capsize=3,
                  label="tuned, mean of seeds (95% interval)")
    seeds = [(p["n_examples"], value) for p in curve if p["seeds"]["n_seeds"] > 1
             for value in p["seeds"]["values"]]
    if seeds:
        axes.plot([n for n, _ in seeds], [v for _, v in seeds], "x", color=TUNED_COLOUR,
                  alpha=0.6, markersize=5, label="one training seed")
    for colour, arm in zip(BASELINE_COLOURS, result["baselines"]["arms"], strict=False):
        test = arm["test"]
        axes.axhline(test["value"], color=colour, linewidth=1)
        axes.axhspan(test["ci"][0], test["ci"][1], color=colour, alpha=0.15, linewidth=0)
        axes.plot([], [], color=colour, label=arm["name"])
    target = fit.get("target")
    if target:
        axes.axhline(target["target"], color="#111827", linestyle=":", linewidth=1,
                     label="target")
    axes.set_xscale("log", base=2)
    axes.set_xlabel("training examples (log scale)")
    axes.set_ylabel(result["primary_metric"])
    # beside the plot, not on it: the baseline bands fill the lower part of the axes
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return figure


def _form_name(fit: dict) -> str:
    form = fit.get("form")
    return str(form.get("name", form)) if isinstance(form, dict) else str(form or "fit")


def _curve_table(result: dict) -> str:
    fit = result["fit"]
    rows = []
    for p in result["learning_curve"]:
        seeds = p["seeds"]
        note = f"{seeds['n_seeds']} seed(s)" + (
            f", range {_num(seeds['range'])}" if seeds["n_seeds"] > 1 else "")
        if p["distrust"]:
            note += "; not trusted: " + "; ".join(r["text"] for r in p["distrust"])
        rows.append([f"tuned on {p['n_examples']} examples ({p['fraction']:.3g} of the data)",
                     _num(p["value"]), _ci(p["ci"]), note])
    if fit:
        rows += [[f"predicted at {label} the data ({p['n']} examples)", _num(p["value"]),
                  _ci(p["ci"]), _form_name(fit)] for label, p in fit["predicted"].items()]
        for key, label in (("persistence", "no further gain"), ("two_point", "two-point line")):
            other = fit.get(key) or {}
            for size, q in (other.get("predicted") or {}).items():
                rows.append([f"{label} at {size} the data", _num(q.get("value")),
                             _ci(q.get("ci")), "reference prediction"])
        gain = fit["gain_per_doubling"]
        rows.append(["gain per doubling of the data", f"{gain['value']:+.3g}", _ci(gain["ci"]),
                     ""])
    for name, delta in result["tuned_vs_arms"].items():
        rows.append([f"tuned (all data) − {name}", f"{delta['value']:+.3g}", _ci(delta["ci"]),
                     result["verdict"].get("by_arm", {}).get(name, "")])
    target = fit.get("target") if fit else None
    if target:
        rows.append([f"examples to reach {target['target']:g}",
                     _num(target["n"]) if target["reachable"] else target["note"],
                     _ci(target["ci"]), ""])
    flags = "".join(f"<p class=\"muted\">Curve: {escape(flag['text'])}</p>"
                    for flag in (fit or {}).get("flags", []))
    return _table(["", result["primary_metric"], "95% interval", ""], rows) + flags


def _baselines_table(result: dict) -> str:
    baselines = result["baselines"]
    rows = []
    for arm in baselines["arms"]:
        for index, variant in enumerate(arm["validation"]):
            chosen = index == arm["chosen_variant"]
            rows.append([arm["name"], variant["prompt"] or "(the data's prompt)",
                         _num(variant["value"]),
                         f"{_num(arm['test']['value'])} {_ci(arm['test']['ci'])}"
                         + (f" ({arm['parse_failure_rate']:.0%} not an answer)"
                            if arm.get("parse_failure_rate") else "")
                         if chosen else "not measured (not chosen)"])
    note = (f"<p class=\"muted\">Compared with: {escape(baselines['chosen'])} (chosen on "
            f"validation: {escape(baselines['chosen_selection'])}) and "
            f"{escape(baselines['strongest_on_test'])} (strongest on test); per arm, the "
            "variant best on validation unless a cheaper one is within its noise.</p>")
    return _table(["arm", "prompt", "validation", "test (95% interval)"], rows) + note


def _seeds_table(result: dict) -> str:
    rows = [[s["n_examples"], s["n_seeds"], ", ".join(_num(v) for v in s["values"]),
             _num(s["std"]) if s["std"] is not None else
             f"borrowed {_num(s.get('borrowed_std'))}" if s.get("borrowed_std") else "n/a"]
            for s in result["seeds"]["per_fraction"]]
    return (_table(["examples", "seeds", "metric per seed", "seed std"], rows)
            + f"<p class=\"muted\">{escape(result['seeds']['note'])}</p>")


def _forgetting_table(result: dict) -> str:
    rows = []
    for entry in result.get("forgetting", []):
        loss = entry.get("general_loss") or {}
        probe = entry.get("probe_task") or {}
        rows.append([entry["n_examples"], entry.get("training_seed", entry.get("seed")),
                     f"{_signed(loss.get('delta'))} {_ci(loss.get('ci'))}",
                     f"{_signed(probe.get('delta'))} {_ci(probe.get('ci'))}"])
    if not rows:
        return "<p>Not measured.</p>"
    first = result["forgetting"][0]
    probe = first.get("probe_task") or {}
    return _table(["examples", "seed", "general-text loss, tuned − base",
                   f"{escape(str(probe.get('name', 'probe task')))} "
                   f"{escape(str(probe.get('metric', '')))}, tuned − base"], rows)


def _signed(value: Any) -> str:
    return "n/a" if value is None else f"{value:+.3g}"


def _cost_tables(cost: dict) -> str:
    rows = [[run["n_examples"], run["steps"], _seconds(run["predicted_wall_s"]),
             _seconds(run["measured_wall_s"]), _num(run["tokens"]),
             _gib(run["predicted_peak_bytes"]), _gib(run["measured_peak_bytes"]),
             _seconds(run["eval_wall_s"])] for run in cost["runs"]]
    html = _table(["examples", "steps", "predicted time", "measured time", "tokens",
                   "predicted peak", "measured peak", "evaluation"], rows)
    projected = [[p["what"], _num(p.get("examples")), _num(p.get("epochs")),
                  _seconds(p.get("predicted_wall_s")), _seconds(p.get("scaled_wall_s")),
                  _gib(p.get("predicted_peak_bytes"))] if "error" not in p
                 else [p["what"], p["error"], "", "", "", ""] for p in cost["projections"]]
    html += "<h3>Predicted cost of more training</h3>" + _table(
        ["run", "examples", "epochs", "planner", "planner × measured/predicted", "peak"],
        projected)
    use = cost["at_use"]
    rows = [[f"best prompting ({use['prompting']['shots']}-shot)",
             _num(use["prompting"]["prompt_tokens_per_request"]),
             f"{use['prompting']['s_per_request'] * 1000:.1f} ms"],
            ["tuned model", _num(use["tuned"]["prompt_tokens_per_request"]),
             f"{use['tuned']['s_per_request'] * 1000:.1f} ms"]]
    by_time, by_tokens = use["break_even_requests_by_time"], use["break_even_requests_by_tokens"]
    html += "<h3>Cost at use</h3>" + _table(["", "prompt tokens per request",
                                             "time per request"], rows)
    by_time_text = (f"after {_num(by_time)} requests" if by_time else
                    "never (the tuned model is not faster per request)")
    by_tokens_text = (f"after {_num(by_tokens)} requests" if by_tokens else
                      "never (its prompts are not shorter)")
    html += (f"<p>Fine-tuning ({_seconds(use['training_s'])} of training) is paid back "
             f"{by_time_text} by measured time, and {by_tokens_text} by prompt tokens saved. "
             f"<span class=\"muted\">{escape(use['note'])}.</span></p>")
    endpoints = cost.get("endpoints") or []
    if endpoints:
        rows = [[e["arm"], _num((e.get("usage_per_request") or {}).get("prompt_tokens")),
                 _num((e.get("usage_per_request") or {}).get("completion_tokens")),
                 _usd(e.get("usd_per_request")), _usd(e.get("tuned_usd_per_request")),
                 _num(e.get("break_even_requests")) if e.get("break_even_requests")
                 else (e.get("note") or "never")] for e in endpoints]
        html += "<h3>Endpoints</h3>" + _table(
            ["arm", "prompt tokens", "completion tokens", "USD per request",
             "tuned USD per request", "break-even (requests)"], rows)
    return html


def _usd(value: float | None) -> str:
    return "n/a" if value is None else f"${value:.2g}"


def _complexity_table(complexity: dict) -> str:
    names = {"base_zero_shot": "base model, zero-shot", "best_prompting": "best prompting",
             "best_prompting_arm": "strongest arm on test",
             "best_prompting_shots": "its demonstrations", "n_labels": "labels / entity types",
             "label_entropy_bits": "label entropy (bits)",
             "target_tokens_mean": "target length (tokens)",
             "gain_per_doubling": "curve slope (gain per doubling)",
             "train_examples": "training examples"}
    return _table(["", ""], [[label, _num(complexity.get(key))] for key, label in names.items()])


def _time_table(time_info: dict) -> str:
    phases = time_info.get("phases_s", {})
    rows = [[name, _seconds(seconds), "yes" if name in time_info.get("redone_this_call", [])
             else "earlier call"] for name, seconds in phases.items()]
    loads = time_info.get("model_loads", {})
    note = ""
    if loads.get("count"):
        note = (f"<p class=\"muted\">{loads['count']} base-model loads this call (train() and "
                f"evaluate() each load it): first load {loads['first_s']:.1f} s, a repeated one "
                f"{loads['repeat_s']:.1f} s; about {loads['avoidable_s']:.0f} s "
                f"({loads['share_of_wall']:.1%} of this call) would be saved by one load.</p>")
    return _table(["phase", "wall time", "this call"], rows) + note
