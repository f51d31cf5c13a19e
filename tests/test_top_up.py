"""augment_until_quota on a tiny random teacher: short categories get new variations."""

import polars as pl
import pytest
import yaml

import store
from engine.curate import pipeline
from engine.spec import load_spec
from engine.stages.base import prompt_id

ROOT = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.fixture
def project(tmp_path, tiny_llm_dir, monkeypatch):
    rows = [{"q": f"Tell me about apples, fact {i}.", "c": "a"} for i in range(6)]
    rows += [{"q": f"Tell me about boats, story {i}.", "c": "b"} for i in range(2)]
    (tmp_path / "p.jsonl").write_text("\n".join(__import__("json").dumps(r) for r in rows) + "\n")
    spec = {
        "name": "quota",
        "teacher": {"model": str(tiny_llm_dir), "generation": {"max_new_tokens": 4}, "batch_size": 4},
        "sources": [{"path": "p.jsonl", "text": "q", "category": "c"}],
        "coverage": {"total": 12, "categories": {"a": {"share": 0.5}, "b": {"share": 0.5}},
                     "augment_until_quota": True, "augment_cap": 4},
        "augment": [{"template": str(ROOT / "templates/rephrase.j2"), "categories": ["b"], "sample": 1, "seed": 3,
                     "vars": {"style": ["briefly", "formally", "casually", "plainly", "kindly", "sternly"]}}],
    }
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_short_category_is_topped_up_to_its_quota(project):
    spec = load_spec(project / "spec.yaml")
    result = pipeline.run(spec, store.open(project / "store"), progress=False)
    examples = store.open(project / "store").read("quota@1", "examples")
    counts = dict(examples.group_by("category").len().iter_rows())
    assert counts == {"a": 6, "b": 6}
    b = examples.filter(pl.col("category") == "b")
    assert (b["origin"] == "template").sum() >= 4  # the 2 originals alone could never fill 6
    assert b["prompt_id"].n_unique() == 6
    originals = {prompt_id(f"Tell me about boats, story {i}.") for i in range(2)}
    assert set(b.filter(pl.col("origin") == "template")["parent_id"]) <= originals
    top = result.stage_stats["top_up"]
    assert top["rounds"] == 1 and top["still_short"] == {}
    # each original has at most augment_cap variations, across rounds
    assert b.filter(pl.col("origin") == "template").group_by("parent_id").len()["len"].max() <= 4


def test_without_top_up_the_shortfall_is_reported(project):
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec["coverage"]["augment_until_quota"] = False
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    result = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    short = result.stage_stats["select"]["shortfall"]
    assert short["b"]["short_by"] == 2 and "too few from sources" in short["b"]["why"]
    assert result.rows == 10


def test_changing_a_quota_reruns_only_selection(project):
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec["coverage"]["augment_until_quota"] = False
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    spec["coverage"]["categories"]["a"] = {"max": 3}
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    again = pipeline.run(load_spec(project / "spec.yaml"), store.open(project / "store"), progress=False)
    ran = [name for name, stats in again.stage_stats.items() if not stats.get("from_stage_cache")]
    assert ran == ["mine", "select"] and again.teacher_calls == 0
    assert again.rows == 3 + 4


def test_top_up_dedups_new_variations_against_every_kept_row(project):
    """With semantic dedup, a top-up variation too close to a kept row is dropped and recorded; kept rows stay."""
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec["dedup"] = {"exact": True, "semantic": {"threshold": 0.9}}
    spec["augment"][0]["categories"] = ["a", "b"]
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    spec = load_spec(project / "spec.yaml")
    st = store.open(project / "store")
    first_pass, first_rejected, _, _ = pipeline.curate(spec.model_copy(update={"coverage": spec.coverage.model_copy(
        update={"augment_until_quota": False})}), st, progress=False)
    result = pipeline.run(spec, st, progress=False)
    v = st.version("quota@1")
    examples, rejected = v.to_polars("examples"), v.to_polars("rejections")
    assert result.stage_stats["top_up"]["rounds"] >= 1
    assert set(first_pass["prompt_id"]) <= set(examples["prompt_id"])  # top-up never drops a row kept before it
    dropped = rejected.filter(pl.col("stage") == "dedup")
    made_by_top_up = dropped.filter(~pl.col("prompt_id").is_in(first_rejected["prompt_id"].implode())
                                    & (pl.col("parent_id") != pl.col("prompt_id")))
    assert made_by_top_up.height > 0 and (made_by_top_up["similarity"] >= 0.9).all()
    assert set(made_by_top_up["neighbor_id"]) <= set(examples["prompt_id"]) | set(dropped["prompt_id"])


def test_plan_counts_are_lower_bounds_when_top_up_may_ask_more(project):
    from engine.curate.plan import make_plan

    st = store.open(project / "store")
    before = make_plan(load_spec(project / "spec.yaml"), st)
    assert before.top_up and before.bound == "at least " and before.teacher_calls == 8 + 2  # originals + b's variations
    pipeline.run(load_spec(project / "spec.yaml"), st, progress=False)
    after = make_plan(load_spec(project / "spec.yaml"), st)
    assert after.teacher_calls == 0 and after.bound == "at least "
