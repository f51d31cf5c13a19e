"""Templates fail at validate time naming file and line; the sandbox refuses Python internals."""

import pytest
import yaml
from typer.testing import CliRunner

from engine.cli import app
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


def test_undefined_variable_names_its_first_use():
    assert problem("Rewrite\n{{ prompt }}\nin a {{ stlye }} way, {{ zz }}\n{{ stlye }}") == (
        f"templates/x.j2: line 3: 'stlye' is undefined (known: {KNOWN})")
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
