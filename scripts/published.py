"""Published numbers, rendered from the committed result files that hold them.

Every benchmark or example figure in the project's Markdown lives in a block

    <!-- published: KIND path/to/result.json -->
    ...text rendered from that file...
    <!-- /published -->

and is rendered by ``RENDERERS[KIND]`` from the result file, a path relative to the repository
root. ``python scripts/published.py --check`` fails when a block differs from what its result
file says, when a result file lacks its provenance (command, git commit, machine, load), or when a
performance figure (a ratio like ``2.7×``, a rate in tokens/s, a size in GB/GiB) is written
outside a block. ``--write`` re-renders every block in place after a new result is committed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCUMENTS = ["README.md", "benchmarks/README.md", "docs/DESIGN.md", "docs/*.md",
             "examples/*/README.md", "examples/*/*/README.md"]
# Pages generated from the code and checked by their own script (scripts/config_reference.py
# --check): the configuration reference quotes the schema's field descriptions, whose sizes are
# arithmetic (a loss chunk's logits), not measurements, so its prose is not scanned for figures.
GENERATED = ("docs/configuration.md",)
BLOCK = re.compile(r"<!-- published: (?P<kind>\w+) (?P<path>\S+) -->\n(?P<body>.*?)"
                   r"<!-- /published -->", re.S)
# A measured figure: "2.7×", "150 tokens/s", "7.4 GB", "0.62 GiB", "+1.1%", "22 s → 8.5 s",
# "7.05 → 0.22", "p = 4e-5".
FIGURE = re.compile(r"\d[\d.,]*(×|\s*(tokens/s|tok/s|GB\b|GiB\b))|[+−-]\d+(\.\d+)?%"
                    r"|\d\s*s?\s*→\s*\d|\bp = \d")
PROVENANCE_KEYS = ("command", "git_commit", "machine")


# --- renderers: result file → Markdown -----------------------------------------------------


def _gib(value: float) -> str:
    return f"{value / 2**30:.2f} GiB"


def _machine(result: dict) -> str:
    """``a 2-core AMD EPYC`` or ``one NVIDIA H200 GPU (16-core ... host)``."""
    machine = result["machine"]
    where = f"a {machine['cpu_cores']}-core {machine['cpu']}"
    return f"one {machine['gpu']} GPU ({where[2:]} host)" if machine.get("gpu") else where


def _origin(result: dict) -> str:
    machine = result["machine"]
    load = f"load average {machine['load_average_at_start'][0]}"
    if "load_average_at_end" in machine:
        load += f"→{machine['load_average_at_end'][0]}"
    return (f"`{result['command']}` at commit `{result['git_commit'][:10]}` on "
            f"{_machine(result)} (torch {machine['torch']}), {load}")


def _short_origin(result: dict) -> str:
    """Where and at which commit, for a one-line headline (the full line is on the doc page)."""
    machine = result["machine"]
    where = (f"one {machine['gpu']} GPU" if machine.get("gpu")
             else f"{machine['cpu_cores']} CPU cores")
    return f"Measured on {where} at commit `{result['git_commit'][:10]}`."


def render_assess(result: dict) -> str:
    """tunelab assess: the learning curve (image; points per seed with intervals), every
    prompting arm, the fit beside "no further gain", the comparisons the verdict rests on,
    forgetting, and the wall time per phase when the run was timed alone."""
    assess = json.loads((ROOT / result["assess"]).read_text())
    metric, scale = assess["primary_metric"], assess["metric_scale"]
    value = (lambda v: f"{v:.1f}") if scale > 1 else (lambda v: f"{v:.3f}")
    signed = (lambda v: f"{v:+.1f}") if scale > 1 else (lambda v: f"{v:+.3f}")

    def cell(point: dict, show=value) -> str:
        ci = point.get("ci")
        return show(point["value"]) + (f" [{show(ci[0])}, {show(ci[1])}]" if ci else "")

    baselines = assess["baselines"]
    lines = [f"![learning curve of {assess['name']}]({result['curve']})", "",
             f"**Verdict: {assess['verdict']['kind']}.** {assess['verdict']['text']}", "",
             f"| {metric} on {assess['n_test']} test examples | value [95% interval] |",
             "|---|---|"]
    for arm in baselines["arms"]:
        marks = [mark for mark, on in (("chosen on validation", arm["name"] == baselines["chosen"]),
                                       ("strongest on test",
                                        arm["name"] == baselines["strongest_on_test"])) if on]
        chosen = arm["validation"][arm["chosen_variant"]]
        lines.append(f"| {arm['name']}" + (f" ({', '.join(marks)})" if marks else "")
                     + f": prompt `{_one_line(arm['prompt'])}` (validation "
                     f"{value(chosen['value'])}) | {cell(arm['test'])}{_unparsed(arm)} |")
    for point in assess["learning_curve"]:
        seeds = point["seeds"]
        each = (f", seeds {' / '.join(value(v) for v in seeds['values'])}"
                if seeds["n_seeds"] > 1 else ", 1 seed")
        trust = ("; not trusted: " + "; ".join(sorted({r["kind"] for r in point["distrust"]}))
                 if point.get("distrust") else "")
        lines.append(f"| tuned on {point['n_examples']:,} examples (mean{each}{trust}) | "
                     f"{cell(point)} |")
    fit = assess["fit"]
    if fit:
        form = fit["form"]["name"] if isinstance(fit.get("form"), dict) else fit.get("form")
        for label, point in fit["predicted"].items():
            lines.append(f"| predicted at {label} the data ({point['n']:,} examples; {form}) | "
                         f"{cell(point)} |")
        lines.append(f"| no further gain (persistence) at any size | "
                     f"{cell(fit['persistence'])} |")
        lines.append(f"| gain per doubling of the data ({form}) | "
                     f"{cell(fit['gain_per_doubling'], signed)} |")
    for name, delta in assess["tuned_vs_arms"].items():
        lines.append(f"| tuned on all data − {name} (paired) | {cell(delta, signed)} |")
    notes = [f"Intervals: {assess['interval_method']}."]
    left_out = [p for p in assess["learning_curve"] if p.get("distrust")]
    if left_out:
        notes.append("Left out of the fit, not trusted: " + "; ".join(
            f"{p['n_examples']:,} examples ({p['distrust'][0]['text']})" for p in left_out)
            + ".")
    if fit:
        notes += [f"Curve: {flag['text'].rstrip('.')}." for flag in fit.get("flags", [])]
    forgetting = _assess_forgetting(assess)
    if forgetting:
        notes.append(forgetting)
    return ("\n".join(lines) + "\n\n" + " ".join(notes) + "\n\n" + _assess_time(result, assess)
            + "\n")


def _unparsed(arm: dict) -> str:
    """The share of an arm's test answers that parsed to no answer at all, where there were."""
    rate = arm.get("parse_failure_rate")
    return f" ({rate:.0%} of its answers not an answer)" if rate else ""


def _assess_forgetting(assess: dict) -> str:
    """What the all-data runs cost outside the task, per seed."""
    largest = max(entry["n_examples"] for entry in assess.get("forgetting", [{"n_examples": 0}]))
    rows = [entry for entry in assess.get("forgetting", [])
            if entry["n_examples"] == largest and entry.get("general_loss")]
    if not rows:
        return ""
    seeds = assess["learning_curve"][-1]["seeds"]["seeds"]  # the runs' order is the seeds'
    parts = []
    for entry, seed in zip(rows, seeds, strict=False):
        loss, probe = entry["general_loss"], entry.get("probe_task") or {}
        text = (f"general-text loss {loss['base']:.3f} → {loss['tuned']:.3f} "
                f"({loss['delta']:+.3f} [{loss['ci'][0]:+.3f}, {loss['ci'][1]:+.3f}])")
        if probe:
            text += (f", {probe['name']} {probe['metric']} {probe['base']:.3f} → "
                     f"{probe['tuned']:.3f} ({probe['delta']:+.3f} [{probe['ci'][0]:+.3f}, "
                     f"{probe['ci'][1]:+.3f}])")
        parts.append(f"seed {seed}: {text}")
    return (f"Outside the task (forgetting), tuned on all {largest:,} examples against the base "
            "model, paired: " + "; ".join(parts) + ".")


def _assess_time(result: dict, assess: dict) -> str:
    """Wall time of the command and of its phases, published only for a run timed alone."""
    if not result.get("measured_alone"):
        return (f"Run by {_origin(result)}, not alone on the machine: its wall time is not "
                "published.")
    phases = assess["time"]["phases_s"]
    groups = {"prompting arms": "prompting", "training": "train ",
              "evaluating the tuned runs": "evaluate ", "forgetting": "forgetting",
              "fit, cost and complexity": "fit"}
    spent = {label: sum(s for name, s in phases.items() if name.startswith(prefix))
             for label, prefix in groups.items()}
    spent["start-up, model loads and reading data"] = result["wall_s"] - sum(spent.values())
    parts = ", ".join(f"{label} {_minutes(seconds)}" for label, seconds in spent.items())
    return (f"Wall time of the whole command: **{_minutes(result['wall_s'])}** ({parts}), run "
            f"alone. Measured by {_origin(result)}.")


def _one_line(text: str | None) -> str:
    return "(the data's prompt)" if text is None else text.replace("\n", "⏎")


