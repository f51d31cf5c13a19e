"""Our embedding code (engine/embedder.py, the embed stage): the per-text cache, order, duplicates.

The model itself is a stand-in: a deterministic function of (model, text), so every test knows
the exact vector each text must get and which texts went through the model. One test loads the
real bundled embedder, to check that the alias resolves and loads once per process.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import polars as pl
import pytest

import engine.embedder as embed_module
from engine.embedder import embed_texts, load_embedder
from engine.models import fingerprint, locate
from engine.spec import Embed as EmbedSpec
from engine.stages.base import RunContext
from engine.stages.embed import Embed, embedding_matrix

DIM = 8
TEXTS = ["Is the sky blue?", "Why do cats purr when they are content and warm?", "2+2=", "Is water wet?"]


def expected(salt: str, text: str) -> np.ndarray:
    """The stand-in model's unit vector for a text."""
    seed = int.from_bytes(hashlib.sha256(f"{salt}\0{text}".encode()).digest()[:8], "little")
    v = np.random.default_rng(seed).normal(size=DIM).astype(np.float32)
    return v / np.linalg.norm(v)


class FakeEmbedder:
    """Speaks the part of SentenceTransformer that engine.embedder uses, and records what it encoded."""

    def __init__(self, salt: str):
        self.salt = salt
        self.calls: list[list[str]] = []
        self.fail_on_call: int | None = None

    def get_sentence_embedding_dimension(self) -> int:
        return DIM

    def encode(self, texts, batch_size, normalize_embeddings, convert_to_numpy, show_progress_bar):
        if self.fail_on_call == len(self.calls):
            raise KeyboardInterrupt
        self.calls.append(list(texts))
        out = np.stack([expected(self.salt, t) for t in texts])
        return out if normalize_embeddings else out * 3.0  # unnormalised unless asked

    @property
    def encoded(self) -> list[str]:
        return [t for call in self.calls for t in call]


@pytest.fixture
def models(tmp_path, monkeypatch):
    """Two local embedder folders ("a", "b") and their stand-in models; `loads` lists each model load."""
    folders, fakes = {}, {}
    for name in ("a", "b"):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(f'{{"name": "{name}"}}')
        folders[name], fakes[name] = folder, FakeEmbedder(salt=name)
    loads: list[str] = []

    def fake_load(model_name: str):
        loads.append(model_name)
        return fakes[Path(model_name).name]

    monkeypatch.setattr(embed_module, "load_embedder", fake_load)
    return {"folders": folders, "fakes": fakes, "loads": loads,
            "spec": {n: EmbedSpec(model=str(f), batch_size=2) for n, f in folders.items()}}


def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


def test_vectors_are_the_models_in_input_order(tmp_path, models):
    counters = {}
    vectors = embed_texts(TEXTS, models["spec"]["a"], cache_dir(tmp_path), progress=False, counters=counters)
    assert vectors.shape == (len(TEXTS), DIM) and vectors.dtype == np.float32
    # The model sees the texts longest first (less padding); the result is in input order anyway.
    assert models["fakes"]["a"].encoded == sorted(TEXTS, key=len, reverse=True)
    for row, text in zip(vectors, TEXTS):
        np.testing.assert_array_equal(row, expected("a", text))
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-6)  # it asked for normalised vectors
    assert counters == {"embedded": len(TEXTS)}
    assert (cache_dir(tmp_path) / "embeddings.sqlite").is_file()


def test_a_second_call_embeds_nothing_loads_no_model_and_returns_the_same(tmp_path, models):
    spec = models["spec"]["a"]
    first = embed_texts(TEXTS, spec, cache_dir(tmp_path), progress=False)
    assert models["loads"] == [spec.model]
    counters = {}
    again = embed_texts(list(reversed(TEXTS)), spec, cache_dir(tmp_path), progress=False, counters=counters)
    assert models["loads"] == [spec.model]  # not loaded again: every text was cached
    assert counters == {"embedded": 0} and len(models["fakes"]["a"].calls) == 1
    np.testing.assert_array_equal(again, first[::-1])  # cached vectors, bit for bit, in the new order


def test_only_texts_missing_from_the_cache_are_embedded(tmp_path, models):
    spec = models["spec"]["a"]
    embed_texts(TEXTS[:2], spec, cache_dir(tmp_path), progress=False)
    counters = {}
    mixed = [TEXTS[3], TEXTS[0], TEXTS[2], TEXTS[1]]
    vectors = embed_texts(mixed, spec, cache_dir(tmp_path), progress=False, counters=counters)
    assert counters == {"embedded": 2}
    assert sorted(models["fakes"]["a"].calls[-1]) == sorted([TEXTS[2], TEXTS[3]])
    for row, text in zip(vectors, mixed):  # cached and fresh rows interleave correctly
        np.testing.assert_array_equal(row, expected("a", text))


def test_duplicates_are_embedded_once_and_returned_at_every_position(tmp_path, models):
    texts = ["same", "other", "same", "same", "other"]
    counters = {}
    vectors = embed_texts(texts, models["spec"]["a"], cache_dir(tmp_path), progress=False, counters=counters)
    assert sorted(models["fakes"]["a"].encoded) == ["other", "same"] and counters == {"embedded": 2}
    assert vectors.shape == (5, DIM)
    for row, text in zip(vectors, texts):
        np.testing.assert_array_equal(row, expected("a", text))


