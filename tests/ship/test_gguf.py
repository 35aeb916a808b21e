"""GGUF export: the file reads back with the metadata and shapes written, transformers loads
it with the run's tokenizer and logits close to the merged model, and the Ollama Modelfile
renders conversations as the chat template does."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from export_runs import liven_adapter, train_tiny_run
from gguf import GGUFReader
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.errors import ModelError
from tunelab.ship.export import RELATIVE_TOLERANCE, chatml_form, export_run, modelfile_text
from tunelab.ship.gguf import pre_tokenizer_name, quantised_copy

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_TEMPLATE = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                   "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% else %}"
                   "{{ message['content'] }}{% endif %}{% endfor %}")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model_dir):
    run = train_tiny_run(tmp_path_factory.mktemp("gguf"), tiny_model_dir)
    liven_adapter(run, seed=1)
    return run


@pytest.fixture(scope="module")
def merged(tiny_run, tmp_path_factory):
    folder = tmp_path_factory.mktemp("merged") / "merged"
    export_run(tiny_run, "merged", out=folder)
    return AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)


def field(reader: GGUFReader, key: str):
    return reader.fields[key].contents()


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
def test_gguf_reads_back_and_transformers_loads_it_close_to_the_merged_model(
        quant, tiny_run, merged, tmp_path):
    merged_model, merged_tokenizer = merged
    result = export_run(tiny_run, "gguf", out=tmp_path / "gguf", quant=quant)
    assert all(check.passed for check in result.checks), result.checks
    name = f"tiny-run-{quant}.gguf"
    reader = GGUFReader(tmp_path / "gguf" / name)
    config = merged_model.config
    assert field(reader, "general.architecture") == "llama"
    assert field(reader, "llama.block_count") == config.num_hidden_layers
    assert field(reader, "llama.attention.head_count_kv") == config.num_key_value_heads
    assert field(reader, "tokenizer.ggml.model") == "gpt2"
    assert field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert field(reader, "tokenizer.ggml.eos_token_id") == merged_tokenizer.eos_token_id
    assert field(reader, "tokenizer.ggml.bos_token_id") == merged_tokenizer.bos_token_id
    assert field(reader, "tokenizer.ggml.eot_token_id") == merged_tokenizer.convert_tokens_to_ids(
        "<|im_end|>")
    assert field(reader, "tokenizer.chat_template") == merged_tokenizer.chat_template
    assert len(field(reader, "tokenizer.ggml.tokens")) == config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    assert "output.weight" not in tensors  # tied to token_embd, as llama.cpp expects
    q = tensors["blk.0.attn_q.weight"]
    assert [int(n) for n in q.shape] == [config.hidden_size, config.hidden_size]
    assert q.tensor_type.name == quant.upper()
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"

    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf", gguf_file=name,
                                                      dtype=torch.float32)
    gguf_tokenizer = AutoTokenizer.from_pretrained(tmp_path / "gguf", gguf_file=name)
    text = "Review: the movie was good, 10/10!\nSentiment:"
    ids = merged_tokenizer(text).input_ids
    assert gguf_tokenizer(text).input_ids == ids
    with torch.no_grad():
        unquantised = merged_model(torch.tensor([ids])).logits
        expected = quantised_copy(merged_model, quant)(torch.tensor([ids])).logits
        actual = gguf_model(torch.tensor([ids])).logits
    bound = RELATIVE_TOLERANCE["gguf"] * expected.abs().max()
    assert (actual - expected).abs().max() <= bound
    assert (actual - unquantised).abs().max() > bound  # quantisation shows: the bound is tight
    assert any("quantisation error" in note for note in result.notes)


def test_q_and_k_rows_round_trip_through_llama_cpp_order(tiny_run, merged, tmp_path):
    """transformers undoes llama.cpp's q/k permutation on load; without ours, rows would mix."""
    merged_model, _ = merged
    export_run(tiny_run, "gguf", out=tmp_path / "gguf", quant="f16")
    gguf_model = AutoModelForCausalLM.from_pretrained(tmp_path / "gguf",
                                                      gguf_file="tiny-run-f16.gguf")
    for name in ("q_proj", "k_proj"):
        original = getattr(merged_model.model.layers[1].self_attn, name).weight
        loaded = getattr(gguf_model.model.layers[1].self_attn, name).weight
        assert torch.equal(loaded.float(), original.half().float()), name
    raw = {t.name: t for t in GGUFReader(tmp_path / "gguf" / "tiny-run-f16.gguf").tensors}
    stored = np.asarray(raw["blk.1.attn_q.weight"].data, dtype=np.float32)
    assert not np.array_equal(stored, original.detach().half().float().numpy())


