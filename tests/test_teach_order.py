"""teach.order: selection on a tiny random teacher: fewer calls, the same quotas, nothing lost or paid twice."""

from pathlib import Path

import polars as pl
import pytest
import yaml
from conftest import edit_spec as edit
from conftest import interrupt_teacher_at

import store
from engine.curate import pipeline
from engine.curate.plan import make_plan
from engine.errors import Interrupted, SpecError
from engine.spec import load_spec, parse_spec
from engine.stages import stages_for

N_A, N_B = 40, 8  # category a gets a cap (capped_spec), b none


@pytest.fixture
def project(tmp_path, tiny_llm_dir, monkeypatch):
    rows = [{"q": f"Question number {i}: is {i} an even number?", "c": "a"} for i in range(N_A)]
    rows += [{"q": f"Tell me about boats, story {i}.", "c": "b"} for i in range(N_B)]
    (tmp_path / "p.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    spec = {
        "name": "ordered",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 12}, "batch_size": 4},
        "sources": [{"path": "p.jsonl", "text": "q", "category": "c"}],
        "coverage": {"categories": {"a": {}, "b": {}}},  # capped_spec sets a cap
        "diversity": {"clusters": 3, "seed": 1},
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
        "splits": {"train": 0.7, "val": 0.1, "test": 0.2, "seed": 3},
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run(project: Path, store_name: str):
    return pipeline.run(load_spec(project / "spec.yaml"), store.open(project / store_name), progress=False)


def train_val_counts(examples: pl.DataFrame) -> dict:
    return dict(examples.filter(pl.col("split") != "test").group_by("category").len().iter_rows())