def test_the_cache_is_keyed_by_the_models_fingerprint(tmp_path, models):
    a, b = models["spec"]["a"], models["spec"]["b"]
    from_a = embed_texts(TEXTS, a, cache_dir(tmp_path), progress=False)
    counters = {}
    from_b = embed_texts(TEXTS, b, cache_dir(tmp_path), progress=False, counters=counters)
    assert counters == {"embedded": len(TEXTS)}  # another model: nothing of a's is reused
    np.testing.assert_array_equal(from_b[0], expected("b", TEXTS[0]))
    assert not np.allclose(from_a, from_b)

    # Changing a file of model a changes its fingerprint: its texts are embedded afresh.
    config = models["folders"]["a"] / "config.json"
    before = fingerprint(a.model)
    config.write_text('{"name": "a", "pooling": "cls"}')
    assert fingerprint(a.model) != before
    counters = {}
    embed_texts(TEXTS, a, cache_dir(tmp_path), progress=False, counters=counters)
    assert counters == {"embedded": len(TEXTS)}
    # Back to the old files: the old entries are still there.
    config.write_text('{"name": "a"}')
    counters = {}
    np.testing.assert_array_equal(embed_texts(TEXTS, a, cache_dir(tmp_path), progress=False, counters=counters), from_a)
    assert counters == {"embedded": 0}


def test_an_interrupt_keeps_the_chunks_already_embedded(tmp_path, models, monkeypatch):
    monkeypatch.setattr(embed_module, "CHUNK_BATCHES", 1)  # one batch (2 texts) per cache commit
    spec, fake = models["spec"]["a"], models["fakes"]["a"]
    texts = [f"text number {i}" for i in range(6)]
    fake.fail_on_call = 1  # Ctrl-C while the second chunk is being embedded
    with pytest.raises(KeyboardInterrupt):
        embed_texts(texts, spec, cache_dir(tmp_path), progress=False)
    fake.fail_on_call = None
    counters = {}
    vectors = embed_texts(texts, spec, cache_dir(tmp_path), progress=False, counters=counters)
    assert counters == {"embedded": 4}  # the first chunk's 2 texts were kept
    for row, text in zip(vectors, texts):
        np.testing.assert_array_equal(row, expected("a", text))


def test_an_empty_input_has_the_models_width(tmp_path, models):
    spec = models["spec"]["a"]
    # A model that never ran here is asked its width once; afterwards the cache knows it.
    assert embed_texts([], spec, cache_dir(tmp_path), progress=False).shape == (0, DIM)
    assert models["loads"] == [spec.model]
    empty = embed_texts([], spec, cache_dir(tmp_path), progress=False)
    assert empty.shape == (0, DIM) and empty.dtype == np.float32 and models["loads"] == [spec.model]


def ctx(tmp_path, spec) -> RunContext:
    return RunContext(spec=SimpleNamespace(embed=spec), cache_dir=cache_dir(tmp_path), progress=False)


def test_stage_adds_the_vectors_as_a_fixed_size_column_and_reuses_the_cache(tmp_path, models):
    frame = pl.DataFrame({"prompt_id": ["p0", "p1", "p2"], "prompt": ["Is snow white?", "Is ice hot?", "Is snow white?"]})
    c = ctx(tmp_path, models["spec"]["a"])
    kept, rejected, stats = Embed().run(frame, c)
    assert kept.schema["embedding"] == pl.Array(pl.Float32, DIM)
    assert kept.columns == ["prompt_id", "prompt", "embedding"] and rejected.height == 0
    assert stats == {"rows": 3, "embedded": 2, "cached": 1, "dim": DIM}
    matrix = embedding_matrix(kept, c)
    for row, text in zip(matrix, frame["prompt"]):
        np.testing.assert_array_equal(row, expected("a", text))
    _, _, again = Embed().run(frame, ctx(tmp_path, models["spec"]["a"]))
    assert again == {"rows": 3, "embedded": 0, "cached": 3, "dim": DIM}
    # Without the column, embedding_matrix embeds (from the cache): the same matrix.
    np.testing.assert_array_equal(embedding_matrix(frame, c), matrix)


def test_stage_on_an_empty_frame(tmp_path, models):
    frame = pl.DataFrame({"prompt_id": [], "prompt": []}, schema={"prompt_id": pl.String, "prompt": pl.String})
    c = ctx(tmp_path, models["spec"]["a"])
    kept, _, stats = Embed().run(frame, c)
    assert kept.height == 0 and kept.schema["embedding"] == pl.Array(pl.Float32, DIM)
    assert stats["embedded"] == 0 and embedding_matrix(kept, c).shape == (0, DIM)


def test_the_bundled_embedder_loads_once_per_process(tmp_path):
    model = load_embedder("all-minilm-l6-v2")
    assert load_embedder(str(locate("all-minilm-l6-v2"))) is model  # the alias and its folder: one model
    vectors = embed_texts(["Is water wet?", "Is fire cold?"], EmbedSpec(), tmp_path, progress=False)
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
