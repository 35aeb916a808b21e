"""The training loop, top to bottom: data → model → steps → checkpoints → final adapter.

``train(config)`` is the whole recipe. Everything it needs is prepared before the run directory
is created, so bad data, a bad config or a missing model leave nothing behind; a run that fails
before its first checkpoint is removed again.
"""

from __future__ import annotations

import random
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from tunelab import allocator as malloc
from tunelab.banner import print_start
from tunelab.config import Config
from tunelab.data.formats import Example
from tunelab.data.mixture import task_token_counts
from tunelab.data.packing import plan_batches
from tunelab.data.preference import prepare_preference_data
from tunelab.data.prepare import prepare_data
from tunelab.data.schedule import Schedule, run_schedule, schedule_micro_batches
from tunelab.data.tokenize import EvalPrompt, TokenizedExample, eval_prompts
from tunelab.errors import ConfigError, RunError
from tunelab.eval.generate import generate_texts
from tunelab.model import varlen
from tunelab.model.adapters import METHODS, apply_method, load_adapter_weights, save_final
from tunelab.model.dropout import share_lora_dropout
from tunelab.model.load import (
    Preloaded,
    describe_model,
    load_model,
    load_tokenizer,
    resolve_device,
    with_pad_token,
)
from tunelab.model.swiglu import fuse_gated_activations
from tunelab.objectives import OBJECTIVES
from tunelab.peak_memory import peak_rss_bytes
from tunelab.progress import training_line
from tunelab.run.directory import RunDir, create_run, write_json
from tunelab.run.load import starting_point
from tunelab.run.manifest import Manifest
from tunelab.run.metrics import MetricsLog
from tunelab.run.supplied import Supplied
from tunelab.train import distributed, preference, rl
from tunelab.train.checkpoint import (
    disk_full,
    list_checkpoints,
    resume_latest,
    rng_states,
    save_checkpoint,
    write_failed,
)
from tunelab.train.optim import Optimization, build_optimization
from tunelab.train.state import TrainResult, TrainState
from tunelab.train.step import autocast, forward_backward, update


@dataclass
class Prepared:
    """Tokenized data and the model, ready to train."""

    train: list[TokenizedExample]
    validation: list[TokenizedExample]
    validation_examples: list[Example]
    tokenizer: object
    model: torch.nn.Module
    device: torch.device
    data_report: dict
    # Multitask (data.tasks): the task of each train / validation example; empty otherwise.
    train_tasks: list[str] = field(default_factory=list)
    validation_tasks: list[str] = field(default_factory=list)


def prepare(config: Config, console: Console, preloaded: Preloaded | None = None) -> Prepared:
    """Read, normalise and tokenize the data; load the model (or take the caller's
    ``preloaded`` one) and attach the adapter."""
    train_cfg, objective = config.train, OBJECTIVES[config.method.objective]
    tokenizer = with_pad_token(preloaded.tokenizer, "the tokenizer given") if preloaded else \
        load_tokenizer(config.model.path, config.model.gguf_file)
    if objective.preference:  # pairs (or KTO's labelled answers) instead of examples
        data = prepare_preference_data(config.data, tokenizer, max_seq_len=train_cfg.max_seq_len,
                                       seed=train_cfg.seed, objective=objective)
    else:
        data = prepare_data(config.data, tokenizer, max_seq_len=train_cfg.max_seq_len,
                            seed=train_cfg.seed)
    if data.skipped:
        console.print(f"[yellow]warning:[/] {len(data.skipped)} training examples have no target "
                      f"tokens left (e.g. {data.skipped[0].source}:{data.skipped[0].line}: empty "
                      "target or cut by max_seq_len); they are skipped.")
    device = preloaded.device if preloaded else resolve_device(config.model.device)
    start = starting_point(config)
    model = preloaded.model if preloaded else load_model(
        start.model_path, dtype=config.model.dtype, device=str(device),
        gguf_file=start.gguf_file, attn_implementation=config.model.attn_implementation,
        load_in_4bit=METHODS[config.method.kind].load_in_4bit)
    model.config.use_cache = False
    if train_cfg.packing:
        varlen.enable(model)
    method = config.method
    # Preference and reinforcement objectives compare the policy's log-probabilities with the
    # reference's and the sampler's: dropout would make every one of them a different model.
    dropout = method.dropout if objective.name == "sft" else 0.0
    model = apply_method(model, kind=method.kind, r=method.r, alpha=method.alpha,
                         dropout=dropout, targets=method.targets, rslora=method.rslora)
    if start.adapter is not None:
        load_adapter_weights(model, start.adapter, where="train.init_from")
    if method.shared_dropout:
        share_lora_dropout(model)  # one dropped copy and a bool mask per input, not per projection
    if train_cfg.fused_swiglu:
        fuse_gated_activations(model)  # the MLP keeps gate and up, recomputes silu(gate)
    if train_cfg.checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if hasattr(model, "enable_input_require_grads"):
            model.enable_input_require_grads()
    return Prepared(data.train, data.validation, data.validation_examples, tokenizer, model,
                    device, data.report, getattr(data, "train_tasks", []),
                    getattr(data, "validation_tasks", []))


