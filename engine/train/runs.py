"""Store glue for the trainer: pin a dataset version, train into the store, evaluate.

A training run is identified by the dataset version and the hash of everything that
shapes the students (teacher, students, training settings), so asking again for the
same run reuses it instead of training twice. Students are written to staging and
renamed into place: a failed run leaves no half-saved model behind.

With several seeds (`--seeds 0,1,2` or training.seeds), each seed is its own run: the
spec with training.seed replaced, cached like any other run. Eval scores every seed's
students and summarises each student over its seeds.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from functools import partial
from pathlib import Path


from engine.errors import Interrupted, TrainError
from engine.train.checkpoint import RunCheckpoints, discard_leftover


@dataclass
class TrainResult:
    dataset_ref: str
    run_id: str
    run_dir: Path
    students: list[str]
    created: bool


def training_hash(spec) -> str:
    from engine.models import fingerprint
    from engine.prompts import side_format, student_side

    shaping = {
        "teacher": fingerprint(spec.teacher.model),  # weights, not the name: a changed file retrains
        "student_models": [fingerprint(s.model) for s in spec.students if s.model],
        "students": [s.model_dump(mode="json") for s in spec.students],
        "training": _training_shaping(spec.training),
    }
    # How the student reads its prompt (chat or plain, system message, turns: its own or the teacher's),
    # resolved; left out at the defaults, so runs named before these settings existed keep their ids.
    reads = side_format(student_side(spec))
    if reads is not None:
        shaping["student_reads"] = reads
    loss, reasoning = spec.training.loss, spec.teacher.reasoning
    if reasoning is not None and loss.reasoning_weight != loss.answer_weight:  # where the weighted answer starts
        shaping["answer_marker"] = reasoning.answer_marker
    return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()


def _training_shaping(training) -> dict:
    """The training settings that name a run. Left out: `seeds` (one run per seed: see with_seed);
    `checkpoint_every`, which changes when the state is saved, never what is learned (a resumed run
    ends bit-for-bit where an uninterrupted one does); and `device`: it changes how the same steps are
    computed (bf16 autocast on CUDA rounds differently from float32 on CPU), not what the run is asked
    to learn, so asking for the same run on another machine reuses it (or resumes its checkpoint, which
    loads onto any device) instead of training again. metrics.json records the device a run used.
    A loss term left at its default (hidden: null) is left out too, so runs named before it existed
    keep their ids; student_chat, student_system and student_messages are named by training_hash
    as the student reads them (inherited from the teacher where unset)."""
    shaping = training.model_dump(mode="json", exclude={"seeds", "checkpoint_every", "device", "student_chat",
                                                        "student_system", "student_messages"})
    if shaping.get("teacher_signal") == "stored":  # the default: runs named before online existed keep their ids
        shaping.pop("teacher_signal")
    if shaping["loss"].get("hidden") is None:
        shaping["loss"].pop("hidden", None)
    if shaping.get("on_policy") is None:  # none: runs named before on_policy existed keep their ids
        shaping.pop("on_policy", None)
    for weight in ("reasoning_weight", "answer_weight"):  # token weights at 1: as before they existed
        if shaping["loss"].get(weight) == 1.0:
            shaping["loss"].pop(weight)
    return shaping


def seeds_for(spec, seeds: list[int] | None = None) -> list[int] | None:
    """The training seeds asked for: --seeds, else training.seeds; None: the one run of training.seed."""
    if seeds:
        return list(dict.fromkeys(seeds))
    return list(spec.training.seeds) if spec.training.seeds else None


def with_seed(spec, seed: int):
    """The spec whose run trains with `seed`: training.seed replaced (the run is cached per seed)."""
    return spec.model_copy(update={"training": spec.training.model_copy(update={"seed": seed, "seeds": None})})


def _pinned(spec, st, dataset: str | None):
    return st.resolve(dataset or f"{spec.name}@latest")


def run_id_for(spec, version) -> str:
    return f"{version.dataset}-v{version.version}-{training_hash(spec)[:10]}"


def train_seeds(spec, st, dataset: str | None = None, seeds: list[int] | None = None, *,
                progress: bool = True, nproc: int = 1) -> list[tuple[int | None, TrainResult]]:
    """(seed, run) per seed asked for; [(None, run)] for the spec's one run when no seeds are."""
    chosen = seeds_for(spec, seeds)
    if chosen is None:
        return [(None, train(spec, st, dataset, progress=progress, nproc=nproc))]
    return [(seed, train(with_seed(spec, seed), st, dataset, progress=progress, nproc=nproc)) for seed in chosen]


