"""Store glue for the trainer: pin a dataset version, train into the store, evaluate.

A training run is identified by the dataset version and the hash of everything that
shapes the students (teacher, students, training settings), so asking again for the
same run reuses it instead of training twice. Students are written to staging and
renamed into place: a failed run leaves no half-saved model behind.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from engine.errors import TrainError


@dataclass
class TrainResult:
    dataset_ref: str
    run_id: str
    run_dir: Path
    students: list[str]
    created: bool


def training_hash(spec) -> str:
    from engine.models import fingerprint

    shaping = {
        "teacher": fingerprint(spec.teacher.model),  # weights, not the name: a changed file retrains
        "student_models": [fingerprint(s.model) for s in spec.students if s.model],
        "students": [s.model_dump(mode="json") for s in spec.students],
        "training": spec.training.model_dump(mode="json"),
    }
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def _pinned(spec, st, dataset: str | None):
    return st.resolve(dataset or f"{spec.name}@latest")


def run_id_for(spec, version) -> str:
    return f"{version.dataset}-v{version.version}-{training_hash(spec)[:10]}"


def train(spec, st, dataset: str | None = None, *, progress: bool = True, console: Console | None = None) -> TrainResult:
    from engine.train import train_students

    if not spec.students:
        raise TrainError(f"{spec.path}: students: the spec names no student to train")
    version = _pinned(spec, st, dataset)
    run_id = run_id_for(spec, version)
    run_dir = st.root / "models" / run_id
    names = [s.name for s in spec.students]
    if all((run_dir / n / "metrics.json").is_file() for n in names):
        return TrainResult(version.ref, run_id, run_dir, names, created=False)
    examples = st.read(version.ref, "examples")
    if examples.filter(examples["split"] == "train").is_empty():
        raise TrainError(f"{version.ref} has no train rows to learn from")
    # A locked staging folder: gc leaves it alone while training runs; renamed into place at the end.
    with st.staging(f"train-{run_id}") as staging:
        metrics = train_students(spec, examples, staging, progress=progress)
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(run_dir, ignore_errors=True)
        staging.rename(run_dir)
    for name in names:
        st.record_model(dataset=version.dataset, version=version.version, run_id=run_id, student=name,
                        path=run_dir / name, spec_hash=spec.spec_hash, metrics=metrics[name])
    return TrainResult(version.ref, run_id, run_dir, names, created=True)


def evaluate(spec, st, dataset: str | None = None, *, progress: bool = True, console: Console | None = None):
    """Teacher vs the spec's students on the pinned version; rows plus the saved JSON path."""
    from engine.train import evaluate as evaluate_models

    version = _pinned(spec, st, dataset)
    run_id = run_id_for(spec, version)
    run_dir = st.root / "models" / run_id
    missing = [s.name for s in spec.students if not (run_dir / s.name / "config.json").is_file()]
    if missing:
        raise TrainError(f"no trained {', '.join(missing)} for {version.ref} with this spec: "
                         f"run `syllabus train {spec.path or 'SPEC'}` first")
    examples = st.read(version.ref, "examples")
    rows = evaluate_models(spec, examples, {s.name: run_dir / s.name for s in spec.students}, progress=progress)
    path = run_dir / "eval.json"
    path.write_text(json.dumps({"dataset": version.ref, "run_id": run_id, "split": spec.eval.split, "models": rows},
                               indent=2, default=str))
    return rows, path
