"""The config documents itself: every field has a description where it is declared, and
``tunelab config --explain [KEY]`` prints type, default and description; the choices of
method.kind and eval.task are the registries' kinds."""

from __future__ import annotations

import subprocess
import sys
from typing import get_args

import pytest
from helpers import run_cli
from pydantic import BaseModel

from tunelab.config import (
    Config,
    DataConfig,
    EvalConfig,
    MethodConfig,
    config_from_dict,
    explain,
)
from tunelab.data.formats import FORMATS
from tunelab.errors import ConfigError
from tunelab.eval.tasks import TASKS
from tunelab.model.adapters import METHODS


def sections(model: type[BaseModel] = Config, prefix: str = ""):
    """(dotted key, field) for every leaf field of the schema."""
    for name, field in model.model_fields.items():
        inner = [t for t in (field.annotation, *get_args(field.annotation))
                 if isinstance(t, type) and issubclass(t, BaseModel)]
        if inner:
            yield from sections(inner[0], f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field


def test_every_field_is_documented_where_it_is_declared():
    undocumented = [key for key, field in sections() if not (field.description or "").strip()]
    assert undocumented == []


def test_explain_covers_every_field_with_type_default_and_description():
    docs = {doc.key: doc for doc in explain()}
    assert set(docs) == {key for key, _ in sections()}
    lr = docs["train.lr"]
    assert (lr.type, lr.default) == ("float (> 0)", "0.0002")
    assert "learning rate" in lr.description
    assert docs["name"].default == "required"
    assert docs["train.max_steps"].type == "int | null (≥ 1)"
    assert docs["method.kind"].type == " | ".join(METHODS)


def test_explain_one_key_or_one_section():
    assert [doc.key for doc in explain("train.lr")] == ["train.lr"]
    section = [doc.key for doc in explain("eval")]
    assert section[0] == "eval.task" and all(key.startswith("eval.") for key in section)
    assert len(section) == len(EvalConfig.model_fields)


@pytest.mark.parametrize(("key", "hint"), [("train.lrr", "did you mean 'lr'?"),
                                          ("train.learning_rate", "did you mean 'lr'?"),
                                          ("trian", "did you mean 'train'?")])
def test_explain_an_unknown_key_suggests_the_right_one(key, hint):
    with pytest.raises(ConfigError) as caught:
        explain(key)
    message = caught.value.render()
    assert f"unknown key '{key}'" in message and hint in message and "Known keys here" in message


def test_the_config_choices_are_the_registered_kinds():
    assert set(get_args(MethodConfig.model_fields["kind"].annotation)) == set(METHODS)
    assert set(get_args(EvalConfig.model_fields["task"].annotation)) == set(TASKS)
    assert set(get_args(DataConfig.model_fields["format"].annotation)) == {"auto", *FORMATS}


def test_a_task_kind_says_which_fields_it_requires(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    raw = {"name": "x", "data": {"train": "train.jsonl"}, "eval": {"task": "classification"}}
    with pytest.raises(ConfigError, match="eval.task classification needs eval.labels"):
        config_from_dict(raw, base_dir=tmp_path)
    raw["eval"] = {"task": "qa"}
    assert config_from_dict(raw, base_dir=tmp_path).eval.task == "qa"




def test_chat_template_kwargs_and_strip_thinking(tmp_path):
    (tmp_path / "train.jsonl").write_text('{"text": "hi"}\n')
    raw = {"name": "x", "data": {"train": "train.jsonl"}, "eval": {"task": "qa"}}
    config = config_from_dict(raw, base_dir=tmp_path)
    assert config.data.chat_template_kwargs == {} and config.eval.strip_thinking is True
    raw["data"]["chat_template_kwargs"] = {"enable_thinking": False}
    raw["eval"]["strip_thinking"] = False
    config = config_from_dict(raw, base_dir=tmp_path)
    assert config.data.chat_template_kwargs == {"enable_thinking": False}
    assert config.eval.strip_thinking is False
    # saved with the run and read back (serving reads the run's config.yaml)
    assert config_from_dict(config.model_dump(mode="json"), base_dir=tmp_path) == config
    raw["data"]["chat_template_kwargs"] = {"add_generation_prompt": True}
    with pytest.raises(ConfigError, match="data.chat_template_kwargs: 'add_generation_prompt' "
                       "is set by tunelab's renderer"):
        config_from_dict(raw, base_dir=tmp_path)
    raw["data"]["chat_template_kwargs"] = "enable_thinking: false"
    with pytest.raises(ConfigError, match="data.chat_template_kwargs"):
        config_from_dict(raw, base_dir=tmp_path)
    raw["data"]["chat_template_kwargs"] = {}
    raw["eval"]["strip_thinking"] = "sometimes"
    with pytest.raises(ConfigError, match="eval.strip_thinking"):
        config_from_dict(raw, base_dir=tmp_path)


def test_config_explain_from_the_cli(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "config", "--explain", "train.lr")
    assert code == 0
    assert out.splitlines()[0] == "train.lr  float (> 0)  (default: 0.0002)"
    assert "Peak learning rate of AdamW." in out
    code, out, _ = run_cli(monkeypatch, capsys, "config", "--explain")
    assert code == 0 and "data.prompt  str | null  (default: null)" in out
    assert "method.targets" in out and "[q_proj," in out  # brackets are text, not markup
    code, _, err = run_cli(monkeypatch, capsys, "config", "--explain", "train.lrr")
    assert code == 2 and "unknown key 'train.lrr'" in err and "did you mean 'lr'?" in err


def test_reading_a_config_loads_no_model_or_metric_library():
    """``import tunelab.config`` (every command and the Python API start with it) stays light:
    the registries it reads its choices from import torch, peft and sacrebleu only when used."""
    code = ("import sys, tunelab.config; print(sorted(m for m in ('torch', 'transformers', "
            "'peft', 'sacrebleu', 'datasets') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.strip()
    assert loaded == "[]"