def train(spec, st, dataset: str | None = None, *, progress: bool = True, nproc: int = 1) -> TrainResult:
    """nproc > 1: the loop on that many processes, one global batch sharded across them
    (engine/train/distributed.py); like the device, it does not name the run."""
    from engine.train import distributed, train_students

    if nproc != 1:
        distributed.check_nproc(nproc, spec)  # a bad --nproc fails before any work
        train_students = partial(distributed.launch, nproc=nproc, store_root=st.root)
    if not spec.students:
        raise TrainError(f"{spec.path}: students: the spec names no student to train")
    _use_store(spec, st)
    version = _pinned(spec, st, dataset)
    run_id = run_id_for(spec, version)
    run_dir = st.root / "models" / run_id
    names = [s.name for s in spec.students]
    if all((run_dir / n / "metrics.json").is_file() for n in names):
        # A run killed between its rename into place and its catalog rows is recorded now.
        recorded = {m["student"] for m in st.models(version.dataset, version.version) if m["run_id"] == run_id}
        _record(spec, st, version, run_id, run_dir,
                {n: json.loads((run_dir / n / "metrics.json").read_text()) for n in names if n not in recorded})
        discard_leftover(st.root, run_id)  # killed after its rename, before its checkpoint went
        return TrainResult(version.ref, run_id, run_dir, names, created=False)
    examples = st.read(version.ref, "examples")
    if examples.filter(examples["split"] == "train").is_empty():
        raise TrainError(f"{version.ref} has no train rows to learn from")
    # A locked staging folder: gc leaves it alone while training runs; renamed into place at the end.
    # The run's checkpoints (engine/train/checkpoint.py) outlive an interrupted run, which resumes from them.
    checkpoints = RunCheckpoints.for_run(st.root, run_id, key=f"{version.ref}:{training_hash(spec)}")
    try:
        with checkpoints, st.staging(f"train-{run_id}") as staging:
            metrics = train_students(spec, examples, staging, progress=progress, checkpoints=checkpoints,
                                     logprobs_mode=logprobs_mode(version.stats))
            run_dir.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(run_dir, ignore_errors=True)
            staging.rename(run_dir)
            checkpoints.discard()
    except KeyboardInterrupt:
        if checkpoints.step is None:  # --nproc: rank 0 wrote them, not this process
            checkpoints.load()
        kept = (f"its checkpoint at step {checkpoints.step} is kept: `syllabus train` again resumes from it"
                if checkpoints.step is not None else "no student was saved")
        raise Interrupted(f"training on {version.ref} stopped; {kept}") from None
    try:
        _record(spec, st, version, run_id, run_dir, metrics)
    except KeyboardInterrupt:
        raise Interrupted(f"training on {version.ref} finished but not all its students were recorded; "
                          "`syllabus train` again records them") from None
    return TrainResult(version.ref, run_id, run_dir, names, created=True)


def logprobs_mode(stats: dict) -> str:
    """What a version's topk_* columns hold, from its teach stage's lineage stats: "topk" or "sampled"
    (versions committed before the mode was recorded held top-k)."""
    teach = stats.get("teach") if isinstance(stats, dict) else None
    return (teach or {}).get("logprobs_mode", "topk") if isinstance(teach, dict) else "topk"


def _use_store(spec, st) -> None:
    """`models:RUN_ID/STUDENT` names students of `st`; a chained teacher must be there before any work."""
    from engine.models import use_store
    from engine.preflight import check_teacher

    use_store(st.root)
    check_teacher(spec)


def run_lineage(spec, st, version) -> dict:
    """What a trained student records of where it came from: its data, its teacher, and, for a
    teacher that is itself a trained student (`models:RUN_ID/STUDENT`), that student's own lineage."""
    from engine.models import fingerprint, store_model_lineage

    lineage = {"dataset": version.ref, "teacher": spec.teacher.model, "teacher_fingerprint": fingerprint(spec.teacher.model)}
    chain = store_model_lineage(st, spec.teacher.model)
    if chain:
        lineage["teacher_chain"] = chain
    return lineage


