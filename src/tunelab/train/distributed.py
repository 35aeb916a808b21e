"""torchrun set-up and teardown, the DDP / FSDP2 wrapping, and each rank's share of the data.

One process is the default and nothing here changes it: ``start`` returns a one-rank
``Cluster`` and every helper is then a pass-through. Under ``torchrun`` every rank runs the same
loop; the helpers below make the ranks together equal one process with the same global batch:

* each optimizer step's examples (the single-process plan, made once on rank 0) are dealt to
  the ranks, and the loss is divided by the step's *global* count of target tokens;
* DDP all-reduces the trainable parameters' gradients only; FSDP2 shards every decoder block
  and then the root, and the optimizer is built after sharding;
* every rank runs the same number of forward passes per step, because FSDP's all-gathers are
  collectives: a rank short of data runs a padding micro-batch whose loss is multiplied by 0.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from tunelab.data.packing import Batch, collate, plan_batches
from tunelab.data.tokenize import TokenizedExample
from tunelab.errors import ConfigError, TrainingError
from tunelab.model.adapters import METHODS
from tunelab.run.directory import RunDir
from tunelab.train.loss import batch_loss_sum


@dataclass(frozen=True)
class Cluster:
    """Where this process stands among the ranks of a run (one rank when not under torchrun)."""

    rank: int = 0
    world_size: int = 1
    strategy: str = "single"  # "single", "ddp" or "fsdp"
    device_type: str = "cpu"
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes logs, metrics, the manifest and the final adapter or model."""
        return self.rank == 0

    def total(self, value: float) -> float:
        """The sum of ``value`` over all ranks (in float64, so token counts stay exact)."""
        if self.world_size == 1:
            return value
        tensor = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(tensor)
        return float(tensor.item())

    def from_main(self, value):
        """Rank 0's ``value`` on every rank (any picklable object)."""
        if self.world_size == 1:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def run_on_main(self, function):
        """Call ``function`` on rank 0 only; every rank gets its result, or raises its error."""
        if self.world_size == 1:
            return function()
        outcome = None
        if self.is_main:
            try:
                outcome = (function(), None)
            except Exception as error:  # re-raised on every rank, so no rank waits forever
                outcome = (None, error)
        result, error = self.from_main(outcome)
        if error is not None:
            raise error
        return result

    def gathered(self, values: list) -> list:
        """Every rank's ``values``, concatenated in rank order (this rank's alone in one
        process)."""
        if self.world_size == 1:
            return list(values)
        parts = [None] * self.world_size
        dist.all_gather_object(parts, list(values))
        return [value for part in parts for value in part]

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) \
            if self.device_type == "cuda" else torch.device("cpu")


def strategy_for(method_kind: str, distributed: str) -> str:
    """``auto`` means DDP for adapters (small gradients, whole model on every rank) and FSDP2
    for full fine-tuning (weights, gradients and optimizer state sharded across the ranks)."""
    if METHODS[method_kind].load_in_4bit and distributed == "fsdp":
        raise ConfigError("train.distributed fsdp cannot shard QLoRA's 4-bit base weights",
                          where="train.distributed", fix="use ddp (the default for adapters)")
    if distributed != "auto":
        return distributed
    return "ddp" if METHODS[method_kind].adapter else "fsdp"


