"""Training under torchrun: two CPU ranks on gloo equal one process; checkpoints move between
rank counts; a killed or hung rank ends the run.

Every multi-rank test starts real ``torchrun`` processes (``OMP_NUM_THREADS=1``, each with a
timeout) on the tiny model. Tolerances: the ranks add the same numbers in another order, so
losses agree to a relative 1e-5 and weights after a few AdamW steps to 1e-4 of their scale.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import make_config, write_config
from rich.console import Console
from safetensors.torch import load_file

from tunelab.config import load_config
from tunelab.train import distributed
from tunelab.train.loop import train

LOSS_RTOL = 1e-5
WEIGHT_TOL = 1e-4  # of the largest absolute value of the tensor

# Runs train() with stop_after_steps, which the CLI does not expose (it is what an interruption
# does); torchrun starts it like any training script.
DRIVER = """
import sys
from tunelab.config import load_config
from tunelab.train.loop import train
config, resume, stop = sys.argv[1], sys.argv[2], int(sys.argv[3])
train(load_config(config), resume=resume or None, stop_after_steps=stop or None)
"""


def torchrun(args: list[str], *, nproc: int = 2, timeout_s: float = 300) -> str:
    """Run ``torchrun --nproc-per-node nproc ARGS``; return its output, fail on a non-zero exit."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(nproc), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def run_driver(tmp_path: Path, config: Path, *, resume: Path | None = None, stop: int = 0,
               nproc: int = 2) -> str:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    return torchrun([str(driver), str(config), str(resume or ""), str(stop)], nproc=nproc)


def losses(run: Path) -> dict[int, dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in records if "loss" in r}


def assert_same_weights(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        scale = float(a[name].abs().max())
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=WEIGHT_TOL * max(scale, 1e-3),
                                   msg=name)


def full_weights(run: Path) -> dict:
    return load_file(next((run / "model").glob("*.safetensors")))


# --- how a step is shared (no processes) --------------------------------------------------


def test_each_step_is_dealt_to_the_ranks_whole_balanced_and_in_step():
    lengths = [50, 7, 30, 30, 12, 64, 3, 40, 22, 9]
    shares = distributed.split_step(list(range(10)), lengths, 3, batch_tokens=64, packing=True)
    dealt = sorted(i for share in shares for batch in share for i in batch)
    assert dealt == list(range(10))  # every example once
    tokens = [sum(lengths[i] for batch in share for i in batch) for share in shares]
    assert max(tokens) - min(tokens) <= max(lengths)
    assert len({len(share) for share in shares}) == 1  # same number of forward passes
    assert all(sum(lengths[i] for i in batch) <= 64 for share in shares for batch in share)


def test_a_rank_without_examples_gets_a_padding_batch_that_counts_nothing():
    from tunelab.data.tokenize import TokenizedExample

    shares = distributed.split_step([0], [10, 20], 2, batch_tokens=64, packing=True)
    assert shares == [[[0]], [[]]]
    example = TokenizedExample(input_ids=[5, 6, 7], labels=[-100, 6, 7], source="x", line=1)
    (padding,) = distributed.collate_share([example], [[]], packing=True, pad_id=0)
    assert padding.n_target_tokens == 0 and padding.n_tokens == 0
    assert padding.input_ids.numel() == 3  # a real forward pass, so collectives stay in step


def test_default_strategy_is_ddp_for_adapters_and_fsdp_for_full_weights():
    assert distributed.strategy_for("lora", "auto") == "ddp"
    assert distributed.strategy_for("dora", "auto") == "ddp"
    assert distributed.strategy_for("full", "auto") == "fsdp"
    assert distributed.strategy_for("full", "ddp") == "ddp"


def test_one_process_is_not_distributed():
    assert distributed.world_size_from_env() == 1
    cluster = distributed.start(strategy="ddp", device="cpu", timeout_s=10)
    assert cluster.world_size == 1 and cluster.is_main and cluster.total(3.5) == 3.5


