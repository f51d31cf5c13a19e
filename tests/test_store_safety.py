"""The store under crashes, concurrent writers and corrupted files: real processes, real SIGKILLs."""

from __future__ import annotations

import os
import signal
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


def table(n: int, offset: int = 0, tokens: int = 16) -> pa.Table:
    rng = np.random.default_rng(offset)
    return pa.table({
        "prompt_id": [f"p{i:06d}" for i in range(offset, offset + n)],
        "split": ["train" if i % 5 else "test" for i in range(offset, offset + n)],
        "response": [f"answer {i}" for i in range(offset, offset + n)],
        "token_ids": pa.array(rng.integers(0, 49152, size=(n, tokens)).tolist(), pa.list_(pa.int32())),
    })


LINEAGE = {"spec_text": "name: demo\n", "spec_hash": "h", "teacher": "t", "code_version": "0", "stats": {}}

# A child process: commit `n` rows (offset given) as the next version of demo, printing "ready" first.
COMMIT = """
import sys, store
sys.path.insert(0, {tests!r})
from test_store_safety import table, LINEAGE
s = store.open(sys.argv[1])
t = table(int(sys.argv[2]), int(sys.argv[3]))
print("ready", flush=True)
r = s.commit("demo", {{"examples": t}}, {{**LINEAGE, "spec_hash": sys.argv[3]}}, parent=s.latest_version("demo"))
print("committed", r.version, flush=True)
"""


