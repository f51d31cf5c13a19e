"""Teach: send each row's teacher_prompt to the teacher; keep the response and its top-k.

Answers are cached per row by content, so a re-run or a resumed run never pays twice,
and the teacher is not even loaded when every answer is cached.

With teacher.reasoning, each response is split at the answer marker into `reasoning` and `answer`;
a response without the marker keeps `answer` null (counted as answer_format_broken in the stats).
With teacher.samples N > 1, sample i of a prompt is asked with generation.seed + i (its own cache
entry): sample 0 is the row's response, the one distilled, and `sample_responses` / `sample_answers`
hold all N.

Rows of a `from: students:RUN_ID/STUDENT` source (origin "student") are not answered by the teacher:
the student answers and the teacher scores its tokens (engine/teachers/student_answers.py).
"""

from __future__ import annotations

import copy
import dataclasses
import time

import numpy as np
import polars as pl
import pyarrow as pa

from engine.errors import RenderLimit
from engine.progress import progress_bar
from engine.prompts import Conversation, as_conversation, conversations, teacher_side
from engine.stages.base import RunContext, Stage, dump, rejections, teach_order, teacher_key
from engine.teachers import context_teacher, teacher_fingerprint
from engine.teachers.answers import split_answer
from engine.teachers.arrow import list_column, nested_list_column
from engine.teachers.request_cache import TeacherCache, request_key
from engine.templates import render, spec_template


def render_teacher_prompts(frame: pl.DataFrame, spec) -> tuple[list[Conversation | None], list[str | None]]:
    """What the teacher is asked, per row: the row through teacher.prompt plus the reasoning suffix,
    in teacher.system and teacher.messages (rendered over the row) as teacher.chat says.

    Returns (conversations, problems): a row whose render runs past its limits has no conversation
    and its problem instead (a bad row, naming the template and line).
    """
    template = spec_template(spec, "teacher.prompt", spec.teacher.prompt) if spec.teacher.prompt else None
    suffix = spec.teacher.reasoning.suffix if spec.teacher.reasoning else ""
    rows = frame.drop("embedding", strict=False).to_dicts()  # 384 floats a row are no template's business
    prompts, problems = [], []
    for row in rows:
        try:
            prompts.append((render(template, row) if template else row["prompt"]) + suffix)
            problems.append(None)
        except RenderLimit as e:
            prompts.append(None)
            problems.append(str(e))
    found, turn_problems = conversations(spec, teacher_side(spec), rows, prompts)
    return found, [p or q for p, q in zip(problems, turn_problems)]


def teacher_prompts(frame: pl.DataFrame, spec) -> list[Conversation]:
    """What the teacher will be sent for these rows (rows that cannot render are left out)."""
    return [p for p in render_teacher_prompts(frame, spec)[0] if p is not None]


def teacher_contexts(rows: pl.DataFrame, spec) -> list[Conversation]:
    """The teacher's conversations of rows it has answered: their stored teacher_prompt, in the turns
    of teacher.system and teacher.messages rendered over each row (eval: the teacher's own context)."""
    from engine.errors import TrainError

    dicts = rows.select([c for c in rows.columns if not rows.schema[c].is_nested()]).to_dicts()
    found, problems = conversations(spec, teacher_side(spec), dicts, rows["teacher_prompt"].to_list())
    for row, problem in zip(dicts, problems):
        if problem:
            raise TrainError(f"example {str(row.get('prompt_id', '?'))[:12]}: {problem}")
    return found


def generation_params(spec, max_new_tokens: int | None = None) -> dict:
    t = spec.teacher
    generation = t.generation.model_dump()
    if max_new_tokens:
        generation["max_new_tokens"] = max_new_tokens
    params = {"generation": generation, "top_k": t.logprobs.top_k}
    if t.logprobs.mode != "topk":  # keyed apart from top-k answers; top-k keys stay as they were
        params["logprobs_mode"] = t.logprobs.mode
    return params


