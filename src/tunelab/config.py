"""The YAML config schema as pydantic models; ``load_config`` makes every mistake a ConfigError.

Relative paths in a config file (data files, a local model folder) are resolved against the
folder that holds the config file, so an example runs from any working directory.
"""

from __future__ import annotations

import difflib
import json
import os
import textwrap
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.data.formats import FORMATS
from tunelab.errors import ConfigError
from tunelab.eval.tasks import TASKS
from tunelab.importers import foreign_config_error
from tunelab.model.adapters import METHODS
from tunelab.objectives import OBJECTIVES, RL_LOSSES


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    """The base model: a local folder, a hub id, a .gguf file, or the embedded default."""

    path: str = Field("embedded:smollm2-135m-instruct", description=(
        "The base model: a local model folder, a hub id already in the local Hugging Face cache "
        "(nothing is downloaded), a .gguf file, or embedded:smollm2-135m-instruct (packaged)."))
    gguf_file: str | None = Field(None, description=(
        "Which .gguf file to load from a folder or hub repo that holds several."))
    dtype: Literal["auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16"] = Field(
        "auto", description="Weight dtype; auto: bfloat16 on a GPU that supports it, else "
        "float32.")
    device: str = Field("auto", description=(
        "Where the model runs: auto (CUDA when available, else CPU), cpu, cuda or cuda:N."))
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="The attention kernel transformers uses; flash_attention_2 needs "
        "the flash-attn package and a GPU.")


class MethodConfig(_Section):
    """How the model is tuned: a LoRA-family adapter (the default) or all weights."""

    kind: Literal[tuple(METHODS)] = Field("lora", description=(  # type: ignore[valid-type]
        "How the model is tuned: lora (a low-rank adapter on frozen weights), dora (LoRA with "
        "a learned magnitude per output), qlora (LoRA on a base loaded in 4-bit NF4 with "
        "bitsandbytes: a quarter of the base's memory) or full (every weight trains; the most "
        "memory)."))
    r: int = Field(16, ge=1, description=(
        "Rank of the adapter matrices: more capacity (and memory) with a larger r."))
    alpha: float = Field(32.0, gt=0, description=(
        "Adapter scale: its update is multiplied by alpha / r (alpha / sqrt(r) with rslora)."))
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description=(
        "Dropout on the adapter's input while training."))
    targets: str | list[str] = Field("all-linear", description=(
        "Which linear layers get adapters: all-linear, a list of layer names (e.g. [q_proj, "
        "v_proj]), or a regular expression over full module names."))
    rslora: bool = Field(False, description=(
        "Rank-stabilised LoRA: scale by alpha / sqrt(r) instead of alpha / r."))
    shared_dropout: bool = Field(True, description=(
        "LoRA dropout: one dropout mask per input, shared by the projections that read it (q/k/v "
        "of a layer; gate/up), kept as a bool mask; false: peft's own dropout in every "
        "projection, each keeping a float copy of its input for the backward pass (about twice "
        "the activation memory of the adapters). Either way each projection sees its input with "
        "method.dropout of it zeroed."))
    objective: Literal[tuple(OBJECTIVES)] = Field("sft", description=(  # type: ignore[valid-type]
        "What the model is trained to do, whatever method.kind: sft (next-token loss on the "
        "targets), dpo (prefer the chosen answer to the rejected one, relative to the reference "
        "model), simpo (the same on length-normalised log-probabilities, no reference), kto "
        "(unpaired answers labelled desirable or not), grpo or rloo (reinforcement: answers "
        "sampled from the model, rewarded by rl.rewards). Preference and reinforcement runs "
        "train without adapter dropout, so that the policy's log-probabilities are the ones "
        "compared."))
    beta: float = Field(0.1, gt=0, description=(
        "dpo / kto: the strength of the pull towards the reference model (TRL's beta); simpo: "
        "the reward scale (SimPO's beta; 2.0 in its paper)."))
    sft_weight: float = Field(0.0, ge=0, description=(
        "dpo / simpo / kto: weight of an added next-token loss on the chosen (desirable) "
        "answers, per answer token (RPO's term); 0: none."))
    simpo_gamma: float = Field(0.5, ge=0, description=(
        "simpo: the target reward margin gamma; the loss is -log sigmoid(beta * (chosen - "
        "rejected mean log-probability) - gamma), as TRL's CPOTrainer computes it."))
    desirable_weight: float = Field(1.0, gt=0, description=(
        "kto: weight of the desirable answers' loss (raise it when they are the fewer)."))
    undesirable_weight: float = Field(1.0, gt=0, description=(
        "kto: weight of the undesirable answers' loss."))


