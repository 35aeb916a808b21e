"""Run an example's training objectives one after another from the CLI, and compare them.

    python scripts/run_objectives.py examples/qa/preference
    python scripts/run_objectives.py examples/arithmetic

runs the example's stages (``PLANS`` below: SFT, then DPO, DPO after SFT, SimPO and KTO for
grounded QA; SFT, then GRPO from the SFT run for arithmetic), each as a new user would:
``tunelab train CONFIG --overwrite`` and ``tunelab eval CONFIG`` in a scratch output directory,
a stage that starts from an earlier one with ``--set train.init_from=<its run>``. It writes
``EXAMPLE/results/``: per stage ``<stage>/`` with the run's ``manifest.json``,
``metrics.jsonl``, ``preflight.json`` (reinforcement), ``eval/test.json`` and both commands'
output; and ``result.json`` (command, git commit, machine, load, wall time of every command,
each stage's manifest summary, validation before and after, pre-flight and test metrics with
intervals) with the paired comparisons on the test split (``eval/stats.paired_comparison`` on
the per-example scores of the eval files, as ``tunelab eval`` compares tuned with base): every
stage against the base model, and each later stage against SFT (``AGAINST_SFT``), of the
primary metric and, where the task checks grounding, of the hallucination rate.

    python scripts/run_objectives.py examples/arithmetic --smoke

``--smoke`` runs the same commands in seconds, for the test suite: on configs shrunk by
``benchmarks/smoke.py`` (the tiny model, the first lines of each data file, two steps; a
reinforcement stage's pre-flight and groups shrunk too, ``SMOKE_RL``), in this process, results
to a temporary folder (or ``--out``) instead of ``EXAMPLE/results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "benchmarks"))
import smoke  # noqa: E402
from provenance import provenance  # noqa: E402
from run_example import run  # noqa: E402

from tunelab.data.readers import read_records  # noqa: E402
from tunelab.eval.grounding import unsupported_spans  # noqa: E402
from tunelab.eval.stats import paired_comparison, ratio_statistic  # noqa: E402
from tunelab.eval.tasks import Task  # noqa: E402
from tunelab.run.directory import RunDir  # noqa: E402
from tunelab.run.metrics import read_metrics  # noqa: E402


@dataclass(frozen=True)
class Stage:
    """One training run of an example: its name here, its config (relative to the example),
    and the earlier stage whose run it starts from (``train.init_from``)."""

    name: str
    config: str
    init_from: str | None = None


PLANS = {
    "qa/preference": [Stage("sft", "../config.yaml"), Stage("dpo", "config.yaml"),
                      Stage("dpo-after-sft", "after-sft.yaml", init_from="sft"),
                      Stage("simpo", "simpo.yaml"), Stage("kto", "kto.yaml")],
    "arithmetic": [Stage("sft", "sft.yaml"), Stage("grpo", "config.yaml", init_from="sft")],
}
# the stages compared with SFT on the same test examples (every stage is compared with the base)
AGAINST_SFT = {"qa/preference": ["dpo", "dpo-after-sft", "simpo", "kto"],
               "arithmetic": ["grpo"]}
# a tiny random model ties every group of the pre-flight: let it through, and keep it short
SMOKE_RL = {"max_tied_share": 1.0, "preflight_prompts": 2, "group_size": 2, "max_new_tokens": 4}
MANIFEST_KEYS = ("steps", "wall_s", "train_tokens", "tokens_per_second", "val_loss_before",
                 "val_loss_after", "measured_peak_rss_bytes")
SPLIT = "test"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("example", type=Path, help=f"one of examples/{{{','.join(PLANS)}}}")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: tiny model and data, in this "
                             "process, results to a temporary folder (or --out)")
    parser.add_argument("--out", type=Path, help="with --smoke: the folder for the results")
    parser.add_argument("--wait-idle", action="store_true",
                        help="before each command, wait while another process keeps the CPUs "
                             "busy (the wall times are then this run's alone)")
    args = parser.parse_args(argv)
    example = args.example.resolve()
    key = example.relative_to(ROOT / "examples").as_posix()
    if key not in PLANS:
        raise SystemExit(f"no plan of stages for {args.example}: one of "
                         f"{', '.join('examples/' + name for name in PLANS)}")
    origin = provenance()
    results = smoke.result_path(args.out, "results") if args.smoke else example / "results"
    with tempfile.TemporaryDirectory(prefix="tunelab-objectives-") as scratch:
        scratch = Path(scratch)
        model = smoke.tiny_model(scratch / "tiny-model") if args.smoke else None
        staging = scratch / "results"
        stages, runs = {}, {}
        for stage in PLANS[key]:
            config = stage_config(example / stage.config, stage, scratch, model)
            timing, runs[stage.name] = train_and_evaluate(stage, config, scratch, runs,
                                                          staging / stage.name, args.smoke,
                                                          args.wait_idle)
            stages[stage.name] = {"config": _shown(example / stage.config),
                                  "init_from": stage.init_from, **timing,
                                  **summarise(runs[stage.name])}
            keep_run(runs[stage.name], staging / stage.name)
        evals = {name: json.loads(run_dir.eval_file(SPLIT).read_text())
                 for name, run_dir in runs.items()}
        task = Task.from_config(runs["sft"].read_config(need_data=False).eval)
        origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        result = {**origin, "example": _shown(example), "split": SPLIT, "stages": stages,
                  "comparisons": comparisons(evals, runs, task, AGAINST_SFT[key])}
        (staging / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        publish(staging, results)
    print_table(result)
    print(f"wrote {results}")


def stage_config(config: Path, stage: Stage, scratch: Path, model: Path | None) -> Path:
    """The config a stage trains with: the example's own, or (``model``: a smoke run) its
    shrunk copy on the tiny model, a reinforcement section shrunk too."""
    if model is None:
        return config
    path = smoke.smoke_config(config, scratch / "config" / stage.name, model)
    raw = yaml.safe_load(path.read_text())
    if "rl" in raw:
        raw["rl"].update(SMOKE_RL)
        path.write_text(yaml.safe_dump(raw, sort_keys=False, allow_unicode=True))
    return path


def train_and_evaluate(stage: Stage, config: Path, scratch: Path, runs: dict[str, RunDir],
                       logs: Path, in_process: bool, wait_idle: bool) -> tuple[dict, RunDir]:
    """``tunelab train`` then ``tunelab eval`` of one stage (logs in ``logs``): each command's
    wall time, the load it started under and the CPUs' share that went to other processes
    meanwhile (above a few percent, its wall time is not this run's alone); the run directory."""
    overrides = ["--set", f"output_dir={scratch / 'runs'}"]
    if stage.init_from:
        overrides += ["--set", f"train.init_from={runs[stage.init_from]}"]
    commands = {"train": ["tunelab", "train", str(config), "--overwrite", *overrides],
                "eval": ["tunelab", "eval", str(config), *overrides]}
    logs.mkdir(parents=True)
    timing = {"wall_s": {}, "waited_for_idle_s": {}, "load_average_at_start": {},
              "other_processes_cpu_share": {}}
    for step, command in commands.items():
        timing["waited_for_idle_s"][step] = wait_until_idle() if wait_idle else 0.0
        timing["load_average_at_start"][step] = [round(x, 2) for x in os.getloadavg()]
        ticks_before, own_before = _cpu_ticks(), _own_cpu_s()
        timing["wall_s"][step] = round(run(command, logs / f"{step}.log", in_process), 1)
        timing["other_processes_cpu_share"][step] = _others_share(ticks_before, own_before)
    name = yaml.safe_load(config.read_text())["name"]
    return timing, RunDir(scratch / "runs" / name)


def wait_until_idle(busy_share: float = 0.2, poll_s: float = 120, limit_s: float = 3600
                    ) -> float:
    """Wait (up to ``limit_s``) while more than ``busy_share`` of the CPUs' time over 15 s goes
    to other processes (this one is idle between commands; a test suite pauses for seconds
    between tests); the seconds waited."""
    started = time.monotonic()
    while (share := _busy_share(15.0)) > busy_share and time.monotonic() - started < limit_s:
        print(f"the CPUs are {share:.0%} busy: waiting {poll_s:.0f} s", flush=True)
        time.sleep(poll_s)
    return round(time.monotonic() - started, 1)


def _busy_share(seconds: float) -> float:
    """The share of all CPUs' time not idle over the next ``seconds``."""
    (total_before, idle_before) = _cpu_ticks()
    time.sleep(seconds)
    total_after, idle_after = _cpu_ticks()
    return 1 - (idle_after - idle_before) / max(1, total_after - total_before)


def _others_share(ticks_before: tuple[int, int], own_before: float) -> float:
    """The share of all CPUs' time since ``ticks_before`` that went to other processes than
    this one and its children (whose CPU seconds were ``own_before`` then)."""
    (total_before, idle_before), (total_after, idle_after) = ticks_before, _cpu_ticks()
    busy_s = ((total_after - total_before) - (idle_after - idle_before)) / _TICKS_PER_S
    own_s = _own_cpu_s() - own_before
    return round(max(0.0, busy_s - own_s) / max(1e-9, (total_after - total_before)
                                                 / _TICKS_PER_S), 3)


def _cpu_ticks() -> tuple[int, int]:
    """All CPUs' clock ticks since boot: (total, idle + iowait), from ``/proc/stat``."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    return sum(fields[:8]), fields[3] + fields[4]  # guest time is counted in user already


def _own_cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def summarise(run_dir: RunDir) -> dict:
    """A stage's manifest figures, its validation before and after training, its pre-flight
    (reinforcement) and its test metrics without the per-example predictions."""
    manifest = run_dir.read_manifest().to_dict()
    validations = [{key: value for key, value in record.items() if key != "time"}
                   for record in read_metrics(run_dir)
                   if any(key.startswith("val_") for key in record)]
    preflight = (json.loads(run_dir.preflight_file.read_text())
                 if run_dir.preflight_file.is_file() else None)
    evaluation = json.loads(run_dir.eval_file(SPLIT).read_text())
    return {"manifest": {key: manifest.get(key) for key in MANIFEST_KEYS},
            "validation": {"before": validations[0], "after": validations[-1]},
            "preflight": preflight, "eval": eval_summary(evaluation)}


def eval_summary(evaluation: dict) -> dict:
    """Base and tuned: every metric with its interval, the hallucination rate with its interval
    (grounded tasks), unparsed outputs; the eval file's own tuned − base comparison."""
    models = {}
    for which, outcome in evaluation["models"].items():
        hallucination = outcome.get("hallucination")
        models[which] = {"metrics": outcome["metrics"],
                         "parse_failures": outcome["parse_failures"],
                         "hallucination": hallucination and {
                             key: hallucination[key]
                             for key in ("rate", "ci", "n_spans", "n_unsupported")}}
    return {"n": evaluation["n"], "primary_metric": evaluation["primary_metric"],
            "models": models, "comparison": evaluation["comparison"]}


def keep_run(run_dir: RunDir, folder: Path) -> None:
    """The run's files a reader checks the numbers against, copied into ``folder``."""
    kept = [run_dir.manifest_path, run_dir.metrics_path, run_dir.preflight_file,
            run_dir.eval_file(SPLIT)]
    for path in kept:
        if path.is_file():
            target = folder / path.relative_to(run_dir.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, target)


# --- the paired comparisons ------------------------------------------------------------------


def comparisons(evals: dict[str, dict], runs: dict[str, RunDir], task: Task,
                against_sft: list[str]) -> dict:
    """Every stage's tuned model against the base, and each of ``against_sft`` against SFT's
    tuned model, on the same test examples: the primary metric, and the hallucination rate
    where the eval files measured it."""
    primary = {name: {which: primary_scores(evaluation, which, task.primary)
                      for which in ("base", "tuned")} for name, evaluation in evals.items()}
    grounding = {name: {which: hallucination_counts(evaluation, which, runs[name])
                        for which in ("base", "tuned")} for name, evaluation in evals.items()}
    pairs = [(f"{name} vs base", (name, "base"), (name, "tuned")) for name in evals]
    pairs += [(f"{name} vs sft", ("sft", "tuned"), (name, "tuned")) for name in against_sft]
    out = {}
    for label, (base_stage, base_model), (tuned_stage, tuned_model) in pairs:
        _same_examples(evals[base_stage], evals[tuned_stage], label)
        entry = {task.primary: compared(primary[base_stage][base_model],
                                        primary[tuned_stage][tuned_model], task)}
        base_counts = grounding[base_stage][base_model]
        tuned_counts = grounding[tuned_stage][tuned_model]
        if base_counts and tuned_counts:
            entry["hallucination_rate"] = compared(ratio_statistic(*base_counts),
                                                   ratio_statistic(*tuned_counts), task,
                                                   n=len(base_counts[0]), exact=False)
        out[label] = entry
    if any(grounding[name]["tuned"] for name in evals):
        out["hallucination_note"] = HALLUCINATION_NOTE
    return out


HALLUCINATION_NOTE = (
    "The eval files keep the hallucination rate (span-weighted: unsupported answers over "
    "non-empty answers) but not which example was flagged; the per-example flags of the paired "
    "comparison were recomputed from each stored prediction and its test record's context with "
    "tunelab.eval.grounding.unsupported_spans (the function tunelab eval calls), and reproduce "
    "every eval file's n_spans and n_unsupported exactly (checked).")


def compared(base, tuned, task: Task, *, n: int | None = None, exact: bool | None = None) -> dict:
    """``paired_comparison`` of one measure each, as ``tunelab eval`` runs it (McNemar where
    the task's primary metric is right/wrong), its fields for the result file."""
    exact_test = task.exact_test if exact is None else exact
    paired = paired_comparison([base], [tuned], n=n, exact_test=exact_test,
                               n_resamples=task.n_resamples, seed=task.seed)
    return {"base": paired["base"], "tuned": paired["tuned"], "value": paired["delta"],
            "ci": paired["ci"], "p_value": paired["p_value"], "p_text": paired["p_text"],
            "significant": paired["significant"], "test": paired["test"], "n": paired["n"]}


def primary_scores(evaluation: dict, which: str, primary: str) -> list[float]:
    """One model's per-example scores of the primary metric, by example index; checked to
    give the eval file's value of the metric (their mean)."""
    outcome = evaluation["models"][which]
    scores = [p["score"] for p in sorted(outcome["predictions"], key=lambda p: p["index"])]
    value = outcome["metrics"][primary]["value"]
    if abs(sum(scores) / len(scores) - value) > 1e-9:
        raise SystemExit(f"{which}'s per-example scores average {sum(scores) / len(scores)}, "
                         f"not its {primary} {value}: the eval file's scores are not the metric")
    return scores


def hallucination_counts(evaluation: dict, which: str, run_dir: RunDir
                         ) -> tuple[list[int], list[int]] | None:
    """(unsupported answers, answers) per test example, for the span-weighted rate: each stored
    prediction checked against its record's context as ``tunelab eval`` does; None where the
    eval file has no hallucination rate. Checked to reproduce the file's counts."""
    stored = evaluation["models"][which].get("hallucination")
    if not stored:
        return None
    config = run_dir.read_config(need_data=False)
    records = [record for path in config.data.test for record in read_records(path)]
    predictions = sorted(evaluation["models"][which]["predictions"], key=lambda p: p["index"])
    n_spans, unsupported = [], []
    for prediction, record in zip(predictions, records, strict=True):
        spans = [prediction["prediction"].strip()] if prediction["prediction"].strip() else []
        context = config.eval.context.format_map(record.fields)
        # the prompt may be cut (train.max_seq_len, the file's last 600 characters): one end
        if context[:30] not in prediction["input"] and context[-30:] not in prediction["input"]:
            raise SystemExit(f"{run_dir.name}: test example {prediction['index']} is not the "
                             f"record at {record.where}")
        n_spans.append(len(spans))
        unsupported.append(len(unsupported_spans(spans, context)))
    if (sum(n_spans), sum(unsupported)) != (stored["n_spans"], stored["n_unsupported"]):
        raise SystemExit(f"{run_dir.name} {which}: recomputed {sum(unsupported)} of "
                         f"{sum(n_spans)} answers unsupported, the eval file says "
                         f"{stored['n_unsupported']} of {stored['n_spans']}")
    return unsupported, n_spans


def _same_examples(first: dict, second: dict, label: str) -> None:
    """Refuse to pair two evaluations unless they scored the same references in the same order."""
    def golds(evaluation: dict) -> list[str]:
        predictions = evaluation["models"]["tuned"]["predictions"]
        return [p["gold"] for p in sorted(predictions, key=lambda p: p["index"])]
    if golds(first) != golds(second):
        raise SystemExit(f"{label}: the two evaluations did not score the same test examples")


# --- output ----------------------------------------------------------------------------------


def publish(staging: Path, results: Path) -> None:
    """``staging``'s entries into ``results``, replacing those of the same name (what others
    keep there stays)."""
    results.mkdir(parents=True, exist_ok=True)
    for entry in staging.iterdir():
        target = results / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
        shutil.move(str(entry), target)


def print_table(result: dict) -> None:
    """Each stage's tuned primary metric, its hallucination rate and its deltas."""
    comparisons_ = result["comparisons"]
    print(f"{'stage':<14} {'test metric [95% CI]':<24} {'halluc.':>7}  {'vs base':<30} "
          f"{'vs sft':<30} {'train s':>7}")
    for name, stage in result["stages"].items():
        tuned = stage["eval"]["models"]["tuned"]
        metric = tuned["metrics"][stage["eval"]["primary_metric"]]
        hallucination = tuned["hallucination"]
        print(f"{name:<14} {_interval(metric['value'], metric['ci']):<24} "
              f"{'' if not hallucination else format(hallucination['rate'], '.3f'):>7}  "
              f"{_delta(comparisons_.get(f'{name} vs base')):<30} "
              f"{_delta(comparisons_.get(f'{name} vs sft')):<30} "
              f"{stage['wall_s']['train']:>7.0f}")


def _delta(entry: dict | None) -> str:
    if entry is None:
        return ""
    primary = next(iter(entry.values()))
    return f"{primary['value']:+.3f} [{primary['ci'][0]:+.3f}, {primary['ci'][1]:+.3f}] " \
           f"{primary['p_text']}"


def _interval(value: float, ci: list[float]) -> str:
    return f"{value:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]"


def _shown(path: Path) -> str:
    """A path as the result file names it: from the repository root."""
    return os.path.relpath(path.resolve(), ROOT)


if __name__ == "__main__":
    main()
