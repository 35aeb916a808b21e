"""`tunelab serve` for what tunelab trains: tools, tool calls, log-probs; what it refuses.

A tiny run is trained to answer "Weather in NAME" with the call ``get_weather({"city": NAME})``
(tunelab's ``<tool_call>`` rendering, the tiny model's ChatML template having no tool support);
the real openai client talks to the real server. Prompts are compared with what training
tokenizes, log-probs with the model's own log-softmax.
"""

from __future__ import annotations

import json
import logging
import shutil

import openai
import pytest
import torch
from export_runs import NAMES
from test_serve import Server, http

from tunelab.config import config_from_dict
from tunelab.data.formats import to_example
from tunelab.data.records import Record
from tunelab.data.tokenize import eval_prompts, tokenize_examples
from tunelab.run import load_run_model
from tunelab.ship.serve import _chat_prompt_ids, create_app, load_served_models
from tunelab.ship.tool_calls import ToolCallStream, read_tool_calls
from tunelab.train.loop import train

TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "Weather now",
                                      "parameters": {"type": "object", "properties": {
                                          "city": {"type": "string"}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "set_timer",
                                      "parameters": {"type": "object", "properties": {
                                          "minutes": {"type": "integer"}}}}},
]
# a Hermes / Qwen2.5-style template that renders tools and tool calls itself
TOOLS_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n{{ c.function | tojson }}\n"
    "</tool_call>{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def weather_call(city: str, call_id: str = "call_0") -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": call_id, "type": "function",
         "function": {"name": "get_weather", "arguments": json.dumps({"city": city})}}]}


def conversation(city: str) -> list[dict]:
    """Two turns: an earlier call and its result, then a new request."""
    return [{"role": "user", "content": "Weather in Ann"}, weather_call("Ann"),
            {"role": "tool", "tool_call_id": "call_0", "content": '{"celsius": 12}'},
            {"role": "assistant", "content": "12 degrees."},
            {"role": "user", "content": f"Weather in {city}"}]


@pytest.fixture(scope="module")
def long_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model with 2,048 positions (rotary: the same weights), room for tool lists."""
    folder = tmp_path_factory.mktemp("tiny-long") / "model"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2048}))
    return str(folder)


@pytest.fixture(scope="module")
def caller(long_model_dir, tmp_path_factory):
    """A finished tiny LoRA run that answers "Weather in NAME" with get_weather(NAME)."""
    folder = tmp_path_factory.mktemp("tool-run")
    rows = [{"messages": [{"role": "user", "content": f"Weather in {name}"}, weather_call(name)],
             "tools": TOOLS} for name in NAMES * 4]
    for split, part in (("train", rows), ("valid", rows[:4])):
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
    config = config_from_dict({
        "name": "caller", "output_dir": str(folder / "runs"), "model": {"path": long_model_dir},
        "method": {"kind": "lora", "r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(folder / "train.jsonl"), "validation": str(folder / "valid.jsonl")},
        "train": {"max_steps": 100, "lr": 1e-2, "batch_tokens": 4096, "max_seq_len": 1024,
                  "samples": 0, "seed": 0}})
    from rich.console import Console
    return train(config, console=Console(quiet=True)).run_dir


@pytest.fixture(scope="module")
def server(caller):
    model, tokenizer, served = load_served_models([str(caller)])
    running = Server(create_app(model, tokenizer, served))
    running.base = served[0].name
    yield running
    running.close()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def tuned(caller):
    model, tokenizer = load_run_model(caller)[:2]
    return model.eval(), tokenizer


def training_prompt_ids(record: dict, tokenizer, chat_template: str | None = None) -> list[int]:
    """The ids training puts before the record's last assistant turn."""
    example = to_example(Record(record, "data.jsonl", 1), "chat")
    prompt = eval_prompts([example], tokenizer, chat_template=chat_template)[0].ids
    trained = tokenize_examples([example], tokenizer, max_seq_len=4096,
                                chat_template=chat_template)[0]
    assert trained.input_ids[:len(prompt)] == prompt  # what training read, token for token
    return prompt


# --- tools rendered as training renders them --------------------------------------------------


@pytest.mark.parametrize("template", [None, TOOLS_TEMPLATE], ids=["fallback", "native"])
def test_tools_and_tool_turns_are_rendered_as_training_renders_them(tuned, template):
    _, tokenizer = tuned
    messages = conversation("Bob")
    record = {"messages": [*messages, weather_call("Bob", "call_1")], "tools": TOOLS}
    served = _chat_prompt_ids(messages, tokenizer, template, tools=TOOLS)
    assert served == training_prompt_ids(record, tokenizer, template)


