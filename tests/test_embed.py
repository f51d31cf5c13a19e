"""Embeddings: the real bundled embedder (loaded once for the module), the per-text cache, the stage."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

import engine.embedder as embed_module
from engine.embedder import embed_texts, load_embedder
from engine.models import locate
from engine.spec import Embed as EmbedSpec
from engine.stages.base import RunContext
from engine.stages.embed import Embed, embedding_matrix

SPEC = EmbedSpec()


@pytest.fixture(scope="module", autouse=True)
def embedder():
    return load_embedder(SPEC.model)  # ~2 s once; every test below reuses it


class FakeSpec:
    embed = SPEC


def ctx(tmp_path) -> RunContext:
    return RunContext(spec=FakeSpec(), cache_dir=tmp_path, progress=False)


def test_vectors_are_normalised_float32_in_input_order(tmp_path):
    texts = ["Is the sky blue?", "Do cats bark?", "Is the sky blue?"]
    counters = {}
    vectors = embed_texts(texts, SPEC, tmp_path, progress=False, counters=counters)
    assert vectors.shape == (3, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert counters["embedded"] == 2  # the repeated text is embedded once
    np.testing.assert_array_equal(vectors[0], vectors[2])
    assert vectors[0] @ vectors[1] < 0.9


def test_second_call_embeds_nothing_and_returns_identical_vectors(tmp_path, monkeypatch):
    texts = ["What is the capital of France?", "How many legs does a spider have?"]
    counters = {}
    first = embed_texts(texts, SPEC, tmp_path, progress=False, counters=counters)
    # Everything is cached now: the model must not even be asked for.
    monkeypatch.setattr(embed_module, "load_embedder", lambda name: pytest.fail("model loaded for cached texts"))
    second = embed_texts(texts, SPEC, tmp_path, progress=False, counters=counters)
    assert counters["embedded"] == 2
    np.testing.assert_array_equal(first, second)
    assert (tmp_path / "embeddings.sqlite").is_file()


def test_only_new_texts_are_embedded(tmp_path):
    counters = {}
    embed_texts(["one text", "two text"], SPEC, tmp_path, progress=False, counters=counters)
    embed_texts(["two text", "three text", "one text"], SPEC, tmp_path, progress=False, counters=counters)
    assert counters["embedded"] == 3


def test_empty_input_keeps_the_width(tmp_path):
    assert embed_texts([], SPEC, tmp_path, progress=False).shape == (0, 384)


def test_a_local_folder_works_like_the_alias(tmp_path):
    folder = str(locate(SPEC.model))
    by_alias = embed_texts(["Is water wet?"], SPEC, tmp_path, progress=False)
    by_folder = embed_texts(["Is water wet?"], EmbedSpec(model=folder, batch_size=4), tmp_path, progress=False)
    np.testing.assert_allclose(by_alias, by_folder, atol=1e-5)


@pytest.mark.parametrize("a, b", [
    ("What is the capital of France?", "Which city is France's capital?"),
    ("How do I reset my password?", "What are the steps to change my password?"),
])
def test_paraphrases_are_close(tmp_path, a, b):
    u, v = embed_texts([a, b], SPEC, tmp_path, progress=False)
    assert u @ v > 0.8


@pytest.mark.parametrize("a, b", [
    ("How do I reset my password?", "The cat slept on the warm windowsill."),
    ("What is the capital of France?", "This blender is too loud to use in the morning."),
])
def test_unrelated_sentences_are_far(tmp_path, a, b):
    u, v = embed_texts([a, b], SPEC, tmp_path, progress=False)
    assert u @ v < 0.5


def test_stage_adds_a_fixed_size_embedding_column(tmp_path):
    frame = pl.DataFrame({"prompt_id": ["p0", "p1"], "prompt": ["Is snow white?", "Is ice hot?"]})
    c = ctx(tmp_path)
    kept, rejected, stats = Embed().run(frame, c)
    assert kept.schema["embedding"] == pl.Array(pl.Float32, 384)
    assert kept.columns == ["prompt_id", "prompt", "embedding"] and rejected.height == 0
    assert stats == {"rows": 2, "embedded": 2, "cached": 0, "dim": 384}
    _, _, again = Embed().run(frame, c)
    assert again["embedded"] == 0 and again["cached"] == 2
    np.testing.assert_array_equal(embedding_matrix(kept, c), embed_texts(frame["prompt"].to_list(), SPEC, tmp_path))


def test_stage_on_an_empty_frame(tmp_path):
    frame = pl.DataFrame({"prompt_id": [], "prompt": []}, schema={"prompt_id": pl.String, "prompt": pl.String})
    kept, _, stats = Embed().run(frame, ctx(tmp_path))
    assert kept.height == 0 and kept.schema["embedding"] == pl.Array(pl.Float32, 384)
    assert embedding_matrix(kept, ctx(tmp_path)).shape == (0, 384)