class TaskData(_Section):
    """One task's data: its files and how their records are read (shared by data and its tasks)."""

    train: list[str] = Field(description=(
        "Training data: a file or a list of files (JSONL, JSON, CSV, TSV, Parquet, .jsonl.gz), a "
        "saved Hugging Face dataset folder ('folder::split' picks a split) or hf://name."))
    validation: list[str] = Field([], description=(
        "Validation data; its loss is measured before, during (train.eval_every) and after "
        "training, and the before/after samples come from it."))
    test: list[str] = Field([], description=(
        "Held-out test data for tunelab eval (eval.split: test); never trained on."))
    validation_split: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Without validation files: the fraction of training examples held out as validation "
        "data (drawn with train.seed)."))
    format: Literal[("auto", *FORMATS)] = Field(  # type: ignore[valid-type]
        "auto", description="Record format: auto (detected per file), chat (OpenAI messages), "
        "sharegpt (conversations of from/value turns), instruction (Alpaca), completion "
        "(prompt/completion: strings, or TRL's conversational message lists), text, or template "
        "(data.prompt and data.completion over any columns).")
    prompt: str | None = Field(None, description=(
        "Template mode: a format string over the record's columns that gives the prompt, e.g. "
        "'Review: {text}\\nSentiment:'. Needs data.completion."))
    completion: str | None = Field(None, description=(
        "Template mode: the format string of the trained target, e.g. ' {label}'. Needs "
        "data.prompt."))

    @field_validator("train", "validation", "test", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @model_validator(mode="after")
    def _template_pair(self) -> TaskData:
        if (self.prompt is None) != (self.completion is None):
            missing = "completion" if self.completion is None else "prompt"
            raise ValueError(
                f"template mode needs both data.prompt and data.completion; data.{missing} is "
                "missing"
            )
        return self


#: apply_chat_template's own arguments: tunelab's renderer sets them, a template variable cannot.
_RENDERER_ARGUMENTS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length",
    "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
    "sanitize_control_tokens"})


class DataConfig(TaskData):
    """Data files, their format, and which tokens carry the loss."""

    train: list[str] = Field([], description=(
        "Training data: a file or a list of files (JSONL, JSON, CSV, TSV, Parquet, .jsonl.gz), a "
        "saved Hugging Face dataset folder ('folder::split' picks a split) or hf://name. "
        "Required unless data.tasks lists the tasks of a multitask run."))
    train_on: Literal["completion", "all"] = Field("completion", description=(
        "Which tokens carry the loss: completion (targets and assistant turns only) or all."))
    chat_template: str | None = Field(None, description=(
        "A Jinja chat template used instead of the tokenizer's own (ChatML when it has none)."))
    chat_template_kwargs: dict[str, Any] = Field({}, description=(
        "Extra variables for the chat template, in every rendering: training, evaluation, "
        "tunelab chat and serve, e.g. {enable_thinking: false} for Qwen3 (an empty <think> "
        "block before each answer, so the model answers without reasoning)."))
    truncation: Literal["prompt", "drop", "end"] = Field("prompt", description=(
        "An example longer than train.max_seq_len: prompt cuts the middle of its prompt and "
        "keeps the whole target; drop leaves it out; end cuts its end, target included. "
        "tunelab data check counts the examples each choice affects."))
    tasks: list[TaskConfig] = Field([], description=(
        "Multitask: a list of tasks, each with its own name, files (train, validation, test), "
        "format or templates, eval section and weight; one adapter learns them all. Replaces "
        "data.train/validation/test/format/prompt/completion, which stay empty."))
    mixing: Literal["proportional", "temperature", "weights"] = Field(
        "proportional", description=(
            "Multitask: each task's share of the training tokens. proportional: its share of "
            "all training tokens; temperature: proportional to (its tokens)^(1/data.temperature), "
            "which lifts small tasks; weights: proportional to each task's weight."))
    temperature: float = Field(2.0, ge=1.0, description=(
        "Multitask, mixing temperature: T in (task tokens)^(1/T); 1 is proportional, larger "
        "values move the shares towards equal."))

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any]) -> dict[str, Any]:
        taken = sorted(set(value) & _RENDERER_ARGUMENTS)
        if taken:
            raise ValueError(f"data.chat_template_kwargs: {taken[0]!r} is set by tunelab's "
                             "renderer itself (messages, tools, generation prompt); remove it")
        return value

    @model_validator(mode="after")
    def _tasks_or_files(self) -> DataConfig:
        if self.tasks:
            # By value, not by "was it set": the saved run config writes every default out.
            defaults = TaskData.model_fields
            given = [name for name in ("train", "validation", "test", "validation_split",
                                       "format", "prompt", "completion")
                     if getattr(self, name) != (defaults[name].default if name != "train"
                                                else [])]
            if given:
                raise ValueError(f"data.{given[0]} and data.tasks are both given; with data.tasks "
                                 f"each task names its own files and format (move data.{given[0]}"
                                 " into the tasks)")
            names = [task.name for task in self.tasks]
            twice = sorted({name for name in names if names.count(name) > 1})
            if twice:
                raise ValueError(f"data.tasks: the task name {twice[0]!r} is used twice; each "
                                 "task needs its own name (it names its metrics and eval files)")
        elif not self.train:
            raise ValueError("data.train is required (or data.tasks, for a multitask run)")
        if self.temperature != type(self).model_fields["temperature"].default and \
                self.mixing != "temperature":
            raise ValueError(f"data.temperature only applies with data.mixing: temperature (data."
                             f"mixing is {self.mixing}); set data.mixing: temperature or remove it")
        weighted = [task.name for task in self.tasks if task.weight != 1.0]
        if weighted and self.mixing != "weights":
            raise ValueError(f"data.tasks: task {weighted[0]!r} has a weight, but data.mixing is "
                             f"{self.mixing}, which ignores weights; set data.mixing: weights or "
                             "remove the weights")
        return self