@dataclass(frozen=True)
class Batching:
    """How validation batches are formed and where they are scored."""

    batch_tokens: int
    packing: bool
    pad_id: int
    device: torch.device
    cluster: distributed.Cluster


@torch.no_grad()
def validation_loss(step_model, examples: list[TokenizedExample],
                    batching: Batching) -> float | None:
    """Mean loss per target token over the validation examples (dropout off).

    Under torchrun each rank scores its share of the batches; the sums are added up.
    """
    if not examples:
        return None
    total, count = _validation_sums(step_model, examples, batching)
    return total / max(1, count)


def validation_losses(step_model, examples: list[TokenizedExample], tasks: list[str],
                      batching: Batching) -> tuple[float | None, dict]:
    """(the validation loss, ``{"val_loss_tasks": {task: loss}}`` for a multitask run, else {}).

    One pass either way: each task's examples are scored once, and the overall loss is the
    tasks' summed losses over their summed target tokens (the token-weighted mean of theirs).
    """
    if not tasks:
        return validation_loss(step_model, examples, batching), {}
    sums = {}  # task → (summed loss, target tokens)
    for name in dict.fromkeys(tasks):
        own = [example for example, task in zip(examples, tasks, strict=True) if task == name]
        sums[name] = _validation_sums(step_model, own, batching)
    loss_sum = sum(loss for loss, _ in sums.values())
    target_tokens = sum(tokens for _, tokens in sums.values())
    per_task = {name: loss / max(1, tokens) for name, (loss, tokens) in sums.items()}
    return loss_sum / max(1, target_tokens), {"val_loss_tasks": per_task}


@torch.no_grad()
def _validation_sums(step_model, examples: list[TokenizedExample],
                     batching: Batching) -> tuple[float, float]:
    """(summed loss, target tokens) over ``examples``, all ranks added up (dropout off)."""
    was_training = step_model.training
    step_model.eval()
    total, count = 0.0, 0
    cluster, packing = batching.cluster, batching.packing
    share = distributed.rank_batches(plan_batches([len(ex.input_ids) for ex in examples],
                                                  batch_tokens=batching.batch_tokens,
                                                  packing=packing), cluster)
    for batch in distributed.collate_share(examples, share, packing=packing,
                                           pad_id=batching.pad_id):
        batch = batch.to(batching.device)
        with autocast(batching.device):
            total += float(step_model(batch))
        count += batch.n_target_tokens
    step_model.train(was_training)
    malloc.release_memory()
    return cluster.total(total), cluster.total(count)


def preference_validation(training: Training) -> tuple[float | None, dict]:
    """A preference objective's validation (``preference.validate_pairs``) over this rank's
    share of the held-out pairs."""
    prepared, train_cfg = training.prepared, training.config.train
    if not prepared.validation:
        return None, {}
    share = distributed.rank_batches(plan_batches([unit_length(u) for u in prepared.validation],
                                                  batch_tokens=train_cfg.batch_tokens,
                                                  packing=train_cfg.packing), training.cluster)
    result = preference.validate_pairs(training.step_model, training.collate("validation", share),
                                       cluster=training.cluster, device=prepared.device)
    malloc.release_memory()
    return result


