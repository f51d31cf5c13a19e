"""Dedup on small frames with hand-made embeddings (no model): exact expected outcomes."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

import engine.stages.dedup as dedup_module
import store as store_api
from engine.errors import StageError
from engine.spec import Dedup as DedupSpec
from engine.spec import Embed as EmbedSpec
from engine.spec import SemanticDedup
from engine.stages.base import REJECTION_SCHEMA, RunContext
from engine.stages.dedup import Dedup, dedup_text, greedy_keep, winner_order
from engine.stages.embed import with_embeddings


class FakeSpec:
    def __init__(self, dedup: DedupSpec):
        self.dedup, self.embed = dedup, EmbedSpec()


def at(degrees: float) -> list[float]:
    """A unit vector in the plane: cos(at(a), at(b)) = cos(a - b)."""
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def make_frame(rows: list[tuple[str, str, list[float]]]) -> pl.DataFrame:
    """Rows of (prompt, origin, vector); prompt_id p0, p1, ... in row order."""
    frame = pl.DataFrame({
        "prompt_id": [f"p{i}" for i in range(len(rows))],
        "origin": [origin for _, origin, _ in rows],
        "prompt": [prompt for prompt, _, _ in rows],
    })
    return with_embeddings(frame, np.array([v for _, _, v in rows], dtype=np.float32))


def run(frame: pl.DataFrame, *, exact=True, threshold: float | None = 0.92, against=None, store=None,
        exact_search_below=20000):
    semantic = SemanticDedup(threshold=threshold, exact_search_below=exact_search_below) if threshold else None
    ctx = RunContext(spec=FakeSpec(DedupSpec(exact=exact, semantic=semantic, against=against)),
                     cache_dir=None, progress=False, store=store)
    return Dedup().run(frame, ctx)


def dropped(rejected: pl.DataFrame) -> dict[str, tuple[str, float]]:
    return {r["prompt_id"]: (r["neighbor_id"], round(r["similarity"], 4)) for r in rejected.to_dicts()}


# --- normalisation and order ----------------------------------------------------

@pytest.mark.parametrize("text, key", [
    ("  What is   X?  ", "what is x"),
    ("WHAT IS X !", "what is x"),
    ("«Hello», she said.", "hello», she said"),  # only the ends are stripped
    ("ＡＢＣ", "abc"),  # NFKC folds full-width letters
    ("Straße", "strasse"),  # casefold, not lower
    ("2+2=4?", "2+2=4"),  # symbols are not punctuation
    ("e.g. this...", "e.g. this"),
    ("???", "???"),  # nothing but punctuation: kept as it is
])
def test_dedup_text(text, key):
    assert dedup_text(text) == key


def test_winner_order_puts_originals_first_then_row_order():
    frame = pl.DataFrame({"origin": ["template", "source", "teacher", "source", None]})
    assert winner_order(frame).tolist() == [1, 3, 4, 0, 2]
    assert winner_order(pl.DataFrame({"prompt": ["a", "b"]})).tolist() == [0, 1]


# --- exact ----------------------------------------------------------------------

def test_exact_duplicates_keep_the_first_original():
    frame = make_frame([
        ("what is x", "template", at(0)),  # an augmentation: loses though it comes first
        ("What is X?", "source", at(0)),
        ("  WHAT   is x!", "source", at(0)),
        ("Something else", "source", at(90)),
    ])
    kept, rejected, stats = run(frame, threshold=None)
    assert kept["prompt_id"].to_list() == ["p1", "p3"]
    assert dropped(rejected) == {"p0": ("p1", 1.0), "p2": ("p1", 1.0)}
    assert rejected["reason"].to_list() == ["exact duplicate of p1"] * 2
    assert set(rejected["stage"]) == {"dedup"}
    assert rejected.schema == pl.Schema(REJECTION_SCHEMA)
    assert stats == {"rows": 4, "kept": 2, "exact": 2, "semantic": 0, "against": 0, "index": "none"}


def test_nothing_to_drop_gives_an_empty_rejection_table():
    kept, rejected, stats = run(make_frame([("a", "source", at(0)), ("b", "source", at(90))]))
    assert kept.height == 2 and rejected.height == 0 and rejected.schema == pl.Schema(REJECTION_SCHEMA)
    assert "embedding" in kept.columns


# --- semantic -------------------------------------------------------------------

def test_augmentation_near_an_original_loses_even_when_first():
    frame = make_frame([
        ("rewrite of A", "template", at(10)),
        ("A", "source", at(0)),
        ("B", "source", at(80)),
    ])
    kept, rejected, stats = run(frame)
    assert kept["prompt_id"].to_list() == ["p1", "p2"]
    assert dropped(rejected) == {"p0": ("p1", round(math.cos(math.radians(10)), 4))}
    assert rejected["reason"][0] == "near-duplicate of p1 (cos 0.985 ≥ 0.92)"
    assert stats["semantic"] == 1 and stats["index"] == "exact"


def test_among_originals_the_first_in_source_order_wins():
    kept, rejected, _ = run(make_frame([("A", "source", at(5)), ("B", "source", at(0)), ("C", "source", at(10))]))
    assert kept["prompt_id"].to_list() == ["p0"]
    assert {k: v[0] for k, v in dropped(rejected).items()} == {"p1": "p0", "p2": "p0"}


def test_threshold_boundary_is_inclusive():
    t = np.float32(0.92)
    on = [float(t), math.sqrt(1 - float(t) ** 2)]  # cos to (1, 0) is exactly float32(0.92)
    below = [0.9199, math.sqrt(1 - 0.9199**2)]
    kept, rejected, _ = run(make_frame([("A", "source", [1.0, 0.0]), ("on", "source", on)]))
    assert kept["prompt_id"].to_list() == ["p0"] and dropped(rejected) == {"p1": ("p0", 0.92)}
    kept, rejected, _ = run(make_frame([("A", "source", [1.0, 0.0]), ("below", "source", below)]))
    assert kept["prompt_id"].to_list() == ["p0", "p1"] and rejected.height == 0


def test_chain_keeps_the_far_end():
    """A~B (cos .940), B~C (cos .940), A!~C (cos .766): B goes, and C stays, because the
    only row it is near (B) was not kept. Greedy over kept rows, not transitive clusters."""
    kept, rejected, _ = run(make_frame([("A", "source", at(0)), ("B", "source", at(20)), ("C", "source", at(40))]))
    assert kept["prompt_id"].to_list() == ["p0", "p2"]
    assert dropped(rejected) == {"p1": ("p0", round(math.cos(math.radians(20)), 4))}


def test_the_nearest_kept_row_is_named():
    frame = make_frame([("A", "source", at(0)), ("B", "source", at(24)), ("C", "source", at(14))])
    kept, rejected, _ = run(frame)  # A!~B (cos .914); C is near both: A (cos .970) and B (cos .985)
    assert kept["prompt_id"].to_list() == ["p0", "p1"]
    assert dropped(rejected) == {"p2": ("p1", round(math.cos(math.radians(10)), 4))}


def test_copies_follow_their_representative():
    frame = make_frame([
        ("A", "source", at(0)),
        ("b", "source", at(10)),  # near A
        ("B!", "source", at(10)),  # exact copy of b
    ])
    kept, rejected, stats = run(frame)
    assert kept["prompt_id"].to_list() == ["p0"]
    assert {k: v[0] for k, v in dropped(rejected).items()} == {"p1": "p0", "p2": "p0"}  # both name the kept row
    assert rejected.filter(pl.col("prompt_id") == "p2")["reason"][0] == \
        "exact duplicate of p1, a near-duplicate of p0 (cos 0.985)"
    assert (stats["exact"], stats["semantic"]) == (1, 1)


def test_without_exact_identical_texts_are_near_duplicates():
    kept, rejected, stats = run(make_frame([("A", "source", at(0)), ("A", "source", at(0))]), exact=False)
    assert kept["prompt_id"].to_list() == ["p0"] and dropped(rejected) == {"p1": ("p0", 1.0)}
    assert stats["semantic"] == 1 and stats["exact"] == 0


def test_semantic_needs_the_embedding_or_embeds_itself(monkeypatch):
    frame = make_frame([("A", "source", at(0)), ("B", "source", at(5))]).drop("embedding")
    vectors = {"A": at(0), "B": at(5)}
    monkeypatch.setattr("engine.stages.embed.embed_texts",
                        lambda texts, *a, **k: np.array([vectors[t] for t in texts], dtype=np.float32))
    kept, _, _ = run(frame)
    assert kept["prompt_id"].to_list() == ["p0"]


def test_a_non_array_embedding_column_is_an_error():
    frame = pl.DataFrame({"prompt_id": ["p0"], "prompt": ["A"], "embedding": [[1.0, 0.0]]})
    with pytest.raises(StageError, match="fixed-size float array"):
        run(frame)


# --- exact vs approximate index --------------------------------------------------

def clustered(n: int, dim: int = 48, seed: int = 0) -> np.ndarray:
    """Unit vectors around 30 topics, a quarter of them near-copies (cos ≈ .97-.995) of others."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((30, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    base = centers[rng.integers(0, 30, n - n // 4)] + rng.standard_normal((n - n // 4, dim)) / math.sqrt(dim)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    copies = base[rng.integers(0, len(base), n // 4)] + rng.standard_normal((n // 4, dim)) * rng.uniform(0.01, 0.03, (n // 4, 1))
    x = np.concatenate([base, copies])[rng.permutation(n)]
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_approximate_index_agrees_with_exact_search():
    vectors = clustered(4000)
    kept_e, near_e, sims_e, kind_e = greedy_keep(vectors, 0.95, exact_search_below=10**9)
    kept_a, near_a, sims_a, kind_a = greedy_keep(vectors, 0.95, exact_search_below=1)
    assert (kind_e, kind_a) == ("exact", "ivf")
    assert 500 < (~kept_e).sum() < 1500  # the planted copies, and some within-topic neighbours
    np.testing.assert_array_equal(kept_e, kept_a)
    np.testing.assert_array_equal(near_e, near_a)
    np.testing.assert_allclose(sims_e, sims_a, atol=1e-6)


