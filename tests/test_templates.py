"""Templates fail at validate time naming file and line; the sandbox refuses Python internals."""

import sys
import time

import pytest
import yaml
from typer.testing import CliRunner

from engine import templates
from engine.cli import app
from engine.errors import RenderLimit
from engine.spec import load_spec
from engine.templates import (EXAMPLE_VARIABLES, ROW_VARIABLES, TemplateProblem, check_spec_templates,
                              check_variables, compile_template, load_template, render)

KNOWN = ", ".join(sorted(ROW_VARIABLES))


def problem(source: str, known=ROW_VARIABLES, row=None) -> str:
    with pytest.raises(TemplateProblem) as info:
        template = compile_template(source, "templates/x.j2")
        check_variables(template, known)
        render(template, row or {})
    return str(info.value)


def test_syntax_error_names_template_and_line():
    assert problem("Hello\n\n{% if %}") == "templates/x.j2: line 3: Expected an expression, got 'end of statement block'"
    assert problem("{{ prompt }}\n{{ prompt | no_such_filter }}") == "templates/x.j2: line 2: No filter named 'no_such_filter'."


def test_each_undefined_variable_is_named_once_at_its_first_use():
    assert problem("Rewrite\n{{ prompt }}\nin a {{ stlye }} way, {{ zz }}\n{{ stlye }}").splitlines() == [
        f"templates/x.j2: line 3: 'stlye' is undefined (known: {KNOWN})",
        f"templates/x.j2: line 3: 'zz' is undefined (known: {KNOWN})"]
    assert problem("{% for w in prompt.split() %}{{ w }}{% endfor %}\n{% if lbl %}x{% endif %}") == (
        f"templates/x.j2: line 2: 'lbl' is undefined (known: {KNOWN})")


def test_names_set_inside_the_template_and_globals_are_known():
    template = compile_template("{% set n = 3 %}{% for i in range(n) %}{{ loop.index }}{{ prompt }}{% endfor %}", "t")
    check_variables(template, ROW_VARIABLES)
    assert render(template, {"prompt": "p"}) == "1p2p3p"


@pytest.mark.parametrize("source, key", [
    ("{{ ''.__class__.__mro__ }}", "__class__"),
    ("{{ cycler.__init__.__globals__ }}", "__init__"),
    ("{{ prompt['__class__'] }}", "__class__"),
])
def test_sandbox_refuses_python_internals_before_rendering(source, key):
    assert problem(source) == (f"templates/x.j2: line 1: {key!r} is refused by the sandbox "
                               "(templates cannot reach Python internals)")


def test_sandbox_refuses_internals_reached_at_render_time():
    message = problem("ok\n{{ prompt | attr('__class__') }}", row={"prompt": "p"})
    assert message == "templates/x.j2: line 2: refused by the sandbox: access to attribute '__class__' of 'str' object is unsafe."


def test_render_errors_are_one_line_with_the_line():
    assert problem("a\n{{ 1 / 0 }}") == "templates/x.j2: line 2: ZeroDivisionError: division by zero"
    assert problem("{{ prompt }}", known=["prompt"], row={}) == "templates/x.j2: line 1: 'prompt' is undefined"


def test_example_variables_are_the_pipelines_scalar_columns():
    from engine.curate.pipeline import EXAMPLE_COLUMNS

    lists = {"token_ids", "token_logprobs", "topk_ids", "topk_logprobs"}
    assert set(EXAMPLE_VARIABLES) == set(EXAMPLE_COLUMNS) - lists