def commit_process(root, n, offset, crash_at=None) -> subprocess.Popen:
    env = {**ENV, **({CRASH_ENV: crash_at} if crash_at else {})}
    code = COMMIT.format(tests=str(Path(__file__).parent))
    return subprocess.Popen([sys.executable, "-c", code, str(root), str(n), str(offset)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


@pytest.fixture
def s(tmp_path):
    st = store.open(tmp_path / "st")
    st.commit("demo", {"examples": table(500)}, LINEAGE, parent=None)
    return st


def leftovers(st) -> tuple[list, list]:
    staging = sorted(p.name for p in (st.root / "staging").iterdir())
    referenced = {p for v in st.versions() for ps in v.files.values() for p in ps}
    data = sorted(p for p in (st.root / "data").rglob("*") if p.is_file() and p not in referenced)
    return staging, data


def assert_intact(st, versions: list[int]):
    assert [v.version for v in st.versions("demo")] == versions
    assert st.read("demo@1", "examples").equals(store.open(st.root).read("demo@1", "examples"))
    assert st.read("demo@1", "examples")["prompt_id"].to_list() == table(500)["prompt_id"].to_pylist()
    for v in versions:
        assert st.sql("SELECT count(*) AS n FROM examples", at=f"demo@{v}")["n"][0].as_py() == \
            st.resolve(f"demo@{v}").row_counts["examples"]
    assert st.verify().ok


@pytest.mark.parametrize("point", ["start", "staged", "placed", "in-transaction", "committed"])
def test_sigkill_at_each_point_of_a_commit(s, point):
    # The child's table shares 400 rows with demo@1 and adds 300: it writes new files and reuses old ones.
    p = commit_process(s.root, 700, 100, crash_at=point)
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == -signal.SIGKILL, stderr
    assert "committed" not in stdout

    landed = point == "committed"  # killed after the catalog transaction: the version is whole
    assert_intact(s, [1, 2] if landed else [1])
    staging, unreferenced = leftovers(s)
    if point in ("staged", "placed", "in-transaction", "committed"):
        assert staging  # the dead writer's staging entry (and its lock) is still there
    if point in ("placed", "in-transaction"):
        assert unreferenced  # files linked into data/ that no version records

    report = s.gc()
    assert len(report.items) == len(staging) + len(unreferenced)
    assert leftovers(s) == ([], [])
    assert_intact(s, [1, 2] if landed else [1])
    # The store goes on: the same commit now lands as demo@2 (or finds it already there).
    p = commit_process(s.root, 700, 100)
    assert p.communicate(timeout=60)[0].split()[-2:] == ["committed", "2"]
    assert s.gc().items == []


def test_sigkill_at_random_moments(s):
    rng = np.random.default_rng(7)
    for attempt in range(3):
        p = commit_process(s.root, 20_000, 10_000 * (attempt + 1))
        assert p.stdout.readline().strip() == "ready"
        time.sleep(float(rng.uniform(0.0, 0.8)))
        p.send_signal(signal.SIGKILL)
        p.communicate(timeout=60)
        versions = [v.version for v in s.versions("demo")]
        assert versions[0] == 1 and versions == list(range(1, len(versions) + 1))
        for v in versions:  # every version visible is whole and readable
            assert s.read(f"demo@{v}", "examples").height == s.resolve(f"demo@{v}").row_counts["examples"]
        s.gc()
        assert leftovers(s) == ([], [])
        assert s.verify().ok


def test_two_processes_commit_at_once_and_both_land(s):
    # Each writer retries on ParentMoved as the engine does: both land, as distinct versions.
    code = """
import sys, time, store
sys.path.insert(0, {tests!r})
from test_store_safety import table, LINEAGE
s = store.open(sys.argv[1])
t = table(3000, int(sys.argv[2]))
while not __import__("os").path.exists(sys.argv[3]):
    time.sleep(0.005)
for attempt in range(5):
    try:
        r = s.commit("demo", {{"examples": t}}, {{**LINEAGE, "spec_hash": sys.argv[2]}}, parent=s.latest_version("demo"))
        print(r.version, attempt)
        break
    except store.ParentMoved:
        continue
""".format(tests=str(Path(__file__).parent))
    go = s.root / "go"
    procs = [subprocess.Popen([sys.executable, "-c", code, str(s.root), str(off), str(go)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=ENV) for off in (100, 5000)]
    time.sleep(1.5)  # both are waiting at the barrier
    go.touch()
    outs = [p.communicate(timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs), [e for _, e in outs]
    landed = sorted(int(o.split()[0]) for o, _ in outs)
    assert landed == [2, 3]
    assert s.catalog.integrity_check() == "ok"
    got = {s.resolve(f"demo@{v}").spec_hash: s.read(f"demo@{v}", "examples")["prompt_id"][0] for v in landed}
    assert got == {"100": "p000100", "5000": "p005000"}
    assert s.verify().ok


def test_gc_running_during_commits_never_breaks_a_version(s):
    commits = """
import sys, store
sys.path.insert(0, {tests!r})
from test_store_safety import table, LINEAGE
s = store.open(sys.argv[1])
for i in range(1, 7):
    s.commit("demo", {{"examples": table(2000, 1000 * i)}}, {{**LINEAGE, "spec_hash": str(i)}}, parent=s.latest_version("demo"))
""".format(tests=str(Path(__file__).parent))
    gcs = "import sys, store\ns = store.open(sys.argv[1])\nfor _ in range(40): s.gc(grace_s=0)\n"
    procs = [subprocess.Popen([sys.executable, "-c", c, str(s.root)], env=ENV, stderr=subprocess.PIPE, text=True)
             for c in (commits, gcs)]
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errs
    assert [v.version for v in s.versions("demo")] == list(range(1, 8))
    assert s.verify().ok
    for v in range(1, 8):
        assert s.read(f"demo@{v}", "examples").height == s.resolve(f"demo@{v}").row_counts["examples"]


def flip_byte(path: Path, keep_mtime: bool = False) -> None:
    st = path.stat()
    os.chmod(path, 0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.chmod(path, 0o444)
    if keep_mtime:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("keep_mtime", [False, True])
def test_corrupted_file_is_reported_by_verify_and_reads(s, keep_mtime):
    s.read("demo@1", "examples")  # stamps the file as checked
    (path,) = s.resolve("demo@1").files["examples"]
    flip_byte(path, keep_mtime)

    report = s.verify()
    assert not report.ok and [(p.path, p.what, p.refs) for p in report.problems] == [(path, "sha256 mismatch", ["demo@1"])]
    for st in (s, store.open(s.root)):  # this process (stamp cache) and a fresh one
        with pytest.raises(store.CorruptData, match=f"data file {path} of demo@1 is corrupt") as e:
            st.read("demo@1", "examples")
        assert e.value.path == path and "\n" not in str(e.value)
        with pytest.raises(store.CorruptData, match=str(path)):
            st.sql("SELECT count(*) FROM examples", at="demo@1")
        with pytest.raises(store.CorruptData, match=str(path)):
            st.version("demo@1").to_polars()


def test_missing_file_and_healing_by_recommit(s):
    (path,) = s.resolve("demo@1").files["examples"]
    flip_byte(path)
    # Committing the same rows again writes the same file, replacing the damaged one: healed.
    assert s.commit("demo", {"examples": table(500)}, LINEAGE, parent=1) == store.CommitResult(1, False)
    assert s.verify().ok and s.read("demo@1", "examples").height == 500
    path.unlink()
    with pytest.raises(store.CorruptData, match=f"data file {path} of demo@1 is missing"):
        s.read("demo@1", "examples")
    assert [p.what for p in s.verify().problems] == ["missing"]
