"""User templates: Jinja2 in a sandbox, with strict undefined variables.

Problems surface at validate time, all of them, one line each naming the template and line:
syntax errors, variables a template cannot see (checked statically against the names its
stage gives it), reaching for Python internals (`__class__`, `__globals__`, ...), which the
sandbox also refuses at render time for what static checks cannot see, `{% include %}` and
its kin, and constant `**`/`*` too large to compute.

Compiling never runs template code (Jinja would fold constants then). Rendering runs it under
limits: `**` and `*` refuse huge results, and a render that runs past RENDER_SECONDS or writes
more than MAX_OUTPUT characters raises RenderLimit, a problem of that row alone.
"""

from __future__ import annotations

import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Iterable

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, meta, nodes, pass_eval_context
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import RenderLimit, TemplateProblem

# Limits on what one render may cost. Prompts are kilobytes; these are far above any real one.
MAX_ITEMS = 1_000_000  # characters or items one `*` may make ('ab' * 100000000 is 200 MB at once)
MAX_INT_BITS = 100_000  # bits of an integer `**` or `*` may make (3 ** 300000000 takes minutes)
MAX_OUTPUT = 1_000_000  # characters one render may write
RENDER_SECONDS = 2.0  # wall clock one render may take (loops nest: range() alone allows 100000 ** depth)


@pass_eval_context
def _finalize(eval_ctx, value):
    # Asking for the context is the point: Jinja then cannot evaluate `{{ constant }}` while compiling,
    # so compiling (validate) never runs template code; rendering runs it, under the limits below.
    return value


class _Sandbox(ImmutableSandboxedEnvironment):
    # Intercepted operators go through call_binop, and Jinja never folds them at compile time.
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context, operator, left, right):
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


class _TooBig(SecurityError):
    """A result over the size limits: depends on the row's values, so at render it is that row's problem."""


def _check_binop(operator: str, left, right) -> None:
    """Refuse `**` and `*` whose result would be huge, before Python spends minutes or gigabytes on it."""
    if isinstance(left, int) and isinstance(right, int):
        bits = (right * abs(left).bit_length() if operator == "**" and right > 0 and abs(left) > 1
                else left.bit_length() + right.bit_length() if operator == "*" else 0)
        if bits > MAX_INT_BITS:
            raise _TooBig(f"{operator!r} would make an integer of about {bits} bits (the limit is {MAX_INT_BITS})")
    elif operator == "*":
        sequence, times = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(times, int) and isinstance(sequence, (str, list, tuple)) and len(sequence) * times > MAX_ITEMS:
            raise _TooBig(f"'*' would make {len(sequence) * times} items (the limit is {MAX_ITEMS})")


# optimized=False: no constant folding either, for the same reason as _finalize.
_env = _Sandbox(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False, optimized=False,
                finalize=_finalize)

# What each kind of template is rendered over. Rows of the curation stages (sources.ROW_SCHEMA):
ROW_VARIABLES = ("prompt_id", "parent_id", "source", "category", "template_id", "origin", "prompt", "label")
# Augment templates also get `round` (the top-up round, 0 first) and their entry's vars:
AUGMENT_VARIABLES = ROW_VARIABLES + ("round",)
# Curated examples as the trainer sees them (pipeline.EXAMPLE_COLUMNS without the token lists):
EXAMPLE_VARIABLES = ROW_VARIABLES + (
    "cluster", "split", "teacher_prompt", "response", "reasoning", "answer", "finish_reason",
    "conf_mean_token_prob", "conf_min_token_prob", "conf_answer_prob", "conf_margin", "conf_entropy",
    "options", "option_probs", "conf_option_answer_prob", "conf_option_margin", "conf_option_entropy",
    "sample_responses", "sample_answers", "conf_self_consistency", "ensemble_answers", "conf_teacher_agreement",
)

# A template is one file: the stage cache keys on that file's content, so another file it pulled in
# could change without re-running the stage (and the sandbox has no loader to find one).
_MULTI_FILE = {nodes.Include: "include", nodes.Import: "import", nodes.FromImport: "from ... import",
               nodes.Extends: "extends"}


@lru_cache(maxsize=128)
def compile_template(source: str, name: str = "<inline>"):
    ast = _parse(source, name)
    _raise(name, _refusals(ast))
    try:
        code = _env.compile(ast, name=name, filename=name)
    except TemplateSyntaxError as e:  # e.g. an unknown filter
        raise TemplateProblem(f"{name}: line {e.lineno}: {e.message}") from None
    # Compiled under its own name, so a render error's traceback carries the template line.
    template = _env.template_class.from_code(_env, code, _env.make_globals(None))
    template.syllabus_name = name
    template.syllabus_ast = ast
    return template