def test_stage_reports_the_index_it_used():
    rows = [(f"t{i}", "source", v.tolist()) for i, v in enumerate(clustered(200))]
    exact = run(make_frame(rows), threshold=0.95)
    approx = run(make_frame(rows), threshold=0.95, exact_search_below=100)
    assert (exact[2]["index"], approx[2]["index"]) == ("exact", "ivf")
    assert exact[0]["prompt_id"].to_list() == approx[0]["prompt_id"].to_list()


# --- against an earlier version ---------------------------------------------------

class FakeStore:
    """The two calls dedup.against makes of a store.Store: resolve(ref).ref and read(ref, table, columns)."""

    def __init__(self, versions: dict[str, pl.DataFrame]):
        self.versions = versions

    def resolve(self, ref: str):
        ref = ref.replace("@latest", "@1")
        if ref not in self.versions:
            raise store_api.StoreError(f"dataset 'demo' has no version {ref.split('@')[1]} (latest is 1)")
        return type("Info", (), {"ref": ref})()

    def read(self, ref: str, table: str, columns: list[str] | None = None) -> pl.DataFrame:
        assert table == "examples"
        return self.versions[ref].select(columns or pl.all())


@pytest.fixture
def old_store(monkeypatch):
    """demo@1 holds "Old question?" and "Far away"; embeddings come from a lookup table, not a model."""
    old = pl.DataFrame({"prompt_id": ["old0", "old1"], "prompt": ["Old question?", "Far away"],
                        "response": ["yes", "no"]})
    table = {"Old question?": at(0), "Far away": at(90)}
    monkeypatch.setattr(dedup_module, "embed_texts",
                        lambda texts, *a, **k: np.array([table[t] for t in texts], dtype=np.float32).reshape(-1, 2))
    return FakeStore({"demo@1": old})