def render_calibration(result: dict) -> str:
    """benchmarks/assess_calibration.py: how often the fit's intervals held what more data
    measured, and its errors beside the old line, two points and "no further gain"."""
    methods = ("curve", "log-linear (old)", "two-point", "persistence")
    names = {"curve": "tunelab's fit", "log-linear (old)": "old straight line",
             "two-point": "last two points", "persistence": "no further gain"}

    def rows(summary: dict, cuts: list[str], error_unit: str) -> list[str]:
        lines = []
        for cut in cuts:
            entry = summary[cut]
            for method in methods:
                m = entry.get(method)
                if not m:
                    continue
                coverage = (f"{m['coverage']:.0%} of {m['n_intervals']}"
                            if m.get("coverage") is not None and m.get("n_intervals") else "—")
                ratio = m.get("gain_ratio_median")
                lines.append(f"| {cut} | {names[method]} | {m['median_abs_error']:.3g}"
                             f"{error_unit} | {'—' if ratio is None else f'{ratio:.2f}'} | "
                             f"{m['gain_within_25pct']:.0%} | {coverage} |")
        return lines

    header = ["| fitted on (cases) | method | median \\|error\\| | predicted / true gain "
              "(median) | gain within ±25% | 95% intervals holding the outcome |",
              "|---|---|---|---|---|---|"]
    published = result["published"]
    cuts = [cut for cut in ("1/4 last 4", "1/2 last 4") if cut in published["summary"]]
    lines = ["Published loss curves (Lin et al., ICML 2024: "
             f"{published['summary'][cuts[0]]['n_cases']} model × dataset curves; the loss at "
             "the largest size predicted from the sizes up to 1/4 or 1/2 of it):", "", *header,
             *rows(published["summary"], cuts, "")]
    assessments = result["assessments"]
    kind = "synthetic assessments" if assessments.get("synthetic") else "tunelab assessments"
    cuts = [cut for cut in ("1/4 all", "1/2 all") if cut in assessments["summary"]]
    if cuts:
        n_cases = assessments.get("n_cases") or assessments["summary"]["all"]["n_cases"]
        lines += ["", f"{kind.capitalize()} ({n_cases} cases; fit on the "
                  "fractions up to 1/4 or 1/2, each seed's all-data value predicted):", "",
                  *header, *rows(assessments["summary"], cuts, "")]
    goals = "; ".join(_goal(goal) for goal in result["goals"])
    return "\n".join(lines) + f"\n\nGoals: {goals}. Measured by {_origin(result)}.\n"


def headline_assess_budget(result: dict) -> str:
    """What the default assessment costs on this machine: its measured wall time, by phase."""
    assess = json.loads((ROOT / result["assess"]).read_text())
    seeds = "/".join(str(p["seeds"]["n_seeds"]) for p in assess["learning_curve"])
    arms = ", ".join(arm["name"] for arm in assess["baselines"]["arms"])
    return (f"The default assessment of `{assess['name']}` ({arms}; "
            f"{len(assess['learning_curve'])} fractions with {seeds} training seeds): "
            + _assess_time(result, assess) + "\n")


def headline_calibration(result: dict) -> str:
    """How often the assessment's fit held what more data measured, in one paragraph."""
    lin = result["published"]["summary"]["1/4 last 4"]
    curve, old = lin["curve"], lin["log-linear (old)"]
    text = (f"Its curve fit, checked against larger runs (`benchmarks/assess_calibration.py`): "
            f"from a quarter of the data to all of it on {lin['n_cases']} published fine-tuning "
            f"loss curves (Lin et al., ICML 2024), 95% intervals held the outcome "
            f"**{curve['coverage']:.0%}** of the time, median error {curve['median_abs_error']:.3g}"
            f" (the old straight line {old['median_abs_error']:.3g}), predicted/true gain "
            f"{curve['gain_ratio_median']:.2f}")
    assessments = result["assessments"]
    if not assessments.get("synthetic") and "all" in assessments["summary"]:
        own = assessments["summary"]["all"]["curve"]
        text += (f"; on tunelab's own assessments ({assessments['summary']['all']['n_cases']} "
                 "cases) "
                 f"{own['coverage']:.0%}, median error {own['median_abs_error']:.3g}")
    return f"{text}. {_short_origin(result)}\n"


def _goal(goal: dict) -> str:
    outcome = "met" if goal["met"] else f"missed by {abs(goal['by']):.3g}"
    return (f"{goal['goal']}: {goal['value']:.3g}{goal.get('unit') or ''} against "
            f"{goal['target']:g} ({outcome})")


def render_throughput(result: dict) -> str:
    """tunelab vs transformers.Trainer + peft: tokens/s, peak memory, final loss."""
    base, ours = result["summary"]["baseline"], result["summary"]["tunelab"]
    ratios = result["summary"]["ratios"]
    workload, data = result["workload"], result["data"]
    repeats = workload["repeats"]
    positions = {row["side"]: (row["processed_tokens"], row["non_padding_tokens"])
                 for row in result["runs"]}
    return (
        "| | HF Trainer + peft | tunelab | ratio |\n"
        "|---|---|---|---|\n"
        f"| non-padding tokens/s | {base['tokens_per_second']:.1f} | "
        f"{ours['tokens_per_second']:.1f} | **{ratios['tokens_per_second']:.2f}×** |\n"
        f"| peak memory (RSS) | {_gib(base['peak_memory_bytes'])} | "
        f"{_gib(ours['peak_memory_bytes'])} | **{ratios['peak_memory']:.2f}×** |\n"
        f"| final training loss | {base['final_loss']:.5f} | {ours['final_loss']:.5f} | "
        f"relative difference {abs(ratios['final_loss_relative_difference']):.1e} |\n\n"
        f"{workload['steps']} optimizer steps of {workload['per_step']} examples (median "
        f"{data['median_tokens']:.0f}, max {data['max_tokens']} tokens), median of {repeats} "
        f"alternating runs a side; the baseline computes {positions['baseline'][0]:,} token "
        f"positions for {positions['baseline'][1]:,} real tokens, tunelab "
        f"{positions['tunelab'][0]:,}. Measured by {_origin(result)}.\n")


_SIDE_HEADINGS = {"hf_padded": "Trainer + peft, padding collator",
                  "hf_flattened": "Trainer + peft, `DataCollatorWithFlattening`",
                  "tunelab": "tunelab"}


def render_baselines(result: dict) -> str:
    """tunelab.train against transformers.Trainer + peft with the padding collator and with
    DataCollatorWithFlattening, per length distribution; the issue's target against the
    padding-free Trainer (≥ 1.15× tokens/s, ≤ 0.6× peak memory) said met or not."""
    parts, verdicts = [], []
    memory_label = ("peak memory (CUDA)" if result["runs"][0]["peak_memory_kind"]
                    .startswith("cuda") else "peak memory (RSS)")
    for name, summary in result["summary"].items():
        parts.append(_baselines_table(name, summary, result["data"][name],
                                      result["workload"]["per_step"], memory_label))
        flat = summary["tunelab_vs"]["hf_flattened"]
        speed, memory = flat["tokens_per_second"], flat["peak_memory"]
        verdicts.append(f"{name}: {speed:.2f}× tokens/s ({'met' if speed >= 1.15 else 'not met'})"
                        f", {memory:.2f}× peak memory ({'met' if memory <= 0.6 else 'not met'})")
    repeats = result["workload"]["repeats"]
    attention = {row["attention"] for row in result["runs"] if row["side"] == "hf_flattened"}
    return ("\n\n".join(parts) + "\n\nTarget against the padding-free Trainer, ≥ 1.15× its "
            "tokens/s and ≤ 0.6× its peak memory: " + "; ".join(verdicts) + ". "
            f"{result['model']['parameters'] / 1e6:.0f}M-parameter Llama (random weights), "
            f"LoRA r={result['lora']['r']} on all linear layers; the flattening Trainer runs "
            f"attention `{', '.join(sorted(attention))}` with the block mask transformers builds "
            f"from the restarting position ids. "
            + (f"Median of {repeats} alternating runs a side" if repeats > 1 else
               "One run a side, alternating") + ", each a fresh process. "
            + _utilisation(result) + f"Measured by {_origin(result)}.\n")


def _utilisation(result: dict) -> str:
    """Model FLOPs utilisation per side, where the run measured it (GPU runs)."""
    mfu = result.get("model_flops_utilisation")
    if not mfu:
        return ""
    cells = "; ".join(f"{name}: " + ", ".join(f"{_SIDE_HEADINGS[side]} {value:.1%}"
                                              for side, value in sides.items())
                      for name, sides in mfu.items())
    peak = result.get("peak_tflops", 989.0)  # the script's --peak-tflops default (H100/H200)
    return f"Model FLOPs utilisation (of a {peak:.0f} TFLOP/s bf16 peak): {cells}. "


def _baselines_table(name: str, summary: dict, data: dict, per_step: int,
                     memory_label: str) -> str:
    sides = ("hf_padded", "hf_flattened", "tunelab")
    ratios = summary["tunelab_vs"]

    def row(label: str, cells: list[str], ratio_cells: list[str]) -> str:
        return f"| {label} | " + " | ".join(cells + ratio_cells) + " |"

    lines = [
        f"**{name.capitalize()} lengths**: {data['examples']} examples, {data['tokens']:,} "
        f"tokens (median {data['median_tokens']:.0f}, {data['min_tokens']}–{data['max_tokens']})"
        f", each seen once; the Trainer takes {per_step} examples a step "
        f"({summary['hf_padded']['steps']:.0f} steps), tunelab up to "
        f"{data['tunelab_batch_tokens']:,} tokens a step ({summary['tunelab']['steps']:.0f} "
        "steps).", "",
        "| | " + " | ".join(_SIDE_HEADINGS[side] for side in sides)
        + " | tunelab ÷ padding | tunelab ÷ flattening |", "|---" * 6 + "|",
        row("non-padding tokens/s", [f"{summary[s]['tokens_per_second']:.1f}" for s in sides],
            [f"**{ratios[s]['tokens_per_second']:.2f}×**" for s in sides[:2]]),
        row(memory_label, [_gib(summary[s]["peak_memory_bytes"]) for s in sides],
            [f"**{ratios[s]['peak_memory']:.2f}×**" for s in sides[:2]]),
        row("training loss, last quarter of the tokens",
            [f"{summary[s]['last_quarter_loss']:.4f}" for s in sides],
            [f"{ratios[s]['last_quarter_loss_relative_difference']:+.2%}" for s in sides[:2]]),
        row("token positions computed", [f"{summary[s]['processed_tokens']:,.0f}" for s in sides],
            ["", ""]),
    ]
    return "\n".join(lines)