@dataclass
class Training:
    """One rank's training, set up: what every step, validation and checkpoint of it reads."""

    config: Config
    prepared: Prepared
    cluster: distributed.Cluster
    # What a batch's loss is called on: the model, DDP- or FSDP-wrapped under torchrun.
    step_model: torch.nn.Module
    optimization: Optimization
    schedule: Schedule
    steps: list[list[list[int]]]  # each optimizer step's micro-batches: this rank's share
    console: Console
    # Preference objectives: KTO's mismatched sequences, and precomputed reference log-probs
    # (full fine-tuning, which has no adapter to switch off), per split.
    mismatched: dict[str, list] = field(default_factory=dict)
    references: dict[str, list] = field(default_factory=dict)
    # Reinforcement objectives: the prompts (with their records) and the rewards.
    reinforcement: rl.Reinforcement | None = None
    # What a Python caller handed in (tunelab.finetune): a loaded model, in-memory data.
    supplied: Supplied | None = None

    @property
    def objective(self):
        return OBJECTIVES[self.config.method.objective]

    def collate(self, split: str, micro_batches: list[list[int]]) -> list:
        """This rank's micro-batches of ``split`` (train or validation) as tensors."""
        prepared, train_cfg = self.prepared, self.config.train
        units = prepared.train if split == "train" else prepared.validation
        pad_id = prepared.tokenizer.pad_token_id or 0
        if not self.objective.preference:
            return distributed.collate_share(units, micro_batches, packing=train_cfg.packing,
                                             pad_id=pad_id)
        return preference.collate_pair_share(
            units, micro_batches, packing=train_cfg.packing, pad_id=pad_id,
            mismatched=self.mismatched.get(split), references=self.references.get(split),
            objective=self.objective)

    @property
    def total_steps(self) -> int:
        return self.schedule.total_steps

    def validate(self) -> tuple[float | None, dict]:
        """The validation loss, and (multitask) each task's to log next to it; a preference
        objective's validation statistics (``val_reward_accuracy``, ...) beside it."""
        train_cfg, prepared = self.config.train, self.prepared
        if self.objective.preference:
            return preference_validation(self)
        if self.reinforcement is not None:  # the references' loss, and the greedy answers' reward
            # the step module computes the policy gradient: the references' loss is the
            # plain model's (whole weights on every rank: reinforcement refuses FSDP)
            references = distributed.StepLoss(prepared.model, train_cfg.loss_chunk_tokens)
            loss, _ = validation_losses(references, prepared.validation, [], Batching(
                train_cfg.batch_tokens, train_cfg.packing, prepared.tokenizer.pad_token_id or 0,
                prepared.device, self.cluster))
            return loss, rl.validation_reward(prepared.model, prepared.tokenizer,
                                              self.reinforcement, self.config)
        batching = Batching(train_cfg.batch_tokens, train_cfg.packing,
                            prepared.tokenizer.pad_token_id or 0, prepared.device, self.cluster)
        return validation_losses(self.step_model, prepared.validation, prepared.validation_tasks,
                                 batching)

    def save(self, run: RunDir, state: TrainState, rng: dict | None = None) -> None:
        """A checkpoint of ``state`` (``rng``: the random states to resume with)."""
        save_checkpoint(run.checkpoints, model=self.prepared.model,
                        optimizer=self.optimization.optimizer,
                        scheduler=self.optimization.scheduler, state=state.to_dict(),
                        keep=self.config.train.keep_checkpoints, rng=rng)


def set_up(config: Config, cluster: distributed.Cluster, console: Console,
           supplied: Supplied | None = None) -> Training:
    """Data, model, schedule and optimizer: everything before the run directory exists."""
    prepared = prepare(config, console, supplied.preloaded if supplied else None)
    train_cfg, objective = config.train, OBJECTIVES[config.method.objective]
    mismatched, references, step_loss = {}, {}, None
    if objective.preference:
        if objective.data == "unpaired":
            mismatched = {split: preference.mismatched_sequences(pairs) for split, pairs in
                          (("train", prepared.train), ("validation", prepared.validation))
                          if pairs}
        if objective.reference and not METHODS[config.method.kind].adapter:
            # Before any weight changes (or a checkpoint is resumed): the starting model's.
            references = _reference_logps(config, prepared, mismatched)
        step_loss = preference.PreferenceLoss(prepared.model, preference.settings_of(
            config.method), chunk_tokens=train_cfg.loss_chunk_tokens)
    reinforcement = None
    if objective.rollouts:
        if cluster.strategy == "fsdp":
            raise ConfigError("reinforcement samples its answers from whole weights on each "
                              "rank, which FSDP shards", where="train.distributed",
                              fix="use train.distributed: ddp (adapters), or one process")
        reinforcement = rl.set_up_reinforcement(config, prepared.tokenizer)
        step_loss = rl.PolicyGradientLoss(prepared.model, temperature=config.rl.temperature,
                                          kl_weight=config.rl.kl_weight,
                                          chunk_tokens=train_cfg.loss_chunk_tokens)
    # Before the optimizer is built: FSDP replaces the weights by their shards.
    step_model = distributed.wrap(prepared.model, cluster,
                                  chunk_tokens=train_cfg.loss_chunk_tokens, step_loss=step_loss)
    if reinforcement is None:
        lengths = [unit_length(unit) for unit in prepared.train]
        for index, extra in enumerate(mismatched.get("train", [])):  # KTO's KL sequences
            lengths[index] += len(extra.input_ids)
        schedule = run_schedule(config, lengths, prepared.train_tasks)
        steps = distributed.rank_steps(schedule.micro_batches, lengths, cluster,
                                       grad_accum=train_cfg.grad_accum,
                                       batch_tokens=train_cfg.batch_tokens,
                                       packing=train_cfg.packing)
    else:
        schedule, steps = _prompt_schedule(config, len(reinforcement.prompts), cluster)
    optimization = build_optimization(prepared.model, train_cfg,
                                      total_steps=schedule.total_steps)
    return Training(config, prepared, cluster, step_model, optimization, schedule, steps,
                    console, mismatched, references, reinforcement, supplied)


