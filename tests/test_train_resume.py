"""Checkpoints and resume, and training.device: an interrupted run resumes to the very weights of an
uninterrupted one; the cpu path, auto -> cpu, and a CUDA device this machine lacks."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_train_spec
from safetensors.torch import load_file

import engine.train.loop as loop
import store
from engine.errors import Interrupted, SpecError, TrainError
from engine.train import runs, train_students
from engine.train.checkpoint import FOLDER, RunCheckpoints
from engine.train.device import autocast, resolve_device, to_device

LINEAGE = {"spec_text": "name: tiny\n", "spec_hash": "h1", "teacher": "tiny", "code_version": "0", "stats": {}}
STUDENTS = [{"name": "fresh", "config": {"hidden_size": 16, "num_layers": 2, "num_heads": 2, "intermediate_size": 32}},
            {"name": "halves", "from_teacher": {"layers": [0, 2]}}]
# 10 train rows in batches of 4: 3 steps an epoch (the last batch short), 9 in all; keep: best, so the
# best weights and val history must survive the interruption too.
TRAINING = {"epochs": 3, "batch_size": 4, "seed": 5, "keep": "best", "optimizer": {"lr": 3e-3, "warmup_steps": 2}}
TIMING = ("wall_seconds", "val_seconds", "run_seconds", "resumed_from_step", "checkpoints", "seconds_per_step",
          "teacher_forward_seconds", "peak_memory")


def _spec(teacher_dir, students=STUDENTS, **training):
    return tiny_train_spec(teacher_dir, students, **{**TRAINING, **training})


def _store(path, examples):
    st = store.open(path)
    st.commit("tiny", {"examples": examples}, LINEAGE, parent=None)
    return st


def _weights(folder):
    return load_file(str(folder / "model.safetensors"))


def _same_weights(a, b):
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key


def _interrupt_at(monkeypatch, at_step: int, student: str = "halves"):
    """Ctrl-C inside `student`'s optimizer step `at_step` (0-based): the other student has already taken it."""
    real = loop.Trainee.step
    calls = []

    def step(self, micro_batches, spec, step, total_steps):
        calls.append((self.student.name, step))
        if step == at_step and self.student.name == student:
            raise KeyboardInterrupt
        return real(self, micro_batches, spec, step, total_steps)

    monkeypatch.setattr(loop.Trainee, "step", step)
    return calls


@pytest.fixture(scope="module")
def uninterrupted(tiny_llm_dir, tiny_examples, tmp_path_factory):
    """The reference: the run trained in one go (checkpoints written along the way, then removed)."""
    root = tmp_path_factory.mktemp("uninterrupted")
    st = _store(root / "store", tiny_examples)
    spec = _spec(tiny_llm_dir, checkpoint_every=2)
    result = runs.train(spec, st, progress=False)
    return result, {n: json.loads((result.run_dir / n / "metrics.json").read_text()) for n in result.students}


@pytest.mark.parametrize("every, at_step, saved", [(2, 5, 4), (3, 5, 3)])
def test_an_interrupted_run_resumes_to_the_weights_of_an_uninterrupted_one(
        tiny_llm_dir, tiny_examples, tmp_path, monkeypatch, capsys, uninterrupted, every, at_step, saved):
    """Every 2 steps: the checkpoint at step 4 is mid-epoch (one batch into epoch 2). Every 3: the one at
    step 3 ends epoch 1 before its val loss, which the resumed run computes. Either way the resumed run
    ends with bit-identical weights, curves and val history."""
    reference, reference_metrics = uninterrupted
    st = _store(tmp_path / "store", tiny_examples)
    spec = _spec(tiny_llm_dir, checkpoint_every=every)
    calls = _interrupt_at(monkeypatch, at_step)
    with pytest.raises(Interrupted, match=f"checkpoint at step {saved} is kept"):
        runs.train(spec, st, progress=False)
    assert ("fresh", at_step) in calls  # the first student had taken step 5 when the second was stopped
    ckpt = st.root / "models" / FOLDER / reference.run_id
    assert (ckpt / "state.pt").is_file() and not list(ckpt.glob("*.tmp"))
    assert not (st.root / "models" / reference.run_id).exists() and st.models() == []

    monkeypatch.undo()
    capsys.readouterr()
    result = runs.train(spec, st, progress=False)
    assert f"resuming from step {saved}" in capsys.readouterr().err
    assert result.run_id == reference.run_id and result.created
    for name in result.students:
        _same_weights(result.run_dir / name, reference.run_dir / name)
        metrics = json.loads((result.run_dir / name / "metrics.json").read_text())
        assert metrics["resumed_from_step"] == saved and reference_metrics[name]["resumed_from_step"] is None
        strip = lambda m: {k: v for k, v in m.items() if k not in TIMING}  # noqa: E731
        assert strip(metrics) == strip(reference_metrics[name])  # curves, val losses, best: all the same
        assert metrics["steps"] == 9 and metrics["kept"] == "best" and len(metrics["val_losses"]) == 3
    assert not (st.root / "models" / FOLDER).exists()  # a finished run's checkpoint goes