def _record(spec, st, version, run_id: str, run_dir: Path, metrics: dict[str, dict]) -> None:
    lineage = run_lineage(spec, st, version) if metrics else {}
    for name, student_metrics in metrics.items():
        st.record_model(dataset=version.dataset, version=version.version, run_id=run_id, student=name,
                        path=run_dir / name, spec_hash=spec.spec_hash, metrics=student_metrics, lineage=lineage)


def evaluate(spec, st, dataset: str | None = None, *, seeds: list[int] | None = None, progress: bool = True) -> tuple[dict, Path]:
    """Teacher vs the spec's students on the eval split and each eval source; the report and its saved path.

    The report (also saved as eval.json) holds one entry per set, each with its majority
    baseline, one row per model (the teacher first, then each student per seed) and, with
    several seeds, each student's mean and min–max over them.
    """
    from engine.stages.base import RunContext
    from engine.train.evaluate import METHODS, EvalSet, StudentRun, evaluate_sets, source_sets, split_set

    _use_store(spec, st)
    version = _pinned(spec, st, dataset)
    chosen = seeds_for(spec, seeds)
    runs = [(seed, with_seed(spec, seed)) for seed in chosen] if chosen else [(spec.training.seed, spec)]
    run_ids = {seed: run_id_for(seeded, version) for seed, seeded in runs}
    missing = [f"{s.name}{'' if chosen is None else f' (seed {seed})'}" for seed in run_ids for s in spec.students
               if not (st.root / "models" / run_ids[seed] / s.name / "config.json").is_file()]
    if missing:
        again = "" if chosen is None else f" --seeds {','.join(map(str, chosen))}"
        raise TrainError(f"no trained {', '.join(missing)} for {version.ref} with this spec: "
                         f"run `syllabus train {spec.path or 'SPEC'}{again}` first")
    examples = st.read(version.ref, "examples")
    students = [StudentRun(s.name, st.root / "models" / run_ids[seed] / s.name, None if chosen is None else seed)
                for seed in run_ids for s in spec.students]
    ctx = RunContext(spec=spec, cache_dir=st.root / "cache", progress=progress, store=st)
    try:
        test = split_set(spec, examples, _split_description(spec, version, examples))
        sets: list[EvalSet] = ([test] if test is not None else []) + source_sets(spec, ctx)
        reports = evaluate_sets(spec, sets, students, progress=progress)
    except KeyboardInterrupt:
        raise Interrupted(f"evaluation on {version.ref} stopped; no eval.json was written") from None
    report = {"dataset": version.ref, "split": spec.eval.split, "seeds": chosen or [spec.training.seed],
              "runs": {str(seed): run_id for seed, run_id in run_ids.items()},
              "teacher_calls": ctx.counters.get("teacher_calls", 0), "methods": METHODS, "sets": reports}
    if chosen is None or len(chosen) == 1:
        folder = st.root / "models" / next(iter(run_ids.values()))
    else:  # several runs: the report sits beside them, named by what they share
        folder = st.root / "models" / f"{version.dataset}-v{version.version}-{seedless_hash(spec)[:10]}-seeds-" \
                                      f"{'-'.join(map(str, chosen))}"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "eval.json"
    path.write_text(json.dumps(report, indent=2, default=str))
    return report, path


def seedless_hash(spec) -> str:
    """training_hash with the seed left out: what the runs of one spec over several seeds share."""
    return training_hash(spec.model_copy(update={"training": spec.training.model_copy(update={"seed": 0, "seeds": None})}))


def _split_description(spec, version, examples) -> str:
    """How the eval split was drawn, from the version's own lineage (older versions drew it last)."""
    from store.inspect import describe_test_split

    rows = examples.filter(examples["split"] == spec.eval.split).height
    note = describe_test_split(version.stats) if spec.eval.split == "test" else None
    return f"{spec.eval.split} split of {version.ref}: {rows} rows" + (f", {note.removeprefix('test split: ')}" if note else "")
