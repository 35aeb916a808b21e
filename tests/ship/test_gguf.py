"""GGUF export: the file reads back with the metadata and shapes written, transformers loads
it with the run's tokenizer and logits close to the merged model, and the Ollama Modelfile
renders conversations as the chat template does; each family tunelab writes (Llama, Llama 3.1,
Mistral, Qwen2, Qwen3, Gemma 3) round-trips, and the others are refused before any weight is
read."""

from __future__ import annotations

import copy
import json
import re
import shutil

import architectures  # tests/ is on sys.path (rootdir conftest)
import numpy as np
import pytest
import torch
from conftest import _corpus
from export_runs import liven_adapter, train_tiny_run
from gguf import GGUFReader
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from tunelab.errors import ModelError
from tunelab.ship import export
from tunelab.ship.export import (
    RELATIVE_TOLERANCE,
    chatml_form,
    check_gguf_metadata,
    export_run,
    modelfile_text,
)
from tunelab.ship.gguf import (
    QUANTS,
    check_gguf_support,
    pre_tokenizer_name,
    quantised_copy,
    required_keys,
    transformers_config,
    write_gguf,
)

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


# --- every family tunelab writes ------------------------------------------------------------

#: families written as GGUF, each with the tensors its llama.cpp architecture adds to Llama's
FAMILIES = {"llama": set(), "llama3": {"rope_freqs.weight"},
            "qwen2": {"blk.0.attn_q.bias", "blk.0.attn_k.bias", "blk.0.attn_v.bias"},
            "qwen3": {"blk.0.attn_q_norm.weight", "blk.0.attn_k_norm.weight"},
            "mistral": set(),
            "gemma3_text": {"blk.0.attn_q_norm.weight", "blk.0.post_attention_norm.weight",
                            "blk.0.post_ffw_norm.weight"}}
ARCHES = {"llama": "llama", "llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
          "mistral": "llama", "gemma3_text": "gemma3"}
GEMMA_CHAT = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}"
              "<end_of_turn>\n{% endfor %}")
TEXT = "Review: the movie was good, 10/10! The plot was slow ünï"


