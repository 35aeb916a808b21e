"""The CLI on real files: bad input exits non-zero with one paragraph naming the place, and
leaves no run directory behind; good input trains, checks data and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

REVIEWS = [{"text": "the movie was good", "label": "positive"},
           {"text": "the movie was bad", "label": "negative"}] * 20


def project(tmp_path: Path, model_dir: str, lines: list[str] | None = None,
            **overrides) -> Path:
    data = tmp_path / "train.jsonl"
    if lines is None:
        lines = [json.dumps(r) for r in REVIEWS]
    data.write_text("\n".join(lines) + "\n")
    config = {"name": "cli-run", "output_dir": str(tmp_path / "runs"),
              "model": {"path": model_dir},
              "data": {"train": "train.jsonl", "validation_split": 0.2,
                       "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
              "train": {"max_steps": 3, "batch_tokens": 128, "max_seq_len": 64, "samples": 1,
                        "max_new_tokens": 2}}
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        config.setdefault(section, {})[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


BAD_DATA = {
    "bad JSON line": ['{"text": "fine", "label": "positive"}', '{"text": "oops", "label": '],
    "missing field": ['{"text": "fine", "label": "positive"}', '{"text": "no label here"}'],
    "wrong type": ['{"text": "fine", "label": "positive"}',
                   '{"text": ["a", "list"], "label": "x"}'],
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_malformed_records_name_file_and_line(case, tmp_path, tiny_model_dir, monkeypatch,
                                              capsys):
    config = project(tmp_path, tiny_model_dir, BAD_DATA[case])
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 2  # a data error: the user's to fix, not a crash
    assert "train.jsonl:2" in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "runs" / "cli-run").exists()


def test_non_utf8_bytes_name_the_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    config = project(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").write_bytes(b'{"text": "ok", "label": "a"}\n'
                                           b'{"text": "caf\xe9", "label": "b"}\n')
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 2 and "train.jsonl:2" in err and "UTF-8" in err
    assert not (tmp_path / "runs" / "cli-run").exists()


def test_empty_file(tmp_path, tiny_model_dir, monkeypatch, capsys):
    config = project(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").write_text("")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 2 and "train.jsonl" in err and "empty" in err.lower()


def test_unknown_config_key_suggests_the_right_one(tmp_path, tiny_model_dir, monkeypatch,
                                                   capsys):
    config = project(tmp_path, tiny_model_dir, train__learning_rate=1e-3)
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 2
    assert "config.yaml:" in err and "train.learning_rate" in err and "did you mean 'lr'" in err


def test_wrong_config_type_names_the_key(tmp_path, tiny_model_dir, monkeypatch, capsys):
    config = project(tmp_path, tiny_model_dir, train__max_steps="many")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 2 and "train.max_steps" in err and "'many'" in err


@pytest.mark.parametrize("model_path", ["./no-such-model", "missing_dir/model"])
def test_missing_model_path(model_path, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    # "missing_dir/model" also reads as a hub id: stay offline rather than retry the hub for a
    # minute (huggingface_hub reads the variable once, at import)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    config = project(tmp_path, model_path)
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 2 and model_path.removeprefix("./") in err, err
    assert not (tmp_path / "runs").exists()


def test_missing_data_file_names_the_key(tmp_path, tiny_model_dir, monkeypatch, capsys):
    config = project(tmp_path, tiny_model_dir)
    (tmp_path / "train.jsonl").rename(tmp_path / "train-data.jsonl")
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 2 and "data.train" in err and "did you mean" in err


def test_nan_loss_stops_with_a_clear_error_and_no_run_left(tmp_path, tiny_model_dir,
                                                           monkeypatch, capsys):
    config = project(tmp_path, tiny_model_dir, train__lr=1e12, train__max_grad_norm=None,
                     train__warmup_ratio=0.0, method__kind="full", train__max_steps=6)
    code, _, err = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 3 and "at step" in err and "train.jsonl:" in err and "lower train.lr" in err
    assert not (tmp_path / "runs" / "cli-run").exists()


def test_train_generate_and_data_check_from_the_cli(tmp_path, tiny_model_dir, monkeypatch,
                                                    capsys):
    config = project(tmp_path, tiny_model_dir)
    code, out, _ = run_cli(monkeypatch, capsys, "train", str(config))
    assert code == 0 and "Validation loss: before" in out
    run = tmp_path / "runs" / "cli-run"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    code, out, _ = run_cli(monkeypatch, capsys, "generate", str(run), "--prompt",
                           "Review: the movie was good\nSentiment:", "--max-new-tokens", "3")
    assert code == 0 and out.strip()
    code, out, err = run_cli(monkeypatch, capsys, "train", "--resume", str(run))
    assert code == 2 and "no complete checkpoint" in err
    report_path = tmp_path / "report.json"
    code, out, _ = run_cli(monkeypatch, capsys, "data", "check", str(config), "--json",
                           str(report_path))
    report = json.loads(report_path.read_text())
    train = report["splits"]["train"]
    # the check sees the run's own split: data.validation_split 0.2 of the 40 records
    assert code == 0 and train["n_records"] == 32
    assert report["splits"]["validation"]["n_records"] == 8
    assert train["exact_duplicates"]["redundant"] == 30  # 2 distinct reviews, 20 copies each
    assert any("duplicate" in warning for warning in report["warnings"])