class TrainConfig(_Section):
    """The optimisation: length, learning rate, batches, logging, checkpoints."""

    epochs: float = Field(1.0, gt=0, description=(
        "Passes over the training data (fractions allowed); train.max_steps overrides it."))
    max_steps: int | None = Field(None, ge=1, description=(
        "Stop after this many optimizer steps instead of counting epochs."))
    lr: float = Field(2e-4, gt=0, description="Peak learning rate of AdamW.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(0.03, ge=0, le=1, description=(
        "Fraction of the steps over which the learning rate rises from 0 to train.lr."))
    warmup_steps: int | None = Field(None, ge=0, description=(
        "Warm-up length in steps; overrides train.warmup_ratio."))
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description=(
        "Learning rate after warm-up: cosine or linear decay to 0, or constant."))
    batch_tokens: int = Field(4096, ge=8, description=(
        "Tokens in one micro-batch (padding included when train.packing is false)."))
    grad_accum: int = Field(1, ge=1, description=(
        "Micro-batches whose gradients are summed into one optimizer step."))
    max_seq_len: int = Field(1024, ge=8, description=(
        "Longest example in tokens; longer examples are truncated."))
    packing: bool = Field(True, description=(
        "Pack examples into rows without padding (attention stays within each example); "
        "false pads each row to its longest example."))
    max_grad_norm: float | None = Field(1.0, gt=0, description=(
        "Clip the gradient norm to this value; null turns clipping off."))
    seed: int = Field(0, description=(
        "Seed of the data order, the validation split, dropout and adapter initialisation."))
    eval_every: int = Field(0, ge=0, description=(
        "Measure the validation loss every N steps (0: only before and after training)."))
    save_every: int = Field(0, ge=0, description=(
        "Write a checkpoint every N steps (0: only when the run is stopped or interrupted)."))
    keep_checkpoints: int = Field(2, ge=1, description=(
        "How many of the newest checkpoints are kept."))
    log_every: int = Field(1, ge=1, description="Write a metrics.jsonl record every N steps.")
    report_to: list[Literal["tensorboard", "mlflow", "wandb", "trackio"]] = Field(
        [], description=(
            "Also stream every metrics.jsonl record, and later the run's evaluations, to these "
            "trackers (docs/trackers.md): tensorboard (event files in RUN/tensorboard), mlflow "
            "(a local SQLite store, output_dir/mlflow.db, unless MLFLOW_TRACKING_URI is set), "
            "wandb (RUN/wandb, offline unless WANDB_MODE or a W&B API key is set) and trackio "
            "(its local database); each needs its extra, e.g. pip install "
            "\"tunelab[mlflow]\". A resumed run continues the same tracker run."))
    memory: Literal["default", "low"] = Field("default", description=(
        "default: activations kept for the backward pass (fastest); low: each decoder layer's "
        "activations recomputed in the backward pass instead (activation checkpointing), and "
        "glibc's tuned allocator where jemalloc is not installed (train.allocator): a fraction "
        "of the memory, slower. tunelab plan --memory-budget says which fits."))
    gradient_checkpointing: bool | None = Field(None, description=(
        "Recompute each layer's activations in the backward pass: far less memory, ~40% slower; "
        "null: as train.memory says (on for low)."))
    fused_swiglu: bool = Field(True, description=(
        "Llama-style MLPs (silu(gate) * up) keep gate and up for the backward pass and "
        "recompute silu(gate) there: one [tokens × intermediate] tensor per layer less, same "
        "gradients (model/swiglu.py); false: transformers' own forward."))
    allocator: Literal["auto", "jemalloc", "tuned", "system"] = Field("auto", description=(
        "The malloc that holds the activations on CPU. jemalloc: freed activations reused "
        "without the fragments of glibc's heap and without page faults (the tunelab command "
        "preloads it; install libjemalloc2 or conda's jemalloc); tuned: glibc malloc with a "
        "fixed mmap threshold, freed activations handed back to the system at once (less "
        "memory, a page fault per page of every new activation: slower); system: the C "
        "library's defaults; auto: jemalloc where installed, else tuned when train.memory is "
        "low and system otherwise. MALLOC_* or LD_PRELOAD set by hand take precedence."))
    loss_chunk_tokens: int = Field(512, ge=16, description=(
        "Loss targets whose logits are computed at once ([chunk × vocabulary] fp32 logits, "
        "their log-probabilities and gradient: ~0.3 GB at 512 for a 49k vocabulary); lower "
        "it to save memory. A frozen output layer computes each chunk once; a trainable one "
        "recomputes them in the backward pass when there is more than one chunk."))
    samples: int = Field(3, ge=0, description=(
        "Validation examples completed greedily before and after training, to compare."))
    max_new_tokens: int = Field(16, ge=1, description=(
        "Longest before/after sample completion, in tokens."))
    distributed: Literal["auto", "ddp", "fsdp"] = Field("auto", description=(
        "How the ranks of a torchrun launch share the work: ddp (every rank holds the model; "
        "only trainable gradients are all-reduced), fsdp (FSDP2: weights, gradients and "
        "optimizer state sharded per decoder block); auto: ddp for adapters, fsdp for full "
        "fine-tuning. One process ignores it."))
    init_from: str | None = Field(None, description=(
        "Start from a finished run's result instead of the base: its adapter (trained further; "
        "method.kind must match) or its full weights, e.g. an SFT run before DPO. The reference "
        "model stays the base unless the run was fully fine-tuned."))
    distributed_timeout_s: float = Field(600.0, gt=0, description=(
        "Under torchrun, the longest a rank waits for the others (a crashed or hung rank) "
        "before the run fails instead of hanging; torchrun then stops every rank."))

    @property
    def checkpointing(self) -> bool:
        """Whether activation checkpointing is on: train.gradient_checkpointing when set, else
        as train.memory says."""
        if self.gradient_checkpointing is not None:
            return self.gradient_checkpointing
        return self.memory == "low"

    @model_validator(mode="after")
    def _batch_fits(self) -> TrainConfig:
        if self.batch_tokens < self.max_seq_len and self.packing is False:
            raise ValueError(
                f"train.batch_tokens ({self.batch_tokens}) is smaller than train.max_seq_len "
                f"({self.max_seq_len}): a long example would not fit in a batch"
            )
        return self