def _parse(source: str, name: str) -> nodes.Template:
    try:
        return _env.parse(source, name=name, filename=name)
    except TemplateSyntaxError as e:
        raise TemplateProblem(f"{name}: line {e.lineno}: {e.message}") from None


def _raise(name: str, problems: list[tuple[int, str]]) -> None:
    if problems:
        raise TemplateProblem("\n".join(f"{name}: line {line}: {what}" for line, what in sorted(problems)))


def _read(path: Path) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateProblem(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TemplateProblem(f"{path}: cannot read template ({e.strerror})") from None


def load_template(path: Path):
    return compile_template(_read(path), str(path))


class _OutOfTime(BaseException):
    """Raised by the render tracer. Not an Exception: an `except Exception` in a filter must not swallow
    it, since Python unsets a tracer that raised and the render would then run unbounded."""


def render(template, row: dict, seconds: float = RENDER_SECONDS) -> str:
    """The template over one row, stripped. Past `seconds` or MAX_OUTPUT: RenderLimit (a bad row)."""
    name = getattr(template, "syllabus_name", "<template>")
    deadline = time.monotonic() + seconds

    # A per-thread tracer, no signals or threads: Python calls it on every function call and on every
    # line of the template's own code (each loop turn), so no render outlives the deadline by more
    # than one bounded operation (the `*`/`**` limits keep those short).
    def trace(frame, event, arg):
        if time.monotonic() > deadline:
            raise _OutOfTime(_frame_line(frame, template, name))
        return trace if frame.f_code.co_filename == name else None

    parts, size, previous = [], 0, sys.gettrace()
    stream = template.generate(**row)
    sys.settrace(trace)
    try:
        for part in stream:
            size += len(part)
            if size > MAX_OUTPUT:
                raise RenderLimit(f"{name}:{_line(_stream_line(stream, template, name))} output over {MAX_OUTPUT} characters")
            parts.append(part)
    except _OutOfTime as e:
        raise RenderLimit(f"{name}:{_line(e.args[0])} render took over {seconds:g} s") from None
    except _TooBig as e:
        raise RenderLimit(f"{name}:{_line_of(e, name)} {e}") from None
    except SecurityError as e:
        raise TemplateProblem(f"{name}:{_line_of(e, name)} refused by the sandbox: {e}") from None
    except TemplateError as e:
        raise TemplateProblem(f"{name}:{_line_of(e, name)} {e}") from None
    except RenderLimit:
        raise
    except Exception as e:  # e.g. {{ n / 0 }}: a template bug, said in one line like the others
        raise TemplateProblem(f"{name}:{_line_of(e, name)} {type(e).__name__}: {e}") from None
    finally:
        sys.settrace(previous)
        stream.close()
    return "".join(parts).strip()


def _line(line: int | None) -> str:
    return f" line {line}:" if line else ""


def _frame_line(frame, template, name: str) -> int | None:
    """The template line the innermost template frame at or above `frame` is running."""
    while frame is not None and frame.f_code.co_filename != name:
        frame = frame.f_back
    return template.get_corresponding_lineno(frame.f_lineno) if frame is not None else None


def _stream_line(stream, template, name: str) -> int | None:
    """The template line a suspended render stopped at (the innermost generator it delegates to)."""
    line = None
    while stream is not None:
        frame = getattr(stream, "gi_frame", None)
        if frame is not None and frame.f_code.co_filename == name:
            line = template.get_corresponding_lineno(frame.f_lineno)
        stream = getattr(stream, "gi_yieldfrom", None)
    return line


def _line_of(error: Exception, name: str) -> str:
    """' line N:' of the deepest traceback frame inside the template, or ''."""
    line, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" line {line}:" if line else ""


def _refusals(ast: nodes.Template) -> list[tuple[int, str]]:
    """What a template may not do, found before it ever runs: (line, what) for every instance."""
    problems = []
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        # `x.__class__`, `x['__globals__']`: the road to Python internals. Of `''.__class__.__mro__`
        # only the first step is named.
        if _private_key(node) and not (isinstance(node.node, (nodes.Getattr, nodes.Getitem)) and _private_key(node.node)):
            problems.append((node.lineno, f"{_private_key(node)!r} is refused by the sandbox "
                                          "(templates cannot reach Python internals)"))
    for node in ast.find_all(tuple(_MULTI_FILE)):
        problems.append((node.lineno, f"{{% {_MULTI_FILE[type(node)]} %}} is not supported: "
                                      "a template is one file (write the text into it)"))
    for node in ast.find_all((nodes.Pow, nodes.Mul)):
        if isinstance(node.left, nodes.Const) and isinstance(node.right, nodes.Const):
            try:  # what rendering would refuse anyway, said at validate time
                _check_binop(node.operator, node.left.value, node.right.value)
            except SecurityError as e:
                problems.append((node.lineno, f"refused by the sandbox: {e}"))
    return problems


def _private_key(node) -> str | None:
    key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
    return key if isinstance(key, str) and key.startswith("_") else None


def _undefined(ast: nodes.Template, known: set[str]) -> list[tuple[int, str]]:
    """Variables the template reads but will not be given: (line of first use, what) for each."""
    unknown = meta.find_undeclared_variables(ast) - known
    first_use = {}
    for node in ast.find_all(nodes.Name):
        if node.ctx == "load" and node.name in unknown:
            first_use.setdefault(node.name, node.lineno)
    return [(line, f"{name!r} is undefined (known: {', '.join(sorted(known))})") for name, line in first_use.items()]


def check_variables(template, known: Iterable[str]) -> None:
    """Every variable the template reads must be one it will be given: name each that is not."""
    _raise(template.syllabus_name, _undefined(template.syllabus_ast, set(known)))


def template_problems(source: str, name: str, known: Iterable[str]) -> list[str]:
    """Every problem validate finds in one template, one line each, in line order."""
    ast = _parse(source, name)
    try:
        _raise(name, _refusals(ast) + _undefined(ast, set(known)))
        compile_template(source, name)
    except TemplateProblem as e:
        return e.lines
    return []


def spec_templates(spec) -> list[tuple[str, object, tuple]]:
    """Every template a spec names: (field, its text (spec.TemplateText), the variables it is given)."""
    found = []
    if spec.teacher.prompt:
        found.append(("teacher.prompt", spec.teacher.prompt, ROW_VARIABLES))
    if spec.teacher.system:
        found.append(("teacher.system", spec.teacher.system, ROW_VARIABLES))
    for i, turn in enumerate(spec.teacher.messages):
        found.append((f"teacher.messages[{i}].content", turn.content, ROW_VARIABLES))
    for i, aug in enumerate(spec.augment):
        found.append((f"augment[{i}].template", aug.template, (*AUGMENT_VARIABLES, *aug.vars)))
    if spec.training.student_prompt:
        found.append(("training.student_prompt", spec.training.student_prompt, EXAMPLE_VARIABLES))
    if spec.training.student_system:
        found.append(("training.student_system", spec.training.student_system, EXAMPLE_VARIABLES))
    for i, turn in enumerate(spec.training.student_messages or ()):
        found.append((f"training.student_messages[{i}].content", turn.content, EXAMPLE_VARIABLES))
    return found


def template_name(spec, field: str, text) -> str:
    """How errors name a template: its file, or the spec file and field of an inline one. A file
    given as one of several turns (`messages`) is named with its field too: one file may serve several."""
    file = getattr(text, "file", None)
    if file:
        path = str(spec.resolve_path(file))
        return f"{path} ({field})" if "messages[" in field else path
    where = getattr(spec, "path", None)
    return f"{where}: {field}" if where else field


def spec_template(spec, field: str, text):
    """A template field of the spec, compiled (cached by text and name)."""
    return compile_template(str(text), template_name(spec, field, text))


def check_spec_templates(spec) -> list[str]:
    """Compile every template a spec names and check its variables: fail at validate time, not mid-run.

    Raises one TemplateProblem listing every problem of every template; else returns what each
    field was taken as ("teacher.prompt: template file templates/x.j2", "...: inline template").
    """
    problems, taken = [], []
    for field, text, known in spec_templates(spec):
        try:
            problems += template_problems(str(text), template_name(spec, field, text), known)
        except TemplateProblem as e:  # a syntax error: nothing more to find in it
            problems += e.lines
        file = getattr(text, "file", None)
        taken.append(f"{field}: template file {file}" if file else f"{field}: inline template")
    if problems:
        raise TemplateProblem("\n".join(problems))
    return taken