def test_planner_divides_sharded_state_under_fsdp_and_adds_buckets_under_ddp():
    from tunelab.planner.memory import per_rank_memory

    one = {"framework": 100, "weights": 800, "adapter": 0, "gradients": 800, "optimizer": 1600,
           "activations": 50}
    ddp = per_rank_memory(one, nproc=4, strategy="ddp", full=True, block_bytes=90,
                          root_bytes=80)
    fsdp = per_rank_memory(one, nproc=4, strategy="fsdp", full=True, block_bytes=90,
                           root_bytes=80)
    assert ddp["predicted_peak_bytes"] == sum(one.values()) + 800
    assert fsdp["breakdown_bytes"]["optimizer"] == 400
    assert fsdp["predicted_peak_bytes"] == 100 + 200 + 200 + 400 + 50 + (80 + 3 * 90)


# --- two ranks ----------------------------------------------------------------------------


@pytest.mark.parametrize("strategy", ["ddp", pytest.param("fsdp", marks=pytest.mark.slow)])
def test_two_rank_lora_equals_one_process(tmp_path, tiny_model_dir, strategy):
    """The default suite's torchrun test: 2 ranks × DDP, gradient accumulation, validation.
    FSDP with an adapter: the frozen output layer's loss gradient, computed in the forward pass
    (train/loss.py), runs inside the sharded root."""
    settings = dict(max_steps=3, grad_accum=2, batch_tokens=64, samples=0, eval_every=2,
                    distributed=strategy,
                    method={"kind": "lora", "r": 4, "alpha": 8, "dropout": 0.0})
    single = train(make_config(tmp_path / "one", tiny_model_dir, **settings),
                   console=Console(quiet=True))
    config = write_config(tmp_path / "two", tiny_model_dir, **settings)
    output = torchrun(["-m", "tunelab", "train", str(config)])
    run = tmp_path / "two" / "runs" / "reviews"

    one, two = losses(single.run_dir), losses(run)
    assert sorted(two) == [1, 2, 3]  # one record per step: only rank 0 writes
    for step in one:
        assert two[step]["target_tokens"] == one[step]["target_tokens"]
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=LOSS_RTOL)
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=LOSS_RTOL)
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["val_loss_after"] == pytest.approx(single.val_loss_after, rel=LOSS_RTOL)
    assert output.count("Validation loss before training") == 1  # logs from rank 0 only
    assert_same_weights(load_file(single.run_dir / "adapter" / "adapter_model.safetensors"),
                        load_file(run / "adapter" / "adapter_model.safetensors"))


FULL = dict(max_steps=4, lr=1e-3, batch_tokens=64, samples=0, save_every=2,
            method={"kind": "full"})


@pytest.fixture(scope="module")
def fsdp_whole_run(tmp_path_factory, tiny_model_dir) -> Path:
    """Full fine-tuning, 2 ranks, FSDP2 (the default for full), 4 steps without interruption."""
    folder = tmp_path_factory.mktemp("fsdp-whole")
    torchrun(["-m", "tunelab", "train", str(write_config(folder, tiny_model_dir, **FULL))])
    return folder / "runs" / "reviews"


@pytest.mark.slow
def test_fsdp_full_fine_tuning_equals_unsharded(tmp_path, tiny_model_dir, fsdp_whole_run):
    single = train(make_config(tmp_path, tiny_model_dir, **FULL), console=Console(quiet=True))
    one, two = losses(single.run_dir), losses(fsdp_whole_run)
    for step in one:
        # Step 1's gradient norm is that of the same weights: sharded gradients equal unsharded.
        assert two[step]["grad_norm"] == pytest.approx(one[step]["grad_norm"], rel=LOSS_RTOL)
        assert two[step]["loss"] == pytest.approx(one[step]["loss"], rel=LOSS_RTOL)
    # Rank 0 gathered the shards into one ordinary model folder.
    assert_same_weights(full_weights(single.run_dir), full_weights(fsdp_whole_run))


