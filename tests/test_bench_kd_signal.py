"""bench/kd_signal.py: the teacher-signal bench's shape on a tiny random teacher (its figures mean nothing
here): every arm runs at equal steps on the same shared rows, and stored bytes grow with k."""

import json
from pathlib import Path

import pytest
from conftest import bench_script
import yaml

ROOT = Path(__file__).resolve().parents[1]
ARMS = {"top20", "top5", "top50", "sampled20", "top20-T1", "online", "on-policy"}


@pytest.fixture(scope="module")
def kd_signal():
    return bench_script("kd_signal")


@pytest.fixture
def project(tmp_path, tiny_llm_dir):
    # Labels are words the random teacher often says ("coach ..."), so it is right on some rows and
    # retention and its change against top-20 have something to measure.
    rows = [{"text": f"Is {i} an even number?", "kind": "even" if i % 2 else "odd",
             "gold": "coach" if i % 2 == 0 else "date"} for i in range(30)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = [{"q": f"would you say {i} is even", "gold": "coach" if i % 2 == 0 else "date"} for i in range(100, 110)]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    spec = {
        "name": "tinyk",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 6}, "logprobs": {"top_k": 8},
                    "batch_size": 8},
        "sources": [{"path": "pool.jsonl", "text": "text", "category": "kind", "label": "gold"}],
        "coverage": {"categories": {"even": {"max": 10}, "odd": {"max": 10}}},
        "dedup": {"exact": True},
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 0.9], "outside_band_keep": 0.5, "seed": 1},
        "splits": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 1},
        "training": {"loss": {"kd_weight": 0.7, "hard_weight": 0.3, "temperature": 2.0}, "epochs": 2,
                     "batch_size": 4},
        "eval": {"sources": [{"path": "held_out.jsonl", "text": "q", "label": "gold"}]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def test_quick_run_has_every_signal_at_equal_steps_on_the_same_rows(kd_signal, project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    out = project / "kd.json"
    student = {"name": "half", "from_teacher": {"keep_layers": 2}}
    kd_signal.main(["--quick", "--spec", "spec.yaml", "--store", "store", "--out", str(out), "--max-steps", "4",
                    "--student", json.dumps(student)])
    result = json.loads(out.read_text())["specs"][0]
    arms = {a["arm"]: a for a in result["arms"]}
    assert set(arms) == ARMS
    reference = arms["top20"]
    shared = [(s["name"], s["n"]) for s in reference["sets"] if not s["own_split"]]
    assert len(shared) == 2 and shared[1][1] == 10
    for arm in arms.values():
        assert arm["steps"] == reference["steps"] == 4  # --max-steps caps the spec's epochs
        assert arm["cost"]["steps_by_seed"] == [reference["steps"]] * 2  # each seed ran every step
        assert set(arm["runs"]) == {"0", "1"}
        assert [(s["name"], s["n"]) for s in arm["sets"] if not s["own_split"]] == shared
        assert arm["same_rows"]  # greedy answers: k changes what is stored, never which rows are kept
        assert "vs_base" in next(s for s in arm["sets"] if s["name"] == shared[0][0]) or arm is reference
    # What each arm actually trained on.
    assert arms["online"]["cost"]["teacher_signal"] == "online" and arms["online"]["cost"]["teacher_forward_s"] > 0
    assert arms["sampled20"]["cost"]["targets"] == "sampled" and arms["top5"]["cost"]["targets"] == "topk"
    assert sum(filter(None, arms["on-policy"]["cost"]["on_policy_steps_by_seed"])) > 0
    assert arms["top5"]["dataset"].startswith("tinyk-top5@") and arms["online"]["dataset"] == reference["dataset"]
    # Stored bytes per response token grow with k, and the raw formula matches k.
    per_token = [arms[name]["bytes"] for name in ("top5", "top20", "top50")]
    assert [b["k"] for b in per_token] == [5, 20, 50]
    assert [b["raw_per_token"] for b in per_token] == [30, 120, 300]
    zstd = [b["parquet_zstd_per_token"] for b in per_token]
    assert zstd[0] < zstd[1] < zstd[2]
    table = out.with_suffix(".md").read_text()
    for name in ARMS:
        assert f"| {name}: " in table
    # Sampled targets train at T = 1: the table also compares them with stored top-20 at T = 1, seed by seed.
    first = lambda arm: next(s for s in arms[arm]["sets"] if s["name"] == shared[0][0])  # noqa: E731
    control = kd_signal.quality.change_between(first("sampled20"), first("top20-T1"))
    assert f"sampled20 against its control top20-T1: {kd_signal.quality.set_label(shared[0][0])} " \
           f"{kd_signal.quality.format_change(control)}" in table
    assert table in capsys.readouterr().out
    kd_signal.main(["--show", str(out)])
    assert capsys.readouterr().out.strip() == table.strip()
    # Runs split by --only print as one table; runs at other steps refuse to.
    data = json.loads(out.read_text())
    arms = data["specs"][0]["arms"]
    halves = [project / "a.json", project / "b.json"]
    for path, part in zip(halves, [arms[:4], arms[:1] + arms[4:]]):
        path.write_text(json.dumps({**data, "specs": [{**data["specs"][0], "arms": part}]}))
    kd_signal.main(["--show", *map(str, halves)])
    assert capsys.readouterr().out.strip() == table.strip()
    other = json.loads(halves[1].read_text())
    other["specs"][0]["arms"][0]["steps"] += 1
    halves[1].write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="cannot share a table"):
        kd_signal.main(["--show", *map(str, halves)])
