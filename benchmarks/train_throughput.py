"""Training throughput and memory: tunelab vs transformers.Trainer + peft LoRA, side by side.

Both sides train the same randomly initialised Llama-architecture model on the same tokenized
Alpaca-style data, with the same LoRA (r=16, alpha=32, dropout 0.05, all linear layers), the same
learning rate and cosine schedule, and the same examples in every optimiser step: the examples are
put in one seeded order and step s takes examples [s·k, (s+1)·k). Runs alternate (baseline,
tunelab, baseline, tunelab ...), each in a fresh subprocess so that its peak RSS is its own.

The baseline is what the transformers/peft docs recommend: ``get_peft_model`` + ``Trainer`` with
``DataCollatorForSeq2Seq`` (pad to the longest example of the batch, labels padded with −100),
``per_device_train_batch_size=k``. Its only non-default setting is
``train_sampling_strategy="sequential"``, so that it sees the examples in the shared order.

tunelab's ``train()`` batches by a token budget, which cannot say "exactly these k examples per
step", so the tunelab side is built from the components ``train()`` runs: ``adapters.apply_method``,
``varlen.enable``, ``packing.plan_batches``/``collate``, ``loss.batch_loss_sum`` and
``optim.build_optimizer``/``build_scheduler``/``clip_gradients``, in the same order as
``train/loop.py`` (the k examples of a step are packed into micro-batches of at most
``--batch-tokens`` tokens and their gradients accumulated over the step's target tokens).

    python benchmarks/train_throughput.py            # side by side, ~15 min on 2 CPU cores
    python benchmarks/train_throughput.py --quick    # 1-2 minute smoke run
    python benchmarks/train_throughput.py --levers   # ablation: each tunelab lever switched off
    python benchmarks/train_throughput.py --plan-check  # tunelab plan vs measured peak RSS
    python benchmarks/train_throughput.py --gpu      # ~1B model, bf16, MFU (needs a CUDA GPU)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

from provenance import provenance  # benchmarks/provenance.py, beside this script

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
TOKENIZER = "embedded:smollm2-135m-instruct"
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "targets": "all-linear"}

# Model sizes. CPU: ~113M parameters (GQA, tied embeddings like SmolLM2 / Llama-3.2).
CPU_MODEL = {"hidden_size": 768, "intermediate_size": 2048, "num_hidden_layers": 12,
             "num_attention_heads": 12, "num_key_value_heads": 4}
GPU_MODEL = {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 18,
             "num_attention_heads": 32, "num_key_value_heads": 8}

# Workloads: (examples per optimiser step, optimiser steps, max_seq_len, micro-batch token budget)
WORKLOADS = {
    "full": {"per_step": 8, "steps": 16, "max_seq_len": 512, "batch_tokens": 4096,
             "repeats": 2, "examples": 2000},
    "levers": {"per_step": 8, "steps": 8, "max_seq_len": 512, "batch_tokens": 4096,
               "repeats": 1, "examples": 2000},
    "quick": {"per_step": 4, "steps": 3, "max_seq_len": 512, "batch_tokens": 2048,
              "repeats": 1, "examples": 400},
    "gpu": {"per_step": 32, "steps": 40, "max_seq_len": 2048, "batch_tokens": 16384,
            "repeats": 2, "examples": 4000},
}

# Levers for --levers: name -> the tunelab options that switch that one lever (from the default).
LEVERS = {
    "all levers (default)": {},
    "packing off (padded rows)": {"packing": False},
    "varlen off (packed, T×T block mask)": {"varlen": False},
    "chunked loss off (full logits)": {"chunked_loss": False},
    "loss chunk 1024 tokens (default 2048)": {"chunk_tokens": 1024},
    "loss chunk 512 tokens (default 2048)": {"chunk_tokens": 512},
    "activation checkpointing on": {"checkpointing": True},
    "1 thread instead of all cores": {"threads": 1},
    "torch.compile per decoder layer": {"compile": True},
    "glibc malloc: fixed mmap threshold": {"malloc_mmap_threshold": 65536},
}


# --- data and model -----------------------------------------------------------------------------


def english_words() -> list[str]:
    """Real English running text: the movie-review snippets of the sentiment example, in order."""
    words = []
    for path in sorted((REPO / "examples" / "sentiment").glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            words += json.loads(line)["text"].split()
    return words


def write_dataset(path: Path, n_examples: int, seed: int) -> None:
    """Alpaca-style instruction JSONL with a skewed length mix: many short, a few very long.

    Lengths in words are lognormal (instruction median 12, input present 40% with median 30,
    output median 70 with a heavy tail); the words are spans of real review text.
    """
    rng = random.Random(seed)
    words = english_words()

    def span(median: float, sigma: float, low: int, high: int) -> str:
        n = int(min(high, max(low, rng.lognormvariate(math.log(median), sigma))))
        start = rng.randrange(len(words) - n)
        text = " ".join(words[start:start + n])
        return text[:1].upper() + text[1:]

    with path.open("w", encoding="utf-8") as handle:
        for _ in range(n_examples):
            record = {"instruction": span(12, 0.5, 3, 60),
                      "input": span(30, 0.8, 3, 300) if rng.random() < 0.4 else "",
                      "output": span(70, 1.0, 1, 900)}
            handle.write(json.dumps(record) + "\n")


def build_model(folder: Path, dims: dict, seed: int) -> int:
    """A Llama with random weights (std 0.02), the SmolLM2 tokenizer, saved with save_pretrained."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.model.load import load_tokenizer

    tokenizer = load_tokenizer(TOKENIZER)
    config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=4096,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **dims)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def tokenize_dataset(data_path: Path, model_dir: Path, max_seq_len: int) -> list[dict]:
    """tunelab's instruction template and loss mask; both sides train on these exact ids."""
    from tunelab.data.formats import load_examples
    from tunelab.data.tokenize import tokenize_examples
    from tunelab.model.load import load_tokenizer

    tokenizer = load_tokenizer(str(model_dir))
    examples = tokenize_examples(load_examples([str(data_path)]), tokenizer,
                                 max_seq_len=max_seq_len)
    return [{"input_ids": ex.input_ids, "labels": ex.labels} for ex in examples]