def world_size_from_env() -> int:
    """The number of ranks torchrun started (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def start(*, strategy: str, device: str, timeout_s: float) -> Cluster:
    """Join torchrun's process group (NCCL on GPUs, gloo on CPU); one process: nothing to do.

    ``timeout_s`` bounds every collective: a rank that hangs makes the others fail after it,
    and torchrun then stops the whole run. Each rank takes the GPU of its ``LOCAL_RANK``.
    """
    world_size = world_size_from_env()
    if world_size == 1:
        return Cluster()
    if strategy == "single":
        raise ConfigError(f"torchrun started {world_size} ranks but train.distributed is "
                          "'single'", where="train.distributed", fix="use auto, ddp or fsdp")
    cuda = device != "cpu" and torch.cuda.is_available()
    if not dist.is_initialized():
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cuda:nccl,cpu:gloo" if cuda else "gloo",
                                timeout=timedelta(seconds=timeout_s))
        atexit.register(_leave)
    return Cluster(rank=dist.get_rank(), world_size=world_size, strategy=strategy,
                   device_type="cuda" if cuda else "cpu", timeout_s=timeout_s)


#: The signals torchrun's agent handles (its default TORCHELASTIC_SIGNALS_TO_HANDLE).
TORCHRUN_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)


def launch(nproc: int, train_args: list[str], *, run_dir: Path) -> None:
    """``tunelab train ... --nproc N``: start N ranks of ``python -m tunelab train ...`` on this
    machine with torchrun (its own code, in this process) and wait for them.

    torchrun stops every rank as soon as one fails; the error then names the failed rank and
    the run's last complete checkpoint.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    if nproc < 1:
        raise ConfigError(f"--nproc {nproc}: needs at least 1 rank", where="--nproc")
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the cores (torchrun's default is one thread per rank).
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    args = get_args_parser().parse_args(
        ["--standalone", "--nproc-per-node", str(nproc), "-m", "tunelab", "train", *train_args])
    # torchrun installs its own handlers for these and leaves them behind when it returns.
    handlers = {number: signal.getsignal(number) for number in TORCHRUN_SIGNALS}
    try:
        run(args)
    except ChildFailedError as error:
        raise TrainingError(failure_message(error, run_dir), where=str(run_dir),
                            fix=_resume_hint(run_dir, nproc)) from None
    finally:
        for number, handler in handlers.items():
            if handler is not None:  # None: set outside Python, nothing to put back
                signal.signal(number, handler)


def failure_message(error, run_dir: Path) -> str:
    """Which rank failed and how, and the last checkpoint the run can resume from."""
    rank, failure = error.get_first_failure()
    if failure.exitcode < 0:
        how = f"was killed by {failure.signal_name()}"
    else:
        how = f"exited with code {failure.exitcode} (its own error is printed above)"
    return (f"rank {rank} (pid {failure.pid}) {how}; torchrun stopped the other ranks; "
            f"{_last_checkpoint(run_dir)}")


def _resume_hint(run_dir: Path, nproc: int) -> str:
    return f"see the failed rank's error above, then {_restart(run_dir, nproc)}"


def _restart(run_dir: Path, nproc: int) -> str:
    from tunelab.train.checkpoint import list_checkpoints

    if list_checkpoints(RunDir(run_dir).checkpoints):
        return f"tunelab train --resume {run_dir} --nproc {nproc}"
    return "start the run again with --overwrite"


#: The longest a rank that gave up waiting waits for the other ranks to say they gave up too:
#: healthy ranks blocked on the same collective time out within moments of each other.
HANG_GRACE_S = 30.0


@contextmanager
def hang_report(cluster: Cluster, run_dir: Path) -> Iterator[None]:
    """Turn a collective that timed out into an error naming the rank that stopped.

    gloo raises a bare ``RuntimeError("Timed out waiting ...")`` on the ranks that waited and
    does not say for whom; torchrun sees nothing wrong with a rank that is alive but stuck.
    So each rank that timed out checks in on torchrun's store, and the ranks that never check
    in are the ones that stopped making progress. (NCCL's watchdog aborts the process itself.)
    """
    if cluster.world_size == 1:
        yield
        return
    try:
        yield
    except RuntimeError as error:
        if "timed out" not in str(error).lower():
            raise
        stalled = silent_ranks(cluster, grace_s=min(cluster.timeout_s, HANG_GRACE_S))
        if stalled == []:  # everyone was waiting: not a hang this can explain
            raise
        raise TrainingError(hang_message(stalled, cluster, run_dir), where=str(run_dir),
                            fix=_hang_fix(stalled, run_dir, cluster.world_size)) from error


def silent_ranks(cluster: Cluster, *, grace_s: float) -> list[int] | None:
    """After a timeout: check in on torchrun's key-value store (it lives in the torchrun agent,
    not in any rank) and return the ranks that have not checked in after ``grace_s``; ``None``
    when the store cannot be reached."""
    keys = [f"tunelab/timed-out/{rank}" for rank in range(cluster.world_size)]
    try:
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=grace_s + 10))
        store.set(keys[cluster.rank], "1")
        deadline = time.monotonic() + grace_s
        while not store.check(keys) and time.monotonic() < deadline:
            time.sleep(0.1)
        return [rank for rank, key in enumerate(keys) if not store.check([key])]
    except (KeyError, ValueError, RuntimeError):
        return None


def hang_message(stalled: list[int] | None, cluster: Cluster, run_dir: Path) -> str:
    """Who stopped, what the waiting rank saw, and where the run can resume from."""
    waited = f"rank {cluster.rank} waited train.distributed_timeout_s = {cluster.timeout_s:g} s " \
        "for it in a collective operation"
    if stalled is None:
        who = "a rank stopped making progress (torchrun's store could not be reached to tell " \
            "which)"
    else:
        names = ", ".join(map(str, stalled))
        who = f"rank{'s' if len(stalled) > 1 else ''} {names} stopped making progress " \
            "(still running, but never reached the collective operation the others waited in)"
    return f"{who}; {waited} and gave up; the run stops now; {_last_checkpoint(run_dir)}"


