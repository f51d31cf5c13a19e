"""`syllabus train SPEC --nproc N`: the global batch sharded across N gloo processes on the CPU trains like one
process with the same batch; rank 0 alone writes one run; a bad --nproc is one line."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from conftest import tiny_train_spec
from safetensors.torch import load_file

import store
from engine.train import runs

LINEAGE = {"spec_text": "name: tiny\n", "spec_hash": "h1", "teacher": "tiny", "code_version": "0", "stats": {}}
# A fresh student and a width-pruned one (its calibration must agree on both ranks).
STUDENTS = [{"name": "fresh", "config": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}},
            {"name": "narrow", "from_teacher": {"keep_layers": 2, "intermediate_size": 48}}]
# 10 train rows, 2 micro-batches of 4 a step: steps of 8 then 2 rows (the short one: one row per rank), 6 steps;
# keep: best reads the val loss rank 0 broadcasts; a checkpoint every 2 steps is rank 0's to write.
TRAINING = {"epochs": 3, "batch_size": 4, "grad_accum": 2, "seed": 3, "keep": "best", "checkpoint_every": 2,
            "optimizer": {"lr": 3e-3, "warmup_steps": 2}}
LOSS_RTOL = 1e-5  # per step: float32 sums over shards round differently (measured: under 3e-7)
WEIGHT_ATOL = 1e-5  # after 6 AdamW steps at lr 3e-3 (measured: under 1.3e-6)


def _spec_dict(teacher_dir) -> dict:
    """tiny_train_spec's spec, as the spec.yaml `syllabus train` reads."""
    return {"name": "tiny", "teacher": {"model": str(teacher_dir), "backend": "transformers",
                                        "generation": {"max_new_tokens": 8}, "logprobs": {"top_k": 8}, "batch_size": 4},
            "sources": [{"path": "unused.jsonl", "text": "prompt"}], "students": STUDENTS, "training": TRAINING,
            "eval": {"speed_prompts": 2, "speed_tokens": 4}}


@pytest.fixture(scope="module")
def single(tiny_llm_dir, tiny_examples, tmp_path_factory):
    """The reference: the same spec trained in one process."""
    st = store.open(tmp_path_factory.mktemp("single") / "store")
    st.commit("tiny", {"examples": tiny_examples}, LINEAGE, parent=None)
    return runs.train(tiny_train_spec(tiny_llm_dir, STUDENTS, **TRAINING), st, progress=False)


@pytest.fixture
def project(tmp_path, monkeypatch, tiny_llm_dir, tiny_examples):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYLLABUS_STORE", str(tmp_path / "store"))
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(_spec_dict(tiny_llm_dir)))
    (tmp_path / "unused.jsonl").write_text('{"prompt": "Is the sky blue?"}\n')
    store.open(tmp_path / "store").commit("tiny", {"examples": tiny_examples}, LINEAGE, parent=None)
    return tmp_path


def _metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_two_processes_train_like_one(project, syllabus, single):
    code, out, err = syllabus("train", "spec.yaml", "--nproc", "2")
    assert code == 0, err
    models = project / "store" / "models"
    assert sorted(p.name for p in models.iterdir()) == [single.run_id]  # one run folder, no checkpoint left
    st = store.open(project / "store")
    assert sorted(m["student"] for m in st.models("tiny", 1)) == ["fresh", "narrow"]  # one catalog row each
    for name in single.students:
        ours, theirs = _metrics(models / single.run_id / name), _metrics(single.run_dir / name)
        assert (ours["nproc"], ours["backend"]) == (2, "gloo")
        assert (theirs["nproc"], theirs["backend"]) == (1, None)
        assert ours["steps"] == theirs["steps"] == 6
        assert ours["train_tokens"] == theirs["train_tokens"]
        assert ours["checkpoints"]["written"] == theirs["checkpoints"]["written"] == 2
        steps = [s for s, _ in theirs["loss_curve"]]
        assert [s for s, _ in ours["loss_curve"]] == steps
        assert torch.allclose(torch.tensor([v for _, v in ours["loss_curve"]]),
                              torch.tensor([v for _, v in theirs["loss_curve"]]), rtol=LOSS_RTOL, atol=0)
        assert [p[:2] for p in ours["val_losses"]] == [p[:2] for p in theirs["val_losses"]]
        assert torch.allclose(torch.tensor([p[2] for p in ours["val_losses"]]),
                              torch.tensor([p[2] for p in theirs["val_losses"]]), rtol=LOSS_RTOL, atol=0)
        assert ours["pruning"] == theirs["pruning"]
        wa, wb = load_file(str(models / single.run_id / name / "model.safetensors")), \
            load_file(str(single.run_dir / name / "model.safetensors"))
        assert wa.keys() == wb.keys()
        for key in wa:
            assert torch.allclose(wa[key], wb[key], rtol=0, atol=WEIGHT_ATOL), key


@pytest.mark.parametrize("nproc, says", [("0", "--nproc: 0 is not a number of processes"),
                                         ("-1", "--nproc: -1 is not a number of processes")])
def test_a_bad_nproc_is_one_line(project, syllabus, nproc, says):
    code, out, err = syllabus("train", "spec.yaml", "--nproc", nproc)
    assert code == 1
    assert err.startswith(f"error: {says}") and err.count("\n") == 1, err
    assert not list((project / "store").glob("models/tiny-*"))  # no run started


def test_more_processes_than_gpus_is_one_line(project, syllabus, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec["training"]["device"] = "cuda"
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = syllabus("train", "spec.yaml", "--nproc", "2")
    assert code == 1
    assert err == "error: --nproc 2 asks for one CUDA device per process, but this machine has 1\n", err


def test_on_policy_is_refused_with_several_processes(project, syllabus):
    spec = yaml.safe_load((project / "spec.yaml").read_text())
    spec["training"]["on_policy"] = {"share": 0.5}
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))
    code, out, err = syllabus("train", "spec.yaml", "--nproc", "2")
    assert code == 1 and err.count("\n") == 1 and "training.on_policy cannot run with --nproc > 1" in err, err
