"""Checkpoints of a training run, so that an interrupted `syllabus train` resumes where it stopped.

    <store>/models/.checkpoints/<run_id>/lock       flock held by the process training the run
    <store>/models/.checkpoints/<run_id>/state.pt   the latest checkpoint (torch.save of one dict)

The folder is named by the run id (dataset version + training hash), and the checkpoint carries the
full key besides: a spec that changes what is learned names another run, so it never resumes a stale
checkpoint. It lives beside the runs rather than under staging/ because staging/ is swept by gc once its
writer is gone, and a checkpoint must outlive its writer, that is its whole point. The checkpoint goes
when its run succeeds (or when `syllabus train` finds the run already trained); `syllabus gc` removes a
finished run's that a kill left behind, and an interrupted run's only when asked (--checkpoints). A
write goes to a temporary name, is fsynced, and is renamed over the previous one, so a kill mid-write
leaves the previous checkpoint whole.

What goes in (engine/train/loop.py builds it): every student's weights, optimizer and lr-scheduler
state, its recorded curves and val/best state, its hidden-state projections; the step, the current
epoch's batch order and the position in it, and the numpy and torch RNG states, so that the resumed
run goes on with exactly the batches, and ends with exactly the weights, of an uninterrupted one.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from pathlib import Path

import torch

from engine.errors import TrainError

FOLDER = ".checkpoints"  # under <store>/models/: a dot name no run id can take
FORMAT = 1


class RunCheckpoints:
    """`with RunCheckpoints(folder, key) as ckpt:` the run's checkpoint folder, locked against a second
    process training the same run; load() the latest checkpoint, save(state) a new one, discard() all."""

    def __init__(self, folder: Path, key: str):
        self.folder = Path(folder)
        self.key = key
        self.path = self.folder / "state.pt"
        self._fd: int | None = None
        self.written = 0  # checkpoints saved by this process
        self.seconds = 0.0  # spent saving them
        self.bytes = 0  # size of the last one
        self.step: int | None = None  # the step of the checkpoint on disk, once loaded or saved

    @classmethod
    def for_run(cls, store_root: Path, run_id: str, key: str) -> "RunCheckpoints":
        return cls(Path(store_root) / "models" / FOLDER / run_id, key)

    def __enter__(self) -> "RunCheckpoints":
        while True:
            self.folder.mkdir(parents=True, exist_ok=True)
            lock = self.folder / "lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise TrainError(f"run {self.folder.name} is being trained by another process "
                                 f"(it holds {lock}); wait for it to finish") from None
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:
                same = False
            if same:  # else the previous holder removed the folder between our open and our flock
                break
            os.close(fd)
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if not self.path.exists():  # nothing to resume from: leave no empty folder behind
            self._remove_folder()
        os.close(self._fd)
        self._fd = None

    def load(self, map_location=None) -> dict | None:
        """The latest checkpoint of this run, or None (none yet, another key, an unreadable file)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location=map_location, weights_only=True)
        except Exception:  # a truncated or foreign file: start over rather than fail the run
            return None
        if not isinstance(state, dict) or state.get("format") != FORMAT or state.get("key") != self.key:
            return None
        self.step = state.get("step")
        return state

    def save(self, state: dict) -> None:
        """Write `state` (plus the key) as the latest checkpoint: temp name, fsync, rename, fsync the folder."""
        start = time.perf_counter()
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".state.pt.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            torch.save({"format": FORMAT, "key": self.key, **state}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self.written += 1
        self.step = state.get("step")
        self.bytes = self.path.stat().st_size
        self.seconds += time.perf_counter() - start

    def discard(self) -> None:
        """The run is done: its checkpoint goes (the lock stays held until the block ends)."""
        self.path.unlink(missing_ok=True)
        self.step = None

    def _remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)
        try:
            self.folder.parent.rmdir()  # models/.checkpoints itself, once no run has one
        except OSError:
            pass


def discard_leftover(store_root: Path, run_id: str) -> None:
    """A finished run's checkpoint that its process was killed before removing (no one training it)."""
    folder = Path(store_root) / "models" / FOLDER / run_id
    if not folder.exists():
        return
    try:
        with RunCheckpoints(folder, key="") as ckpt:
            ckpt.discard()
    except TrainError:
        pass  # someone is training it right now: theirs to remove