def _hang_fix(stalled: list[int] | None, run_dir: Path, nproc: int) -> str:
    where = f"rank {stalled[0]}" if stalled else "the stalled rank"
    return (f"find where {where} is stuck (py-spy dump --pid PID shows its stack: a stuck data "
            "read, a deadlock, a failing GPU), or raise train.distributed_timeout_s if its steps "
            f"are only slow; then {_restart(run_dir, nproc)}")


def _last_checkpoint(run_dir: Path) -> str:
    from tunelab.train.checkpoint import list_checkpoints

    checkpoints = list_checkpoints(RunDir(run_dir).checkpoints)
    return f"the last checkpoint is {checkpoints[-1]}" if checkpoints else \
        "no checkpoint was written"


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# --- the model ----------------------------------------------------------------------------


class StepLoss(nn.Module):
    """The model and its summed completion-token loss as one module.

    DDP and FSDP2 do their work in hooks around a module's ``forward``; the loss never calls the
    model's own forward (``train/loss.py`` runs the decoder body and the output layer itself),
    so this module is the one they wrap. A padding batch (``n_target_tokens == 0``) runs the
    same graph as any other and contributes exactly zero loss and zero gradient.
    """

    def __init__(self, model: nn.Module, chunk_tokens: int):
        super().__init__()
        self.model = model
        self.chunk_tokens = chunk_tokens

    def forward(self, batch: Batch) -> torch.Tensor:
        loss = batch_loss_sum(self.model, batch, chunk_tokens=self.chunk_tokens)
        return loss * 0.0 if batch.n_target_tokens == 0 else loss


def wrap(model: nn.Module, cluster: Cluster, *, chunk_tokens: int,
         step_loss: nn.Module | None = None) -> nn.Module:
    """The module the loop calls for a batch's loss sum: plain, DDP- or FSDP2-wrapped.

    ``step_loss`` is the loss module around ``model`` (a preference objective's); default the
    completion-token loss, ``StepLoss``. Build the optimizer after this call: FSDP2 replaces the
    parameters by sharded DTensors.
    """
    step_loss = step_loss if step_loss is not None else StepLoss(model, chunk_tokens)
    if cluster.world_size > 1:
        # Same seed until here (the same adapter initialisation everywhere); from here on each
        # rank draws its own dropout masks.
        torch.manual_seed(torch.initial_seed() + cluster.rank)
    if cluster.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        # DDP's own start-up sync would broadcast the frozen base too; the adapter is enough
        # (the bases are read from the same files).
        for parameter in model.parameters():
            if parameter.requires_grad:
                dist.broadcast(parameter.data, src=0)
        device_ids = [torch.cuda.current_device()] if cluster.device_type == "cuda" else None
        # DDP registers gradient hooks on parameters that require grad only: the frozen base
        # is never all-reduced.
        return DistributedDataParallel(step_loss, device_ids=device_ids, init_sync=False,
                                       forward_sync_buffers=False)
    if cluster.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(cluster.device_type, (cluster.world_size,))
        for block in decoder_blocks(model):
            fully_shard(block, mesh=mesh)
        fully_shard(step_loss, mesh=mesh)  # the root: embeddings, final norm, output layer
    return step_loss


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks, FSDP's unit of sharding (transformers names their
    class in ``_no_split_modules``)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks = [module for module in model.modules() if type(module).__name__ in names]
    if not blocks:
        raise ConfigError(f"cannot find the decoder blocks of {type(base).__name__} to shard "
                          "with FSDP", where="train.distributed",
                          fix="use train.distributed: ddp for this model")
    return blocks


@contextmanager
def gradient_sync(step_model: nn.Module, sync: bool) -> Iterator[None]:
    """Reduce gradients across ranks only on the step's last micro-batch (accumulation)."""
    if hasattr(step_model, "no_sync"):  # DDP
        with nullcontext() if sync else step_model.no_sync():
            yield
    elif hasattr(step_model, "set_requires_gradient_sync"):  # FSDP2
        step_model.set_requires_gradient_sync(sync)
        yield
    else:
        yield