def _prompt_schedule(config: Config, n_prompts: int, cluster: distributed.Cluster
                     ) -> tuple[Schedule, list[list[list[int]]]]:
    """A reinforcement run's schedule: ``rl.prompts_per_step`` prompts per step (a prompt
    counts as one token of a batch), shuffled per epoch with the run's seed."""
    train_cfg, ones = config.train, [1] * n_prompts
    batches = schedule_micro_batches(ones, batch_tokens=config.rl.prompts_per_step,
                                     packing=True, seed=train_cfg.seed, epochs=train_cfg.epochs,
                                     max_steps=train_cfg.max_steps, grad_accum=1)
    schedule = Schedule(batches, 1)
    return schedule, distributed.rank_steps(batches, ones, cluster, grad_accum=1,
                                            batch_tokens=config.rl.prompts_per_step,
                                            packing=True)


def unit_length(unit) -> int:
    """Tokens of one training unit: an example, or a preference pair's two answers."""
    return unit.length if hasattr(unit, "length") else len(unit.input_ids)


def _reference_logps(config: Config, prepared: Prepared, mismatched: dict) -> dict:
    """Each split's reference log-probs from the model before training (full fine-tuning)."""
    train_cfg = config.train
    return {split: preference.reference_logps(
        prepared.model, pairs, mismatched.get(split), packing=train_cfg.packing,
        pad_id=prepared.tokenizer.pad_token_id or 0, batch_tokens=train_cfg.batch_tokens,
        chunk_tokens=train_cfg.loss_chunk_tokens, device=prepared.device)
        for split, pairs in (("train", prepared.train), ("validation", prepared.validation))}


def train(config: Config, *, resume: str | Path | None = None, overwrite: bool = False,
          stop_after_steps: int | None = None, console: Console | None = None,
          supplied: Supplied | None = None) -> TrainResult:
    """Fine-tune as ``config`` says and write the run directory; resume one exactly.

    ``stop_after_steps`` stops (with a checkpoint) after that many optimizer steps in this call,
    as an interruption would; ``tunelab train --resume`` then finishes the run. ``supplied``:
    a model loaded and data held by a Python caller (``run/supplied.py``).
    """
    # Under torchrun: join the other ranks; logs and the progress bar come from rank 0 only.
    cluster = distributed.start(
        strategy=distributed.strategy_for(config.method.kind, config.train.distributed),
        device=config.model.device, timeout_s=config.train.distributed_timeout_s)
    # A rank that stops making progress ends the run with an error that names it.
    with distributed.hang_report(cluster, Path(resume) if resume else config.run_dir):
        return _train(config, cluster, resume=resume, overwrite=overwrite,
                      stop_after_steps=stop_after_steps, console=console, supplied=supplied)