def test_checkpoint_every_and_device_do_not_change_the_run(tiny_llm_dir, tiny_examples, tmp_path, monkeypatch,
                                                           uninterrupted):
    """Interrupted with checkpoints every 2 steps, resumed with every 4 and device auto (cpu here): the same
    run id, resumed, the same weights; a checkpoint_every of null still resumes, it only writes none."""
    reference, _ = uninterrupted
    st = _store(tmp_path / "store", tiny_examples)
    _interrupt_at(monkeypatch, 3, student="fresh")
    with pytest.raises(Interrupted, match="checkpoint at step 2"):
        runs.train(_spec(tiny_llm_dir, checkpoint_every=2), st, progress=False)
    monkeypatch.undo()
    again = _spec(tiny_llm_dir, checkpoint_every=None, device="auto")
    assert runs.run_id_for(again, st.resolve("tiny@1")) == reference.run_id
    result = runs.train(again, st, progress=False)
    metrics = json.loads((result.run_dir / "fresh" / "metrics.json").read_text())
    assert metrics["resumed_from_step"] == 2 and metrics["checkpoints"]["written"] == 0
    assert metrics["device"] == "cpu" and metrics["autocast"] is None
    for name in result.students:
        _same_weights(result.run_dir / name, reference.run_dir / name)


def test_a_changed_spec_never_resumes_a_stale_checkpoint(tiny_llm_dir, tiny_examples, tmp_path, monkeypatch, capsys):
    st = _store(tmp_path / "store", tiny_examples)
    _interrupt_at(monkeypatch, 3)
    with pytest.raises(Interrupted):
        runs.train(_spec(tiny_llm_dir, checkpoint_every=2), st, progress=False)
    monkeypatch.undo()
    stale = st.root / "models" / FOLDER
    (old_run,) = [p.name for p in stale.iterdir()]

    changed = _spec(tiny_llm_dir, checkpoint_every=2, optimizer={"lr": 1e-3, "warmup_steps": 2})
    capsys.readouterr()
    result = runs.train(changed, st, progress=False)
    assert result.run_id != old_run and "resuming" not in capsys.readouterr().err
    assert json.loads((result.run_dir / "fresh" / "metrics.json").read_text())["resumed_from_step"] is None
    assert [p.name for p in stale.iterdir()] == [old_run]  # the other run's checkpoint is left for it


def test_a_checkpoint_of_another_key_or_a_broken_file_is_not_resumed(tiny_llm_dir, tiny_examples, tmp_path):
    spec = _spec(tiny_llm_dir, students=STUDENTS[:1], epochs=1, checkpoint_every=1)
    folder = tmp_path / "ckpt"
    with RunCheckpoints(folder, key="run-a") as ckpt:
        train_students(spec, tiny_examples, tmp_path / "a", progress=False, checkpoints=ckpt)
        assert ckpt.written == 2 and ckpt.step == 2 and ckpt.bytes > 0  # steps 1 and 2 of 3 (none at the end)
        assert ckpt.load()["step"] == 2
    with RunCheckpoints(folder, key="run-b") as other:
        assert other.load() is None  # another run's key
    (folder / "state.pt").write_bytes(b"not a checkpoint")  # e.g. a disk that lost the rename's data
    with RunCheckpoints(folder, key="run-a") as ckpt:
        assert ckpt.load() is None
        m = train_students(spec, tiny_examples, tmp_path / "b", progress=False, checkpoints=ckpt)["fresh"]
        assert m["resumed_from_step"] is None and m["steps"] == 3


def test_a_run_is_trained_by_one_process_at_a_time(tmp_path):
    with RunCheckpoints(tmp_path / "run", key="k"):
        with pytest.raises(TrainError, match="run run is being trained by another process"):
            with RunCheckpoints(tmp_path / "run", key="k"):
                pass
    with RunCheckpoints(tmp_path / "run", key="k"):  # free again once the first is done
        pass
    assert not tmp_path.joinpath("run").exists()  # no checkpoint written: no folder left


