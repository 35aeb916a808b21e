"""The architecture matrix: every family users fine-tune, through tunelab's own code paths.

Each family of ``tests/architectures.py`` (tiny random-weight models built from the family's
config) is checked for what a user relies on: packed training computes what unpacked training
computes (values and gradients), the planner counts the model transformers builds, LoRA
``all-linear`` adapts the language model (and a mixture's experts) and nothing else, a trained
run exports merged weights that reproduce it, the serving engine's greedy output is
``generate``'s, and a two-turn conversation trains on exactly its assistant turns.

Each test carries ``@pytest.mark.matrix(column)``; ``python scripts/architecture_matrix.py``
runs this file and writes the outcomes to ``docs/results/architectures.json``, from which the
README's support table is rendered (``scripts/published.py``).
"""

from __future__ import annotations

import json
import threading

import architectures
import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from tunelab.config import config_from_dict
from tunelab.data.formats import Record, to_example
from tunelab.data.packing import collate
from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample, tokenize_examples
from tunelab.errors import ModelError
from tunelab.eval.generate import generate_texts, score_continuations
from tunelab.model import varlen
from tunelab.model.adapters import apply_method, model_parts
from tunelab.model.architecture import layout_of, spec_for
from tunelab.model.swiglu import fuse_gated_activations
from tunelab.planner.shape import ModelShape, adapter_params
from tunelab.ship.engine import Engine, Request, Sampling
from tunelab.ship.export import export_run
from tunelab.train.loop import train
from tunelab.train.loss import chunked_loss, hidden_states

NAMES = architectures.NAMES
# float32 on CPU: packed and unpacked forwards sum the same products in another order
ATOL, RTOL = 2e-5, 1e-4


def lora_model(name: str) -> torch.nn.Module:
    """The family's tiny model under LoRA all-linear with random (non-zero) B matrices."""
    model = apply_method(architectures.build(name), kind="lora", r=4, alpha=8, dropout=0.0,
                         targets="all-linear", rslora=False)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if "lora_B" in parameter_name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.1)
    return model


def examples(lengths: list[int]) -> list[TokenizedExample]:
    generator = torch.Generator().manual_seed(2)
    out = []
    for number, length in enumerate(lengths):
        ids = torch.randint(3, 500, (length,), generator=generator).tolist()
        labels = [IGNORE_INDEX] * (length // 3) + ids[length // 3:]
        out.append(TokenizedExample(ids, labels, "data.jsonl", number + 1))
    return out


def loss_and_gradients(model, batch) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    _, output_layer, softcap = model_parts(model)
    loss = chunked_loss(hidden_states(model, batch), batch.labels, output_layer,
                        chunk_tokens=16, softcap=softcap)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()
                         if p.requires_grad}


@pytest.mark.matrix("train")
@pytest.mark.parametrize("name", NAMES)
def test_packed_loss_and_gradients_equal_one_example_at_a_time(name):
    """Rows longer than the sliding window (8), packed: per-example attention with the band."""
    model = lora_model(name)
    fuse_gated_activations(model)
    rows = examples([23, 11, 5, 17])
    assert varlen.enable(model)
    packed_loss, packed = loss_and_gradients(model, collate(rows, packing=True))
    model.set_attn_implementation("sdpa")
    total, summed = 0.0, {}
    for row in rows:
        loss, gradients = loss_and_gradients(model, collate([row], packing=False))
        total += loss
        summed = {n: summed.get(n, 0) + g for n, g in gradients.items()}
    assert packed_loss == pytest.approx(total, rel=RTOL)
    for parameter_name, gradient in packed.items():
        torch.testing.assert_close(gradient, summed[parameter_name], atol=ATOL, rtol=RTOL,
                                   msg=parameter_name)


