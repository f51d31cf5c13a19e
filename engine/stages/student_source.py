"""On-policy rows as data: `sources: [{from: "students:RUN_ID/STUDENT", where: ...}]`, the sources side.

A student trained by `syllabus train` (store folder models/RUN_ID/STUDENT) answers the prompts of the
version it was trained on (the models catalog says which; `where:` filters its examples as for
`from: NAME@V`), and the teacher scores exactly those tokens, teacher-forced, from its own context
(engine/teachers/student_answers.py, in the teach stage). So the version holds the student's own answers
with the teacher's top-k at each of its tokens: rows of origin "student", versioned like any other.

Here: which student and version a source names, the checks made before any work, and the columns its
rows carry to teach (never committed). No model is loaded and nothing of teach is imported, even lazily:
a stage's cache key covers the code it imports, and the sources stage imports this module.

A student whose tokenizer is not the teacher's (a trimmed vocabulary, from_teacher.vocab) is refused:
its ids are not the teacher's, and re-tokenizing its text would store tokens it never wrote.
"""

from __future__ import annotations

from functools import lru_cache

import polars as pl

from engine.errors import ModelError, SpecError

# What a student source's rows carry to teach (never committed): which source they come from (its student
# and settings), and the prompt_id of the row of the trained-on version each one is (its student context).
SOURCE_INDEX = "student_source"
STUDENT_ROW = "student_row"
STUDENT_COLUMNS = {SOURCE_INDEX: pl.Int32, STUDENT_ROW: pl.String}
ORIGIN = "student"


def model_name(src) -> str:
    run_id, student = src.student
    return f"models:{run_id}/{student}"


def _field(spec, index: int) -> str:
    field = f"sources[{index}].from"
    return field if spec is None else f"{spec.path or '<spec>'}: {field}"


# --- checks, before any work ---------------------------------------------------------------------------


def check_student_sources(spec) -> None:
    """Each student source names a trained student of the store whose token ids are the teacher's:
    SpecError naming sources[i].from if not (validate, plan, run: before any stage)."""
    for index, src in enumerate(spec.sources):
        if src.student is not None:
            _check_student(spec, index, src)


def _check_student(spec, index: int, src) -> None:
    from engine.models import fingerprint, locate

    name = model_name(src)
    try:
        locate(name)
        teacher = spec.teacher.local_model
        same = _same_vocabulary(fingerprint(name), fingerprint(teacher), name, teacher)
    except ModelError as e:
        raise SpecError(f"{_field(spec, index)}: {src.from_}: {e}") from None
    if not same:
        raise SpecError(f"{_field(spec, index)}: {src.from_}: the student's tokenizer is not the teacher's "
                        f"({spec.teacher.model}): a trimmed vocabulary (from_teacher.vocab) or another model's ids "
                        "cannot be scored by the teacher, and re-tokenizing its text would store tokens it never "
                        "wrote: name a student with the teacher's vocabulary")


@lru_cache(maxsize=16)
def _same_vocabulary(student_fingerprint: str, teacher_fingerprint: str, student: str, teacher: str) -> bool:
    """Whether the two tokenizers map every token to the same id (keyed by the models' fingerprints)."""
    from engine.models import load_tokenizer

    return load_tokenizer(student).get_vocab() == load_tokenizer(teacher).get_vocab()


def trained_student(spec, store, index: int, src) -> dict:
    """The store's record of the student (engine.models.store_model_lineage): model, run_id, student, dataset
    (the NAME@V it was trained on), spec_hash, teacher (and teacher_chain). spec None: the checks of
    check_student_sources were made already."""
    from engine.models import store_model_lineage

    if spec is not None:
        _check_student(spec, index, src)
    found = store_model_lineage(store, model_name(src))
    if not found.get("dataset"):
        raise SpecError(f"{_field(spec, index)}: {src.from_}: run {found['run_id']} is not recorded in the catalog "
                        f"of store {store.root}, so the version it was trained on is unknown (copied in from "
                        "another store? train it here with `syllabus train`)")
    return found


def student_pin(spec, store, index: int, src) -> list:
    """What the source's rows depend on besides its entry: the version's rows and the student's weights."""
    from engine.models import fingerprint

    return [trained_student(spec, store, index, src)["dataset"], fingerprint(model_name(src))]


def student_lineage(spec, store) -> list[dict]:
    """Per student source, what the version's lineage records: its run, student, weights, the version it
    was trained on and its teacher."""
    from engine.models import fingerprint

    return [{"source": f"sources[{i}]", **trained_student(spec, store, i, src),
             "fingerprint": fingerprint(model_name(src))}
            for i, src in enumerate(spec.sources) if src.student is not None]


def split_student_rows(frame: pl.DataFrame) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows the teacher answers, rows a student answers and the teacher scores)."""
    if SOURCE_INDEX not in frame.columns:
        return frame, frame.clear()
    is_student = (frame["origin"] == ORIGIN).fill_null(False)
    return frame.filter(~is_student), frame.filter(is_student)