def _train(config: Config, cluster: distributed.Cluster, *, resume: str | Path | None,
           overwrite: bool, stop_after_steps: int | None,
           console: Console | None, supplied: Supplied | None = None) -> TrainResult:
    """One rank's part of the run, from the data to the final adapter or model."""
    started = time.perf_counter()
    console = (console or Console()) if cluster.is_main else Console(quiet=True)
    _seed_everything(config.train.seed)
    # Before the model is loaded: under tuned glibc its activations are then mmap-ed.
    allocator = malloc.for_training(config.train.allocator, config.train.memory)
    training = set_up(config, cluster, console, supplied)
    preflight = _preflight(training) if not resume else None  # before any run directory
    run, state, starting = _open_run(training, resume=resume, overwrite=overwrite)
    if preflight and cluster.is_main:
        write_json(run.preflight_file, preflight)
    metrics = MetricsLog(run) if cluster.is_main else distributed.Unlogged()
    if resume:  # forget what was logged after the checkpoint (all of it: none was loaded)
        metrics.truncate_after(-1 if starting else state.step)
    state.plan = state.plan or _predicted(training, allocator["name"])
    print_start(console, "train", training.prepared.model, training.prepared.device,
                config.model.device, training=True, plan=state.plan)
    manifest = _start_manifest(training, state, allocator)
    with _removed_on_failure(run, resumed=bool(resume)):
        if cluster.is_main:
            run.write_manifest(manifest)
        if starting:
            _measure_before(training, state, metrics)
        state = _run_steps(training, state, metrics, run, stop_after_steps)
    if state.step < training.total_steps:
        if cluster.is_main:
            metrics.close(finished=False)
        console.print(f"Stopped at step {state.step} of {training.total_steps}; finish with "
                      f"[bold]tunelab train --resume {run}[/]")
        return _result(run.path, state, None, time.perf_counter() - started)
    result = _finish(training, state, metrics, run, started)
    if cluster.is_main:
        run.write_manifest(manifest.finish(
            val_loss_before=result.val_loss_before, val_loss_after=result.val_loss_after,
            tokens_per_second=result.tokens_per_second,
            final_train_loss=result.final_train_loss, steps=state.step, wall_s=result.wall_s,
            train_s=state.train_s, train_tokens=state.train_tokens,
            measured_peak_rss_bytes=peak_rss_bytes()))
        metrics.close(finished=True)  # the trackers get the adapter and config
    cluster.barrier()  # the run directory is complete before any rank returns
    _print_summary(result, console)
    return result


def _preflight(training: Training) -> dict | None:
    """Reinforcement: the starting model's pass rates on training prompts, before any compute
    is spent; a run whose groups would nearly all tie stops here (``rl.run_preflight``)."""
    if training.reinforcement is None or not training.config.rl.preflight_prompts:
        return None
    prepared = training.prepared
    report = rl.run_preflight(prepared.model, prepared.tokenizer, training.reinforcement,
                              training.config, prepared.device)
    training.console.print(rl.describe_preflight(report))
    return report


def _open_run(training: Training, *, resume: str | Path | None,
              overwrite: bool) -> tuple[RunDir, TrainState, bool]:
    """The run directory and the state to start from: a new run, or the resumed run's newest
    intact checkpoint. True when nothing was loaded: the model is measured before training."""
    if resume:
        run = RunDir(resume)
        resumed = _resume(run, training)
        return run, resumed or TrainState(), resumed is None
    config = training.config
    run = training.cluster.run_on_main(lambda: create_run(config, overwrite=overwrite))
    if training.supplied is not None:  # in-memory data moves into the run it was staged for
        training.config = training.supplied.settle(run, config)
    return run, TrainState(), True


def _start_manifest(training: Training, state: TrainState, allocator: dict) -> Manifest:
    """The manifest of a started run: versions, seed, data hashes, device, the plan."""
    config, prepared, schedule = training.config, training.prepared, training.schedule
    return Manifest.start(
        config, device=str(prepared.device), model=describe_model(prepared.model),
        data_report=prepared.data_report, total_steps=training.total_steps,
        warmup_steps=training.optimization.warmup_steps, plan=state.plan, allocator=allocator,
        # the configured token shares, to check metrics' task_tokens by
        mixture={"mixing": config.data.mixing, "rates": schedule.rates}
        if schedule.rates else None,
        supplied=training.supplied.manifest_entry() if training.supplied else None)


@contextmanager
def _removed_on_failure(run: RunDir, *, resumed: bool) -> Iterator[None]:
    """A new run that fails before its first checkpoint is removed again (nothing to resume);
    a full disk becomes an error that says what was kept."""
    try:
        yield
    except BaseException as error:
        if not resumed and not list_checkpoints(run.checkpoints):
            shutil.rmtree(run.path, ignore_errors=True)  # leave no husk
        if disk_full(error):  # metrics, manifest, a checkpoint
            raise write_failed(disk_full(error), run_dir=run.path) from None
        raise


def _measure_before(training: Training, state: TrainState, metrics) -> None:
    """The validation loss and sample outputs of the model before its first step."""
    state.samples_before = _generate(training, _sample_prompts(training))
    state.val_loss_before, per_task = training.validate()
    metrics.write(step=0, val_loss=state.val_loss_before, **per_task)
    training.console.print(f"Validation loss before training: {_fmt(state.val_loss_before)}")


