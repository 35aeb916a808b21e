"""tunelab export: merged folders load with plain transformers and reproduce base + adapter;
adapters name their base portably and pass or fail vLLM's rules with the fix; bad input is a
clear error that leaves nothing behind."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import architectures  # tests/ is on sys.path (rootdir conftest)
import pytest
import torch
from export_runs import liven_adapter, train_tiny_run
from helpers import run_cli
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.errors import ConfigError, ModelError, RunError
from tunelab.model.load import (
    BASE_SIDECAR,
    EMBEDDED,
    describe_base,
    resolve_adapter_base,
    resolve_model_path,
)
from tunelab.ship.export import RELATIVE_TOLERANCE, export_run, vllm_checks

PROMPTS = ["Review: the movie was good\nSentiment:", "The capital of France is Paris."]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir) -> Path:
    run = train_tiny_run(tmp_path_factory.mktemp("export"), tiny_model_dir)
    liven_adapter(run)
    return run


def logits(model, tokenizer, text: str) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([tokenizer(text).input_ids])).logits[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_merged_folder_loads_without_tunelab_and_equals_base_plus_adapter(
        tiny_run, tiny_model_dir, tmp_path):
    result = export_run(tiny_run, "merged", out=tmp_path / "merged")
    folder = tmp_path / "merged"
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja"):
        assert (folder / name).is_file(), name
    assert not list(folder.glob("adapter*")), "a merged folder carries no adapter"
    merged = AutoModelForCausalLM.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base_logits = [logits(base, tokenizer, p) for p in PROMPTS]
    tuned = PeftModel.from_pretrained(base, tiny_run / "adapter")  # peft, independently
    for prompt, before in zip(PROMPTS, base_logits, strict=True):
        expected, actual = logits(tuned, tokenizer, prompt), logits(merged, tokenizer, prompt)
        bound = RELATIVE_TOLERANCE["merged"] * expected.abs().max()
        assert (actual - expected).abs().max() <= bound
        # the adapter matters, so the check above could fail
        assert (before - expected).abs().max() > 100 * bound
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(tiny_model_dir).chat_template
    assert result.checks and all(check.passed for check in result.checks)
    recorded = json.loads((folder / "tunelab_export.json").read_text())
    assert recorded["checks"][0]["value"] <= recorded["checks"][0]["tolerance"]


def test_adapter_names_its_base_portably_and_resolves_back(tiny_run, tiny_model_dir, tmp_path):
    sidecar = json.loads((tiny_run / "adapter" / BASE_SIDECAR).read_text())
    assert sidecar["reference"] == str(Path(tiny_model_dir).resolve())
    assert sidecar["weights_sha256"] == {
        "model.safetensors": sha256(Path(tiny_model_dir) / "model.safetensors")}
    assert sidecar["dequantised_from_gguf"] is False

    export_run(tiny_run, "adapter", out=tmp_path / "adapter")
    copied = tmp_path / "adapter"
    adapter_config = json.loads((copied / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == sidecar["reference"]
    assert resolve_adapter_base(copied) == sidecar["reference"]
    # peft loads the exported folder, tunelab's sidecar beside it
    base = AutoModelForCausalLM.from_pretrained(resolve_adapter_base(copied))
    assert isinstance(PeftModel.from_pretrained(base, copied), PeftModel)


def test_a_base_with_other_weights_is_not_taken_for_the_adapters_base(tiny_model_dir,
                                                                      tmp_path):
    base_copy = tmp_path / "base"
    shutil.copytree(tiny_model_dir, base_copy)
    run = train_tiny_run(tmp_path / "work", str(base_copy))
    assert resolve_adapter_base(run / "adapter") == str(base_copy.resolve())
    model = AutoModelForCausalLM.from_pretrained(base_copy)
    with torch.no_grad():
        model.model.norm.weight.mul_(2.0)
    model.save_pretrained(base_copy)
    with pytest.raises(ModelError, match="sha256") as error:
        resolve_adapter_base(run / "adapter")
    assert str(base_copy.resolve()) in str(error.value)


def test_embedded_base_is_named_by_its_upstream_hub_id_and_resolves_to_the_embedded_copy(
        embedded_model, tmp_path):
    base = describe_base(resolve_model_path(embedded_model))
    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert base["reference"] == EMBEDDED
    assert base["hub_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base["dequantised_from_gguf"] is True
    assert list(base["weights_sha256"]) == [gguf_name]
    # an adapter trained elsewhere on the same weights names them by hub id and hash only
    (tmp_path / BASE_SIDECAR).write_text(json.dumps({**base, "reference": "/elsewhere/smollm2"}))
    assert resolve_adapter_base(tmp_path) == EMBEDDED
    other = {**base, "reference": "/elsewhere/smollm2", "weights_sha256": {gguf_name: "0" * 64}}
    (tmp_path / BASE_SIDECAR).write_text(json.dumps(other))
    assert resolve_adapter_base(tmp_path) == base["hub_id"]  # not the embedded copy


def write_adapter(folder: Path, names: list[str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file({name: torch.zeros(2, 2) for name in names}, folder / "adapter_model.safetensors")
    return folder / "adapter_model.safetensors"


@pytest.mark.parametrize(("adapter_config", "rule", "fix"), [
    ({"r": 64, "target_modules": ["q_proj"]}, "rank", "--max-lora-rank 64"),
    ({"r": 1024, "target_modules": ["q_proj"]}, "rank", "method.r"),
    ({"r": 8, "target_modules": ["q_proj"], "rank_pattern": {"v_proj": 32}}, "rank",
     "--max-lora-rank 32"),
    ({"r": 8, "target_modules": ["q_proj", "lm_head"]}, "lm_head", "method.targets"),
    ({"r": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, "modules_to_save",
     "method.targets"),
    ({"r": 8, "target_modules": ["q_proj"], "use_dora": True}, "DoRA", "method.kind: lora"),
])
def test_vllm_rules_name_the_failing_rule_and_the_fix(adapter_config, rule, fix, tmp_path):
    weights = write_adapter(tmp_path, ["base_model.model.model.layers.0.q_proj.lora_A.weight"])
    checks = vllm_checks(adapter_config, weights, max_lora_rank=16)
    failed = [check for check in checks if not check.passed]
    assert len(failed) == 1 and rule in failed[0].name and fix in failed[0].detail, failed


def test_vllm_rules_pass_a_plain_lora_and_catch_embedding_lora_by_its_weights(tmp_path):
    plain = write_adapter(tmp_path / "plain", ["base_model.model.q_proj.lora_A.weight"])
    assert all(c.passed for c in vllm_checks({"r": 16, "target_modules": ["q_proj"]}, plain, 16))
    embedding = write_adapter(tmp_path / "emb", [
        "base_model.model.model.embed_tokens.lora_embedding_A"])
    checks = vllm_checks({"r": 16, "target_modules": "q_proj|embed"}, embedding, 16)
    assert [c.name for c in checks if not c.passed] == ["vLLM: no lm_head or embedding LoRA"]


def test_cli_exports_an_adapter_that_vllm_would_reject_with_the_rules_and_fixes(
        tiny_model_dir, tmp_path, monkeypatch, capsys):
    run = train_tiny_run(tmp_path, tiny_model_dir, name="wide",
                         method={"kind": "lora", "r": 32, "alpha": 32,
                                 "targets": ["q_proj", "v_proj", "lm_head"]})
    code, out, err = run_cli(monkeypatch, capsys, "export", str(run), "--to", "adapter")
    assert code == 0, err
    out = " ".join(out.split())  # rich wraps long lines
    assert "FAIL" not in out  # advisory: the adapter is still a valid PEFT adapter
    assert "no lm_head or embedding LoRA" in out and "method.targets: all-linear" in out
    assert "rank 32 > --max-lora-rank 16" in out
    assert f"--lora-modules wide={run / 'export' / 'adapter'} --max-lora-rank 32" in out
    assert (run / "export" / "adapter" / "adapter_model.safetensors").is_file()


def test_cli_errors_name_the_problem_and_write_nothing(tiny_run, tmp_path, monkeypatch, capsys):
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tmp_path / "nope"), "--to",
                           "merged")
    assert code != 0 and "not a tunelab run directory" in err and "Traceback" not in err
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tiny_run), "--to", "onnx")
    assert code != 0 and "--to" in err and "merged, gguf, adapter" in err
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tiny_run), "--to", "gguf",
                           "--quant", "q4_k")
    assert code != 0 and "--quant" in err and "q8_0" in err
    existing = tmp_path / "taken"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, err = run_cli(monkeypatch, capsys, "export", str(tiny_run), "--to", "merged",
                           "--out", str(existing))
    assert code != 0 and "already exists" in err
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"], "no partial folders left"


def test_a_failed_export_leaves_no_folder(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    phi3 = architectures.save("phi3", tmp_path / "phi3", tokenizer)  # no GGUF writer for it
    run = train_tiny_run(tmp_path / "work", str(phi3))
    with pytest.raises(ModelError, match="cannot write this model") as error:
        export_run(run, "gguf", out=tmp_path / "out" / "gguf")
    assert "--to merged" in str(error.value)
    assert list((tmp_path / "out").iterdir()) == []


def test_full_fine_tune_has_no_adapter_to_export(tiny_model_dir, tmp_path):
    run = train_tiny_run(tmp_path, tiny_model_dir, method={"kind": "full"})
    with pytest.raises(RunError, match="no adapter"):
        export_run(run, "adapter")
    assert not (run / "export" / "adapter").exists()
    result = export_run(run, "merged")
    assert all(check.passed for check in result.checks)


def test_unknown_kind_is_a_config_error(tiny_run):
    with pytest.raises(ConfigError, match="unknown export kind"):
        export_run(tiny_run, "tflite")
