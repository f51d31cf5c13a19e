"""The engine's side of `syllabus export`: what the context before the assistant's answer holds, so that
a model fine-tuned on the export learns the task `syllabus train` taught.

The trainer's students read engine.train.data.student_conversations: training.student_prompt rendered
over the example (else the teacher's prompt), in the student's chat, system message and turns
(training.student_chat, student_system, student_messages; each unset: the teacher's). The store knows
nothing of specs: this module reads the spec from the version's lineage and hands store.export the
context, rendered by the trainer's own functions: for a chat, the turns before the answer (`messages`);
for a student reading plain text (chat: false), the `text` it read (`completion` beside it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import yaml

from engine.errors import SpecError, UserError
from engine.spec import Spec, parse_spec

PROMPTS = ("student", "teacher", "source")
# The spec fields export reads, per side. A lineage spec that today's code no longer parses stops an
# export only when it sets one of them.
_TEACHER_READS = (("teacher", "chat"), ("teacher", "system"), ("teacher", "messages"))
_READS = {"teacher": _TEACHER_READS,
          "student": (("training", "student_prompt"), ("training", "student_chat"), ("training", "student_system"),
                      ("training", "student_messages"), *_TEACHER_READS)}


@dataclass
class ChatTurns:
    # store.export's `user`: a column, or per row a text (the user turn) or the turns before the answer
    user: str | Callable[[pl.DataFrame], list]
    system: str | None = None  # --system: a system message added where the side reads none
    note: str | None = None  # one line for stderr: the choice was served otherwise than asked
    plain: bool = False  # the side reads plain text (chat: false): `text` and `completion`, no messages


def chat_turns(info, prompt: str | None = None, system: str | None = None) -> ChatTurns:
    """The context for `--prompt`: student (None: the default) | teacher | source, of version `info`;
    `system`: --system, refused where the side already reads a system message or plain text."""
    if prompt not in (None, *PROMPTS):
        raise UserError(f"unknown --prompt {prompt!r}: use {', '.join(PROMPTS)}")
    if prompt == "source":
        return ChatTurns("prompt", system)
    side_name = "teacher" if prompt == "teacher" else "student"
    spec = lineage_spec(info, _READS[side_name], "source" if side_name == "teacher" else "teacher")
    turns = _side_turns(info, spec, side_name, system)
    if side_name == "student" and prompt == "student" and (spec is None or spec.training.student_prompt is None):
        turns.note = (f"{info.ref}: its spec has no training.student_prompt: the user turn is the teacher's prompt,"
                      " as `syllabus train` used")
    return turns


def _side_turns(info, spec: Spec | None, side_name: str, system: str | None) -> ChatTurns:
    from engine.prompts import student_side, teacher_side

    if spec is None:  # the defaults: one chat user turn, the teacher's prompt
        return _teacher_prompt(side_name, system)
    side = teacher_side(spec) if side_name == "teacher" else student_side(spec)
    prompt_template = spec.training.student_prompt if side_name == "student" else None
    templates = [("training.student_prompt", prompt_template), (side.system_field, side.system),
                 *((f"{side.messages_field}[{i}].content", m.content) for i, m in enumerate(side.messages))]
    for field, template in templates:
        if template is not None and template.file and not spec.resolve_path(template.file).is_file():
            raise SpecError(f"{info.ref}: {field}: template file {template.file} no longer resolves "
                            f"(from here or beside {spec.path}): restore it, or export with --prompt "
                            f"{'source' if side_name == 'teacher' else 'teacher'}")
    if system is not None and (not side.chat or side.system is not None):
        said = "reads plain text (chat: false)" if not side.chat else f"reads a system message ({side.system_field})"
        raise UserError(f"--system: the {side_name} {said}: export without --system")
    if side.chat and side.system is None and not side.messages and prompt_template is None:
        return _teacher_prompt(side_name, system)

    def reads(rows: pl.DataFrame) -> list:
        if side_name == "teacher":
            from engine.stages.teach import teacher_contexts

            found = teacher_contexts(rows, spec)
        else:
            if "teacher_prompt" not in rows.columns:  # a table committed by hand: the prompt is all there is
                rows = rows.with_columns(teacher_prompt=pl.col("prompt"))
            from engine.train.data import student_conversations

            found = student_conversations(rows, spec)
        if not side.chat:
            return [c.prompt for c in found]
        return [c.prompt for c in found] if side.system is None and not side.messages else \
            [c.messages() for c in found]

    return ChatTurns(reads, system, plain=not side.chat)


def _teacher_prompt(side_name: str, system: str | None) -> ChatTurns:
    """The teacher's prompt as the one user turn (a student without a prompt of its own reads it)."""
    if side_name == "teacher":
        return ChatTurns("teacher_prompt", system)

    def texts(rows: pl.DataFrame) -> list[str]:  # a table committed by hand may have only the prompt
        return rows["teacher_prompt" if "teacher_prompt" in rows.columns else "prompt"].to_list()

    return ChatTurns(texts, system)


def lineage_spec(info, fields=_READS["student"], instead: str = "teacher") -> Spec | None:
    """The spec version `info` was made from, parsed by today's rules with its stored path (relative
    template paths resolve from here, then beside that file); None when it sets none of `fields`."""
    try:
        data = yaml.safe_load(info.spec_text or "")
    except yaml.YAMLError:
        data = None
    if not any(_get(data, keys) is not None for keys in fields):
        return None  # nothing export needs: a spec today's code cannot parse need not stop it
    path = Path(info.lineage["spec_path"]) if info.lineage.get("spec_path") else None
    try:  # check_files off: the data files the run read are not needed to export
        return parse_spec(data, path=path, text=info.spec_text)
    except SpecError as e:
        raise SpecError(f"{info.ref}: the spec it was made from no longer parses ({e.lines[0]}):"
                        f" export with --prompt {instead}") from None


def _get(data, keys: tuple[str, ...]):
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data