@pytest.mark.slow
def test_fsdp_checkpoint_resumes_on_one_and_on_two_ranks(tmp_path, tiny_model_dir,
                                                         fsdp_whole_run):
    config = write_config(tmp_path / "stopped", tiny_model_dir, **FULL)
    run_driver(tmp_path, config, stop=2)
    stopped = tmp_path / "stopped" / "runs" / "reviews"
    checkpoint = stopped / "checkpoints" / "step-2"
    assert sorted(p.name for p in checkpoint.glob("*.distcp")) == ["__0_0.distcp",
                                                                    "__1_0.distcp"]
    assert not (stopped / "model").exists()

    # Every rank's shard survives: loaded on one process, every row of every weight moved.
    from tunelab.model.load import load_model
    from tunelab.train.checkpoint import load_checkpoint
    from tunelab.train.optim import build_optimizer, build_scheduler

    base = load_model(tiny_model_dir, device="cpu")
    model = load_model(tiny_model_dir, device="cpu")
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.0)
    scheduler = build_scheduler(optimizer, total_steps=4, warmup_steps=1, schedule="cosine")
    assert load_checkpoint(checkpoint, model=model, optimizer=optimizer,
                           scheduler=scheduler)["step"] == 2
    for (name, before), after in zip(base.named_parameters(), model.parameters(), strict=True):
        rows_moved = (before - after).abs().reshape(before.shape[0], -1).amax(dim=1) > 0
        assert rows_moved.all(), f"{name}: {int((~rows_moved).sum())} rows were not restored"

    on_two = tmp_path / "two"
    shutil.copytree(tmp_path / "stopped", on_two)
    on_two_run = on_two / "runs" / "reviews"
    run_driver(tmp_path, on_two / config.name, resume=on_two_run)
    train(load_config(config), resume=stopped, console=Console(quiet=True))  # on one rank
    for resumed in (stopped, on_two_run):
        assert sorted(losses(resumed)) == [1, 2, 3, 4]
        for step, record in losses(fsdp_whole_run).items():
            assert losses(resumed)[step]["loss"] == pytest.approx(record["loss"], rel=LOSS_RTOL)
        assert_same_weights(full_weights(fsdp_whole_run), full_weights(resumed))