def render_levers(result: dict) -> str:
    """tunelab.train with each lever switched from the default alone: tokens/s, peak memory and
    loss, each against the default row."""
    rows = result["runs"]
    reference = rows[0]
    lines = ["| lever switched (from the default) | tokens/s | × default | tokens/s, median step "
             "| peak RSS | × default | training loss, last quarter of the tokens |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['lever']} | {row['tokens_per_second']:.1f} | "
                     f"{row['tokens_per_second'] / reference['tokens_per_second']:.2f} | "
                     f"{row['tokens_per_second_median_step']:.1f} | "
                     f"{_gib(row['peak_memory_bytes'])} | "
                     f"{row['peak_memory_bytes'] / reference['peak_memory_bytes']:.2f} | "
                     f"{row['last_quarter_loss']:.4f} |")
    data = next(iter(result["data"].values()))
    repeats = result["workload"]["repeats"]
    return ("\n".join(lines) + f"\n\n`tunelab.train` on {data['examples']} instruction examples "
            f"of skewed length ({data['tokens']:,} tokens, median {data['median_tokens']:.0f}, max "
            f"{data['max_tokens']}), batch_tokens {data['tunelab_batch_tokens']:,} "
            f"({reference['steps']} steps), a {result['model']['parameters'] / 1e6:.0f}M-parameter "
            f"Llama with LoRA r={result['lora']['r']} on all linear layers; each row a fresh "
            f"process, {repeats} run{'s' if repeats > 1 else ''} a row"
            f"{' (median)' if repeats > 1 else ''}. Measured by {_origin(result)}.\n")


def render_plan_check(result: dict) -> str:
    """tunelab plan's predicted peak memory and tokens/s against measured training runs."""
    lines = ["| configuration | predicted peak | measured peak | error | predicted tokens/s | "
             "measured tokens/s | error |", "|---|---|---|---|---|---|---|"]
    for row in result["runs"]:
        predicted, measured = (row["predicted_tokens_per_second"],
                               row["measured_tokens_per_second"])
        lines.append(f"| {row['configuration']} | {_gib(row['predicted_peak_bytes'])} | "
                     f"{_gib(row['measured_peak_bytes'])} | {row['error']:+.1%} | "
                     f"{predicted:,.0f} | {measured:,.0f} | {predicted / measured - 1:+.0%} |")
    return ("\n".join(lines) + "\n\nTokens/s: the whole run of each configuration, 3 optimizer "
            "steps, the first (slower: one-off allocations) included. "
            f"Measured by {_origin(result)}.\n")


