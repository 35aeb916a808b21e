"""One self-contained HTML report per run: key numbers, training curves, evaluations, details.

Everything is inline (plots as PNG ``data:`` URIs, CSS in a ``<style>``; no JavaScript, no fonts
or files from the network), so ``report.html`` opens offline and can be mailed as one file.
Every input is optional: a missing file or key leaves its section out with a one-line note.
Preference runs (``method.objective``: dpo, simpo, kto) and reinforcement runs (grpo, rloo) get
a section of their own beside the training curves: what their extra metrics and the pre-flight
say, including the failure modes a loss curve hides.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import warnings
from collections.abc import Callable
from datetime import datetime, timezone
from html import escape
from pathlib import Path
from typing import Any

import yaml
from matplotlib import rc_context
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from tunelab.model.adapters import METHODS
from tunelab.objectives import OBJECTIVES, Objective
from tunelab.run.directory import RunDir, write_text
from tunelab.run.manifest import Manifest
from tunelab.run.metrics import read_metrics
from tunelab.run.trackers import log_artifact

TUNED_COLOUR = "#2563eb"
BASE_COLOUR = "#9ca3af"
VALIDATION_COLOUR = "#111827"
CHOSEN_COLOUR, REJECTED_COLOUR = "#15803d", "#b91c1c"
GUARD_COLOUR = "#dc2626"
DPI = 110
WIDE_IN, HALF_IN, TALL_IN = 9.2, 4.6, 3.1  # plot sizes that fit the page at 110 dpi
MAX_EXAMPLES = 10
WRONG_BELOW = 0.5  # a prediction whose score is below this counts as wrong
ROLES = ("base", "tuned")
ROLE_COLOURS = {"base": BASE_COLOUR, "tuned": TUNED_COLOUR}

# matplotlib ships DejaVu Sans, so plots look the same on every machine; no figure touches
# pyplot's global state (plain Figure objects, style applied through rc_context).
PLOT_STYLE = {
    "font.family": "sans-serif", "font.sans-serif": ["DejaVu Sans"], "font.size": 8.5,
    "axes.spines.top": False, "axes.spines.right": False, "axes.edgecolor": "#d1d5db",
    "axes.labelcolor": "#4b5563", "axes.titlesize": 9.5, "axes.titlelocation": "left",
    "axes.titlecolor": "#111827", "axes.grid": True, "axes.grid.axis": "y",
    "axes.axisbelow": True, "grid.color": "#eceef2", "grid.linewidth": 0.8,
    "xtick.color": "#6b7280", "ytick.color": "#6b7280", "xtick.major.size": 0,
    "ytick.major.size": 0, "legend.frameon": False, "legend.fontsize": 8,
    "figure.facecolor": "white", "savefig.facecolor": "white", "figure.dpi": DPI,
}


def write_report(run_dir: str | Path | RunDir, *, output: Path | None = None) -> Path:
    """Write one self-contained ``report.html`` for a run directory and return its path.

    ``output`` defaults to the run's ``report.html``. Missing inputs leave sections out.
    """
    run_dir = RunDir(run_dir).require()
    run = load_run(run_dir)
    with rc_context(PLOT_STYLE):
        page = render_report(run)
    output = Path(output) if output is not None else run_dir.report_path
    write_text(output, page)
    log_artifact(run_dir, output)  # to the run's MLflow run, if it reports to one
    return output


# --- reading the run directory ---------------------------------------------------------------


def load_run(run_dir: str | Path | RunDir) -> dict[str, Any]:
    """Manifest, config, metrics and eval results; files that cannot be read become notes.

    Another schema version of the manifest or of an eval file is refused (its fields may mean
    something else). The config is shown as the file has it, parsed only as YAML: the report
    must render a run whose config this tunelab no longer validates.
    """
    run = RunDir(run_dir)
    notes: list[str] = []
    manifest = run.read_manifest(notes=notes)
    config_text = run.config_path.read_text(encoding="utf-8", errors="replace") \
        if run.config_path.is_file() else ""
    try:
        config = yaml.safe_load(config_text) if config_text else {}
    except yaml.YAMLError as error:
        notes.append(f"{run.config_path.name} is not valid YAML ({error}); shown as text.")
        config = {}
    evals = [{**result.to_dict(), "file": path.relative_to(run.path).as_posix()}
             for path, result in run.read_evals(notes=notes).items()]
    return {
        "dir": run.path, "manifest": manifest,
        "config": config if isinstance(config, dict) else {}, "config_text": config_text,
        "metrics": read_metrics(run, notes=notes), "evals": evals, "notes": notes,
        "preflight": _read_preflight(run, notes),
    }


def _read_preflight(run: RunDir, notes: list[str]) -> dict[str, Any] | None:
    """A reinforcement run's ``preflight.json``, or None (with a note where it is unreadable)."""
    if not run.preflight_file.is_file():
        return None
    try:
        preflight = json.loads(run.preflight_file.read_text(encoding="utf-8"))
    except ValueError as error:
        notes.append(f"{run.preflight_file.name} could not be read ({error}).")
        return None
    if not isinstance(preflight, dict):
        notes.append(f"{run.preflight_file.name} is not a JSON object; left out.")
        return None
    return preflight


def _get(data: Any, *keys: str) -> Any:
    """``data[k1][k2]...`` or None where any level is missing or not a dict."""
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data


def _dict(data: Any, *keys: str) -> dict[str, Any]:
    """Like ``_get``, but {} unless the value found is a dict."""
    found = _get(data, *keys)
    return found if isinstance(found, dict) else {}


def _list(data: Any, *keys: str) -> list[Any]:
    """Like ``_get``, but [] unless the value found is a list."""
    found = _get(data, *keys)
    return found if isinstance(found, list) else []


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _interval(ci: Any) -> tuple[float, float] | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(_is_number(v) for v in ci):
        return float(ci[0]), float(ci[1])
    return None


# --- formatting --------------------------------------------------------------------------------


def _number(value: Any, signed: bool = False) -> str:
    """A number as people read it: ints with thousands separators, floats to 3 decimals."""
    if not _is_number(value):
        return "—" if value is None else escape(str(value))
    sign = "+" if signed else ""
    if isinstance(value, int):
        return f"{value:{sign},}"
    if abs(value) >= 1000:
        return f"{value:{sign},.0f}"
    if abs(value) >= 100:
        return f"{value:{sign}.1f}"
    return f"{value:{sign}.3f}"


def _format_interval(ci: Any, signed: bool = False) -> str:
    bounds = _interval(ci)
    if bounds is None:
        return ""
    return f"[{_number(bounds[0], signed)}, {_number(bounds[1], signed)}]"


def _p_value(p: Any) -> str:
    if not _is_number(p):
        return "—"
    return "p &lt; 0.001" if p < 0.001 else f"p = {p:.3f}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def _count(value: Any) -> str:
    """A parameter or token count: 134.5M, 1.8B."""
    if not _is_number(value):
        return "—"
    for limit, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            return f"{value / limit:.1f}{suffix}"
    return f"{value:,}"


def _clip(text: Any, limit: int = 600) -> str:
    """Text (JSON for anything not a string) cut to ``limit`` characters, HTML-escaped."""
    if text is None:
        return '<span class="muted">—</span>'
    if not isinstance(text, str):
        text = json.dumps(text, ensure_ascii=False)
    if len(text) > limit:
        text = f"{text[:limit]}… (+{len(text) - limit:,} characters)"
    return escape(text)


def _note(text: str) -> str:
    return f'<p class="note">{text}</p>'


def _badge(text: str, kind: str) -> str:
    return f'<span class="badge {kind}">{escape(text)}</span>'


def _table(header: list[str], rows: list[list[str]], css_class: str = "",
           widths: list[str] | None = None) -> str:
    """An HTML table from cells that are already HTML; ``widths`` fixes the column widths."""
    columns = "".join(f'<col style="width: {width}">' for width in widths or [])
    head = "".join(f"<th>{cell}</th>" for cell in header)
    body = "".join("<tr>" + "".join(f"<td>{cell}</td>" for cell in row) + "</tr>"
                   for row in rows)
    return (f'<table class="{css_class}"><colgroup>{columns}</colgroup><thead><tr>{head}</tr>'
            f"</thead><tbody>{body}</tbody></table>")


def _image(uri: str, alt: str, css_class: str = "plot") -> str:
    return f'<img class="{css_class}" src="{uri}" alt="{escape(alt)}">'