def write_spec(tmp_path, teacher_template="{{ prompt }}", **extra) -> str:
    (tmp_path / "data.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "teacher.j2").write_text(teacher_template)
    spec = {"name": "t", "teacher": {"model": "m", "prompt": "teacher.j2"}, "sources": [{"path": "data.jsonl"}], **extra}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    return tmp_path / "spec.yaml"


def test_spec_templates_each_see_their_own_names(tmp_path):
    (tmp_path / "aug.j2").write_text("{{ prompt }} ({{ style }}, round {{ round }})")
    path = write_spec(tmp_path, "{{ category }}: {{ prompt }}",
                      augment=[{"template": "aug.j2", "vars": {"style": ["a", "b"]}}],
                      training={"student_prompt": "{{ prompt }} {{ answer }}"})
    check_spec_templates(load_spec(path))

    (tmp_path / "aug.j2").write_text("{{ prompt }}\n{{ tone }}")
    with pytest.raises(TemplateProblem, match=r"aug.j2: line 2: 'tone' is undefined \(known: category, label, origin, "
                                              r"parent_id, prompt, prompt_id, round, source, style, template_id\)"):
        check_spec_templates(load_spec(path))


def test_teacher_prompt_cannot_see_teacher_output(tmp_path):
    path = write_spec(tmp_path, "{{ prompt }}\n{{ answer }}")
    with pytest.raises(TemplateProblem, match=r"teacher.j2: line 2: 'answer' is undefined"):
        check_spec_templates(load_spec(path))


def test_student_prompt_named_by_spec_field(tmp_path):
    path = write_spec(tmp_path, training={"student_prompt": "{{ prompt }} {{ responce }}"})
    with pytest.raises(TemplateProblem) as info:
        check_spec_templates(load_spec(path))
    assert str(info.value).startswith(f"{path}: training.student_prompt: line 1: 'responce' is undefined (known: ")


def test_validate_command_checks_templates(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, "Say:\n{{ promt }}")
    result = CliRunner().invoke(app, ["validate", "spec.yaml"])
    assert isinstance(result.exception, TemplateProblem)
    assert str(result.exception) == f"teacher.j2: line 2: 'promt' is undefined (known: {KNOWN})"
    (tmp_path / "teacher.j2").write_text("Say:\n{{ prompt }}")
    ok = CliRunner().invoke(app, ["validate", "spec.yaml"])
    assert ok.exit_code == 0 and "spec.yaml: ok" in ok.output


def test_unreadable_template_file(tmp_path):
    path = tmp_path / "bad.j2"
    path.write_bytes(b"caf\xe9 {{ prompt }}")
    with pytest.raises(TemplateProblem, match=r"bad.j2: not UTF-8 text"):
        load_template(path)


def test_student_prompt_file_is_checked_under_its_own_name(tmp_path):
    (tmp_path / "student.j2").write_text("Q: {{ prompt }}\n{{ anwser }}")
    path = write_spec(tmp_path, training={"student_prompt": "student.j2"})
    with pytest.raises(TemplateProblem) as info:
        check_spec_templates(load_spec(path))
    assert str(info.value).startswith(f"{tmp_path / 'student.j2'}: line 2: 'anwser' is undefined")
    (tmp_path / "student.j2").write_text("Q: {{ prompt }} {{ answer }}")
    assert check_spec_templates(load_spec(path)) == ["teacher.prompt: template file teacher.j2",
                                                     "training.student_prompt: template file student.j2"]


# --- bounded: compiling runs nothing, rendering has limits -------------------------------


def test_compiling_folds_no_constants():
    # Jinja folds constant output while compiling; here nothing of the template runs until render.
    code = templates._env.compile("{{ 'q' ~ 'z' }} {{ 'ab'|center(30) }} {% set n = 2 ** 3 %}", raw=True)
    assert "'qz'" not in code and "ab".center(30) not in code and "= 8" not in code


@pytest.mark.parametrize("source, message", [
    ("a\n{{ 3 ** 300000000 }}", "line 2: refused by the sandbox: '**' would make an integer of about 600000000 bits "
                                "(the limit is 100000)"),
    ("{{ 'ab' * 100000000 }}", "line 1: refused by the sandbox: '*' would make 200000000 items (the limit is 1000000)"),
])
def test_huge_constants_are_refused_at_validate_quickly(source, message):
    started = time.monotonic()
    assert problem(source) == f"templates/x.j2: {message}"
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("source, row, message", [
    ("{{ 3 ** n }}", {"n": 300_000_000}, "'**' would make an integer of about 600000000 bits"),
    ("{{ (10 ** 4000) * (10 ** 4000) * n }}", {"n": 10 ** 95000}, "'*' would make an integer of about"),
    ("x\n{{ prompt * n }}", {"prompt": "ab", "n": 100_000_000}, "'*' would make 200000000 items"),
    ("{{ [prompt] * n }}", {"prompt": "ab", "n": 2_000_000}, "'*' would make 2000000 items"),
])
def test_huge_results_are_refused_at_render(source, row, message):
    """A result too big for its row's values is that row's render limit (a bad row), naming the line."""
    line = source.count("\n") + 1
    template = compile_template(source, "templates/x.j2")
    with pytest.raises(RenderLimit) as info:
        render(template, row)
    assert str(info.value).startswith(f"templates/x.j2: line {line}: {message}")


def test_a_render_past_its_time_is_a_render_limit_naming_the_line():
    template = compile_template("{{ prompt }}\n{% for i in range(100000) %}{% for j in range(100000) %}"
                                "{% endfor %}{% endfor %}", "templates/slow.j2")
    tracer = sys.gettrace()
    started = time.monotonic()
    with pytest.raises(RenderLimit) as info:
        render(template, {"prompt": "p"}, seconds=0.2)
    assert time.monotonic() - started < 2
    assert str(info.value) == "templates/slow.j2: line 2: render took over 0.2 s"
    assert sys.gettrace() is tracer  # the render's tracer is gone, whatever was there is back
    assert render(template.environment.from_string("{{ prompt }}"), {"prompt": "p"}) == "p"


def test_a_render_past_its_output_limit_is_a_render_limit():
    template = compile_template("a\n{% for i in range(100000) %}{{ prompt }}{% endfor %}", "templates/big.j2")
    with pytest.raises(RenderLimit, match=r"^templates/big.j2: line 2: output over 1000000 characters$"):
        render(template, {"prompt": "x" * 20})


@pytest.mark.parametrize("tag, shown", [
    ("{% include 'other.j2' %}", "include"), ("{% import 'm.j2' as m %}", "import"),
    ("{% from 'm.j2' import f %}", "from ... import"), ("{% extends 'base.j2' %}", "extends"),
])
def test_templates_that_pull_in_other_files_are_refused_at_validate(tag, shown):
    assert problem("Hi\n" + tag) == (f"templates/x.j2: line 2: {{% {shown} %}} is not supported: "
                                     "a template is one file (write the text into it)")
