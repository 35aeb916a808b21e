"""tunelab config import: Axolotl, TRL and LLaMA-Factory configs (as their docs write them) become
valid tunelab configs with every key accounted for; a foreign config given to train is named."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from helpers import run_cli

from tunelab.config import config_from_dict
from tunelab.errors import ConfigError
from tunelab.importers import foreign_config_error, import_config, recognise

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "imports"

# Axolotl's examples/llama-3/lora-1b.yml, as its repository has it (wandb keys empty).
AXOLOTL_LORA = """
base_model: NousResearch/Llama-3.2-1B
datasets:
  - path: teknium/GPT4-LLM-Cleaned
    type: alpaca
val_set_size: 0.1
output_dir: ./outputs/lora-out
adapter: lora
lora_model_dir:
sequence_len: 2048
sample_packing: true
eval_sample_packing: true
lora_r: 16
lora_alpha: 32
lora_dropout: 0.05
lora_target_modules: [gate_proj, down_proj, up_proj, q_proj, v_proj, k_proj, o_proj]
wandb_project:
gradient_accumulation_steps: 2
micro_batch_size: 2
num_epochs: 1
optimizer: adamw_8bit
lr_scheduler: cosine
learning_rate: 0.0002
bf16: auto
tf32: false
gradient_checkpointing: true
logging_steps: 1
attn_implementation: flash_attention_2
warmup_ratio: 0.1
evals_per_epoch: 4
saves_per_epoch: 1
weight_decay: 0.0
special_tokens:
  pad_token: "<|end_of_text|>"
"""

# Axolotl's examples/llama-3/instruct-dpo-lora-8b.yml (abridged: the dataset's mappings kept).
AXOLOTL_DPO = """
base_model: meta-llama/Meta-Llama-3-8B-Instruct
load_in_8bit: true
chat_template: llama3
rl: dpo
datasets:
  - path: fozziethebeat/alpaca_messages_2k_dpo_test
    type: chat_template.default
    field_messages: conversation
    field_chosen: chosen
    field_rejected: rejected
