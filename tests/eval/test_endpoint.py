"""Prompting baselines from an OpenAI-compatible endpoint: a real `tunelab serve --base` process
on the tiny model answers as the local evaluation does; a stub server for retries and refusals.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from helpers import make_config, quiet

from tunelab.config import config_from_dict
from tunelab.errors import ConfigError, RunError
from tunelab.eval.endpoint import (
    Endpoint,
    Price,
    cost_per_request,
    evaluate_endpoint,
    parse_endpoint,
    parse_price,
)
from tunelab.eval.evaluate import evaluate

LABELS = ["negative", "positive"]
EVAL = {"task": "classification", "labels": LABELS, "predict": "generate",
        "max_new_tokens": 3, "batch_size": 1, "bootstrap": 200, "shots": 2}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_model_dir) -> str:
    """`tunelab serve --base TINY` in its own process; its URL (without /v1)."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "serve", "--base",
                                tiny_model_dir, "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{url}/v1/models", timeout=5).close()
                break
            except (urllib.error.URLError, ConnectionError):
                time.sleep(0.2)
        assert process.poll() is None, process.stdout.read()
        yield url
    finally:
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=60)[0]
    assert process.returncode == 0, output


def review_config(folder: Path, model_dir: str, **evaluation):
    return make_config(folder, model_dir, sizes=(40, 10, 12), evaluation={**EVAL, **evaluation})


def test_the_served_base_answers_as_the_local_evaluation_and_reruns_from_the_cache(
        served, tiny_model_dir, tmp_path):
    config = review_config(tmp_path, tiny_model_dir)
    cache = tmp_path / "cache"
    endpoint = parse_endpoint(f"tiny={served}")  # no /v1, no model: the first one listed
    result = evaluate_endpoint(config, endpoint, split="test", shots=2, prompt=None,
                               cache_dir=cache, console=quiet())
    assert result["endpoint"] == {"name": "tiny", "url": f"{served}/v1",
                                  "model": tiny_model_dir}
    predictions = result["models"]["base"]["predictions"]
    assert result["n"] == len(predictions) == 12 and result["shots"] == 2
    assert [p["index"] for p in predictions] == list(range(12))
    assert {p["score"] for p in predictions} <= {0.0, 1.0}
    accuracy = result["models"]["base"]["metrics"]["accuracy"]
    assert accuracy["ci"][0] <= accuracy["value"] <= accuracy["ci"][1]
    usage = result["usage"]
    assert usage["requests"] == 12 and usage["cached"] == 0 and usage["retries"] == 0
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0
    assert usage["per_request"]["prompt_tokens"] == usage["prompt_tokens"] / 12
    assert result["wall_s"] >= 0

    # the same prompts, demonstrations, generation and scoring as tunelab eval's
    local = evaluate(config, base=True, tuned=False, console=quiet()).to_dict()["models"]["base"]
    assert [p["prediction"] for p in predictions] == [p["prediction"] for p in local["predictions"]]
    assert [p["input"] for p in predictions] == [p["input"] for p in local["predictions"]]
    assert result["models"]["base"]["metrics"] == local["metrics"]

    again = evaluate_endpoint(config, endpoint, split="test", shots=2, prompt=None,
                              cache_dir=cache, console=quiet())
    assert again["usage"]["requests"] == 0 and again["usage"]["cached"] == 12
    assert again["usage"]["prompt_tokens"] == usage["prompt_tokens"]
    assert again["models"]["base"]["predictions"] == predictions

    # an interruption: five answers on disk and a torn sixth line; the rest is asked again
    [file] = cache.iterdir()
    lines = file.read_text().splitlines()
    file.write_text("\n".join(lines[:5]) + "\n" + lines[5][:40])
    resumed = evaluate_endpoint(config, endpoint, split="test", shots=2, prompt=None,
                                cache_dir=cache, console=quiet())
    assert resumed["usage"]["requests"] == 7
    assert resumed["models"]["base"]["predictions"] == predictions
    kept = [json.loads(line) for line in file.read_text().splitlines()[:5] +
            file.read_text().splitlines()[6:]]
    assert len({entry["key"] for entry in kept}) == 12


