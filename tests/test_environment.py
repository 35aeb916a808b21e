"""``tunelab --version``, ``tunelab env`` and ``tunelab init --example``: what a user pastes into
a bug report, and a shipped example copied out so that it trains from any folder."""

from __future__ import annotations

import json
from importlib import metadata
from pathlib import Path

import pytest
import torch
import yaml
from helpers import run_cli, run_ok

import tunelab
from tunelab.config import load_config
from tunelab.environment import PACKAGES
from tunelab.examples_init import example_names, examples_root


def test_version_prints_the_package_version(monkeypatch, capsys):
    assert run_ok(monkeypatch, capsys, "--version") == f"tunelab {tunelab.__version__}\n"
    assert tunelab.__version__ == metadata.version("tunelab")


def test_env_reports_versions_devices_machine_and_cache(monkeypatch, capsys, tmp_path):
    cache = tmp_path / "cache"
    (cache / "models" / "SmolLM2-abc").mkdir(parents=True)
    (cache / "models" / "SmolLM2-abc" / "model.safetensors").write_bytes(b"0" * 4096)
    (cache / "llama.cpp-1.0").mkdir()
    (cache / "llama.cpp-1.0" / "build_info.json").write_text(
        json.dumps({"llama_cpp_version": "version: 1 (build 1)"}))
    monkeypatch.setenv("TUNELAB_CACHE", str(cache))
    out = run_ok(monkeypatch, capsys, "env")
    lines = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip()
             for line in out.splitlines() if ":" in line}
    assert lines["tunelab"].startswith(tunelab.__version__)
    assert lines["torch"].startswith(torch.__version__)
    assert ("CUDA devices: " in lines["torch"]) == torch.cuda.is_available()
    assert lines["cache"] == str(cache)
    assert "models/SmolLM2-abc  4 KiB" in out
    assert "llama.cpp-1.0" in out and "(version: 1 (build 1))" in out
    for name in PACKAGES:  # every package named, with its installed version or the absence
        try:
            expected = metadata.version(name)
        except metadata.PackageNotFoundError:
            expected = "not installed"
        assert any(line.split() == [name, *expected.split()] for line in out.splitlines()), name
    report = json.loads(run_ok(monkeypatch, capsys, "env", "--json"))
    assert report["packages"]["transformers"] == metadata.version("transformers")
    assert report["cpu_count"] >= 1 and report["memory_total_bytes"] > 0
    assert report["torch"]["cuda_available"] == torch.cuda.is_available()


def test_init_writes_the_sentiment_example_that_loads_from_any_folder(monkeypatch, capsys,
                                                                       tmp_path):
    monkeypatch.chdir(tmp_path)
    out = run_ok(monkeypatch, capsys, "init", "--example", "sentiment")
    folder = tmp_path / "sentiment"
    assert f"tunelab train {folder / 'config.yaml'}" in out
    source = examples_root() / "sentiment"
    assert all((folder / name).is_file() for name in ("train.jsonl", "valid.jsonl", "test.jsonl"))
    assert (folder / "train.jsonl").read_bytes() == (source / "train.jsonl").read_bytes()
    assert not (folder / "prepare.py").exists() and not (folder / "results").exists()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    config = load_config(folder / "config.yaml")
    assert config.data.train == [str(folder / "train.jsonl")]
    assert config.run_dir == folder / "runs" / "sentiment-lora"
    # the comments of the shipped config are kept
    assert (folder / "config.yaml").read_text().startswith("# Sentiment of movie-review")


def test_init_copies_data_from_outside_the_example_in(monkeypatch, capsys, tmp_path):
    run_ok(monkeypatch, capsys, "init", "--example", "sentiment/gemma3", str(tmp_path / "g3"))
    raw = yaml.safe_load((tmp_path / "g3" / "config.yaml").read_text())
    assert raw["data"]["train"] == "sentiment-train.jsonl"
    assert (tmp_path / "g3" / "sentiment-train.jsonl").read_bytes() == \
        (examples_root() / "sentiment" / "train.jsonl").read_bytes()


@pytest.mark.parametrize("name", example_names())
def test_every_example_stands_alone_after_init(name, monkeypatch, capsys, tmp_path):
    folder = tmp_path / "copy"
    run_ok(monkeypatch, capsys, "init", "--example", name, str(folder))
    monkeypatch.chdir(tmp_path)
    for path in folder.glob("*.yaml"):
        raw = yaml.safe_load(path.read_text())
        assert "../" not in json.dumps(raw), path  # nothing named outside the copy
        if "name" in raw and "base" not in raw:  # a run config (not a sweep file)
            config = load_config(path)
            assert config.run_dir.parent == folder / "runs"
            if config.train.init_from:  # a sibling config's run, where that one writes it
                assert Path(config.train.init_from).parent == folder / "runs"


def test_init_refuses_a_folder_that_is_not_empty(monkeypatch, capsys, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, _, err = run_cli(monkeypatch, capsys, "init", "--example", "ner", str(folder))
    assert code == 2
    assert str(folder) in err and "--force" in err and "not empty" in err
    assert not (folder / "config.yaml").exists()
    run_ok(monkeypatch, capsys, "init", "--example", "ner", str(folder), "--force")
    assert (folder / "config.yaml").exists() and (folder / "notes.txt").read_text() == "keep me"


def test_init_names_the_examples_when_one_is_unknown(monkeypatch, capsys, tmp_path):
    code, _, err = run_cli(monkeypatch, capsys, "init", "--example", "sentimnt",
                           str(tmp_path / "x"))
    assert code == 2 and "no example named 'sentimnt'" in err
    assert "sentiment, sentiment/chat" in err
    assert not (tmp_path / "x").exists()
