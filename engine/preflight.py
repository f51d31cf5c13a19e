"""Checks that need models or the store, made before any work: the spec alone cannot tell.

- A trained student named as the teacher (`models:RUN_ID/STUDENT`) must exist in the store:
  `validate`, `plan`, `run` and `train` stop with one line naming teacher.model and the folder tried.
- Each student's size, from configs alone (engine/train/students.py student_shape): `validate` and
  `plan` print it, and a shape the teacher cannot give fails there, naming the field.
- Ensemble members: the same check of `models:` names, the templates a member sets itself, and what
  each member gives (`validate` prints it: logit targets, or answers only and why).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.errors import ModelError, SpecError


def _where(spec) -> str:
    return str(spec.path) if spec.path else "<spec>"


def check_teacher(spec) -> None:
    """A `models:` teacher (or an openai teacher's `models:` tokenizer) must be a trained student of the
    store: SpecError naming teacher.model (teacher.tokenizer) and the folder tried if not."""
    from engine.models import locate, store_model

    field = "model" if spec.teacher.backend == "transformers" else "tokenizer"
    name = spec.teacher.local_model
    try:
        if store_model(name) is not None:
            locate(name)
    except ModelError as e:
        raise SpecError(f"{_where(spec)}: teacher.{field}: {e}") from None
    if spec.teacher.backend == "transformers":  # a CUDA device this machine lacks: before any stage runs
        from engine.train.device import resolve_device

        resolve_device(spec.teacher.device, _where(spec), "teacher.device")
    if getattr(spec, "ensemble", None) is not None:
        check_members(spec)
    from engine.stages.student_source import check_student_sources

    check_student_sources(spec)  # `from: students:RUN_ID/STUDENT`: a trained student with the teacher's ids


def check_members(spec) -> None:
    """Each ensemble member as check_teacher checks the teacher, and the templates it sets itself (those it
    leaves unset are the teacher's, checked with the spec's): one line per problem, naming the field."""
    from engine.errors import TemplateProblem
    from engine.models import locate, store_model
    from engine.templates import ROW_VARIABLES, template_name, template_problems

    problems = []
    for i, member in enumerate(spec.ensemble.members):
        where = f"ensemble.members[{i}]"
        try:
            if store_model(member.local_model) is not None:
                locate(member.local_model)
        except ModelError as e:
            field = "model" if member.backend == "transformers" else "tokenizer"
            raise SpecError(f"{_where(spec)}: {where}.{field}: {e}") from None
        given = member.model_fields_set
        fields = [(f"{where}.{f}", getattr(member, f)) for f in ("prompt", "system")
                  if f in given and getattr(member, f)]
        if "messages" in given:
            fields += [(f"{where}.messages[{j}].content", turn.content) for j, turn in enumerate(member.messages)]
        for field, text in fields:
            try:
                problems += template_problems(str(text), template_name(spec, field, text), ROW_VARIABLES)
            except TemplateProblem as e:  # a syntax error: nothing more to find in it
                problems += e.lines
    if problems:
        raise TemplateProblem("\n".join(problems))
    _check_ordered_teaching(spec)


# Measures over the teacher's top-k and token log-probs: the ensemble's mixture changes them.
TOKEN_MEASURES = ("mean_token_prob", "min_token_prob", "answer_prob", "margin", "entropy")


def _check_ordered_teaching(spec) -> None:
    """teach.order: selection counts answers in band as the teacher gives them: a member whose top-k join
    the targets afterwards would move the measure it counted by (known only from the tokenizers)."""
    from engine.stages.base import teach_order
    from engine.stages.ensemble import member_roles

    if teach_order(spec) != "selection" or spec.mining.confidence not in TOKEN_MEASURES:
        return
    mixed = [role for role in member_roles(spec) if role.logits]
    if mixed:
        raise SpecError(f"{_where(spec)}: teach.order: selection counts the teacher's in-band answers as it gives "
                        f"them, but {mixed[0].name} has the teacher's tokenizer: its top-k join the targets "
                        f"afterwards and move mining.confidence {spec.mining.confidence}: use teach.order: all")


def ensemble_notes(spec) -> list[str]:
    """What each ensemble member gives, one line each (`validate` prints them); none without an ensemble."""
    if getattr(spec, "ensemble", None) is None:
        return []
    from engine.stages.ensemble import member_roles

    return [role.note() for role in member_roles(spec)]


@dataclass
class Shape:
    name: str
    kind: str  # teacher, from_teacher, config, model
    params: int
    ratio: float  # params / the teacher's
    at_least: bool = False  # a trimmed vocabulary, counted at its floor: the dataset's own ids come on top


def _trimmed(student) -> bool:
    return student.kind == "from_teacher" and getattr(student.from_teacher, "vocab", None) is not None


@dataclass
class Shapes:
    rows: list[Shape]  # the teacher first, then each student in spec order
    note: str | None = None  # why there are none (the teacher's config cannot be read here)


def student_shapes(spec) -> Shapes:
    """The teacher's and each student's parameters; SpecError naming students[i] for an impossible shape.

    Without students: nothing. A teacher whose config this machine cannot read (an openai teacher's
    served name, a missing local folder) gives no shapes and a note; a missing `models:` teacher is
    check_teacher's error.
    """
    if not spec.students:
        return Shapes([])
    check_teacher(spec)
    from transformers import AutoConfig

    from engine.models import resolve_causal_lm
    from engine.train.students import student_shape

    try:
        teacher_config = AutoConfig.from_pretrained(resolve_causal_lm(spec.teacher.model))
    except ModelError as e:
        return Shapes([], note=f"student sizes not computed: teacher.model: {e}")
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return Shapes([], note=f"student sizes not computed: teacher.model {spec.teacher.model!r}: {first}")
    rows: list[Shape] = []
    tokenizer = None
    for i, student in enumerate(spec.students):
        trimmed = _trimmed(student)
        if trimmed and tokenizer is None:  # a trimmed vocabulary's floor depends on the teacher's tokenizer
            from engine.models import load_tokenizer

            tokenizer = load_tokenizer(spec.teacher.model)
        try:
            params, ratio = (student_shape(spec, student, teacher_config, tokenizer=tokenizer) if trimmed
                             else student_shape(spec, student, teacher_config))
        except SpecError:
            raise  # names students[i].from_teacher.<field> itself
        except (ModelError, OSError, ValueError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise SpecError(f"{_where(spec)}: students[{i}].{student.kind}: {first}") from None
        rows.append(Shape(student.name, student.kind, params, ratio, at_least=trimmed))
    teacher_params = round(rows[0].params / rows[0].ratio) if rows and rows[0].ratio else 0
    from pathlib import Path

    from engine.models import store_model

    teacher = spec.teacher.model  # a folder by its name, as eval shows it
    shown = teacher if store_model(teacher) is not None else Path(teacher).name or teacher
    return Shapes([Shape(shown, "teacher", teacher_params, 1.0), *rows])


def ratio_text(ratio: float) -> str:
    """'0.37x (2.7x smaller)', '1.00x', '1.20x (1.2x larger)'."""
    if ratio <= 0:
        return "-"
    text = f"{ratio:.2f}x"
    if round(1 / ratio, 1) > 1.0:
        return f"{text} ({1 / ratio:.1f}x smaller)"
    if round(ratio, 1) > 1.0:
        return f"{text} ({ratio:.1f}x larger)"
    return text


def shapes_table(shapes: Shapes):
    """A rich table: student, kind, params (M), vs teacher."""
    from rich.table import Table

    table = Table(title="students")
    table.add_column("model")
    table.add_column("kind")
    table.add_column("params (M)", justify="right")
    table.add_column("vs teacher", justify="right")
    floor = "≥ "
    for row in shapes.rows:
        at_least = floor if row.at_least else ""
        ratio = ratio_text(row.ratio)
        if row.at_least:  # more params than the floor: at most that many times smaller
            ratio = floor + ratio.replace("(", "(≤ ", 1)
        table.add_row(row.name, row.kind, f"{at_least}{row.params / 1e6:.2f}", ratio)
    if any(row.at_least for row in shapes.rows):
        table.caption = f"{floor}a trimmed vocabulary (vocab:) at its floor; the dataset's ids add to it"
    return table