def test_the_cli_resumes_an_interrupted_train(tiny_llm_dir, tiny_examples, tmp_path, monkeypatch, syllabus):
    import yaml

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYLLABUS_STORE", str(tmp_path / "store"))
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "Is the sky blue?"}\n')
    spec = {"name": "tiny", "teacher": {"model": str(tiny_llm_dir), "reasoning": {"answer_marker": "Answer:"}},
            "sources": [{"path": "prompts.jsonl"}], "students": STUDENTS[:1],
            "training": {"epochs": 2, "batch_size": 4, "checkpoint_every": 2}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    _store(tmp_path / "store", tiny_examples)
    _interrupt_at(monkeypatch, 3, student="fresh")
    code, out, err = syllabus("train", "spec.yaml")
    assert code == 130 and out == "" and err.count("\n") == 1
    assert "checkpoint at step 2 is kept: `syllabus train` again resumes from it" in err

    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SYLLABUS_STORE", str(tmp_path / "store"))
    code, out, err = syllabus("train", "spec.yaml")
    assert code == 0 and out.startswith("trained: fresh on tiny@1") and "resuming from step 2" in err
    (run_dir,) = [p for p in (tmp_path / "store" / "models").iterdir()]
    assert json.loads((run_dir / "fresh" / "metrics.json").read_text())["resumed_from_step"] == 2


# --- device ------------------------------------------------------------------------------------


def test_device_cpu_and_auto_resolve_to_the_cpu_here(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    batch = {"input_ids": torch.zeros(2, 3, dtype=torch.long)}
    assert to_device(batch, torch.device("cpu")) is batch  # the cpu path moves nothing
    with autocast(torch.device("cpu")):  # and runs in plain float32
        assert (torch.ones(2, 2) @ torch.ones(2, 2)).dtype == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert resolve_device("auto") == torch.device("cuda", 0)  # where there is one
    with pytest.raises(SpecError, match=r"^s.yaml: training.device: cuda:3 asked for, but this machine has 1 CUDA "
                                        r"device \(cuda:0 to cuda:0\)$"):
        resolve_device("cuda:3", "s.yaml")


def test_a_cuda_device_without_cuda_is_a_one_line_spec_error(tiny_llm_dir, tiny_examples, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for device in ("cuda", "cuda:1"):
        spec = _spec(tiny_llm_dir, students=STUDENTS[:1], device=device)
        with pytest.raises(SpecError) as e:
            train_students(spec, tiny_examples, tmp_path, progress=False)
        assert str(e.value).startswith(f"<spec>: training.device: {device} asked for, but torch sees no CUDA device")
        assert "\n" not in str(e.value)
    with pytest.raises(SpecError, match=r"training.device: 'gpu' is not a device: use auto, cpu, cuda or cuda:N"):
        _spec(tiny_llm_dir, device="gpu")


def test_the_cpu_path_is_unchanged_and_auto_trains_the_same_on_a_cpu(tiny_llm_dir, tiny_examples, tmp_path):
    """device: cpu (the default) and auto (cpu here) give bit-identical students, as before the option."""
    cpu = train_students(_spec(tiny_llm_dir, students=STUDENTS[:1]), tiny_examples, tmp_path / "cpu",
                         progress=False)["fresh"]
    auto = train_students(_spec(tiny_llm_dir, students=STUDENTS[:1], device="auto"), tiny_examples, tmp_path / "auto",
                          progress=False)["fresh"]
    assert cpu["device"] == auto["device"] == "cpu" and cpu["checkpoints"] is None
    assert cpu["loss_curve"] == auto["loss_curve"]
    assert set(cpu["loss_components"]) == {"kd", "hard"} and cpu["hidden_layer_map"] is None
    _same_weights(tmp_path / "cpu" / "fresh", tmp_path / "auto" / "fresh")


def test_the_run_id_names_what_is_learned_not_when_it_is_saved_or_where_it_runs(tiny_llm_dir):
    base = runs.training_hash(_spec(tiny_llm_dir))
    assert runs.training_hash(_spec(tiny_llm_dir, checkpoint_every=7, device="auto")) == base
    assert runs.training_hash(_spec(tiny_llm_dir, checkpoint_every=None, device="cpu")) == base
    assert runs.training_hash(_spec(tiny_llm_dir, loss={"hidden": {"weight": 0.5}})) != base
    assert runs.training_hash(_spec(tiny_llm_dir, loss={"hidden": {"weight": 0.5, "distance": "mse"}})) != \
        runs.training_hash(_spec(tiny_llm_dir, loss={"hidden": {"weight": 0.5}}))
    shaping = runs._training_shaping(_spec(tiny_llm_dir).training)
    assert "hidden" not in shaping["loss"] and not {"checkpoint_every", "device", "seeds"} & set(shaping)
