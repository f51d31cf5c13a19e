"""Stages on small frames, with exact expected outcomes."""

import math

import numpy as np
import polars as pl
import pytest

from engine.teachers.answers import normalise_answer, split_answer
from engine.spec import Mining, Splits
from engine.stages.base import RunContext, prompt_id
from engine.stages.confidence import row_measures
from engine.stages.mine import Mine
from engine.stages.split import Split


class FakeSpec:
    def __init__(self, **parts):
        self.__dict__.update(parts)


def ctx(**parts) -> RunContext:
    return RunContext(spec=FakeSpec(**parts), cache_dir=None, progress=False)


# --- mining ----------------------------------------------------------------------

def frame_with_scores(scores):
    ids = [prompt_id(f"p{i}") for i in range(len(scores))]
    return pl.DataFrame({"prompt_id": ids, "parent_id": ids, "prompt": [f"p{i}" for i in range(len(scores))],
                         "conf_mean_token_prob": scores}, schema_overrides={"conf_mean_token_prob": pl.Float64})


def test_mining_keeps_band_plus_exact_seeded_share():
    scores = [i / 100 for i in range(100)]  # 0.00 .. 0.99
    frame = frame_with_scores(scores)
    mine = Mining(confidence="mean_token_prob", band=(0.6, 0.85), outside_band_keep=0.1, seed=3)
    kept, rejected, stats = Mine().run(frame, ctx(mining=mine))
    in_band = {pid for pid, s in zip(frame["prompt_id"], scores) if 0.6 <= s <= 0.85}
    assert len(in_band) == 26
    assert in_band <= set(kept["prompt_id"])
    assert kept.height == 26 + round(0.1 * 74)
    assert rejected.height == 100 - kept.height
    assert set(kept["prompt_id"]).isdisjoint(rejected["prompt_id"])
    assert (rejected["stage"] == "mine").all()
    assert rejected["reason"][0].startswith("conf_mean_token_prob ") and "outside band [0.6, 0.85]" in rejected["reason"][0]
    again, _, _ = Mine().run(frame.reverse(), ctx(mining=mine))
    assert again["prompt_id"].to_list() == kept["prompt_id"].to_list()  # seeded, order-free
    other, _, _ = Mine().run(frame, ctx(mining=mine.model_copy(update={"seed": 4})))
    assert set(other["prompt_id"]) != set(kept["prompt_id"])


def test_mining_rejects_missing_scores():
    frame = frame_with_scores([0.7, None])
    kept, rejected, _ = Mine().run(frame, ctx(mining=Mining(band=(0.5, 1.0))))
    assert kept.height == 1 and rejected["reason"].to_list() == ["conf_mean_token_prob missing"]


# --- splits ----------------------------------------------------------------------

def test_splits_are_deterministic_and_follow_shares():
    frame = frame_with_scores([0.5] * 2000)
    splits = Splits(train=0.8, val=0.1, test=0.1, seed=1)
    first, _, stats = Split().run(frame, ctx(splits=splits))
    second, _, _ = Split().run(frame.reverse(), ctx(splits=splits))
    assert dict(zip(first["prompt_id"], first["split"])) == dict(zip(second["prompt_id"], second["split"]))
    assert abs(stats["train"] / 2000 - 0.8) < 0.04 and stats["val"] > 100 and stats["test"] > 100


def test_splits_group_by_parent():
    frame = pl.DataFrame({"prompt_id": [f"c{i}" for i in range(50)], "parent_id": ["p"] * 25 + ["q"] * 25})
    out, _, _ = Split().run(frame, ctx(splits=Splits(group_by="parent_id")))
    assert out.group_by("parent_id").agg(pl.col("split").n_unique())["split"].to_list() == [1, 1]


# --- confidence and answers --------------------------------------------------------

def test_confidence_measures():
    token_lp = np.log(np.array([0.9, 0.5, 0.8], dtype=np.float32))
    top = np.log(np.array([[0.9, 0.05], [0.5, 0.3], [0.8, 0.1]], dtype=np.float32))
    m = row_measures(token_lp, top, answer_from=1, eos_last=True)
    assert m["conf_mean_token_prob"] == pytest.approx((0.9 + 0.5 + 0.8) / 3, rel=1e-5)
    assert m["conf_min_token_prob"] == pytest.approx(0.5, rel=1e-5)
    assert m["conf_answer_prob"] == pytest.approx(0.5, rel=1e-5)  # token 1 only: eos excluded
    assert m["conf_margin"] == pytest.approx((0.85 + 0.2 + 0.7) / 3, rel=1e-5)
    first = -(0.9 * math.log(0.9) + 0.05 * math.log(0.05) + 0.05 * math.log(0.05))
    assert m["conf_entropy"] > 0 and m["conf_entropy"] == pytest.approx(
        (first + -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 0.2 * math.log(0.2))
         + -(0.8 * math.log(0.8) + 0.1 * math.log(0.1) + 0.1 * math.log(0.1))) / 3, rel=1e-4)