def step_schedule(n_examples: int, *, steps: int, per_step: int, seed: int) -> list[list[int]]:
    """Example indices of every optimiser step: one seeded order, k consecutive per step."""
    order = list(range(n_examples))
    random.Random(seed).shuffle(order)
    if steps * per_step > n_examples:
        raise SystemExit(f"{steps} steps × {per_step} examples need more than {n_examples}")
    return [order[s * per_step:(s + 1) * per_step] for s in range(steps)]


# --- the two workers (each runs in its own subprocess) ------------------------------------------


def import_training_stack() -> None:
    """Import what either side imports, so both start from the same runtime footprint."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import Trainer  # noqa: F401

    import tunelab.train.loop  # noqa: F401


def run_baseline(spec: dict) -> dict:
    """transformers.Trainer + peft LoRA, configured as their docs show, on the shared steps."""
    import datasets
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForSeq2Seq,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    gpu = spec["gpu"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(
        spec["model_dir"], dtype=torch.bfloat16 if gpu else torch.float32,
        attn_implementation="sdpa").to("cuda" if gpu else "cpu")
    torch.manual_seed(spec["seed"])  # the same LoRA initialisation as the tunelab side
    model = get_peft_model(model, LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"], task_type="CAUSAL_LM"))
    examples = load_tokens(spec)
    ordered = [examples[i] for step in spec["schedule"] for i in step]
    dataset = datasets.Dataset.from_list(
        [{**ex, "attention_mask": [1] * len(ex["input_ids"])} for ex in ordered])
    args = TrainingArguments(
        output_dir=spec["scratch"], per_device_train_batch_size=spec["per_step"],
        gradient_accumulation_steps=1, max_steps=len(spec["schedule"]),
        learning_rate=spec["lr"], lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=1.0, optim="adamw_torch", logging_steps=1, save_strategy="no",
        report_to="none", seed=spec["seed"], train_sampling_strategy="sequential",
        dataloader_num_workers=0, disable_tqdm=True, bf16=gpu, use_cpu=not gpu)
    clock = StepClock()

    class Timing(TrainerCallback):
        def on_train_begin(self, *_, **__):
            clock.begin()

        def on_step_end(self, *_, **__):
            clock.step()

    trainer = Trainer(model=model, args=args, train_dataset=dataset,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True,
                                                           label_pad_token_id=-100),
                      callbacks=[Timing()])
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    padded = sum(spec["per_step"] * max(len(examples[i]["input_ids"]) for i in step)
                 for step in spec["schedule"])
    return clock.result(losses, spec, examples, processed_tokens=padded)


def run_tunelab(spec: dict) -> dict:
    """tunelab's components, in train()'s order, on the shared steps; ``spec['levers']`` ablates."""
    import torch

    from tunelab.data.packing import collate, plan_batches
    from tunelab.data.tokenize import TokenizedExample
    from tunelab.model import varlen
    from tunelab.model.adapters import apply_method
    from tunelab.model.load import load_model
    from tunelab.train.loss import batch_loss_sum
    from tunelab.train.optim import build_optimizer, build_scheduler, clip_gradients

    levers = {"packing": True, "varlen": True, "chunked_loss": True, "checkpointing": False,
              "threads": None, "compile": False, "malloc_mmap_threshold": None,
              "chunk_tokens": spec["chunk_tokens"], **spec.get("levers", {})}
    if levers["threads"]:
        torch.set_num_threads(levers["threads"])
    gpu = spec["gpu"]
    device = torch.device("cuda" if gpu else "cpu")
    model = load_model(spec["model_dir"], dtype="bfloat16" if gpu else "float32",
                       device=str(device))
    model.config.use_cache = False
    if levers["packing"] and levers["varlen"]:
        varlen.enable(model)
    torch.manual_seed(spec["seed"])
    model = apply_method(model, kind="lora", r=LORA["r"], alpha=LORA["alpha"],
                         dropout=LORA["dropout"], targets=LORA["targets"], rslora=False)
    if levers["checkpointing"]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if levers["compile"]:
        for layer in model.get_base_model().model.layers:
            layer.compile(dynamic=True)
    loss_sum = (batch_loss_sum if levers["chunked_loss"] else full_logits_loss_sum)
    examples = load_tokens(spec)
    tokenized = [TokenizedExample(ex["input_ids"], ex["labels"], "bench", i)
                 for i, ex in enumerate(examples)]
    pad_id = 2
    steps = len(spec["schedule"])
    optimizer = build_optimizer(model, lr=spec["lr"], weight_decay=0.0)
    scheduler = build_scheduler(optimizer, total_steps=steps, warmup_steps=0, schedule="cosine")
    torch.manual_seed(spec["seed"])
    model.train()
    clock, losses, processed = StepClock(), [], 0
    clock.begin()
    for step in spec["schedule"]:
        group = [tokenized[i] for i in step]
        micro = plan_batches([len(ex.input_ids) for ex in group],
                             batch_tokens=spec["batch_tokens"], packing=levers["packing"])
        batches = [collate([group[i] for i in indices], packing=levers["packing"],
                           pad_id=pad_id) for indices in micro]
        n_target = sum(batch.n_target_tokens for batch in batches)
        step_loss = 0.0
        for batch in batches:
            batch = batch.to(device)
            processed += batch.input_ids.numel()
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=gpu):
                loss = loss_sum(model, batch, chunk_tokens=levers["chunk_tokens"])
            (loss / n_target).backward()
            step_loss += float(loss.detach())
        clip_gradients(model, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(step_loss / n_target)
        clock.step()
    return clock.result(losses, spec, examples, processed_tokens=processed)


def full_logits_loss_sum(model, batch, *, chunk_tokens: int):
    """The lever "chunked loss off": logits at every position, as a plain causal LM computes."""
    import torch.nn.functional as F

    from tunelab.train.loss import hidden_states, model_parts

    _, output_layer, _ = model_parts(model)
    logits = output_layer(hidden_states(model, batch)).float()
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(),
                           ignore_index=-100, reduction="sum")


class StepClock:
    """Wall-clock times of the optimiser steps, synchronised on GPU."""

    def __init__(self):
        self.started = 0.0
        self.step_ends: list[float] = []

    def now(self) -> float:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()

    def begin(self) -> None:
        self.started = self.now()

    def step(self) -> None:
        self.step_ends.append(self.now())

    def result(self, losses: list[float], spec: dict, examples: list[dict], *,
               processed_tokens: int) -> dict:
        """Tokens/s, peak memory, losses; ``processed_tokens`` counts padding too."""
        import torch

        from tunelab.model.plan import peak_rss_bytes

        tokens_per_step = [sum(len(examples[i]["input_ids"]) for i in step)
                           for step in spec["schedule"]]
        train_s = self.step_ends[-1] - self.started
        steady_s = self.step_ends[-1] - self.step_ends[0]
        if torch.cuda.is_available():
            peak, peak_kind = torch.cuda.max_memory_allocated(), "cuda_max_memory_allocated"
        else:
            # VmHWM, not ru_maxrss: after fork+exec Linux starts ru_maxrss at the parent's RSS
            peak, peak_kind = peak_rss_bytes(), "VmHWM"
        quarter = max(1, len(losses) // 4)
        step_s = [b - a for a, b in zip([self.started, *self.step_ends[:-1]], self.step_ends,
                                         strict=True)]
        # Per-step rates after the first step: their median ignores a step slowed down by
        # another process on this shared machine; the slowest step says whether one was.
        seconds_per_token = [s / n for s, n in zip(step_s[1:], tokens_per_step[1:],
                                                   strict=True)] or [train_s / sum(tokens_per_step)]
        typical = statistics.median(seconds_per_token)
        return {
            "non_padding_tokens": sum(tokens_per_step),
            "processed_tokens": processed_tokens,
            "train_s": round(train_s, 3),
            "tokens_per_second": sum(tokens_per_step) / train_s,
            "tokens_per_second_after_step_1": sum(tokens_per_step[1:]) / max(steady_s, 1e-9),
            "tokens_per_second_median_step": 1 / typical,
            "slowest_step_vs_median": max(seconds_per_token) / typical,
            "peak_memory_bytes": peak, "peak_memory_kind": peak_kind,
            "ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "final_loss": losses[-1], "final_quarter_mean_loss": statistics.fmean(
                losses[-quarter:]), "losses": [round(x, 5) for x in losses],
            "step_s": [round(x, 3) for x in step_s], "tokens_per_step": tokens_per_step,
        }


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
    result = (run_baseline if side == "baseline" else run_tunelab)(spec)
    result["wall_s"] = round(time.perf_counter() - started, 3)
    result["threads"] = torch.get_num_threads()
    Path(result_path).write_text(json.dumps(result))


# --- the orchestrating parent -------------------------------------------------------------------


MAX_WAIT_FOR_QUIET_S = float(os.environ.get("TUNELAB_BENCH_MAX_WAIT_S", 150))


def wait_for_quiet(threshold: float = 1.5,
                   max_wait_s: float = MAX_WAIT_FOR_QUIET_S) -> tuple[float, float]:
    """Wait until the 1-minute load average (which includes our own previous run) drops below
    ``threshold``; returns (load average, seconds waited). Other users' load shows up here.
    On a machine that is never quiet (shared with other jobs), run the benchmark at a higher
    priority instead and set TUNELAB_BENCH_MAX_WAIT_S=0; the load is recorded either way."""
    started = time.perf_counter()
    while os.getloadavg()[0] >= threshold and time.perf_counter() - started < max_wait_s:
        time.sleep(5)
    return os.getloadavg()[0], time.perf_counter() - started


def run_worker(side: str, spec: dict, workdir: Path, label: str) -> dict:
    """Run one measured training in a fresh subprocess and return its result row."""
    spec_path = workdir / f"spec-{label}.json"
    result_path = workdir / f"result-{label}.json"
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    threshold = spec.get("levers", {}).get("malloc_mmap_threshold")
    if threshold:  # read by glibc when the process starts
        env["MALLOC_MMAP_THRESHOLD_"] = str(threshold)
    load_before, waited_s = wait_for_quiet()
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, __file__, "--worker", side, "--spec",
                                str(spec_path), "--result", str(result_path)],
                               capture_output=True, text=True, env=env)
    if completed.returncode != 0:
        raise SystemExit(f"{label} failed:\n{completed.stdout[-3000:]}\n{completed.stderr[-5000:]}")
    row = json.loads(result_path.read_text())
    row.update(side=side, label=label, process_wall_s=round(time.perf_counter() - started, 1),
               load_average_before=round(load_before, 2), waited_for_quiet_s=round(waited_s),
               load_average_after=round(os.getloadavg()[0], 2))
    print(f"  {label:42s} {row['tokens_per_second']:8.1f} tok/s "
          f"(median step {row['tokens_per_second_median_step']:.1f}, slowest step "
          f"{row['slowest_step_vs_median']:.1f}× median)  "
          f"peak {row['peak_memory_bytes'] / 2**30:5.2f} GiB  loss {row['final_loss']:.4f}  "
          f"({row['process_wall_s']:.0f} s, load {row['load_average_before']}→"
          f"{row['load_average_after']})", flush=True)
    return row


def prepare(workdir: Path, workload: dict, *, gpu: bool, seed: int, lr: float) -> dict:
    """Data, model and schedule written once; the spec every worker reads."""
    from tunelab.config import TrainConfig

    data_path, model_dir = workdir / "alpaca_like.jsonl", workdir / "model"
    write_dataset(data_path, workload["examples"], seed)
    n_params = build_model(model_dir, GPU_MODEL if gpu else CPU_MODEL, seed)
    tokens = tokenize_dataset(data_path, model_dir, workload["max_seq_len"])
    tokens_path = workdir / "tokens.json"
    tokens_path.write_text(json.dumps(tokens))
    lengths = [len(ex["input_ids"]) for ex in tokens]
    schedule = step_schedule(len(tokens), steps=workload["steps"], per_step=workload["per_step"],
                             seed=seed)
    print(f"model: Llama, random weights, {n_params / 1e6:.0f}M parameters; data: "
          f"{len(tokens)} examples, tokens median {statistics.median(lengths):.0f} / mean "
          f"{statistics.fmean(lengths):.0f} / max {max(lengths)}; {len(schedule)} steps × "
          f"{workload['per_step']} examples", flush=True)
    return {"model_dir": str(model_dir), "tokens": str(tokens_path), "schedule": schedule,
            "per_step": workload["per_step"], "batch_tokens": workload["batch_tokens"],
            "chunk_tokens": TrainConfig().loss_chunk_tokens, "lr": lr, "seed": seed, "gpu": gpu,
            "scratch": str(workdir / "trainer-output"), "n_params": n_params,
            "data": {"examples": len(tokens), "median_tokens": statistics.median(lengths),
                     "mean_tokens": statistics.fmean(lengths), "max_tokens": max(lengths),
                     "max_seq_len": workload["max_seq_len"]}}


def summarise(rows: list[dict]) -> dict:
    """Median over repeats per side, and tunelab / baseline ratios."""
    def median(side: str, key: str) -> float:
        return statistics.median(row[key] for row in rows if row["side"] == side)

    keys = ("tokens_per_second", "tokens_per_second_after_step_1",
            "tokens_per_second_median_step", "peak_memory_bytes", "final_loss",
            "final_quarter_mean_loss", "train_s")
    summary = {side: {key: median(side, key) for key in keys} for side in ("baseline", "tunelab")}
    base, ours = summary["baseline"], summary["tunelab"]
    summary["ratios"] = {
        "tokens_per_second": ours["tokens_per_second"] / base["tokens_per_second"],
        "tokens_per_second_after_step_1": ours["tokens_per_second_after_step_1"]
        / base["tokens_per_second_after_step_1"],
        "tokens_per_second_median_step": ours["tokens_per_second_median_step"]
        / base["tokens_per_second_median_step"],
        "peak_memory": ours["peak_memory_bytes"] / base["peak_memory_bytes"],
        "final_loss_relative_difference": (ours["final_loss"] - base["final_loss"])
        / base["final_loss"],
        "final_quarter_loss_relative_difference": (ours["final_quarter_mean_loss"]
                                                   - base["final_quarter_mean_loss"])
        / base["final_quarter_mean_loss"],
    }
    per_step = [abs(a - b) / b for ra in rows if ra["side"] == "tunelab"
                for rb in rows if rb["side"] == "baseline"
                for a, b in zip(ra["losses"], rb["losses"], strict=True)]
    summary["ratios"]["max_per_step_loss_relative_difference"] = max(per_step)
    return summary


def print_table(summary: dict, rows: list[dict], gpu_mfu: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tunelab vs transformers.Trainer + peft LoRA (median of repeats)")
    for column in ("", "tokens/s", "tokens/s (median step)", "peak memory", "final loss",
                   "last-quarter loss"):
        table.add_column(column, justify="right")
    for side in ("baseline", "tunelab"):
        values = summary[side]
        table.add_row(side, f"{values['tokens_per_second']:.1f}",
                      f"{values['tokens_per_second_median_step']:.1f}",
                      f"{values['peak_memory_bytes'] / 2**30:.2f} GiB",
                      f"{values['final_loss']:.4f}", f"{values['final_quarter_mean_loss']:.4f}")
    ratios = summary["ratios"]
    table.add_row("tunelab / baseline", f"{ratios['tokens_per_second']:.2f}×",
                  f"{ratios['tokens_per_second_median_step']:.2f}×",
                  f"{ratios['peak_memory']:.2f}×",
                  f"{ratios['final_loss_relative_difference']:+.2%}",
                  f"{ratios['final_quarter_loss_relative_difference']:+.2%}")
    Console().print(table)
    if gpu_mfu:
        print("model FLOPs utilisation: " + ", ".join(f"{k} {v:.1%}" for k, v in gpu_mfu.items()))


def print_levers(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="tunelab levers: each switched off (or on) alone, vs all levers")
    for column in ("configuration", "tokens/s", "tokens/s (median step)", "× speed",
                   "peak memory", "× memory", "final loss"):
        table.add_column(column, justify="right")
    reference = next(row for row in rows if row["lever"] == "all levers (default)")
    for row in rows:
        speed = row["tokens_per_second_median_step"]
        table.add_row(row["lever"], f"{row['tokens_per_second']:.1f}", f"{speed:.1f}",
                      f"{speed / reference['tokens_per_second_median_step']:.2f}",
                      f"{row['peak_memory_bytes'] / 2**30:.2f} GiB",
                      f"{row['peak_memory_bytes'] / reference['peak_memory_bytes']:.2f}",
                      f"{row['final_loss']:.4f}")
    Console().print(table)


def model_flops_utilisation(spec: dict, rows: list[dict], peak_flops: float) -> dict:
    """MFU per side with LoRA accounting (frozen weights: forward + input gradient only)."""
    from transformers import AutoConfig

    from tunelab.model.plan import ModelShape, training_flops

    shape = ModelShape.from_config(AutoConfig.from_pretrained(spec["model_dir"]))
    examples = load_tokens(spec)
    total = 0.0
    for step in spec["schedule"]:
        for i in step:
            ex = examples[i]
            n_target = sum(label != -100 for label in ex["labels"][1:])
            total += training_flops(shape, [len(ex["input_ids"])], n_target_tokens=n_target,
                                    kind="lora", r=LORA["r"], checkpointing=False)
    mfu = {}
    for side in ("baseline", "tunelab"):
        train_s = statistics.median(row["train_s"] for row in rows if row["side"] == side)
        mfu[side] = total / train_s / peak_flops
    return mfu


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1-2 minute smoke run")
    parser.add_argument("--levers", action="store_true", help="ablate tunelab's levers")
    parser.add_argument("--only", nargs="+", default=[],
                        help="with --levers: only the levers whose names contain these words")
    parser.add_argument("--plan-check", action="store_true",
                        help="compare tunelab plan's predicted peak memory with measured runs")
    parser.add_argument("--gpu", action="store_true", help="~1B model in bf16 on a CUDA GPU")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="the GPU's dense bf16 peak for MFU (H100 SXM: 989)")
    parser.add_argument("--steps", type=int, help="optimiser steps (default: per workload)")
    parser.add_argument("--repeats", type=int, help="runs per side (default: per workload)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, help="results JSON (default: results/<device>-<date>)")
    parser.add_argument("--worker", choices=["baseline", "tunelab"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.result)
    if args.plan_check:
        return plan_check(args)
    if args.gpu and not _cuda_available():
        parser.error("--gpu measures a ~1B Llama in bf16 on a CUDA GPU, and torch sees none "
                     "here (torch.cuda.is_available() is False); run it on a GPU machine, or "
                     "leave out --gpu for the CPU benchmark")
    name = ("gpu" if args.gpu else "quick" if args.quick else "levers" if args.levers
            else "full")
    workload = dict(WORKLOADS[name])
    if args.steps:
        workload["steps"] = args.steps
    if args.repeats:
        workload["repeats"] = args.repeats
    origin = provenance()
    print(f"provenance: {origin}", flush=True)
    with tempfile.TemporaryDirectory(prefix="tunelab-bench-") as tmp:
        workdir = Path(tmp)
        spec = prepare(workdir, workload, gpu=args.gpu, seed=args.seed, lr=args.lr)
        rows = []
        if args.levers:
            chosen = {name: options for name, options in LEVERS.items()
                      if not options or not args.only
                      or any(word in name for word in args.only)}
            for repeat in range(workload["repeats"]):
                for lever, options in chosen.items():
                    row = run_worker("tunelab", {**spec, "levers": options}, workdir,
                                     f"{lever} #{repeat + 1}")
                    rows.append({**row, "lever": lever, "repeat": repeat + 1})
            rows = median_per_lever(rows, list(chosen))
            print_levers(rows)
        else:
            for repeat in range(workload["repeats"]):
                for side in ("baseline", "tunelab"):
                    row = run_worker(side, spec, workdir, f"{side} #{repeat + 1}")
                    rows.append({**row, "repeat": repeat + 1})
        origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        report = {"benchmark": "train_throughput", "mode": "levers" if args.levers else name,
                  "date": date.today().isoformat(), **origin,
                  "model": {"architecture": "LlamaForCausalLM", "weights": "random",
                            "parameters": spec["n_params"],
                            **(GPU_MODEL if args.gpu else CPU_MODEL)},
                  "lora": LORA, "workload": {**workload, "lr": args.lr, "schedule": "cosine",
                                             "warmup_steps": 0, "seed": args.seed},
                  "data": spec["data"], "runs": rows}
        if not args.levers:
            report["summary"] = summarise(rows)
            if args.gpu:
                report["summary"]["model_flops_utilisation"] = model_flops_utilisation(
                    spec, rows, args.peak_tflops * 1e12)
            print_table(report["summary"], rows,
                        report["summary"].get("model_flops_utilisation"))
    out = args.out or RESULTS / (f"{'gpu' if args.gpu else 'cpu'}-"
                                 f"{'levers-' if args.levers else ''}"
                                 f"{'partial-' if args.levers and args.only else ''}"
                                 f"{'quick-' if args.quick else ''}{date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


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
                                                  "peak_memory_bytes", "final_loss")}
                             for run in runs]
        middle["peak_memory_bytes"] = statistics.median(run["peak_memory_bytes"] for run in runs)
        merged.append(middle)
    return merged


# --- tunelab plan: predicted vs measured peak memory --------------------------------------------

TINY_MODEL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2}


def plan_check_configs(workdir: Path, seed: int) -> dict[str, dict]:
    """Configurations whose `tunelab train` peak RSS is compared with `tunelab plan`."""
    from tunelab.model.load import EMBEDDED

    sentiment = REPO / "examples" / "sentiment"
    tiny = workdir / "tiny-model"
    build_model(tiny, TINY_MODEL, seed)
    bench = workdir / "model"
    build_model(bench, CPU_MODEL, seed)
    alpaca = workdir / "alpaca_like.jsonl"
    write_dataset(alpaca, 400, seed)
    review = {"train": str(sentiment / "train.jsonl"), "validation": str(sentiment / "valid.jsonl"),
              "prompt": "Review: {text}\nSentiment:", "completion": " {label}"}
    lora = {"kind": "lora", **{k: LORA[k] for k in ("r", "alpha", "dropout", "targets")}}
    common = {"max_steps": 3, "samples": 2, "max_new_tokens": 4, "seed": seed, "lr": 1e-4}
    return {
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


MEASURE_TRAIN = """
import json, sys
from rich.console import Console
from tunelab.config import config_from_dict
from tunelab.model.plan import peak_rss_bytes
from tunelab.train.loop import train
result = train(config_from_dict(json.loads(sys.argv[1])), console=Console(quiet=True))
print(json.dumps({"peak_rss_bytes": peak_rss_bytes(),
                  "tokens_per_second": result.tokens_per_second}))