def test_against_drops_what_an_earlier_version_has(old_store):
    frame = make_frame([
        ("old question", "source", at(45)),  # same text, modulo normalisation
        ("near the old one", "source", at(10)),  # cos .985 to old0
        ("new material", "source", at(180)),
        ("near new material", "source", at(185)),  # a within-frame near-duplicate
    ])
    kept, rejected, stats = run(frame, against="demo@latest", store=old_store)
    assert kept["prompt_id"].to_list() == ["p2"]
    assert dropped(rejected) == {"p0": ("old0", 1.0), "p1": ("old0", round(math.cos(math.radians(10)), 4)),
                                 "p3": ("p2", round(math.cos(math.radians(5)), 4))}
    assert rejected["reason"].to_list()[:2] == ["already in demo@1 (exact duplicate of old0)",
                                                "already in demo@1 (near-duplicate of old0, cos 0.985 ≥ 0.92)"]
    assert (stats["against"], stats["semantic"], stats["exact"]) == (2, 1, 0)


def test_against_without_semantic_still_drops_exact_copies(old_store):
    frame = make_frame([("FAR AWAY.", "source", at(0)), ("new", "source", at(0))])
    kept, rejected, stats = run(frame, threshold=None, against="demo@1", store=old_store)
    assert kept["prompt_id"].to_list() == ["p1"] and dropped(rejected) == {"p0": ("old1", 1.0)}


def test_against_an_unknown_version_is_a_stage_error(old_store):
    with pytest.raises(StageError, match="dedup.against"):
        run(make_frame([("a", "source", at(0))]), against="demo@7", store=old_store)


def test_an_empty_frame_passes_through():
    frame = make_frame([("A", "source", at(0))]).head(0)
    kept, rejected, stats = run(frame)
    assert kept.height == 0 and rejected.height == 0
    assert stats == {"rows": 0, "kept": 0, "exact": 0, "semantic": 0, "against": 0, "index": "exact"}