val_set_size: 0.05
output_dir: ./outputs/lora-out
sequence_len: 4096
adapter: lora
lora_r: 32
lora_alpha: 16
lora_dropout: 0.05
lora_target_linear: true
gradient_accumulation_steps: 4
micro_batch_size: 2
num_epochs: 4
optimizer: adamw_bnb_8bit
lr_scheduler: cosine
learning_rate: 0.0002
"""

# TRL's documentation: `trl sft --config sft_config.yaml`, and a DPO run with PEFT.
TRL_SFT = """
model_name_or_path: Qwen/Qwen2.5-0.5B
dataset_name: stanfordnlp/imdb
report_to: none
learning_rate: 0.0001
lr_scheduler_type: cosine
"""
TRL_DPO = """
model_name_or_path: Qwen/Qwen2-0.5B-Instruct
dataset_name: trl-lib/ultrafeedback_binarized
learning_rate: 5.0e-6
num_train_epochs: 1
per_device_train_batch_size: 2
max_length: 1024
gradient_accumulation_steps: 8
beta: 0.1
use_peft: true
lora_r: 32
lora_alpha: 16
lora_target_modules: all-linear
output_dir: Qwen2-0.5B-DPO
"""

# LLaMA-Factory's examples/train_lora/qwen3_lora_sft.yaml and its DPO sibling.
LLAMAFACTORY_SFT = """
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
trust_remote_code: true
stage: sft
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
dataset: identity,alpaca_en_demo
template: qwen3_nothink
cutoff_len: 2048
max_samples: 1000
preprocessing_num_workers: 16
dataloader_num_workers: 4
output_dir: saves/qwen3-4b/lora/sft
logging_steps: 10
save_steps: 500
plot_loss: true
overwrite_output_dir: true
save_only_model: false
report_to: none
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 1.0e-4
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
ddp_timeout: 180000000
resume_from_checkpoint: null
"""
LLAMAFACTORY_DPO = """
model_name_or_path: Qwen/Qwen3-4B-Instruct-2507
stage: dpo
do_train: true
finetuning_type: lora
lora_rank: 8
lora_target: all
pref_beta: 0.1
pref_loss: sigmoid
dataset: dpo_en_demo
template: qwen3_nothink
cutoff_len: 2048
output_dir: saves/qwen3-4b/lora/dpo
per_device_train_batch_size: 1
gradient_accumulation_steps: 8
learning_rate: 5.0e-6
num_train_epochs: 3.0
lr_scheduler_type: cosine
warmup_ratio: 0.1
bf16: true
"""


def imported(tmp_path: Path, tool: str, text: str, name: str = "foreign.yaml"):
    path = tmp_path / name
    path.write_text(text)
    result = import_config(tool, path)
    config = config_from_dict(result.config, base_dir=tmp_path)  # as tunelab train reads it
    rows = {row.source: row for row in result.rows}
    return config, rows, result


def test_every_key_of_a_foreign_config_gets_a_row(tmp_path):
    _, rows, result = imported(tmp_path, "axolotl", AXOLOTL_LORA)
    foreign = {key for key, value in yaml.safe_load(AXOLOTL_LORA).items() if value is not None}
    named = " ".join(row.source for row in result.rows)
    assert all(key in named for key in foreign), foreign - set(named.split())


def test_axolotl_lora(tmp_path):
    config, rows, _ = imported(tmp_path, "axolotl", AXOLOTL_LORA)
    assert config.model.path == "NousResearch/Llama-3.2-1B"
    assert config.data.train == ["hf://teknium/GPT4-LLM-Cleaned"]
    assert config.data.validation_split == 0.1
    assert (config.method.kind, config.method.r, config.method.alpha) == ("lora", 16, 32)
    assert config.method.targets == ["gate_proj", "down_proj", "up_proj", "q_proj", "v_proj",
                                     "k_proj", "o_proj"]
    assert (config.train.max_seq_len, config.train.batch_tokens, config.train.grad_accum) == (
        2048, 4096, 2)
    batch = rows["micro_batch_size 2 × sequence_len 2048"]
    assert (batch.target, batch.kind) == ("train.batch_tokens 4096", "translated")
    assert "8192 tokens per optimizer step" in rows["gradient_accumulation_steps 2"].note
    assert (config.train.lr, config.train.schedule, config.train.warmup_ratio) == (
        2e-4, "cosine", 0.1)
    assert config.train.packing and config.train.gradient_checkpointing
    assert config.model.attn_implementation == "flash_attention_2"
    assert (config.output_dir, config.name) == ("outputs", "lora-out")
    assert rows["evals_per_epoch 4"].kind == "not carried"
    assert "special tokens" in rows["special_tokens {pad_token: <|end_of_text|>}"].note


def test_axolotl_dpo(tmp_path):
    config, rows, _ = imported(tmp_path, "axolotl", AXOLOTL_DPO)
    assert config.method.objective == "dpo" and config.method.targets == "all-linear"
    assert config.train.batch_tokens == 2 * 4096 and config.train.epochs == 4
    assert rows["load_in_8bit true"].kind == "not carried"
    assert rows["chat_template llama3"].kind == "not carried"
    assert any(row.source.startswith("datasets[0].field_messages") and row.kind == "not carried"
               for row in rows.values())


def test_an_objective_tunelab_lacks_is_refused(tmp_path):
    (tmp_path / "orpo.yaml").write_text(AXOLOTL_DPO.replace("rl: dpo", "rl: orpo"))
    with pytest.raises(ConfigError) as error:
        import_config("axolotl", tmp_path / "orpo.yaml")
    assert "rl: orpo has no tunelab objective" in error.value.message


def test_trl_sft_takes_trl_defaults_for_what_the_file_leaves_out(tmp_path):
    config, rows, _ = imported(tmp_path, "trl", TRL_SFT)
    assert config.method.objective == "sft" and config.method.kind == "full"
    assert config.data.train == ["hf://stanfordnlp/imdb"]
    assert (config.train.lr, config.train.schedule) == (1e-4, "cosine")
    assert (config.train.epochs, config.train.seed, config.train.warmup_ratio) == (3.0, 42, 0.0)
    assert config.train.batch_tokens == 8 * 1024 and not config.train.packing
    assert rows["num_train_epochs (not set)"].kind == "default"
    assert rows["per_device_train_batch_size 8 (default) × max_length 1024"].target == \
        "train.batch_tokens 8192"


def test_trl_dpo_with_peft(tmp_path):
    config, _, _ = imported(tmp_path, "trl", TRL_DPO)
    assert (config.method.objective, config.method.kind, config.method.beta) == (
        "dpo", "lora", 0.1)
    assert (config.method.r, config.method.alpha, config.method.targets) == (
        32, 16, "all-linear")
    assert (config.train.lr, config.train.batch_tokens, config.train.grad_accum) == (
        5e-6, 2048, 8)
    assert config.name == "Qwen2-0.5B-DPO"


def dataset_info(folder: Path) -> None:
    """LLaMA-Factory's data folder: dataset_info.json and the files it registers."""
    data = folder / "data"
    data.mkdir()
    info = {"identity": {"file_name": "identity.json"},
            "alpaca_en_demo": {"file_name": "alpaca_en_demo.json"},
            "dpo_en_demo": {"file_name": "dpo_en_demo.json", "ranking": True,
                            "formatting": "sharegpt", "columns": {
                                "messages": "conversations", "chosen": "chosen",
                                "rejected": "rejected"}}}
    (data / "dataset_info.json").write_text(json.dumps(info))
    for entry in info.values():
        (data / entry["file_name"]).write_text("[]")


