"""bench/quality.py: the ablation bench's shape on a tiny random teacher (its figures mean nothing here),
and the paired comparison its verdicts rest on."""

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import bench_script
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def quality():
    return bench_script("quality")


def test_a_change_counts_as_a_gain_only_when_its_interval_excludes_zero(quality):
    base = {"0": np.array([1.0] * 20 + [0.0] * 20)}
    better = {"0": np.array([1.0] * 36 + [0.0] * 4)}
    gained = quality.paired_change(better, base, teacher_accuracy=0.8)
    assert gained["change"] == pytest.approx((36 - 20) / 40 / 0.8)
    assert gained["ci"][0] > 0 and gained["verdict"] == "gain"
    assert quality.paired_change(base, better, teacher_accuracy=0.8)["verdict"] == "loss"
    # One row moved either way: nothing to claim.
    shuffled = base["0"].copy()
    shuffled[[0, 39]] = shuffled[[39, 0]]
    assert quality.paired_change({"0": shuffled}, base, teacher_accuracy=1.0)["verdict"] == "no clear difference"


def test_seeds_that_disagree_widen_the_interval(quality):
    # Two of three seeds gain 40 points and one loses 40: averaged over seeds the rows show a gain (13 points expected)
    # on 200 rows, but another draw of seeds could as well show a loss.
    rng = np.random.default_rng(1)
    base = {s: (rng.random(200) < 0.5).astype(float) for s in "012"}
    arm = {"0": np.maximum(base["0"], rng.random(200) < 0.8), "1": np.maximum(base["1"], rng.random(200) < 0.8),
           "2": np.minimum(base["2"], rng.random(200) < 0.2)}
    split = quality.paired_change(arm, base, teacher_accuracy=1.0)
    assert split["change"] > 0.05 and split["ci"][0] < 0 and split["verdict"] == "no clear difference"
    # Resampling the rows of the seeds' mean alone would have called it a gain.
    averaged = quality.paired_change({"mean": np.mean(list(arm.values()), axis=0)},
                                     {"mean": np.mean(list(base.values()), axis=0)}, teacher_accuracy=1.0)
    assert averaged["verdict"] == "gain"
    # The same gain in every seed is a gain.
    agreed = {s: np.maximum(base[s], rng.random(200) < 0.8) for s in "012"}
    assert quality.paired_change(agreed, base, teacher_accuracy=1.0)["verdict"] == "gain"
    # Seeds are paired by name: only the seeds both ran count.
    assert quality.paired_change({**agreed, "9": arm["2"]}, base, teacher_accuracy=1.0)["seeds"] == 3


def test_rows_are_paired_by_seed_only_when_the_seeds_scored_the_same_rows(quality):
    rows = quality.seed_rows({"0": "110", "1": "100"})
    assert {seed: list(r) for seed, r in rows.items()} == {"0": [1.0, 1.0, 0.0], "1": [1.0, 0.0, 0.0]}
    assert quality.seed_rows({"0": "11", "1": "100"}) is None


def test_equal_quotas_caps_each_category_at_the_base_count(quality):
    raw = {"coverage": {"total": 100, "categories": {"a": {"share": 0.5}, "b": {"min": 3, "max": 50}}}}
    capped = quality.equal_quotas(raw, {"a": 12, "b": 7})
    assert capped["coverage"]["categories"] == {"a": {"max": 12}, "b": {"max": 7}}
    assert "total" not in capped["coverage"] and raw["coverage"]["total"] == 100  # the original is untouched


