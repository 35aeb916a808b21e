"""Progress a user sees: log-file training lines with lr, grad norm, elapsed and ETA; evaluation
bars per model and prompt variant (lines in a log file); offline saves without peft's hub
warnings."""

from __future__ import annotations

import io
import json
import re
import warnings

from rich.console import Console

from tests.helpers import make_config, quiet
from tunelab.progress import duration, training_line
from tunelab.train.loop import train

EVAL = {"task": "classification", "labels": ["negative", "positive"], "bootstrap": 100,
        "max_examples": 10}


def _log_file() -> tuple[Console, io.StringIO]:
    text = io.StringIO()
    return Console(file=text, force_terminal=False, width=200), text


def test_log_file_training_lines_have_lr_grad_norm_elapsed_and_eta(tmp_path, tiny_model_dir):
    console, text = _log_file()
    train(make_config(tmp_path, tiny_model_dir, max_steps=4), console=console)
    lines = [line for line in text.getvalue().splitlines() if line.startswith("step ")]
    assert lines, text.getvalue()
    pattern = (r"step (\d)/4  loss \d+\.\d{4}  lr \d\.\d\de[-+]\d\d  grad norm [\d.e+-]+  "
               r"[\d,]+ tok/s  elapsed \d+s  ETA \d+s")
    assert all(re.fullmatch(pattern, line) for line in lines), lines
    assert lines[-1].startswith("step 4/4") and lines[-1].endswith("ETA 0s")


def test_training_line_eta_comes_from_this_calls_pace():
    # resumed at step 50: 10 steps in 20 s here, 40 left → 80 s
    assert training_line(60, 100, "loss 1.0", elapsed_s=20, steps_done=10) == \
        "step 60/100  loss 1.0  elapsed 20s  ETA 1m20s"
    assert duration(3725) == "1h02m" and duration(59.6) == "1m00s"


def test_eval_shows_progress_per_model_and_prompt_variant(tmp_path, tiny_model_dir):
    from tunelab.eval.evaluate import evaluate

    variants = ["Review: {text}\nSentiment:", "Text: {text}\nLabel:"]
    config = make_config(tmp_path, tiny_model_dir, sizes=(30, 10, 10), max_steps=1,
                         evaluation={**EVAL, "prompt_variants": variants})
    run_dir = train(config, console=quiet()).run_dir
    console, text = _log_file()
    evaluate(config, run_dir=run_dir, console=console)
    done = re.findall(r"^eval (.+): 10 examples in \d+s$", text.getvalue(), re.MULTILINE)
    assert done == ["base, variant 1/2", "base, variant 2/2", "tuned, variant 1/2",
                    "tuned, variant 2/2"]

    terminal = io.StringIO()
    evaluate(config, run_dir=run_dir, console=Console(file=terminal, force_terminal=True,
                                                      width=120))
    shown = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", terminal.getvalue())
    assert re.search(r"eval tuned, variant 2/2 .*10/10 examples", shown)


def test_an_offline_save_prints_no_hub_lookup_warnings(tmp_path, tiny_model_dir, monkeypatch):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.model.adapters import save_final

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           LoraConfig(r=2, target_modules=["q_proj"]))
    # a local folder named by its hub id, as the embedded default is: peft then looks the
    # base's config.json up on the hub
    hub_id = "HuggingFaceTB/SmolLM2-135M-Instruct"
    monkeypatch.setattr("tunelab.model.load.describe_base",
                        lambda name: {"reference": hub_id, "hub_id": hub_id})
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        save_final(model, tokenizer, tmp_path / "adapter")
        assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())[
            "base_model_name_or_path"] == hub_id
        # the same save outside save_final: peft does warn, so the check above can fail
        model.save_pretrained(tmp_path / "plain")
    messages = [str(w.message) for w in caught if "config" in str(w.message)]
    assert messages == ["Could not find a config file in HuggingFaceTB/SmolLM2-135M-Instruct - "
                        "will assume that the vocabulary was not modified."]
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