def test_the_served_prompt_is_the_training_prompt_through_the_client(client, tuned):
    _, tokenizer = tuned
    messages = conversation("Cleo")
    response = client.chat.completions.create(model="caller", messages=messages, tools=TOOLS,
                                              max_tokens=1, temperature=0)
    record = {"messages": [*messages, weather_call("Cleo", "call_1")], "tools": TOOLS}
    assert response.usage.prompt_tokens == len(training_prompt_ids(record, tokenizer))


# --- tool calls read back ---------------------------------------------------------------------


def offline_answer(tuned, ids: list[int], max_new_tokens: int = 60) -> str:
    model, tokenizer = tuned
    with torch.no_grad():
        output = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                do_sample=False, eos_token_id=tokenizer.eos_token_id,
                                pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(output[0, len(ids):], skip_special_tokens=True)


@pytest.mark.parametrize("name", ["Dan", "Hana"])
def test_the_trained_call_comes_back_as_tool_calls(client, tuned, name):
    messages = [{"role": "user", "content": f"Weather in {name}"}]
    response = client.chat.completions.create(model="caller", messages=messages, tools=TOOLS,
                                              temperature=0, max_tokens=60)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message.content
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function"
    assert call.function.name == "get_weather"
    assert list(json.loads(call.function.arguments)) == ["city"]  # the 2-layer model may
    # copy the wrong name; the call served is exactly the one it writes offline
    ids = _chat_prompt_ids(messages, tuned[1], None, tools=TOOLS)
    _, offline = read_tool_calls(offline_answer(tuned, ids))
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in offline] \
        == [(call.function.name, json.loads(call.function.arguments))]


def test_streamed_tool_calls_accumulate_in_the_openai_client(client):
    messages = [{"role": "user", "content": "Weather in Eve"}]
    with client.chat.completions.stream(model="caller", messages=messages, tools=TOOLS,
                                        temperature=0, max_tokens=60) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert not choice.message.content
    [call] = choice.message.tool_calls
    assert call.function.name == "get_weather"
    plain = client.chat.completions.create(model="caller", messages=messages, tools=TOOLS,
                                           temperature=0, max_tokens=60)
    assert plain.choices[0].message.tool_calls[0].function.arguments == call.function.arguments
    assert plain.choices[0].message.content is None


def test_a_tool_result_sent_back_continues_the_conversation(client, tuned):
    messages = [{"role": "user", "content": "Weather in Finn"}]
    first = client.chat.completions.create(model="caller", messages=messages, tools=TOOLS,
                                           temperature=0, max_tokens=60)
    message = first.choices[0].message  # sent back as the openai client's own object
    [call] = message.tool_calls
    result = {"role": "tool", "tool_call_id": call.id, "content": '{"celsius": 20}'}
    second = client.chat.completions.create(
        model="caller", messages=[*messages, message, result], tools=TOOLS, temperature=0,
        max_tokens=4)
    assert second.choices[0].message.role == "assistant"
    as_trained = {"role": "assistant", "content": None, "tool_calls": [
        {"id": call.id, "type": "function", "function": {
            "name": call.function.name, "arguments": call.function.arguments}}]}
    record = {"messages": [*messages, as_trained, result,
                           {"role": "assistant", "content": "20 degrees."}], "tools": TOOLS}
    assert second.usage.prompt_tokens == len(training_prompt_ids(record, tuned[1]))


def test_tool_choice_none_required_and_named(client):
    messages = [{"role": "user", "content": "Weather in Ann"}]

    def ask(choice, **options):
        return client.chat.completions.create(model="caller", messages=messages, tools=TOOLS,
                                              tool_choice=choice, temperature=0, max_tokens=60,
                                              **options).choices[0]

    none = ask("none")
    assert none.finish_reason == "stop" and not none.message.tool_calls
    assert "<tool_call>" not in (none.message.content or "")
    required = ask("required")
    assert required.finish_reason == "tool_calls"
    assert required.message.tool_calls[0].function.name == "get_weather"
    # a named function is forced: the answer starts with its name, the model writes arguments
    named = ask({"type": "function", "function": {"name": "set_timer"}})
    if named.message.tool_calls:
        assert [c.function.name for c in named.message.tool_calls] == ["set_timer"]
    else:  # the tiny model's arguments did not parse: its text, never an error
        assert named.message.content.startswith('<tool_call>\n{"name": "set_timer"')
    with client.chat.completions.stream(
            model="caller", messages=messages, tools=TOOLS, temperature=0, max_tokens=60,
            tool_choice={"type": "function", "function": {"name": "get_weather"}}) as stream:
        streamed = stream.get_final_completion().choices[0]
    assert streamed.message.tool_calls[0].function.name == "get_weather"


