"""`syllabus train SPEC --nproc N`: the multi-student loop on N processes, one global batch sharded across them.

The launching process does all the store's work (pins the version, reads the examples, locks the run's
checkpoint folder, opens staging, records the catalog) and starts N workers with torch.multiprocessing
(spawn), wired the torchrun way (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1), over a TCPStore
the launcher itself holds on a free port, so no port is picked and then lost to a race. Workers run
engine.train.loop.train_students under gloo (CPU) or nccl (CUDA, rank r on cuda:r); only rank 0 writes
(the students and their metrics.json into staging, the checkpoints), and no worker opens the store.

Every rank shuffles with the same seed, so all see the same batches; each takes a contiguous slice of
every micro-batch's examples. The loss of a step is a mean over the response tokens of all its
micro-batches, so each rank weights its shard's loss by its share of the step's tokens summed over all
ranks, and the gradients are summed across ranks (one all_reduce per student per step, before
clipping): every rank then holds exactly the single-process gradient and takes the same optimizer step.
We all-reduce by hand rather than wrap students in DistributedDataParallel: DDP averages over ranks
(the token shares need a sum), would need no_sync around grad_accum micro-batches, and does not see the
hidden-state projections trained beside a student; its overlap of communication with backward is what
we give up.

Students are built on every rank from the same seed and calibration, then rank 0's weights are
broadcast, so a pruned student is the same everywhere. The val loss is computed on rank 0 and
broadcast, so early stopping and `keep: best` decide alike on every rank. A checkpoint is read by
rank 0 and broadcast. on_policy is refused: each micro-batch's samples are drawn with one seed, so a
sharded micro-batch would sample other tokens than the single-process run.
"""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist

from engine.errors import SpecError, TrainError

MASTER_ADDR = "127.0.0.1"


# --- inside a worker: the helpers train_students calls (each is a no-op in a single process) ---------

def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_writer() -> bool:
    """Rank 0 (or the single process): the one that writes the run folder and checkpoints."""
    return rank() == 0


def backend() -> str | None:
    """The process group's backend (gloo or nccl); None in a single process."""
    return dist.get_backend() if dist.is_initialized() else None


def _comm_device() -> torch.device:
    """Where collectives' tensors live: nccl moves CUDA tensors only."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def rank_device(device: torch.device) -> torch.device:
    """The device this rank trains on: cuda:RANK under nccl (one GPU per rank), else `device`."""
    if device.type == "cuda" and world_size() > 1:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank())))
    return device


def shard(examples: list) -> list:
    """This rank's contiguous slice of a micro-batch's examples (the first ranks take one more when uneven)."""
    size = world_size()
    if size == 1:
        return examples
    base, extra = divmod(len(examples), size)
    start = rank() * base + min(rank(), extra)
    return examples[start : start + base + (rank() < extra)]


def sum_values(values: list[float]) -> list[float]:
    """Each value summed over the ranks (float64: token counts stay exact)."""
    if world_size() == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(tensor)
    return tensor.tolist()


def sum_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Every parameter's gradient summed over the ranks, in one flat all_reduce. A shard that never reached a
    parameter (a rank with no examples this step) adds zero; one no rank reached keeps no gradient, as in a
    single process (AdamW then leaves it alone, weight decay included)."""
    if world_size() == 1:
        return
    params = [p for p in parameters if p.requires_grad]
    reached = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=_comm_device())
    dist.all_reduce(reached)
    params = [p for p, n in zip(params, reached.tolist()) if n]
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    home = flat.device
    flat = flat.to(_comm_device())
    dist.all_reduce(flat)
    flat = flat.to(home)
    offset = 0
    for p, g in zip(params, grads):
        p.grad = flat[offset : offset + g.numel()].view_as(g).clone()
        offset += g.numel()


def broadcast(value):
    """Rank 0's `value` (any picklable object) on every rank."""
    if world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=_comm_device())
    return box[0]


def same_start(name: str, modules: list[torch.nn.Module]) -> None:
    """Rank 0's weights in `modules` on every rank, after checking every rank built the same shapes."""
    if world_size() == 1:
        return
    shapes = [(k, tuple(v.shape)) for m in modules for k, v in m.state_dict().items()]
    everyone = [None] * world_size()
    dist.all_gather_object(everyone, shapes)
    if any(s != shapes for s in everyone):
        raise TrainError(f"student {name!r} was built with different shapes on different ranks; "
                         "train it without --nproc")
    for module in modules:
        for tensor in module.state_dict().values():
            moved = tensor.to(_comm_device())
            dist.broadcast(moved, src=0)
            tensor.copy_(moved)