def capped_spec(project: Path) -> tuple[int, int]:
    """Probe the teacher once (order: all, every row), then set a band that leaves some answers of
    category a outside it and a cap below a's rows in band. Returns (a's train+val rows, the cap)."""
    probe = run(project, "probe")
    assert probe.teacher_calls == N_A + N_B
    a = store.open(project / "probe").read("ordered@1", "examples").filter(
        (pl.col("category") == "a") & (pl.col("split") != "test"))
    scores = sorted(a["conf_mean_token_prob"])
    lo = scores[len(scores) // 3]  # about a third of a's answers fall below the band
    in_band = sum(s >= lo for s in scores)
    cap = in_band - 4
    assert cap >= 8 and a.height - cap >= 8, (a.height, in_band)
    edit(project, **{"mining.band": [lo, 1.0], "coverage.categories.a": {"max": cap}})
    return a.height, cap


def test_ordered_teaching_pays_fewer_calls_for_the_same_quotas(project):
    """The issue's test: capped categories, strictly fewer calls, a dataset meeting the same quotas."""
    a_rows, cap = capped_spec(project)
    everything = run(project, "all")  # order: all, in a store of its own: pays every row
    assert everything.teacher_calls == N_A + N_B
    edit(project, **{"teach.order": "selection"})
    plan = make_plan(load_spec(project / "spec.yaml"), store.open(project / "selected"))
    assert plan.bound == "at most " and plan.teacher_calls == N_A + N_B
    assert plan.best_calls == N_A + N_B - (a_rows - cap)  # every answer in band: a asks its cap, no more

    ordered = run(project, "selected")
    assert ordered.teacher_calls < everything.teacher_calls
    assert ordered.teacher_calls >= plan.best_calls  # the estimate is a floor: answers outside the band cost more
    all_rows = store.open(project / "all").read("ordered@1", "examples")
    sel_rows = store.open(project / "selected").read("ordered@1", "examples")
    # The same quotas: a keeps its cap, b (no cap) every train and val row; the test split is asked in full.
    assert train_val_counts(sel_rows) == train_val_counts(all_rows) == {"a": cap, "b": train_val_counts(all_rows)["b"]}
    assert (set(sel_rows.filter(pl.col("split") == "test")["prompt_id"])
            == set(all_rows.filter(pl.col("split") == "test")["prompt_id"]))
    lo = load_spec(project / "spec.yaml").mining.band[0]
    assert (sel_rows.filter(pl.col("split") != "test")["conf_mean_token_prob"] >= lo).all()  # the band holds

    stats = ordered.stage_stats["teach"]
    assert stats["order"] == "selection" and stats["rounds"] >= 2  # answers below the band asked for more
    assert stats["quotas"]["a"]["in_band"] >= cap and stats["quotas"]["a"]["taught"] < a_rows
    # Nothing disappears: every row never asked is a rejection saying why.
    rejected = store.open(project / "selected").read("ordered@1", "rejections")
    not_taught = rejected.filter(pl.col("reason").str.starts_with("not taught: category 'a' quota"))
    assert not_taught.height == N_A + N_B - ordered.teacher_calls == stats["not_taught"]
    assert (not_taught["stage"] == "teach").all() and (not_taught["category"] == "a").all()
    assert "(teach.order: selection)" in not_taught["reason"][0]
    # The clusters are drawn before teaching (over a's and b's rows): a's rows asked come from each of its clusters.
    assert sel_rows.filter(pl.col("category") == "a")["cluster"].n_unique() >= 2

    again = run(project, "selected")
    assert again.teacher_calls == 0 and not again.created
    assert make_plan(load_spec(project / "spec.yaml"), store.open(project / "selected")).teacher_calls == 0


def test_an_interrupted_ordered_run_pays_nothing_twice(project, monkeypatch):
    capped_spec(project)
    edit(project, **{"teach.order": "selection"})
    whole = run(project, "whole").teacher_calls
    restore = interrupt_teacher_at(monkeypatch, 4)
    with pytest.raises(Interrupted):
        run(project, "resumed")
    restore()
    resumed = run(project, "resumed")
    assert resumed.teacher_calls == whole - 3 * 4  # three answered batches of 4 were cached
    same = [store.open(project / s).read("ordered@1", "examples").sort("prompt_id")["prompt_id"].to_list()
            for s in ("whole", "resumed")]
    assert same[0] == same[1]


def test_selection_order_needs_coverage_and_draws_clusters_before_teaching(project):
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    assert [s.name for s in stages_for(load_spec(project / "spec.yaml"))][-5:] == [
        "teach", "confidence", "mine", "diversity", "select"]  # order: all, today's pipeline
    spec["teach"] = {"order": "selection"}
    assert [s.name for s in stages_for(parse_spec(spec))][-6:] == [
        "split", "diversity", "teach", "confidence", "mine", "select"]
    with pytest.raises(SpecError, match="teach.order: selection .* needs coverage"):
        parse_spec({k: v for k, v in spec.items() if k != "coverage"})
    with pytest.raises(SpecError, match="teach.order: Input should be 'all' or 'selection'"):
        parse_spec({**spec, "teach": {"order": "quota"}})


def test_plan_under_order_all_says_what_selection_would_save(project):
    from engine.stages.base import prompt_id
    from engine.stages.split import assign_split

    edit(project, **{"coverage.categories.a": {"max": 10}})
    spec = load_spec(project / "spec.yaml")
    plan = make_plan(spec, store.open(project / "store"))
    assert plan.order == "all" and plan.bound == "" and plan.teacher_calls == N_A + N_B
    a_train_val = sum(assign_split(prompt_id(f"Question number {i}: is {i} an even number?"), spec.splits) != "test"
                      for i in range(N_A))
    assert plan.best_calls == N_A + N_B - (a_train_val - 10)


def test_rows_are_ordered_as_selection_keeps_them():
    """Test rows and uncapped categories in full, unknown categories never, capped ones in round robin order."""
    from engine.stages.select import round_robin
    from engine.stages.teach_order import in_selection_order

    ids = [f"r{i}" for i in range(12)]
    frame = pl.DataFrame({
        "prompt_id": ids,
        "category": ["a"] * 7 + ["b", "b", "zzz", None, "a"],
        "split": ["train"] * 6 + ["val", "train", "test", "train", "train", "test"],
        "cluster": pl.Series([0, 1, 1, 0, 2, 2, 1, 0, 0, 1, 1, 2], dtype=pl.Int32),
    })
    spec = parse_spec({"name": "x", "teacher": {"model": "m"}, "sources": [{"inline": ["q"]}],
                       "coverage": {"categories": {"a": {"max": 3}, "b": {}}},
                       "diversity": {"seed": 4}, "teach": {"order": "selection"}})
    always, queues, keeps, unknown = in_selection_order(frame, spec)
    assert always == [7, 8, 11] and keeps == {"a": 3}  # b's rows and every test row (a's r11 too)
    a_rows = list(range(7))
    expected = round_robin([ids[r] for r in a_rows], [frame["cluster"][r] for r in a_rows], 7, 4)
    assert queues == {"a": [a_rows[p] for p in expected]}
    assert [r for r, _ in unknown] == [9, 10]
    assert unknown[0][1] == ("not taught: category 'zzz' is not in coverage.categories, so selection would drop it "
                             "(teach.order: selection)")
    assert unknown[1][1].startswith("not taught: no category")


def test_plan_command_prints_the_calls_selection_saves(project):
    from typer.testing import CliRunner

    from engine.cli import app

    edit(project, **{"coverage.categories.a": {"max": 10}})
    said = CliRunner().invoke(app, ["plan", "spec.yaml", "--store", "store"])
    text = " ".join(said.output.split())  # however the console wrapped it
    assert said.exit_code == 0, said.output
    assert "teach.order: selection would pay" in text and "(an estimate)" in text
    edit(project, **{"teach.order": "selection"})
    said = CliRunner().invoke(app, ["plan", "spec.yaml", "--store", "store"])
    text = " ".join(said.output.split())
    assert f"teacher calls to pay: at most {N_A + N_B} of {N_A + N_B} prompts" in text
    assert "calls if every answer is in band" in text
