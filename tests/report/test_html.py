"""The HTML report: self-contained, escapes user text, shows the numbers, survives missing input."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import re
import shutil
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from tunelab.errors import RunError
from tunelab.eval.result import SCHEMA_VERSION, EvalResult
from tunelab.report.html import pick_examples, write_report

INJECTED = '<script>alert("pwned")</script><img src="https://evil.example/x.png">'
LABELS = ["negative", "neutral", "positive"]
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "screenshot_report.py"
CHROMIUM = Path("/usr/bin/chromium")


def _metric(value: float, half_width: float, n: int) -> dict:
    return {"value": value, "ci": [value - half_width, value + half_width], "n": n}


def _typed(result: dict) -> dict:
    """A hand-made result as ``evaluate`` writes it: the common fields added, checked by the
    schema, so these fixtures cannot drift from what the report really gets."""
    full = {"schema_version": SCHEMA_VERSION, "shots": 0, "ci_level": 0.95,
            "n_resamples": 1000, "predict": "generate", "wall_s": 12.5, "comparison": {},
            **result}
    for outcome in full["models"].values():
        failures = outcome.get("variants", [{}])[0].get("parse_failures",
                                                        {"count": 0, "rate": 0.0})
        outcome.setdefault("parse_failures", failures)
        outcome.setdefault("sensitivity", {})
    return EvalResult.from_dict(full).to_dict()


def _model_eval(accuracy: float, variant_accuracies: list[float], matrix: list[list[int]],
                predictions: list[dict]) -> dict:
    prompts = ["Review: {text}\nSentiment:",
               "Is this review positive, neutral or negative?\n{text}\nAnswer:",
               "Text: {text}\nLabel (negative/neutral/positive):"]
    mean = sum(variant_accuracies) / len(variant_accuracies)
    std = math.sqrt(sum((v - mean) ** 2 for v in variant_accuracies) / len(variant_accuracies))
    return {
        "metrics": {"accuracy": _metric(accuracy, 0.04, 400),
                    "macro_f1": _metric(accuracy - 0.05, 0.05, 400)},
        "variants": [{"prompt": prompt, "metrics": {"accuracy": _metric(value, 0.04, 400)},
                      "parse_failures": {"count": 4 * i, "rate": 0.01 * i}}
                     for i, (prompt, value) in
                     enumerate(zip(prompts, variant_accuracies, strict=True))],
        "sensitivity": {"accuracy": {"mean": mean, "std": std, "min": min(variant_accuracies),
                                     "max": max(variant_accuracies), "n_variants": 3}},
        "confusion": {"labels": LABELS, "matrix": matrix},
        "per_class": {label: {"precision": row[i] / sum(column),
                              "recall": row[i] / sum(row),
                              "f1": 2 * row[i] / (sum(row) + sum(column)), "support": sum(row)}
                      for i, (label, row, column) in
                      enumerate(zip(LABELS, matrix, zip(*matrix, strict=True), strict=True))},
        "predictions": predictions,
    }


def _classification_eval() -> dict:
    texts = ["A gorgeous, moving film with a cast at the top of its game.",
             "Two hours I will never get back.", "It was fine. Nothing special, nothing awful.",
             INJECTED, "The soundtrack alone is worth the ticket.",
             "I laughed, I cried, I checked my watch twice.", "Dull plot, wooden acting.",
             "An ending that lands, after a middle that drags."]
    gold = ["positive", "negative", "neutral", "negative", "positive", "neutral", "negative",
            "neutral"]
    base_answers = ["positive", "neutral", "positive", "negative", "positive", "positive",
                    "negative", "negative"]
    tuned_answers = ["positive", "negative", "neutral", INJECTED, "positive", "positive",
                     "negative", "neutral"]

    def predictions(answers: list[str]) -> list[dict]:
        return [{"index": i, "input": text, "gold": label, "prediction": answer,
                 "score": float(answer == label)}
                for i, (text, label, answer) in
                enumerate(zip(texts, gold, answers, strict=True))]

    base = _model_eval(0.6525, [0.6525, 0.58, 0.61],
                       [[98, 30, 12], [25, 61, 34], [9, 29, 102]], predictions(base_answers))
    tuned = _model_eval(0.8125, [0.8125, 0.79, 0.805],
                        [[121, 14, 5], [10, 94, 16], [4, 26, 110]], predictions(tuned_answers))
    return _typed({
        "name": "sentiment-test", "task": "classification", "split": "test", "n": 400,
        "primary_metric": "accuracy", "predict": "score", "models": {"base": base, "tuned": tuned},
        "comparison": {
            "accuracy": {"base": 0.6525, "tuned": 0.8125, "delta": 0.16, "ci": [0.11, 0.21],
                         "p_value": 0.00002, "significant": True, "test": "mcnemar"},
            "macro_f1": {"base": 0.6025, "tuned": 0.7625, "delta": 0.16, "ci": [0.09, 0.23],
                         "p_value": 0.0004, "significant": True, "test": "paired bootstrap"},
        },
    })


def _qa_eval() -> dict:
    context = "The Eiffel Tower, completed in 1889, is 330 metres tall and stands in Paris."
    questions = ["When was the tower completed?", "How tall is it?", "Where does it stand?",
                 "Who designed it?"]
    gold = ["1889", "330 metres", "Paris", "Gustave Eiffel's company"]
    base_answers = ["1887", "300 metres, built by Napoleon", "Paris", "Napoleon"]
    tuned_answers = ["1889", "330 metres", "in Paris", "Gustave Eiffel, in 1850"]
    base_scores, tuned_scores = [0.0, 0.2, 1.0, 0.0], [1.0, 1.0, 0.8, 0.4]

    def model(answers: list[str], scores: list[float], em: float, rate: float,
              examples: list[dict]) -> dict:
        return {
            "metrics": {"exact_match": _metric(em, 0.05, 250), "f1": _metric(em + 0.1, 0.04, 250)},
            "variants": [{"prompt": "Context: {context}\nQuestion: {question}\nAnswer:",
                          "metrics": {"f1": _metric(em + 0.1, 0.04, 250)},
                          "parse_failures": {"count": 0, "rate": 0.0}}],
            "hallucination": {"rate": rate, "ci": [rate - 0.03, rate + 0.03], "n_spans": 612,
                              "n_unsupported": round(612 * rate), "examples": examples},
            "predictions": [{"index": i, "input": f"{context}\n{q}", "gold": g, "prediction": a,
                             "score": s} for i, (q, g, a, s) in
                            enumerate(zip(questions, gold, answers, scores, strict=True))],
        }

    base = model(base_answers, base_scores, 0.41, 0.187,
                 [{"index": 1, "source": context, "unsupported": ["300 metres", "Napoleon"]},
                  {"index": 3, "source": context, "unsupported": ["Napoleon"]}])
    tuned = model(tuned_answers, tuned_scores, 0.63, 0.064,
                  [{"index": 3, "source": context, "unsupported": ["Gustave Eiffel", "1850"]}])
    return _typed({
        "name": "qa-dev", "task": "qa", "split": "validation", "n": 250,
        "primary_metric": "f1", "models": {"base": base, "tuned": tuned},
        "comparison": {"f1": {"base": 0.51, "tuned": 0.73, "delta": 0.22, "ci": [0.15, 0.29],
                              "p_value": 0.001, "significant": True, "test": "paired bootstrap"},
                       "exact_match": {"base": 0.41, "tuned": 0.63, "delta": 0.22,
                                       "ci": [-0.01, 0.3], "p_value": 0.08,
                                       "significant": False, "test": "paired bootstrap"}},
    })


def _write_basics(run_dir: Path) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    config = {"name": "sentiment-lora",
              "model": {"path": "HuggingFaceTB/SmolLM2-135M-Instruct", "dtype": "auto"},
              "method": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.05,
                         "targets": "all-linear"},
              "data": {"train": ["examples/sentiment/train.jsonl"],
                       "validation": ["examples/sentiment/valid.jsonl"],
                       "prompt": "Review: {text}\nSentiment:", "completion": " {label}"},
              "train": {"epochs": 2, "lr": 2.0e-4, "batch_tokens": 4096, "seed": 0}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    manifest = {
        "name": "sentiment-lora", "seed": 0, "device": "cpu",
        "versions": {"python": "3.11.2", "torch": "2.13.0", "transformers": "4.56.1",
                     "peft": "0.17.0", "tunelab": "0.1.0"},
        "model": {"architecture": "LlamaForCausalLM", "model_type": "llama",
                  "total_params": 136_304_448, "trainable_params": 4_884_480, "dtype": "float32"},
        "data": {"examples/sentiment/train.jsonl": "9f2c" * 16,
                 "examples/sentiment/valid.jsonl": "41ab" * 16},
        "data_report": {"format": "completion", "train_examples": 1200,
                        "validation_examples": 120, "train_tokens": 183_422,
                        "train_target_tokens": 2_400, "truncated": 0},
        "total_steps": 30, "warmup_steps": 3, "status": "finished", "val_loss_before": 2.8734,
        "val_loss_after": 0.4121, "tokens_per_second": 5123.4, "final_train_loss": 0.3951,
        "steps": 30,
    }
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))


def make_run(run_dir: Path) -> Path:
    """A realistic finished run: manifest, config, 30 logged steps, two eval files."""
    _write_basics(run_dir)
    rng = random.Random(0)
    lines, now = [{"step": 0, "val_loss": 2.8734, "time": 1_700_000_000.0}], 1_700_000_000.0
    for step in range(1, 31):
        now += 2.1
        lr = 2e-4 * min(1.0, step / 3) * 0.5 * (1 + math.cos(math.pi * step / 30))
        loss = 0.4 + 2.5 * math.exp(-step / 7) + rng.uniform(-0.15, 0.15)
        lines.append({"step": step, "loss": round(loss, 4), "lr": lr,
                      "grad_norm": round(1.5 * math.exp(-step / 12) + rng.random() * 0.3, 3),
                      "tokens": 4096, "target_tokens": 80, "tokens_per_second": 5123.4,
                      "step_s": 2.05, "time": now})
        if step in (15, 30):
            lines.append({"step": step, "val_loss": 0.9 if step == 15 else 0.4121, "time": now})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    (run_dir / "eval").mkdir()
    (run_dir / "eval" / "test.json").write_text(json.dumps(_classification_eval(), indent=1))
    (run_dir / "eval" / "qa.json").write_text(json.dumps(_qa_eval(), indent=1))
    return run_dir


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    run_dir = make_run(tmp_path_factory.mktemp("report") / "run")
    path = write_report(run_dir)
    return path, path.read_text(encoding="utf-8")


class _Resources(HTMLParser):
    """Collects every tag and every src/href attribute the browser would follow."""

    def __init__(self):
        super().__init__()
        self.tags: list[str] = []
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.links += [value or "" for name, value in attrs if name in ("src", "href", "srcset")]


def test_report_is_written_with_inline_plots(full_report):
    path, page = full_report
    assert path.name == "report.html" and path.is_file()
    images = page.count("data:image/png;base64,") + page.count("<svg")
    assert images >= 4  # loss, schedule, per eval: bars, sensitivity, confusion
    assert "sentiment-lora" in page and "LlamaForCausalLM" in page


def test_report_loads_nothing_from_the_network(full_report):
    _, page = full_report
    parser = _Resources()
    parser.feed(page)
    external = [link for link in parser.links if re.match(r"\s*(https?:)?//", link, re.I)]
    assert external == []
    assert all(link.startswith(("data:", "#")) for link in parser.links)
    assert "script" not in parser.tags and "link" not in parser.tags
    assert "@import" not in page and "url(" not in page


def test_report_escapes_user_text(full_report):
    _, page = full_report
    assert "<script" not in page
    assert "&lt;script&gt;alert(&quot;pwned&quot;)&lt;/script&gt;" in page


def test_report_shows_the_numbers(full_report):
    _, page = full_report
    accuracy = _classification_eval()["models"]["tuned"]["metrics"]["accuracy"]
    shown = [f"{value:.3f}" for value in (accuracy["value"], *accuracy["ci"], 0.6525)]
    for number in (*shown, "2.873", "0.412", "5,123", "+0.160", "p &lt; 0.001"):
        assert number in page, number
    assert "significant" in page and "not significant" in page  # qa exact match is not
    assert "mcnemar" in page and "Gustave Eiffel" in page
    assert "<mark>Napoleon</mark>" in page
    assert "9f2c" * 16 in page and "4.56.1" in page
    assert "could not be drawn" not in page


def test_minimal_run_directory_still_gets_a_report(tmp_path):
    run_dir = tmp_path / "run"
    _write_basics(run_dir)
    output = write_report(run_dir, output=tmp_path / "out" / "minimal.html")
    page = output.read_text()
    assert output == tmp_path / "out" / "minimal.html"
    assert "No training metrics yet" in page and "No evaluation yet" in page
    assert "sentiment-lora" in page and "2.873" in page  # loss card from the manifest


def test_partial_inputs_leave_sections_out_with_a_note(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("name: partial\n")
    (run_dir / "metrics.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 6))
        + "{not json\n")
    only_tuned = _classification_eval()
    del only_tuned["models"]["base"]
    only_tuned["comparison"] = {}
    tuned = only_tuned["models"]["tuned"]
    del tuned["confusion"]
    tuned["variants"] = tuned["variants"][:1]
    (run_dir / "eval" / "a.json").write_text(json.dumps(only_tuned))
    (run_dir / "eval" / "b.json").write_text("{truncated")
    no_models = {**_classification_eval(), "name": "empty", "models": {}, "comparison": {}}
    (run_dir / "eval" / "c.json").write_text(json.dumps(no_models))
    odd_matrix = _classification_eval()
    odd_matrix["models"]["base"]["confusion"]["matrix"] = [[1, 2], [3]]
    (run_dir / "eval" / "d.json").write_text(json.dumps(odd_matrix))
    malformed = _classification_eval()
    malformed["models"]["tuned"]["metrics"]["accuracy"] = "oops"
    malformed["models"]["tuned"]["predictions"] = 7
    (run_dir / "eval" / "e.json").write_text(json.dumps(malformed))
    page = write_report(run_dir).read_text()
    assert "not a square table of counts" in page
    assert "No validation loss logged" in page and "No learning rate logged" in page
    assert "No base model results" in page and "Only one prompt variant" in page
    assert "b.json could not be read" in page and "malformed line" in page
    assert "No model results in this file" in page
    assert "eval/e.json: is not an evaluation result of this tunelab: " \
        "models.tuned.metrics.accuracy" in page
    assert "could not be drawn" not in page


@pytest.mark.parametrize(("version", "message"), [
    (SCHEMA_VERSION + 1, f"has schema version {SCHEMA_VERSION + 1}; this tunelab reads version"),
    (None, "has no schema_version")])
def test_a_result_of_another_schema_version_is_refused(tmp_path, version, message):
    run_dir = tmp_path / "run"
    _write_basics(run_dir)
    (run_dir / "eval").mkdir()
    result = _classification_eval()
    result["schema_version"] = version
    (run_dir / "eval" / "test.json").write_text(json.dumps(result))
    with pytest.raises(RunError, match=message) as caught:
        write_report(run_dir)
    assert "eval/test.json" in caught.value.render() and "tunelab eval" in caught.value.render()
    assert not (run_dir / "report.html").exists()


def test_not_a_run_directory_is_a_clear_error(tmp_path):
    with pytest.raises(RunError, match="not a tunelab run directory"):
        write_report(tmp_path)


def test_worst_examples_put_tuned_mistakes_first():
    def prediction(index: int, answer: str, score: float) -> dict:
        return {"index": index, "input": f"x{index}", "gold": "a", "prediction": answer,
                "score": score}

    models = {
        "base": {"predictions": [prediction(0, "a", 1.0), prediction(1, "b", 0.0),
                                 prediction(2, "a", 1.0), prediction(3, "b", 0.0)]
                 + [prediction(i, "z", 0.9) for i in range(4, 20)]},
        "tuned": {"predictions": [prediction(0, "a", 1.0), prediction(1, "b", 0.0),
                                  prediction(2, "b", 0.0), prediction(3, "a ", 1.0)]
                  + [prediction(i, "y", 0.8) for i in range(4, 20)]},
    }
    picked = [example["index"] for example in pick_examples(models)]
    assert picked[:2] == [2, 1]  # regression (base right) before a shared mistake
    assert picked[2] == 3  # then differing answers, the largest score change first
    assert len(picked) == 10 and 0 not in picked  # agreeing and right: nothing to read


def _screenshot_module():
    spec = importlib.util.spec_from_file_location("screenshot_report", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_report_renders_in_headless_chromium(full_report, tmp_path):
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        pytest.fail("headless Chromium is needed for this test: "
                    "apt-get update && apt-get install -y chromium")
    from PIL import Image

    path, _ = full_report
    png = _screenshot_module().screenshot(path, tmp_path / "report.png")
    assert png.stat().st_size > 20_000
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # not a blank or single-colour page