def _png(figure: Figure) -> str:
    """The figure as a base64 PNG ``data:`` URI; the figure is cleared (closed) afterwards."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    figure.clear()
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- the page ----------------------------------------------------------------------------------


def render_report(run: dict[str, Any]) -> str:
    """The whole HTML page for a loaded run (see ``load_run``)."""
    evals = run["evals"]
    sections = [_section("Training", "training", _guarded(_training_section, run["metrics"]))]
    extra = _objective_sections(run)
    sections += [_section(title, anchor, body) for title, anchor, body in extra]
    if evals:
        sections += [_section(_eval_title(result), f"eval-{index}", _guarded(_eval_section, result))
                     for index, result in enumerate(evals)]
    else:
        sections.append(_section("Evaluation", "evaluation", _note(
            "No evaluation yet: no <code>eval/*.json</code> in this run directory.")))
    sections.append(_section("Run details", "details", _guarded(_details_section, run)))
    links = [("training", "Training")] + [(anchor, title) for title, anchor, _ in extra]
    links += [(f"eval-{i}", _eval_title(result)) for i, result in enumerate(evals)]
    links += [("evaluation", "Evaluation")] if not evals else []
    links.append(("details", "Run details"))
    nav = " ".join(f'<a href="#{anchor}">{escape(text)}</a>' for anchor, text in links)
    title = escape(_run_name(run))
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{title} · tunelab report</title><style>{CSS}</style></head><body><main>"
        f"{_guarded(_header, run)}<nav>{nav}</nav>{''.join(sections)}"
        f'<footer>Written by tunelab on {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC from '
        f"<code>{escape(str(run['dir']))}</code>.</footer></main></body></html>\n"
    )


def _guarded(render: Callable[..., str], *args: Any) -> str:
    """``render(*args)``, or a visible note (and a warning) where its input has an unexpected
    shape: one malformed eval file must not cost the whole report."""
    try:
        return render(*args)
    except Exception as error:
        warnings.warn(f"report: {render.__name__} failed: {error!r}", stacklevel=2)
        return _note(f"This part could not be drawn ({escape(type(error).__name__)}: "
                     f"{escape(str(error))}); the input it reads has an unexpected shape.")


def _section(title: str, anchor: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{escape(title)}</h2>{body}</section>'


def _run_name(run: dict[str, Any]) -> str:
    manifest = run["manifest"]
    name = (manifest.name if manifest else None) or _get(run, "config", "name") or run["dir"].name
    return str(name)


def _eval_title(result: dict[str, Any]) -> str:
    parts = [str(result.get("name") or result["file"])]
    parts += [str(result[key]) for key in ("task", "split") if result.get(key)]
    return " · ".join(parts)


# --- header and key numbers --------------------------------------------------------------------


def _header(run: dict[str, Any]) -> str:
    manifest, config = run["manifest"], run["config"]
    badges = _badge(manifest.status, "good" if manifest.finished else "neutral") \
        if manifest else ""
    facts = [("Model", _model_text(manifest, config)), ("Method", _method_text(config)),
             ("Data", _data_text(manifest, config))]
    facts_html = "".join(f"<div><dt>{label}</dt><dd>{text}</dd></div>"
                         for label, text in facts if text)
    meta = f"device {escape(manifest.device)} · seed {manifest.seed}" if manifest else ""
    notes = "".join(f'<p class="warning">{escape(note)}</p>' for note in run["notes"])
    return (f'<header><div class="title"><h1>{escape(_run_name(run))}</h1>{badges}</div>'
            f'<p class="muted">{meta}</p><dl class="facts">{facts_html}</dl>{notes}'
            f"{_cards(run)}</header>")


def _model_text(manifest: Manifest | None, config: dict[str, Any]) -> str:
    model = manifest.model if manifest else {}
    path = _get(config, "model", "path")
    parts = [f"<code>{escape(str(path))}</code>"] if path else []
    details = [str(model["architecture"])] if model.get("architecture") else []
    total = next((model[key] for key in ("total_params", "total_parameters", "parameters")
                  if _is_number(model.get(key))), None)
    trainable = next((model[key] for key in ("trainable_params", "trainable_parameters")
                      if _is_number(model.get(key))), None)
    if total:
        details.append(f"{_count(total)} parameters")
    if total and trainable is not None:
        details.append(f"{_count(trainable)} trainable ({trainable / total:.2%})")
    if model.get("dtype"):
        details.append(str(model["dtype"]))
    if details:
        parts.append(f'<span class="muted">{escape(", ".join(details))}</span>')
    return " ".join(parts)


def _method_text(config: dict[str, Any]) -> str:
    method, train = _dict(config, "method"), _dict(config, "train")
    if not method.get("kind"):
        return ""
    kind = str(method["kind"])
    known = METHODS.get(kind.lower())
    adapter = known is None or known.adapter
    parts = [(known.title if known else kind) + (" (rsLoRA scaling)" if adapter and
                                                 method.get("rslora") else "")]
    parts += _objective_text(method)
    parts += [f"{label} {method[key]}" for key, label in (("r", "r"), ("alpha", "α"))
              if method.get(key) is not None and adapter]
    parts += [f"{label} {train[key]}" for key, label in (("lr", "lr"), ("epochs", "epochs"))
              if train.get(key) is not None]
    return escape(" · ".join(parts))


def _objective(config: dict[str, Any]) -> Objective | None:
    """The run's objective where it is not plain SFT (None also for a name this tunelab does not
    know: its metrics mean something this report cannot say)."""
    name = _get(config, "method", "objective")
    objective = OBJECTIVES.get(str(name).lower()) if name is not None else None
    return objective if objective is not None and objective.name != "sft" else None


def _objective_text(method: dict[str, Any]) -> list[str]:
    """The objective as the method line names it (nothing for SFT, the default)."""
    name = method.get("objective")
    if name is None or str(name).lower() == "sft":
        return []
    known = OBJECTIVES.get(str(name).lower())
    if known is None:
        return [str(name)]
    beta = [f"β {method['beta']}"] if known.preference and method.get("beta") is not None \
        else []
    return [known.title, *beta]


def _data_text(manifest: Manifest | None, config: dict[str, Any]) -> str:
    train = _get(config, "data", "train")
    paths = train if isinstance(train, list) else [train] if train else []
    if not paths and manifest:
        paths = list(manifest.data)
    report = manifest.data_report if manifest else {}
    counts = [f"{_number(report[key])} {label}" for key, label in
              (("train_examples", "train"), ("validation_examples", "validation"))
              if _is_number(report.get(key))]
    if _is_number(report.get("train_tokens")):
        counts.append(f"{_count(report['train_tokens'])} train tokens")
    text = ", ".join(f"<code>{escape(str(path))}</code>" for path in paths)
    if counts:
        text += f' <span class="muted">{escape(" · ".join(counts))}</span>'
    return text


def _cards(run: dict[str, Any]) -> str:
    """Two rows of key numbers: what the run achieved, then what it cost."""
    manifest, metrics = run["manifest"], run["metrics"]
    quality, cost = [], []
    before, after = _validation_losses(manifest, metrics)
    if before is not None or after is not None:
        change = f" ({(after - before) / before:+.1%})" if before and after is not None else ""
        quality.append(_card("Validation loss", f"{_number(before)} → {_number(after)}",
                             f"before → after training{change}"))
    quality += _objective_cards(run)
    quality += [card for card in map(_eval_card, run["evals"]) if card]
    training = [m for m in metrics if _is_number(m.get("loss"))]
    speed = manifest.tokens_per_second if manifest else None
    if not _is_number(speed) and training:
        speed = training[-1].get("tokens_per_second")
    if _is_number(speed):
        cost.append(_card("Throughput", f"{speed:,.0f}", "tokens per second"))
    if manifest and _is_number(manifest.wall_s):
        cost.append(_card("Wall time", _duration(manifest.wall_s), "whole run"))
    elif (wall_s := _logged_seconds(metrics)) is not None:
        cost.append(_card("Wall time", _duration(wall_s), "first to last metrics.jsonl record"))
    steps = manifest.steps if manifest and manifest.steps is not None else \
        max((m["step"] for m in training if _is_number(m.get("step"))), default=None)
    total = manifest.total_steps if manifest else None
    if steps is not None or _is_number(total):
        sub = f"of {_number(total)} planned" if _is_number(total) and total != steps else \
            "optimizer steps"
        cost.append(_card("Steps", _number(steps if steps is not None else 0), sub))
    return "".join(f'<div class="cards {kind}">{"".join(cards)}</div>'
                   for kind, cards in (("quality", quality), ("cost", cost)) if cards)


def _objective_cards(run: dict[str, Any]) -> list[str]:
    """A preference run's held-out reward accuracy; a reinforcement run's validation reward and
    its starting model's pass@1."""
    objective = _objective(run["config"])
    if objective is None:
        return []
    key, label = ("val_reward_accuracy", "Validation reward accuracy") if objective.preference \
        else ("val_reward", "Validation reward")
    cards = []
    if validation := _records(run["metrics"], key):
        first, last = validation[0], validation[-1]
        ci = _format_interval(last.get(f"{key}_ci"))
        steps = f"step {_number(first['step'])} → {_number(last['step'])}"
        cards.append(_card(label, f"{_number(first[key])} → {_number(last[key])}",
                           steps + (f", last {ci}" if ci else "")))
    pass_at_1 = _dict(run.get("preflight"), "pass_at_1")
    if objective.rollouts and _is_number(pass_at_1.get("value")):
        ci = _format_interval(pass_at_1.get("ci"))
        cards.append(_card("Pre-flight pass@1", _number(pass_at_1["value"]),
                           "the starting model" + (f", {ci}" if ci else "")))
    return cards