def ask_teacher(ctx: RunContext, prompts: list[str | Conversation], label: str = "teach", *,
                max_new_tokens: int | None = None) -> tuple[list, int]:
    """The teacher's output for each prompt (a Conversation, or a text: one chat user turn), from the
    cache where it is there.

    Returns (outputs in prompt order, number of new teacher calls). Each batch of fresh
    answers is committed to the cache as soon as it is answered, so an interrupt loses
    at most the batch in flight.
    """
    spec = ctx.spec
    fingerprint = teacher_fingerprint(spec.teacher)
    params = generation_params(spec, max_new_tokens)
    keys = [request_key(fingerprint, params, p) for p in prompts]
    cache = TeacherCache(ctx.cache_dir / "teacher.sqlite")
    try:
        answers = cache.get_many(keys)
        todo = sorted({k: p for k, p in zip(keys, prompts) if k not in answers}.items())
        if todo:
            answers.update(_generate(todo, ctx, cache, label, params["generation"]["max_new_tokens"]))
    finally:
        cache.close()
    ctx.counters["teacher_calls"] = ctx.counters.get("teacher_calls", 0) + len(todo)
    return [answers[k] for k in keys], len(todo)


def sample_context(ctx: RunContext, i: int) -> RunContext:
    """The run as sample i asks the teacher: generation.seed + i, so each sample has its own cache key
    (sample 0 is the run itself). Counters and the loaded teacher are shared with `ctx`."""
    if i == 0:
        return ctx
    t = ctx.spec.teacher
    generation = t.generation.model_copy(update={"seed": t.generation.seed + i})
    spec = ctx.spec.model_copy(update={"teacher": t.model_copy(update={"generation": generation})})
    return dataclasses.replace(ctx, spec=spec, teacher=_reseeded(ctx.teacher, spec.teacher))


def _reseeded(teacher, spec_teacher):
    """The loaded teacher reading another seed: both backends read their generation settings from `spec`
    at each call, so a shallow copy shares the weights (or the server connection) and changes only that."""
    if teacher is None:
        return None
    view = copy.copy(teacher)
    view.spec = spec_teacher
    return view


def ask_samples(ctx: RunContext, prompts: list, label: str = "teach") -> tuple[list[list], int]:
    """Samples 1 .. teacher.samples - 1 of each prompt (sample 0 is what ask_teacher gives), each through
    ask_teacher, so every sample is cached as it comes. Returns (per sample, outputs in prompt order; new calls)."""
    n = ctx.spec.teacher.samples
    found, calls = [], 0
    for i in range(1, n):
        sub = sample_context(ctx, i)
        outputs, new = ask_teacher(sub, prompts, f"{label}, sample {i + 1} of {n}")
        if ctx.teacher is None and sub.teacher is not None:  # loaded for this sample: later ones reuse it
            ctx.teacher = _reseeded(sub.teacher, ctx.spec.teacher)
        found.append(outputs)
        calls += new
    return found, calls


def _generate(todo: list[tuple[str, str | Conversation]], ctx: RunContext, cache: TeacherCache, label: str,
              max_new_tokens: int | None = None) -> dict:
    from engine.curate.executors import current_cluster

    cluster = current_cluster()  # a Ray cluster's actors answer instead, each with its own teacher
    if cluster is None:  # (a CUDA teacher.device this machine lacks fails in preflight and in the backend)
        context_teacher(ctx)
    fingerprint = ctx.teacher.fingerprint if ctx.teacher is not None else teacher_fingerprint(ctx.spec.teacher)
    # Everything to be asked goes to the teacher in one call, so it batches prompts of like length across
    # all of them (and runs their shared prefix once); each answered batch is committed, timed and shown.
    last = time.perf_counter()
    with progress_bar(ctx.progress) as bar:
        task = bar.add_task(label, total=len(todo))

        def commit(indices, outputs):
            nonlocal last
            cache.put_many({todo[i][0]: o for i, o in zip(indices, outputs)})
            now = time.perf_counter()
            seconds, last = now - last, now
            cache.record_speed(fingerprint, len(indices), sum(len(o.token_ids) for o in outputs), seconds)
            ctx.counters["teacher_seconds"] = ctx.counters.get("teacher_seconds", 0.0) + seconds
            bar.advance(task, len(indices))

        # One plain chat user turn goes as its text, as every prompt did before conversations existed.
        sent = [p.prompt if isinstance(p, Conversation) and p.plain else p for _, p in todo]
        if cluster is None:
            outs = ctx.teacher.generate(sent, on_batch=commit, max_new_tokens=max_new_tokens)
        else:
            order, shared = cluster_plan(ctx.spec.teacher, sent)
            outs = cluster.map_rows(Teach(), [(p, max_new_tokens, shared) for p in sent], ctx, on_batch=commit,
                                    order=order, unit=ctx.spec.teacher.batch_size)
    return {k: o for (k, _), o in zip(todo, outs)}