@pytest.mark.matrix("train")
@pytest.mark.parametrize("name", NAMES)
def test_label_scores_equal_scoring_each_label_after_its_prompt_alone(name, tokenizer):
    """Label scoring packs a prompt with all its labels (a tree mask); with a sliding window the
    band counts positions, so a label sees the prompt's last ``window - 1`` tokens only."""
    model = architectures.build(name, vocab_size=len(tokenizer))
    prompts = ["Review: The movie was good, 7/10! Sentiment:", "Hi there, how are you?"]
    labels = [" positive", " negative", " neutral"]
    scores = score_continuations(model, tokenizer, prompts, labels)
    eos = [tokenizer.eos_token_id]
    for row, prompt in enumerate(prompts):
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        assert len(prompt_ids) > architectures.WINDOW
        for column, label in enumerate(labels):
            label_ids = tokenizer(label, add_special_tokens=False).input_ids + eos
            ids = torch.tensor([prompt_ids + label_ids])
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
            expected = sum(logp[len(prompt_ids) - 1 + k, t].item()
                           for k, t in enumerate(label_ids))
            assert scores[row, column].item() == pytest.approx(expected, abs=1e-4)


@pytest.mark.matrix("plan")
@pytest.mark.parametrize("name", NAMES)
def test_the_planner_counts_the_model_transformers_builds(name):
    hf_config = architectures.config(name)
    shape = ModelShape.from_config(hf_config)
    model = architectures.build(name)
    assert shape.params == sum(p.numel() for p in model.parameters())
    layout = layout_of(model)
    # the planner's per-layer projections are the model's linear layers, by name and size
    assert shape.linears() == {n.rsplit(".", 1)[-1]: size for n, size in layout.linears.items()}
    for expert, weight in layout.expert_params.items():
        experts, out_features, in_features = weight
        assert experts == shape.num_experts
        assert shape.expert_shapes()[expert.rsplit(".", 1)[-1]] == (in_features, out_features)
    assert (shape.vision_params > 0) == (name == "gemma3")
    # what LoRA all-linear trains, as peft builds it
    adapted = lora_model(name)
    trainable = sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert adapter_params(shape, kind="lora", r=4, targets="all-linear") == trainable
    # the fused MLP the planner assumes is the one the loop installs
    fused = fuse_gated_activations(architectures.build(name))
    assert (fused == shape.num_layers) == shape.gated_silu


@pytest.mark.matrix("plan")
@pytest.mark.parametrize("name", NAMES)
def test_all_linear_adapts_the_language_model_only(name):
    model = lora_model(name)
    adapted = {n.split(".lora_")[0] for n, p in model.named_parameters() if p.requires_grad}
    decoder_prefix = "base_model.model." + layout_of(model.get_base_model()).decoder_prefix
    assert adapted and all(n.startswith(decoder_prefix + ".") for n in adapted)
    assert not any("vision" in n or "multi_modal" in n for n in adapted)
    spec = spec_for(model.config)
    for layer in range(2):
        for projection in spec.projections:
            assert f"{decoder_prefix}.{layer}.{projection}" in adapted, projection
    if spec.expert_parameters:  # both expert weights, through peft's target_parameters
        experts = [n for n in adapted if ".mlp.experts" in n and ".layers.0." in n]
        assert len(experts) == len(spec.expert_parameters)
        assert not any(n.endswith(".mlp.gate") for n in adapted)  # the router stays as it is


def liven_adapter(run_dir) -> None:
    """Random B matrices in the run's adapter: three steps barely move B (it starts at zero),
    and an export check comparing base-equal logits could not fail."""
    path = run_dir / "adapter" / "adapter_model.safetensors"
    weights = load_file(path)
    generator = torch.Generator().manual_seed(0)
    for key, tensor in weights.items():
        if "lora_B" in key:
            weights[key] = torch.randn(tensor.shape, generator=generator) * 0.5
    save_file(weights, path, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, tokenizer):
    """Each family saved with the tiny ChatML tokenizer, as a user's model folder."""
    root = tmp_path_factory.mktemp("families")
    return {name: str(architectures.save(name, root / name, tokenizer)) for name in NAMES}


GREETINGS = [{"messages": [{"role": "user", "content": f"Say hi to {who}"},
                           {"role": "assistant", "content": f"Hello {who}!"}]}
             for who in ("Ann", "Bob", "Cleo", "Dan") * 4]