class RewardConfig(_Section):
    """One reward of a reinforcement run and its weight in the sum."""

    function: str = Field(description=(
        "task: the run's eval.task scorer against each example's reference (label match, exact "
        "match, token F1, chrF, ROUGE-L, tool-call match; per answer, on its scale of 0-1); "
        "python:module:function (or python:path/to/file.py:function): TRL's signature, "
        "f(prompts, completions, **columns) -> list[float | None], the record's columns passed "
        "by name; None leaves that answer out of this reward."))
    weight: float = Field(1.0, description="This reward's weight in the total reward.")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"function": value} if isinstance(value, str) else value


class RLConfig(_Section):
    """Reinforcement with verifiable rewards (method.objective: grpo or rloo): answers sampled
    from the model in training, scored by the rewards, compared within each prompt's group."""

    rewards: list[RewardConfig] = Field([RewardConfig(function="task")], description=(
        "The rewards, summed with their weights: task, or python:module:function entries "
        "(each a string or {function, weight})."))
    group_size: int = Field(4, ge=2, description=(
        "Answers sampled per prompt; each is compared with its group's mean (grpo) or with the "
        "mean of the others (rloo)."))
    prompts_per_step: int = Field(4, ge=1, description=(
        "Prompts per optimizer step (group_size answers each)."))
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the answers.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the answers.")
    max_new_tokens: int = Field(32, ge=1, description=(
        "Longest sampled answer in tokens; an answer cut there is truncated."))
    mask_truncated: bool = Field(True, description=(
        "Leave answers cut at rl.max_new_tokens out of the loss (DAPO's overlong filtering): "
        "their reward judges an answer that was never finished."))
    loss: Literal[RL_LOSSES] = Field("dapo", description=(  # type: ignore[valid-type]
        "How the policy-gradient loss is averaged: dapo (over every answer token of the step), "
        "grpo (each answer's tokens, then the answers), dr_grpo (each answer's tokens summed "
        "over rl.max_new_tokens: no preference for short or long answers)."))
    kl_weight: float = Field(0.0, ge=0, description=(
        "Weight of a KL penalty towards the reference model (the k3 estimator); 0: none, and "
        "no reference forward pass."))
    scale_rewards: bool = Field(True, description=(
        "grpo: divide each group's advantages by its reward spread (false: Dr. GRPO's "
        "unscaled advantages)."))
    guard_every: int = Field(10, ge=1, description=(
        "Every N steps (and at step 1), the trainer's log-probabilities of the sampled tokens "
        "are compared with the sampler's: the answers must come from the policy being trained."))
    guard_tolerance: float = Field(0.02, gt=0, description=(
        "The largest mean absolute difference (nats per token) between the two before the run "
        "stops; bf16 kernels differ more than fp32."))
    preflight_prompts: int = Field(16, ge=0, description=(
        "Before training: answers sampled for this many training prompts from the starting "
        "model, to report pass@1 / pass@group_size and the share of groups whose rewards all "
        "tie; 0 skips it."))
    max_tied_share: float = Field(0.75, gt=0, le=1, description=(
        "The run stops before training when more of the pre-flight groups than this tie "
        "(every answer the same reward: nothing to learn from)."))


