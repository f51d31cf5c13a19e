"""What a model reads before it answers: one Conversation per row, and its token ids.

Both sides are written the same way in the spec: the teacher by teacher.prompt, chat, system and
messages; the students by training.student_prompt, student_chat, student_system and
student_messages (each unset: the teacher's). Every template renders over the row.

- chat: true: [system?] + messages + [user: the row's prompt], through the tokenizer's chat template
  with the assistant's turn opened (add_generation_prompt). Without a system message the template
  adds its own default, if it has one.
- chat: false: the row's prompt as plain text, tokenized as it is (what a completions endpoint
  reads). System messages and turns are refused by the spec there: the prompt template holds it all.

prompt_ids() is the one place these become token ids: teacher generation, the request cache's key,
training, eval and the checks of the openai backend all go through it, so a student is trained on
exactly the ids it is evaluated with, and the teacher answered exactly the ids stored beside its answer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from engine.errors import ModelError, RenderLimit


@dataclass(frozen=True)
class Conversation:
    prompt: str  # the row's own prompt: the last user turn (chat), or the whole text (plain)
    chat: bool = True
    turns: tuple[tuple[str, str], ...] = ()  # (role, content) before the prompt: system first, then messages

    def messages(self) -> list[dict]:
        """The chat as role/content dicts, the prompt as the last user turn."""
        return [{"role": r, "content": c} for r, c in self.turns] + [{"role": "user", "content": self.prompt}]

    @property
    def plain(self) -> bool:
        """The one user turn every request was before chat/system/messages existed."""
        return self.chat and not self.turns

    @property
    def key(self) -> str:
        """The request's identity (request cache): the prompt itself for one plain user turn, as it
        always was, so answers cached before these fields existed still count; else the whole request."""
        if self.plain:
            return self.prompt
        return json.dumps({"chat": self.chat, "turns": [list(t) for t in self.turns], "prompt": self.prompt},
                          ensure_ascii=False)

    def context(self) -> dict:
        """What lineage shows of it: chat or not, and the turns before the prompt."""
        found: dict = {"chat": self.chat}
        if self.turns and self.turns[0][0] == "system":
            found["system"] = self.turns[0][1]
        rest = [{"role": r, "content": c} for r, c in self.turns[1 if "system" in found else 0:]]
        if rest:
            found["messages"] = rest
        return found


def as_conversation(prompt: str | Conversation) -> Conversation:
    return prompt if isinstance(prompt, Conversation) else Conversation(prompt)


def prompt_ids(tokenizer, prompt: str | Conversation) -> list[int]:
    """Token ids of what the model reads, ready for its answer (a bare text: one chat user turn)."""
    conversation = as_conversation(prompt)
    if not conversation.chat:
        return list(tokenizer(conversation.prompt, add_special_tokens=True)["input_ids"])
    if not tokenizer.chat_template:
        if conversation.turns:
            raise ModelError(f"the tokenizer of {getattr(tokenizer, 'name_or_path', 'this model')} has no chat "
                             "template to place the system message and turns in: set chat: false and write them "
                             "into the prompt template")
        return list(tokenizer(conversation.prompt, add_special_tokens=True)["input_ids"])
    ids = tokenizer.apply_chat_template(conversation.messages(), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys"):  # some versions return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


# --- the spec's two sides ---------------------------------------------------------------


@dataclass(frozen=True)
class Side:
    """How one side (teacher or student) reads a row, resolved from the spec."""
    name: str  # "teacher" | "student"
    chat: bool
    system: object | None  # the template (spec.TemplateText), or None
    system_field: str
    messages: tuple  # spec.Turn each
    messages_field: str


def teacher_side(spec) -> Side:
    t = spec.teacher
    return Side("teacher", t.chat, t.system, "teacher.system", tuple(t.messages), "teacher.messages")


def student_side(spec) -> Side:
    """The student's chat, system and messages: training.student_* where set, else the teacher's
    (system and messages only where the student reads a chat)."""
    t, training = spec.teacher, spec.training
    given = training.model_fields_set
    chat = t.chat if training.student_chat is None else training.student_chat
    if "student_system" in given:
        system, system_field = training.student_system, "training.student_system"
    else:
        system, system_field = (t.system if chat else None), "teacher.system"
    if "student_messages" in given:
        messages, messages_field = tuple(training.student_messages or ()), "training.student_messages"
    else:
        messages, messages_field = (tuple(t.messages) if chat else ()), "teacher.messages"
    return Side("student", chat, system, system_field, messages, messages_field)


def side_format(side: Side) -> dict | None:
    """The side's settings as JSON, None when they are the defaults (chat, no system, no messages)."""
    if side.chat and side.system is None and not side.messages:
        return None
    return {"chat": side.chat, "system": None if side.system is None else str(side.system),
            "messages": [{"role": m.role, "content": str(m.content)} for m in side.messages]}


def _templates(spec, side: Side) -> list[tuple[str, object]]:
    """(role, compiled template) of each turn before the prompt, system first."""
    from engine.templates import spec_template

    found = []
    if side.system is not None:
        found.append(("system", spec_template(spec, side.system_field, side.system)))
    for i, turn in enumerate(side.messages):
        found.append((turn.role, spec_template(spec, f"{side.messages_field}[{i}].content", turn.content)))
    return found


def render_turns(spec, side: Side, rows: list[dict]) -> tuple[list[tuple | None], list[str | None]]:
    """Per row, the turns before its prompt, rendered over the row: (turns, problems).

    A row whose render runs past the limits has None and its problem (one line naming the template
    and line); a template error raises TemplateProblem. A template that reads no variable of the row
    is rendered once.
    """
    from jinja2 import meta

    from engine.templates import render

    templates = _templates(spec, side)
    if not templates:
        return [()] * len(rows), [None] * len(rows)
    constant: dict[int, str] = {}
    for i, (_, template) in enumerate(templates):
        if not meta.find_undeclared_variables(template.syllabus_ast):
            constant[i] = render(template, {})
    turns, problems = [], []
    for row in rows:
        try:
            turns.append(tuple((role, constant[i] if i in constant else render(template, row))
                               for i, (role, template) in enumerate(templates)))
            problems.append(None)
        except RenderLimit as e:
            turns.append(None)
            problems.append(str(e))
    return turns, problems


def conversations(spec, side: Side, rows: list[dict], prompts: list[str | None]) -> tuple[list, list]:
    """Each row's Conversation from its rendered prompt and the side's turns: (conversations, problems);
    a row whose prompt is None or whose turns cannot render has None and its problem."""
    turns, problems = render_turns(spec, side, rows)
    found = []
    for prompt, row_turns in zip(prompts, turns):
        found.append(None if prompt is None or row_turns is None else Conversation(prompt, side.chat, row_turns))
    return found, problems