def sentencepiece_style_tokenizer():
    """A tiny Gemma tokenizer (SentencePiece BPE with byte fallback, as transformers 5 holds
    Gemma's tokenizer.model): specials, the 256 byte pieces, then BPE trained offline here."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers.models.gemma.tokenization_gemma import GemmaTokenizer

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]
    backend = Tokenizer(models.BPE())
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    backend.train_from_iterator(_corpus(), trainers.BpeTrainer(vocab_size=400,
                                                               show_progress=False))
    trained = json.loads(backend.to_str())["model"]
    vocab = {t: i for i, t in enumerate(specials + [f"<0x{b:02X}>" for b in range(256)])}
    for token, _ in sorted(trained["vocab"].items(), key=lambda item: item[1]):
        vocab.setdefault(token, len(vocab))
    tokenizer = GemmaTokenizer(vocab=vocab, merges=[tuple(m) for m in trained["merges"]])
    tokenizer.chat_template = GEMMA_CHAT
    return tokenizer


def save_gemma3(folder):
    """Gemma 3 text as llama.cpp runs it: six layers (every sixth global, as llama.cpp fixes it),
    a 4-token window, soft-capped logits, and 3 embedding rows past the tokenizer's vocabulary
    (as Gemma 3 has), which the GGUF drops."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = sentencepiece_style_tokenizer()
    config = Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        vocab_size=len(tokenizer) + 3, sliding_window=4, query_pre_attn_scalar=16,
        final_logit_softcapping=30.0, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():  # norms too: Gemma's start at 0 (= scale 1)
            parameter.normal_(0, 0.1)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory, tiny_model_dir):
    """family name -> a saved tiny model of it (the tiny BPE tokenizer; Gemma its own)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    folders = {}

    def build(name):
        if name not in folders:
            folder = tmp_path_factory.mktemp(name)
            if name == "gemma3_text":
                save_gemma3(folder)
            else:
                architectures.save(name, folder, tokenizer)
            folders[name] = folder
        return folders[name]
    return build


def write(folder, quant, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    shutil.copytree(folder, tmp_path / "gguf")  # transformers reads a GGUF from a folder
    path = tmp_path / "gguf" / f"tiny-{quant}.gguf"
    shapes = write_gguf(model, tokenizer, path, quant=quant, name="tiny",
                        chat_template=tokenizer.chat_template)
    return model, tokenizer, path, shapes


@pytest.mark.parametrize("quant", ["f16", "q8_0"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_each_family_reads_back_with_llama_cpp_keys_and_reproduces_its_logits(
        name, quant, family_dir, tmp_path):
    folder = family_dir(name)
    assert check_gguf_support(str(folder)).tokenizer_model == (
        "llama" if name == "gemma3_text" else "gpt2")
    model, tokenizer, path, shapes = write(folder, quant, tmp_path)
    reader = GGUFReader(path)
    n_vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    assert n_vocab == len(tokenizer) if name == "gemma3_text" else model.config.vocab_size
    for key, value in required_keys(model.config, n_vocab).items():
        assert field(reader, key) == value, key
    assert field(reader, "general.architecture") == ARCHES[name]
    assert check_gguf_metadata(path, shapes, model.config).passed
    tensors = {t.name: t for t in reader.tensors}
    assert FAMILIES[name] <= set(tensors)
    assert ("output.weight" in tensors) != model.config.tie_word_embeddings
    assert [int(n) for n in tensors["token_embd.weight"].shape] == [64, n_vocab]
    assert tensors["blk.1.attn_q.weight"].tensor_type.name == quant.upper()
    assert tensors["blk.1.attn_norm.weight"].tensor_type.name == "F32"

    gguf_tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = tokenizer(TEXT).input_ids
    assert gguf_tokenizer(TEXT).input_ids == ids
    if name == "mistral":  # llama.cpp ignores the window: equal only within it
        ids = ids[:architectures.WINDOW]
    gguf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        config=transformers_config(model.config, n_vocab))
    with torch.no_grad():
        expected = quantised_copy(model, quant)(torch.tensor([ids])).logits[..., :n_vocab]
        actual = gguf_model(torch.tensor([ids])).logits
    # same bound as the export's check: 1e-4 of the largest logit (measured: 0, bit-equal)
    assert (actual - expected).abs().max() <= RELATIVE_TOLERANCE["gguf"] * expected.abs().max()


def test_mistral_window_is_ignored_as_llama_cpp_does(family_dir, tmp_path):
    model, tokenizer, path, _ = write(family_dir("mistral"), "f16", tmp_path)
    assert "sliding window" in check_gguf_support(str(family_dir("mistral"))).notes[0]
    gguf_model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32,
        config=transformers_config(model.config, model.config.vocab_size))
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    assert ids.shape[1] > architectures.WINDOW
    with torch.no_grad():
        expected = quantised_copy(model, "f16")(ids).logits
        actual = gguf_model(ids).logits
    within = architectures.WINDOW
    scale = expected.abs().max()
    assert (actual - expected)[:, :within].abs().max() <= RELATIVE_TOLERANCE["gguf"] * scale
    assert (actual - expected)[:, within:].abs().max() > 0.01 * scale


def test_llama3_rope_freqs_are_llama_cpp_s_divisors(family_dir, tmp_path):
    """Llama 3.1 scaling as llama.cpp applies it: rope_freqs divides each inverse frequency;
    transformers' own llama3 rope must give the same frequencies."""
    model, _, path, _ = write(family_dir("llama3"), "f16", tmp_path)
    factors = next(t for t in GGUFReader(path).tensors if t.name == "rope_freqs.weight")
    rotary = model.model.rotary_emb
    head_dim = model.config.head_dim
    theta = model.config.rope_parameters["rope_theta"]
    plain = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    divisors = torch.from_numpy(np.asarray(factors.data, dtype=np.float32).copy())
    assert set(divisors.tolist()) > {1.0, 8.0}  # high, low and smoothed frequencies all occur
    torch.testing.assert_close(plain / divisors, rotary.inv_freq.float(), rtol=1e-5, atol=0)