@pytest.fixture(scope="module")
def family_runs(tmp_path_factory, family_dirs):
    """A three-step LoRA run of each family from tunelab train (packed, fused MLP)."""
    root = tmp_path_factory.mktemp("family-runs")
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in GREETINGS))
    runs = {}
    for name, folder in family_dirs.items():
        config = config_from_dict({
            "name": name, "output_dir": str(root / "runs"), "model": {"path": folder},
            "method": {"kind": "lora", "r": 4, "alpha": 8},
            "data": {"train": str(data), "validation_split": 0.25},
            "train": {"max_steps": 3, "batch_tokens": 96, "max_seq_len": 64, "samples": 0},
        })
        runs[name] = train(config, console=Console(quiet=True))
    return runs


@pytest.mark.matrix("train")
@pytest.mark.parametrize("name", NAMES)
def test_tunelab_train_runs_to_finite_losses_and_saves_its_adapter(name, family_runs):
    result = family_runs[name]
    metrics = [json.loads(line) for line in
               (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
    assert (result.run_dir / "adapter" / "adapter_config.json").is_file()


@pytest.mark.matrix("merged")
@pytest.mark.parametrize("name", NAMES)
def test_merged_export_reloads_with_the_runs_logits(name, family_runs, tmp_path):
    run_dir = family_runs[name].run_dir
    liven_adapter(run_dir)
    result = export_run(run_dir, "merged", out=tmp_path / "merged")
    assert result.checks and all(check.passed for check in result.checks)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert type(reloaded).__name__ == type(architectures.build(name)).__name__


@pytest.mark.matrix("gguf")
@pytest.mark.parametrize("name", NAMES)
def test_gguf_export_reproduces_the_run_or_is_refused_before_loading(name, family_runs,
                                                                    tmp_path, record_property):
    """F16 GGUF read back by gguf and by transformers (the export's own checks), or the
    one-paragraph refusal that names the llama.cpp converter, decided from config.json."""
    run_dir = family_runs[name].run_dir
    try:
        result = export_run(run_dir, "gguf", out=tmp_path / "gguf", quant="f16")
    except ModelError as error:
        assert "convert_hf_to_gguf.py" in str(error.fix)
        assert not (tmp_path / "gguf").exists()
        record_property("matrix", f"refused: {error.message}")
        return
    assert result.checks and all(check.passed for check in result.checks)


@pytest.mark.matrix("serve")
@pytest.mark.parametrize("name", NAMES)
def test_serving_engine_greedy_output_equals_generate(name, family_dirs, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(family_dirs[name], dtype=torch.float32).eval()
    prompts = ["Say hi to Ann", "Review: The movie was good, 7/10! Sentiment:"]
    expected = generate_texts(model, tokenizer, prompts, max_new_tokens=12)
    engine = Engine(model, tokenizer)
    results = {}
    done = {index: threading.Event() for index in range(len(prompts))}

    def collector(index):
        def receive(event):
            if event.kind == "delta":
                results[index] = results.get(index, "") + event.text
            else:
                done[index].set()
        return receive

    for index, prompt in enumerate(prompts):
        ids = tokenizer(prompt, add_special_tokens=False).input_ids
        engine.submit(Request([ids], None, Sampling(max_new_tokens=12), collector(index)))
    engine.start()
    try:
        assert all(event.wait(60) for event in done.values())
    finally:
        engine.stop()
    assert [results.get(i, "") for i in range(len(prompts))] == expected


@pytest.mark.matrix("chat")
@pytest.mark.parametrize("name", NAMES)
def test_a_two_turn_conversation_trains_on_its_assistant_turns(name, family_dirs):
    tokenizer = AutoTokenizer.from_pretrained(family_dirs[name])
    record = {"messages": [{"role": "user", "content": "Is the movie good?"},
                           {"role": "assistant", "content": "It is bad."},
                           {"role": "user", "content": "And the book?"},
                           {"role": "assistant", "content": "It is good."}]}
    tokens = tokenize_examples([to_example(Record(record, "chat.jsonl", 1), "chat")],
                               tokenizer, max_seq_len=256)[0]
    trained = tokenizer.decode([t for t, label in zip(tokens.input_ids, tokens.labels,
                                                      strict=True) if label != IGNORE_INDEX])
    # each assistant turn with its end-of-turn marker (ChatML: the token and its newline)
    assert trained == f"It is bad.{tokenizer.eos_token}\nIt is good.{tokenizer.eos_token}\n"