"""


def plan_check(args) -> None:
    """`tunelab plan` against the peak RSS of real `tunelab train` subprocesses."""
    from rich.console import Console
    from rich.table import Table

    from tunelab.config import config_from_dict
    from tunelab.model.plan import plan

    rows, origin = [], provenance()
    with tempfile.TemporaryDirectory(prefix="tunelab-plan-check-") as tmp:
        workdir = Path(tmp)
        for name, raw in plan_check_configs(workdir, args.seed).items():
            raw = {"name": "plan-check", "output_dir": str(workdir / "runs"), **raw}
            predicted = plan(config_from_dict(raw))
            load_before = os.getloadavg()[0]
            completed = subprocess.run(
                [sys.executable, "-c", MEASURE_TRAIN, json.dumps(raw)], capture_output=True,
                text=True)
            if completed.returncode != 0:
                raise SystemExit(f"{name} failed:\n{completed.stderr[-4000:]}")
            measured = json.loads(completed.stdout.strip().splitlines()[-1])
            subprocess.run(["rm", "-rf", str(workdir / "runs")], check=True)
            memory = predicted["memory"]
            row = {"configuration": name,
                   "predicted_peak_bytes": memory["predicted_peak_bytes"],
                   "measured_peak_bytes": measured["peak_rss_bytes"],
                   "error": memory["predicted_peak_bytes"] / measured["peak_rss_bytes"] - 1,
                   "breakdown_bytes": memory["breakdown_bytes"],
                   "peak_batch": memory["peak_batch"],
                   "predicted_tokens_per_second": predicted["time"][
                       "predicted_tokens_per_second"],
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
    out = args.out or RESULTS / f"plan-cpu-{date.today().isoformat()}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"benchmark": "plan_check", "date": date.today().isoformat(),
                               **origin, "runs": rows},
                              indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
