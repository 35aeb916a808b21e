"""assess and sweep judge one task on one test split: a multitask config is refused up front,
from the CLI, with one paragraph naming the place and the fix, and nothing written."""

from __future__ import annotations

from pathlib import Path

from helpers import run_cli  # tests/ is on sys.path (rootdir conftest)

MULTITASK = Path(__file__).resolve().parents[2] / "examples" / "multitask" / "config.yaml"


def test_assess_refuses_a_multitask_config(tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "assess", str(MULTITASK),
                        "--set", f"output_dir={tmp_path}")
    assert code != 0
    assert "tunelab assess takes a single-task config" in err
    assert "data.tasks: sentiment, ner, translation" in err
    assert "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no assessment folder


def test_sweep_refuses_a_multitask_base_naming_the_sweep_files_line(tmp_path, monkeypatch,
                                                                      capsys):
    sweep = tmp_path / "sweep.yaml"
    sweep.write_text(f"output_dir: {tmp_path / 'sweeps'}\ntrials: 2\nsampler: random\n"
                     f"base: {MULTITASK}\nspace:\n  train.lr: [1.0e-4, 1.0e-3]\n")
    code, _, err = run_cli(monkeypatch, capsys, "sweep", str(sweep))
    assert code != 0
    assert "tunelab sweep takes a single-task config" in err
    assert f"{sweep}:4" in err  # the base line of the sweep file
    assert "Traceback" not in err
    assert not (tmp_path / "sweeps").exists()
