"""`syllabus plan`: what a run would do, without running anything expensive.

For each stage: whether its result is cached. Then the teacher calls still to pay, one per
prompt and sample (teacher.samples) (exact when the teacher's input can be built from cached or cheap stages, an upper
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
from engine.stages.teach import generation_params, render_teacher_prompts, sample_context
from engine.stages.teach_order import call_bounds
from engine.teachers import teacher_fingerprint
from engine.teachers.request_cache import TeacherCache, request_key

# Without a measurement: about 100 tokens/s at batch 8 on two CPU cores (measured here).
DEFAULT_TOKENS_PER_SECOND = 100.0


@dataclass
class Plan:
    stages: list[tuple[str, str]] = field(default_factory=list)  # (stage, status)
    teacher_rows: int | None = None  # requests: prompts x teacher.samples
    samples: int = 1  # teacher.samples: requests per prompt
    teacher_calls: int | None = None
    bound: str = ""  # "", "at most ", "at least " or "roughly ": how exact teacher_calls is
    seconds: float | None = None
    speed_source: str = ""
    top_up: bool = False  # coverage.augment_until_quota may ask more after selection: counts are lower bounds
    order: str = "all"  # teach.order
    # Calls teach.order: selection pays if every answer is in band (an estimate), over the same input
    # as teacher_calls; None: no coverage, or the teach stage is cached.
    best_calls: int | None = None
    # ensemble: per member, the prompts it is asked and the answers and scorings still to pay (member_calls)
    # Rows of `from: students:` sources: their students answer (student_calls to pay), the teacher scores
    # (scorings to pay, one teacher call each, counted in teacher_calls as a run counts them).
    student_rows: int = 0
    student_calls: int = 0
    scorings: int = 0
    members: list[dict] = field(default_factory=list)


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
        plan.members = _member_calls(spec, keyed, start, cache, None, ctx)
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
    plan.members = _member_calls(spec, keyed, start, cache, frame, ctx)
    return plan


def _count_calls(plan: Plan, frame, spec, ctx) -> None:
    from engine.stages.student_source import split_student_rows
    from engine.teachers.student_answers import calls_to_pay

    fingerprint = teacher_fingerprint(spec.teacher)
    frame, by_students = split_student_rows(frame)  # answered by their students, scored by the teacher
    if by_students.height:
        plan.student_rows = by_students.height
        plan.student_calls, plan.scorings = calls_to_pay(by_students, ctx)
    prompts = render_teacher_prompts(frame, spec)[0]
    # One request per row and sample: sample i is asked with generation.seed + i, a key of its own.
    plan.samples = spec.teacher.samples
    per_sample = []
    for i in range(plan.samples):
        params = generation_params(sample_context(ctx, i).spec)
        per_sample.append([None if p is None else request_key(fingerprint, params, p) for p in prompts])
    keys = {k for row_keys in per_sample for k in row_keys if k is not None}
    answers = TeacherCache(ctx.cache_dir / "teacher.sqlite")
    try:
        cached = set(answers.get_many(sorted(keys)))
        measured = answers.speed(fingerprint)
    finally:
        answers.close()
    plan.teacher_rows, plan.teacher_calls = len(keys) + plan.student_rows, len(keys - cached) + plan.scorings
    if spec.coverage is not None:  # what ordered teaching may ask, and pays at best (samples: for the rows it asks)
        bounds = [call_bounds(frame, row_keys, cached, spec) for row_keys in per_sample]
        rows, most, plan.best_calls = (sum(b[i] for b in bounds) for i in range(3))
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


def _member_calls(spec, keyed, start: int, cache: StageCache, teach_input, ctx) -> list[dict]:
    """Each ensemble member's calls over the ensemble stage's input: the cached output before it when
    there is one (the teacher's responses known: scorings counted too), else the teach stage's input."""
    if getattr(spec, "ensemble", None) is None:
        return []
    from engine.stages.ensemble import member_calls

    names = [stage.name for stage, _ in keyed]
    at, teach_at = names.index("ensemble"), next(i for i, (stage, _) in enumerate(keyed) if stage.calls_teacher)
    if start >= at:
        return member_calls(spec, None, ctx.cache_dir)
    frame = cache.load_output(keyed[start][1]) if start >= teach_at else teach_input
    return member_calls(spec, frame, ctx.cache_dir)


def member_lines(plan: Plan) -> list[str]:
    """What `plan` says of each ensemble member's calls."""
    lines = []
    for m in plan.members:
        if m["prompts"] is None:
            lines.append(f"{m['member']}: 0 calls to pay (the ensemble stage is cached)")
            continue
        line = f"{m['member']}: {plan.bound}{m['answers']} answers to pay of {m['prompts']} prompts"
        if "scorings" in m:
            line += (", then a scoring of each new response of the teacher" if m["scorings"] is None
                     else f", {plan.bound}{m['scorings']} scorings of the teacher's responses")
        lines.append(line)
    return lines