def render_train_memory(result: dict) -> str:
    """The example's training under each memory setting: peak RSS, tokens/s, validation loss,
    each against the first row (the loop before the levers); the median over rounds."""
    rows: dict[str, list[dict]] = {}
    for run in result["runs"]:
        rows.setdefault(run["row"], []).append(run)

    def median(runs: list[dict], key: str) -> float:
        values = sorted(run[key] for run in runs)
        return values[len(values) // 2] if len(values) % 2 else sum(
            values[len(values) // 2 - 1:len(values) // 2 + 1]) / 2

    first = next(iter(rows.values()))

    def measured_with(runs: list[dict]) -> tuple[str, str]:
        return runs[0].get("command", result["command"]), runs[0].get("git_commit",
                                                                        result["git_commit"])

    lines = ["| setting | peak RSS (predicted) | tokens/s | validation loss after |",
             "|---|---|---|---|"]
    for runs in rows.values():
        peak, speed = median(runs, "measured_peak_rss_bytes"), median(runs, "tokens_per_second")
        # Speed against the first row only where both ran in the same command: tokens/s of
        # runs measured on other days on this shared machine do not compare.
        ratio = (f" ({speed / median(first, 'tokens_per_second'):.2f}×)"
                 if measured_with(runs) == measured_with(first) else "")
        lines.append(
            f"| {runs[0]['title']} | {_gib(peak)} ({_gib(median(runs, 'predicted_peak_bytes'))}) "
            f"| {speed:.1f}{ratio} | {median(runs, 'val_loss_after'):.4f} |")
    rounds = len(first)
    earlier: dict[tuple[str, str], list[str]] = {}
    for runs in rows.values():
        command, commit = measured_with(runs)
        if commit != result["git_commit"]:
            earlier.setdefault((command, commit), []).append(runs[0]["title"])
    kept = "".join(f" Rows {', '.join(f'“{title}”' for title in titles)}: kept from "
                   f"`{command}` at commit `{commit[:10]}`." for (command, commit), titles
                   in earlier.items())
    return ("\n".join(lines) + f"\n\n`tunelab train {result['config']}` "
            f"({first[0]['steps']} optimizer steps), each row a fresh process, rows "
            f"alternating, {rounds} round"
            f"{'s' if rounds > 1 else ''} (median). Measured by {_origin(result)}.{kept}\n")


def render_generation(result: dict) -> str:
    """Batched generation against one generate call per example."""
    return (f"{result['prompts']} prompts, {result['max_new_tokens']} new tokens, greedy: "
            f"{result['naive_s']:.1f} s → {result['batched_s']:.1f} s, "
            f"**{result['speedup']:.1f}× faster** ({result['naive_tokens_per_s']:.0f} → "
            f"{result['batched_tokens_per_s']:.0f} new tokens/s), identical outputs "
            f"{result['identical_outputs']}. Measured by {_origin(result)}.\n")


def render_example_train(result: dict) -> str:
    """An example's training run: validation loss before and after, steps, speed, wall time."""
    manifest = result["manifest"]
    return (
        "| | |\n|---|---|\n"
        f"| validation loss | {manifest['val_loss_before']:.2f} → "
        f"{manifest['val_loss_after']:.2f} |\n"
        f"| training | {manifest['steps']} optimizer steps, "
        f"{manifest['tokens_per_second']:.0f} tokens/s ({manifest['device']}) |\n"
        f"| wall time, `tunelab train` | {_minutes(result['wall_s']['train'])} |\n\n"
        f"Measured by {_origin(result)}.\n")


def render_example_eval(result: dict) -> str:
    """An example's base-vs-tuned table with intervals and prompt sensitivity."""
    evaluation = result["eval"]
    models, comparison = evaluation["models"], evaluation["comparison"]
    primary = evaluation["primary_metric"]
    lines = [f"| metric (n = {evaluation['n']}) | base | tuned | tuned − base |",
             "|---|---|---|---|"]
    for name in models["tuned"]["metrics"]:
        cells = [_interval(models[which]["metrics"][name]) for which in ("base", "tuned")]
        entry = comparison.get(name, {})
        delta = f"{entry['delta']:+.3f}" if entry else ""
        if entry.get("ci"):  # a metric without a paired test (macro-F1) has none
            delta += (f" [{entry['ci'][0]:+.3f}, {entry['ci'][1]:+.3f}], "
                      f"{entry['test']} {_p(entry)}")
        lines.append(f"| {name} | {cells[0]} | {cells[1]} | {delta} |")
    spreads = [models[which]["sensitivity"][primary] for which in ("base", "tuned")]
    if spreads[0]["n_variants"] > 1:
        cells = [f"{s['mean']:.3f} ± {s['std']:.3f} ({s['min']:.3f}–{s['max']:.3f})"
                 for s in spreads]
        lines.append(f"| {primary} over {spreads[0]['n_variants']} prompt wordings | "
                     f"{cells[0]} | {cells[1]} | |")
    return ("\n".join(lines) + f"\n\nWall time of `tunelab eval`: "
            f"{_minutes(result['wall_s']['eval'])}. Measured by {_origin(result)}.\n")


def render_example_forms(result: dict) -> str:
    """An example trained and evaluated in its chat form (``examples/<name>/chat``) against its
    template form (``examples/<name>/results/result.json``): validation loss, the primary metric
    of base and tuned with intervals, and whether each tuned value lies in the other's interval."""
    template = json.loads((ROOT / Path(result["example"]).parent / "results" / "result.json"
                           ).read_text())
    primary = result["eval"]["primary_metric"]
    lines = [f"| form (n = {result['eval']['n']} test) | validation loss | {primary}, base | "
             f"{primary}, tuned | tuned − base |", "|---|---|---|---|---|"]
    tuned = {}
    for form, run in (("template", template), ("chat", result)):
        models, manifest = run["eval"]["models"], run["manifest"]
        entry = run["eval"]["comparison"][primary]
        tuned[form] = models["tuned"]["metrics"][primary]
        lines.append(f"| {form} (`{run['example']}`) | {manifest['val_loss_before']:.2f} → "
                     f"{manifest['val_loss_after']:.2f} | "
                     f"{_interval(models['base']['metrics'][primary])} | "
                     f"{_interval(tuned[form])} | {entry['delta']:+.3f} "
                     f"[{entry['ci'][0]:+.3f}, {entry['ci'][1]:+.3f}], {entry['test']} "
                     f"{_p(entry)} |")

    def inside(value: dict, interval: dict) -> str:
        low, high = interval["ci"]
        return "inside" if low <= value["value"] <= high else "outside"

    return ("\n".join(lines) + f"\n\nThe chat form's tuned {primary} lies "
            f"{inside(tuned['chat'], tuned['template'])} the template form's interval, and the "
            f"template form's {inside(tuned['template'], tuned['chat'])} the chat form's. "
            f"Chat form measured by {_origin(result)}; template form by {_origin(template)}.\n")


def render_sweep(result: dict) -> str:
    """A sweep's trials ranked with intervals, the best against the base config on test, and
    what pruning saved against the same sweep run without it."""
    entries = list(result["sweeps"].values())
    pruned = next(entry for entry in entries if entry["spec"]["pruner"] != "none")
    unpruned = next((entry for entry in entries if entry["spec"]["pruner"] == "none"), None)
    spec, metric = pruned["spec"], pruned["metric"]
    keys = list(spec["space"])
    lines = ["| # | trial | " + " | ".join(f"`{key}`" for key in keys)
             + f" | validation {metric} [95% CI] | steps trained |",
             "|---" * (len(keys) + 4) + "|"]
    for rank, trial in enumerate(_ranked(pruned["trials"], pruned["direction"]), start=1):
        outcome = _outcome(trial, pruned["direction"])
        lines.append(f"| {rank} | {trial['number']} | "
                     + " | ".join(_param(trial["params"].get(key)) for key in keys)
                     + f" | {outcome} | {trial['steps_trained']} of {trial['max_steps']} |")
    text = [f"{len(pruned['trials'])} trials, {pruned['workers']} workers, sampler "
            f"{spec['sampler']} (seed {spec['seed']}), {spec['pruner']} pruning on the validation "
            f"loss; `tunelab sweep {pruned['sweep_file']} --workers {pruned['workers']}` took "
            f"{_minutes(pruned['wall_s']['sweep_command'])} (trials "
            f"{_minutes(pruned['wall_s']['trials'])} from the first trial's start to the last "
            f"one's end; the rest is starting the workers and the final word: training the base "
            f"config and scoring it and the best trial on test).\n",
            "\n".join(lines) + "\n", _final_word(pruned["final"])]
    caveat = _pruned_a_better_trial(pruned)
    if caveat:
        text.append(caveat)
    if unpruned:
        text.append(_pruning_saving(pruned, unpruned))
    text.append(f"Measured by {_origin(pruned)}"
                + (f"; without pruning by {_origin(unpruned)}" if unpruned else "") + ".\n")
    return "\n".join(text)


def _outcome(trial: dict, direction: str) -> str:
    """The objective with its interval; for a pruned trial, the loss that stopped it."""
    if trial["state"] == "complete":
        return _interval(trial) if trial["ci"] else f"{trial['value']:.4f}"
    if trial["state"] == "pruned" and trial["reported"]:
        step, reported = list(trial["reported"].items())[-1]
        loss = -reported if direction == "maximize" else reported  # pruning saw −loss
        return f"pruned at step {step} (validation loss {loss:.3f})"
    return trial["state"]


def _pruned_a_better_trial(entry: dict) -> str | None:
    """Whether the rule pruned a trial that stood better, at that step, than the eventual
    best did: then the early losses would have stopped the winner too."""
    sign = -1.0 if entry["direction"] == "maximize" else 1.0  # reported = sign × loss
    best = _ranked(entry["trials"], entry["direction"])[0]
    for trial in entry["trials"]:
        if trial["state"] != "pruned" or not trial["reported"]:
            continue
        step, reported = list(trial["reported"].items())[-1]
        if step in best["reported"] and sign * best["reported"][step] > sign * reported:
            return (f"Early losses rank these trials poorly: trial {trial['number']} was "
                    f"pruned at step {step} with validation loss {sign * reported:.3f}, while "
                    f"the eventual best, trial {best['number']}, stood at "
                    f"{sign * best['reported'][step]:.3f} at that step.\n")
    return None


def _ranked(trials: list[dict], direction: str) -> list[dict]:
    """Finished trials best first, then the pruned and failed ones in the order they ran."""
    sign = -1.0 if direction == "maximize" else 1.0
    finished = sorted((t for t in trials if t["state"] == "complete"),
                      key=lambda t: sign * t["value"])
    return finished + [t for t in trials if t["state"] != "complete"]


def _param(value) -> str:
    if isinstance(value, float):
        return f"{value:.2e}"
    if isinstance(value, str):
        return "`" + value.replace("\n", "⏎").replace("|", "\\|") + "`"
    return "–" if value is None else str(value)


def _final_word(final: dict) -> str:
    test = final.get("test")
    if not test:
        return f"No final word on test: {final.get('note')}\n"
    delta = test["best_minus_base_config"]
    exact = (f", McNemar p = {delta['mcnemar_p_value']:.2g}" if "mcnemar_p_value" in delta
             else "")
    return (f"On the **test** split (n = {test['n']}), the best trial by validation "
            f"(trial {final['best']['trial']}) scores {test['metric']} "
            f"{_interval(test['best'])}, the base config trained the same way "
            f"{_interval(test['base_config'])}, the untuned model "
            f"{_interval(test['untuned_model'])}; best − base config {delta['delta']:+.3f} "
            f"[{delta['ci'][0]:+.3f}, {delta['ci'][1]:+.3f}], paired bootstrap "
            f"{_p(delta)}{exact}.\n")


def _pruning_saving(pruned: dict, unpruned: dict) -> str:
    """Wall time of both sweeps and the optimizer steps the pruned trials did not run."""
    stopped = [t for t in pruned["trials"] if t["state"] == "pruned"]
    saved = sum(t["max_steps"] - t["steps_trained"] for t in stopped)
    planned = sum(t["max_steps"] for t in pruned["trials"])
    walls = [entry["wall_s"]["sweep_command"] for entry in (pruned, unpruned)]
    trial_walls = [entry["wall_s"]["trials"] for entry in (pruned, unpruned)]
    return (f"**What pruning saved.** {len(stopped)} of {len(pruned['trials'])} trials were "
            f"pruned, which skipped {saved} of {planned} trial-steps and their validation "
            f"scoring. The same sweep file with `pruner: none` "
            f"(`{unpruned['sweep_file']}`, same seed and sampler) took "
            f"{_minutes(walls[1])} against {_minutes(walls[0])} (trials alone "
            f"{_minutes(trial_walls[1])} against {_minutes(trial_walls[0])}: "
            f"{1 - trial_walls[0] / trial_walls[1]:.0%} less). {_shared_start(pruned, unpruned)}"
            f"{_unpruned_best(unpruned)}"
            + (" It is the configuration the pruned sweep chose too."
               if _ranked(unpruned["trials"], unpruned["direction"])[0]["params"]
               == _ranked(pruned["trials"], pruned["direction"])[0]["params"] else "")
            + "\n")


def _shared_start(pruned: dict, unpruned: dict) -> str:
    """How many leading trials drew the same values in both sweeps (TPE then diverges)."""
    same = 0
    for one, other in zip(pruned["trials"], unpruned["trials"], strict=False):
        if one["params"] != other["params"]:
            break
        same += 1
    return (f"The first {same} trials drew the same values in both sweeps; after that TPE "
            "proposes from what it has seen, pruned trials included, so the sweeps diverge. ")


def _unpruned_best(entry: dict) -> str:
    best = _ranked(entry["trials"], entry["direction"])[0]
    params = ", ".join(f"`{key}` {_param(value)}" for key, value in best["params"].items())
    text = (f"Without pruning the best by validation was trial {best['number']} ({params}): "
            f"{entry['metric']} {_interval(best)}")
    test = entry["final"].get("test")
    if test:
        delta = test["best_minus_base_config"]
        text += (f"; on test {_interval(test['best'])} against the base config's "
                 f"{_interval(test['base_config'])}, difference {delta['delta']:+.3f} "
                 f"[{delta['ci'][0]:+.3f}, {delta['ci'][1]:+.3f}]")
    return text + "."


def _interval(metric: dict) -> str:
    return f"{metric['value']:.3f} [{metric['ci'][0]:.3f}, {metric['ci'][1]:.3f}]"


def _minutes(seconds: float) -> str:
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest} s" if minutes else f"{rest} s"


def render_multitask(result: dict) -> str:
    """One multitask adapter against single-task adapters: per-task metric, the paired
    difference on the same test examples, the realised mixture and the cost."""
    tasks, cost = result["tasks"], result["cost"]
    steps, single = result["multitask_steps"], result["single_task_steps"]
    lines = [f"| task: metric (test n) | base model | single-task adapter ({single} steps) | "
             f"multitask adapter ({steps} steps) | multitask − single-task, paired |",
             "|---|---|---|---|---|"]
    for name, task in tasks.items():
        delta = task["multitask_minus_single"]
        lines.append(
            f"| {name}: {task['metric']} (n = {task['n']}) | {_interval(task['base'])} | "
            f"{_interval(task['single_task'])} | {_interval(task['multitask'])} | "
            f"{delta['delta']:+.3f} [{delta['ci'][0]:+.3f}, {delta['ci'][1]:+.3f}], "
            f"{_p(delta)} |")
    mixture = result["mixture"]
    shares = ", ".join(f"{name} {mixture['realised'][name]:.1%} (configured "
                       f"{rate:.1%})" for name, rate in mixture["configured"].items())
    singles = [cost[name] for name in tasks]
    rows = [("multitask adapter", [cost["multitask"]]), ("three single-task adapters", singles)]
    cost_lines = ["| | optimizer steps | training tokens | time in optimizer steps |",
                  "|---|---|---|---|"]
    for label, runs in rows:
        cost_lines.append(f"| {label} | {sum(r['steps'] for r in runs)} | "
                          f"{sum(r['train_tokens'] for r in runs):,} | "
                          f"{_minutes(sum(r['train_s'] for r in runs))} |")
    return ("\n".join(lines) + f"\n\nTokens drawn per task by the multitask run "
            f"(`data.mixing: {mixture['mixing']}`): {shares}.\n\n" + "\n".join(cost_lines)
            + f"\n\nMeasured by {_origin(result)}.\n")


def render_serve_load(result: dict) -> str:
    """tunelab serve under concurrent load: rates, latency percentiles, errors, batching gain."""
    load, alone, workload = result["under_load"], result["one_at_a_time"], result["workload"]

    def seconds(percentiles: dict | None) -> str:
        if not percentiles:
            return "–"
        return " / ".join(f"{percentiles[p]:.2f} s" for p in ("p50", "p95", "p99"))

    return (
        "| | one request at a time | "
        f"{workload['clients']} concurrent clients |\n|---|---|---|\n"
        f"| requests (errors) | {alone['requests']} ({alone['errors']}) | "
        f"{load['requests']} ({load['errors']}) |\n"
        f"| requests/s | {alone['requests_per_s']:.2f} | {load['requests_per_s']:.2f} |\n"
        f"| served tokens/s | {alone['tokens_per_s']:.1f} | {load['tokens_per_s']:.1f} "
        f"(**{result['batching_gain']:.1f}×**) |\n"
        f"| latency p50 / p95 / p99 | {seconds(alone['latency_s'])} | "
        f"{seconds(load['latency_s'])} |\n"
        f"| time to first token p50 / p95 / p99 (streamed) | "
        f"{seconds(alone['first_token_s'])} | {seconds(load['first_token_s'])} |\n\n"
        f"{' and '.join(workload['models'])} on one base, {workload['endpoint']}, "
        f"{workload['max_tokens']} new tokens greedy, every other request streamed; "
        f"clients start requests for {workload['duration_s']:.0f} s ({load['wall_s']:.0f} s "
        f"until the last one finished), then one client alone for "
        f"{workload['sequential_s']:.0f} s. Measured by {_origin(result)}.\n")


def render_serve_engines(result: dict) -> str:
    """The same runs and load on tunelab serve's own engine and on llama.cpp behind the same
    API: rates, latency, errors, ratios, and how many greedy answers are identical."""
    engines, comparison = result["engines"], result["comparison"]
    own, cpp = engines["own"], engines["llama.cpp"]
    workload = own["workload"]

    def seconds(percentiles: dict | None) -> str:
        return f"{percentiles['p50']:.2f} s / {percentiles['p95']:.2f} s" if percentiles else "–"

    def row(label: str, pick: Callable[[dict], str], ratio: str = "") -> str:
        return f"| {label} | {pick(own)} | {pick(cpp)} | {ratio} |"

    def times(value: float | None) -> str:
        return f"{value:.1f}×" if value is not None else "–"

    lines = [
        f"| {workload['clients']} concurrent clients | own engine (fp32, adapters unmerged) | "
        "llama.cpp (GGUF F16 base + GGUF LoRA) | llama.cpp / own |", "|---|---|---|---|",
        row("requests (errors)", lambda e: f"{e['under_load']['requests']} "
            f"({e['under_load']['errors']})"),
        row("requests/s", lambda e: f"{e['under_load']['requests_per_s']:.2f}",
            f"**{times(comparison['requests_per_s_ratio'])}**"),
        row("served tokens/s", lambda e: f"{e['under_load']['tokens_per_s']:.1f}",
            times(comparison["tokens_per_s_ratio"])),
        row("latency p50 / p95", lambda e: seconds(e["under_load"]["latency_s"]),
            times(comparison["p50_latency_ratio"]) + " (p50)"),
        row("time to first token p50 / p95 (streamed)",
            lambda e: seconds(e["under_load"]["first_token_s"])),
        row("served tokens/s, one request at a time",
            lambda e: f"{e['one_at_a_time']['tokens_per_s']:.1f}",
            times(comparison["one_at_a_time_tokens_per_s_ratio"])),
    ]
    return ("\n".join(lines) + "\n\n"
            f"{' and '.join(workload['models'])} on one base, the same workload on both: "
            f"{workload['endpoint']}, {workload['max_tokens']} new tokens greedy, every other "
            f"request streamed, clients starting requests for {workload['duration_s']:.0f} s, "
            f"then one client alone for {workload['sequential_s']:.0f} s. Greedy answers to the "
            f"same prompts, one at a time: {comparison['greedy_identical']} of "
            f"{comparison['greedy_compared']} identical on the two engines. "
            f"Measured by {_origin(result)}.\n")


def render_serve_tools(result: dict) -> str:
    """A tool-calling run behind tunelab serve: held-out requests through the openai client
    answered with the right call (function and arguments), base against tuned, both ways."""
    lines = [f"| held-out requests (n = {result['n_requests']}) | base | tuned |", "|---|---|---|"]

    def share(model: str, way: str, key: str = "right_call") -> str:
        measured = result[model][way]
        if key != "right_call":
            return f"{measured[key]:.0%}"
        low, high = measured["right_call_ci"]
        return (f"{measured['right_calls']}/{measured['n']} ({measured['right_call']:.0%}, "
                f"95% CI {low:.0%}–{high:.0%})")

    for way, label in (("non_streamed", "right call, non-streamed"),
                       ("streamed", "right call, streamed")):
        lines.append(f"| {label} | {share('base', way)} | {share('tuned', way)} |")
    names = [share(model, "non_streamed", "right_function") for model in ("base", "tuned")]
    lines.append(f"| right function (any arguments) | {names[0]} | {names[1]} |")
    lines.append("| streamed answer = non-streamed | "
                 f"{result['base']['streamed_equals_non_streamed']:.0%} | "
                 f"{result['tuned']['streamed_equals_non_streamed']:.0%} |")
    reasons = [", ".join(f"{reason} {count}" for reason, count in sorted(
        result[model]["non_streamed"]["finish_reasons"].items())) for model in ("base", "tuned")]
    lines.append(f"| finish reasons | {reasons[0]} | {reasons[1]} |")
    lines.append(f"| median latency, non-streamed | "
                 f"{result['base']['non_streamed']['median_latency_s']:.2f} s | "
                 f"{result['tuned']['non_streamed']['median_latency_s']:.2f} s |")
    training = result.get("training") or {}
    trained = (f" (`tunelab train` {training['wall_s'] / 60:.1f} min, {training['steps']} "
               f"optimizer steps, validation loss {training['val_loss_before']:.3f} → "
               f"{training['val_loss_after']:.3f})" if training.get("steps") else "")
    return ("\n".join(lines) + f"\n\n`tunelab serve` on the run {result['run']}{trained} and "
            f"its base model, the first {result['n_requests']} records of {result['data']}, "
            f"greedy, up to {result['max_tokens']} new tokens. Measured by {_origin(result)}.\n")


def render_ship_checks(result: dict) -> str:
    """The sentiment run exported and checked, and the served runs' answers."""
    lines = ["| export | check | value | bound | passed |", "|---|---|---|---|---|"]
    for export in result["exports"]:
        for check in export["checks"]:
            value = "–" if check["value"] is None else f"{check['value']:.3g}"
            bound = "–" if check["tolerance"] is None else f"{check['tolerance']:.3g}"
            lines.append(f"| {export['export']} | {check['name']} | {value} | {bound} | "
                         f"{'yes' if check['passed'] else '**no**'} |")
    serve = result["serve"]
    answers = "; ".join(f"`{a['model']}` answered {a['answer'].strip()!r} (test label "
                        f"{a['expected'].strip()!r})" for a in serve["completions"])
    return ("\n".join(lines) + f"\n\n`tunelab serve` listed {', '.join(serve['models'])}; "
            f"{answers}. Measured by {_origin(result)}.\n")


def render_crash_drills(result: dict) -> str:
    """scripts/crash_drills.py: killed runs resumed bit-identical, full disks, damaged
    checkpoints, each passed out of run (the drills a result file holds)."""
    passed = lambda rows: sum(bool(row.get("passed")) for row in rows)  # noqa: E731
    lines, short = ["| drill | passed | what it covered |", "|---|---|---|"], ""
    if "sigkill" in result:
        kills = result["sigkill"]["summary"]
        where = ", ".join(f"{count} {left}" for left, count in
                          sorted(kills["left"].items(), key=lambda item: -item[1]))
        lines.append(f"| SIGKILL, then `tunelab train --resume` | "
                     f"**{kills['resumed_bit_identical']}/{kills['killed']}** resumed, adapter "
                     f"bit-identical | killed {where} |")
        if kills["runs"] < kills["planned"]:
            short = (f"{kills['runs']} of the {kills['planned']} planned kills ran before the "
                     "results were committed. ")
    if "disk_full" in result:
        disks = result["disk_full"]
        lines.append(f"| disk full (20 MiB tmpfs as `output_dir`) | **{passed(disks)}/"
                     f"{len(disks)}** | full at {', '.join(row['fails_at'] for row in disks)}: "
                     "one-paragraph error, last checkpoint intact, resumed bit-identical once "
                     "space was freed |")
    if "damaged_checkpoint" in result:
        damaged = result["damaged_checkpoint"]
        lines.append(f"| damaged checkpoint, then `--resume` | **{passed(damaged)}/"
                     f"{len(damaged)}** | " + "; ".join(
                         f"{row['damage']} in {', '.join(row['damaged'])}" for row in damaged)
                     + " |")
    return "\n".join(lines) + f"\n\n{short}Measured by {_origin(result)}.\n"


def render_distributed(result: dict) -> str:
    """2 ranks (torchrun, gloo) against 1 process on the same config: validation loss after
    training and the per-step training loss, held to the script's stated tolerances."""
    lines = ["| run | command | val loss before → after |", "|---|---|---|"]
    for run in result["runs"]:  # wall times are not compared: the runs did not run alone
        lines.append(f"| {run['label']} | `{run['command']}` | {run['val_loss_before']:.4f} → "
                     f"{run['val_loss_after']:.6f} |")
    comparison, verdicts = result["comparison"], []
    if "dropout_0" in comparison:
        zero = comparison["dropout_0"]
        verdicts.append(
            f"At LoRA dropout 0 the two runs see the same examples per step and no random "
            f"masks: validation losses differ by {zero['val_loss_after_relative_difference']:.1e} "
            f"(relative), the per-step training losses by at most "
            f"{zero['max_step_loss_relative_difference']:.1e}, against a tolerance of "
            f"{zero['tolerance_relative']:.0e}: **{_within(zero)}**.")
    if "dropout_0_05" in comparison:
        drop = comparison["dropout_0_05"]
        verdicts.append(
            f"At the config's dropout 0.05 each rank draws its own masks, so the 2-rank run is "
            f"another random draw: its validation loss is "
            f"{drop['two_ranks_minus_one_process']:+.6f} from the 1-process run with the same "
            f"seed, against a seed-to-seed spread of "
            f"{drop['seed_spread']:.4f} (seeds 0 and 1, which also change the data order and the "
            f"adapter's initialisation): **{_within(drop)}**.")
    if not result.get("complete", True):
        verdicts.append(f"{len(result['runs'])} of the planned runs finished before this was "
                        "committed.")
    return ("\n".join(lines) + "\n\n" + " ".join(verdicts)
            + f"\n\nMeasured by {_origin(result)}.\n")


def _within(comparison: dict) -> str:
    return "within" if comparison["within_tolerance"] else "outside the tolerance"


# what each column of the architecture matrix checks (tests/model/test_architectures.py)
_MATRIX_COLUMNS = {
    "train": "packed loss and gradients = one example at a time; label scores = each label "
             "alone; `tunelab train` runs",
    "plan": "the planner's parameters, projections and adapter size = the model's; "
            "`all-linear` adapts the language model (and experts) only",
    "merged": "`tunelab export --to merged` reproduces the run's logits",
    "gguf": "`tunelab export --to gguf` (F16) read back by gguf and transformers, or refused "
            "before loading",
    "serve": "the serving engine's greedy output = `generate`",
    "chat": "a two-turn conversation trains exactly its assistant turns",
}


def render_architectures(result: dict) -> str:
    """The architecture matrix: one row per family, one cell per kind of check, "yes" only
    when every test of the cell passed in the committed run; refusals footnoted."""
    columns = list(_MATRIX_COLUMNS)
    lines = ["| family | " + " | ".join(columns) + " |",
             "|---|" + "---|" * len(columns)]
    notes: list[str] = []
    for name, label in result["families"].items():
        cells = []
        for column in columns:
            checks = result["cells"].get(name, {}).get(column, [])
            refusals = [c["note"] for c in checks if (c.get("note") or "").startswith("refused")]
            if not checks:
                cells.append("not run")
            elif any(c["outcome"] != "passed" for c in checks):
                cells.append("**fails**")
            elif refusals:
                notes.append(f"{label}, {column}: {refusals[0].removeprefix('refused: ')}")
                cells.append(f"refused ({len(notes)})")
            else:
                cells.append(f"yes ({len(checks)})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Each cell: how many checks passed; " + "; ".join(
        f"**{column}**: {text}" for column, text in _MATRIX_COLUMNS.items()) + "."]
    lines += [""] + [f"- ({number}) {note}" for number, note in enumerate(notes, 1)]
    lines += ["", f"From {_origin(result)}; tiny random-weight models "
              f"(tests/architectures.py, sliding windows of {result['window']})."]
    return "\n".join(lines) + "\n"


def render_llama_cpp(result: dict) -> str:
    """benchmarks/llama_cpp_check.py: llama.cpp's tokens on tunelab's GGUFs against
    transformers' greedy tokens, per model, quantisation and kind of prompt."""
    build = result["llama_cpp"]
    lines = ["| model | GGUF | prompts | tokenization identical | leading tokens agreeing, "
             "vs merged fp32 | vs the same rounded weights in fp32 | first divergence "
             "(step: top-2 logit gap in transformers / llama.cpp) |",
             "|---|---|---|---|---|---|---|"]
    for model in result["models"]:
        for quant, run in model["quants"].items():
            kinds = dict.fromkeys(row.get("kind", "as trained") for row in run["prompts"])
            for kind in kinds:
                rows = [row for row in run["prompts"] if row.get("kind", "as trained") == kind]
                lines.append(
                    f"| {model['model'].removeprefix('embedded:')} | {quant.upper()} | {kind} | "
                    f"{sum(row['tokenization_identical'] for row in rows)}/{len(rows)} | "
                    f"{_agreeing(rows, 'vs_merged_fp32')} | "
                    f"{_agreeing(rows, 'vs_rounded_weights_fp32')} | "
                    f"{'; '.join(_divergence(row) for row in rows if _divergence(row)) or '–'} |")
    templates = []
    for model in result["models"]:
        rows = next(iter(model["quants"].values()))["chat_template"]
        same = lambda key, rows=rows: sum(bool(row[key]) for row in rows)  # noqa: E731
        templates.append(f"{model['model'].removeprefix('embedded:')}: llama.cpp's rendering "
                         f"of the GGUF's template equals transformers' in "
                         f"{same('llama_cpp_equals_transformers')}/{len(rows)} conversations, "
                         f"the Modelfile's (Ollama, emulated) in "
                         f"{same('ollama_equals_transformers')}/{len(rows)}")
    adapters = "; ".join(f"{m['model'].removeprefix('embedded:')} {m['adapter_changes_greedy']}"
                         for m in result["models"])
    reused = [m["model"].removeprefix("embedded:") for m in result["models"]
              if m.get("reused_from_work")]
    adapters += "" if not reused else (
        f" ({', '.join(reused)}: run and exports made by an earlier invocation with the same "
        "--work and settings, reused)")
    return ("\n".join(lines) + "\n\nA cell counts the prompts whose "
            f"{result['new_tokens']} greedy tokens all agree (where some do not, each prompt's "
            "number of leading tokens that agree follows); generation starts from the prompt's "
            "ids, special tokens suppressed on both sides so neither stops early. The LoRA "
            f"({result['steps']} steps) changed the greedy tokens against the base in, of each "
            f"model's prompts: {adapters}. Chat template: {'; '.join(templates)}. llama.cpp from "
            f"`{build['sdist']}` ({build['llama_cpp_version']}; ggml {build['ggml_version']}), "
            f"CPU build of {', '.join(build['targets'])} in {build['build_s'] / 60:.0f} min. "
            f"Measured by {_origin(result)}.\n")


def _agreeing(rows: list[dict], key: str) -> str:
    of = rows[0][key]["of"] if rows else 0
    counts = [row[key]["agree"] for row in rows]
    full = sum(count == of for count in counts)
    return f"{full}/{len(rows)} all {of}" + ("" if full == len(rows) else
                                             f" ({', '.join(map(str, counts))})")


def _divergence(row: dict) -> str | None:
    at = row["vs_merged_fp32"].get("divergence")
    if at is None:
        return None
    cpp = (at.get("llama_cpp_top2") or {}).get("gap")
    return (f"{at['step']}: {at['transformers_top2']['gap']:.3g} / "
            f"{'–' if cpp is None else f'{cpp:.3g}'}")


# --- headlines: one line per area for the README; the full block is on the doc page ----------


def headline_baselines(result: dict) -> str:
    """tunelab against the padding-free and the padding Trainer, per length distribution."""
    parts = []
    for name, summary in result["summary"].items():
        flat, padded = summary["tunelab_vs"]["hf_flattened"], summary["tunelab_vs"]["hf_padded"]
        parts.append(f"{name} lengths **{flat['tokens_per_second']:.2f}×** the tokens/s in "
                     f"**{flat['peak_memory']:.2f}×** the peak memory (against the padding "
                     f"collator {padded['tokens_per_second']:.2f}× / "
                     f"{padded['peak_memory']:.2f}×)")
    return (f"{result['model']['parameters'] / 1e6:.0f}M-parameter Llama, LoRA "
            f"r={result['lora']['r']}, against `Trainer` + peft with "
            f"`DataCollatorWithFlattening`: " + "; ".join(parts)
            + f". {_short_origin(result)}\n")


def headline_example(result: dict) -> str:
    """An example's training and its base-vs-tuned difference on the primary metric."""
    manifest, evaluation = result["manifest"], result["eval"]
    primary = evaluation["primary_metric"]
    entry = evaluation["comparison"][primary]
    metrics = {which: evaluation["models"][which]["metrics"][primary] for which in
               ("base", "tuned")}
    return (f"`{result['example']}`: validation loss {manifest['val_loss_before']:.2f} → "
            f"{manifest['val_loss_after']:.2f} in {manifest['steps']} steps "
            f"({_minutes(result['wall_s']['train'])} of `tunelab train`); test {primary} "
            f"(n = {evaluation['n']}) {_interval(metrics['base'])} → "
            f"{_interval(metrics['tuned'])}, **{entry['delta']:+.3f}** [{entry['ci'][0]:+.3f}, "
            f"{entry['ci'][1]:+.3f}], {entry['test']} {_p(entry)}. "
            f"{_short_origin(result)}\n")


def _signed(entry: dict | None) -> str:
    """A paired difference: value [low, high] and its p (run_objectives' comparisons)."""
    if not entry:
        return "—"
    return (f"{entry['value']:+.3f} [{entry['ci'][0]:+.3f}, {entry['ci'][1]:+.3f}] "
            f"({entry.get('p_text') or _p(entry)})")


def _held_out(stage: dict) -> str:
    """What a stage measured on its validation split before → after training."""
    before, after = stage["validation"]["before"], stage["validation"]["after"]
    if "val_reward_accuracy" in after:
        low, high = after["val_reward_accuracy_ci"]
        return (f"reward accuracy {before['val_reward_accuracy']:.2f} → "
                f"{after['val_reward_accuracy']:.2f} [{low:.2f}, {high:.2f}] "
                f"({after['val_pairs']} pairs), margin {before['val_margin']:+.2f} → "
                f"{after['val_margin']:+.2f}")
    if "val_reward" in after:
        low, high = after["val_reward_ci"]
        return (f"greedy reward {before['val_reward']:.3f} → {after['val_reward']:.3f} "
                f"[{low:.3f}, {high:.3f}] ({after['val_prompts']} prompts)")
    return f"loss {before['val_loss']:.3f} → {after['val_loss']:.3f}"


def render_objectives(result: dict) -> str:
    """scripts/run_objectives.py: each stage's test metric with the paired differences against
    the base and against SFT, the hallucination rate, the held-out preference accuracy or
    reward, the pre-flight, and the wall time."""
    stages, comparisons = result["stages"], result["comparisons"]
    first = next(iter(stages.values()))["eval"]
    primary, n = first["primary_metric"], first["n"]
    grounded = any(stage["eval"]["models"]["tuned"].get("hallucination")
                   for stage in stages.values())
    columns = ["stage", f"test {primary}", "− base", "− SFT"]
    columns += ["hallucination rate"] if grounded else []
    columns += ["validation, before → after", "train + eval"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    base = first["models"]["base"]
    row = ["base model", _interval(base["metrics"][primary]), "", ""]
    row += [_rate(base.get("hallucination"))] if grounded else []
    lines.append("| " + " | ".join(row + ["", ""]) + " |")
    for name, stage in stages.items():
        tuned = stage["eval"]["models"]["tuned"]
        start = f" (from {stage['init_from']})" if stage.get("init_from") else ""
        row = [f"`{name}`{start}", _interval(tuned["metrics"][primary]),
               _signed(comparisons.get(f"{name} vs base", {}).get(primary)),
               _signed(comparisons.get(f"{name} vs sft", {}).get(primary))]
        row += [_rate(tuned.get("hallucination"))] if grounded else []
        wall = stage["wall_s"]
        row += [_held_out(stage), f"{_minutes(wall['train'])} + {_minutes(wall['eval'])}"]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n\n"
    text += f"Test examples: {n}; differences are paired on them ({primary}: McNemar where the "
    text += "task says so, else a paired bootstrap)."
    if grounded:
        text += (" Hallucination rate: answers not found in the context, over non-empty "
                 "answers; paired against SFT: ")
        text += "; ".join(f"{label.removesuffix(' vs sft')} {_signed(entry['hallucination_rate'])}"
                          for label, entry in comparisons.items()
                          if label.endswith(" vs sft") and "hallucination_rate" in entry) + "."
    for name, stage in stages.items():
        if stage.get("preflight"):
            text += f" `{name}` pre-flight: {_preflight(stage['preflight'])}."
    return text + f" Measured by {_origin(result)}.\n"


def _rate(hallucination: dict | None) -> str:
    if not hallucination:
        return "—"
    return (f"{hallucination['rate']:.3f} [{hallucination['ci'][0]:.3f}, "
            f"{hallucination['ci'][1]:.3f}]")


def _preflight(report: dict) -> str:
    group = report["group_size"]
    return (f"pass@1 {_interval(report['pass_at_1'])}, pass@{group} "
            f"{_interval(report['pass_at_group'])}, tied groups "
            f"{_interval(report['tied_share'])} on {report['prompts']} training prompts")


def headline_objectives(result: dict) -> str:
    """The example's objectives in one paragraph: each stage's test metric and its paired
    difference against SFT (and the base)."""
    stages, comparisons = result["stages"], result["comparisons"]
    first = next(iter(stages.values()))["eval"]
    primary = first["primary_metric"]
    parts = [f"base {first['models']['base']['metrics'][primary]['value']:.3f}"]
    for name, stage in stages.items():
        value = stage["eval"]["models"]["tuned"]["metrics"][primary]["value"]
        against = comparisons.get(f"{name} vs sft", {}).get(primary)
        parts.append(f"{name} {value:.3f}" + (f" (− SFT {_signed(against)})" if against else ""))
    return (f"`{result['example']}`, test {primary} (n = {first['n']}): " + "; ".join(parts)
            + f". {_short_origin(result)}\n")


def headline_preference_trl(result: dict) -> str:
    """benchmarks/preference_vs_trl.py (DPO): tokens/s and peak memory against TRL's
    DPOTrainer + peft, and step 1's per-answer log-probs checked against TRL's."""
    summary, step_one, workload = result["summary"], result["step_one"], result["workload"]
    ratios = summary["tunelab_vs_trl"]
    tokens = step_one["tokenization"]
    return (f"DPO on {result['model']['path'].removeprefix('embedded:')}, LoRA "
            f"r={result['lora']['r']}, {workload['steps']} steps of {workload['batch_pairs']} "
            f"pairs, against TRL's `DPOTrainer` + peft: **{ratios['tokens_per_second']:.2f}×** "
            f"the tokens/s ({summary['tunelab']['tokens_per_second']:.0f} against "
            f"{summary['trl']['tokens_per_second']:.0f}) in **{ratios['peak_memory']:.2f}×** "
            f"the peak memory ({_gib(summary['tunelab']['peak_memory_bytes'])} against "
            f"{_gib(summary['trl']['peak_memory_bytes'])}); at step 1 every answer's "
            f"log-probability within {step_one['max_abs_answer_logp_difference']:.1e} nats of "
            f"TRL's (tolerance {step_one['tolerance_nats']:g}), token ids identical for "
            f"{tokens['identical_answer_ids']}/{tokens['answers']} answers, loss "
            f"{step_one['loss']['tunelab']:.4f} on both. {_short_origin(result)}\n")


def headline_grpo_trl(result: dict) -> str:
    """benchmarks/preference_vs_trl.py --objective grpo: step time and peak memory against
    TRL's GRPOTrainer + peft, and step 1's log-probs and advantages on TRL's own samples."""
    summary, step_one, workload = result["summary"], result["step_one"], result["workload"]
    ratios = summary["tunelab_vs_trl"]
    load = result["machine"]["load_average_at_start"][0]
    return (f"GRPO on {result['model']['path'].removeprefix('embedded:')}, LoRA "
            f"r={result['lora']['r']}, {workload['steps']} steps of {workload['prompts_per_step']} "
            f"prompts × {workload['group_size']} answers, against TRL's `GRPOTrainer` "
            f"+ peft: **{ratios['prompts_per_second']:.2f}×** the prompts per second "
            f"({ratios['tokens_per_second']:.2f}× the tokens/s) in **{ratios['peak_memory']:.2f}×"
            f"** the peak memory ({_gib(summary['tunelab']['peak_memory_bytes'])} against "
            f"{_gib(summary['trl']['peak_memory_bytes'])}); on TRL's own first batch of "
            f"{step_one['answers']} sampled answers every token's log-probability within "
            f"{step_one['max_abs_token_logp_difference']:.1e} nats of TRL's and every advantage "
            f"within {step_one['max_abs_advantage_difference']:.0e} (tolerance "
            f"{step_one['tolerance_nats']:g}). Load average {load} at the start. "
            f"{_short_origin(result)}\n")


def _p(entry: dict) -> str:
    """"p = 0.03", or "p < 0.002" where a resampling test sits at its floor (2 / (resamples + 1)
    with 1,000 resamples: it cannot go lower). McNemar's exact p has no floor."""
    p_value = entry["p_value"]
    if "mcnemar" not in str(entry.get("test", "")):
        floor = entry.get("p_floor") or 2 / (entry.get("n_resamples", 1000) + 1)
        if p_value <= floor * (1 + 1e-9):
            return f"p < {floor:.2g}"
    return f"p = {p_value:.2g}"


def headline_assess(result: dict) -> str:
    """The assessment's verdict and the intervals it rests on."""
    assess = json.loads((ROOT / result["assess"]).read_text())
    scale = assess["metric_scale"]
    signed = (lambda v: f"{v:+.1f}") if scale > 1 else (lambda v: f"{v:+.3f}")

    def cell(point: dict) -> str:
        return f"{signed(point['value'])} [{signed(point['ci'][0])}, {signed(point['ci'][1])}]"

    took = (f"; the whole command took {_minutes(result['wall_s'])}"
            if result.get("measured_alone") else "")
    baselines = assess["baselines"]
    against = dict.fromkeys([baselines["chosen"], baselines["strongest_on_test"]])
    deltas = ", ".join(f"tuned − {name} {cell(assess['tuned_vs_arms'][name])}"
                       for name in against)
    seeds = "/".join(str(p["seeds"]["n_seeds"]) for p in assess["learning_curve"])
    gain = (f", gain per doubling of the data {cell(assess['fit']['gain_per_doubling'])}"
            if assess["fit"] else "")
    return (f"`tunelab assess` on `{assess['name']}`: **{assess['verdict']['kind']}** — "
            f"{assess['primary_metric']} {deltas} on {assess['n_test']} test examples{gain} "
            f"(training seeds per fraction {seeds}, counted in every interval){took}. "
            f"{_short_origin(result)}\n")


def headline_llama_cpp(result: dict) -> str:
    """llama.cpp on tunelab's GGUFs: tokenization and greedy agreement per quantisation."""
    models = [model["model"].removeprefix("embedded:") for model in result["models"]]
    prompts: dict[str, list[dict]] = {}
    for model in result["models"]:
        for quant, run in model["quants"].items():
            prompts.setdefault(quant.upper(), []).extend(run["prompts"])
    every = [row for rows in prompts.values() for row in rows]

    def agreeing(rows: list[dict], key: str) -> str:
        return f"{sum(row[key]['agree'] == row[key]['of'] for row in rows)}/{len(rows)}"

    cells = "; ".join(f"{quant} {agreeing(rows, 'vs_merged_fp32')} (against the same rounded "
                      f"weights {agreeing(rows, 'vs_rounded_weights_fp32')})"
                      for quant, rows in prompts.items())
    return (f"`llama-server` on tunelab's GGUF exports of {' and '.join(models)} LoRA runs: "
            f"tokenization identical on {sum(r['tokenization_identical'] for r in every)}/"
            f"{len(every)} prompts; all {result['new_tokens']} greedy tokens equal to "
            f"transformers' on the merged weights: {cells}. {_short_origin(result)}\n")


def headline_sweep(result: dict) -> str:
    """What pruning saved, and whether the best trial beat the base config on test."""
    entries = list(result["sweeps"].values())
    pruned = next(entry for entry in entries if entry["spec"]["pruner"] != "none")
    unpruned = next((entry for entry in entries if entry["spec"]["pruner"] == "none"), None)
    stopped = sum(trial["state"] == "pruned" for trial in pruned["trials"])
    text = (f"`{pruned['sweep_file']}`, {len(pruned['trials'])} trials on "
            f"{pruned['workers']} workers: {pruned['spec']['pruner']} pruning stopped {stopped}")
    if unpruned:
        walls = [entry["wall_s"]["trials"] for entry in (pruned, unpruned)]
        text += (f" and cut the trials' time by **{1 - walls[0] / walls[1]:.0%}** "
                 f"({_minutes(walls[0])} against {_minutes(walls[1])} unpruned)")
    test = pruned["final"].get("test")
    if test:
        delta = test["best_minus_base_config"]
        text += (f"; on test the best trial scored {test['metric']} {_interval(test['best'])}, "
                 f"the base config {_interval(test['base_config'])} (best − base "
                 f"{delta['delta']:+.3f} [{delta['ci'][0]:+.3f}, {delta['ci'][1]:+.3f}])")
    return text + f". {_short_origin(pruned)}\n"


def headline_distributed(result: dict) -> str:
    """2 ranks against 1 process at LoRA dropout 0: the loss differences and the tolerance."""
    zero = result["comparison"]["dropout_0"]
    return (f"`torchrun` with 2 ranks (gloo) against 1 process on the sentiment example at "
            f"LoRA dropout 0: validation loss after training differs by "
            f"{zero['val_loss_after_relative_difference']:.1e} (relative), per-step losses by "
            f"at most {zero['max_step_loss_relative_difference']:.1e}, tolerance "
            f"{zero['tolerance_relative']:.0e}: **{_within(zero)}**. {_short_origin(result)}\n")


def headline_architectures(result: dict) -> str:
    """The families, the columns every family passes, the GGUF refusals, the checks passed."""
    families, cells = result["families"], result["cells"]
    checks = [check for family in cells.values() for column in family.values()
              for check in column]
    refused = [families[name] for name, family in cells.items()
               if any((c.get("note") or "").startswith("refused") for c in family.get("gguf", []))]
    passing = [column for column in _MATRIX_COLUMNS if column != "gguf" and all(
        cells.get(name, {}).get(column) and all(c["outcome"] == "passed"
                                                for c in cells[name][column])
        for name in families)]
    return (f"{len(families)} families: {', '.join(families.values())}. Every one passes the "
            f"{', '.join(passing[:-1])} and {passing[-1]} checks; GGUF export writes "
            f"{len(families) - len(refused)} and refuses {' and '.join(refused)} before loading "
            "a weight; "
            f"{sum(c['outcome'] == 'passed' for c in checks)} of {len(checks)} checks passed. "
            f"{_short_origin(result)}\n")


def headline_crash_drills(result: dict) -> str:
    """Killed, out-of-disk and damaged runs resumed: passed out of run, per drill."""
    passed = lambda rows: sum(bool(row.get("passed")) for row in rows)  # noqa: E731
    parts = []
    if "sigkill" in result:
        kills = result["sigkill"]["summary"]
        parts.append(f"Killed with SIGKILL at random moments, "
                     f"**{kills['resumed_bit_identical']}/{kills['killed']}** resumed "
                     "bit-identical")
    for key, label in (("disk_full", "full disks"), ("damaged_checkpoint",
                                                      "damaged checkpoints")):
        if key in result:
            parts.append(f"{label} **{passed(result[key])}/{len(result[key])}**")
    return "; ".join(parts) + f". {_short_origin(result)}\n"


RENDERERS: dict[str, Callable[[dict], str]] = {
    "throughput": render_throughput,
    "baselines": render_baselines,
    "levers": render_levers,
    "plan_check": render_plan_check,
    "train_memory": render_train_memory,
    "generation": render_generation,
    "example_train": render_example_train,
    "example_eval": render_example_eval,
    "example_forms": render_example_forms,
    "assess": render_assess,
    "assess_calibration": render_calibration,
    "sweep": render_sweep,
    "multitask": render_multitask,
    "serve_load": render_serve_load,
    "serve_engines": render_serve_engines,
    "serve_tools": render_serve_tools,
    "ship_checks": render_ship_checks,
    "crash_drills": render_crash_drills,
    "distributed": render_distributed,
    "architectures": render_architectures,
    "llama_cpp": render_llama_cpp,
    "baselines_headline": headline_baselines,
    "example_headline": headline_example,
    "objectives": render_objectives,
    "objectives_headline": headline_objectives,
    "preference_trl_headline": headline_preference_trl,
    "grpo_trl_headline": headline_grpo_trl,
    "assess_headline": headline_assess,
    "calibration_headline": headline_calibration,
    "assess_budget": headline_assess_budget,
    "llama_cpp_headline": headline_llama_cpp,
    "sweep_headline": headline_sweep,
    "distributed_headline": headline_distributed,
    "architectures_headline": headline_architectures,
    "crash_drills_headline": headline_crash_drills,
}


# --- checking and writing -------------------------------------------------------------------


def documents() -> list[Path]:
    return sorted({path for pattern in DOCUMENTS for path in ROOT.glob(pattern)})


LINK = re.compile(r"(\]\()([^)\s]+)(\))")


def _links_from(document: Path, body: str) -> str:
    """Renderers name files from the repository root; a link in a block is made relative to
    the document that holds it (``docs/evaluation.md`` links ``../examples/...``)."""
    def relative(match: re.Match) -> str:
        target = match[2]
        if re.match(r"[a-z]+:|#|/", target) or not (ROOT / target).exists():
            return match[0]
        return match[1] + os.path.relpath(ROOT / target, document.parent) + match[3]

    return LINK.sub(relative, body)


def problems_in(document: Path, *, write: bool = False) -> list[str]:
    """What is wrong with one document's published numbers (nothing: an empty list)."""
    text = document.read_text()
    name = document.relative_to(ROOT)
    found: list[str] = []

    def rendered(match: re.Match) -> str:
        kind, path = match["kind"], match["path"]
        if kind not in RENDERERS:
            found.append(f"{name}: unknown published kind {kind!r} (known: "
                         f"{', '.join(RENDERERS)})")
            return match[0]
        result_path = ROOT / path
        if not result_path.is_file():
            found.append(f"{name}: {path} is not a committed result file")
            return match[0]
        result = json.loads(result_path.read_text())
        missing = [key for key in PROVENANCE_KEYS if not result.get(key)]
        if missing:
            found.append(f"{name}: {path} lacks its provenance ({', '.join(missing)}): re-run "
                         "the script that writes it")
            return match[0]
        body = _links_from(document, RENDERERS[kind](result))
        if body != match["body"] and not write:
            found.append(f"{name}: the {kind} block differs from {path}; run "
                         "`python scripts/published.py --write`")
        return f"<!-- published: {kind} {path} -->\n{body}<!-- /published -->"

    updated = BLOCK.sub(rendered, text)
    outside = BLOCK.sub("", updated)
    for line in [] if name.as_posix() in GENERATED else outside.splitlines():
        if FIGURE.search(line) and not line.lstrip().startswith(("python ", "$ ", "#")):
            found.append(f"{name}: a performance figure outside a published block: "
                         f"{line.strip()[:100]!r}")
    if write and updated != text:
        document.write_text(updated)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help="re-render every block in place")
    args = parser.parse_args(argv)
    found = [problem for document in documents()
             for problem in problems_in(document, write=args.write)]
    for problem in found:
        print(problem, file=sys.stderr)
    if not found:
        print(f"published numbers match their result files in {len(documents())} documents")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