def test_a_malformed_call_is_returned_as_content(client, server):
    # the base model never learned the format: after the forced start it writes no JSON
    for stream in (False, True):
        options = {"model": server.base, "temperature": 0, "max_tokens": 12, "tools": TOOLS,
                   "messages": [{"role": "user", "content": "Weather in Bob"}],
                   "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
        if stream:
            with client.chat.completions.stream(**options) as events:
                try:
                    choice = events.get_final_completion().choices[0]
                except openai.LengthFinishReasonError as cut:  # the client's parse helper
                    choice = cut.completion.choices[0]  # refuses an answer cut at max_tokens
        else:
            choice = client.chat.completions.create(**options).choices[0]
        assert choice.finish_reason in ("length", "stop")
        assert not choice.message.tool_calls
        assert choice.message.content.startswith('<tool_call>\n{"name": "get_weather", '
                                                 '"arguments":')


@pytest.mark.parametrize("text", [
    "plain answer",
    "  Let me look.\n<tool_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {\"a\": 1}}\n</tool_call>\n<tool_call>\n"
    "{\"name\": \"g\", \"arguments\": {}}\n</tool_call>",
    "<tool_call>\n{\"name\": \"f\", \"arguments\": {oops}\n</tool_call>", "{\"not\": \"a call\"}",
    "\n\n<tool_", "<tool_call>"])
def test_a_streamed_answer_splits_as_the_whole_answer_does(text):
    content, calls = read_tool_calls(text)
    for size in (1, 3, 7):
        stream = ToolCallStream()
        sent = "".join(stream.feed(text[i:i + size]) for i in range(0, len(text), size))
        rest, streamed = stream.finish()
        assert (sent + rest or None, [c["function"] for c in streamed or []]) == (
            content, [c["function"] for c in calls or []])


# --- log-probabilities ------------------------------------------------------------------------


def reference_logprobs(tuned, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """log_softmax of the model's logits at each generated position (teacher-forced)."""
    model, _ = tuned
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1:-1]
    return torch.log_softmax(logits.float(), -1)


def test_chat_logprobs_are_the_models_log_softmax(client, tuned):
    model, tokenizer = tuned
    messages = [{"role": "user", "content": "Weather in Bob"}]
    response = client.chat.completions.create(model="caller", messages=messages, temperature=0,
                                              max_tokens=8, logprobs=True, top_logprobs=3)
    entries = response.choices[0].logprobs.content
    assert len(entries) == response.usage.completion_tokens == 8
    prompt = _chat_prompt_ids(messages, tokenizer, None)
    with torch.no_grad():  # the greedy tokens, offline
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False,
                                pad_token_id=tokenizer.eos_token_id)[0, len(prompt):].tolist()
    reference = reference_logprobs(tuned, prompt, greedy)
    for position, (entry, token) in enumerate(zip(entries, greedy, strict=True)):
        assert entry.token == tokenizer.decode([token])
        assert entry.logprob == pytest.approx(reference[position, token].item(), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(
            reference[position].topk(3).values.tolist(), abs=1e-4)
        assert entry.top_logprobs[0].token == entry.token  # greedy: the likeliest token
    text = b"".join(bytes(e.bytes) for e in entries).decode()
    assert text == response.choices[0].message.content
    # the stream reports the same tokens and values
    chunks = client.chat.completions.create(model="caller", messages=messages, temperature=0,
                                            max_tokens=8, logprobs=True, top_logprobs=3,
                                            stream=True)
    streamed = [e for chunk in chunks for choice in chunk.choices if choice.logprobs
                for e in choice.logprobs.content]
    assert [(e.token, round(e.logprob, 5)) for e in streamed] == [
        (e.token, round(e.logprob, 5)) for e in entries]
    plain = client.chat.completions.create(model="caller", messages=messages, max_tokens=2)
    assert plain.choices[0].logprobs is None


def test_completion_logprobs_in_the_legacy_shape(client):
    response = client.completions.create(model="caller", prompt="Weather in", max_tokens=5,
                                         temperature=0, logprobs=2)
    choice = response.choices[0]
    logprobs = choice.logprobs
    assert "".join(logprobs.tokens).removesuffix("<|im_end|>") == choice.text  # EOS: no text
    assert len(logprobs.token_logprobs) == len(logprobs.tokens) == 5
    assert all(len(top) <= 2 and max(top.values()) == pytest.approx(value, abs=1e-6)
               for top, value in zip(logprobs.top_logprobs, logprobs.token_logprobs,
                                     strict=True))
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(5)]


# --- what the server refuses ------------------------------------------------------------------


def test_json_response_formats_get_a_clear_400(client):
    messages = [{"role": "user", "content": "Weather in Bob as JSON"}]
    for response_format in ({"type": "json_object"},
                            {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}):
        with pytest.raises(openai.BadRequestError,
                           match=f"response_format {response_format['type']} is not supported "
                           "by this server"):
            client.chat.completions.create(model="caller", messages=messages, max_tokens=2,
                                           response_format=response_format)
    plain = client.chat.completions.create(model="caller", messages=messages, max_tokens=2,
                                           response_format={"type": "text"})
    assert plain.choices[0].message.role == "assistant"


