"""`tunelab serve` through the official openai client: a real uvicorn server on 127.0.0.1.

Two tiny runs (a template-data classifier and a chat greeter) are served on their tiny base;
every answer is compared with what the same model gives offline (``generate_texts``).
"""

from __future__ import annotations

import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
import torch
import uvicorn
import yaml
from export_runs import GREETINGS, copied_run, make_run

from tunelab.data.render import chat_prompt
from tunelab.errors import RunError
from tunelab.eval.generate import generate_texts
from tunelab.model.load import load_model, load_tokenizer
from tunelab.run import load_run_model
from tunelab.ship.serve import ServedModel, bind_socket, create_app, load_served_models

KEY = "sk-test-key"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi to Eve"}]
REVIEW = "Review: the movie was great\nSentiment:"


@pytest.fixture(scope="module")
def runs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("serve-runs")
    rng = random.Random(0)
    reviews = [{"text": f"the movie was {word}", "label": label}
               for word, label in (rng.choice([("great", "positive"), ("awful", "negative")])
                                   for _ in range(64))]
    return {
        "reviews": make_run(folder / "a", tiny_model_dir, "reviews", reviews, 12,
                            prompt="Review: {text}\nSentiment:", completion=" {label}"),
        "greeter": make_run(folder / "b", tiny_model_dir, "greeter", GREETINGS, 40),
    }


class Server:
    """uvicorn in a thread on a socket bound to a free loopback port."""

    def __init__(self, app):
        self.app = app
        listener = bind_socket("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [listener]},
                                       daemon=True)
        self.thread.start()
        for _ in range(600):
            if self.server.started:
                break
            time.sleep(0.05)
        assert self.server.started, "the server did not start"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


@pytest.fixture(scope="module")
def server(runs, tiny_model_dir):
    model, tokenizer, served = load_served_models([str(runs["reviews"]), str(runs["greeter"])])
    running = Server(create_app(model, tokenizer, served, api_key=KEY, max_body_bytes=64_000))
    running.base = served[0].name
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def offline(runs):
    """Greedy answers of each model loaded the ordinary way: base, and base + one adapter."""
    loaded = {"base": load_run_model(runs["reviews"], base=True)[:2],
              "reviews": load_run_model(runs["reviews"])[:2],
              "greeter": load_run_model(runs["greeter"])[:2]}

    def answer(name: str, prompt: str | list[dict], max_tokens: int) -> tuple[str, list[int]]:
        model, tokenizer = loaded[name]
        rendered = chat_prompt(prompt, tokenizer) if isinstance(prompt, list) else None
        text = rendered.text if rendered else prompt
        output = generate_texts(model, tokenizer, [text], max_new_tokens=max_tokens)[0]
        return output, rendered.ids if rendered else tokenizer(text).input_ids
    return answer


