"""Where a run's per-row model calls happen: in this process (`executor.kind: local`, the default), or on a
Ray cluster (`ray`), as Ray Data `map_batches` over a pool of actors, each loading the model once.

A per-row stage (Stage.per_row: teach, embed) finds in its per-row cache what it already has and hands the
executor only the rest; the executor returns one output per item, batch by batch as batches finish, and the
driver writes each batch into the cache as it comes. Workers never open the store or its caches: a Ray node
need not see the driver's disk, and one writer keeps the sqlite caches free of lock waits. So the stage
cache, the request cache and the commit (one driver, one atomic commit) work as they do locally, and the
rows are the same: the driver puts every output back in its item's place, and the teacher's batches are cut
along the plan its one local call would batch by, so even the log-probs are the local ones, bit for bit.

Ray is imported only here, and only when the spec asks for it.
"""

from __future__ import annotations

import logging
import pickle
import socket
import warnings
from contextlib import contextmanager
from typing import Callable, Iterator

from engine.errors import UserError
from engine.stages.base import RunContext, Stage

CONNECT_TIMEOUT_S = 5

_cluster: "RayExecutor | None" = None  # the run's cluster while a run uses one


class ClusterUnreachable(UserError):
    """executor.address names no running Ray cluster; one line naming it."""


class WorkerFailed(UserError):
    """The actor pool could not finish a stage (its actors died more often than executor.retries allows)."""


def current_cluster() -> "RayExecutor | None":
    """The Ray cluster per-row stages hand their work to, or None: they run it in this process."""
    return _cluster


@contextmanager
def running_on(executor_spec, stages: list[Stage]) -> Iterator[None]:
    """For the length of a run: connect to the cluster the spec names (before any work, so a missing
    cluster costs nothing), when one of the run's stages is per-row; disconnect after."""
    global _cluster
    if executor_spec.kind == "local" or not any(stage.per_row for stage in stages):
        yield
        return
    _cluster = RayExecutor.connect(executor_spec)
    try:
        yield
    finally:
        _cluster.close()
        _cluster = None


class RayExecutor:
    def __init__(self, spec):
        self.spec = spec  # the spec's executor section

    @classmethod
    def connect(cls, spec) -> "RayExecutor":
        import os

        import ray

        # Ray Data's usage telemetry polls a Prometheus server on localhost after every dataset, logging a
        # traceback when there is none (the usual case); a user who wants it sets these variables.
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        os.environ.setdefault("RAY_DATA_USAGE_DISABLED", "1")
        if spec.address != "auto":
            _probe(spec.address)  # ray.init would wait a minute on a port nobody listens on
        try:
            ray.init(address=spec.address, logging_level=logging.ERROR, log_to_driver=False)
        except (ConnectionError, TimeoutError) as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ClusterUnreachable(f"executor.address: no Ray cluster at {spec.address} ({reason})") from None
        _quiet_data()
        return cls(spec)

    def close(self) -> None:
        import ray

        ray.shutdown()  # disconnects this driver; the cluster stays up

    def map_rows(self, stage: Stage, items: list, ctx: RunContext,
                 on_batch: Callable[[list[int], list], None] | None = None,
                 order: list[int] | None = None, unit: int = 1) -> list:
        """stage.process_rows over `items` on the cluster: one output per item, in order. `on_batch(indices,
        outputs)` hears each batch as it comes back (the caller caches it), in whatever order they finish.
        Batches are consecutive runs of `order` (default: the items' own), each a whole number of `unit`s
        long: a stage whose one local call batches its items so (the teacher: by length, teacher.batch_size
        at a time) gets the same batches, and so the same outputs, on the cluster."""
        outputs: list = [None] * len(items)
        for indices, answered in self._batches(stage, items, ctx, order or list(range(len(items))), unit):
            for i, out in zip(indices, answered):
                outputs[i] = out
            if on_batch:
                on_batch(indices, answered)
        return outputs

    def _batches(self, stage: Stage, items: list, ctx: RunContext, order: list[int], unit: int):
        import ray

        if not items:
            return
        size = -(-self.spec.batch_size // unit) * unit
        groups = [order[start:start + size] for start in range(0, len(order), size)]
        # One Ray row per batch, one batch per block: the batches are exactly these, every actor gets work,
        # and no task needs a CPU the pool holds.
        rows = [{"group": g, "items": pickle.dumps([items[i] for i in group])} for g, group in enumerate(groups)]
        with warnings.catch_warnings():  # ray 2.60 names no parameter for retries yet, and warns at this one
            warnings.simplefilter("ignore", DeprecationWarning)
            mapped = ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
                RowWorker, fn_constructor_kwargs={"stage_class": type(stage), "spec": ctx.spec},
                compute=ray.data.ActorPoolStrategy(size=self.spec.actors), num_cpus=self.spec.num_cpus,
                batch_size=1, batch_format="pyarrow", **self._retries())
        try:
            for batch in mapped.iter_batches(batch_size=None, batch_format="pyarrow"):
                for g, outputs in zip(batch["group"].to_pylist(), batch["outputs"].to_pylist()):
                    yield groups[g], pickle.loads(outputs)
        except ray.exceptions.RayError as e:
            raise self._failed(e, stage) from None

    def _failed(self, error: Exception, stage: Stage) -> Exception:
        """The stage's own one-line error, as it would say it locally; else a line on the pool that failed."""
        cause = getattr(error, "cause", None)
        if isinstance(cause, UserError):
            return cause
        reason = (str(error).strip().splitlines() or [""])[0]
        return WorkerFailed(
            f"executor: Ray workers of the {stage.name} stage failed beyond executor.retries "
            f"({self.spec.retries}): {type(error).__name__}: {reason} Nothing was committed; the answers that "
            "came back are cached, so running again asks only for the rest")

    def _retries(self) -> dict:
        """A dead actor is restarted and its batch asked again (outputs are cached only once they are back)."""
        return {"max_restarts": self.spec.retries, "max_task_retries": self.spec.retries}


class RowWorker:
    """One actor of the pool: the stage with its own context, so the model it loads on the first batch
    (ctx.teacher, or the embedder's per-process cache) serves every later batch."""

    def __init__(self, stage_class: type[Stage], spec):
        self.stage = stage_class()
        self.ctx = RunContext(spec=spec, cache_dir=None, progress=False)

    def __call__(self, batch):
        import pyarrow as pa

        outputs = [pickle.dumps(self.stage.process_rows(pickle.loads(b), self.ctx)) for b in batch["items"].to_pylist()]
        return pa.table({"group": batch["group"], "outputs": pa.array(outputs, pa.binary())})


def _probe(address: str) -> None:
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterUnreachable(f"executor.address: no Ray cluster at {address} ({e.strerror or e})") from None


def _quiet_data() -> None:
    """Ray Data's progress bars and plan logs would interleave with the run's own progress."""
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    if hasattr(context, "print_on_execution_start"):
        context.print_on_execution_start = False