def test_chat_data_is_asked_as_messages_with_demonstrations(served, tiny_model_dir, tmp_path):
    names = ["Eve", "Ada", "Bob", "Cy", "Dan", "Fay", "Gus", "Hal"]
    for split, chosen in (("train", names[:6]), ("test", names[6:])):
        with open(tmp_path / f"{split}.jsonl", "w") as handle:
            for name in chosen:
                handle.write(json.dumps({"messages": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": f"Say hi to {name}"},
                    {"role": "assistant", "content": f"Hi {name}!"}]}) + "\n")
    config = config_from_dict({
        "name": "greeter", "output_dir": str(tmp_path / "runs"), "model": {"path": tiny_model_dir},
        "data": {"train": str(tmp_path / "train.jsonl"), "test": str(tmp_path / "test.jsonl")},
        "train": {"max_seq_len": 256},
        "eval": {"task": "summarisation", "max_new_tokens": 4, "batch_size": 1, "bootstrap": 200,
                 "shots": 1}})
    endpoint = Endpoint("tiny", f"{served}/v1", model=tiny_model_dir, concurrency=2)
    result = evaluate_endpoint(config, endpoint, split="test", shots=1, prompt=None,
                               cache_dir=tmp_path / "cache", console=quiet())
    [file] = (tmp_path / "cache").iterdir()
    requests = [json.loads(line)["request"] for line in file.read_text().splitlines()]
    assert {request["path"] for request in requests} == {"/chat/completions"}
    roles = [[m["role"] for m in request["messages"]] for request in requests]
    assert roles == [["system", "user", "assistant", "user"]] * 2
    local = evaluate(config, base=True, tuned=False, console=quiet()).to_dict()["models"]["base"]
    assert ([p["prediction"] for p in result["models"]["base"]["predictions"]]
            == [p["prediction"] for p in local["predictions"]])


def test_a_model_the_server_does_not_have_is_a_clear_error(served, tiny_model_dir, tmp_path):
    config = review_config(tmp_path, tiny_model_dir, max_examples=2)
    with pytest.raises(RunError, match=r"404.*no-such-model.*Fix: check the model after #"):
        evaluate_endpoint(config, parse_endpoint(f"tiny={served}/v1/#no-such-model"),
                          split="test", shots=0, prompt=None, cache_dir=tmp_path,
                          console=quiet())


# --- a stub server: retries, refusals, the rate limit ------------------------------------------


class Stub:
    """An HTTP server on a free port answering POSTs with ``replies`` in turn (the last one
    again and again); it keeps each request's body."""

    def __init__(self, replies: list[tuple[int, dict, dict]]):
        self.replies, self.bodies = list(replies), []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                stub.bodies.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                status, headers, body = (stub.replies.pop(0) if len(stub.replies) > 1
                                         else stub.replies[0])
                data = json.dumps(body).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


POSITIVE = (200, {}, {"choices": [{"index": 0, "text": " positive", "finish_reason": "stop"}]})


@pytest.fixture
def stub(request):
    server = Stub(request.param)
    yield server
    server.close()


@pytest.mark.parametrize("stub", [[(503, {"Retry-After": "1"}, {"error": {"message": "busy"}}),
                                   POSITIVE]], indirect=True)
def test_a_503_is_retried_after_its_retry_after(stub, tiny_model_dir, tmp_path):
    config = review_config(tmp_path, tiny_model_dir, max_examples=4)
    started = time.monotonic()
    result = evaluate_endpoint(config, Endpoint("stub", stub.url, model="m", concurrency=1),
                               split="test", shots=0, prompt=None, cache_dir=tmp_path / "cache",
                               console=quiet())
    assert time.monotonic() - started >= 1.0
    assert len(stub.bodies) == 5 and stub.bodies[0] == stub.bodies[1]
    assert stub.bodies[0]["temperature"] == 0 and stub.bodies[0]["stop"] == ["\n\n"]
    assert stub.bodies[0]["prompt"].startswith("Review: the movie was")
    usage = result["usage"]
    assert usage["retries"] == 1 and usage["requests"] == 4
    assert usage["prompt_tokens"] is None and usage["per_request"]["completion_tokens"] is None
    assert {p["prediction"] for p in result["models"]["base"]["predictions"]} == {" positive"}
    assert cost_per_request(usage, Price("stub", 1.0, 2.0))["total_usd"] is None