def _card(label: str, value: str, sub: str = "", extra: str = "") -> str:
    return (f'<div class="card"><div class="label">{escape(label)}</div>'
            f'<div class="value">{value}</div><div class="sub">{escape(sub)}{extra}</div></div>')


def _validation_losses(manifest: Manifest | None,
                       metrics: list[dict[str, Any]]) -> tuple[float | None, float | None]:
    validation = [m for m in metrics if _is_number(m.get("val_loss"))]
    before, after = (manifest.val_loss_before, manifest.val_loss_after) if manifest else \
        (None, None)
    if not _is_number(before) and validation and validation[0].get("step") == 0:
        before = validation[0]["val_loss"]
    if not _is_number(after) and validation and validation[-1].get("step") != 0:
        after = validation[-1]["val_loss"]
    return (before if _is_number(before) else None), (after if _is_number(after) else None)


def _logged_seconds(metrics: list[dict[str, Any]]) -> float | None:
    times = [m["time"] for m in metrics if _is_number(m.get("time"))]
    return max(times) - min(times) if len(times) >= 2 else None


def _eval_card(result: dict[str, Any]) -> str:
    metric = result.get("primary_metric")
    if not metric:
        return ""
    base = _get(result, "models", "base", "metrics", metric, "value")
    tuned = _get(result, "models", "tuned", "metrics", metric, "value")
    if not (_is_number(base) or _is_number(tuned)):
        return ""
    ci = _format_interval(_get(result, "models", "tuned", "metrics", metric, "ci"))
    sub = "base → tuned" + (f", tuned {ci}" if ci else "")
    comparison = _get(result, "comparison", metric)
    badge = " " + _significance_badge(comparison) if isinstance(comparison, dict) else ""
    label = f"{metric} · {result.get('name') or result['file']}"
    return _card(label, f"{_number(base)} → {_number(tuned)}", sub, badge)


def _significance_badge(comparison: dict[str, Any]) -> str:
    significant = comparison.get("significant")
    if significant is None:
        return _badge("no test", "neutral")
    if not significant:
        return _badge("not significant", "neutral")
    delta = comparison.get("delta")
    return _badge("significant, worse", "bad") if _is_number(delta) and delta < 0 else \
        _badge("significant", "good")


# --- training ----------------------------------------------------------------------------------


def _training_section(metrics: list[dict[str, Any]]) -> str:
    training = sorted((m for m in metrics if _is_number(m.get("loss")) and
                       _is_number(m.get("step"))), key=lambda m: m["step"])
    validation = sorted((m for m in metrics if _is_number(m.get("val_loss")) and
                         _is_number(m.get("step"))), key=lambda m: m["step"])
    if not training and not validation:
        return _note("No training metrics yet: <code>metrics.jsonl</code> is missing or holds "
                     "no loss.")
    parts = [_image(_loss_figure(training, validation), "training and validation loss per step")]
    if not validation:
        parts.append(_note("No validation loss logged (the run has no validation data)."))
    if any(_is_number(m.get("lr")) for m in training):
        parts.append(_image(_schedule_figure(training), "learning rate and gradient norm"))
    elif training:
        parts.append(_note("No learning rate logged."))
    return "".join(parts)


def _smooth(values: list[float]) -> list[float]:
    """Bias-corrected exponential moving average; the window grows with the run's length."""
    weight = min(0.97, max(0.3, 1 - 12 / max(len(values), 1)))
    smoothed, average = [], 0.0
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        smoothed.append(average / (1 - weight**count))
    return smoothed


def _raw_style(n_points: int) -> dict[str, Any]:
    """Raw per-step values as dots, or as a thin line where dots would merge."""
    return {"marker": "o", "markersize": 3, "linestyle": "none"} if n_points <= 400 \
        else {"linewidth": 0.8}


def _loss_figure(training: list[dict[str, Any]], validation: list[dict[str, Any]]) -> str:
    figure = Figure(figsize=(WIDE_IN, TALL_IN), layout="constrained")
    axes = figure.subplots()
    if training:
        steps, losses = [m["step"] for m in training], [m["loss"] for m in training]
        axes.plot(steps, losses, color=TUNED_COLOUR, alpha=0.28, label="train loss",
                  **_raw_style(len(steps)))
        axes.plot(steps, _smooth(losses), color=TUNED_COLOUR, linewidth=2,
                  label="train loss (smoothed)")
    if validation:
        axes.plot([m["step"] for m in validation], [m["val_loss"] for m in validation],
                  color=VALIDATION_COLOUR, marker="o", markersize=5, linewidth=1.2,
                  label="validation loss")
    axes.set_title("Loss")
    axes.set_xlabel("step")
    axes.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=3, borderaxespad=0.2)
    axes.margins(x=0.01, y=0.12)
    return _png(figure)


def _schedule_figure(training: list[dict[str, Any]]) -> str:
    with_norm = any(_is_number(m.get("grad_norm")) for m in training)
    figure = Figure(figsize=(WIDE_IN, 1.9), layout="constrained")
    panels = figure.subplots(1, 2 if with_norm else 1, squeeze=False)[0]
    series = [("lr", "Learning rate")] + ([("grad_norm", "Gradient norm")] if with_norm else [])
    for axes, (key, title) in zip(panels, series, strict=True):
        points = [(m["step"], m[key]) for m in training if _is_number(m.get(key))]
        axes.plot([s for s, _ in points], [v for _, v in points], color="#4b5563", linewidth=1.4)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.set_ylim(bottom=0)
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    return _png(figure)


# --- what preference and reinforcement runs add -----------------------------------------------


def _objective_sections(run: dict[str, Any]) -> list[tuple[str, str, str]]:
    """The section a preference or reinforcement run adds after Training: (title, anchor, body)."""
    objective = _objective(run["config"])
    if objective is None:
        return []
    if objective.preference:
        return [(f"Preference · {objective.title}", "preference",
                 _guarded(_preference_section, run["metrics"], objective))]
    if objective.rollouts:
        return [(f"Reinforcement · {objective.title}", "reinforcement",
                 _guarded(_reinforcement_section, run, objective))]
    return []


