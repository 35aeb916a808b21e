"""`tunelab chat`: multi-turn, streamed replies equal to offline generation, /reset and /exit."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
from export_runs import GREETINGS, copied_run, make_run

from tunelab.data.render import chat_prompt
from tunelab.eval.generate import generate_texts
from tunelab.run import load_run_model
from tunelab.ship.chat import chat

MAX_TOKENS = 12


@pytest.fixture(scope="module")
def greeter(tiny_model_dir, tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("chat-run"), tiny_model_dir, "greeter", GREETINGS, 40)


class Recorder(io.StringIO):
    """An output that keeps each write, to see a reply arrive in pieces."""

    def __init__(self):
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def offline_reply(model, tokenizer, messages: list[dict]) -> str:
    text = chat_prompt(messages, tokenizer).text
    return generate_texts(model, tokenizer, [text], max_new_tokens=MAX_TOKENS)[0]


def test_chat_keeps_the_conversation_streams_replies_and_resets(greeter):
    lines = "Say hi to Eve\nAnd again?\n/reset\nAnd again?\n/exit\nSay hi to Ann\n"
    output = Recorder()
    chat(greeter, input_stream=io.StringIO(lines), output=output, max_new_tokens=MAX_TOKENS)

    model, tokenizer, _ = load_run_model(greeter)
    first = offline_reply(model, tokenizer, [{"role": "user", "content": "Say hi to Eve"}])
    history = [{"role": "user", "content": "Say hi to Eve"},
               {"role": "assistant", "content": first},
               {"role": "user", "content": "And again?"}]
    second = offline_reply(model, tokenizer, history)
    fresh = offline_reply(model, tokenizer, [{"role": "user", "content": "And again?"}])
    assert first == "Hello Eve!"  # what the run learned
    assert second != fresh  # so a chat that forgot its history would fail the next line
    assert output.getvalue() == f"{first}\n{second}\n(conversation reset)\n{fresh}\n"
    assert output.writes.index("\n") > 1  # the first reply came in several pieces


def test_the_cli_chats_with_piped_input_on_a_run_copied_from_another_machine(greeter,
                                                                            tmp_path):
    # its data files and its base's folder are paths of that machine; the adapter's record
    # of its base (sha256 of the weights) finds the same base here
    copy = copied_run(greeter, tmp_path / "greeter", model_path="/elsewhere/tiny-model")
    result = subprocess.run(
        [sys.executable, "-m", "tunelab.cli", "chat", str(copy), "--max-new-tokens",
         str(MAX_TOKENS)], input="Say hi to Eve\n/exit\n", capture_output=True, text=True,
        timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "Hello Eve!"
