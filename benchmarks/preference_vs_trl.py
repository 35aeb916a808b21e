"""DPO: tunelab against TRL's ``DPOTrainer`` + peft, side by side, on the same pairs and model.

Both sides train the same LoRA (r=16, alpha=32, no dropout, all linear layers) on the same base
model in float32, with DPO's sigmoid loss (beta 0.1), the reference being the base with the
adapter switched off, the same AdamW (no weight decay, gradient clipping at 1.0) at a constant
learning rate without warm-up, on the same preference pairs, each seen once:

* ``trl``: ``trl.DPOTrainer`` with ``DPOConfig`` and a peft ``LoraConfig``, ``ref_model=None``,
  as TRL's docs show; ``per_device_train_batch_size`` pairs a step in file order
  (``train_sampling_strategy="sequential"``). TRL 1.16 pads (its ``padding_free`` is switched
  off "after a refactor" and falls back to padding), scores every position with its fused LM
  head on CPU, and tokenizes the prompt alone and prompt + answer + EOS as one text;
* ``tunelab``: ``tunelab.train.loop.train`` on a YAML config (``method.objective: dpo``), which
  packs the pairs without padding into micro-batches of ``train.batch_tokens``; that budget is
  the smallest at which its packing plan has no more steps than TRL has (the same pairs a step
  on average). What is measured is read from the run's own ``metrics.jsonl``.

The pairs come from the grounded-QA example (``examples/qa/train.jsonl``): the prompt is the QA
prompt, the chosen answer the name the review gives, the rejected one a name from another row
that does not occur in this review (a hallucinated answer), drawn with the seed.

Each side trains in a fresh subprocess (its own peak RSS, the kernel's VmHWM), one after the
other; tunelab under the malloc its CLI would give it (jemalloc where installed), TRL under the
C library's. Throughput counts real (non-padding) tokens of both answers' sequences, prompt
included; the token positions each side computes are in the result too.

Step 1 is where the two can be checked against each other: both policies still equal the
reference (LoRA's B starts at 0), so the loss is log 2 on both sides, and what must agree is
each answer's summed log-probability. A third subprocess computes them for the first pairs of
the data with tunelab's ``preference.sequence_logps`` (tunelab's model, tokenization and packed
batch) and with TRL's own forward (its tokenized dataset, its collator, its fused LM head), and
reports the largest difference per answer beside the token ids each side built; it also checks
each side's logged step-1 means against the same computation on the pairs that side trained on
first.

    python benchmarks/preference_vs_trl.py                       # SmolLM2-135M, 20 steps of 8 pairs
    python benchmarks/preference_vs_trl.py --steps 2 --pairs 16  # a short run
    python benchmarks/preference_vs_trl.py --smoke               # seconds: tiny model, in-process

``--smoke`` takes the whole code path in seconds, for the test suite: the test suite's tiny
model and tokenizer, 8 pairs, 2 steps of 4, every worker in this process (so its figures, peak
memory above all, mean nothing), the result in a temporary folder.

``--objective grpo`` compares GRPO instead, against ``trl.GRPOTrainer`` + peft: the same QA
prompts, ``group_size`` answers sampled per prompt at temperature 1 (at most ``max_new_tokens``),
rewarded on both sides by ``names_the_answer`` (1 where the answer's first line is the review's
name, 0.5 where it holds the name), advantages scaled by the group's spread, DAPO's token-level
loss, answers cut at ``max_new_tokens`` kept in the loss (TRL's default), no KL term, one
optimisation per generation, ``prompts_per_step`` prompts a step (TRL in file order, tunelab
shuffled with its seed). Its step-1 check samples TRL's first batch with TRL's own generation
and scores those answers on both sides: each answer token's log-probability (TRL's
``_get_per_token_logps_and_entropies``, tunelab's ``target_logps`` over a packed batch), the
advantages (tunelab's ``reward.advantages`` on the same rewards) and the loss. Sampling makes
the sides' answers differ after that, so the training runs compare time, memory and the
reward's course, not answers.

    python benchmarks/preference_vs_trl.py --objective grpo --steps 10
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
from train_throughput import (  # benchmarks/train_throughput.py, beside this script
    StepClock,
    cli_environment,
    matched_batch_tokens,
    step_summary,
    wait_for_quiet,
)

from tunelab.peak_memory import peak_rss_bytes

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
QA_DATA = REPO / "examples" / "qa" / "train.jsonl"
MODEL = "embedded:smollm2-135m-instruct"
PROMPT = "Context: {context}\nQuestion: {question}\nAnswer:"
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "targets": "all-linear"}
BETA = 0.1
SIDES = ("trl", "tunelab")
SIDE_TITLES = {"trl": "TRL {trainer} + peft", "tunelab": "tunelab"}
TRAINERS = {"dpo": "DPOTrainer", "grpo": "GRPOTrainer"}
# Step 1's per-answer log-probabilities must agree this closely (nats, float32): the two sides
# differ in attention over packed rows vs padded ones and in the order of their sums only.
TOLERANCE_NATS = 1e-3
WORKLOADS = {
    "full": {"steps": 20, "batch_pairs": 8, "max_seq_len": 1024},
    "smoke": {"steps": 2, "batch_pairs": 4, "max_seq_len": 256},
}
# GRPO: prompts per step, answers per prompt, the longest answer; both sides sample at
# temperature 1 without top-p or top-k
GRPO_WORKLOADS = {
    "full": {"steps": 10, "prompts_per_step": 4, "group_size": 8, "max_new_tokens": 8,
             "max_seq_len": 1024},
    "smoke": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 4,
              "max_seq_len": 256},
}
TEMPERATURE = 1.0
# Answers cut at max_new_tokens keep their place in the loss on both sides (TRL's default;
# tunelab's rl.mask_truncated is set to match): the base model rarely ends a short answer with
# EOS, and its first line is what the reward judges
MASK_TRUNCATED = False


# --- data ---------------------------------------------------------------------------------------


def write_pairs(path: Path, n_pairs: int, seed: int, source: Path = QA_DATA) -> list[dict]:
    """TRL's ``{prompt, chosen, rejected}`` strings from the first ``n_pairs`` QA rows: the
    chosen answer is the row's name, the rejected one a name of another row that does not occur
    in this row's context (drawn with ``seed``). Written to ``path`` as JSONL and returned."""
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if n_pairs > len(rows):
        raise SystemExit(f"--pairs {n_pairs}: {source} has {len(rows)} rows")
    names = sorted({row["answer"] for row in rows})
    rng = random.Random(seed)
    pairs = []
    for row in rows[:n_pairs]:
        others = [name for name in names if name != row["answer"] and name not in row["context"]]
        pairs.append({"prompt": PROMPT.format(context=row["context"], question=row["question"]),
                      "chosen": f" {row['answer']}", "rejected": f" {rng.choice(others)}"})
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs), encoding="utf-8")
    return pairs


