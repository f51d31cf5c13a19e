"""Assign: categories by column, keyword rules and embedding, with exact expected outcomes."""

import numpy as np
import polars as pl
import pytest

from engine.spec import Coverage, Embed
from engine.stages import coverage as coverage_module
from engine.stages.base import REJECTION_SCHEMA, RunContext, prompt_id
from engine.stages.coverage import Assign, keyword_pattern
from engine.stages.sources import ROW_SCHEMA


class FakeSpec:
    def __init__(self, **parts):
        self.__dict__.update(parts)


def context(coverage: dict, tmp_path=None) -> RunContext:
    spec = FakeSpec(coverage=Coverage(**coverage), embed=Embed())
    return RunContext(spec=spec, cache_dir=tmp_path, progress=False)


def rows(prompts, categories=None) -> pl.DataFrame:
    categories = categories or [None] * len(prompts)
    ids = [prompt_id(p) for p in prompts]
    return pl.DataFrame({
        "prompt_id": ids, "parent_id": ids, "source": ["t"] * len(prompts), "category": categories,
        "template_id": [None] * len(prompts), "origin": ["source"] * len(prompts), "prompt": prompts,
        "label": [None] * len(prompts),
    }, schema=ROW_SCHEMA)


# --- by column -------------------------------------------------------------------

def test_column_keeps_known_categories_and_rejects_the_rest():
    frame = rows(["a", "b", "c", "d"], ["toys", "food", None, "toys"])
    cov = {"categories": {"toys": {}, "books": {}}}
    kept, rejected, stats = Assign().run(frame, context(cov))
    assert kept["prompt"].to_list() == ["a", "d"]
    assert kept["category"].to_list() == ["toys", "toys"]
    assert rejected.schema == pl.Schema(REJECTION_SCHEMA)
    assert rejected["stage"].to_list() == ["assign", "assign"]
    assert rejected["category"].to_list() == ["food", None]  # the row's own value, to see what missed
    assert rejected["reason"].to_list() == [
        "uncategorised: category 'food' is not in coverage.categories",
        "uncategorised: no category",
    ]
    assert stats == {"by": "column", "rows": 4, "categories": {"toys": 2, "books": 0}, "uncategorised": 2}


# --- by keywords -----------------------------------------------------------------

KEYWORD_COVERAGE = {
    "assign": "keywords",
    "categories": {
        "tech": {"keywords": ["battery", "screen", "usb cable"]},
        "food": {"keywords": ["taste", "battery"]},  # "battery" ties with tech: spec order wins
        "misc": {},
    },
}


@pytest.mark.parametrize("prompt, expected", [
    ("The BATTERY died.", "tech"),  # case-insensitive; tie tech 1 / food 1 -> earlier category
    ("Bad taste, worse aftertaste, awful taste.", "food"),  # whole words: 'aftertaste' is no hit -> food 2
    ("The battery and screen are fine but the taste, the taste!", "food"),  # tech 2 hits, food 3
    ("A new USB\n  cable", "tech"),  # a phrase matches across any whitespace
    ("Screens and batteries", None),  # plural forms are other words
    ("usb", None),  # half a phrase is no hit
])
def test_keyword_rules(prompt, expected):
    kept, rejected, _ = Assign().run(rows([prompt]), context(KEYWORD_COVERAGE))
    got = kept["category"].to_list()[0] if kept.height else None
    assert got == expected
    if expected is None:
        assert rejected["reason"].to_list() == ["uncategorised: no keyword of any category occurs"]


def test_keyword_stats_and_overwrite_of_source_category():
    frame = rows(["screen glare", "tastes odd", "great taste"], ["food", "tech", None])
    kept, rejected, stats = Assign().run(frame, context(KEYWORD_COVERAGE))
    assert kept["category"].to_list() == ["tech", "food"]
    assert rejected["prompt"].to_list() == ["tastes odd"]
    assert stats["categories"] == {"tech": 1, "food": 1, "misc": 0}
    assert stats["uncategorised"] == 1


def test_keyword_pattern_escapes_regex_characters():
    assert keyword_pattern("c++").search("I write C++ daily")
    assert not keyword_pattern("a.b").search("axb")


# --- by embedding ----------------------------------------------------------------

EMBED_COVERAGE = {
    "assign": "embedding",
    "similarity_floor": 0.2,
    "categories": {"factual": {"describe": "facts"}, "maths": {"describe": "numbers"}},
}

# Unit vectors in 3-d: descriptions on the axes, prompts at chosen angles.
FAKE_VECTORS = {
    "facts": [1, 0, 0],
    "numbers": [0, 1, 0],
    "Who wrote Hamlet?": [0.9, 0.1, 0.42],
    "What is 2+2?": [0.3, 0.95, 0.1],
    "Hello there": [0.12, 0.05, 0.99],
    "Tie": [0.6, 0.6, 0.52],
}


def fake_embed(calls):
    def embed(texts, embed_spec, cache_dir, *, progress=True, counters=None):
        calls.append(list(texts))
        vectors = np.array([FAKE_VECTORS[t] for t in texts], dtype=np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    return embed


def test_embedding_nearest_description_and_floor(monkeypatch):
    calls = []
    monkeypatch.setattr(coverage_module, "embed_texts", fake_embed(calls))
    frame = rows(["Who wrote Hamlet?", "What is 2+2?", "Hello there", "Tie"])
    kept, rejected, stats = Assign().run(frame, context(EMBED_COVERAGE))
    assert calls == [["facts", "numbers", "Who wrote Hamlet?", "What is 2+2?", "Hello there", "Tie"]]
    assert list(zip(kept["prompt"], kept["category"])) == [
        ("Who wrote Hamlet?", "factual"), ("What is 2+2?", "maths"), ("Tie", "factual")]  # a tie: spec order
    cos = 0.12 / np.linalg.norm(FAKE_VECTORS["Hello there"])
    assert rejected["reason"].to_list() == [f"uncategorised: nearest 'factual' at cos {cos:.2f} < floor 0.20"]
    assert rejected["reason"][0] == "uncategorised: nearest 'factual' at cos 0.12 < floor 0.20"
    assert stats == {"by": "embedding", "rows": 4, "categories": {"factual": 2, "maths": 1}, "uncategorised": 1}


def test_embedding_just_above_the_floor_is_kept(monkeypatch):
    monkeypatch.setattr(coverage_module, "embed_texts", fake_embed([]))
    cos = 0.12 / np.linalg.norm(FAKE_VECTORS["Hello there"])
    cov = dict(EMBED_COVERAGE, similarity_floor=float(np.float32(cos)) - 1e-6)
    kept, rejected, _ = Assign().run(rows(["Hello there"]), context(cov))
    assert kept["category"].to_list() == ["factual"] and rejected.height == 0
