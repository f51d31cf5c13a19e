"""On-policy rows as data, the teach side: a trained student answers, the teacher scores its tokens.

Rows of a `from: students:RUN_ID/STUDENT` source (engine/stages/student_source.py) are never answered by
the teacher. Each is read by its student as the student read it in training (engine.train.data's
student_conversations over the row of the version it was trained on, with the spec that version was made
from: training.student_prompt, student_chat, student_system, student_messages; each unset: the teacher's;
the spec sets none: the teacher_prompt as one chat turn), as `syllabus export` reads it. The student
generates (greedy by default, or sampled at the source's temperature with its seed); then the teacher
reads its own context (teacher.prompt over the row) followed by exactly those tokens, teacher-forced
(engine/teachers/forced.py). Both go through the request cache: the student's answers keyed by its
weights' fingerprint, its context and its settings; the scorings by the teacher's, its context and the
token ids. A re-run pays nothing and loads no model.
"""

from __future__ import annotations

import gc

import polars as pl

from engine.errors import SpecError, StageError, TrainError
from engine.progress import progress_bar
from engine.stages.base import RunContext, rejections
from engine.stages.student_source import SOURCE_INDEX, STUDENT_ROW, model_name, trained_student
from engine.teachers import TeacherOutput, context_teacher, teacher_fingerprint
from engine.teachers.forced import forced_outputs


def answer_student_rows(rows: pl.DataFrame, ctx: RunContext) -> tuple[pl.DataFrame, pl.DataFrame, dict]:
    """The student's answers with the teacher's scorings, as teach's columns; rows whose teacher prompt
    cannot render are rejected as teach rejects them. Returns (answered, rejected, stats)."""
    from engine.stages.teach import Teach, render_teacher_prompts

    spec = ctx.spec
    prompts, problems = render_teacher_prompts(rows, spec)
    rendered = pl.Series([p is not None for p in prompts], dtype=pl.Boolean)
    bad, rows, prompts = rows.filter(~rendered), rows.filter(rendered), [p for p in prompts if p is not None]
    answers, student_calls = _student_answers(rows, ctx)
    scored, scorings = _teacher_scorings(prompts, [a.token_ids for a in answers], ctx)
    outputs = [TeacherOutput(a.text, a.token_ids, s.token_logprobs, s.topk_ids, s.topk_logprobs,
                             finish_reason=a.finish_reason) for a, s in zip(answers, scored)]
    answered = Teach._attach(rows, prompts, outputs, spec)
    dropped = rejections(bad, "teach", pl.Series([p for p in problems if p is not None], dtype=pl.String))
    stats = {"rows": rows.height, "student_calls": student_calls, "teacher_scorings": scorings,
             "scored_by": teacher_fingerprint(spec.teacher)}
    return answered, dropped, stats


# --- the student answers -----------------------------------------------------------------------------


def _student_answers(rows: pl.DataFrame, ctx: RunContext) -> tuple[list, int]:
    """Each row's answer by its source's student, one student loaded at a time (through ask_teacher, with
    the student in the teacher's place). Returns (answers in row order, new generations)."""
    from engine.stages.teach import ask_teacher

    answers: list = [None] * rows.height
    calls = 0
    for index, positions in _by_source(rows).items():
        src = ctx.spec.sources[index]
        contexts = student_contexts(rows[positions], index, ctx)
        sub = RunContext(spec=_student_spec(ctx.spec, src), cache_dir=ctx.cache_dir, progress=ctx.progress,
                         store=ctx.store)
        found, new = ask_teacher(sub, contexts, f"student {src.student[1]}")
        for i, answer in zip(positions, found):
            answers[i] = answer
        calls += new
        sub.teacher = None  # one model besides the teacher in memory at a time
        gc.collect()
    return answers, calls


def _by_source(rows: pl.DataFrame) -> dict[int, list[int]]:
    """Row positions per student source: each has its own student and generation settings."""
    positions: dict[int, list[int]] = {}
    for i, index in enumerate(rows[SOURCE_INDEX].to_list()):
        positions.setdefault(index, []).append(i)
    return positions


def _student_spec(spec, src):
    """The spec with the student in the teacher's place, answering as its source says."""
    from engine.spec import Generation, Logprobs, Teacher

    generation = Generation(max_new_tokens=src.max_new_tokens or spec.teacher.generation.max_new_tokens,
                            temperature=src.temperature, seed=src.seed)
    student = Teacher(model=model_name(src), generation=generation, logprobs=Logprobs(top_k=1),  # its top-k: unused
                      batch_size=spec.teacher.batch_size, device=spec.teacher.device)
    return spec.model_copy(update={"teacher": student})