def test_gemma3_norms_are_stored_plus_one_and_window_and_softcap_written(family_dir, tmp_path):
    model, _, path, _ = write(family_dir("gemma3_text"), "f16", tmp_path)
    reader = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float32) for t in reader.tensors}
    original = model.model.layers[0].post_feedforward_layernorm.weight.detach().numpy()
    np.testing.assert_allclose(tensors["blk.0.post_ffw_norm.weight"], original + 1, rtol=1e-6)
    assert field(reader, "gemma3.attention.sliding_window") == 4
    assert field(reader, "gemma3.final_logit_softcapping") == pytest.approx(30.0)
    assert field(reader, "tokenizer.ggml.model") == "llama"
    assert field(reader, "tokenizer.ggml.add_space_prefix") is False
    assert field(reader, "tokenizer.ggml.eot_token_id") == 6  # <end_of_turn>


@pytest.mark.parametrize("quant", sorted(set(QUANTS) - {"f16", "q8_0"}))
def test_other_quants_load_in_transformers(quant, family_dir, tmp_path):
    model, tokenizer, path, _ = write(family_dir("qwen2"), quant, tmp_path)
    gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                      dtype=torch.float32)
    ids = torch.tensor([tokenizer(TEXT).input_ids])
    with torch.no_grad():
        expected = quantised_copy(model, quant)(ids).logits
        actual = gguf_model(ids).logits
    assert (actual - expected).abs().max() <= RELATIVE_TOLERANCE["gguf"] * expected.abs().max()


@pytest.mark.parametrize(("name", "reason"), [
    ("phi3", "architecture 'phi3'"), ("qwen3_moe", "architecture 'qwen3_moe'"),
    ("gemma3_text", "layer_types"),  # a pattern llama.cpp's fixed one would not run
])
def test_unsupported_models_are_refused_from_config_json_alone(name, reason, tmp_path):
    config = architectures.config(name)
    if name == "gemma3_text":  # every other layer global, not Gemma 3's five local, one global
        config.layer_types = ["sliding_attention", "full_attention"] * 3
    config.save_pretrained(tmp_path)  # no weights, no tokenizer
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]
    with pytest.raises(ModelError, match=reason) as error:
        check_gguf_support(str(tmp_path))
    message = str(error.value)
    assert "tunelab export RUN --to merged" in message
    assert "python convert_hf_to_gguf.py <merged folder> --outtype f16" in message


def test_export_refuses_before_loading_or_merging(tiny_run, tmp_path, monkeypatch):
    architectures.config("phi3").save_pretrained(tmp_path / "phi3")
    monkeypatch.setattr(export, "merge_source", lambda run_dir: str(tmp_path / "phi3"))

    def no_loading(*args, **kwargs):
        raise AssertionError("the weights were loaded before the check")
    monkeypatch.setattr(export, "load_run_model", no_loading)
    with pytest.raises(ModelError, match="phi3"):
        export_run(tiny_run, "gguf", out=tmp_path / "out" / "gguf")
    assert list((tmp_path / "out").iterdir()) == []


def test_unigram_tokenizer_is_refused(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    folder = tmp_path / "unigram"
    AutoConfig.from_pretrained(tiny_model_dir).save_pretrained(folder)
    backend = Tokenizer(models.Unigram([("<unk>", 0.0), ("a", -1.0)], unk_id=0))
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    with pytest.raises(ModelError, match="Unigram") as error:
        check_gguf_support(str(folder))
    assert "convert_hf_to_gguf.py" in str(error.value)


def test_copy_of_config_is_given_where_transformers_drops_facts(family_dir):
    qwen2 = AutoConfig.from_pretrained(family_dir("qwen2"))
    assert transformers_config(qwen2, qwen2.vocab_size) is None
    gemma = AutoConfig.from_pretrained(family_dir("gemma3_text"))
    given = transformers_config(gemma, 10)
    assert given.vocab_size == 10 and gemma.vocab_size != 10 and given is not gemma
    assert copy.deepcopy(given).query_pre_attn_scalar == 16