def test_llamafactory_sft_reads_dataset_info(tmp_path):
    dataset_info(tmp_path)
    config, rows, _ = imported(tmp_path, "llamafactory", LLAMAFACTORY_SFT)
    assert config.data.train == [str(tmp_path / "data" / "identity.json"),
                                 str(tmp_path / "data" / "alpaca_en_demo.json")]
    assert (config.method.kind, config.method.r, config.method.alpha) == ("lora", 8, 16)
    assert config.method.targets == "all-linear" and config.method.dropout == 0
    assert (config.train.batch_tokens, config.train.grad_accum, config.train.lr) == (
        2048, 8, 1e-4)
    assert (config.output_dir, config.name) == ("saves/qwen3-4b/lora", "sft")
    assert rows["lora_alpha (not set)"].note == "LLaMA-Factory's default"
    assert rows["template qwen3_nothink"].kind == "not carried"


def test_llamafactory_dpo(tmp_path):
    dataset_info(tmp_path)
    config, _, _ = imported(tmp_path, "llamafactory", LLAMAFACTORY_DPO)
    assert (config.method.objective, config.method.beta) == ("dpo", 0.1)
    assert config.data.train == [str(tmp_path / "data" / "dpo_en_demo.json")]


def test_a_dataset_that_cannot_be_found_is_listed(tmp_path):
    path = tmp_path / "lf.yaml"
    path.write_text(LLAMAFACTORY_SFT)
    result = import_config("llamafactory", path)
    missing = [row for row in result.rows if row.source.startswith("dataset ")]
    assert [row.kind for row in missing] == ["not carried"] * 2
    assert "not registered" in missing[0].note


@pytest.mark.parametrize(("tool", "text"), [("axolotl", AXOLOTL_LORA), ("trl", TRL_DPO),
                                            ("llamafactory", LLAMAFACTORY_SFT)])
def test_each_tool_is_recognised(tool, text):
    assert recognise(yaml.safe_load(text))[0] == tool


def test_a_tunelab_config_with_a_foreign_key_is_not_called_foreign():
    raw = {"name": "x", "model": {"path": "m"}, "base_model": "m", "data": {"train": "t"}}
    assert recognise(raw) is None and foreign_config_error(raw, "c.yaml") is None


@pytest.mark.parametrize("tool", ["axolotl", "trl", "llamafactory"])
def test_the_shipped_examples_import(tool, tmp_path):
    folder = tmp_path / "imports"
    shutil.copytree(EXAMPLES, folder)
    result = import_config(tool, folder / f"{tool}.yaml")
    config = config_from_dict(result.config, base_dir=folder)
    assert (config.train.batch_tokens, config.train.max_seq_len) == (2048, 256)
    assert Path(config.data.train[0]).name in ("sharegpt.jsonl", "prompt_completion.jsonl")
    # written beside the foreign config, the data paths stay relative
    assert not Path(result.config["data"]["train"][0]).is_absolute()


def test_train_names_the_tool_and_the_import_command(tmp_path, monkeypatch, capsys):
    (tmp_path / "axolotl.yaml").write_text(AXOLOTL_LORA)
    code, _, err = run_cli(monkeypatch, capsys, "train", str(tmp_path / "axolotl.yaml"))
    assert code == 2 and "this looks like an Axolotl config" in err
    assert f"tunelab config import --from axolotl {tmp_path / 'axolotl.yaml'}" in err
    assert "did you mean 'path'" not in err


def test_import_then_train_an_axolotl_config_on_sharegpt(tmp_path, tiny_model_dir,
                                                          monkeypatch, capsys):
    folder = tmp_path / "imports"
    shutil.copytree(EXAMPLES, folder)
    monkeypatch.chdir(tmp_path)
    source = folder / "axolotl.yaml"
    code, out, err = run_cli(monkeypatch, capsys, "config", "import", "--from", "axolotl",
                             str(source))
    assert code == 0, err
    written = folder / "axolotl.tunelab.yaml"
    assert yaml.safe_load(written.read_text())["train"]["batch_tokens"] == 8 * 256
    assert "translated" in out and "not carried" in out
    code, _, err = run_cli(monkeypatch, capsys, "config", "import", "--from", "axolotl",
                           str(source))
    assert code == 2 and "--force" in err  # never overwritten silently
    code, out, err = run_cli(monkeypatch, capsys, "train", str(written), "--set",
                             f"model.path={tiny_model_dir}", "--set", "train.max_steps=2",
                             "--set", "train.samples=0")
    assert code == 0, err
    run = tmp_path / "outputs" / "sentiment-axolotl"
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_config_explain_still_works(monkeypatch, capsys):
    code, out, _ = run_cli(monkeypatch, capsys, "config", "--explain", "data.format")
    assert code == 0 and "sharegpt" in out