def student_contexts(rows: pl.DataFrame, index: int, ctx: RunContext) -> list:
    """What the student read in training of each row: its row of the trained-on version (STUDENT_ROW),
    through student_conversations with the spec that version was made from."""
    from engine.export import lineage_spec
    from engine.prompts import Conversation
    from engine.train.data import student_conversations

    trained = trained_student(None, ctx.store, index, ctx.spec.sources[index])
    info = ctx.store.resolve(trained["dataset"])
    version = _version_rows(ctx.store, info, rows[STUDENT_ROW].to_list(), index)
    try:
        spec = lineage_spec(info)
    except SpecError as e:
        raise StageError(f"sources[{index}].from: {info.ref}: the spec it was made from no longer parses, so the "
                         f"student's context is unknown ({e.lines[0]})") from None
    if spec is None:  # the defaults: one chat user turn, the teacher's prompt
        return [Conversation(p) for p in version["teacher_prompt"].to_list()]
    try:
        return student_conversations(version, spec)
    except TrainError as e:
        raise StageError(f"sources[{index}].from: {info.ref}: {e}") from None


def _version_rows(st, info, prompt_ids: list[str], index: int) -> pl.DataFrame:
    """The version's rows with these prompt_ids, in that order (no token lists: no template reads them)."""
    import pyarrow as pa

    schema = st.sql("SELECT * FROM examples LIMIT 0", at=info.ref).schema
    scalar = [f.name for f in schema if not pa.types.is_nested(f.type)]
    examples = st.read(info, "examples", columns=scalar)
    if "teacher_prompt" not in examples.columns:  # a table committed by hand: the prompt is all there is
        examples = examples.with_columns(teacher_prompt=pl.col("prompt"))
    wanted = pl.DataFrame({"prompt_id": prompt_ids})
    found = wanted.join(examples.unique("prompt_id", keep="first", maintain_order=True), on="prompt_id",
                        how="left", maintain_order="left")
    if found["teacher_prompt"].null_count():
        raise StageError(f"sources[{index}].from: {info.ref} holds no prompt_id for some rows read from it: "
                         "their student context is unknown")
    return found


# --- the teacher scores -------------------------------------------------------------------------------


def _teacher_scorings(prompts: list, responses: list, ctx: RunContext) -> tuple[list, int]:
    """The teacher's log-prob and top-k at each of the student's tokens, read from its own context."""
    teacher = ctx.spec.teacher

    def load():
        loaded = context_teacher(ctx)
        return loaded.model, loaded.tokenizer

    with progress_bar(ctx.progress) as bar:
        task = bar.add_task("scoring", total=len(prompts))
        scored, new = forced_outputs(ctx.cache_dir, teacher_fingerprint(teacher), prompts, responses,
                                     teacher.logprobs.top_k, load, teacher.batch_size,
                                     on_batch=lambda n: bar.advance(task, n))
    ctx.counters["teacher_calls"] = ctx.counters.get("teacher_calls", 0) + new
    return scored, new


# --- what a run would pay (syllabus plan) ---------------------------------------------------------------


def calls_to_pay(rows: pl.DataFrame, ctx: RunContext) -> tuple[int, int]:
    """(student answers, teacher scorings) a run would pay for these student-source rows, read from the
    request cache without loading a model: an answer not cached yet means its scoring is not either."""
    from engine.stages.teach import generation_params, render_teacher_prompts
    from engine.teachers.forced import forced_key
    from engine.teachers.request_cache import TeacherCache, request_key

    prompts, _ = render_teacher_prompts(rows, ctx.spec)
    kept = [i for i, p in enumerate(prompts) if p is not None]  # the rest teach rejects, unasked
    rows, prompts = rows[kept], [prompts[i] for i in kept]
    teacher = ctx.spec.teacher
    scorer = teacher_fingerprint(teacher)
    cache = TeacherCache(ctx.cache_dir / "teacher.sqlite")
    try:
        answers_missing, scorings_missing, unanswered = set(), set(), 0
        for index, positions in _by_source(rows).items():
            student = _student_spec(ctx.spec, ctx.spec.sources[index])
            fingerprint, params = teacher_fingerprint(student.teacher), generation_params(student)
            keys = [request_key(fingerprint, params, c) for c in student_contexts(rows[positions], index, ctx)]
            found = cache.get_many(keys)
            answers_missing |= {k for k in keys if k not in found}
            scorings = {forced_key(scorer, teacher.logprobs.top_k, prompts[i], found[k].token_ids)
                        for i, k in zip(positions, keys) if k in found}
            scored = cache.get_many(sorted(scorings))
            scorings_missing |= scorings - set(scored)
            unanswered += sum(k not in found for k in keys)  # its scoring is not cached either
    finally:
        cache.close()
    return len(answers_missing), len(scorings_missing) + unanswered