def test_answers_split_and_normalise():
    assert split_answer("Let me think. Answer: Paris.", "Answer:") == ("Let me think.", "Paris.")
    assert split_answer("Paris", "Answer:") == ("Paris", None)  # the marker is missing: no answer, never a guess
    assert split_answer("Paris", None) == ("", "Paris")  # no marker asked for: the whole response
    labels = {"positive", "negative"}
    assert normalise_answer("The sentiment of this review is Positive.", labels) == "positive"
    assert normalise_answer("positive or negative", labels) == "positive or negative"
    assert normalise_answer("Nonnegative!", labels) == "nonnegative"


def test_selection_and_splits_draw_independently():
    """Keeping the rows with the smallest selection draws must not skew the splits."""
    from engine.spec import Coverage, Diversity
    from engine.stages.select import Select

    ids = [prompt_id(f"p{i}") for i in range(4000)]
    frame = pl.DataFrame({"prompt_id": ids, "parent_id": ids, "category": ["x"] * 4000, "cluster": [0] * 4000})
    coverage = Coverage(categories={"x": {"max": 1000}})
    kept, _, _ = Select().run(frame, ctx(coverage=coverage, diversity=Diversity(seed=7)))
    split, _, stats = Split().run(kept, ctx(splits=Splits(train=0.7, val=0.1, test=0.2, seed=7)))
    assert kept.height == 1000
    assert abs(stats["train"] / 1000 - 0.7) < 0.05 and abs(stats["test"] / 1000 - 0.2) < 0.04


# --- the test split: drawn before the teacher, passed through by mining and selection ---------

def test_split_runs_before_the_teacher_and_any_confidence_decision():
    from engine.stages import all_stages

    order = [cls.name for cls in all_stages()]
    assert order.index("dedup") < order.index("split") < order.index("teach") < order.index("mine")
    assert order.index("split") < order.index("select")


def test_mining_passes_test_rows_through_whatever_their_confidence():
    frame = frame_with_scores([i / 20 for i in range(20)]).with_columns(
        split=pl.Series(["test" if i % 4 == 0 else "train" for i in range(20)]))
    mine = Mining(confidence="mean_token_prob", band=(0.9, 1.0), outside_band_keep=0.0)
    kept, rejected, stats = Mine().run(frame, ctx(mining=mine))
    test_ids = set(frame.filter(pl.col("split") == "test")["prompt_id"])
    assert test_ids <= set(kept["prompt_id"]) and not test_ids & set(rejected["prompt_id"])
    assert set(kept.filter(pl.col("split") == "train")["conf_mean_token_prob"]) == {0.9, 0.95}  # the band, on train
    assert stats["test_untouched"] == 5 and stats["rows"] == 15 and stats["in_band"] == 2


def test_selection_counts_quotas_on_train_and_val_and_keeps_every_test_row():
    from engine.spec import Coverage
    from engine.stages.select import Select

    ids = [prompt_id(f"p{i}") for i in range(30)]
    frame = pl.DataFrame({"prompt_id": ids, "parent_id": ids, "category": ["x"] * 30, "cluster": [0] * 30,
                          "split": ["test" if i < 10 else "train" for i in range(30)]})
    kept, rejected, stats = Select().run(frame, ctx(coverage=Coverage(categories={"x": {"max": 4}}), diversity=None))
    assert kept.filter(pl.col("split") == "train").height == 4
    assert kept.filter(pl.col("split") == "test")["prompt_id"].to_list() == ids[:10]
    assert rejected.height == 16 and not set(rejected["prompt_id"]) & set(ids[:10])
    assert (stats["kept"], stats["test_untouched"], stats["over_quota"]) == (4, 10, 16)
    short, _, stats = Select().run(frame, ctx(coverage=Coverage(categories={"x": {"min": 25}}), diversity=None))
    assert stats["shortfall"]["x"]["have"] == 20  # test rows do not fill a quota


def test_top_up_rows_in_the_test_split_are_kept_out():
    ids = [prompt_id(f"v{i}") for i in range(40)]
    batch = pl.DataFrame({"prompt_id": ids, "parent_id": ids})
    splits = Splits(train=0.5, val=0.2, test=0.3, group_by="prompt_id", seed=2)
    kept, rejected, _ = Split().run_new_rows(batch, batch.clear(), ctx(splits=splits))
    assert rejected.height > 0 and set(kept["split"]) <= {"train", "val"}
    assert kept.height + rejected.height == 40 and (rejected["stage"] == "split").all()
    assert all(assign == "test" for assign in (Split().run(batch, ctx(splits=splits))[0]
                                               .filter(pl.col("prompt_id").is_in(rejected["prompt_id"].implode()))["split"]))


def test_splits_group_by_parent_id_by_default():
    assert Splits().group_by == "parent_id"