def cluster_plan(teacher_spec, prompts: list) -> tuple[list[int] | None, int | None]:
    """For a local teacher on a Ray cluster: the order and shared prefix its one local call would batch
    `prompts` by (engine/teachers/transformers_backend.py: batch_plan), so that each actor, handed slices of
    that order, answers every prompt in the batch, and with the prefix, the local call does: the same rows,
    log-probs included. A server teacher answers each request alone: (None, None)."""
    if teacher_spec.backend != "transformers":
        return None, None
    from engine.models import load_tokenizer
    from engine.prompts import prompt_ids
    from engine.teachers.transformers_backend import batch_plan

    tokenizer = load_tokenizer(teacher_spec.local_model)
    return batch_plan([prompt_ids(tokenizer, p) for p in prompts])


def finish_reasons(outputs, spec) -> list[str]:
    """Each answer's finish_reason; answers cached before it was kept get it from their last token."""
    if all(o.finish_reason for o in outputs):
        return [o.finish_reason for o in outputs]
    from engine.models import load_tokenizer

    eos = load_tokenizer(spec.teacher.local_model).eos_token_id
    return [o.finish_reason or ("stop" if len(o.token_ids) and o.token_ids[-1] == eos else "length")
            for o in outputs]


def _prefilled(teacher) -> tuple[int, int]:
    """(prompt tokens run, of which padding) so far by a local teacher (engine/teachers/transformers_backend.py)."""
    tally = getattr(teacher, "tally", None)
    return (tally.prefilled_tokens, tally.padding_tokens) if tally else (0, 0)


