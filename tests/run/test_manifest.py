"""The manifest: typed and versioned; a manifest from before versions reads as version 1, a
newer one is refused, and what train() writes reads back as the same Manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunelab.config import config_from_dict
from tunelab.errors import RunError
from tunelab.run.directory import RunDir
from tunelab.run.manifest import SCHEMA_VERSION, Manifest, hash_file

REPO = Path(__file__).resolve().parents[2]
#: Manifests of real runs, committed before manifests had a version.
COMMITTED = sorted(REPO.glob("examples/**/results/manifest.json"))


def started(tmp_path: Path) -> Manifest:
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a"}\n')
    config = config_from_dict({"name": "typed", "output_dir": str(tmp_path / "runs"),
                               "data": {"train": str(data)}, "train": {"seed": 7}})
    return Manifest.start(
        config, device="cpu", model={"architecture": "LlamaForCausalLM", "total_params": 10},
        data_report={"format": "text", "train_examples": 1}, total_steps=4, warmup_steps=1,
        plan={"predicted_peak_bytes": 1234, "predicted_tokens_per_second": 5.5,
              "predicted_wall_s": 9.0}, allocator={"name": "system"},
        mixture={"mixing": "weights", "rates": {"a": 0.25, "b": 0.75}})


def test_a_manifest_round_trips_through_the_run_directory(tmp_path):
    manifest = started(tmp_path)
    assert manifest.status == "running" and not manifest.finished
    assert manifest.name == "typed" and manifest.seed == 7
    [(path, digest)] = manifest.data.items()
    assert digest == hash_file(path) and len(digest) == 64
    assert manifest.versions["python"] and "torch" in manifest.versions
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_manifest(manifest)
    written = json.loads(run.manifest_path.read_text())
    assert written["schema_version"] == SCHEMA_VERSION
    assert "val_loss_after" not in written  # not measured yet: left out, not null
    assert run.read_manifest() == manifest

    done = manifest.finish(val_loss_before=2.0, val_loss_after=0.5, tokens_per_second=100.0,
                           final_train_loss=0.4, steps=4, wall_s=12.345, train_s=10.04,
                           train_tokens=1000, measured_peak_rss_bytes=2**30)
    assert done.finished and done.wall_s == 12.3 and done.train_s == 10.0
    assert done.plan.predicted_wall_s == 9.0 and done.mixture.rates == {"a": 0.25, "b": 0.75}
    run.write_manifest(done)
    assert run.read_manifest() == done
    assert manifest.status == "running"  # finish() returns a new manifest


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.parent.parent.relative_to(REPO)))
def test_manifests_from_before_versions_read_as_version_1(path):
    raw = json.loads(path.read_text())
    assert "schema_version" not in raw
    manifest = RunDir(path.parent).read_manifest()
    assert manifest.schema_version == 1 and manifest.finished
    assert manifest.steps == raw["steps"] and manifest.wall_s == raw["wall_s"]
    assert manifest.plan.predicted_wall_s == raw["plan"]["predicted_wall_s"]
    # nothing lost, nothing added (a null is left out: it reads back as the same None)
    assert manifest.to_dict() == {"schema_version": 1, **{key: value for key, value in raw.items()
                                                           if value is not None}}


def test_committed_manifests_exist():
    assert len(COMMITTED) >= 5


def test_a_newer_manifest_is_refused(tmp_path):
    manifest = started(tmp_path).to_dict()
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    with pytest.raises(RunError, match="manifest schema version 2; this tunelab reads version "
                       "1") as error:
        RunDir(tmp_path).read_manifest()
    assert "manifest.json" in error.value.render() and "pip install" in error.value.render()
    with pytest.raises(RunError, match="schema version 2"):  # the report refuses it too
        RunDir(tmp_path).read_manifest(notes=[])


def test_a_wrong_field_is_named(tmp_path):
    manifest = started(tmp_path).to_dict()
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "steps": "many"}))
    with pytest.raises(RunError, match="is not a run manifest of this tunelab: steps"):
        RunDir(tmp_path).read_manifest()
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "stpes": 3}))
    notes: list[str] = []
    assert RunDir(tmp_path).read_manifest(notes=notes) is None
    assert "stpes" in notes[0] and notes[0].endswith("Left out.")