def render_go_template(template: str, messages: list[dict]) -> str:
    """Ollama's rendering of the one Go-template shape we write (range over .Messages)."""
    match = re.fullmatch(r"\{\{- range \.Messages \}\}(.*)\{\{ end \}\}(.*)", template, re.S)
    assert match, template
    body, tail = match.groups()
    return "".join(body.replace("{{ .Role }}", m["role"]).replace("{{ .Content }}", m["content"])
                   for m in messages) + tail


def parse_modelfile(text: str) -> dict:
    found = {"stop": [], "system": None, "template": None}
    for key, value in re.findall(r'^(SYSTEM|TEMPLATE) """(.*?)"""', text, re.S | re.M):
        found[key.lower()] = value
    found["stop"] = [json.loads(v) for v in re.findall(r"^PARAMETER stop (.+)$", text, re.M)]
    found["from"] = re.search(r"^FROM (.+)$", text, re.M).group(1)
    return found


@pytest.mark.parametrize("template", ["tiny", "smollm2"])
def test_modelfile_renders_conversations_as_the_chat_template_does(template, tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    chat_template = tokenizer.chat_template if template == "tiny" else SMOLLM2_TEMPLATE
    text, notes = modelfile_text("m.gguf", tokenizer, chat_template)
    modelfile = parse_modelfile(text)
    assert modelfile["from"] == "./m.gguf" and modelfile["stop"] == ["<|im_end|>"] and not notes
    conversations = [[{"role": "user", "content": "Hi there"}],
                     [{"role": "system", "content": "Be brief."},
                      {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"},
                      {"role": "user", "content": "2+2?"}]]
    for messages in conversations:
        expected = tokenizer.apply_chat_template(messages, chat_template=chat_template,
                                                 tokenize=False, add_generation_prompt=True)
        # Ollama puts the Modelfile's SYSTEM first when the request has no system message
        sent = messages
        if modelfile["system"] and messages[0]["role"] != "system":
            sent = [{"role": "system", "content": modelfile["system"]}, *messages]
        assert render_go_template(modelfile["template"], sent) == expected


def test_modelfile_leaves_other_templates_to_the_gguf(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert chatml_form(tokenizer, LLAMA2_TEMPLATE) is None
    text, notes = modelfile_text("m.gguf", tokenizer, LLAMA2_TEMPLATE)
    assert "TEMPLATE" not in text and notes and "template stored in the GGUF" in notes[0]


@pytest.mark.parametrize(("pre_tokenizer", "name"), [
    ({"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}]}, "smollm"),
])
def test_pre_tokenizer_names_follow_llama_cpp(pre_tokenizer, name):
    assert pre_tokenizer_name(pre_tokenizer) == name


def test_unknown_pre_tokenizer_is_refused():
    with pytest.raises(ModelError, match="pre-tokenizer"):
        pre_tokenizer_name({"type": "Whitespace"})


@pytest.mark.slow
def test_embedded_smollm2_run_exports_to_gguf_and_its_adapter_to_the_hub_base(
        embedded_model, tmp_path):
    """The real round trip: SmolLM2 arrives as Q4_1 GGUF, is tuned, and leaves as GGUF."""
    run = train_tiny_run(tmp_path, embedded_model, name="smol")
    liven_adapter(run)
    result = export_run(run, "gguf", quant="q8_0")
    assert [check.passed for check in result.checks] == [True, True, True], result.checks
    reader = GGUFReader(run / "export" / "gguf-q8_0" / "smol-q8_0.gguf")
    assert field(reader, "llama.block_count") == 30
    assert len(field(reader, "tokenizer.ggml.merges")) == 48900
    modelfile = parse_modelfile((run / "export" / "gguf-q8_0" / "Modelfile").read_text())
    assert modelfile["system"].startswith("You are a helpful AI assistant named SmolLM")
    adapter = export_run(run, "adapter")
    assert "vllm serve HuggingFaceTB/SmolLM2-135M-Instruct --enable-lora" in adapter.usage