def tunelab_config(spec: dict) -> dict:
    """The config tunelab's side trains with: the benchmark's model, pairs, LoRA and DPO (or
    GRPO); no validation, samples or checkpoints (TRL's side has none either)."""
    if spec.get("objective") == "grpo":
        return tunelab_grpo_config(spec)
    return {"name": "preference-bench", "output_dir": str(Path(spec["scratch"]) / "runs"),
            "model": {"path": spec["tunelab_model"], "dtype": "float32", "device": "cpu"},
            "method": {"kind": "lora", **LORA, "objective": "dpo", "beta": BETA},
            "data": {"train": [spec["data_path"]]},
            "train": {"max_steps": spec["tunelab_steps"], "lr": spec["lr"], "warmup_steps": 0,
                      "schedule": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
                      "seed": spec["seed"], "batch_tokens": spec["batch_tokens"],
                      "max_seq_len": spec["max_seq_len"], "samples": 0, "eval_every": 0,
                      "save_every": 0}}


def tunelab_pairs(config_path: Path) -> tuple[list, list[list[int]]]:
    """The pairs as tunelab's training tokenizes them (file order) and each optimizer step's
    pair indices, from the same functions ``train()`` calls."""
    from tunelab.config import load_config
    from tunelab.data.preference import prepare_preference_data
    from tunelab.data.schedule import run_schedule
    from tunelab.model.load import load_tokenizer
    from tunelab.objectives import OBJECTIVES

    config = load_config(config_path)
    tokenizer = load_tokenizer(config.model.path)
    data = prepare_preference_data(config.data, tokenizer, max_seq_len=config.train.max_seq_len,
                                   seed=config.train.seed,
                                   objective=OBJECTIVES[config.method.objective])
    schedule = run_schedule(config, [pair.length for pair in data.train])
    steps = [[index for batch in step for index in batch] for step in schedule.steps()]
    return data.train, steps


# --- the workers (each runs in its own subprocess) ----------------------------------------------


def import_training_stack() -> None:
    """Import what either side imports, so both start from the same runtime footprint."""
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import tunelab.train.loop  # noqa: F401


def dpo_trainer(spec: dict, model, tokenizer, *, max_steps: int, callbacks: list = ()):
    """``trl.DPOTrainer`` as its docs show, with this benchmark's settings: the pairs file as
    a Dataset, a peft LoRA, ``ref_model=None`` (the reference is the adapter switched off)."""
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=spec["scratch"], beta=BETA, loss_type=["sigmoid"], learning_rate=spec["lr"],
        per_device_train_batch_size=spec["batch_pairs"], gradient_accumulation_steps=1,
        max_steps=max_steps, logging_steps=1, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", report_to="none",
        disable_dropout=True, padding_free=False, max_length=spec["max_seq_len"],
        # DPOConfig defaults to bf16 and activation checkpointing; both off, as on tunelab's side
        gradient_checkpointing=False, bf16=False, use_cpu=True, seed=spec["seed"],
        train_sampling_strategy="sequential", dataloader_num_workers=0, save_strategy="no",
        disable_tqdm=True)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in Path(spec["data_path"]).read_text().splitlines()]
    return DPOTrainer(model=model, ref_model=None, args=args,
                      train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                      peft_config=lora, callbacks=list(callbacks))