def _finish(training: Training, state: TrainState, metrics, run: RunDir,
            started: float) -> TrainResult:
    """The last validation, the final adapter or model saved, the samples after training."""
    val_after, per_task = training.validate()
    per_task.update(_kl_to_reference(training))
    metrics.write(step=state.step, val_loss=val_after, **per_task)
    model, cluster = training.prepared.model, training.cluster
    weights = distributed.full_state(model, cluster)  # FSDP: gathered on rank 0, every rank helps
    if cluster.is_main:
        save_final(model, training.prepared.tokenizer,
                   run.final_folder(training.config.method.kind), state_dict=weights)
    prompts = _sample_prompts(training)
    after = _generate(training, prompts)
    samples = [{"prompt": p.text, "target": p.target, "before": b, "after": a} for p, b, a in
               zip(prompts, state.samples_before, after, strict=True)]
    return _result(run.path, state, val_after, time.perf_counter() - started, samples)


def _kl_to_reference(training: Training) -> dict:
    """A preference run's KL from its reference on the validation prompts, after training
    (``{"val_kl": ..., "val_kl_ci": [lo, hi]}``); only where the reference is the adapter
    switched off, and on the main process (FSDP: no rank holds whole weights)."""
    config, prepared = training.config, training.prepared
    if not (training.objective.preference and training.objective.reference
            and METHODS[config.method.kind].adapter and training.cluster.world_size == 1):
        return {}
    prompts = eval_prompts(prepared.validation_examples[:64], prepared.tokenizer,
                           chat_template=config.data.chat_template,
                           chat_template_kwargs=config.data.chat_template_kwargs,
                           max_seq_len=config.train.max_seq_len)
    if not prompts:
        return {}
    answer_tokens = max(len(pair.chosen.input_ids) - pair.chosen.n_prompt_tokens
                        for pair in prepared.validation) if prepared.validation else 16
    kl = preference.kl_to_reference(prepared.model, prepared.tokenizer,
                                    [list(p.ids) for p in prompts],
                                    max_new_tokens=max(4, answer_tokens),
                                    seed=config.train.seed)
    malloc.release_memory()
    return {"val_kl": round(kl["value"], 6), "val_kl_ci": [round(x, 6) for x in kl["ci"]]}


def _resume(run: RunDir, training: Training) -> TrainState | None:
    """Load the run's newest intact checkpoint, saying which newer ones are damaged; None when
    the run stopped before its first checkpoint (it then starts again from step 0)."""
    from rich.markup import escape

    console = training.console
    resumed = resume_latest(run.checkpoints, model=training.prepared.model,
                            optimizer=training.optimization.optimizer,
                            scheduler=training.optimization.scheduler)
    for folder, problem in resumed.damaged:
        console.print(f"[yellow]warning:[/] checkpoint {escape(str(folder))} is damaged "
                      f"({escape(problem)}); renamed damaged-{folder.name}, resuming from the "
                      "checkpoint before it.")
    if resumed.folder is not None:
        console.print(f"Resuming {run} from {resumed.folder.name} "
                      f"(step {resumed.state['step']} of {training.total_steps}).")
        return TrainState.from_dict(resumed.state, where=str(resumed.folder))
    if resumed.damaged or run.finished():
        problem = "every checkpoint is damaged" if resumed.damaged else "the run has finished"
        raise RunError(f"{run} has no complete checkpoint to resume from: {problem}",
                       where=str(run), fix="start the run again with tunelab train "
                       "CONFIG --overwrite")
    console.print(f"{run} stopped before its first checkpoint: starting it again from "
                  "step 0.")
    return None


class _UpdateInterrupted(KeyboardInterrupt):
    """Ctrl-C inside an optimizer update, where it could not be deferred (no pthread_sigmask):
    the weights may be half-updated, so no checkpoint is written of them."""


