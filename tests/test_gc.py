"""`gc`: what it sweeps (leftovers of dead writers, unreferenced files and their side files)
and what it must never touch (anything a version, a live writer or a trained model uses).

Side files of the store, and who leaves them:
- staging/<name>/ + staging/<name>.lock   a writer's private folder and its flock; a killed writer leaves both
- staging/<other>                          anything else put there (another tool's temp files)
- data/<ds>/<table>/<sha>.parquet          a commit killed after linking its files, before its catalog row
- data/<ds>/<table>/.<sha>.parquet.*.tmp   a link killed before its rename into place
- cache/store/rows/<sha>.<scheme>.u64      row hashes of a data file (and .<sha>.*.tmp while written)
- cache/store/checked.sqlite               integrity stamps of data files
- models/<run>/<student>/                  trained students: not gc's business, always kept
- models/.checkpoints/<run>/               a training run's checkpoint: a finished run's goes, an interrupted
                                           run's stays unless gc --checkpoints, a run training now is never touched
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

import store
from store.files import CRASH_ENV

ROOT = Path(store.__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
LINEAGE = {"spec_text": "name: demo\n", "spec_hash": "h", "teacher": "t", "code_version": "0", "stats": {}}
HOURS_AGO = time.time() - 2 * 3600


def table(n: int, offset: int = 0) -> pa.Table:
    rng = np.random.default_rng(offset)
    return pa.table({"prompt_id": [f"p{i:05d}" for i in range(offset, offset + n)],
                     "split": ["train"] * n,
                     "token_ids": pa.array(rng.integers(0, 49152, size=(n, 4)).tolist(), pa.list_(pa.int32()))})


@pytest.fixture
def s(tmp_path):
    st = store.open(tmp_path / "st")
    st.commit("demo", {"examples": table(100)}, LINEAGE, parent=None)
    st.commit("demo", {"examples": table(120)}, {**LINEAGE, "spec_hash": "h2"}, parent=1)  # shares demo@1's file
    return st


def snapshot(st) -> dict[str, bytes]:
    """Every file of the store that a version, a model or a cache relies on, with its bytes."""
    keep = {}
    for v in st.versions():
        for paths in v.files.values():
            keep.update({str(p): p.read_bytes() for p in paths})
    return keep


def rows_dir(st) -> Path:
    return st.root / "cache" / "store" / "rows"


def sidecar_shas(st) -> set[str]:
    return {p.name.split(".")[0] for p in rows_dir(st).glob("*.u64")}


def live_shas(st) -> set[str]:
    return {p.stem for v in st.versions() for ps in v.files.values() for p in ps}


def run_writer(root: Path, code: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**ENV, **({CRASH_ENV: crash_at} if crash_at else {})}
    return subprocess.run([sys.executable, "-c", code, str(root)], env=env, capture_output=True, text=True, timeout=60)


def age(path: Path, when: float = HOURS_AGO) -> None:
    for p in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.utime(p, (when, when), follow_symlinks=False)


def test_a_killed_commit_is_swept_with_its_staging_lock_and_row_hashes(s):
    before = snapshot(s)
    assert sidecar_shas(s) == live_shas(s)
    # A commit SIGKILLed after linking its new file into data/, before the catalog knew of it.
    code = ("import sys, store\nsys.path.insert(0, %r)\nfrom test_gc import table, LINEAGE\n"
            "s = store.open(sys.argv[1])\n"
            "s.commit('demo', {'examples': table(150, 1000)}, {**LINEAGE, 'spec_hash': 'h3'}, parent=2)\n"
            % str(Path(__file__).parent))
    assert run_writer(s.root, code, crash_at="placed").returncode == -9
    staging = sorted((s.root / "staging").iterdir())
    assert [p.suffix for p in staging] == ["", ".lock"]  # the dead writer's folder and lock
    orphans = [p for p in (s.root / "data").rglob("*.parquet") if p.stem not in live_shas(s)]
    assert len(orphans) == 1 and orphans[0].stem in sidecar_shas(s)

    report = s.gc()  # no grace needed: the lock says its writer is dead
    assert sorted((i.path, i.why) for i in report.items) == sorted(
        [(p, "staging leftover") for p in staging] + [(orphans[0], "unreferenced data file")])
    assert report.bytes > 0 and not any(p.exists() for p in staging + orphans)
    assert sidecar_shas(s) == live_shas(s)  # the orphan's row hashes went with it; the others stay
    assert snapshot(s) == before and s.verify().ok
    assert s.gc().items == []


def test_a_live_writers_entry_is_kept_and_a_dead_ones_goes(s):
    writer = ("import sys, os, signal, store\ns = store.open(sys.argv[1])\n"
              "with s.staging('train-run') as d:\n"
              "    (d / 'model.safetensors').write_bytes(b'x' * 100)\n"
              "    print('ready', flush=True)\n"
              "    {}\n")
    assert run_writer(s.root, writer.format("os.kill(os.getpid(), signal.SIGKILL)")).returncode == -9
    dead = {p.name for p in (s.root / "staging").iterdir()}
    assert len(dead) == 2  # its folder and its lock
    live = subprocess.Popen([sys.executable, "-c", writer.format("sys.stdin.readline()"), str(s.root)],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        assert live.stdout.readline().strip() == "ready"
        (live_folder,) = [p for p in (s.root / "staging").iterdir() if p.name not in dead and p.is_dir()]
        assert {i.path.name for i in s.gc(grace_s=0).items} == dead
        assert (live_folder / "model.safetensors").read_bytes() == b"x" * 100  # mid-training: untouched
        assert live_folder.with_name(live_folder.name + ".lock").exists()
    finally:
        live.communicate("go\n", timeout=60)
    assert list((s.root / "staging").iterdir()) == []  # the live writer cleaned up after itself


def test_foreign_staging_entries_wait_for_the_grace_period(s):
    staging = s.root / "staging"
    young, old, old_but_busy = staging / "tmp-young", staging / "tmp-old", staging / "tmp-busy"
    for folder in (young, old, old_but_busy):
        (folder / "sub").mkdir(parents=True)
        (folder / "sub" / "part.bin").write_bytes(b"x")
    age(old)
    age(old_but_busy)
    os.utime(old_but_busy / "sub" / "part.bin")  # something inside is still being written
    stray_file = staging / "notes.txt"
    stray_file.write_text("mine")
    age(stray_file)

    assert sorted(i.path.name for i in s.gc().items) == ["notes.txt", "tmp-old"]
    assert young.exists() and old_but_busy.exists() and not old.exists() and not stray_file.exists()
    assert sorted(i.path.name for i in s.gc(grace_s=0).items) == ["tmp-busy", "tmp-young"]


def test_unreferenced_data_files_and_stale_links_go_fresh_links_stay(s):
    before = snapshot(s)
    folder = s.root / "data" / "demo" / "examples"
    orphan = folder / ("a" * 64 + ".parquet")
    orphan.write_bytes(b"orphan")
    other_dataset = s.root / "data" / "gone" / "examples" / ("b" * 64 + ".parquet")
    other_dataset.parent.mkdir(parents=True)
    other_dataset.write_bytes(b"never committed")
    stale_link = folder / f".{'c' * 64}.parquet.1234abcd.tmp"
    stale_link.write_bytes(b"killed mid-link")
    age(stale_link, time.time() - 120)
    fresh_link = folder / f".{'d' * 64}.parquet.5678abcd.tmp"
    fresh_link.write_bytes(b"a writer is linking this right now")

    report = s.gc()
    assert sorted(i.path for i in report.items) == sorted([orphan, other_dataset, stale_link])
    assert {i.why for i in report.items} == {"unreferenced data file"}
    assert fresh_link.exists() and not orphan.exists() and not stale_link.exists()
    assert snapshot(s) == before
    for v in s.versions():
        assert s.read(v.ref, "examples").height == v.row_counts["examples"]


def test_side_files_of_removed_data_go_and_those_of_live_data_stay(s):
    live = live_shas(s)
    stamps = sqlite3.connect(s.root / "cache" / "store" / "checked.sqlite")
    stamped_before = {r[0] for r in stamps.execute("SELECT path FROM checked")}
    assert stamped_before == {str(p) for v in s.versions() for ps in v.files.values() for p in ps}

    orphan = s.root / "data" / "demo" / "examples" / ("e" * 64 + ".parquet")
    orphan.write_bytes(b"orphan")
    s.checker.record(orphan, "e" * 64)  # e.g. stamped by a commit that lost its race with gc
    s.hashes.put("e" * 64, np.arange(3, dtype=np.uint64))
    stale_sidecar = rows_dir(s) / f"{'f' * 64}.{store.layout.SCHEME}.u64"  # a file long gone
    stale_sidecar.write_bytes(b"\0" * 40)
    killed_write = rows_dir(s) / f".{'e' * 64}.0a0b0c0d.tmp"
    killed_write.write_bytes(b"half")
    age(killed_write, time.time() - 120)
    fresh_write = rows_dir(s) / f".{'9' * 64}.0a0b0c0e.tmp"
    fresh_write.write_bytes(b"being written")

    s.gc()
    assert sidecar_shas(s) == live  # the orphan's and the stale sidecar went, every live file's stayed
    assert not killed_write.exists() and fresh_write.exists()
    assert {r[0] for r in stamps.execute("SELECT path FROM checked")} == stamped_before
    stamps.close()
    # The store goes on using what it kept: a child of demo@2 reuses its files and their row hashes.
    assert s.commit("demo", {"examples": table(121)}, {**LINEAGE, "spec_hash": "h3"}, parent=2).created
    assert set(s.resolve("demo@2").files["examples"]) <= set(s.resolve("demo@3").files["examples"])
    assert s.verify().ok


def test_dry_run_lists_the_same_items_and_removes_nothing(s):
    (s.root / "staging" / "dead-1-00000000.lock").write_text("")
    (s.root / "staging" / "dead-1-00000000").mkdir()
    orphan = s.root / "data" / "demo" / "examples" / ("a" * 64 + ".parquet")
    orphan.write_bytes(b"orphan")
    s.hashes.put("a" * 64, np.arange(3, dtype=np.uint64))
    everything = sorted(p for p in s.root.rglob("*") if p.is_file() and "checked.sqlite" not in p.name)

    dry = s.gc(dry_run=True)
    assert dry.dry_run and len(dry.items) == 3
    assert sorted(p for p in s.root.rglob("*") if p.is_file() and "checked.sqlite" not in p.name) == everything
    real = s.gc()
    assert [(i.path, i.why, i.bytes) for i in real.items] == [(i.path, i.why, i.bytes) for i in dry.items]
    assert not orphan.exists() and "a" * 64 not in sidecar_shas(s)


def test_models_and_caches_are_never_collected(s):
    model = s.root / "models" / "demo-v1-abc" / "tiny"
    model.mkdir(parents=True)
    (model / "model.safetensors").write_bytes(b"weights")
    unrecorded = s.root / "models" / "demo-v2-def" / "drop6"  # saved, its catalog row never written
    unrecorded.mkdir(parents=True)
    (unrecorded / "metrics.json").write_text("{}")
    s.record_model(dataset="demo", version=1, run_id="demo-v1-abc", student="tiny", path=model,
                   spec_hash="h", metrics={})
    caches = [s.root / "cache" / "teacher.sqlite", s.root / "cache" / "embeddings.sqlite",
              s.root / "cache" / "stages" / "teach-0123.parquet"]
    for path in caches:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"cached")
    for path in [model, unrecorded, *caches]:
        age(path)

    assert s.gc(grace_s=0).items == []
    assert (model / "model.safetensors").read_bytes() == b"weights" and (unrecorded / "metrics.json").exists()
    assert all(p.read_bytes() == b"cached" for p in caches)
    assert [m["student"] for m in s.models()] == ["tiny"]


def checkpoint(s, run_id: str) -> Path:
    folder = s.root / "models" / ".checkpoints" / run_id
    folder.mkdir(parents=True)
    (folder / "lock").touch()
    (folder / "state.pt").write_bytes(b"state" * 100)
    return folder


def test_checkpoints_of_finished_runs_go_interrupted_ones_stay_until_asked(s):
    finished, interrupted = checkpoint(s, "demo-v1-done"), checkpoint(s, "demo-v2-cut")
    model = s.root / "models" / "demo-v1-done" / "tiny"
    model.mkdir(parents=True)
    s.record_model(dataset="demo", version=1, run_id="demo-v1-done", student="tiny", path=model,
                   spec_hash="h", metrics={})

    report = s.gc()
    assert [(i.path, i.why) for i in report.items] == [(finished, "checkpoint of a finished run")]
    assert [i.path for i in report.kept] == [interrupted] and "gc --checkpoints" in report.kept[0].why
    assert not finished.exists() and (interrupted / "state.pt").exists() and model.exists()

    assert [i.path for i in s.gc(checkpoints=True, dry_run=True).items] == [interrupted]
    assert interrupted.exists()
    assert [i.path for i in s.gc(checkpoints=True).items] == [interrupted]
    assert not (s.root / "models" / ".checkpoints").exists() and model.exists()


def test_a_checkpoint_whose_run_is_training_is_never_touched(s):
    import fcntl

    live = checkpoint(s, "demo-v1-live")
    fd = os.open(live / "lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        report = s.gc(checkpoints=True)
        assert report.items == [] and report.kept == [] and (live / "state.pt").exists()
    finally:
        os.close(fd)