# --- the launcher ---------------------------------------------------------------------------------

def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def check_nproc(nproc: int, spec) -> str:
    """The backend for `nproc` ranks on the spec's device; a one-line error for what cannot run."""
    from engine.train.device import resolve_device

    where = spec.path or "<spec>"
    if nproc < 1:
        raise TrainError(f"--nproc: {nproc} is not a number of processes (1 or more)")
    device = resolve_device(spec.training.device, where)
    if device.type == "cuda" and nproc > torch.cuda.device_count():
        raise TrainError(f"--nproc {nproc} asks for one CUDA device per process, but this machine has "
                         f"{torch.cuda.device_count()}")
    if nproc > 1 and spec.training.on_policy is not None:
        raise SpecError(f"{where}: training.on_policy cannot run with --nproc > 1: each micro-batch's samples are "
                        "drawn with one seed, so a sharded micro-batch would sample other tokens (use --nproc 1)")
    return backend_for(device)


def launch(spec, examples, out_dir: Path, *, nproc: int, store_root: Path, progress: bool = True,
           checkpoints=None, logprobs_mode: str = "topk") -> dict[str, dict]:
    """train_students on `nproc` worker processes; rank 0 saves into out_dir. Returns its metrics per student."""
    import json

    import torch.multiprocessing as mp

    backend = check_nproc(nproc, spec)
    rendezvous = dist.TCPStore(MASTER_ADDR, 0, world_size=nproc + 1, is_master=True, wait_for_workers=False)
    context = mp.get_context("spawn")
    errors = context.SimpleQueue()
    checkpoint_at = (str(checkpoints.folder), checkpoints.key) if checkpoints is not None else None
    args = (nproc, backend, rendezvous.port, errors, spec, examples, str(out_dir), store_root, progress,
            checkpoint_at, logprobs_mode)
    workers = mp.start_processes(_worker, args=args, nprocs=nproc, join=False, start_method="spawn")
    spawn_log = logging.getLogger("torch.multiprocessing.spawn")  # would log each rank a failed one stops
    quiet_from = spawn_log.level
    spawn_log.setLevel(logging.ERROR)
    try:
        while not workers.join():
            pass
    except (mp.ProcessRaisedException, mp.ProcessExitedException):
        if not errors.empty():  # a worker's one-line error (a bad spec, a missing model): said as it is
            raise errors.get() from None
        raise
    finally:
        spawn_log.setLevel(quiet_from)
        for process in workers.processes:  # Ctrl-C or a failed rank: no worker outlives the launch
            if process.is_alive():
                process.terminate()
            process.join()
    return {s.name: json.loads((Path(out_dir) / s.name / "metrics.json").read_text()) for s in spec.students}


def _worker(index: int, nproc: int, backend: str, port: int, errors, spec, examples, out_dir: str,
            store_root, progress: bool, checkpoint_at, logprobs_mode: str) -> None:
    from engine.errors import UserError
    from engine.models import use_store
    from engine.train.checkpoint import RunCheckpoints
    from engine.train.loop import train_students

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the launcher, which stops every worker
    os.environ.update(RANK=str(index), LOCAL_RANK=str(index), WORLD_SIZE=str(nproc), MASTER_ADDR=MASTER_ADDR,
                      MASTER_PORT=str(port))
    if backend == "nccl":
        torch.cuda.set_device(index)
    store = dist.TCPStore(MASTER_ADDR, port, world_size=nproc + 1, is_master=False)
    dist.init_process_group(backend, store=store, rank=index, world_size=nproc)
    try:
        use_store(store_root)  # `models:RUN_ID/STUDENT` teachers resolve as in the launcher
        checkpoints = RunCheckpoints(Path(checkpoint_at[0]), checkpoint_at[1]) if checkpoint_at and index == 0 else None
        train_students(spec, examples, Path(out_dir), progress=progress and index == 0, checkpoints=checkpoints,
                       logprobs_mode=logprobs_mode)
    except UserError as e:
        if index == 0 or errors.empty():
            errors.put(e)
        raise
    finally:
        dist.destroy_process_group()
