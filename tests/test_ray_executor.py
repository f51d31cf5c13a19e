"""executor: ray — a real Ray cluster on 127.0.0.1 (two worker CPUs, started and stopped here) runs the
teacher and the embedder, and the driver commits the rows the local executor commits."""

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

import store
from engine.curate import pipeline
from engine.spec import load_spec

try:
    import ray  # noqa: F401 - the optional extra: `make ray` (make test runs it) or pip install syllabus[ray]
except ImportError as e:
    if os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"):
        raise RuntimeError(f"ray cannot be imported ({e}): CI must run the Ray executor's tests (`make ray`)")
    pytest.skip(f"ray cannot be imported ({e}): run `make ray`", allow_module_level=True)

N_PROMPTS = 24
SYLLABUS = Path(sys.executable).parent / "syllabus"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"no Ray head on port {port} after {seconds}s")


@pytest.fixture(scope="module")
def ray_cluster():
    """`ray start --head --block`, stopped with the processes it started and nothing else on the machine
    (`ray stop` would stop every Ray of this user)."""
    port = free_port()
    temp = tempfile.mkdtemp(prefix="syllabus-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={port}", "--num-cpus=2", "--include-dashboard=false", "--disable-usage-stats",
         "--object-store-memory=100000000", f"--temp-dir={temp}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        wait_for_port(port, head)
        yield f"127.0.0.1:{port}", head
    finally:
        stop_tree(head)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def ray_address(ray_cluster):
    return ray_cluster[0]


def stop_tree(head: subprocess.Popen) -> None:
    """The head and every process it started (its workers run in sessions of their own): asked, then made."""
    import psutil

    tree = [psutil.Process(head.pid), *psutil.Process(head.pid).children(recursive=True)]
    for proc in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.terminate()
    _, alive = psutil.wait_procs(tree, timeout=15)
    for proc in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture
def project(tmp_path, tiny_llm_dir):
    lines = [f'{{"text": "Question number {i}: is {i} an even number?", "gold": "{"yes" if i % 2 == 0 else "no"}"}}'
             for i in range(N_PROMPTS)]
    (tmp_path / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    spec = {
        "name": "tiny",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 12}, "batch_size": 2},
        "sources": [{"path": "prompts.jsonl", "text": "text", "label": "gold"}],
        "dedup": {"semantic": {"threshold": 0.995}},  # the embed stage runs on the cluster too
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
        "executor": {"kind": "local", "actors": 2, "batch_size": 4, "num_cpus": 1},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def run(project: Path, store_name: str, **executor):
    spec = load_spec(project / "spec.yaml")
    spec = spec.model_copy(update={"executor": spec.executor.model_copy(update=executor)})
    return pipeline.run(spec, store.open(project / store_name), progress=False)


def table(project: Path, store_name: str, name: str) -> pl.DataFrame:
    return store.open(project / store_name).read("tiny@latest", name)


def test_ray_commits_the_rows_the_local_executor_commits(project, ray_address, monkeypatch):
    monkeypatch.chdir(project)
    local = run(project, "local")
    on_ray = run(project, "ray", kind="ray", address=ray_address)
    assert on_ray.created and on_ray.teacher_calls == local.teacher_calls == N_PROMPTS
    assert on_ray.stage_stats["embed"]["embedded"] == local.stage_stats["embed"]["embedded"]
    assert table(project, "ray", "rejections").equals(table(project, "local", "rejections"))
    # The same rows, bit for bit: texts, tokens, top-k ids and log-probs (the teacher's batches are cut along
    # the plan its one local call batches by, shared prefix included).
    assert table(project, "ray", "examples").equals(table(project, "local", "examples"))
    # The driver wrote every answer and vector into the ray store's caches: a local re-run pays nothing.
    again = run(project, "ray")
    assert not again.created and again.teacher_calls == 0


def test_no_cluster_at_the_address_is_one_line_naming_it(project):
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    done = subprocess.run([str(SYLLABUS), "run", str(project / "spec.yaml"), "--store", str(project / "store"),
                           "--executor", "ray", "--address", address], capture_output=True, text=True,
                          timeout=120, cwd=project)
    assert done.returncode == 1
    assert done.stderr.strip().count("\n") == 0 and address in done.stderr, done.stderr
    assert not (project / "store" / "cache" / "teacher.sqlite").exists()  # stopped before any work


def test_the_local_executor_never_imports_ray(project):
    code = ("import sys; from engine.curate import pipeline; from engine.curate.executors import running_on; "
            "from engine.spec import load_spec; from engine.stages import stages_for; "
            f"spec = load_spec({str(project / 'spec.yaml')!r}); "
            "ctx = running_on(spec.executor, stages_for(spec)); ctx.__enter__(); ctx.__exit__(None, None, None); "
            "assert 'ray' not in sys.modules, 'ray imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=project)
    assert done.returncode == 0, done.stderr[-2000:]


def pool_actors(head: subprocess.Popen) -> list:
    """The processes of the cluster's actor pool (Ray titles each after the class it runs), nothing else."""
    import psutil

    found = []
    for proc in psutil.Process(head.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "RowWorker" in " ".join(proc.cmdline()):
                found.append(proc)
    return found


def killing_the_pool_after_the_first_batch(monkeypatch, head) -> dict:
    """When the driver hears the teach stage's first batch, every actor of the pool is killed (SIGKILL): work
    still in flight dies with them. Returns what happened: pids killed, batches heard after the kill."""
    from engine.curate.executors import RayExecutor
    from engine.stages.teach import Teach

    seen = {"killed": [], "batches_after": 0, "answered": 0}
    original = RayExecutor.map_rows

    def map_rows(self, stage, items, ctx, on_batch=None, **plan):
        def hear(indices, outputs):
            if isinstance(stage, Teach):
                seen["answered"] += len(indices)
                if seen["killed"]:
                    seen["batches_after"] += 1
                else:
                    for proc in pool_actors(head):
                        proc.kill()
                        seen["killed"].append(proc.pid)
            if on_batch:
                on_batch(indices, outputs)
        return original(self, stage, items, ctx, on_batch=hear, **plan)

    monkeypatch.setattr(RayExecutor, "map_rows", map_rows)
    return seen


def test_actors_killed_mid_stage_are_restarted_and_their_batches_asked_again(project, ray_cluster, monkeypatch):
    address, head = ray_cluster
    monkeypatch.chdir(project)
    run(project, "local")
    seen = killing_the_pool_after_the_first_batch(monkeypatch, head)
    on_ray = run(project, "ray", kind="ray", address=address, batch_size=2, retries=2)
    assert seen["killed"] and seen["batches_after"] > 0, seen  # killed mid-stage: work was left to do
    assert on_ray.created and on_ray.teacher_calls == N_PROMPTS  # every prompt answered, none counted twice
    assert table(project, "ray", "examples").equals(table(project, "local", "examples"))
    assert len(store.open(project / "ray").versions("tiny")) == 1  # committed once


def test_a_pool_that_stays_dead_commits_nothing_and_keeps_the_answers_that_came_back(project, ray_cluster,
                                                                                      monkeypatch):
    from engine.curate.executors import WorkerFailed

    address, head = ray_cluster
    monkeypatch.chdir(project)
    seen = killing_the_pool_after_the_first_batch(monkeypatch, head)
    with pytest.raises(WorkerFailed, match=r"teach stage .* executor.retries \(0\)") as failed:
        run(project, "ray", kind="ray", address=address, batch_size=2, retries=0)
    assert "\n" not in str(failed.value)
    assert seen["killed"] and 0 < seen["answered"] < N_PROMPTS, seen
    st = store.open(project / "ray")
    staging = project / "ray" / "staging"
    assert st.latest_version("tiny") is None and not (staging.exists() and any(staging.iterdir()))
    # The answers that came back were cached as they came: running again pays only for the rest.
    again = run(project, "ray")
    assert again.created and again.teacher_calls == N_PROMPTS - seen["answered"]
