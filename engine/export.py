"""The engine's side of `syllabus export`: what the user turn holds, so that a model fine-tuned on the
export learns the task `syllabus train` taught.

The trainer's students read training.student_prompt rendered over the example (else the teacher's
prompt) as the one user turn of chat_prompt_ids, with no system message (the tokenizer's chat template
adds its default, as it did for the teacher). The store knows nothing of specs: this module reads the
spec from the version's lineage and hands store.export the user turn, rendered by the trainer's own
student_texts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import polars as pl
import yaml

from engine.errors import SpecError, UserError
from engine.spec import Spec, parse_spec
from engine.train.data import student_texts

PROMPTS = ("student", "teacher", "source")
# The spec fields export reads. A lineage spec that today's code no longer parses stops an export only
# when it sets one of them (a system message, once the spec has one, goes here too).
_READS = (("training", "student_prompt"),)


@dataclass
class ChatTurns:
    user: str | Callable[[pl.DataFrame], list[str]]  # store.export's `user`: a column, or texts per row
    system: str | None = None  # the spec has no system message yet, and the trainer sends none
    note: str | None = None  # one line for stderr: the choice was served otherwise than asked


def chat_turns(info, prompt: str | None = None) -> ChatTurns:
    """The turns for `--prompt`: student (None: the default) | teacher | source, of version `info`."""
    if prompt not in (None, *PROMPTS):
        raise UserError(f"unknown --prompt {prompt!r}: use {', '.join(PROMPTS)}")
    if prompt == "source":
        return ChatTurns("prompt")
    if prompt == "teacher":
        return ChatTurns("teacher_prompt")
    spec = lineage_spec(info)
    template = spec.training.student_prompt if spec else None
    if template is not None and template.file and not spec.resolve_path(template.file).is_file():
        raise SpecError(f"{info.ref}: training.student_prompt: template file {template.file} no longer resolves "
                        f"(from here or beside {spec.path}): restore it, or export with --prompt teacher")
    note = None
    if template is None and prompt == "student":
        note = (f"{info.ref}: its spec has no training.student_prompt: the user turn is the teacher's prompt,"
                " as `syllabus train` used")

    def texts(rows: pl.DataFrame) -> list[str]:
        if template is None and "teacher_prompt" not in rows.columns:
            return rows["prompt"].to_list()  # a table committed by hand: the prompt is all there is
        return student_texts(rows, template)

    return ChatTurns(texts, note=note)


def lineage_spec(info) -> Spec | None:
    """The spec version `info` was made from, parsed by today's rules with its stored path (relative
    template paths resolve from here, then beside that file); None when it sets nothing export reads."""
    try:
        data = yaml.safe_load(info.spec_text or "")
    except yaml.YAMLError:
        data = None
    if not any(_get(data, keys) is not None for keys in _READS):
        return None  # nothing export needs: a spec today's code cannot parse need not stop it
    path = Path(info.lineage["spec_path"]) if info.lineage.get("spec_path") else None
    try:  # check_files off: the data files the run read are not needed to export
        return parse_spec(data, path=path, text=info.spec_text)
    except SpecError as e:
        raise SpecError(f"{info.ref}: the spec it was made from no longer parses ({e.lines[0]}):"
                        " export with --prompt teacher") from None


def _get(data, keys: tuple[str, ...]):
    for key in keys:
        data = data.get(key) if isinstance(data, dict) else None
    return data