class Teach(Stage):
    name = "teach"
    order = 60
    cached = True
    calls_teacher = True
    top_up = "new_rows"
    per_row = True

    def process_rows(self, items: list, ctx: RunContext) -> list:
        """(prompt as sent, max_new_tokens, shared prefix length) through this worker's teacher, loaded on its
        first batch. One ask_teacher call's items share max_new_tokens and the prefix (cluster_plan)."""
        if not items:
            return []
        _, max_new_tokens, shared = items[0]
        plan = {} if shared is None else {"shared": shared}
        return context_teacher(ctx).generate([p for p, _, _ in items], max_new_tokens=max_new_tokens, **plan)

    def cache_slice(self, spec, store):
        key = [teacher_key(spec.teacher), teacher_fingerprint(spec.teacher)]  # the prompt template's text is in dump
        if teach_order(spec) == "selection":  # which rows are asked: the quotas, selection's seed, the band
            mining = spec.mining
            key.append({"teach": dump(spec.teach), "coverage": dump(spec.coverage),
                        "seed": spec.diversity.seed if spec.diversity else 0,
                        "mining": [mining.confidence, list(mining.band), mining.truncated]})
        return key

    def run_new_rows(self, batch: pl.DataFrame, kept: pl.DataFrame, ctx: RunContext):
        """Top-up variations are made for a category short of its quota: every one is asked."""
        return self.run(batch, ctx, ordered=False)

    def run(self, frame: pl.DataFrame, ctx: RunContext, *, ordered: bool | None = None):
        """ordered (default: teach.order is selection): ask in selection's order, up to the quotas.
        A student source's rows are the student's answers, scored by the teacher: all of them, unordered."""
        from engine.stages.student_source import split_student_rows

        frame, by_students = split_student_rows(frame)
        if not by_students.height:
            return self._teach(frame, ctx, ordered=ordered)
        from engine.teachers.student_answers import answer_student_rows

        answered, dropped, stats = (self._teach(frame, ctx, ordered=ordered) if frame.height else
                                    (None, None, {"rows": 0, "teacher_calls": 0,
                                                  "logprobs_mode": ctx.spec.teacher.logprobs.mode}))
        scored, unrendered, stats["students"] = answer_student_rows(by_students, ctx)
        answered = scored if answered is None else pl.concat([answered, scored], how="diagonal_relaxed")
        dropped = unrendered if dropped is None else pl.concat([dropped, unrendered])
        return answered, dropped, stats

    def _teach(self, frame: pl.DataFrame, ctx: RunContext, *, ordered: bool | None = None):
        spec = ctx.spec
        prompts, problems = render_teacher_prompts(frame, spec)
        rendered = pl.Series([p is not None for p in prompts], dtype=pl.Boolean)
        bad = frame.filter(~rendered)
        frame, prompts = frame.filter(rendered), [p for p in prompts if p is not None]
        skipped, order_stats = None, {}
        prefilled_before = _prefilled(ctx.teacher)
        if ordered is None:
            ordered = teach_order(spec) == "selection"
        if ordered:
            from engine.stages.teach_order import ask_in_selection_order

            frame, prompts, outputs, calls, skipped, order_stats = ask_in_selection_order(frame, prompts, ctx)
        else:
            outputs, calls = ask_teacher(ctx, prompts)
        more, more_calls = ask_samples(ctx, prompts)  # teacher.samples > 1: the rows taught, samples 1..N-1
        calls += more_calls
        answered = self._attach(frame, prompts, outputs, spec, samples=more)
        stats = {"rows": frame.height, "cached": frame.height * spec.teacher.samples - calls, "teacher_calls": calls,
                 "generated_tokens": int(sum(len(o.token_ids) for outs in [outputs, *more] for o in outs)),
                 "render_limit": bad.height,
                 # chosen tokens a server returned as text no single id renders: stored as -1, never guessed
                 "unmapped_tokens": int(sum(int((o.token_ids < 0).sum()) for o in outputs))}
        ran, padding = (after - before for after, before in zip(_prefilled(ctx.teacher), prefilled_before))
        if ran:  # a local teacher generated: the share of the prompt tokens it ran that were padding
            stats["padding_share"] = round(padding / ran, 4)
        if spec.teacher.samples > 1:
            stats["samples"] = spec.teacher.samples
        stats["logprobs_mode"] = spec.teacher.logprobs.mode  # what topk_* hold: training reads it from lineage
        if spec.teacher.reasoning:  # responses without the answer marker: kept, with answer null
            stats["answer_format_broken"] = answered["answer"].null_count()
        if prompts and not prompts[0].plain:  # what lineage shows of the teacher's context (the first row's)
            stats["teacher_context"] = prompts[0].context()
        stats.update(order_stats)
        if isinstance(getattr(spec.teacher, "base_url", None), list) and ctx.teacher is not None:
            stats["endpoints"] = ctx.teacher.endpoint_stats()  # a pool: who answered what, who was taken out
        dropped = rejections(bad, self.name, pl.Series([p for p in problems if p is not None], dtype=pl.String))
        if skipped is not None and skipped.height:  # rows teach.order: selection never asked
            dropped = pl.concat([dropped, skipped])
        return answered, dropped, stats

    @staticmethod
    def _attach(frame: pl.DataFrame, prompts: list[str | Conversation], outputs, spec,
                samples: list[list] | None = None) -> pl.DataFrame:
        """The teacher's columns beside the rows; teacher_prompt is each row's own prompt (the last user
        turn, or the whole plain text), the system message and turns are the spec's. samples: the outputs
        of samples 1..N-1 (ask_samples); given, sample_responses and sample_answers hold all N, sample 0 first."""
        prompts = [as_conversation(p).prompt for p in prompts]
        marker = spec.teacher.reasoning.answer_marker if spec.teacher.reasoning else None
        split = [split_answer(o.text, marker) for o in outputs]
        if samples:
            each = list(zip(outputs, *samples))
            frame = frame.with_columns(
                sample_responses=pl.Series([[o.text for o in row] for row in each], dtype=pl.List(pl.String)),
                sample_answers=pl.Series([[split_answer(o.text, marker)[1] for o in row] for row in each],
                                         dtype=pl.List(pl.String)))
        tokens = pa.table({
            "token_ids": list_column([o.token_ids for o in outputs], np.int32),
            "token_logprobs": list_column([o.token_logprobs for o in outputs], np.float32),
            "topk_ids": nested_list_column([o.topk_ids for o in outputs], np.int32),
            "topk_logprobs": nested_list_column([o.topk_logprobs for o in outputs], np.float16),
        })
        return pl.concat([
            frame.with_columns(
                teacher_prompt=pl.Series(prompts, dtype=pl.String),
                response=pl.Series([o.text for o in outputs], dtype=pl.String),
                reasoning=pl.Series([r for r, _ in split], dtype=pl.String),
                answer=pl.Series([a for _, a in split], dtype=pl.String),
                finish_reason=pl.Series(finish_reasons(outputs, spec), dtype=pl.String),
            ),
            pl.from_arrow(tokens),
        ], how="horizontal")