def launch_until_first_checkpoint(config: Path, run: Path) -> subprocess.Popen:
    """`tunelab train CONFIG --nproc 2` started, returned once it has written a checkpoint
    (any step: with keep_checkpoints the first one may be gone again between two looks)."""
    launcher = subprocess.Popen([sys.executable, "-m", "tunelab", "train", str(config),
                                 "--nproc", "2"], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and launcher.poll() is None \
            and not any((run / "checkpoints").glob("step-*")):
        time.sleep(0.2)
    return launcher


@pytest.mark.slow
def test_a_killed_rank_fails_the_run_naming_the_rank_and_the_checkpoint(tmp_path,
                                                                         tiny_model_dir):
    config = write_config(tmp_path, tiny_model_dir, max_steps=500, save_every=2, samples=0,
                          distributed_timeout_s=30)
    run = tmp_path / "runs" / "reviews"
    launcher = launch_until_first_checkpoint(config, run)
    try:
        victim = rank_pid(launcher.pid, rank=1)
        os.kill(victim, signal.SIGKILL)
        # The bound: torchrun notices the dead rank and stops the other one; no hang.
        output = launcher.communicate(timeout=120)[0]
    finally:
        launcher.kill()
    assert launcher.returncode == 3, output[-3000:]
    message = " ".join(output.split())  # the CLI wraps its error paragraph
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in message, message[-2000:]
    assert f"the last checkpoint is {run / 'checkpoints' / 'step-'}" in message, message[-2000:]


@pytest.mark.slow
def test_a_hung_rank_fails_the_run_within_the_timeout_naming_it(tmp_path, tiny_model_dir):
    """A rank that is alive but makes no progress (stopped with SIGSTOP: it never reaches the
    next collective) is not a crash torchrun could see; the waiting rank names it."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=500, save_every=2, samples=0,
                          distributed_timeout_s=15)
    run = tmp_path / "runs" / "reviews"
    launcher = launch_until_first_checkpoint(config, run)
    try:
        os.kill(rank_pid(launcher.pid, rank=1), signal.SIGSTOP)
        # The bound: the timeout (15 s), the check-in grace (15 s), torchrun's 30 s between
        # SIGTERM and SIGKILL for the stopped rank, and a margin for a loaded machine.
        output = launcher.communicate(timeout=180)[0]
    finally:
        launcher.kill()
    assert launcher.returncode == 3, output[-3000:]
    message = " ".join(output.split())
    assert "ranks 1 stopped" not in message
    assert "rank 1 stopped making progress" in message, message[-2000:]
    assert "rank 0 waited train.distributed_timeout_s = 15 s" in message, message[-2000:]
    assert f"the last checkpoint is {run / 'checkpoints' / 'step-'}" in message, message[-2000:]
    assert f"tunelab train --resume {run} --nproc 2" in message, message[-2000:]


def test_the_launcher_puts_back_the_signal_handlers_torchrun_replaced(tmp_path,
                                                                      tiny_model_dir):
    """After ``tunelab train --nproc`` returns in-process, Ctrl-C interrupts as before."""
    config = write_config(tmp_path, tiny_model_dir, max_steps=1, samples=0)
    # Python's own Ctrl-C handler, whatever this suite was started with: a background job or
    # nohup starts it with SIGINT ignored, and then no Ctrl-C could raise
    started_with = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        before = {number: signal.getsignal(number) for number in distributed.TORCHRUN_SIGNALS}
        distributed.launch(1, [str(config)], run_dir=tmp_path / "runs" / "reviews")
        assert (tmp_path / "runs" / "reviews" / "adapter").is_dir()
        assert {number: signal.getsignal(number) for number in before} == before
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the handler raises at the next bytecode, long before this ends
    finally:
        signal.signal(signal.SIGINT, started_with)


def rank_pid(launcher_pid: int, *, rank: int) -> int:
    """The pid of the torchrun worker with ``RANK=rank`` among the launcher's descendants."""
    pending = [launcher_pid]
    while pending:
        pid = pending.pop()
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and pid != launcher_pid:
            return pid
        pending += [int(child) for child in children]
    pytest.fail(f"no process with RANK={rank} under {launcher_pid}")


def test_two_rank_dpo_equals_one_process(tmp_path, tiny_model_dir):
    """Preference pairs are dealt whole to the ranks; the reference (the adapter switched off)
    and the pair-mean loss and statistics add up across ranks to one process's."""
    import yaml
    from test_objectives_cli import write_pairs

    train_file, valid_file, _ = write_pairs(tmp_path)
    raw = {"name": "dpo", "model": {"path": tiny_model_dir},
           "method": {"kind": "lora", "r": 4, "alpha": 8, "objective": "dpo", "beta": 0.5},
           "data": {"train": train_file, "validation": valid_file},
           "train": {"max_steps": 3, "grad_accum": 2, "batch_tokens": 96, "lr": 0.01,
                     "samples": 0, "eval_every": 2}}
    configs = {}
    for name in ("one", "two"):
        (tmp_path / name).mkdir()
        configs[name] = tmp_path / name / "dpo.yaml"
        configs[name].write_text(yaml.safe_dump({**raw, "output_dir": str(tmp_path / name /
                                                                          "runs")}))
    single = train(load_config(configs["one"]), console=Console(quiet=True))
    torchrun(["-m", "tunelab", "train", str(configs["two"])])
    one, two = losses(single.run_dir), losses(tmp_path / "two" / "runs" / "dpo")
    for step in one:
        for key in ("loss", "margin", "chosen_logp", "rejected_logp", "reward_accuracy"):
            assert two[step][key] == pytest.approx(one[step][key], rel=LOSS_RTOL, abs=1e-6), key
    validations = lambda run: [json.loads(line) for line in  # noqa: E731
                               (run / "metrics.jsonl").read_text().splitlines()
                               if "val_reward_accuracy" in line]
    for a, b in zip(validations(single.run_dir), validations(tmp_path / "two" / "runs" / "dpo"),
                    strict=True):
        assert b["val_pairs"] == a["val_pairs"] == 12
        assert b["val_loss"] == pytest.approx(a["val_loss"], rel=LOSS_RTOL)
        assert b["val_reward_accuracy"] == pytest.approx(a["val_reward_accuracy"])