def _records(metrics: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """The records with a number under ``key`` (and a step), in step order."""
    return sorted((m for m in metrics if _is_number(m.get(key)) and _is_number(m.get("step"))),
                  key=lambda m: m["step"])


def _before_after_table(validation: list[dict[str, Any]],
                        rows: list[tuple[str, str, str | None, bool]]) -> str:
    """The first and last validation points side by side: (label, key, interval key, change?)."""
    points = [validation[0]] if len(validation) == 1 else [validation[0], validation[-1]]
    header = [""] + [f"step {_number(m['step'])}" + (" (before)" if m["step"] == 0 else "")
                     for m in points] + (["change"] if len(points) == 2 else [])
    body = []
    for label, key, ci_key, change in rows:
        cells = [escape(label)] + [
            f'{_number(m.get(key))} <span class="ci">{_format_interval(m.get(ci_key))}</span>'
            if ci_key else _number(m.get(key)) for m in points]
        if len(points) == 2:
            values = [m.get(key) for m in points]
            cells.append(_number(values[1] - values[0], signed=True)
                         if change and all(map(_is_number, values)) else "")
        body.append(cells)
    return _table(header, body, "narrow before-after")


def _draw_train(axes: Any, training: list[dict[str, Any]], key: str, colour: str,
                label: str) -> None:
    """A per-step quantity: raw values faint, their moving average bold."""
    points = [(m["step"], m[key]) for m in training if _is_number(m.get(key))]
    if not points:
        return
    steps, values = [s for s, _ in points], [v for _, v in points]
    axes.plot(steps, values, color=colour, alpha=0.28, **_raw_style(len(steps)))
    axes.plot(steps, _smooth(values), color=colour, linewidth=2, label=f"{label} (smoothed)")


def _draw_validation(axes: Any, validation: list[dict[str, Any]], key: str,
                     ci_key: str | None, label: str = "validation") -> None:
    """Validation points, with their interval as whiskers where one is logged."""
    points = [m for m in validation if _is_number(m.get(key))]
    if not points:
        return
    values = [m[key] for m in points]
    bounds = [_interval(m.get(ci_key)) if ci_key else None for m in points]
    bounds = [b or (v, v) for b, v in zip(bounds, values, strict=True)]
    errors = [[max(v - low, 0) for v, (low, _) in zip(values, bounds, strict=True)],
              [max(high - v, 0) for v, (_, high) in zip(values, bounds, strict=True)]]
    axes.errorbar([m["step"] for m in points], values, yerr=errors if ci_key else None,
                  color=VALIDATION_COLOUR, marker="o", markersize=5, linewidth=1.2, capsize=3,
                  elinewidth=1, label=label)


# --- preference runs ---------------------------------------------------------------------------


def _answer_names(objective: Objective) -> tuple[str, str]:
    """What the two kinds of answer are called: KTO's are labelled one by one, not paired."""
    return ("desirable", "undesirable") if objective.data == "unpaired" else \
        ("chosen", "rejected")


def _preference_section(metrics: list[dict[str, Any]], objective: Objective) -> str:
    """Held-out pairs before and after, the answers' log-probabilities (with what a falling
    chosen log-prob means), reward accuracy and margin."""
    training = _records(metrics, "reward_accuracy")
    validation = _records(metrics, "val_reward_accuracy")
    if not training and not validation:
        return _note("No preference metrics in <code>metrics.jsonl</code> (reward accuracy, "
                     "margin, log-probabilities of the answers).")
    names = _answer_names(objective)
    parts = ["<h3>Held-out pairs</h3>" + _preference_table(validation, objective) if validation
             else _note("No validation pairs logged: held-out reward accuracy is unknown.")]
    parts += ["<h3>Log-probabilities of the answers</h3>",
              _image(_logp_figure(training, validation, names),
                     f"{names[0]} and {names[1]} answers' log-probabilities per step"),
              _logp_caption(validation, names, objective),
              "<h3>Reward accuracy and margin</h3>",
              _image(_accuracy_figure(training, validation), "reward accuracy and margin")]
    return "".join(parts)


def _preference_table(validation: list[dict[str, Any]], objective: Objective) -> str:
    names = _answer_names(objective)
    paired = objective.data == "pairs"
    rows = [("reward accuracy", "val_reward_accuracy", "val_reward_accuracy_ci", True),
            ("margin", "val_margin", None, True),
            (f"{names[0]} log-prob (nats)", "val_chosen_logp", None, True),
            (f"{names[1]} log-prob (nats)", "val_rejected_logp", None, True),
            ("loss", "val_loss", None, True),
            ("held-out pairs" if paired else "held-out answers", "val_pairs", None, False)]
    if _is_number(validation[-1].get("val_kl")):  # measured once, after training
        rows.insert(5, ("KL to the reference (nats)", "val_kl", "val_kl_ci", False))
    meaning = ("the share of held-out pairs whose chosen answer gets the higher implicit "
               "reward; margin: the mean of chosen − rejected reward" if paired else
               "the share of held-out answers whose implicit reward is positive for a "
               "desirable answer and negative for an undesirable one; margin: the mean reward, "
               "its sign flipped for undesirable answers")
    tie = (" At step 0 the policy is its reference: every reward is 0, and a tie does not count "
           "as right." if objective.reference else "")
    kl = (" KL to the reference: the mean over validation prompts of one sampled answer's "
          "log π − log π_ref, summed over its tokens (95% bootstrap interval)."
          if _is_number(validation[-1].get("val_kl")) else "")
    note = (f'<p class="muted">Reward accuracy: {meaning} (95% bootstrap interval).'
            f"{tie}{kl}</p>")
    return _before_after_table(validation, rows) + note


def _logp_figure(training: list[dict[str, Any]], validation: list[dict[str, Any]],
                 names: tuple[str, str]) -> str:
    figure = Figure(figsize=(WIDE_IN, TALL_IN), layout="constrained")
    panels = figure.subplots(1, 2, sharey=True)
    for axes, side, name, colour in zip(panels, ("chosen", "rejected"), names,
                                        (CHOSEN_COLOUR, REJECTED_COLOUR), strict=True):
        _draw_train(axes, training, f"{side}_logp", colour, "train")
        _draw_validation(axes, validation, f"val_{side}_logp", None)
        axes.set_title(f"{name.capitalize()} answers (nats)")
        axes.set_xlabel("step")
        axes.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=2, borderaxespad=0.2)
        axes.margins(x=0.02, y=0.12)
    return _png(figure)


def _logp_caption(validation: list[dict[str, Any]], names: tuple[str, str],
                  objective: Objective) -> str:
    """What the held-out chosen log-probability did, said plainly where it fell."""
    points = _records(validation, "val_chosen_logp")
    if len(points) < 2:
        return ('<p class="muted">Train points are means over each step\'s pairs; two '
                "validation points are needed to say how the log-probabilities moved.</p>")
    first, last = points[0], points[-1]
    change = last["val_chosen_logp"] - first["val_chosen_logp"]
    margins = [m.get("val_margin") for m in (first, last)]
    margin_grew = all(map(_is_number, margins)) and margins[1] > margins[0]
    span = f"from step {_number(first['step'])} to step {_number(last['step'])}"
    margin = f"{_number(margins[0])} → {_number(margins[1])}"
    if change < 0 and margin_grew:
        return (f'<p class="warning">On the held-out pairs, {span}, the {names[0]} answers\' '
                f"log-probability fell by {_number(-change)} nats while the margin grew "
                f"({margin}): {escape(objective.title)} can widen the margin by pushing both "
                "down; check the task metric (<code>tunelab eval</code>), not the margin "
                "alone.</p>")
    if change < 0:
        return (f'<p class="warning">On the held-out pairs, {span}, the {names[0]} answers\' '
                f"log-probability fell by {_number(-change)} nats and the margin did not grow "
                f"({margin}); check the task metric (<code>tunelab eval</code>).</p>")
    rejected = [m.get("val_rejected_logp") for m in (first, last)]
    return (f'<p class="muted">On the held-out pairs, {span}, the {names[0]} answers\' '
            f"log-probability rose by {_number(change)} nats, the {names[1]} answers' went "
            f"{_number(rejected[0])} → {_number(rejected[1])} and the margin {margin}. Train "
            "points are means over each step's pairs, which differ from step to step.</p>")


def _accuracy_figure(training: list[dict[str, Any]], validation: list[dict[str, Any]]) -> str:
    panels = [("reward_accuracy", "val_reward_accuracy_ci", "Reward accuracy (whiskers: 95% "
               "interval)"), ("margin", None, "Margin (mean reward difference)")]
    if any(_is_number(m.get("kl")) for m in training):
        panels.append(("kl", None, "KL baseline (KTO)"))
    figure = Figure(figsize=(WIDE_IN, TALL_IN), layout="constrained")
    for axes, (key, ci_key, title) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        _draw_train(axes, training, key, TUNED_COLOUR, "train")
        _draw_validation(axes, validation, f"val_{key}", ci_key)
        axes.set_title(title)
        axes.set_xlabel("step")
        if key == "reward_accuracy":
            axes.set_ylim(-0.03, 1.05)
            axes.legend(loc="lower right")
        else:
            axes.axhline(0, color="#9ca3af", linewidth=0.8)
    return _png(figure)


# --- reinforcement runs ------------------------------------------------------------------------

ROLLOUT_PANELS = (("tied_share", "Tied groups (share)"),
                  ("truncated_share", "Truncated answers (share)"),
                  ("answer_tokens_mean", "Answer length (tokens)"),
                  ("entropy", "Entropy (nats/token)"),
                  ("logprob_gap", "Trainer vs sampler gap (nats/token)"),
                  ("kl", "KL to the reference (nats/token)"))
FUNCTION_COLOURS = ("#7c3aed", "#d97706", "#0891b2", "#db2777")
TIED_WARNING = 0.5  # above this share of tied groups, most of a step teaches nothing


def _reinforcement_section(run: dict[str, Any], objective: Objective) -> str:
    """The pre-flight, validation reward before and after, reward per step, what the sampled
    answers were like (the on-policy guard's gap among them) and where the step time went."""
    config = run["config"]
    training, validation = _records(run["metrics"], "reward"), \
        _records(run["metrics"], "val_reward")
    parts = [_preflight_block(run.get("preflight"), config)]
    if not training and not validation:
        return parts[0] + _note("No reinforcement metrics in <code>metrics.jsonl</code> yet "
                                "(reward, tied groups, rollout time).")
    if validation:
        rows = [("reward of greedy answers", "val_reward", "val_reward_ci", True),
                ("reference answers' next-token loss", "val_loss", None, True),
                ("prompts", "val_prompts", None, False)]
        parts.append("<h3>Validation prompts</h3>" + _before_after_table(validation, rows)
                     + '<p class="muted">The validation loss in Training is the reference '
                     f"answers' next-token loss, not {escape(objective.title)}'s objective; the "
                     "reward is what the run optimises (95% bootstrap interval over "
                     "prompts).</p>")
    parts += ["<h3>Reward</h3>", _image(_reward_figure(training, validation),
                                        "reward per step and on validation prompts")]
    if training:
        parts += ["<h3>Rollouts</h3>", _image(_rollout_figure(training, config),
                                              "tied groups, truncation, length, entropy, gap"),
                  _rollout_caption(training, config), "<h3>Sampling against training time</h3>",
                  _timing_block(training)]
    return "".join(parts)