def _run_steps(training: Training, state: TrainState, metrics, run: RunDir,
               stop_after_steps: int | None) -> TrainState:
    """The optimizer steps from ``state.step`` to the end (or to ``stop_after_steps``).

    Ctrl-C between steps saves a checkpoint of the last finished step, so no work is lost.
    """
    train_cfg, total = training.config.train, training.total_steps
    steps_this_call, saved_step, rng_at_step_start = 0, state.step, rng_states()
    started = time.perf_counter()
    training.step_model.train()
    progress = _progress_bar(training.console)
    try:
        with progress:
            bar = progress.add_task("train", total=total, completed=state.step, status="")
            while state.step < total and (stop_after_steps is None
                                          or steps_this_call < stop_after_steps):
                rng_at_step_start = rng_states()
                status = _step(training, state, metrics)
                steps_this_call += 1
                progress.update(bar, completed=state.step, status=status)
                if not training.console.is_terminal and (state.step % max(1, total // 10) == 0
                                                         or state.step == total):
                    training.console.print(training_line(
                        state.step, total, status, elapsed_s=time.perf_counter() - started,
                        steps_done=steps_this_call), highlight=False)
                at_save = train_cfg.save_every and state.step % train_cfg.save_every == 0
                stopping = stop_after_steps is not None and steps_this_call >= stop_after_steps
                if (at_save or stopping) and state.step < total:
                    training.save(run, state)
                    saved_step = state.step
    except KeyboardInterrupt as interruption:
        # Under torchrun the ranks stop at different points: no common checkpoint to write.
        if state.step > saved_step and not isinstance(interruption, _UpdateInterrupted) \
                and training.cluster.world_size == 1:
            training.optimization.optimizer.zero_grad(set_to_none=True)
            # The interrupted step's dropout draws never happened, as far as resuming goes.
            training.save(run, state, rng=rng_at_step_start)
            training.console.print(f"Interrupted: saved checkpoint step-{state.step}; continue "
                                   f"with [bold]tunelab train --resume {run}[/]")
        raise
    return state


def _step(training: Training, state: TrainState, metrics) -> str:
    """Optimizer step ``state.step + 1``: gradients, update, bookkeeping, its log lines and
    validation when due; returns the progress bar's status."""
    train_cfg, prepared = training.config.train, training.prepared
    started = time.perf_counter()
    group = training.steps[state.step]
    extra = {}
    if training.reinforcement is not None:  # sample, score, then the policy-gradient step
        losses, extra = _reinforcement_gradients(training, group, step=state.step + 1)
    else:
        batches = training.collate("train", group)
        losses = forward_backward(
            training.step_model, batches, device=prepared.device, cluster=training.cluster,
            max_grad_norm=train_cfg.max_grad_norm, step=state.step + 1,
            sources=lambda: [f"{prepared.train[i].source}:{prepared.train[i].line}"
                             for indices in group for i in indices])
    lr = training.optimization.scheduler.get_last_lr()[0]
    # A Ctrl-C during the update is held back until the step is recorded, so the checkpoint
    # the interruption writes is never of half-updated weights.
    with _sigint_deferred():
        try:
            update(training.optimization)
        except KeyboardInterrupt:
            raise _UpdateInterrupted from None
        step_s = time.perf_counter() - started
        state.record_step(tokens=losses.tokens, step_s=step_s, loss=losses.loss,
                          micro_batches=train_cfg.grad_accum)
    if state.step % train_cfg.log_every == 0 or state.step == training.total_steps:
        metrics.write(step=state.step, loss=losses.loss, lr=lr, grad_norm=losses.grad_norm,
                      tokens=losses.tokens, target_tokens=losses.target_tokens,
                      tokens_per_second=round(state.tokens_per_second, 1),
                      step_s=round(step_s, 4), **_task_tokens(group, training),
                      **(extra or {name: round(value, 6) for name, value in
                                   losses.stats.items()}))
    status = (f"loss {losses.loss:.4f}  lr {lr:.2e}  grad norm {losses.grad_norm:.3g}  "
              f"{state.tokens_per_second:,.0f} tok/s")
    if train_cfg.eval_every and state.step % train_cfg.eval_every == 0 \
            and state.step < training.total_steps:
        val, per_task = training.validate()
        metrics.write(step=state.step, val_loss=val, **per_task)
        status += f"  val {_fmt(val)}"
    return status


def _reinforcement_gradients(training: Training, group: list[list[int]], *, step: int):
    """A reinforcement step's gradients: its prompts' answers sampled with the weights as they
    are, scored, and trained on; (the step's losses, what it logs besides)."""
    prepared, config = training.prepared, training.config
    indices = [i for micro_batch in group for i in micro_batch]
    rollouts, scores, totals, advantage, rollout_s = rl.sample_step(
        prepared.model, prepared.tokenizer, training.reinforcement, indices, config, step=step,
        device=prepared.device)
    batches = rl.answer_batches(rollouts, advantage, config,
                                pad_id=prepared.tokenizer.pad_token_id or 0)
    prompts = training.reinforcement.prompts
    losses = forward_backward(
        training.step_model, batches, device=prepared.device, cluster=training.cluster,
        max_grad_norm=config.train.max_grad_norm, step=step,
        sources=lambda: [prompts[i].where for i in indices])
    n_units = training.cluster.total(sum(batch.loss_units for batch in batches))
    extra = rl.step_metrics(rollouts, scores, totals, rollout_s, losses.stats, n_units)
    rl.check_on_policy(extra["logprob_gap"], step=step, config=config)
    return losses, extra


def _progress_bar(console: Console) -> Progress:
    return Progress(TextColumn("[bold]train"), BarColumn(),
                    TextColumn("step {task.completed}/{task.total}"),
                    TextColumn("{task.fields[status]}"), TimeRemainingColumn(),
                    console=console, transient=False, disable=not console.is_terminal)


def _task_tokens(group: list[list[int]], training: Training) -> dict:
    """Multitask: ``{"task_tokens": {task: tokens}}`` drawn in this step (all ranks); else {}."""
    prepared = training.prepared
    if not prepared.train_tasks:
        return {}
    lengths = [len(ex.input_ids) for ex in prepared.train]
    counts = task_token_counts(group, lengths, prepared.train_tasks)
    return {"task_tokens": {name: int(training.cluster.total(count))
                            for name, count in counts.items()}}


def _sample_prompts(training: Training) -> list[EvalPrompt]:
    """Validation prompts as evaluation renders them (the renderer training used)."""
    if training.cluster.strategy == "fsdp":  # no rank holds whole weights to generate with
        return []
    config, prepared = training.config, training.prepared
    examples = prepared.validation_examples[: config.train.samples]
    return eval_prompts(examples, prepared.tokenizer, chat_template=config.data.chat_template,
                        chat_template_kwargs=config.data.chat_template_kwargs,
                        max_seq_len=config.train.max_seq_len)


def _generate(training: Training, prompts: list[EvalPrompt]) -> list[str]:
    if not prompts:
        return []
    texts = generate_texts(training.prepared.model, training.prepared.tokenizer,
                           [prompt.ids for prompt in prompts],
                           max_new_tokens=training.config.train.max_new_tokens)
    malloc.release_memory()  # the KV caches and logits of generation
    return texts


def _predicted(training: Training, allocator: str) -> dict:
    """The planner's prediction for this run, kept in the manifest to track its error.

    The planner gets the run's own token counts (the data is read and tokenized once) and the
    allocator the run got.
    """
    from tunelab.planner.predict import plan_counts
    from tunelab.planner.workload import TokenCounts

    prepared = training.prepared
    train, validation = prepared.train, prepared.validation
    if training.objective.preference:  # the pairs' answers, as the sequences trained on
        train, validation = (preference.pair_sequences(units) for units in (train, validation))
    counts = TokenCounts.from_tokenized(train, validation, prepared.train_tasks)
    try:
        with torch.random.fork_rng(devices=[]):  # its matmul benchmark must not move the seed
            predicted = plan_counts(training.config, counts, allocator=allocator)
    except Exception as error:  # the planner must never stop a run it only describes
        training.console.print(f"[yellow]warning:[/] no cost prediction for the manifest: "
                               f"{error}")
        return {"error": str(error)}
    return {"predicted_peak_bytes": predicted.predicted_peak_bytes,
            "predicted_tokens_per_second": predicted.predicted_tokens_per_second,
            "predicted_wall_s": predicted.predicted_wall_s}


@contextmanager
def _sigint_deferred():
    """Block SIGINT inside the block; a Ctrl-C pressed meanwhile is delivered when it ends."""
    if not hasattr(signal, "pthread_sigmask") or threading.current_thread() is not \
            threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _result(run_dir: Path, state: TrainState, val_after: float | None, wall_s: float,
            samples: list[dict] | None = None) -> TrainResult:
    return TrainResult(run_dir=run_dir, steps=state.step, final_train_loss=state.last_loss,
                       val_loss_before=state.val_loss_before, val_loss_after=val_after,
                       tokens_per_second=state.tokens_per_second, wall_s=wall_s,
                       samples=samples or [])


def _fmt(value: float | None) -> str:
    return "n/a (no validation data)" if value is None else f"{value:.4f}"


def _print_summary(result: TrainResult, console: Console) -> None:
    console.print(f"Validation loss: before {_fmt(result.val_loss_before)} → after "
                  f"{_fmt(result.val_loss_after)}   ({result.steps} steps, "
                  f"{result.tokens_per_second:,.0f} tokens/s, {result.wall_s:.0f} s)")
    if result.samples:
        table = Table(title="Validation samples (greedy)", show_lines=True)
        for column in ("prompt", "expected", "base", "tuned"):
            table.add_column(column, overflow="fold")
        for sample in result.samples:
            table.add_row(sample["prompt"][-200:], sample["target"].strip(),
                          sample["before"].strip(), sample["after"].strip())
        console.print(table)
    console.print(f"Run directory: [bold]{result.run_dir}[/]")