def load_hf_model(spec: dict):
    """The base model and tokenizer as a transformers user loads them: float32, SDPA."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(spec["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=torch.float32,
                                                 attn_implementation="sdpa")
    return model, tokenizer


def run_trl(spec: dict) -> dict:
    """TRL's DPOTrainer for ``steps`` steps of ``batch_pairs`` pairs; per-step loss, log-probs,
    margins and tokens from its own logs, step times from the Trainer's callbacks."""
    model, tokenizer = load_hf_model(spec)
    clock = StepClock()
    trainer = dpo_trainer(spec, model, tokenizer, max_steps=spec["steps"],
                          callbacks=[clock.callback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    seen = [0] + [entry["num_tokens"] for entry in logs]
    tokens = [int(b - a) for a, b in zip(seen, seen[1:], strict=False)]
    batches = trl_batches(trainer.train_dataset, spec["batch_pairs"])[:len(logs)]
    return {**step_summary(tokens, clock.step_s(), [entry["loss"] for entry in logs]),
            **{name: [entry[key] for entry in logs] for name, key in TRL_LOGS.items()},
            "pairs_per_step": [batch["pairs"] for batch in batches],
            "tokens_per_step_recounted": [batch["tokens"] for batch in batches],
            "processed_tokens": sum(batch["positions"] for batch in batches)}


# TRL's log names -> this benchmark's (tunelab's metrics.jsonl names, which a row keeps too)
TRL_LOGS = {"chosen_logp": "logps/chosen", "rejected_logp": "logps/rejected",
            "margin": "rewards/margins", "reward_accuracy": "rewards/accuracies"}
# what a step trains on (a DPO pair, a GRPO prompt with its group of answers), per objective
UNITS = {"dpo": "pairs", "grpo": "prompts"}
# what a tunelab step logs beside loss, tokens and time, per objective
TUNELAB_LOGS = {"dpo": ("chosen_logp", "rejected_logp", "margin", "reward_accuracy"),
                "grpo": ("reward", "reward_std", "answer_tokens_mean", "truncated_share",
                         "tied_share", "rollout_s", "logprob_gap")}


def trl_batches(dataset, batch_pairs: int) -> list[dict]:
    """Each of TRL's sequential batches: its pairs, real tokens, and the positions its padded
    batch computes (2 × pairs rows × the longest prompt + answer)."""
    lengths = [(len(row["prompt_ids"]) + len(row["chosen_ids"]),
                len(row["prompt_ids"]) + len(row["rejected_ids"])) for row in dataset]
    batches = []
    for start in range(0, len(lengths), batch_pairs):
        chunk = lengths[start:start + batch_pairs]
        batches.append({"pairs": len(chunk), "tokens": sum(map(sum, chunk)),
                        "positions": 2 * len(chunk) * max(map(max, chunk))})
    return batches


def run_tunelab(spec: dict) -> dict:
    """``tunelab.train.loop.train`` on the benchmark's YAML config; per-step loss, log-probs,
    margins, tokens and times read back from the run's metrics.jsonl."""
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.train.loop import train

    config = load_config(spec["config_path"])
    result = train(config, overwrite=True, console=Console(quiet=True))
    records = [json.loads(line) for line in
               (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    records = [record for record in records if "loss" in record]
    tokens = [record["tokens"] for record in records]
    return {**step_summary(tokens, [record["step_s"] for record in records],
                           [record["loss"] for record in records]),
            **{name: [record.get(name) for record in records]
               for name in TUNELAB_LOGS[spec.get("objective", "dpo")]},
            f"{UNITS[spec.get('objective', 'dpo')]}_per_step":
                spec["tunelab_units_per_step"][:len(records)],
            "processed_tokens": sum(tokens), "batch_tokens": config.train.batch_tokens,
            "train_wall_s": round(result.wall_s, 3)}


def run_step_one(spec: dict) -> dict:
    """Step 1's per-answer log-probabilities of the first ``batch_pairs`` pairs, from tunelab's
    ``sequence_logps`` and from TRL's own forward, and each side's step-1 means recomputed on
    the pairs that side trained on first."""
    import torch
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.train import preference
    from tunelab.train.loop import prepare

    config = load_config(spec["config_path"])
    prepared = prepare(config, Console(quiet=True))
    settings = preference.settings_of(config.method)
    pad_id = prepared.tokenizer.pad_token_id or 0
    first = list(range(min(spec["batch_pairs"], len(prepared.train))))

    @torch.no_grad()
    def tunelab_side(indices: list[int]) -> dict:
        pairs = [prepared.train[i] for i in indices]
        batch = preference.collate_pairs(pairs, packing=config.train.packing, pad_id=pad_id)
        module = preference.PreferenceLoss(prepared.model, settings,
                                           chunk_tokens=config.train.loss_chunk_tokens)
        loss_sum, _ = module(batch.to(prepared.device))
        logps, _ = preference.sequence_logps(prepared.model, batch.to(prepared.device),
                                             chunk_tokens=config.train.loss_chunk_tokens)
        return {"chosen": logps[0::2].tolist(), "rejected": logps[1::2].tolist(),
                "loss": float(loss_sum) / len(pairs)}

    ours = tunelab_side(first)
    ours_trained = tunelab_side(spec["tunelab_step_pairs"][0])
    ids = [{"chosen": (pair.chosen.input_ids, pair.chosen.labels),
            "rejected": (pair.rejected.input_ids, pair.rejected.labels)}
           for pair in (prepared.train[i] for i in first)]
    theirs = trl_step_one(spec, first)
    return {"tunelab": ours, "trl": {key: value for key, value in theirs.items()
                                      if key != "ids"},
            "tunelab_trained_first": ours_trained,
            "tokenization": compare_ids(ids, theirs["ids"])}


def trl_step_one(spec: dict, indices: list[int]) -> dict:
    """TRL's per-answer log-probs of the pairs at ``indices`` (its step 1, sequential), the way
    ``DPOTrainer._compute_loss`` computes them, and the loss ``compute_loss`` returns."""
    import torch

    model, tokenizer = load_hf_model(spec)
    trainer = dpo_trainer(spec, model, tokenizer, max_steps=1)
    rows = [trainer.train_dataset[i] for i in indices]
    inputs = trainer.data_collator(rows)  # on CPU: no device to move the batch to
    with torch.no_grad():
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = trainer.model(input_ids=inputs["input_ids"],
                                attention_mask=inputs["attention_mask"], labels=labels,
                                fused_lm_head=True, use_cache=False)
        chosen, rejected = outputs.log_probs.sum(dim=1).chunk(2)
        loss = trainer.compute_loss(trainer.model, inputs)
    logged = trainer._metrics["train"]  # what compute_loss logs: its own means of the same pass
    return {"chosen": chosen.tolist(), "rejected": rejected.tolist(), "loss": float(loss),
            "logged_chosen_logp_mean": logged["logps/chosen"][-1],
            "logged_rejected_logp_mean": logged["logps/rejected"][-1],
            "ids": [{"chosen": (row["prompt_ids"], row["chosen_ids"]),
                     "rejected": (row["prompt_ids"], row["rejected_ids"])} for row in rows]}


def compare_ids(ours: list[dict], theirs: list[dict]) -> dict:
    """Per answer: whether both sides' token ids agree (the whole sequence, and the answer
    tokens that are scored); the first few differences, as ids."""
    from tunelab.data.tokenize import IGNORE_INDEX

    same_sequence = same_answer = 0
    differences = []
    for number, (mine, other) in enumerate(zip(ours, theirs, strict=True)):
        for side in ("chosen", "rejected"):
            input_ids, labels = mine[side]
            prompt_ids, answer_ids = other[side]
            answer = [label for label in labels if label != IGNORE_INDEX]
            same_sequence += input_ids == prompt_ids + answer_ids
            same_answer += answer == answer_ids
            if input_ids != prompt_ids + answer_ids or answer != answer_ids:
                differences.append({"pair": number, "side": side,
                                    "tunelab_answer_ids": answer, "trl_answer_ids": answer_ids,
                                    "tunelab_length": len(input_ids),
                                    "trl_length": len(prompt_ids) + len(answer_ids)})
    return {"answers": 2 * len(ours), "identical_sequences": same_sequence,
            "identical_answer_ids": same_answer, "differences": differences[:5]}


def worker_main(side: str, spec_path: str, result_path: str) -> None:
    """Entry point of a subprocess: one side's training (or the step-1 check), as JSON."""
    import torch

    import_training_stack()
    spec = json.loads(Path(spec_path).read_text())
    started = time.perf_counter()
    workers = ({"trl": run_trl_grpo, "tunelab": run_tunelab, "step_one": run_step_one_grpo}
               if spec.get("objective") == "grpo" else
               {"trl": run_trl, "tunelab": run_tunelab, "step_one": run_step_one})
    result = workers[side](spec)
    result["wall_s"] = round(time.perf_counter() - started, 3)
    result["threads"] = torch.get_num_threads()
    # VmHWM, not ru_maxrss: after fork+exec Linux starts ru_maxrss at the parent's RSS
    result.update(peak_memory_bytes=peak_rss_bytes(), peak_memory_kind="VmHWM")
    Path(result_path).write_text(json.dumps(result))


# --- GRPO (--objective grpo) --------------------------------------------------------------------


def write_prompts(path: Path, n_prompts: int, source: Path = QA_DATA) -> list[dict]:
    """The first ``n_prompts`` QA rows as completion records: the QA prompt, the name as the
    reference completion, and the name alone (``answer``), which the reward reads."""
    rows = [json.loads(line) for line in source.read_text(encoding="utf-8").splitlines()
            if line.strip()]
    if n_prompts > len(rows):
        raise SystemExit(f"--pairs {n_prompts}: {source} has {len(rows)} rows")
    records = [{"prompt": PROMPT.format(context=row["context"], question=row["question"]),
                "completion": f" {row['answer']}", "answer": row["answer"]}
               for row in rows[:n_prompts]]
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return records


def names_the_answer(prompts, completions, answer, **_) -> list[float]:
    """Both sides' reward (TRL's signature, which tunelab's python rewards share): 1 where the
    answer's first line is the review's name, 0.5 where it holds the name among other words,
    else 0 (partial credit, so that more groups of a small model's answers differ)."""
    lines = [completion.strip().split("\n")[0].strip() for completion in completions]
    return [1.0 if line == name else 0.5 if name in line else 0.0
            for line, name in zip(lines, answer, strict=True)]


def tunelab_grpo_config(spec: dict) -> dict:
    """tunelab's GRPO config: the same LoRA and prompts as TRL's side, rewarded by
    ``names_the_answer``, no pre-flight (TRL has none), DAPO's loss, no KL."""
    return {"name": "grpo-bench", "output_dir": str(Path(spec["scratch"]) / "runs"),
            "model": {"path": spec["tunelab_model"], "dtype": "float32", "device": "cpu"},
            "method": {"kind": "lora", **LORA, "objective": "grpo"},
            "data": {"train": [spec["data_path"]]},
            "train": {"max_steps": spec["steps"], "lr": spec["lr"], "warmup_steps": 0,
                      "schedule": "constant", "weight_decay": 0.0, "max_grad_norm": 1.0,
                      "seed": spec["seed"], "batch_tokens": spec["batch_tokens"],
                      "max_seq_len": spec["max_seq_len"], "samples": 0, "eval_every": 0,
                      "save_every": 0},
            "rl": {"rewards": [f"python:{Path(__file__).resolve()}:names_the_answer"],
                   "group_size": spec["group_size"], "prompts_per_step": spec["prompts_per_step"],
                   "temperature": TEMPERATURE, "top_p": 1.0,
                   "max_new_tokens": spec["max_new_tokens"], "mask_truncated": MASK_TRUNCATED,
                   "loss": "dapo", "kl_weight": 0.0, "scale_rewards": True,
                   "preflight_prompts": 0}}


def grpo_trainer(spec: dict, model, tokenizer, *, max_steps: int, callbacks: list = ()):
    """``trl.GRPOTrainer`` with this benchmark's settings: ``prompts_per_step`` prompts of
    ``group_size`` answers a step, in file order, one optimisation per generation."""
    import datasets
    from peft import LoraConfig
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=spec["scratch"], learning_rate=spec["lr"],
        per_device_train_batch_size=spec["prompts_per_step"] * spec["group_size"],
        gradient_accumulation_steps=1, num_generations=spec["group_size"],
        max_completion_length=spec["max_new_tokens"], temperature=TEMPERATURE, top_p=1.0,
        top_k=0, beta=0.0, loss_type="dapo", scale_rewards="group",
        mask_truncated_completions=MASK_TRUNCATED, num_iterations=1, shuffle_dataset=False,
        max_steps=max_steps, logging_steps=1, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", report_to="none",
        disable_dropout=True, gradient_checkpointing=False, bf16=False, use_cpu=True,
        seed=spec["seed"], dataloader_num_workers=0, save_strategy="no", disable_tqdm=True)
    lora = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                      target_modules=LORA["targets"], task_type="CAUSAL_LM")
    rows = [json.loads(line) for line in Path(spec["data_path"]).read_text().splitlines()]
    return GRPOTrainer(model=model, reward_funcs=names_the_answer, args=args,
                       train_dataset=datasets.Dataset.from_list(rows),
                       processing_class=tokenizer, peft_config=lora, callbacks=list(callbacks))


def run_trl_grpo(spec: dict) -> dict:
    """TRL's GRPOTrainer for ``steps`` steps; per-step loss, reward and answer lengths from its
    logs, step times (sampling included) from the Trainer's callbacks. Its tokens are the
    prompts' (from the tokenized prompts, in file order) and the answers' (its mean length)."""
    model, tokenizer = load_hf_model(spec)
    clock = StepClock()
    trainer = grpo_trainer(spec, model, tokenizer, max_steps=spec["steps"],
                           callbacks=[clock.callback()])
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    answers = spec["prompts_per_step"] * spec["group_size"]
    prompt_tokens = spec["trl_prompt_tokens_per_step"][:len(logs)]
    tokens = [round(prompt + answers * entry["completions/mean_length"])
              for prompt, entry in zip(prompt_tokens, logs, strict=True)]
    return {**step_summary(tokens, clock.step_s(), [entry["loss"] for entry in logs]),
            **{name: [entry.get(key) for entry in logs] for name, key in TRL_GRPO_LOGS.items()},
            "prompts_per_step": [spec["prompts_per_step"]] * len(logs),
            "processed_tokens": None}


# TRL's GRPO log names -> tunelab's metrics.jsonl names
TRL_GRPO_LOGS = {"reward": "reward", "reward_std": "reward_std",
                 "answer_tokens_mean": "completions/mean_length",
                 "truncated_share": "completions/clipped_ratio",
                 "tied_share": "frac_reward_zero_std"}


def run_step_one_grpo(spec: dict) -> dict:
    """TRL's first batch sampled by TRL, scored by both sides: each answer token's log-prob,
    the advantages and the loss; and whether both tokenize the prompts alike."""
    import numpy as np
    import torch
    from rich.console import Console

    from tunelab.config import load_config
    from tunelab.data.packing import collate
    from tunelab.data.tokenize import IGNORE_INDEX, TokenizedExample
    from tunelab.train import rl
    from tunelab.train.loop import prepare
    from tunelab.train.loss import target_logps
    from tunelab.train.reward import advantages
    from tunelab.train.rollout import Rollout

    config = load_config(spec["config_path"])
    prepared = prepare(config, Console(quiet=True))
    reinforcement = rl.set_up_reinforcement(config, prepared.tokenizer)
    model, tokenizer = load_hf_model(spec)
    trainer = grpo_trainer(spec, model, tokenizer, max_steps=1)
    group, n_prompts = spec["group_size"], spec["prompts_per_step"]
    rows = [trainer.train_dataset[i] for i in range(n_prompts) for _ in range(group)]
    torch.manual_seed(spec["seed"])
    with torch.no_grad():
        batch = trainer._generate_and_score_completions(rows)
        # the answers' tokens (mask_truncated_completions zeroes a cut answer's mask: it is whole)
        answer_mask = batch["completion_mask"]
        answer_mask = torch.where(answer_mask.sum(dim=1, keepdim=True) == 0,
                                  torch.ones_like(answer_mask), answer_mask)
        theirs, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1),
            torch.cat([batch["prompt_mask"], answer_mask], dim=1),
            batch["completion_ids"].size(1))
        trainer.model.eval()  # TRL's eval normaliser: this one batch, no accumulation
        trl_loss = float(trainer.compute_loss(trainer.model, batch))
    prompts = [ids[mask.bool()].tolist() for ids, mask in
               zip(batch["prompt_ids"], batch["prompt_mask"], strict=True)]
    answers = [ids[mask.bool()].tolist() for ids, mask in
               zip(batch["completion_ids"], answer_mask, strict=True)]
    ends = {*trainer.eos_token_ids, tokenizer.pad_token_id}
    truncated = [not answer or answer[-1] not in ends for answer in answers]
    sequences = [TokenizedExample(p + a, [IGNORE_INDEX] * len(p) + a, "trl", i)
                 for i, (p, a) in enumerate(zip(prompts, answers, strict=True))]
    pad_id = prepared.tokenizer.pad_token_id or 0
    packed = collate(sequences, packing=True, pad_id=pad_id).to(prepared.device)
    texts = tokenizer.batch_decode(answers, skip_special_tokens=True)
    rewards = names_the_answer(None, texts, [row["answer"] for row in rows])
    ours_advantage = advantages(np.array(rewards).reshape(n_prompts, group), estimator="grpo",
                                scale=True).reshape(-1)
    rollouts = [Rollout(i // group, p, a, [0.0] * len(a), bool(cut), text)
                for i, (p, a, cut, text) in enumerate(zip(prompts, answers, truncated, texts,
                                                          strict=True))]
    module = rl.PolicyGradientLoss(prepared.model, temperature=TEMPERATURE, kl_weight=0.0,
                                   chunk_tokens=config.train.loss_chunk_tokens)
    with torch.no_grad():
        ours, _, _ = target_logps(prepared.model, packed, temperature=TEMPERATURE,
                                  chunk_tokens=config.train.loss_chunk_tokens)
        pieces = rl.answer_batches(rollouts, ours_advantage, config, pad_id=pad_id)
        ours_loss = sum(float(module(piece.to(prepared.device))[0]) for piece in pieces) \
            / sum(piece.units for piece in pieces)
    expected = [reinforcement.prompts[i].ids for i in range(n_prompts)]
    return {"answers": len(answers), "answer_tokens": int(answer_mask.sum()),
            "truncated": sum(truncated), "rewards": rewards, "texts": texts,
            "tunelab_logps": ours.tolist(), "trl_logps": theirs[answer_mask.bool()].tolist(),
            "tunelab_advantages": ours_advantage.tolist(),
            "trl_advantages": batch["advantages"].tolist(),
            "loss": {"tunelab": ours_loss, "trl": trl_loss},
            "identical_prompt_ids": sum(prompts[i * group] == ids
                                        for i, ids in enumerate(expected)),
            "prompts": n_prompts}


def prepare_grpo_spec(workdir: Path, args, workload: dict, model: str) -> dict:
    """The prompts file, tunelab's GRPO config and the workers' spec."""
    import yaml

    from tunelab.model.load import load_tokenizer, resolve_model_path

    data_path = workdir / "prompts.jsonl"
    n_prompts = args.pairs or workload["steps"] * workload["prompts_per_step"]
    records = write_prompts(data_path, n_prompts)
    steps = min(workload["steps"], n_prompts // workload["prompts_per_step"])
    spec = {"objective": "grpo", "tunelab_model": model, "model_dir": resolve_model_path(model),
            "data_path": str(data_path), "lr": args.lr, "seed": args.seed,
            "scratch": str(workdir / "scratch"), "config_path": str(workdir / "tunelab.yaml"),
            "batch_tokens": 8192, **{**workload, "steps": steps}}
    Path(spec["config_path"]).write_text(yaml.safe_dump(tunelab_config(spec), sort_keys=False))
    tokenizer = load_tokenizer(model)
    lengths = [len(ids) for ids in tokenizer([r["prompt"] for r in records])["input_ids"]]
    per_step = workload["prompts_per_step"]
    spec.update(trl_prompt_tokens_per_step=[
        workload["group_size"] * sum(lengths[start:start + per_step])
        for start in range(0, steps * per_step, per_step)],
        tunelab_units_per_step=[per_step] * steps)
    spec["data"] = {"prompts": n_prompts, "prompt_tokens": sum(lengths),
                    "median_prompt_tokens": statistics.median(lengths),
                    "source": str(QA_DATA.relative_to(REPO)), "prompt": PROMPT,
                    "reward": "names_the_answer: 1 where the answer's first line is the "
                              "review's name, 0.5 where it holds it, else 0"}
    print(f"{n_prompts} prompts (median {statistics.median(lengths):.0f} tokens); {steps} "
          f"steps of {per_step} prompts × {workload['group_size']} answers of at most "
          f"{workload['max_new_tokens']} tokens", flush=True)
    return spec


def grpo_step_one_summary(check: dict) -> dict:
    """Largest differences of step 1's per-token log-probs, advantages and loss (TRL's
    answers scored by both sides)."""
    logps = [abs(a - b) for a, b in zip(check["tunelab_logps"], check["trl_logps"],
                                        strict=True)]
    advantage = [abs(a - b) for a, b in zip(check["tunelab_advantages"],
                                            check["trl_advantages"], strict=True)]
    loss = abs(check["loss"]["tunelab"] - check["loss"]["trl"])
    return {"answers": check["answers"], "answer_tokens": check["answer_tokens"],
            "truncated_answers": check["truncated"], "tolerance_nats": TOLERANCE_NATS,
            "max_abs_token_logp_difference": max(logps),
            "mean_abs_token_logp_difference": statistics.fmean(logps),
            "max_abs_advantage_difference": max(advantage),
            "loss": {**check["loss"], "abs_difference": loss},
            "identical_prompt_ids": check["identical_prompt_ids"], "prompts": check["prompts"],
            "within_tolerance": max(logps) <= TOLERANCE_NATS and max(advantage) <= 1e-4
            and loss <= TOLERANCE_NATS,
            "per_answer": check}


def grpo_summarise(runs: dict, spec: dict) -> dict:
    """Both sides' time per step, prompts/s, sampled answer tokens/s, memory and reward."""
    answers = spec["prompts_per_step"] * spec["group_size"]
    summary = {}
    for side in SIDES:
        run = runs[side]
        answer_tokens = sum(answers * length for length in run["answer_tokens_mean"])
        summary[side] = {
            "tokens_per_second": run["tokens_per_second"],
            "tokens_per_second_median_step": run["tokens_per_second_median_step"],
            "peak_memory_bytes": run["peak_memory_bytes"], "steps": run["steps"],
            "train_s": run["train_s"], "step_s_median": statistics.median(run["step_s"]),
            "prompts_per_second": sum(run["prompts_per_step"]) / run["train_s"],
            "answer_tokens_per_second": answer_tokens / run["train_s"],
            "reward_first": run["reward"][0], "reward_last": run["reward"][-1],
            "reward_mean": statistics.fmean(run["reward"])}
    ours, theirs = summary["tunelab"], summary["trl"]
    summary["tunelab_vs_trl"] = {
        key: ours[key] / theirs[key] for key in ("tokens_per_second", "prompts_per_second",
                                                 "answer_tokens_per_second")}
    summary["tunelab_vs_trl"]["step_s_median"] = ours["step_s_median"] / theirs["step_s_median"]
    summary["tunelab_vs_trl"]["peak_memory"] = (ours["peak_memory_bytes"]
                                                / theirs["peak_memory_bytes"])
    return summary


def print_grpo_tables(summary: dict, step_one: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="GRPO: tunelab against TRL's GRPOTrainer")
    for column in ("", "step (median)", "prompts/s", "answer tokens/s", "tokens/s",
                   "peak memory", "reward, first → last step", "steps"):
        table.add_column(column, justify="right")
    for side in SIDES:
        values = summary[side]
        table.add_row(SIDE_TITLES[side].format(trainer=TRAINERS["grpo"]),
                      f"{values['step_s_median']:.1f} s", f"{values['prompts_per_second']:.3f}",
                      f"{values['answer_tokens_per_second']:.1f}",
                      f"{values['tokens_per_second']:.1f}",
                      f"{values['peak_memory_bytes'] / 2**30:.2f} GiB",
                      f"{values['reward_first']:.3f} → {values['reward_last']:.3f}",
                      f"{values['steps']}")
    ratios = summary["tunelab_vs_trl"]
    table.add_row("tunelab / TRL", f"{ratios['step_s_median']:.2f}×",
                  f"{ratios['prompts_per_second']:.2f}×",
                  f"{ratios['answer_tokens_per_second']:.2f}×",
                  f"{ratios['tokens_per_second']:.2f}×", f"{ratios['peak_memory']:.2f}×", "", "")
    console = Console()
    console.print(table)
    console.print(
        f"step 1, TRL's {step_one['answers']} sampled answers ({step_one['answer_tokens']} "
        f"tokens, {step_one['truncated_answers']} cut): per-token log-prob |tunelab − TRL| max "
        f"{step_one['max_abs_token_logp_difference']:.2e} nats (mean "
        f"{step_one['mean_abs_token_logp_difference']:.2e}); advantages max difference "
        f"{step_one['max_abs_advantage_difference']:.2e}; loss {step_one['loss']['tunelab']:.6f}"
        f" vs {step_one['loss']['trl']:.6f}; identical prompt ids "
        f"{step_one['identical_prompt_ids']}/{step_one['prompts']}")


# --- the orchestrating parent -------------------------------------------------------------------


def run_worker(side: str, spec: dict, workdir: Path, max_wait_s: float,
               in_process: bool = False) -> dict:
    """One side in a fresh subprocess (``in_process``, for --smoke: in this one, through the
    same arguments); its result row with the load around it."""
    from tunelab import allocator

    spec_path, result_path = workdir / f"spec-{side}.json", workdir / f"result-{side}.json"
    spec_path.write_text(json.dumps({**spec, "scratch": str(workdir / f"scratch-{side}")}))
    load_before, waited_s = wait_for_quiet(max_wait_s)
    started = time.perf_counter()
    worker = ["--worker", side, "--spec", str(spec_path), "--result", str(result_path)]
    if in_process:
        main(worker)
    else:
        environment = (cli_environment(tunelab_config(spec)) if side in ("tunelab", "step_one")
                       else allocator.without_malloc_settings(dict(os.environ)))
        completed = subprocess.run([sys.executable, __file__, *worker], capture_output=True,
                                   text=True, env=environment)
        if completed.returncode != 0:
            raise SystemExit(f"{side} failed:\n{completed.stdout[-3000:]}\n"
                             f"{completed.stderr[-5000:]}")
    row = json.loads(result_path.read_text())
    subprocess.run(["rm", "-rf", str(workdir / f"scratch-{side}")], check=True)
    row.update(side=side, process_wall_s=round(time.perf_counter() - started, 1),
               load_average_before=round(load_before, 2), waited_for_quiet_s=round(waited_s),
               load_average_after=round(os.getloadavg()[0], 2))
    if side in SIDES:
        title = SIDE_TITLES[side].format(trainer=TRAINERS[spec.get("objective", "dpo")])
        print(f"  {title:24s} {row['tokens_per_second']:7.1f} tok/s (median step "
              f"{row['tokens_per_second_median_step']:.1f})  peak "
              f"{row['peak_memory_bytes'] / 2**30:5.2f} GiB  final loss {row['final_loss']:.4f}"
              f"  ({row['steps']} steps, {row['process_wall_s']:.0f} s, load "
              f"{row['load_average_before']}→{row['load_average_after']})", flush=True)
    return row


def prepare_spec(workdir: Path, args, workload: dict, model: str) -> dict:
    """The pairs file, tunelab's config (budget matched to TRL's steps) and the workers' spec."""
    import yaml

    from tunelab.data.packing import plan_batches
    from tunelab.model.load import resolve_model_path

    data_path = workdir / "pairs.jsonl"
    batch_pairs = workload["batch_pairs"]
    write_pairs(data_path, args.pairs or workload["steps"] * batch_pairs, args.seed)
    spec = {"tunelab_model": model, "model_dir": resolve_model_path(model),
            "data_path": str(data_path), "batch_pairs": batch_pairs,
            "max_seq_len": workload["max_seq_len"], "lr": args.lr, "seed": args.seed,
            "scratch": str(workdir / "scratch"), "config_path": str(workdir / "tunelab.yaml"),
            "batch_tokens": workload["max_seq_len"], "tunelab_steps": workload["steps"]}
    config_path = Path(spec["config_path"])
    config_path.write_text(yaml.safe_dump(tunelab_config(spec), sort_keys=False))
    pairs, _ = tunelab_pairs(config_path)
    lengths = [pair.length for pair in pairs]
    # TRL: steps of batch_pairs pairs in file order, never past the data (max_steps would wrap
    # into a second epoch); tunelab: the smallest budget that packs all pairs into as many
    # steps as TRL needs for them, so a step holds batch_pairs pairs on average
    epoch_steps = math.ceil(len(pairs) / batch_pairs)
    budget = matched_batch_tokens(lengths, epoch_steps, args.seed)
    planned = len(plan_batches(lengths, batch_tokens=budget, packing=True, seed=args.seed))
    spec.update(steps=min(workload["steps"], epoch_steps), batch_tokens=budget,
                tunelab_steps=min(workload["steps"], planned))
    config_path.write_text(yaml.safe_dump(tunelab_config(spec), sort_keys=False))
    _, steps = tunelab_pairs(config_path)
    spec.update(tunelab_step_pairs=steps, tunelab_units_per_step=list(map(len, steps)))
    print(f"{len(pairs)} pairs, {sum(lengths)} tokens (pair median "
          f"{statistics.median(lengths):.0f}, {min(lengths)}–{max(lengths)}); TRL "
          f"{spec['steps']} steps of {batch_pairs} pairs, tunelab batch_tokens {budget} "
          f"({spec['tunelab_steps']} steps of {min(map(len, steps))}–{max(map(len, steps))} "
          "pairs)", flush=True)
    spec["data"] = {"pairs": len(pairs), "tokens": sum(lengths),
                    "median_pair_tokens": statistics.median(lengths),
                    "min_pair_tokens": min(lengths), "max_pair_tokens": max(lengths),
                    "source": str(QA_DATA.relative_to(REPO)), "prompt": PROMPT,
                    "tunelab_batch_tokens": budget}
    return spec


def step_one_summary(check: dict, runs: dict) -> dict:
    """Largest per-answer difference of step 1's log-probs (tunelab − TRL, same pairs), the
    step-1 loss difference, and each side's logged step-1 means against the recomputation."""
    ours, theirs = check["tunelab"], check["trl"]
    differences = [abs(a - b) for side in ("chosen", "rejected")
                   for a, b in zip(ours[side], theirs[side], strict=True)]
    trained = check["tunelab_trained_first"]
    logged = {
        "trl": {"chosen": runs["trl"]["chosen_logp"][0] - statistics.fmean(theirs["chosen"]),
                "rejected": runs["trl"]["rejected_logp"][0]
                - statistics.fmean(theirs["rejected"])},
        "tunelab": {"chosen": runs["tunelab"]["chosen_logp"][0]
                    - statistics.fmean(trained["chosen"]),
                    "rejected": runs["tunelab"]["rejected_logp"][0]
                    - statistics.fmean(trained["rejected"])}}
    worst_logged = max(abs(value) for side in logged.values() for value in side.values())
    largest = max(differences)
    return {"pairs": len(ours["chosen"]), "tolerance_nats": TOLERANCE_NATS,
            "max_abs_answer_logp_difference": largest,
            "mean_abs_answer_logp_difference": statistics.fmean(differences),
            "loss": {"tunelab": ours["loss"], "trl": theirs["loss"], "log_2": math.log(2),
                     "abs_difference": abs(ours["loss"] - theirs["loss"])},
            "trl_compute_loss_logged_vs_recomputed": abs(
                theirs["logged_chosen_logp_mean"] - statistics.fmean(theirs["chosen"])),
            "logged_step_1_minus_recomputed": logged,
            "within_tolerance": largest <= TOLERANCE_NATS and worst_logged <= TOLERANCE_NATS,
            "tokenization": check["tokenization"], "per_answer": {"tunelab": ours, "trl": theirs}}


def summarise(runs: dict) -> dict:
    """Both sides' figures and tunelab against TRL."""
    keys = ("tokens_per_second", "tokens_per_second_median_step", "peak_memory_bytes",
            "final_loss", "train_s", "steps", "tokens_per_step_mean", "processed_tokens",
            "non_padding_tokens")
    summary = {side: {key: runs[side][key] for key in keys} for side in SIDES}
    for side in SIDES:
        pairs = sum(runs[side]["pairs_per_step"])
        summary[side].update(pairs=pairs, pairs_per_second=pairs / runs[side]["train_s"],
                             pairs_per_step_mean=pairs / runs[side]["steps"],
                             final_margin=runs[side]["margin"][-1],
                             final_reward_accuracy=runs[side]["reward_accuracy"][-1])
    ours, theirs = summary["tunelab"], summary["trl"]
    summary["tunelab_vs_trl"] = {
        "tokens_per_second": ours["tokens_per_second"] / theirs["tokens_per_second"],
        "tokens_per_second_median_step": ours["tokens_per_second_median_step"]
        / theirs["tokens_per_second_median_step"],
        "pairs_per_second": ours["pairs_per_second"] / theirs["pairs_per_second"],
        "peak_memory": ours["peak_memory_bytes"] / theirs["peak_memory_bytes"]}
    return summary


def print_tables(summary: dict, step_one: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="DPO: tunelab against TRL's DPOTrainer")
    columns = ("", "tokens/s", "tokens/s (median step)", "pairs/s", "peak memory",
               "final loss", "final margin", "steps", "pairs/step")
    for column in columns:
        table.add_column(column, justify="right")
    for side in SIDES:
        values = summary[side]
        table.add_row(SIDE_TITLES[side].format(trainer=TRAINERS["dpo"]),
                      f"{values['tokens_per_second']:.1f}",
                      f"{values['tokens_per_second_median_step']:.1f}",
                      f"{values['pairs_per_second']:.2f}",
                      f"{values['peak_memory_bytes'] / 2**30:.2f} GiB",
                      f"{values['final_loss']:.4f}", f"{values['final_margin']:.4f}",
                      f"{values['steps']}", f"{values['pairs_per_step_mean']:.1f}")
    ratios = summary["tunelab_vs_trl"]
    table.add_row("tunelab / TRL", f"{ratios['tokens_per_second']:.2f}×",
                  f"{ratios['tokens_per_second_median_step']:.2f}×",
                  f"{ratios['pairs_per_second']:.2f}×", f"{ratios['peak_memory']:.2f}×",
                  "", "", "", "")
    console = Console()
    console.print(table)
    tokens = step_one["tokenization"]
    console.print(
        f"step 1, {step_one['pairs']} pairs: per-answer log-prob |tunelab − TRL| max "
        f"{step_one['max_abs_answer_logp_difference']:.2e} nats (mean "
        f"{step_one['mean_abs_answer_logp_difference']:.2e}; tolerance "
        f"{step_one['tolerance_nats']:g}); loss {step_one['loss']['tunelab']:.6f} vs "
        f"{step_one['loss']['trl']:.6f} (log 2 = {math.log(2):.6f}); identical token ids "
        f"{tokens['identical_sequences']}/{tokens['answers']} sequences, "
        f"{tokens['identical_answer_ids']}/{tokens['answers']} answers; logged step-1 means "
        f"vs recomputed: {json.dumps(step_one['logged_step_1_minus_recomputed'])}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="the base model (tunelab's model.path)")
    parser.add_argument("--steps", type=int, help="optimizer steps (default 20; grpo: 10)")
    parser.add_argument("--batch-pairs", type=int, help="TRL's pairs per step (default 8)")
    parser.add_argument("--pairs", type=int,
                        help="pairs (grpo: prompts) in the data set (default: steps × per step)")
    parser.add_argument("--prompts-per-step", type=int, help="grpo: prompts a step (default 4)")
    parser.add_argument("--objective", choices=["dpo", "grpo"], default="dpo")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true",
                        help="seconds, for the test suite: the tiny model, workers in this "
                             "process, the result in a temporary folder")
    parser.add_argument("--wait-for-quiet-s", type=float, default=0.0,
                        help="before each run, wait up to this long for a load average < 1.5")
    parser.add_argument("--out", type=Path, help="results JSON (default: results/...)")
    parser.add_argument("--worker", choices=[*SIDES, "step_one"], help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main(args.worker, args.spec, args.result)
    grpo = args.objective == "grpo"
    workload = dict((GRPO_WORKLOADS if grpo else WORKLOADS)["smoke" if args.smoke else "full"])
    workload.update({key: value for key, value in (("steps", args.steps),
                                                   ("batch_pairs", args.batch_pairs),
                                                   ("prompts_per_step", args.prompts_per_step))
                     if value and key in workload})
    report = measure(args, workload)
    name = "grpo-vs-trl.json" if grpo else "preference-vs-trl.json"
    out = smoke.result_path(args.out, name) if args.smoke else args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {out}")


def measure(args, workload: dict) -> dict:
    """Build the data and config, run both sides and the step-1 check; the result file."""
    import trl

    origin = provenance()
    origin["machine"]["trl"] = trl.__version__
    print(f"provenance: {origin}", flush=True)
    grpo = args.objective == "grpo"
    with tempfile.TemporaryDirectory(prefix="tunelab-preference-bench-") as tmp:
        workdir = Path(tmp)
        model = str(smoke.tiny_model(workdir / "tiny-model")) if args.smoke else args.model
        spec = (prepare_grpo_spec if grpo else prepare_spec)(workdir, args, workload, model)
        runs = {side: run_worker(side, spec, workdir, args.wait_for_quiet_s,
                                 in_process=args.smoke) for side in SIDES}
        check = run_worker("step_one", spec, workdir, args.wait_for_quiet_s,
                           in_process=args.smoke)
        config = tunelab_config({**spec, "scratch": "SCRATCH"})
    origin["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    if grpo:
        summary, step_one = grpo_summarise(runs, spec), grpo_step_one_summary(check)
        print_grpo_tables(summary, step_one)
        settings = {"temperature": TEMPERATURE, "loss": "dapo", "kl_weight": 0.0,
                    "scale_rewards": True, "mask_truncated": MASK_TRUNCATED}
    else:
        summary, step_one = summarise(runs), step_one_summary(check, runs)
        print_tables(summary, step_one)
        settings = {"beta": BETA, "loss_type": "sigmoid",
                    "tunelab_batch_tokens": spec["batch_tokens"],
                    "tunelab_steps": spec["tunelab_steps"]}
    return {"benchmark": "preference_vs_trl", "objective": args.objective,
            "date": date.today().isoformat(), **origin,
            "model": {"path": "tiny (smoke)" if args.smoke else args.model,
                      "dtype": "float32", "attention": "sdpa"},
            "lora": LORA,
            "workload": {**workload, "lr": args.lr, "schedule": "constant", "warmup_steps": 0,
                         "seed": args.seed, **settings},
            "data": spec["data"], "tunelab_config": config, "runs": runs, "summary": summary,
            "step_one": step_one}

if __name__ == "__main__":
    main()