def _preflight_block(preflight: dict[str, Any] | None, config: dict[str, Any]) -> str:
    title = "<h3>Pre-flight</h3>"
    if not preflight:
        return title + _note("No <code>preflight.json</code>: the run skipped the pre-flight "
                             "(<code>rl.preflight_prompts: 0</code>) or predates it.")
    group = preflight.get("group_size")
    rows = []
    for label, key in (("pass@1", "pass_at_1"), (f"pass@{_number(group)}", "pass_at_group"),
                       ("tied groups (share)", "tied_share")):
        entry = _dict(preflight, key)
        rows.append([escape(label), _number(entry.get("value")),
                     f'<span class="ci">{_format_interval(entry.get("ci"))}</span>'])
    rows.append(["mean reward", _number(preflight.get("mean_reward")), ""])
    per_reward = _dict(preflight, "per_reward")
    rows += [[f"mean reward: {escape(str(name))}", _number(value), ""]
             for name, value in per_reward.items() if len(per_reward) > 1]
    rows.append(["truncated answers (share)", _number(preflight.get("truncated_share")), ""])
    confidence = _get(preflight, "pass_at_1", "confidence")
    level = f"{confidence:.0%} interval" if _is_number(confidence) else "interval"
    intro = (f'<p class="muted">Before training, {_number(group)} answers sampled from the '
             f"starting model for each of {_number(preflight.get('prompts'))} training prompts. "
             "An answer passes with the highest reward; a group whose answers all got the same "
             "reward (tied) has no advantage to learn from.</p>")
    return title + intro + _table(["", "value", level], rows, "narrow") + \
        _tied_warning(_get(preflight, "tied_share", "value"), config)


def _tied_warning(tied: Any, config: dict[str, Any]) -> str:
    if not _is_number(tied) or tied <= TIED_WARNING:
        return ""
    limit = _get(config, "rl", "max_tied_share")
    stop = f" (the run stops above rl.max_tied_share, {_number(limit)})" if _is_number(limit) \
        else ""
    return (f'<p class="warning">{tied:.0%} of the pre-flight groups tie{stop}: most answers '
            "teach nothing. Start from an SFT run (train.init_from), add shots or a clearer "
            "prompt, raise rl.temperature or rl.group_size, or use a reward with partial "
            "credit.</p>")


def _reward_functions(training: list[dict[str, Any]]) -> list[str]:
    """The reward functions logged one by one (``reward_<name>``, beside ``_std``)."""
    keys = dict.fromkeys(key for m in training for key in m)
    return [key[len("reward_"):] for key in keys if key.startswith("reward_") and
            key != "reward_std" and not key.endswith("_std")]


def _reward_figure(training: list[dict[str, Any]], validation: list[dict[str, Any]]) -> str:
    figure = Figure(figsize=(WIDE_IN, TALL_IN), layout="constrained")
    axes = figure.subplots()
    band = [m for m in training if _is_number(m.get("reward_std"))]
    if band:
        axes.fill_between([m["step"] for m in band], [m["reward"] - m["reward_std"] for m in band],
                          [m["reward"] + m["reward_std"] for m in band], color=TUNED_COLOUR,
                          alpha=0.12, linewidth=0, label="± std over the step's answers")
    _draw_train(axes, training, "reward", TUNED_COLOUR, "train reward")
    functions = _reward_functions(training)
    for index, name in enumerate(functions if len(functions) > 1 else []):
        points = [(m["step"], m[f"reward_{name}"]) for m in training
                  if _is_number(m.get(f"reward_{name}"))]
        axes.plot([s for s, _ in points], [v for _, v in points], linestyle="--", linewidth=1,
                  color=FUNCTION_COLOURS[index % len(FUNCTION_COLOURS)], label=name)
    _draw_validation(axes, validation, "val_reward", "val_reward_ci",
                     "validation reward (greedy; whiskers: 95% interval)")
    axes.set_title("Reward")
    axes.set_xlabel("step")
    axes.legend(loc="upper left", bbox_to_anchor=(0, -0.16), ncols=3, alignment="left")
    axes.margins(x=0.02, y=0.12)
    return _png(figure)


def _rollout_figure(training: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """Small multiples of what the sampled answers were like, the guard's gap with its limit."""
    panels = [(key, title) for key, title in ROLLOUT_PANELS
              if any(_is_number(m.get(key)) for m in training)]
    rows = math.ceil(len(panels) / 3)
    figure = Figure(figsize=(WIDE_IN, 2.0 * rows), layout="constrained")
    grid = list(figure.subplots(rows, 3, squeeze=False).flat)
    tolerance = _get(config, "rl", "guard_tolerance")
    for axes in grid[len(panels):]:
        axes.set_visible(False)
    for axes, (key, title) in zip(grid, panels, strict=False):
        points = [(m["step"], m[key]) for m in training if _is_number(m.get(key))]
        axes.plot([s for s, _ in points], [v for _, v in points], color="#4b5563",
                  linewidth=1.4, marker="o" if len(points) <= 60 else None, markersize=2.5)
        if key == "logprob_gap" and _is_number(tolerance):
            axes.axhline(tolerance, color=GUARD_COLOUR, linestyle="--", linewidth=1,
                         label=f"guard tolerance {tolerance:g}")
            axes.legend(loc="center right")
        if key.endswith("_share"):
            axes.set_ylim(-0.03, 1.05)
        else:
            axes.set_ylim(bottom=0)
        axes.set_title(title)
        axes.set_xlabel("step")
        axes.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    return _png(figure)


def _rollout_caption(training: list[dict[str, Any]], config: dict[str, Any]) -> str:
    """The guard's margin in one sentence; a warning where a logged gap passed the tolerance."""
    gaps = [m["logprob_gap"] for m in training if _is_number(m.get("logprob_gap"))]
    tolerance = _get(config, "rl", "guard_tolerance")
    if not gaps or not _is_number(tolerance):
        return ""
    largest = max(gaps)
    if largest > tolerance:
        return (f'<p class="warning">The trainer\'s log-probabilities of the sampled tokens '
                f"differed from the sampler's by up to {largest:.3g} nats per token, above the "
                f"guard's tolerance ({tolerance:g}; checked every rl.guard_every steps): those "
                "steps did not learn from the policy's own answers.</p>")
    return (f'<p class="muted">Largest trainer vs sampler gap {largest:.3g} nats per token, '
            f"under the guard's tolerance {tolerance:g} (dashed): the answers came from the "
            "policy being trained.</p>")


def _timing_block(training: list[dict[str, Any]]) -> str:
    timed = [m for m in training if _is_number(m.get("rollout_s")) and
             _is_number(m.get("step_s"))]
    if not timed:
        return _note("No rollout times logged.")
    rollout = [m["rollout_s"] for m in timed]
    rest = [max(m["step_s"] - m["rollout_s"], 0.0) for m in timed]
    total = sum(rollout) + sum(rest)
    share = f" ({sum(rollout) / total:.0%})" if total > 0 else ""
    caption = (f'<p class="muted">Sampling answers took {sum(rollout):,.1f} s of '
               f"{total:,.1f} s of step time{share}; the first steps include warm-up.</p>")
    return _image(_timing_figure([m["step"] for m in timed], rollout, rest),
                  "rollout and training seconds per step") + caption


def _timing_figure(steps: list[float], rollout: list[float], rest: list[float]) -> str:
    figure = Figure(figsize=(WIDE_IN, 2.2), layout="constrained")
    axes = figure.subplots()
    labels = ("sampling answers (rollout_s)", "training (step_s − rollout_s)")
    if len(steps) <= 120:
        axes.bar(steps, rollout, 0.8, color=TUNED_COLOUR, label=labels[0])
        axes.bar(steps, rest, 0.8, bottom=rollout, color=BASE_COLOUR, label=labels[1])
    else:
        tops = [a + b for a, b in zip(rollout, rest, strict=True)]
        axes.fill_between(steps, 0, rollout, color=TUNED_COLOUR, linewidth=0, label=labels[0])
        axes.fill_between(steps, rollout, tops, color=BASE_COLOUR, linewidth=0, label=labels[1])
    axes.set_title("Seconds per step")
    axes.set_xlabel("step")
    axes.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=2, borderaxespad=0.2)
    return _png(figure)


# --- one evaluation ----------------------------------------------------------------------------