@pytest.fixture
def project(tmp_path, tiny_llm_dir):
    rows = [{"text": f"Is {i} an {'even' if i % 3 else 'odd'} number?", "kind": "even" if i % 2 else "odd",
             "gold": "yes" if (i % 2 == 0) == (i % 3 == 0) else "no"} for i in range(40)]
    (tmp_path / "pool.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    held_out = [{"q": f"would you say {i} is even", "gold": "yes" if i % 2 == 0 else "no"} for i in range(100, 112)]
    (tmp_path / "held_out.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    (tmp_path / "rewrite.j2").write_text("Rewrite this question: {{ prompt }}")
    spec = {
        "name": "tinyq",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 6}, "logprobs": {"top_k": 8},
                    "batch_size": 8},
        "sources": [{"path": "pool.jsonl", "text": "text", "category": "kind", "label": "gold",
                     "options": ["yes", "no"]}],
        "coverage": {"categories": {"even": {"max": 12}, "odd": {"max": 12}}},
        "augment": [{"template": "rewrite.j2", "categories": ["even"], "teacher": True, "max_new_tokens": 8}],
        "dedup": {"exact": True, "semantic": {"threshold": 0.99}},
        "diversity": {"clusters": 2, "seed": 1},
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 0.9], "outside_band_keep": 0.5, "seed": 1},
        "splits": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 1},
        "training": {"loss": {"kd_weight": 0.7, "hard_weight": 0.3, "temperature": 2.0}, "epochs": 2,
                     "batch_size": 4},
        "eval": {"sources": [{"path": "held_out.jsonl", "text": "q", "label": "gold"}]},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path


def test_quick_run_has_every_arm_at_equal_size_and_steps_on_the_same_rows(quality, project, monkeypatch, capsys):
    monkeypatch.chdir(project)
    out = project / "quality.json"
    student = {"name": "half", "from_teacher": {"keep_layers": 2}}
    quality.main(["--quick", "--spec", "spec.yaml", "--store", "store", "--out", str(out),
                  "--student", json.dumps(student)])
    result = json.loads(out.read_text())["specs"][0]
    arms = {a["arm"]: a for a in result["arms"]}
    assert set(arms) == {"base", "hard", "T1", "T5", "random", "no-dedup", "no-variations", "options-kd"}
    base = arms["base"]
    for arm in arms.values():
        assert arm["steps"] == base["steps"] <= quality.QUICK_STEPS
        assert set(arm["runs"]) == {"0", "1"}
        # Equal data size: a curation arm never keeps more of a category than the base.
        for category, n in arm["kept_per_category"].items():
            assert n <= base["kept_per_category"][category]
        # Every arm is scored on the same shared rows: the base's test split, then the held-out source.
        shared = [(s["name"], s["n"]) for s in arm["sets"] if not s["own_split"]]
        assert shared == [(s["name"], s["n"]) for s in base["sets"] if not s["own_split"]]
        assert len(shared) == 2 and shared[1][1] == 12
    assert arms["hard"]["dataset"] == base["dataset"]  # a training lever trains on the base's data
    assert arms["random"]["dataset"].startswith("tinyq-random@")
    table = out.with_suffix(".md").read_text()
    for name in arms:
        assert f"| {name}: " in table
    assert table in capsys.readouterr().out


def test_an_arm_the_spec_gives_nothing_to_change_is_listed_as_not_applicable(quality, project, monkeypatch):
    monkeypatch.chdir(project)
    raw = yaml.safe_load((project / "spec.yaml").read_text())
    del raw["augment"], raw["sources"][0]["options"]
    reasons = {a.name: a.applies(raw) for a in quality.arms_for(raw)}
    assert "teacher-written" in reasons["no-variations"] and "answer set" in reasons["options-kd"]
    assert reasons["random"] is None and reasons["hard"] is None


def test_a_spec_run_in_its_own_process_gets_the_other_options_but_its_own_spec_store_and_out(quality):
    argv = ["--spec", "a.yaml", "--spec=b.yaml", "--jobs", "2", "--seeds", "0,1", "--store", "s", "--quick",
            "--out=o.json"]
    assert quality._without(argv, {"--spec", "--store", "--out", "--jobs"}) == ["--seeds", "0,1", "--quick"]