class EvalConfig(_Section):
    """How a model is evaluated: the task, its prompts, and the statistics."""

    task: Literal[tuple(TASKS)] = Field("classification", description=(  # type: ignore[valid-type]
        "The task kind: how answers are obtained and scored (eval/tasks.py): "
        + ", ".join(TASKS) + "."))
    split: Literal["test", "validation"] = Field("test", description=(
        "The data evaluated: test (data.test) or validation (data.validation)."))
    labels: list[str] = Field([], description=(
        "Classification: the label strings, as the completion template writes them."))
    entity_types: list[str] = Field([], description=(
        "NER: the entity types to read from outputs (default: any type)."))
    predict: Literal["score", "generate", "both"] = Field("score", description=(
        "Classification: score ranks the labels by log-likelihood; generate writes an answer "
        "and parses a label from it."))
    prompt_variants: list[str] = Field([], description=(
        "Prompt templates to evaluate under, to measure prompt sensitivity (mean and spread); "
        "default: data.prompt alone."))
    shots: int = Field(0, ge=0, description=(
        "Solved training examples put before each prompt (few-shot)."))
    context: str | None = Field(None, description=(
        "Template of the text answers must come from, e.g. '{text}', for the hallucination "
        "check."))
    max_new_tokens: int = Field(64, ge=1, description="Longest generated answer, in tokens.")
    strip_thinking: bool = Field(True, description=(
        "Remove <think>...</think> blocks from generated answers before they are scored (a "
        "thinking model such as Qwen3 writes its reasoning first); an unterminated block, cut "
        "by eval.max_new_tokens, leaves an empty answer. The eval file counts both."))
    stop: list[str] = Field(["\n\n"], description="Strings that end a generated answer.")
    max_examples: int | None = Field(None, ge=1, description=(
        "Evaluate only the first N examples of the split."))
    batch_size: int = Field(16, ge=1, description="Prompts generated at once.")
    bootstrap: int = Field(1000, ge=100, description=(
        "Bootstrap resamples behind the 95% intervals and the paired comparison."))
    seed: int = Field(0, description=(
        "Seed of the bootstrap and of the few-shot demonstrations drawn."))

    @model_validator(mode="after")
    def _task_requirements(self) -> EvalConfig:
        for name in TASKS[self.task].requires:
            if not getattr(self, name):
                description = type(self).model_fields[name].description
                raise ValueError(f"eval.task {self.task} needs eval.{name} ({description})")
        return self