def _eval_section(result: dict[str, Any]) -> str:
    models = result.get("models") if isinstance(result.get("models"), dict) else {}
    present = [role for role in ROLES if isinstance(models.get(role), dict)]
    n = f" on {_number(result['n'])} examples" if _is_number(result.get("n")) else ""
    intro = f'<p class="muted">From <code>{escape(result["file"])}</code>{escape(n)}.'
    if result.get("primary_metric"):
        intro += f" Primary metric: <b>{escape(str(result['primary_metric']))}</b>."
    intro += "</p>"
    if not present:
        return intro + _note("No model results in this file (no <code>models.base</code> or "
                             "<code>models.tuned</code>).")
    missing = [role for role in ROLES if role not in present]
    parts = [intro]
    if missing:
        parts.append(_note(f"No {missing[0]} model results in this file; only {present[0]} "
                           "is shown."))
    metric = result.get("primary_metric")
    variants = _variant_table(models, metric) if metric else []
    parts += [_metrics_block(result, models, variants), _variants_block(variants, metric),
              _confusion_block(models), _hallucination_block(models), _examples_block(models)]
    return "".join(parts)


def _metric_names(result: dict[str, Any], models: dict[str, Any]) -> list[str]:
    names = [result["primary_metric"]] if result.get("primary_metric") else []
    names += list(_dict(result, "comparison"))
    for role in ROLES:
        names += list(_dict(models, role, "metrics"))
    return list(dict.fromkeys(str(name) for name in names))


def _metrics_block(result: dict[str, Any], models: dict[str, Any],
                   variants: list[dict[str, Any]]) -> str:
    """The base-vs-tuned table, its bar chart and, beside it, the prompt-sensitivity chart."""
    names = _metric_names(result, models)
    if not names:
        return _note("No metrics in this file.")
    rows = []
    for name in names:
        cells = [f"<b>{escape(name)}</b>"]
        sizes = []
        for role in ROLES:
            entry = _dict(models, role, "metrics", name)
            cells.append(f"{_number(entry.get('value'))} "
                         f'<span class="ci">{_format_interval(entry.get("ci"))}</span>')
            sizes.append(entry.get("n"))
        cells.append(_number(next((s for s in sizes if s is not None), None)))
        cells += _comparison_cells(_get(result, "comparison", name), models, name)
        rows.append(cells)
    table = _table(["metric", "base", "tuned", "n", "Δ tuned − base", "test", ""], rows,
                   "metrics")
    charts = [_image(_metric_bar_figure(models, names), "metric values, base vs tuned")]
    if len(variants) >= 2:
        charts.append(_image(_sensitivity_figure(models, variants, result["primary_metric"]),
                             "primary metric per prompt variant"))
    return f'<h3>Metrics</h3>{table}<div class="row">{"".join(charts)}</div>'



def _comparison_cells(comparison: Any, models: dict[str, Any], name: str) -> list[str]:
    if not isinstance(comparison, dict):
        base = _get(models, "base", "metrics", name, "value")
        tuned = _get(models, "tuned", "metrics", name, "value")
        delta = tuned - base if _is_number(base) and _is_number(tuned) else None
        return [_number(delta, signed=True), "—", _badge("no test", "neutral")]
    delta = (f"{_number(comparison.get('delta'), signed=True)} <span class=\"ci\">"
             f"{_format_interval(comparison.get('ci'), signed=True)}</span>")
    test = escape(str(comparison.get("test") or ""))
    p = (escape(comparison["p_text"]) if comparison.get("p_text")
         else _p_value(comparison.get("p_value")))
    test = f"{p} <span class=\"muted\">{test}</span>"
    return [delta, test, _significance_badge(comparison)]


def _metric_bar_figure(models: dict[str, Any], names: list[str]) -> str:
    figure = Figure(figsize=(HALF_IN if len(names) <= 4 else WIDE_IN, TALL_IN),
                    layout="constrained")
    axes = figure.subplots()
    width, top = 0.38, 0.0
    for offset, role in ((-width / 2, "base"), (width / 2, "tuned")):
        positions, values, lower, upper = [], [], [], []
        for position, name in enumerate(names):
            entry = _dict(models, role, "metrics", name)
            if not _is_number(entry.get("value")):
                continue
            value = entry["value"]
            low, high = _interval(entry.get("ci")) or (value, value)
            positions.append(position + offset)
            values.append(value)
            lower.append(max(value - low, 0))
            upper.append(max(high - value, 0))
            top = max(top, high, value)
        if not values:
            continue
        axes.bar(positions, values, width, color=ROLE_COLOURS[role], label=role,
                 yerr=[lower, upper], capsize=3, error_kw={"elinewidth": 1, "ecolor": "#374151"})
        for position, value, above in zip(positions, values, upper, strict=True):
            axes.annotate(_number(value), (position, value + above), xytext=(0, 3),
                          textcoords="offset points", ha="center", fontsize=7.5,
                          color="#374151")
    axes.set_xticks(range(len(names)), names)
    axes.set_ylim(0, (top or 1) * 1.18)
    axes.set_title("Base vs tuned (whiskers: interval)")
    axes.legend(loc="lower right", bbox_to_anchor=(1, 1), ncols=2, borderaxespad=0.2)
    return _png(figure)


# --- prompt sensitivity ------------------------------------------------------------------------


def _variant_table(models: dict[str, Any], metric: str) -> list[dict[str, Any]]:
    """One row per prompt template: its metric value and parse failures for base and tuned."""
    rows: dict[str, dict[str, Any]] = {}
    for role in ROLES:
        variants = _get(models, role, "variants")
        for position, variant in enumerate(variants if isinstance(variants, list) else []):
            if not isinstance(variant, dict):
                continue
            prompt = str(variant.get("prompt", f"variant {position + 1}"))
            row = rows.setdefault(prompt, {"prompt": prompt})
            row[role] = _dict(variant, "metrics", metric)
            row[f"{role}_failures"] = _get(variant, "parse_failures", "rate")
    return list(rows.values())


def _variants_block(variants: list[dict[str, Any]], metric: str | None) -> str:
    """The prompt templates behind the sensitivity chart, with each one's metric."""
    if len(variants) < 2:
        return ("<h3>Prompt sensitivity</h3>"
                + _note("Only one prompt variant was evaluated; no sensitivity to show."))
    rows = []
    for number, row in enumerate(variants, start=1):
        cells = [f"V{number}", f"<pre class=\"prompt\">{_clip(row['prompt'], 400)}</pre>"]
        for role in ROLES:
            entry = row.get(role) or {}
            failures = row.get(f"{role}_failures")
            failed = (f'<div class="muted">{failures:.1%} unparsed</div>'
                      if _is_number(failures) and failures > 0 else "")
            cells.append(f"{_number(entry.get('value'))}{failed}")
        rows.append(cells)
    table = _table(["", "prompt template", f"base {escape(metric)}", f"tuned {escape(metric)}"],
                   rows, "variants")
    return f"<h3>Prompt variants</h3>{table}"


def _sensitivity_figure(models: dict[str, Any], variants: list[dict[str, Any]],
                        metric: str) -> str:
    figure = Figure(figsize=(HALF_IN, TALL_IN), layout="constrained")
    axes = figure.subplots()
    positions = range(1, len(variants) + 1)
    for offset, role in ((-0.08, "base"), (0.08, "tuned")):
        values = [(p, (row.get(role) or {}).get("value"), (row.get(role) or {}).get("ci"))
                  for p, row in zip(positions, variants, strict=True)]
        values = [(p, v, ci) for p, v, ci in values if _is_number(v)]
        if not values:
            continue
        spread = _dict(models, role, "sensitivity", metric)
        mean, std = spread.get("mean"), spread.get("std")
        if not (_is_number(mean) and _is_number(std)):
            numbers = [v for _, v, _ in values]
            mean = sum(numbers) / len(numbers)
            std = math.sqrt(sum((v - mean) ** 2 for v in numbers) / len(numbers))
        colour = ROLE_COLOURS[role]
        axes.axhspan(mean - std, mean + std, color=colour, alpha=0.12, linewidth=0)
        axes.axhline(mean, color=colour, linewidth=1, linestyle="--")
        bounds = [_interval(ci) or (v, v) for _, v, ci in values]
        below = [max(v - low, 0) for (_, v, _), (low, _) in zip(values, bounds, strict=True)]
        above = [max(high - v, 0) for (_, v, _), (_, high) in zip(values, bounds, strict=True)]
        axes.errorbar([p + offset for p, _, _ in values], [v for _, v, _ in values],
                      yerr=[below, above], fmt="o", color=colour, markersize=6, capsize=3,
                      elinewidth=1,
                      label=f"{role}: {_number(mean)} ± {_number(std)}")
    axes.set_xticks(list(positions), [f"V{p}" for p in positions])
    axes.set_xlim(0.5, len(variants) + 0.5)
    axes.set_title(f"{metric} per prompt variant")
    axes.legend(loc="upper left", bbox_to_anchor=(0, -0.1), ncols=2,
                title="mean ± std over variants (dashed line, band)", title_fontsize=8,
                alignment="left")
    return _png(figure)


