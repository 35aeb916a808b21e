"""Every published figure is rendered from a committed result file (scripts/published.py)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("published", ROOT / "scripts" / "published.py")
published = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(published)
_spec = importlib.util.spec_from_file_location("config_reference",
                                               ROOT / "scripts" / "config_reference.py")
config_reference = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(config_reference)


def test_every_published_block_matches_its_committed_result_file():
    problems = [problem for document in published.documents()
                for problem in published.problems_in(document)]
    assert problems == []


def test_every_docs_page_is_checked():
    checked = {path.relative_to(ROOT).as_posix() for path in published.documents()}
    pages = {path.relative_to(ROOT).as_posix() for path in (ROOT / "docs").glob("*.md")}
    assert pages <= checked and "README.md" in checked


def test_the_configuration_reference_is_generated_from_the_current_schema():
    """docs/configuration.md is what `tunelab config --explain` says now; when a field or its
    description changes, `python scripts/config_reference.py` rewrites it."""
    assert (ROOT / "docs" / "configuration.md").read_text() == config_reference.render()
    assert config_reference.main(["--check"]) == 0


GENERATION = {"command": "python benchmarks/generation.py", "git_commit": "0123456789abcdef",
              "machine": {"cpu": "Test CPU", "cpu_cores": 2, "torch": "2.13.0+cpu",
                          "load_average_at_start": [0.5], "load_average_at_end": [0.7]},
              "prompts": 32, "max_new_tokens": 24, "naive_s": 26.1, "batched_s": 5.46,
              "naive_tokens_per_s": 27.4, "batched_tokens_per_s": 130.8, "speedup": 4.78,
              "identical_outputs": "32/32"}


def _document(tmp_path, monkeypatch, body: str, result: dict) -> Path:
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "generation.json").write_text(json.dumps(result))
    document = tmp_path / "README.md"
    document.write_text(body)
    monkeypatch.setattr(published, "ROOT", tmp_path)
    return document


def test_a_block_that_drifted_from_its_result_is_found_and_rewritten(tmp_path, monkeypatch):
    stale = ("Speed:\n<!-- published: generation results/generation.json -->\n"
             "old text, **3.9× faster**\n<!-- /published -->\n")
    document = _document(tmp_path, monkeypatch, stale, GENERATION)
    assert "differs from results/generation.json" in published.problems_in(document)[0]
    assert published.problems_in(document, write=True) == []
    assert "**4.8× faster** (27 → 131 new tokens/s)" in document.read_text()
    assert published.problems_in(document) == []


def test_a_figure_outside_a_block_and_a_result_without_provenance_are_refused(
        tmp_path, monkeypatch):
    text = ("We are 3.9× faster and use 7.4 GB.\n"
            "<!-- published: generation results/generation.json -->\nx\n<!-- /published -->\n")
    result = {key: value for key, value in GENERATION.items() if key != "git_commit"}
    problems = published.problems_in(_document(tmp_path, monkeypatch, text, result))
    assert any("lacks its provenance (git_commit)" in problem for problem in problems)
    assert any("outside a published block: 'We are 3.9×" in problem for problem in problems)


def test_a_link_in_a_block_is_made_relative_to_the_document_that_holds_it(tmp_path, monkeypatch):
    document = _document(tmp_path, monkeypatch, "", GENERATION)
    (tmp_path / "docs").mkdir()
    page = tmp_path / "docs" / "page.md"
    block = "<!-- published: linked results/generation.json -->\n"
    page.write_text(block + "<!-- /published -->\n")
    document.write_text(block + "<!-- /published -->\n")
    monkeypatch.setitem(published.RENDERERS, "linked",
                        lambda result: "![curve](results/generation.json)\n")
    for path in (page, document):
        assert published.problems_in(path, write=True) == []
    assert "![curve](../results/generation.json)" in page.read_text()
    assert "![curve](results/generation.json)" in document.read_text()
