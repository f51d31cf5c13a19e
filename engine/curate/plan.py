"""`syllabus plan`: what a run would do, without running anything expensive.

For each stage: whether its result is cached. Then the teacher calls still to pay
(exact when the teacher's input can be built from cached or cheap stages, an upper
bound when a skipped stage drops rows, a lower bound when one adds rows or when top-up
rounds may ask for more) and their estimated time from the teacher's measured speed.
With coverage quotas it also says the calls `teach.order: selection` pays at best
(every answer in band: an estimate); with that order the count itself is an upper bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.curate.pipeline import resume_point, stage_keys
from engine.curate.stage_cache import StageCache
from engine.stages.base import RunContext, teach_order
from engine.stages.teach import generation_params, render_teacher_prompts
from engine.stages.teach_order import call_bounds
from engine.teachers import teacher_fingerprint
from engine.teachers.request_cache import TeacherCache, request_key

# Without a measurement: about 100 tokens/s at batch 8 on two CPU cores (measured here).
DEFAULT_TOKENS_PER_SECOND = 100.0


@dataclass
class Plan:
    stages: list[tuple[str, str]] = field(default_factory=list)  # (stage, status)
    teacher_rows: int | None = None
    teacher_calls: int | None = None
    bound: str = ""  # "", "at most ", "at least " or "roughly ": how exact teacher_calls is
    seconds: float | None = None
    speed_source: str = ""
    top_up: bool = False  # coverage.augment_until_quota may ask more after selection: counts are lower bounds
    order: str = "all"  # teach.order
    # Calls teach.order: selection pays if every answer is in band (an estimate), over the same input
    # as teacher_calls; None: no coverage, or the teach stage is cached.
    best_calls: int | None = None


# A top-up round adds teacher calls that cannot be known before selection has run.
LOWER = {"": "at least ", "at least ": "at least ", "at most ": "roughly ", "roughly ": "roughly "}


def make_plan(spec, st) -> Plan:
    from engine.models import use_store

    use_store(st.root)  # a `models:RUN_ID/STUDENT` teacher is a student of this store
    ctx = RunContext(spec=spec, cache_dir=st.root / "cache", progress=False, store=st)
    cache = StageCache(ctx.cache_dir)
    keyed = stage_keys(spec, st)
    start = resume_point(keyed, cache)
    plan = Plan(top_up=bool(spec.coverage and spec.coverage.augment_until_quota), order=teach_order(spec))
    for i, (stage, key) in enumerate(keyed):
        if i <= start:
            status = "cached" if i == start or stage.cached else "cached (record)"
        elif stage.cached and cache.has_output(key):
            status = "cached, but an earlier stage must run first"
        else:
            status = "to run"
        plan.stages.append((stage.name, status))
    teach_at = next(i for i, (stage, _) in enumerate(keyed) if stage.calls_teacher)
    if start >= teach_at:
        plan.teacher_calls, plan.teacher_rows, plan.seconds = 0, None, 0.0
        plan.bound = LOWER[""] if plan.top_up else ""
        return plan
    frame = cache.load_output(keyed[start][1]) if start >= 0 else None
    skipped_adds = skipped_drops = False
    for stage, _ in keyed[start + 1 : teach_at]:
        if not stage.cheap(spec, frame):
            # Skipping a stage that adds rows (teacher rewrites) undercounts; one that drops rows overcounts.
            skipped_adds |= stage.adds_rows
            skipped_drops |= stage.drops_rows and not stage.adds_rows
            continue
        frame, _, _ = stage.run(frame, ctx)
    plan.bound = {(False, False): "", (False, True): "at most ", (True, False): "at least "}.get(
        (skipped_adds, skipped_drops), "roughly ")
    if plan.order == "selection":  # asking stops early once quotas fill: what it will pay is at most the count
        plan.bound = {"": "at most ", "at least ": "roughly "}.get(plan.bound, plan.bound)
    if plan.top_up:
        plan.bound = LOWER[plan.bound]
    _count_calls(plan, frame, spec, ctx)
    return plan


def _count_calls(plan: Plan, frame, spec, ctx) -> None:
    fingerprint = teacher_fingerprint(spec.teacher)
    params = generation_params(spec)
    row_keys = [None if p is None else request_key(fingerprint, params, p) for p in render_teacher_prompts(frame, spec)[0]]
    keys = {k for k in row_keys if k is not None}
    answers = TeacherCache(ctx.cache_dir / "teacher.sqlite")
    try:
        cached = set(answers.get_many(sorted(keys)))
        measured = answers.speed(fingerprint)
    finally:
        answers.close()
    plan.teacher_rows, plan.teacher_calls = len(keys), len(keys - cached)
    if spec.coverage is not None:  # what ordered teaching may ask, and pays at best
        rows, most, plan.best_calls = call_bounds(frame, row_keys, cached, spec)
        if plan.order == "selection":
            plan.teacher_rows, plan.teacher_calls = rows, most
    if measured:
        seconds_per_row, _ = measured
        plan.seconds = plan.teacher_calls * seconds_per_row
        plan.speed_source = f"measured here: {1 / seconds_per_row:.2f} rows/s"
    else:
        tokens = spec.teacher.generation.max_new_tokens
        plan.seconds = plan.teacher_calls * tokens / DEFAULT_TOKENS_PER_SECOND
        plan.speed_source = f"not measured yet: assuming {DEFAULT_TOKENS_PER_SECOND:.0f} tokens/s, {tokens} tokens per answer"