# --- confusion, per class, hallucination -------------------------------------------------------


def _confusion_block(models: dict[str, Any]) -> str:
    matrices = [(role, _dict(models, role, "confusion")) for role in ROLES]
    matrices = [(role, c) for role, c in matrices if c]
    if not matrices:
        return ""  # tasks without classes have no confusion matrix; nothing to say
    malformed = [role for role, c in matrices if not _is_square(c.get("matrix"))]
    if malformed:
        return "<h3>Confusion matrix</h3>" + _note(
            f"The {' and '.join(malformed)} confusion matrix is not a square table of counts.")
    size = max(len(c["matrix"]) for _, c in matrices)
    panel_in = min(WIDE_IN * 0.85, max(2.6, 0.36 * size + 1.8))
    if panel_in * len(matrices) <= WIDE_IN:  # small enough to compare side by side
        charts = [_confusion_figure(matrices, panel_in)]
    else:
        charts = [_confusion_figure([pair], panel_in) for pair in matrices]
    images = "".join(_image(chart, "confusion matrix") for chart in charts)
    return f"<h3>Confusion matrix</h3>{images}{_per_class_table(models)}"


def _is_square(matrix: Any) -> bool:
    return isinstance(matrix, list) and len(matrix) > 0 and all(
        isinstance(row, list) and len(row) == len(matrix) and all(map(_is_number, row))
        for row in matrix)


def _confusion_figure(matrices: list[tuple[str, dict[str, Any]]], panel_in: float) -> str:
    """Heatmaps coloured by the share of each true class, with the counts written in."""
    figure = Figure(figsize=(panel_in * len(matrices), panel_in), layout="constrained")
    panels = figure.subplots(1, len(matrices), squeeze=False)[0]
    for axes, (role, confusion) in zip(panels, matrices, strict=True):
        matrix = confusion["matrix"]
        labels = [_short(label) for label in _list(confusion, "labels")]
        if len(labels) != len(matrix):
            labels = [str(number) for number in range(len(matrix))]
        # colour by row share, so rare classes read as clearly as common ones
        shares = [[c / max(sum(row), 1) for c in row] for row in matrix]
        axes.imshow(shares, cmap="Blues" if role == "tuned" else "Greys", vmin=0, vmax=1)
        cell_in = (panel_in - 1.8) / len(matrix)
        if cell_in >= 0.22:  # room for the numbers
            for i, row in enumerate(matrix):
                for j, count in enumerate(row):
                    axes.text(j, i, _number(count), ha="center", va="center",
                              fontsize=min(8.0, 24 * cell_in),
                              color="white" if shares[i][j] > 0.55 else "#111827")
        rotate = len(matrix) > 4 or max(map(len, labels)) > 10
        axes.set_xticks(range(len(labels)), labels, rotation=40 if rotate else 0,
                        ha="right" if rotate else "center", rotation_mode="anchor")
        axes.set_yticks(range(len(labels)), labels)
        axes.set_xlabel("predicted")
        axes.set_ylabel("true")
        axes.set_title(role)
        axes.grid(False)
        for spine in axes.spines.values():
            spine.set_visible(False)
    return _png(figure)


def _short(label: Any, limit: int = 18) -> str:
    text = str(label)
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _per_class_table(models: dict[str, Any]) -> str:
    per_class = {role: _get(models, role, "per_class") for role in ROLES}
    labels = [label for role in ROLES if isinstance(per_class[role], dict)
              for label in per_class[role]]
    if not labels:
        return ""
    rows = []
    for label in dict.fromkeys(labels):
        scores = {role: _dict(per_class, role, label) for role in ROLES}
        support = next((s.get("support") for s in scores.values() if s.get("support")), None)
        row = [f"<b>{escape(str(label))}</b>", _number(support)]
        for key in ("precision", "recall", "f1"):
            row += [_number(scores["base"].get(key)), _number(scores["tuned"].get(key))]
        rows.append(row)
    header = ["class", "support"] + [f"{key} {role}" for key in ("precision", "recall", "F1")
                                     for role in ROLES]
    return _table(header, rows, "per-class")


def _hallucination_block(models: dict[str, Any]) -> str:
    found = {role: _get(models, role, "hallucination") for role in ROLES}
    found = {role: h for role, h in found.items() if isinstance(h, dict)}
    if not found:
        return ""
    rows = [[f"<b>{role}</b>",
             f"{_number(h.get('rate'))} <span class=\"ci\">{_format_interval(h.get('ci'))}</span>",
             f"{_number(h.get('n_unsupported'))} of {_number(h.get('n_spans'))}"]
            for role, h in found.items()]
    parts = ["<h3>Hallucination</h3>", _table(
        ["model", "rate of unsupported spans", "unsupported spans"], rows, "narrow")]
    for role, hallucination in found.items():
        examples = [e for e in _list(hallucination, "examples") if isinstance(e, dict)]
        if not examples:
            continue
        examples.sort(key=lambda e: -len(_list(e, "unsupported")))
        predictions = _predictions_by_index(models, role)
        example_rows = []
        for example in examples[:5]:
            spans = [str(s) for s in _list(example, "unsupported")]
            output = _dict(predictions, _key(example.get("index"))).get("prediction")
            example_rows.append([
                _number(example.get("index")), f"<div class=\"cell\">{_clip(example.get('source'))}"
                "</div>", f"<div class=\"cell\">{_highlight(output, spans)}</div>",
                " ".join(f"<mark>{_clip(span, 120)}</mark>" for span in spans)])
        parts.append(f"<h4>Worst {role} examples</h4>" + _table(
            ["#", "source", f"{role} output", "unsupported"], example_rows, "examples fixed",
            ["5%", "40%", "33%", "22%"]))
    return "".join(parts)


def _highlight(text: Any, spans: list[str], limit: int = 600) -> str:
    """Escaped text with each unsupported span wrapped in ``<mark>``."""
    spans = sorted({span for span in spans if span}, key=len, reverse=True)
    if not isinstance(text, str) or not spans or len(text) > limit:
        return _clip(text, limit)
    pieces, last = [], 0
    for match in re.finditer("|".join(map(re.escape, spans)), text):
        pieces += [escape(text[last:match.start()]), f"<mark>{escape(match.group())}</mark>"]
        last = match.end()
    return "".join(pieces) + escape(text[last:])


# --- worst examples ----------------------------------------------------------------------------


def _predictions_by_index(models: dict[str, Any], role: str) -> dict[str, dict[str, Any]]:
    return {_key(p.get("index", i)): p for i, p in enumerate(_list(models, role, "predictions"))
            if isinstance(p, dict)}


def _key(index: Any) -> str:
    """An example index as a dict key (indices are ints, but any JSON value must work)."""
    return json.dumps(index)


def _is_wrong(prediction: dict[str, Any]) -> bool:
    score = prediction.get("score")
    if _is_number(score):
        return score < WRONG_BELOW
    return _answer(prediction) != str(prediction.get("gold", "")).strip()


def pick_examples(models: dict[str, Any], limit: int = MAX_EXAMPLES) -> list[dict[str, Any]]:
    """Examples worth reading: tuned wrong first (where base was right first), then base ≠ tuned.

    Each is ``{"index", "input", "gold", "base": prediction | None, "tuned": prediction | None}``.
    """
    base, tuned = _predictions_by_index(models, "base"), _predictions_by_index(models, "tuned")
    wrong, different = [], []
    for index in dict.fromkeys([*tuned, *base]):
        pair = {"base": base.get(index), "tuned": tuned.get(index)}
        known = pair["tuned"] or pair["base"]
        example = {"index": json.loads(index), "input": known.get("input"),
                   "gold": known.get("gold"), **pair}
        judged = pair["tuned"] or pair["base"]  # with one model only, its own mistakes
        if _is_wrong(judged):
            wrong.append(((_score(judged), -_score(pair["base"])), example))
        elif pair["base"] and pair["tuned"] and _answer(pair["base"]) != _answer(pair["tuned"]):
            different.append(((-abs(_score(pair["base"]) - _score(pair["tuned"])), 0.0), example))
    wrong.sort(key=lambda item: item[0])
    different.sort(key=lambda item: item[0])
    return [example for _, example in (wrong + different)[:limit]]


def _answer(prediction: dict[str, Any]) -> str:
    return str(prediction.get("prediction", "")).strip()


def _score(prediction: dict[str, Any] | None) -> float:
    if prediction is None:
        return 0.0
    score = prediction.get("score")
    return float(score) if _is_number(score) else float(not _is_wrong(prediction))