@pytest.mark.parametrize("stub", [[POSITIVE]], indirect=True)
def test_requests_are_spaced_to_the_rate_limit(stub, tiny_model_dir, tmp_path):
    config = review_config(tmp_path, tiny_model_dir, max_examples=4)
    endpoint = Endpoint("stub", stub.url, model="m", concurrency=4, requests_per_minute=300)
    started = time.monotonic()
    evaluate_endpoint(config, endpoint, split="test", shots=0, prompt=None, cache_dir=tmp_path,
                      console=quiet())
    assert time.monotonic() - started >= 3 * 60 / 300


@pytest.mark.parametrize("stub", [[(401, {}, {"error": {"message": "bad key"}})]], indirect=True)
def test_a_refused_key_names_its_variable(stub, tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("TUNELAB_TEST_KEY", raising=False)
    config = review_config(tmp_path, tiny_model_dir, max_examples=1)
    endpoint = Endpoint("stub", stub.url, model="m", api_key_env="TUNELAB_TEST_KEY")
    with pytest.raises(RunError, match=r"no key \(\$TUNELAB_TEST_KEY is not set\).*bad key"):
        evaluate_endpoint(config, endpoint, split="test", shots=0, prompt=None,
                          cache_dir=tmp_path, console=quiet())
    monkeypatch.setenv("TUNELAB_TEST_KEY", "sk-wrong")
    with pytest.raises(RunError, match=r"the key from \$TUNELAB_TEST_KEY"):
        evaluate_endpoint(config, endpoint, split="test", shots=0, prompt=None,
                          cache_dir=tmp_path, console=quiet())
    assert len(stub.bodies) == 2  # refusals are not retried


def test_an_unreachable_endpoint_is_a_clear_error_after_its_retries(tiny_model_dir, tmp_path):
    config = review_config(tmp_path, tiny_model_dir, max_examples=2)
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(RunError, match=rf"{url}/completions could not be reached after 2 "
                       r"attempts.*Fix: check that the server is running"):
        evaluate_endpoint(config, Endpoint("gone", url, model="m", max_retries=1),
                          split="test", shots=0, prompt=None, cache_dir=tmp_path,
                          console=quiet())


# --- parsing and cost --------------------------------------------------------------------------


def test_endpoints_parse_with_or_without_v1_and_a_model():
    assert parse_endpoint("local=http://127.0.0.1:8000").api_base == "http://127.0.0.1:8000/v1"
    big = parse_endpoint("big=https://api.openai.com/v1/#gpt-4o-mini")
    assert (big.name, big.api_base, big.model) == ("big", "https://api.openai.com/v1",
                                                   "gpt-4o-mini")
    assert parse_endpoint("o=http://localhost:11434#qwen3:0.6b").model == "qwen3:0.6b"


@pytest.mark.parametrize("text", ["http://127.0.0.1:8000", "=http://x", "a b=http://x",
                                  "a=ftp://x", "a=localhost:8000", "a=http://x#"])
def test_malformed_endpoints_are_config_errors(text):
    with pytest.raises(ConfigError, match=r"^--baseline: .*Fix: write NAME=URL"):
        parse_endpoint(text)


def test_prices_parse_and_give_the_cost_of_a_request():
    price = parse_price("big=0.15/0.60")
    assert price == Price("big", 0.15, 0.60)
    usage = {"per_request": {"prompt_tokens": 1000, "completion_tokens": 10}}
    cost = cost_per_request(usage, price)
    assert cost["prompt_usd"] == pytest.approx(0.15e-3)
    assert cost["total_usd"] == pytest.approx(0.15e-3 + 0.6e-5)
    for text in ("big=0.15", "big=a/b", "0.15/0.60", "big=-1/2", "big=1/inf"):
        with pytest.raises(ConfigError, match=r"^--price: .*Fix: write NAME=IN/OUT"):
            parse_price(text)
