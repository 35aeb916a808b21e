"""tunelab compare on a finished tiny sweep and on plain run directories."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from sweeps import write_sweep

from tunelab.errors import RunError
from tunelab.experiments.compare import compare_runs, pareto_front, write_comparison
from tunelab.experiments.space import load_sweep
from tunelab.experiments.sweep import create_sweep, run_worker

pytest.importorskip("optuna")


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """Three finished trials over rank and learning rate, judged on the validation loss."""
    folder = tmp_path_factory.mktemp("compare")
    path = write_sweep(folder, tiny_model_dir, (
        "trials: 3\nsampler: random\nobjective: {metric: val_loss}\n"
        "space:\n  train.lr: {log_uniform: [1.0e-3, 3.0e-2]}\n  method.r: [2, 4]\n"))
    opened = create_sweep(load_sweep(path))
    run_worker(opened.directory, console=Console(quiet=True))
    return opened.directory


def test_a_sweep_is_ranked_diffed_and_its_importance_measured(sweep_dir):
    comparison = compare_runs([sweep_dir])
    runs = comparison["runs"]
    values = [run["value"] for run in runs]
    assert len(runs) == 3 and values == sorted(values)  # val_loss: lowest first
    assert comparison["best"] == runs[0]["name"]
    best_params = runs[0]["params"]
    diffed = {row["key"]: row for row in comparison["diff"]}
    assert diffed["train.lr"]["best"] == pytest.approx(best_params["train.lr"])
    assert diffed["train.lr"]["base"] == 1e-2  # the base config's value
    assert all(run["cost"]["wall_s"] > 0 and run["cost"]["tokens"] > 0 for run in runs)
    [sweep] = comparison["sweeps"]
    assert sweep["states"]["complete"] == 3
    assert set(sweep["importance"]["fanova"]) == {"train.lr", "method.r"}
    assert sum(sweep["importance"]["fanova"].values()) == pytest.approx(1.0)


def test_compare_from_the_cli_writes_one_self_contained_page(sweep_dir, tmp_path):
    output = tmp_path / "page.html"
    done = subprocess.run([sys.executable, "-m", "tunelab.cli", "compare", str(sweep_dir),
                           "--output", str(output)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr
    assert "Runs ranked by val_loss" in done.stdout and "fANOVA" in done.stdout
    page = output.read_text()
    assert page.count("data:image/png;base64,") == 2  # Pareto chart, importance
    assert "trial-00" in page and "train.lr" in page and "http" not in page


def test_plain_runs_compare_against_the_first_one(sweep_dir, tmp_path):
    trials = sorted(sweep_dir.glob("trial-*"))
    comparison = compare_runs(trials)
    assert comparison["metric"] == "val_loss"
    assert {run["name"] for run in comparison["runs"]} == {t.name for t in trials}
    assert write_comparison(comparison, tmp_path / "runs.html").is_file()
    with pytest.raises(RunError, match="neither a run nor a sweep"):
        compare_runs([tmp_path])


def test_pareto_front_keeps_the_runs_nothing_beats_on_cost_and_metric():
    points = [(1.0, 0.60), (2.0, 0.80), (3.0, 0.70), (4.0, 0.90), (1.5, 0.55)]
    assert pareto_front(points, maximize=True) == [0, 1, 3]
    assert pareto_front([(1.0, 2.0), (2.0, 1.0), (3.0, 1.5)], maximize=False) == [0, 1]
