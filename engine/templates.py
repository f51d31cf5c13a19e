"""User templates: Jinja2 in a sandbox, with strict undefined variables.

Problems surface at validate time, as one line naming the template and line: syntax
errors, variables a template cannot see (checked statically against the names its
stage gives it), and reaching for Python internals (`__class__`, `__globals__`, ...),
which the sandbox also refuses at render time for what static checks cannot see.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Iterable

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError, meta, nodes
from jinja2.exceptions import SecurityError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from engine.errors import TemplateProblem



_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)

# What each kind of template is rendered over. Rows of the curation stages (sources.ROW_SCHEMA):
ROW_VARIABLES = ("prompt_id", "parent_id", "source", "category", "template_id", "origin", "prompt", "label")
# Augment templates also get `round` (the top-up round, 0 first) and their entry's vars:
AUGMENT_VARIABLES = ROW_VARIABLES + ("round",)
# Curated examples as the trainer sees them (pipeline.EXAMPLE_COLUMNS without the token lists):
EXAMPLE_VARIABLES = ROW_VARIABLES + (
    "cluster", "split", "teacher_prompt", "response", "reasoning", "answer",
    "conf_mean_token_prob", "conf_min_token_prob", "conf_answer_prob", "conf_margin", "conf_entropy",
)


@lru_cache(maxsize=128)
def compile_template(source: str, name: str = "<inline>"):
    try:
        ast = _env.parse(source, name=name, filename=name)
    except TemplateSyntaxError as e:
        raise TemplateProblem(f"{name}: line {e.lineno}: {e.message}") from None
    _refuse_internals(ast, name)
    try:
        code = _env.compile(ast, name=name, filename=name)
    except TemplateSyntaxError as e:  # e.g. an unknown filter
        raise TemplateProblem(f"{name}: line {e.lineno}: {e.message}") from None
    # Compiled under its own name, so a render error's traceback carries the template line.
    template = _env.template_class.from_code(_env, code, _env.make_globals(None))
    template.syllabus_name = name
    template.syllabus_ast = ast
    return template


def load_template(path: Path):
    try:
        source = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TemplateProblem(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise TemplateProblem(f"{path}: cannot read template ({e.strerror})") from None
    return compile_template(source, str(path))


def render(template, row: dict) -> str:
    name = getattr(template, "syllabus_name", "<template>")
    try:
        return template.render(**row).strip()
    except SecurityError as e:
        raise TemplateProblem(f"{name}:{_line_of(e, name)} refused by the sandbox: {e}") from None
    except TemplateError as e:
        raise TemplateProblem(f"{name}:{_line_of(e, name)} {e}") from None
    except Exception as e:  # e.g. {{ n / 0 }}: a template bug, said in one line like the others
        raise TemplateProblem(f"{name}:{_line_of(e, name)} {type(e).__name__}: {e}") from None


def _line_of(error: Exception, name: str) -> str:
    """' line N:' of the deepest traceback frame inside the template, or ''."""
    line, tb = None, error.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == name:
            line = tb.tb_lineno
        tb = tb.tb_next
    return f" line {line}:" if line else ""


def _refuse_internals(ast: nodes.Template, name: str) -> None:
    """`x.__class__`, `x['__globals__']`: the road to Python internals, refused before rendering."""
    for node in ast.find_all((nodes.Getattr, nodes.Getitem)):
        if _private_key(node):
            while isinstance(node.node, (nodes.Getattr, nodes.Getitem)) and _private_key(node.node):
                node = node.node  # name the first step of `''.__class__.__mro__`, not the last
            raise TemplateProblem(f"{name}: line {node.lineno}: {_private_key(node)!r} is refused by the sandbox "
                                  f"(templates cannot reach Python internals)")


def _private_key(node) -> str | None:
    key = node.attr if isinstance(node, nodes.Getattr) else getattr(node.arg, "value", None)
    return key if isinstance(key, str) and key.startswith("_") else None


def check_variables(template, known: Iterable[str]) -> None:
    """Every variable the template reads must be one it will be given: name the first that is not."""
    known = set(known)
    ast = template.syllabus_ast
    unknown = meta.find_undeclared_variables(ast) - known
    if not unknown:
        return
    first_use = {}
    for node in ast.find_all(nodes.Name):
        if node.ctx == "load" and node.name in unknown:
            first_use.setdefault(node.name, node.lineno)
    variable, line = min(first_use.items(), key=lambda item: (item[1], item[0]))
    raise TemplateProblem(f"{template.syllabus_name}: line {line}: {variable!r} is undefined "
                          f"(known: {', '.join(sorted(known))})")


def check_spec_templates(spec) -> None:
    """Compile every template a spec names and check its variables: fail at validate time, not mid-run."""
    if spec.teacher.prompt:
        check_variables(load_template(spec.resolve_path(spec.teacher.prompt)), ROW_VARIABLES)
    for aug in spec.augment:
        check_variables(load_template(spec.resolve_path(aug.template)), (*AUGMENT_VARIABLES, *aug.vars))
    if spec.training.student_prompt:
        where = f"{spec.path}: training.student_prompt" if spec.path else "training.student_prompt"
        check_variables(compile_template(spec.training.student_prompt, where), EXAMPLE_VARIABLES)