def test_a_deeply_nested_body_gets_400_and_one_log_line(server, caplog):
    for depth in (5000, 100):
        body = (f'{{"model": "caller", "messages": [{{"role": "user", "content": "hi", '
                f'"x": {"[" * depth}{"]" * depth}}}]}}').encode()
        with caplog.at_level(logging.WARNING):
            caplog.clear()
            status, _, text = http("POST", f"{server.url}/v1/chat/completions", body, key=None)
        assert status == 400
        error = json.loads(text)["error"]
        assert error["type"] == "invalid_request_error" and "nested" in error["message"]
        records = [r for r in caplog.records if r.name.startswith("tunelab")]
        assert len(records) == 1 and records[0].levelno == logging.WARNING
        assert "\n" not in records[0].getMessage() and records[0].exc_info is None


def chat(**changes) -> dict:
    body = {"model": "caller", "messages": [{"role": "user", "content": "Weather in Bob"}],
            "max_tokens": 2, **changes}
    return {key: value for key, value in body.items() if value is not None}


MALFORMED = [
    (b'{"model": "caller", "messages": [', {}, 400, None),
    (chat(), {"Content-Type": "text/plain"}, 415, None),
    (chat(), {"Content-Type": "application/x-www-form-urlencoded"}, 415, None),
    (chat(max_tokens="5"), {}, 400, "max_tokens"),
    (chat(max_tokens=10**9), {}, 400, "max_tokens"),
    (chat(temperature=None, top_p=[1]), {}, 400, "top_p"),
    (chat(n=17), {}, 400, "n"),
    (chat(frobnicate=True), {}, 400, "frobnicate"),
    (chat(messages=[]), {}, 400, "messages"),
    (chat(messages=[{"role": "robot", "content": "hi"}]), {}, 400, "messages.0.role"),
    (chat(messages=[{"role": "user", "content": None}]), {}, 400, "messages.0.content"),
    (chat(messages=[{"role": "user", "content": "hi", "colour": "red"}]), {}, 400,
     "messages.0.colour"),
    (chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]), {},
     400, "messages.0.content"),
    (chat(messages=[{"role": "tool", "content": "12"}]), {}, 400, "messages.0.tool_call_id"),
    (chat(messages=[{"role": "user", "content": "hi"},
                    {"role": "tool", "tool_call_id": "call_9", "content": "12"}]), {}, 400,
     "messages.1.tool_call_id"),
    (chat(messages=[{"role": "user", "content": "hi"},
                    {**weather_call("Bob"), "tool_calls": [{
                        "id": "c", "type": "function",
                        "function": {"name": "get_weather", "arguments": "{city"}}]}]), {}, 400,
     "messages.1.tool_calls.0.function.arguments"),
    (chat(messages=[{"role": "user", "content": "hi", "tool_calls": []}]), {}, 400,
     "messages.0.tool_calls"),
    (chat(tools={"type": "function"}), {}, 400, "tools"),
    (chat(tools=[{"type": "function", "function": {"name": "has space"}}]), {}, 400,
     "tools.0.function.name"),
    (chat(tools=[TOOLS[0], TOOLS[0]]), {}, 400, "tools"),
    (chat(tool_choice="required"), {}, 400, "tool_choice"),
    (chat(tools=TOOLS, tool_choice="sometimes"), {}, 400, "tool_choice"),
    (chat(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), {}, 400,
     "tool_choice"),
    (chat(top_logprobs=2), {}, 400, "top_logprobs"),
    (chat(logprobs=True, top_logprobs=21), {}, 400, "top_logprobs"),
    (chat(response_format={"type": "json_object"}), {}, 400, "response_format"),
    (chat(functions=[{"name": "f"}]), {}, 400, "functions"),
    (chat(logit_bias={"1": 5}), {}, 400, "logit_bias"),
    ({"model": "caller", "prompt": "hi", "logprobs": 6}, {"path": "completions"}, 400,
     "logprobs"),
    ({"model": "caller", "prompt": "hi", "logprobs": True}, {"path": "completions"}, 400,
     "logprobs"),
]


@pytest.mark.parametrize(("body", "headers", "status", "param"), MALFORMED)
def test_malformed_requests_get_the_right_4xx(server, body, headers, status, param):
    headers = dict(headers)
    path = headers.pop("path", "chat/completions")
    got, _, text = http("POST", f"{server.url}/v1/{path}", body, headers=headers, key=None)
    assert got == status, text
    error = json.loads(text)["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    if param:
        assert param.split(".")[-1] in error["message"] or param.split(".")[0] in error["message"]