class TaskConfig(TaskData):
    """One task of a multitask run: its name, data, evaluation and weight in the mixture."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description=(
        "The task's name (letters, digits, . _ -): it names the task's token counts and "
        "validation loss in metrics.jsonl and its eval file (eval/<split>-<name>.json)."))
    weight: float = Field(1.0, gt=0, description=(
        "The task's weight with data.mixing: weights; its share of the training tokens is its "
        "weight over the sum of the weights."))
    eval: EvalConfig | None = Field(None, description=(
        "How tunelab eval measures this task (task kind, labels, prompts...); without it the "
        "task is trained but not evaluated."))


DataConfig.model_rebuild()


class Config(_Section):
    """A whole tunelab run."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description=(
        "The run's name (letters, digits, . _ -); its directory is output_dir/name."))
    output_dir: str = Field("runs", description="The folder that holds run directories.")
    model: ModelConfig = Field(ModelConfig(), description=ModelConfig.__doc__)
    method: MethodConfig = Field(MethodConfig(), description=MethodConfig.__doc__)
    data: DataConfig = Field(description=DataConfig.__doc__)
    train: TrainConfig = Field(TrainConfig(), description=TrainConfig.__doc__)
    eval: EvalConfig | None = Field(None, description=(
        "How tunelab eval measures the model; without it, a run only trains."))
    rl: RLConfig = Field(RLConfig(), description=RLConfig.__doc__)

    @model_validator(mode="after")
    def _one_eval_per_task(self) -> Config:
        if self.data.tasks and self.eval is not None:
            raise ValueError("a multitask config (data.tasks) has an eval section per task; move "
                             "the top-level eval section into the tasks (data.tasks[i].eval)")
        return self

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> Config:
    """Read, validate and resolve a YAML config; every problem is a ConfigError naming the key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"config file {str(path)!r} does not exist",
            fix=_did_you_mean(path) or "pass the path of a YAML config, e.g. "
            "examples/sentiment/config.yaml",
        )
    try:
        text = path.read_text(encoding="utf-8")
        document = yaml.compose(text)
        raw = yaml.safe_load(text)
    except UnicodeDecodeError as error:
        raise ConfigError(f"is not UTF-8 text ({error.reason})", where=str(path)) from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"is not valid YAML: {problem}", where=where,
                          fix="check the indentation and quoting on that line") from None
    if not isinstance(raw, dict):
        raise ConfigError("must be a YAML mapping of sections (name, model, method, data, train)",
                          where=str(path))
    foreign = foreign_config_error(raw, path)  # an Axolotl, TRL or LLaMA-Factory config
    if foreign is not None:
        raise foreign
    for dotted, value in (overrides or {}).items():
        _set_dotted(raw, dotted, value)
    return config_from_dict(raw, source=str(path), document=document, base_dir=path.parent)


def config_from_dict(raw: dict[str, Any], *, source: str = "<config>", document: Any = None,
                     base_dir: Path | None = None) -> Config:
    """Validate a config given as a dict (paths relative to ``base_dir``, default: cwd)."""
    try:
        config = Config.model_validate(raw)
    except ValidationError as error:
        raise _friendly(error, source, document) from None
    # Absolute paths, so the resolved config saved in a run directory works from anywhere.
    return _resolve_paths(config, (base_dir or Path.cwd()).resolve(), source, document)


def dump_config(config: Config, path: Path) -> None:
    """Write the resolved config as YAML (defaults included), so the run can be repeated.

    Atomically: a crash or a full disk never leaves half a config for ``--resume`` to read."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
    temporary.replace(path)


@dataclass
class FieldDoc:
    """One config field as ``tunelab config --explain`` shows it."""

    key: str  # dotted, e.g. train.lr
    type: str
    default: str
    description: str


def explain(key: str | None = None) -> list[FieldDoc]:
    """Type, default and description of every field under ``key`` (a section or a field; all
    fields when None), read from the schema itself. An unknown key is a ConfigError with a hint.
    """
    model: type[BaseModel] = Config
    prefix: list[str] = []
    for part in key.split(".") if key else []:
        field = model.model_fields.get(part)
        if field is None:
            raise _unknown_key(".".join(prefix + [part]), part, model)
        prefix.append(part)
        section = _section_model(field)
        if section is None:
            return [_field_doc(".".join(prefix), field)]
        model = section
    return list(_field_docs(model, prefix))