def full_state(model: nn.Module, cluster: Cluster) -> dict | None:
    """Under FSDP, the trainable weights gathered whole on rank 0 (a collective: call it on
    every rank); ``None`` elsewhere, where the model holds whole weights already."""
    if cluster.strategy != "fsdp":
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True,
                               ignore_frozen_params=True)
    weights = get_model_state_dict(model, options=options)
    # A tied weight (output layer = input embeddings) is saved once, as save_pretrained does.
    owned = {name for name, _ in model.named_parameters()} | \
        {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in weights.items() if name in owned}


class Unlogged:
    """The metrics log of ranks other than 0: they compute the same numbers and write none."""

    def write(self, **record) -> None:
        pass

    def truncate_after(self, step: int) -> None:
        pass


# --- the data -----------------------------------------------------------------------------


def rank_steps(micro_batches: list[list[int]], lengths: list[int], cluster: Cluster, *,
               grad_accum: int, batch_tokens: int, packing: bool) -> list[list[list[int]]]:
    """This rank's micro-batches (lists of example indices) for every optimizer step.

    One process: the run's own micro-batches, ``grad_accum`` per step. Several: rank 0's plan
    (checked against every rank's data) is split step by step with :func:`split_step`.
    """
    steps = [micro_batches[i:i + grad_accum] for i in range(0, len(micro_batches), grad_accum)]
    if cluster.world_size == 1:
        return steps
    _check_same_data(lengths, cluster)
    steps = cluster.from_main(steps)  # the packing plan is made once
    return [split_step([i for batch in step for i in batch], lengths, cluster.world_size,
                       batch_tokens=batch_tokens, packing=packing)[cluster.rank]
            for step in steps]


def split_step(examples: list[int], lengths: list[int], world_size: int, *,
               batch_tokens: int, packing: bool) -> list[list[list[int]]]:
    """One step's examples dealt to ``world_size`` ranks, each share cut into micro-batches.

    Longest first, each example goes to the rank with the fewest tokens so far (ties: the lower
    rank), so the ranks' token counts differ by at most one example. Each share keeps the plan's
    order and is packed into micro-batches of at most ``batch_tokens``; shares with fewer
    micro-batches than the longest are padded with empty lists (padding micro-batches).
    """
    tokens = [0] * world_size
    owner = {}
    for index in sorted(examples, key=lambda i: -lengths[i]):
        rank = min(range(world_size), key=lambda r: tokens[r])
        owner[index] = rank
        tokens[rank] += lengths[index]
    shares = []
    for rank in range(world_size):
        mine = [i for i in examples if owner[i] == rank]
        planned = plan_batches([lengths[i] for i in mine], batch_tokens=batch_tokens,
                               packing=packing) if mine else []
        shares.append([[mine[j] for j in batch] for batch in planned])
    longest = max(len(share) for share in shares)
    return [share + [[] for _ in range(longest - len(share))] for share in shares]


def rank_batches(batches: list[list[int]], cluster: Cluster) -> list[list[int]]:
    """This rank's part of a list of batches (every ``world_size``-th), padded to equal counts."""
    if cluster.world_size == 1:
        return batches
    mine = batches[cluster.rank::cluster.world_size]
    longest = -(-len(batches) // cluster.world_size)
    return mine + [[] for _ in range(longest - len(mine))]


def collate_share(examples: list[TokenizedExample], micro_batches: list[list[int]], *,
                  packing: bool, pad_id: int) -> list[Batch]:
    """The tensors of a rank's micro-batches; an empty one becomes a padding batch.

    A padding batch holds a real example (so the forward and backward passes, and with them
    every collective, are those of any batch) and says it has no target tokens, which makes
    StepLoss multiply its loss by zero and keeps it out of the step's target-token count.
    """
    filler = next((batch[0] for batch in micro_batches if batch), 0)
    batches = []
    for indices in micro_batches:
        batch = collate([examples[i] for i in indices or [filler]], packing=packing,
                        pad_id=pad_id)
        batches.append(batch if indices else replace(batch, n_tokens=0, n_target_tokens=0))
    return batches


def _check_same_data(lengths: list[int], cluster: Cluster) -> None:
    """Fail clearly when the ranks tokenized different data (different files on two nodes)."""
    digest = hashlib.sha256(json.dumps(lengths).encode()).hexdigest()
    digests = [None] * cluster.world_size
    dist.all_gather_object(digests, digest)
    differing = [rank for rank, other in enumerate(digests) if other != digests[0]]
    if differing:
        raise TrainingError(
            f"ranks {', '.join(map(str, differing))} tokenized different training data than "
            "rank 0", where="data.train",
            fix="give every node the same data files and the same tokenizer")
