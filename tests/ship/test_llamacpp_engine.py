"""`tunelab serve --engine llama.cpp`: GGUF LoRA adapters, and llama-server behind tunelab's API.

The adapter file is read back with the ``gguf`` package. The serving tests start the real
``tunelab serve --engine llama.cpp`` on two tiny runs (one base, two GGUF LoRA adapters in one
llama-server) and talk to it with the official openai client; their greedy answers are compared
with the own engine's on the same runs. They need a llama-server: on PATH, in
``TUNELAB_LLAMA_SERVER`` or in tunelab's cache (build one with
``python benchmarks/llama_cpp_check.py --build-only``, about 15 minutes on 2 cores).
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import openai
import pytest
from export_runs import GREETINGS, make_run
from safetensors.numpy import load_file

from tunelab.errors import ModelError
from tunelab.ship.gguf import permute
from tunelab.ship.gguf_lora import write_gguf_lora
from tunelab.ship.llamacpp import find_server, free_port
from tunelab.ship.serve import create_app, load_served_models

REVIEW = "Review: the movie was great\nSentiment:"
CHAT = [{"role": "user", "content": "Say hi to Eve"}]
NO_SERVER = ("no llama-server on PATH, in TUNELAB_LLAMA_SERVER or in tunelab's cache; build "
             "one: python benchmarks/llama_cpp_check.py --build-only (~15 min)")


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("llamacpp-runs")
    rng = random.Random(0)
    reviews = [{"text": f"the movie was {word}", "label": label}
               for word, label in (rng.choice([("great", "positive"), ("awful", "negative")])
                                   for _ in range(64))]
    made = {"reviews": make_run(folder / "a", tiny_model_dir, "reviews", reviews, 12,
                                prompt="Review: {text}\nSentiment:", completion=" {label}"),
            "greeter": make_run(folder / "b", tiny_model_dir, "greeter", GREETINGS, 40)}
    return made


def test_the_gguf_lora_adapter_holds_llama_cpps_keys_names_and_shapes(runs, tmp_path):
    import gguf
    from transformers import AutoConfig

    adapter = runs["reviews"] / "adapter"
    base_config = AutoConfig.from_pretrained(json.loads(
        (adapter / "adapter_config.json").read_text())["base_model_name_or_path"])
    written = write_gguf_lora(adapter, base_config, tmp_path / "a.gguf", name="reviews")
    reader = gguf.GGUFReader(tmp_path / "a.gguf")

    def field(key: str):
        return reader.fields[key].contents()

    assert field("general.type") == "adapter"
    assert field("adapter.type") == "lora"
    assert field("adapter.lora.alpha") == pytest.approx(8.0)  # make_run: r 4, alpha 8
    assert field("general.architecture") == "llama"
    tensors = {t.name: t for t in reader.tensors}
    peft = load_file(str(adapter / "adapter_model.safetensors"))
    adapted = {k for k in peft if k.endswith(".lora_A.weight")}
    assert len(tensors) == 2 * len(adapted) == len(written["tensors"])
    hidden, kv_dim = base_config.hidden_size, base_config.num_key_value_heads * (
        base_config.hidden_size // base_config.num_attention_heads)
    # GGUF's ne: innermost first; llama.cpp checks a.ne[0] == in, b.ne[1] == out, a.ne[1] == r
    assert list(tensors["blk.0.attn_q.weight.lora_a"].shape) == [hidden, 4]
    assert list(tensors["blk.0.attn_q.weight.lora_b"].shape) == [4, hidden]
    assert list(tensors["blk.1.attn_k.weight.lora_b"].shape) == [4, kv_dim]
    assert list(tensors["blk.1.ffn_down.weight.lora_a"].shape) == [
        base_config.intermediate_size, 4]
    # A as peft holds it; B of q and k with llama's rotary row permutation, the others as held
    prefix = "base_model.model.model.layers.0."
    q_b = peft[prefix + "self_attn.q_proj.lora_B.weight"]
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight.lora_b"].data),
                                  permute(q_b, base_config.num_attention_heads))
    assert not np.array_equal(permute(q_b, base_config.num_attention_heads), q_b)
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_v.weight.lora_b"].data),
                                  peft[prefix + "self_attn.v_proj.lora_B.weight"])
    np.testing.assert_array_equal(np.asarray(tensors["blk.0.attn_q.weight.lora_a"].data),
                                  peft[prefix + "self_attn.q_proj.lora_A.weight"])


def test_rslora_alpha_is_rescaled_and_dora_is_refused(runs, tmp_path):
    import shutil

    import gguf
    from transformers import AutoConfig

    adapter = tmp_path / "adapter"
    shutil.copytree(runs["reviews"] / "adapter", adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    base_config = AutoConfig.from_pretrained(config["base_model_name_or_path"])
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_rslora": True}))
    write_gguf_lora(adapter, base_config, tmp_path / "rs.gguf", name="rs")
    # peft scales rsLoRA by alpha/sqrt(r) = 8/2, llama.cpp by alpha'/r: alpha' = 16
    alpha = gguf.GGUFReader(tmp_path / "rs.gguf").fields["adapter.lora.alpha"].contents()
    assert alpha == pytest.approx(16.0)
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ModelError, match="DoRA"):
        write_gguf_lora(adapter, base_config, tmp_path / "dora.gguf", name="dora")


# --- llama-server behind tunelab serve ----------------------------------------------------------

needs_server = pytest.mark.skipif(find_server() is None, reason=NO_SERVER)


@pytest.fixture(scope="module")
def served(runs, tmp_path_factory):
    """``tunelab serve --engine llama.cpp`` (the CLI, a subprocess) on both runs."""
    port = free_port()
    cache = tmp_path_factory.mktemp("cache")
    build = find_server()
    env = {**__import__("os").environ, "TUNELAB_CACHE": str(cache),
           "TUNELAB_LLAMA_SERVER": str(build)}
    process = subprocess.Popen(
        [sys.executable, "-m", "tunelab.cli", "serve", str(runs["reviews"]), str(runs["greeter"]),
         "--engine", "llama.cpp", "--port", str(port), "--api-key", "k"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0,
                           timeout=120)
    names, deadline = None, time.monotonic() + 600
    while names is None and process.poll() is None and time.monotonic() < deadline:
        try:
            names = [m.id for m in client.models.list()]
        except openai.APIConnectionError:
            time.sleep(0.2)
    assert process.poll() is None and names is not None, process.stdout.read()
    yield client, names
    process.send_signal(signal.SIGINT)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output


@pytest.fixture(scope="module")
def own(runs):
    """The own engine on the same runs, in this process (its app driven through httpx)."""
    from fastapi.testclient import TestClient

    model, tokenizer, served_models = load_served_models([str(runs["reviews"]),
                                                          str(runs["greeter"])])
    with TestClient(create_app(model, tokenizer, served_models)) as client:
        yield client


@needs_server
def test_llama_cpp_serves_the_same_models_and_greedy_answers_as_the_own_engine(served, own):
    client, names = served
    assert names == [m["id"] for m in own.get("/v1/models").json()["data"]]
    assert names[1:] == ["reviews", "greeter"]
    prompts = [REVIEW, "Review: the movie was awful\nSentiment:", "Say hi to Bob", "Hello"]
    compared = []
    for model in names:
        for prompt in prompts:
            cpp = client.completions.create(model=model, prompt=prompt, max_tokens=8,
                                            temperature=0)
            mine = own.post("/v1/completions", json={"model": model, "prompt": prompt,
                                                     "max_tokens": 8, "temperature": 0}).json()
            compared.append((cpp.choices[0].text, mine["choices"][0]["text"]))
            assert cpp.usage.prompt_tokens == mine["usage"]["prompt_tokens"]
    identical = sum(a == b for a, b in compared)
    # fp32 (own) against F16 weights (GGUF): a near-tie may flip; nearly all must agree
    assert identical >= len(compared) - 1, "\n".join(map(repr, compared))
    # the adapters are applied per request: the two runs answer differently from the base
    assert len({compared[i][0] for i in (0, 4, 8)}) > 1


@needs_server
def test_chat_streams_and_each_adapter_answers_by_name(served, own):
    client, _ = served
    answer = client.chat.completions.create(model="greeter", messages=CHAT, max_tokens=8,
                                            temperature=0)
    mine = own.post("/v1/chat/completions", json={"model": "greeter", "messages": CHAT,
                                                  "max_tokens": 8, "temperature": 0}).json()
    assert answer.choices[0].message.content == mine["choices"][0]["message"]["content"]
    assert "Eve" in answer.choices[0].message.content  # the greeter was trained to greet
    chunks = list(client.chat.completions.create(model="greeter", messages=CHAT, max_tokens=8,
                                                 temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == answer.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    review = client.completions.create(model="reviews", prompt=REVIEW, max_tokens=3,
                                       temperature=0, stop=["\n"])
    assert review.choices[0].text.strip() == "positive"


@needs_server
def test_the_front_refuses_as_it_does_for_the_own_engine(served):
    client, _ = served
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="context"):
        client.completions.create(model="reviews", prompt="word " * 600, max_tokens=2)
    seeded = [client.completions.create(model="reviews", prompt="Hello", max_tokens=6,
                                        temperature=1.0, seed=7).choices[0].text
              for _ in range(2)]
    assert seeded[0] == seeded[1]


def test_vllm_and_unknown_engines_say_what_is_missing(runs):
    from tunelab.errors import ConfigError
    from tunelab.ship.engines import load_engine
    from tunelab.ship.vllm_engine import missing

    with pytest.raises(ConfigError, match="unknown engine 'tgi'"):
        load_engine("tgi", [str(runs["reviews"])])
    lacking = missing()
    if lacking is None:
        pytest.skip("vLLM and a CUDA GPU are here: tunelab serve --engine vllm would start")
    with pytest.raises(ModelError, match="--engine vllm cannot run here") as raised:
        load_engine("vllm", [str(runs["reviews"])])
    assert lacking in raised.value.message and raised.value.fix
