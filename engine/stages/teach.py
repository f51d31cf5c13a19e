"""Teach: send each row's teacher_prompt to the teacher; keep the response and its top-k.

Answers are cached per row by content, so a re-run or a resumed run never pays twice,
and the teacher is not even loaded when every answer is cached.
"""

from __future__ import annotations

import time

import numpy as np
import polars as pl
import pyarrow as pa

from engine.teachers.answers import split_answer
from engine.teachers.arrow import list_column, nested_list_column
from engine.teachers.request_cache import TeacherCache, request_key
from engine.progress import progress_bar
from engine.stages.base import RunContext, no_rejections
from engine.teachers import load_teacher, teacher_fingerprint
from engine.templates import load_template, render


def teacher_prompts(frame: pl.DataFrame, spec) -> list[str]:
    """What the teacher is asked: the row through teacher.prompt, plus the reasoning suffix."""
    template = load_template(spec.resolve_path(spec.teacher.prompt)) if spec.teacher.prompt else None
    suffix = spec.teacher.reasoning.suffix if spec.teacher.reasoning else ""
    rows = frame.drop("embedding", strict=False).to_dicts()  # 384 floats a row are no template's business
    texts = [render(template, row) if template else row["prompt"] for row in rows]
    return [text + suffix for text in texts]


def generation_params(spec, max_new_tokens: int | None = None) -> dict:
    t = spec.teacher
    generation = t.generation.model_dump()
    if max_new_tokens:
        generation["max_new_tokens"] = max_new_tokens
    return {"generation": generation, "top_k": t.logprobs.top_k}


def ask_teacher(ctx: RunContext, prompts: list[str], label: str = "teach", *,
                max_new_tokens: int | None = None) -> tuple[list, int]:
    """The teacher's output for each prompt, from the cache where it is there.

    Returns (outputs in prompt order, number of new teacher calls). Fresh answers are
    committed to the cache every few batches, so an interrupt loses at most one chunk.
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


def _generate(todo: list[tuple[str, str]], ctx: RunContext, cache: TeacherCache, label: str,
              max_new_tokens: int | None = None) -> dict:
    if ctx.teacher is None:
        began = time.perf_counter()
        ctx.teacher = load_teacher(ctx.spec.teacher)
        ctx.counters["teacher_load_seconds"] = time.perf_counter() - began
    answers = {}
    chunk = ctx.spec.teacher.batch_size * 4
    with progress_bar(ctx.progress) as bar:
        task = bar.add_task(label, total=len(todo))
        for start in range(0, len(todo), chunk):
            part = todo[start : start + chunk]
            began = time.perf_counter()
            outs = ctx.teacher.generate([p for _, p in part], on_batch=lambda n: bar.advance(task, n),
                                        max_new_tokens=max_new_tokens)
            fresh = {k: o for (k, _), o in zip(part, outs)}
            cache.put_many(fresh)
            seconds = time.perf_counter() - began
            cache.record_speed(ctx.teacher.fingerprint, len(part), sum(len(o.token_ids) for o in outs), seconds)
            ctx.counters["teacher_seconds"] = ctx.counters.get("teacher_seconds", 0.0) + seconds
            answers.update(fresh)
    return answers


class Teach:
    name = "teach"

    def run(self, frame: pl.DataFrame, ctx: RunContext):
        spec = ctx.spec
        prompts = teacher_prompts(frame, spec)
        outputs, calls = ask_teacher(ctx, prompts)
        stats = {"rows": frame.height, "cached": frame.height - calls, "teacher_calls": calls,
                 "generated_tokens": int(sum(len(o.token_ids) for o in outputs))}
        return self._attach(frame, prompts, outputs, spec), no_rejections(), stats

    @staticmethod
    def _attach(frame: pl.DataFrame, prompts: list[str], outputs, spec) -> pl.DataFrame:
        marker = spec.teacher.reasoning.answer_marker if spec.teacher.reasoning else None
        split = [split_answer(o.text, marker) for o in outputs]
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
            ),
            pl.from_arrow(tokens),
        ], how="horizontal")
