"""User templates: Jinja2 in a sandbox, with strict undefined variables.

A template names the file and line of its error at validate time; one that reaches
for Python internals is refused by the sandbox.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from jinja2 import StrictUndefined, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class TemplateProblem(Exception):
    """A template that cannot be compiled or rendered; one line naming file and line."""


_env = ImmutableSandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=False, autoescape=False)


@lru_cache(maxsize=128)
def compile_template(source: str, name: str = "<inline>"):
    try:
        template = _env.from_string(source)
    except TemplateSyntaxError as e:
        raise TemplateProblem(f"{name}: line {e.lineno}: {e.message}") from None
    template.syllabus_name = name
    return template


def load_template(path: Path):
    try:
        source = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise TemplateProblem(f"{path}: cannot read template ({e.strerror})") from None
    return compile_template(source, str(path))


def render(template, row: dict) -> str:
    try:
        return template.render(**row).strip()
    except TemplateError as e:
        name = getattr(template, "syllabus_name", "<template>")
        raise TemplateProblem(f"{name}: {e}") from None