def http(method: str, url: str, body: bytes | dict | None = None, headers: dict | None = None,
         key: str | None = KEY) -> tuple[int, dict, str]:
    """A raw HTTP request (stdlib): status, headers and body text, errors included."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    headers = {"Content-Type": "application/json", **(headers or {})}
    if key:
        headers.setdefault("Authorization", f"Bearer {key}")
    request = urllib.request.Request(url, data=data, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read().decode()


def model_id(server, name: str) -> str:
    return server.base if name == "base" else name


def test_models_lists_the_base_and_each_run_by_name(client, server):
    assert [m.id for m in client.models.list()] == [server.base, "reviews", "greeter"]


@pytest.mark.parametrize("name", ["base", "reviews", "greeter"])
def test_chat_answers_as_the_model_does_offline(client, server, offline, name):
    expected, prompt_ids = offline(name, CHAT, 12)
    response = client.chat.completions.create(model=model_id(server, name), messages=CHAT,
                                              max_tokens=12, temperature=0)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    assert response.usage.prompt_tokens == len(prompt_ids)
    assert response.usage.total_tokens == len(prompt_ids) + response.usage.completion_tokens
    assert (choice.finish_reason == "length") == (response.usage.completion_tokens == 12)


def test_adapters_are_switched_per_request(client, server, offline):
    answers = {name: client.completions.create(model=model_id(server, name), prompt=REVIEW,
                                               max_tokens=6, temperature=0).choices[0].text
               for name in ("base", "reviews", "greeter", "base")}
    assert answers == {name: offline(name, REVIEW, 6)[0] for name in answers}
    assert len(set(answers.values())) == 3
    assert answers["reviews"].strip() == "positive"  # what the classifier run learned


def test_greeter_run_answers_as_trained_when_prompted_as_trained(client):
    response = client.chat.completions.create(
        model="greeter", messages=[{"role": "user", "content": "Say hi to Eve"}], temperature=0,
        max_tokens=10)
    assert response.choices[0].message.content == "Hello Eve!"
    assert response.choices[0].finish_reason == "stop"


def test_completion_with_stop_and_several_prompts(client, offline):
    expected = [offline("reviews", prompt, 8)[0] for prompt in (REVIEW, "Review: dull\nSentiment:")]
    response = client.completions.create(model="reviews", temperature=0, max_tokens=8,
                                         prompt=[REVIEW, "Review: dull\nSentiment:"])
    assert [c.text for c in sorted(response.choices, key=lambda c: c.index)] == expected
    cut = client.completions.create(model="reviews", prompt=REVIEW, max_tokens=8, temperature=0,
                                    stop=["iti"])
    assert cut.choices[0].text == expected[0].split("iti")[0]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("name", ["base", "greeter"])
def test_streaming_chat_gives_the_same_text_in_openai_chunks(client, server, name):
    whole = client.chat.completions.create(model=model_id(server, name), messages=CHAT,
                                           max_tokens=16, temperature=0)
    chunks = list(client.chat.completions.create(
        model=model_id(server, name), messages=CHAT, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert reasons[-1] == whole.choices[0].finish_reason and not any(reasons[:-1])
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert len({c.id for c in chunks}) == 1


def test_streaming_completion_ends_with_done(server):
    body = {"model": "reviews", "prompt": REVIEW, "max_tokens": 6, "temperature": 0,
            "stream": True}
    status, headers, text = http("POST", f"{server.url}/v1/completions", body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    lines = [line for line in text.splitlines() if line]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks).strip() == "positive"


def test_seed_makes_sampling_reproducible(client, server):
    def sample(seed: int, n: int = 1, stream: bool = False) -> list[str]:
        kwargs = {"model": server.base, "messages": CHAT, "max_tokens": 12, "temperature": 1.0,
                  "seed": seed, "n": n}
        if stream:
            texts = {}
            for chunk in client.chat.completions.create(**kwargs, stream=True):
                for choice in chunk.choices:
                    texts[choice.index] = texts.get(choice.index, "") + (
                        choice.delta.content or "")
            return [texts[i] for i in range(n)]
        response = client.chat.completions.create(**kwargs)
        return [c.message.content for c in sorted(response.choices, key=lambda c: c.index)]

    assert sample(7) == sample(7) == sample(7, stream=True)
    assert sample(7) != sample(8)
    three = sample(7, n=3)
    assert three == sample(7, n=3, stream=True) and len(set(three)) > 1


def test_concurrent_requests_on_two_adapters_each_get_their_own_answer(client, server):
    jobs = [(name, stream, 4 + 3 * number) for number, (name, stream) in enumerate(
        [(n, s) for n in ("base", "reviews", "greeter") for s in (False, True)] * 2)]

    def ask(job):
        name, stream, max_tokens = job
        kwargs = {"model": model_id(server, name), "messages": CHAT, "max_tokens": max_tokens,
                  "temperature": 0}
        if not stream:
            return client.chat.completions.create(**kwargs).choices[0].message.content
        chunks = client.chat.completions.create(**kwargs, stream=True)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)

    one_by_one = [ask(job) for job in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(ask, jobs))
    assert together == one_by_one


def first_content(line: bytes) -> str:
    """The content delta of one server-sent chat chunk ('' for the role chunk or a blank line)."""
    if not line.startswith(b"data: {"):
        return ""
    return json.loads(line.removeprefix(b"data: "))["choices"][0]["delta"].get("content", "")


def test_a_client_leaving_mid_stream_frees_its_sequence(client, server):
    engine = server.app.state.engine
    budget = 470
    request = {"model": server.base, "messages": CHAT, "max_tokens": budget, "temperature": 0}
    # left alone, this request would run its whole budget: it can only end early if cancelled
    assert client.chat.completions.create(**request).choices[0].finish_reason == "length"
    cancelled_before, passes_before = engine.cancelled_sequences, engine.decode_passes
    streaming = urllib.request.Request(  # urllib closes the socket itself when the response does
        f"{server.url}/v1/chat/completions", data=json.dumps({**request, "stream": True}).encode(),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    with urllib.request.urlopen(streaming, timeout=60) as response:
        # leave only once the sequence is generating: its first content delta has arrived
        while not first_content(response.readline()):
            pass
    for _ in range(1200):
        if engine.cancelled_sequences > cancelled_before:
            break
        time.sleep(0.05)
    assert engine.cancelled_sequences == cancelled_before + 1
    assert engine.running_sequences() == 0
    assert engine.decode_passes - passes_before < budget - 1  # it stopped before its budget


def test_requests_without_the_key_get_401(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, _, text = http("GET", f"{server.url}/v1/models", headers=headers, key=None)
        assert status == 401
        assert json.loads(text)["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    assert http("GET", f"{server.url}/health", key=None)[0] == 200


def chat_body(**changes) -> dict:
    body = {"model": "greeter", "messages": CHAT, "max_tokens": 4}
    body.update(changes)
    return {key: value for key, value in body.items() if value is not None}


BAD_REQUESTS = [
    ("chat/completions", b"{not json", 400, None),
    ("chat/completions", b"[1, 2]", 400, None),
    ("chat/completions", chat_body(model="nobody"), 404, "model"),
    ("chat/completions", chat_body(model=None), 400, "model"),
    ("chat/completions", chat_body(messages=None), 400, "messages"),
    ("chat/completions", chat_body(messages=[]), 400, "messages"),
    ("chat/completions", chat_body(messages=[{"role": "wizard", "content": "hi"}]), 400,
     "messages.0.role"),
    ("chat/completions", chat_body(messages=[{"role": "user"}]), 400, "messages.0.content"),
    ("chat/completions", chat_body(temperature="hot"), 400, "temperature"),
    ("chat/completions", chat_body(temperature=3), 400, "temperature"),
    ("chat/completions", chat_body(stream="yes"), 400, "stream"),
    ("chat/completions", chat_body(n=0), 400, "n"),
    ("chat/completions", chat_body(max_tokens=0), 400, "max_tokens"),
    ("chat/completions", chat_body(max_tokens=100_000), 400, "max_tokens"),
    ("chat/completions", chat_body(stop=["a", "b", "c", "d", "e"]), 400, "stop"),
    ("chat/completions", chat_body(tools=[{"type": "function"}]), 400, "tools.0.function"),
    ("chat/completions", chat_body(logprobs="yes"), 400, "logprobs"),
    ("completions", {"model": "reviews"}, 400, "prompt"),
    ("completions", {"model": "reviews", "prompt": 5}, 400, "prompt"),
    ("completions", {"model": "reviews", "prompt": "movie " * 600}, 400, "prompt"),
    ("completions", {"model": "reviews", "prompt": "x" * 70_000}, 413, None),
]


@pytest.mark.parametrize(("path", "body", "status", "param"), BAD_REQUESTS)
def test_bad_requests_get_openai_shaped_4xx(server, path, body, status, param):
    got, _, text = http("POST", f"{server.url}/v1/{path}", body)
    assert got == status
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if param:
        assert param.split(".")[0] in error["message"]


def test_errors_reach_the_openai_client_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nobody", messages=CHAT)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="greeter", messages=CHAT, max_tokens=10**6)
    status, _, text = http("GET", f"{server.url}/v1/nothing-here")
    assert status == 404 and json.loads(text)["error"]["message"]
    ok = client.chat.completions.create(model="greeter", messages=CHAT, max_tokens=2)
    assert ok.choices[0].message.role == "assistant"


def test_runs_on_different_bases_are_refused(runs, tiny_model_dir_no_template, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    config = yaml.safe_load((runs["greeter"] / "config.yaml").read_text())
    config["model"]["path"] = tiny_model_dir_no_template
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    (other / "adapter").symlink_to(runs["greeter"] / "adapter")
    with pytest.raises(RunError, match="different base models"):
        load_served_models([str(runs["reviews"]), str(other)])
    with pytest.raises(RunError, match="served as 'reviews'"):
        load_served_models([str(runs["reviews"]), f"reviews={runs['greeter']}"])
    with pytest.raises(RunError, match="no config.yaml"):
        load_served_models([str(tmp_path)])


def test_a_base_model_is_served_alone_when_no_run_is_named(tiny_model_dir):
    model, tokenizer, served = load_served_models([], base=tiny_model_dir)
    assert served == [ServedModel(tiny_model_dir, None)]
    running = Server(create_app(model, tokenizer, served))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        assert [m.id for m in client.models.list()] == [tiny_model_dir]
        answer = client.completions.create(model=tiny_model_dir, prompt=REVIEW, max_tokens=6,
                                           temperature=0).choices[0].text
        offline = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
        assert answer == generate_texts(*offline, [REVIEW], max_new_tokens=6)[0]
    finally:
        running.close()
    with pytest.raises(RunError, match="nothing to serve.*tunelab serve --base MODEL"):
        load_served_models([])


def test_runs_copied_from_another_machine_are_served_on_the_base_their_adapters_name(
        runs, tiny_model_dir, tmp_path):
    copies = [copied_run(runs[name], tmp_path / name, model_path=f"/elsewhere/{name}-base")
              for name in ("reviews", "greeter")]  # two machines, two paths, one base
    model, tokenizer, served = load_served_models([str(copy) for copy in copies])
    assert [m.name for m in served] == [str(Path(tiny_model_dir).resolve()), "reviews",
                                        "greeter"]
    engine_model, _, _ = load_run_model(runs["greeter"])
    model.set_adapter("adapter1")
    prompt = torch.tensor([tokenizer(REVIEW).input_ids])
    with torch.no_grad():
        assert model(prompt).logits.equal(engine_model(prompt).logits)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_the_cli_serves_renamed_runs_until_stopped(runs):
    port = free_port()
    command = [sys.executable, "-m", "tunelab.cli", "serve", f"classifier={runs['reviews']}",
               str(runs["greeter"]), "--port", str(port), "--api-key", KEY]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True)
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=KEY,
                               max_retries=0, timeout=60)
        names, deadline = None, time.monotonic() + 600  # imports alone take long on a busy CPU
        while names is None and process.poll() is None and time.monotonic() < deadline:
            try:
                names = [m.id for m in client.models.list()]
            except openai.APIConnectionError:
                time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        assert names is not None, "the server did not answer within 600 s"
        assert names[1:] == ["classifier", "greeter"]
        answer = client.completions.create(model="classifier", prompt=REVIEW, max_tokens=3,
                                           temperature=0)
        assert answer.choices[0].text.strip() == "positive"
    finally:
        process.send_signal(signal.SIGINT)  # Ctrl-C: a graceful shutdown
        output = process.communicate(timeout=120)[0]
    assert process.returncode == 0, output
    assert "Application shutdown complete" in output


@pytest.mark.slow
def test_a_smollm2_run_answers_the_openai_client_as_it_does_offline(embedded_model, tmp_path):
    run = make_run(tmp_path, embedded_model, "smol-greeter", GREETINGS, 6)
    model, tokenizer, served = load_served_models([str(run)])
    running = Server(create_app(model, tokenizer, served))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0,
                               timeout=600)
        assert [m.id for m in client.models.list()] == [embedded_model, "smol-greeter"]
        offline = {name: load_run_model(run, base=name == embedded_model)[:2]
                   for name in (embedded_model, "smol-greeter")}
        answers = {}
        for name, (loaded, loaded_tokenizer) in offline.items():
            prompt = chat_prompt(CHAT, loaded_tokenizer).text
            expected = generate_texts(loaded, loaded_tokenizer, [prompt], max_new_tokens=10)[0]
            answers[name] = client.chat.completions.create(
                model=name, messages=CHAT, max_tokens=10, temperature=0).choices[0].message.content
            streamed = client.chat.completions.create(model=name, messages=CHAT, max_tokens=10,
                                                      temperature=0, stream=True)
            assert answers[name] == expected
            assert "".join(c.choices[0].delta.content or "" for c in streamed) == expected
        assert answers[embedded_model] != answers["smol-greeter"]  # the adapter is applied
    finally:
        running.close()


def test_the_runs_chat_template_kwargs_reach_the_served_prompt(runs, tmp_path):
    """A Qwen3 run trained with enable_thinking false is served with it: the prompt ends in
    the empty think block, as the prompts before its trained answers did."""
    template = (Path(__file__).parent.parent / "data" / "templates" / "qwen3.jinja").read_text()
    run = copied_run(runs["greeter"], tmp_path / "qwen3-greeter")
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"].update(chat_template=template,
                          chat_template_kwargs={"enable_thinking": False})
    (run / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    model, tokenizer, served = load_served_models([str(run)])
    assert served[1].chat_template_kwargs == {"enable_thinking": False}
    thinking_off = chat_prompt(CHAT, tokenizer, chat_template=template,
                               chat_template_kwargs={"enable_thinking": False})
    assert thinking_off.text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    running = Server(create_app(model, tokenizer, served))
    try:
        client = openai.OpenAI(base_url=f"{running.url}/v1", api_key="unused", max_retries=0,
                               timeout=120)
        response = client.chat.completions.create(model="greeter", messages=CHAT,
                                                  max_tokens=1, temperature=0)
        assert response.usage.prompt_tokens == len(thinking_off.ids)
        assert len(thinking_off.ids) > len(chat_prompt(CHAT, tokenizer, chat_template=template).ids)
    finally:
        running.close()
