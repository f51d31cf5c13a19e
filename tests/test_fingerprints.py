"""Model fingerprints: the identity that teacher/embedding caches, stage caches and lineage record.

A fingerprint must change whenever any file that shapes a model's outputs changes (weights,
configs, tokenizer files, a sentence-transformers pooling folder), and must not change
otherwise, or every cached teacher answer would be paid for again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from engine.models import ModelError, fingerprint, locate

ROOT = Path(__file__).resolve().parent.parent

FILES = {
    "config.json": b'{"hidden_size": 32, "num_hidden_layers": 2}',
    "model.safetensors": bytes(range(256)) * 16,
    "tokenizer.json": b'{"vocab": {"a": 0, "b": 1}}',
    "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}',
}


def make_model(folder: Path, files: dict[str, bytes] = FILES) -> Path:
    for rel, data in files.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    return folder


def flip(data: bytes) -> bytes:
    """Different bytes of the same length: a size check alone cannot see the change."""
    return data[:-1] + bytes([data[-1] ^ 0xFF])


@pytest.fixture
def model(tmp_path) -> Path:
    return make_model(tmp_path / "tiny-model")


def test_names_the_model_and_is_stable_across_calls_and_processes(model):
    fp = fingerprint(str(model))
    assert fp.startswith("tiny-model@sha256:") and len(fp.split("@sha256:")[1]) == 16
    assert fingerprint(str(model)) == fp
    # A fresh process (no in-memory digest cache, another hash seed) agrees.
    code = "import sys; from engine.models import fingerprint; print(fingerprint(sys.argv[1]))"
    other = subprocess.run([sys.executable, "-c", code, str(model)], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONHASHSEED": "123"}, check=True)
    assert other.stdout.strip() == fp


def test_touching_files_without_changing_them_keeps_it(model):
    fp = fingerprint(str(model))
    for rel in FILES:
        os.utime(model / rel, (1_000_000_000, 1_000_000_000))
    (model / "model.safetensors").write_bytes(FILES["model.safetensors"])  # rewritten, same bytes
    assert fingerprint(str(model)) == fp


@pytest.mark.parametrize("rel", list(FILES))
def test_changing_any_file_changes_it_and_restoring_restores_it(model, rel):
    fp = fingerprint(str(model))
    (model / rel).write_bytes(flip(FILES[rel]))
    changed = fingerprint(str(model))
    assert changed != fp
    (model / rel).write_bytes(FILES[rel])
    assert fingerprint(str(model)) == fp  # content decides, not when it was written


def test_an_in_place_rewrite_that_keeps_size_and_mtime_is_still_seen(model):
    """`cp -p` or `rsync --inplace -t` over a model: same size, same mtime, new bytes."""
    weights = model / "model.safetensors"
    fp = fingerprint(str(model))
    st = weights.stat()
    weights.write_bytes(flip(FILES["model.safetensors"]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert weights.stat().st_size == st.st_size and weights.stat().st_mtime_ns == st.st_mtime_ns
    assert fingerprint(str(model)) != fp


def test_adding_removing_or_renaming_a_file_changes_it(model):
    fp = fingerprint(str(model))
    (model / "generation_config.json").write_text('{"do_sample": false}')
    added = fingerprint(str(model))
    assert added != fp
    (model / "generation_config.json").unlink()
    assert fingerprint(str(model)) == fp
    (model / "tokenizer.json").rename(model / "vocab.json")  # same bytes under another name
    assert fingerprint(str(model)) != fp
    (model / "1_Pooling" / "config.json").unlink()
    (model / "vocab.json").rename(model / "tokenizer.json")
    assert fingerprint(str(model)) != fp


def test_hidden_files_and_folders_do_not_count(model):
    """Lock files, a git checkout's .git/ or the hub's .cache/ change without the model changing."""
    fp = fingerprint(str(model))
    (model / ".lock").write_text("pid 1")
    (model / ".git" / "lfs" / "objects").mkdir(parents=True)
    (model / ".git" / "index").write_bytes(b"git index after `git status`")
    (model / ".cache" / "huggingface" / "download").mkdir(parents=True)
    (model / ".cache" / "huggingface" / "download" / "model.safetensors.metadata").write_text("etag 1")
    assert fingerprint(str(model)) == fp
    (model / ".git" / "index").write_bytes(b"git index after `git fetch`")
    assert fingerprint(str(model)) == fp


def test_differs_between_models_and_follows_a_moved_copy(model, tmp_path):
    other = make_model(tmp_path / "other" / "tiny-model", {**FILES, "model.safetensors": flip(FILES["model.safetensors"])})
    assert fingerprint(str(other)) != fingerprint(str(model))
    # The same files in another place (a moved project, another checkout): the same identity, so caches still hit.
    copy = tmp_path / "elsewhere" / "tiny-model"
    shutil.copytree(model, copy)
    assert fingerprint(str(copy)) == fingerprint(str(model))
    # Another folder name: the name part says so, the weights part is the same.
    renamed = tmp_path / "renamed"
    shutil.copytree(model, renamed)
    assert fingerprint(str(renamed)).startswith("renamed@sha256:")
    assert fingerprint(str(renamed)).split("@")[1] == fingerprint(str(model)).split("@")[1]


def test_a_gguf_file_is_fingerprinted_by_its_bytes(tmp_path):
    gguf = tmp_path / "teacher.Q4.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    fp = fingerprint(str(gguf))
    assert fp.startswith("teacher.Q4.gguf@sha256:")
    gguf.write_bytes(b"GGUF" + bytes(999) + b"\x01")
    assert fingerprint(str(gguf)) != fp


def test_an_alias_has_the_digest_of_its_bundled_folder():
    alias = fingerprint("all-minilm-l6-v2")
    folder = fingerprint(str(locate("all-minilm-l6-v2")))
    assert alias.startswith("all-minilm-l6-v2@sha256:")
    assert alias.split("@")[1] == folder.split("@")[1]


def test_an_unknown_model_is_a_one_line_error(tmp_path):
    (tmp_path / "no-config").mkdir()
    for name in ("no-such-alias", str(tmp_path / "no-config"), str(tmp_path / "missing.gguf")):
        with pytest.raises(ModelError, match="is neither a bundled alias") as e:
            fingerprint(name)
        assert "\n" not in str(e.value)