def render_explanation(docs: list[FieldDoc]) -> str:
    """Plain text: one ``key  type  (default ...)`` line per field, its description below."""
    lines = []
    for doc in docs:
        lines.append(f"{doc.key}  {doc.type}  (default: {doc.default})")
        lines += textwrap.wrap(doc.description, width=96, initial_indent="    ",
                               subsequent_indent="    ")
    return "\n".join(lines)


def _field_docs(model: type[BaseModel], prefix: list[str]):
    for name, field in model.model_fields.items():
        section = _section_model(field)
        if section is None:
            yield _field_doc(".".join(prefix + [name]), field)
        else:
            yield from _field_docs(section, prefix + [name])


def _section_model(field: Any) -> type[BaseModel] | None:
    """The section model a field holds (``eval: EvalConfig | None`` included), else None."""
    for candidate in (field.annotation, *get_args(field.annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _field_doc(key: str, field: Any) -> FieldDoc:
    if field.is_required():
        default = "required"
    else:
        default = json.dumps(field.default, ensure_ascii=False)
    bounds = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    limits = [f"{sign} {getattr(item, name)}" for item in field.metadata
              for name, sign in bounds.items() if hasattr(item, name)]
    type_text = _type_text(field.annotation) + (f" ({', '.join(limits)})" if limits else "")
    return FieldDoc(key, type_text, default, field.description or "")


def _type_text(annotation: Any) -> str:
    """``Literal["a", "b"]`` → ``a | b``; ``int | None`` → ``int | null``; ``list[str]``."""
    if annotation is None or annotation is type(None):
        return "null"
    if get_origin(annotation) is Literal:
        return " | ".join(str(value) for value in get_args(annotation))
    if get_origin(annotation) in (UnionType, Union):
        return " | ".join(_type_text(arg) for arg in get_args(annotation))
    if get_origin(annotation) is list:
        return f"list[{_type_text(get_args(annotation)[0])}]"
    return getattr(annotation, "__name__", str(annotation))


def _unknown_key(dotted: str, part: str, model: type[BaseModel]) -> ConfigError:
    known = list(model.model_fields)
    hint = [_SYNONYMS[part]] if part in _SYNONYMS and _SYNONYMS[part] in known else \
        difflib.get_close_matches(part, known, n=1)
    return ConfigError(f"unknown key '{dotted}'", where="tunelab config --explain",
                       fix=(f"did you mean '{hint[0]}'?" if hint else "check the spelling.")
                       + f" Known keys here: {', '.join(known)}")


def _resolve_paths(config: Config, base_dir: Path, source: str, document: Any) -> Config:
    sections = [(config.data, ("data",))] + [
        (task, ("data", "tasks", number)) for number, task in enumerate(config.data.tasks)]
    for data, loc in sections:
        dotted = _dotted(loc)
        for key in ("train", "validation", "test"):
            resolved = []
            for index, name in enumerate(getattr(data, key)):
                if name.startswith("hf://"):
                    resolved.append(name)
                    continue
                file_part, _, split = name.partition("::")
                candidate = Path(os.path.expanduser(file_part))
                if not candidate.is_absolute():
                    candidate = base_dir / candidate
                if not candidate.exists():
                    several = len(getattr(data, key)) > 1
                    field_path = f"{dotted}.{key}[{index}]" if several else f"{dotted}.{key}"
                    raise ConfigError(
                        f"{field_path}: data file {str(candidate)!r} does not exist",
                        where=_where(source, document, (*loc, key)),
                        fix=_did_you_mean(candidate) or "check the path; relative paths are "
                        "resolved against the config file's folder",
                    )
                resolved.append(str(candidate) + (f"::{split}" if split else ""))
            setattr(data, key, resolved)
    model_path = config.model.path
    looks_local = model_path.startswith((".", "/", "~")) or model_path.endswith(".gguf")
    if looks_local:
        candidate = Path(os.path.expanduser(model_path))
        if not candidate.is_absolute():
            candidate = base_dir / candidate
        if not candidate.exists():
            raise ConfigError(
                f"model.path: {str(candidate)!r} does not exist",
                where=_where(source, document, ("model", "path")),
                fix=_did_you_mean(candidate) or "point model.path at a model folder, a hub id, or "
                "embedded:smollm2-135m-instruct",
            )
        config.model.path = str(candidate)
    if config.train.init_from:  # a run directory: relative to the config, like the data
        start = Path(os.path.expanduser(config.train.init_from))
        config.train.init_from = str(start if start.is_absolute() else base_dir / start)
    for reward in config.rl.rewards:  # python:path/to/file.py:function, relative to the config
        target, _, name = reward.function.removeprefix("python:").rpartition(":")
        if reward.function.startswith("python:") and target.endswith(".py") \
                and not Path(os.path.expanduser(target)).is_absolute():
            reward.function = f"python:{base_dir / target}:{name}"
    return config


# Names other fine-tuning tools use for our keys, so their users get a useful hint.
_SYNONYMS = {
    "learning_rate": "lr", "num_epochs": "epochs", "num_train_epochs": "epochs",
    "lora_r": "r", "rank": "r", "lora_alpha": "alpha", "lora_dropout": "dropout",
    "target_modules": "targets", "lora_target_modules": "targets",
    "sequence_len": "max_seq_len", "max_length": "max_seq_len", "seq_len": "max_seq_len",
    "gradient_accumulation_steps": "grad_accum", "lr_scheduler": "schedule",
    "lr_scheduler_type": "schedule", "sample_packing": "packing", "base_model": "path",
    "eval_steps": "eval_every", "save_steps": "save_every", "logging_steps": "log_every",
    "datasets": "train", "val_set_size": "validation_split", "output": "output_dir",
}


def _friendly(error: ValidationError, source: str, document: Any) -> ConfigError:
    """One paragraph for the first problem, naming the key, the line and the fix."""
    problems = []
    for item in error.errors():
        loc = tuple(item["loc"])
        dotted = _dotted(loc) or "(top level)"
        kind = item["type"]
        if kind == "extra_forbidden":
            parent = _model_at(loc[:-1])
            known = sorted(parent.model_fields) if parent else []
            hint = [_SYNONYMS[loc[-1]]] if loc[-1] in _SYNONYMS else difflib.get_close_matches(
                str(loc[-1]), known, n=1)
            fix = (f"did you mean '{hint[0]}'?" if hint else "remove it.") + (
                f" Known keys here: {', '.join(known)}" if known else "")
            problems.append((loc, f"unknown key '{dotted}'", fix))
        elif kind == "missing":
            problems.append((loc, f"'{dotted}' is required", f"add {dotted} to the config"))
        else:
            given = item.get("input")
            message = f"'{dotted}': {item['msg'].removeprefix('Value error, ')}"
            if kind != "value_error" and not isinstance(given, dict):
                message += f" (got {given!r})"
            problems.append((loc, message, None))
    # A misspelt key usually also leaves a required key missing: report the spelling first.
    problems.sort(key=lambda problem: not problem[1].startswith("unknown key"))
    loc, message, fix = problems[0]
    for other_loc, other_message, _ in problems[1:3]:
        message += f"; also {_where(source, document, other_loc)}: {other_message}"
    if len(problems) > 3:
        message += f"; and {len(problems) - 3} more"
    return ConfigError(message, where=_where(source, document, loc), fix=fix)


def _dotted(loc: tuple) -> str:
    """``("data", "tasks", 0, "eval")`` → ``data.tasks[0].eval``."""
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc)[1:]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = Config
    for part in loc:
        if isinstance(part, int):  # an item of a list of sections (data.tasks[i])
            continue
        field = model.model_fields.get(str(part))
        annotation = _section_model(field) if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _where(source: str, document: Any, loc: tuple) -> str:
    """``file:line`` of the deepest YAML node on ``loc`` that exists."""
    line = None
    node = document
    for part in loc:
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                break
            node = node.value[part]  # a list item (data.tasks[i]): its own line
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == str(part):
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return f"{source}:{line}" if line else source


def _did_you_mean(path: Path) -> str | None:
    folder = path.parent if path.parent.is_dir() else None
    if folder is None:
        return None
    names = [entry.name for entry in folder.iterdir()]
    close = difflib.get_close_matches(path.name, names, n=1, cutoff=0.6)
    return f"did you mean {str(folder / close[0])!r}?" if close else None


def _set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = raw
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"cannot set '{dotted}': '{key}' is not a section", where="--set")
    node[keys[-1]] = value