def _examples_block(models: dict[str, Any]) -> str:
    examples = pick_examples(models)
    title = "<h3>Worst examples side by side</h3>"
    if not examples:
        has_predictions = any(_get(models, role, "predictions") for role in ROLES)
        return title + _note("No predictions stored in this file." if not has_predictions else
                             "No wrong or differing predictions: nothing to show.")
    rows = []
    for example in examples:
        row = [_number(example["index"]), f"<div class=\"cell\">{_clip(example['input'])}</div>",
               f"<div class=\"cell\">{_clip(example['gold'], 300)}</div>"]
        for role in ROLES:
            prediction = example[role]
            if prediction is None:
                row.append('<span class="muted">—</span>')
                continue
            verdict = "bad" if _is_wrong(prediction) else "good"
            score = prediction.get("score")
            score_html = f'<div class="score {verdict}">score {score:.2g}</div>' \
                if _is_number(score) else ""
            row.append(f'<div class="cell {verdict}">{_clip(prediction.get("prediction"), 400)}'
                       f"</div>{score_html}")
        rows.append(row)
    note = (f'<p class="muted">Up to {MAX_EXAMPLES}: first where the tuned model is wrong '
            f"(score below {WRONG_BELOW}), then where base and tuned answer differently.</p>")
    return title + note + _table(["#", "input", "gold", "base output", "tuned output"], rows,
                                 "examples fixed", ["5%", "35%", "16%", "22%", "22%"])


# --- run details -------------------------------------------------------------------------------


class _ConfigDumper(yaml.SafeDumper):
    """YAML as a person writes it: multi-line strings (prompt templates) as ``|`` blocks."""


_ConfigDumper.add_representer(str, lambda dumper, text: dumper.represent_scalar(
    "tag:yaml.org,2002:str", text, style="|" if "\n" in text else None))


def _details_section(run: dict[str, Any]) -> str:
    manifest = run["manifest"]
    parts = []
    if run["config"]:
        config_text = yaml.dump(run["config"], Dumper=_ConfigDumper, sort_keys=False,
                                allow_unicode=True, default_flow_style=False, width=96)
    else:
        config_text = run["config_text"]
    parts.append("<h3>Config</h3>" + (f"<pre class=\"config\">{escape(config_text)}</pre>"
                                      if config_text.strip() else _note("No config.yaml.")))
    if manifest is None:
        parts.append(_note("No manifest.json: model, versions and data hashes are unknown."))
        return "".join(parts)
    parts.append(f'<div class="grid">{"".join(_manifest_tables(manifest))}</div>')
    if manifest.data:
        rows = [[f"<code>{escape(str(path))}</code>", f"<code>{escape(str(digest))}</code>"]
                for path, digest in manifest.data.items()]
        parts.append("<h3>Data files (sha256)</h3>" + _table(["file", "sha256"], rows, "hashes"))
    return "".join(parts)


def _manifest_tables(manifest: Manifest) -> list[str]:
    """The run's facts, then the model, data report and versions, each as a two-column table."""
    run_facts = {"status": manifest.status, "device": manifest.device, "seed": manifest.seed,
                 "total_steps": manifest.total_steps, "warmup_steps": manifest.warmup_steps,
                 "final_train_loss": manifest.final_train_loss}
    tables = []
    for title, values in (("Run", {key: value for key, value in run_facts.items()
                                   if value is not None}),
                          ("Model", manifest.model), ("Data report", manifest.data_report),
                          ("Versions", manifest.versions)):
        rows = [[escape(str(name)), _number(value) if _is_number(value) else _clip(value, 200)]
                for name, value in values.items()]
        if rows:
            tables.append(f"<div><h3>{title}</h3>{_table(['', ''], rows, 'kv')}</div>")
    return tables


CSS = """
:root { --accent: #2563eb; --base: #9ca3af; --ink: #111827; --muted: #6b7280; --line: #e5e7eb;
  --page: #f6f7f9; --good: #15803d; --bad: #b91c1c; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--page); color: var(--ink);
  font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial,
  "Noto Sans", "Liberation Sans", sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 28px 24px 48px; }
code, pre { font-family: ui-monospace, SFMono-Regular, Menlo, Consolas, "Liberation Mono",
  monospace; font-size: 0.86em; }
header { background: #fff; border: 1px solid var(--line); border-radius: 12px;
  padding: 24px 28px 20px; }
.title { display: flex; align-items: center; gap: 12px; flex-wrap: wrap; }
h1 { font-size: 26px; margin: 0; letter-spacing: -0.01em; overflow-wrap: anywhere; }
h2 { font-size: 19px; margin: 0 0 14px; }
h3 { font-size: 15px; margin: 22px 0 8px; color: #374151; }
h4 { font-size: 13.5px; margin: 16px 0 6px; color: #374151; }
.muted { color: var(--muted); }
header > p.muted { margin: 2px 0 10px; font-size: 13px; }
dl.facts { display: grid; grid-template-columns: 1fr; gap: 4px; margin: 0 0 18px; }
dl.facts div { display: flex; gap: 12px; }
dl.facts dt { width: 64px; flex: none; color: var(--muted); font-size: 13px; padding-top: 1px; }
dl.facts dd { margin: 0; overflow-wrap: anywhere; }
.cards { display: grid; grid-template-columns: repeat(auto-fit, minmax(230px, 1fr)); gap: 12px;
  margin-top: 12px; }
.cards.cost { grid-template-columns: repeat(auto-fit, minmax(170px, 1fr)); }
.cards.cost .value { font-size: 18px; }
.card { border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px;
  background: #fbfbfc; }
.card .label { font-size: 11.5px; text-transform: uppercase; letter-spacing: 0.06em;
  color: var(--muted); overflow-wrap: anywhere; }
.card .value { font-size: 22px; font-weight: 650; margin: 2px 0; font-variant-numeric:
  tabular-nums; white-space: nowrap; }
.card .sub { font-size: 12px; color: var(--muted); overflow-wrap: anywhere; }
nav { margin: 16px 4px; font-size: 13.5px; display: flex; flex-wrap: wrap; gap: 6px 18px; }
nav a { color: var(--accent); text-decoration: none; }
section { background: #fff; border: 1px solid var(--line); border-radius: 12px;
  padding: 20px 28px 24px; margin-top: 16px; }
img.plot { display: block; max-width: 100%; height: auto; margin: 8px 0; }
.row { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr));
  gap: 8px 24px; align-items: start; }
table { border-collapse: collapse; width: 100%; font-size: 13.5px; margin: 6px 0 10px;
  font-variant-numeric: tabular-nums; }
th { text-align: left; font-weight: 600; color: var(--muted); font-size: 12px;
  border-bottom: 1px solid var(--line); padding: 6px 10px 6px 0; }
td { border-bottom: 1px solid #f0f1f3; padding: 7px 10px 7px 0; vertical-align: top; }
table.narrow { width: auto; min-width: 50%; }
table.kv td:first-child { color: var(--muted); padding-right: 24px; white-space: nowrap; }
table.kv td { overflow-wrap: break-word; }
table.examples td { font-size: 13px; }
table.examples td:first-child, table.variants td:first-child { color: var(--muted);
  width: 36px; }
table.fixed { table-layout: fixed; }
.cell { white-space: pre-wrap; overflow-wrap: break-word; max-height: 180px; overflow: auto; }
.cell.bad { border-left: 3px solid #fca5a5; padding-left: 8px; }
.cell.good { border-left: 3px solid #86efac; padding-left: 8px; }
.score { font-size: 11.5px; margin-top: 3px; padding-left: 11px; }
.score.bad { color: var(--bad); } .score.good { color: var(--good); }
.ci { color: var(--muted); font-size: 12px; white-space: nowrap; }
.badge { display: inline-block; font-size: 11.5px; font-weight: 600; padding: 1px 9px;
  border-radius: 999px; white-space: nowrap; }
.badge.good { background: #dcfce7; color: var(--good); }
.badge.bad { background: #fee2e2; color: var(--bad); }
.badge.neutral { background: #f1f2f4; color: #4b5563; }
pre { background: #f8f9fb; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px;
  overflow: auto; margin: 0; }
pre.prompt { background: none; border: 0; padding: 0; white-space: pre-wrap;
  overflow-wrap: anywhere; }
pre.config { max-height: 520px; }
mark { background: #fee2e2; color: var(--bad); border-radius: 3px; padding: 0 2px; }
.note { color: var(--muted); font-style: italic; margin: 8px 0; }
.warning { background: #fff7ed; border: 1px solid #fed7aa; border-radius: 8px; padding: 6px 12px;
  color: #9a3412; font-size: 13.5px; }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(340px, 1fr)); gap: 0 40px; }
table.hashes td { overflow-wrap: anywhere; }
footer { color: var(--muted); font-size: 12px; margin-top: 20px; text-align: center; }
"""
