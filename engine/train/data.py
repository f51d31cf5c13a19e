"""Examples frame -> token tensors: the student's context plus the teacher's tokens.

An example's input is prompt_ids(the student's conversation) + the teacher's token ids. The
logits at position t predict token t+1, so response token j (at position P+j) is
scored by the logits at P+j-1; the prompt is masked out of the loss.

With teacher.reasoning, each response's tokens split at the answer start (the end of the last
answer marker, found on the teacher's ids as the confidence stage finds it): `answer_mask` marks
the answer tokens (eos included), which training.loss.answer_weight weighs, and the tokens before it
take reasoning_weight. A response without the marker is all answer.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from engine.errors import RenderLimit, TrainError
from engine.prompts import Conversation, conversations, prompt_ids, student_side
from engine.stages.confidence import answer_start
from engine.templates import compile_template, render
from engine.train.options import collate_options

_LIST_COLUMNS = ("token_ids", "topk_ids", "topk_logprobs")


@dataclass
class Encoded:
    prompt_ids: list[int]
    token_ids: list[int]
    topk_ids: list[list[int]]
    topk_logprobs: list[list[float]]
    answer_from: int = 0  # index of the first answer token in token_ids (0: every token is an answer token)
    options: object = None  # kd_target: options: its engine.train.options.OptionTarget, or None
    teacher_prompt_ids: list[int] | None = None  # teacher_signal: online: the teacher's own context


def student_texts(examples: pl.DataFrame, student_prompt: str | None) -> list[str]:
    """What the student reads: training.student_prompt rendered over the row, else teacher_prompt."""
    if not student_prompt:
        return examples["teacher_prompt"].to_list()
    template = compile_template(str(student_prompt), getattr(student_prompt, "file", None) or "training.student_prompt")
    scalar = [c for c in examples.columns if c not in _LIST_COLUMNS]  # templates never need the big lists
    texts = []
    for row in examples.select(scalar).iter_rows(named=True):
        try:
            texts.append(render(template, row))
        except RenderLimit as e:  # the dataset is fixed by now: a row the student cannot read stops training
            raise TrainError(f"example {row.get('prompt_id', '?')[:12]}: {e}") from None
    return texts


def student_conversations(examples: pl.DataFrame, spec) -> list[Conversation]:
    """What the student reads, whole: student_texts in the student's chat, system message and turns
    (training.student_chat, student_system, student_messages; each unset: the teacher's). Training,
    eval and export all take the student's context from here."""
    side = student_side(spec)
    texts = student_texts(examples, spec.training.student_prompt)
    scalar = [c for c in examples.columns if not examples.schema[c].is_nested()]  # no template reads token lists
    rows = examples.select(scalar).to_dicts() if side.system is not None or side.messages else [{}] * len(texts)
    found, problems = conversations(spec, side, rows, texts)
    for row, problem in zip(rows, problems):
        if problem:  # the dataset is fixed by now: a row the student cannot read stops training
            raise TrainError(f"example {str(row.get('prompt_id', '?'))[:12]}: {problem}")
    return found


def encode(examples: pl.DataFrame, tokenizer, texts: list, marker: str | None = None,
           options: list | None = None, teacher_texts: list | None = None) -> list[Encoded]:
    """One Encoded per row with at least one teacher token (an empty response teaches nothing).

    texts: per row what the student reads: a Conversation (student_conversations), or a text, read
    as the one user turn of a chat. marker: the answer marker whose end starts each row's answer
    tokens (None: every token is an answer token). options: per row its OptionTarget or None
    (engine.train.options.option_targets). teacher_texts: per row the teacher's own context
    (training.teacher_signal: online), read as texts are.

    A row holding an unmapped token (id -1: a server answered with text no single id renders)
    is left out: its targets are not known exactly.
    """
    out = []
    columns = examples.select(_LIST_COLUMNS).cast({"topk_logprobs": pl.List(pl.List(pl.Float32))})
    teacher_texts = teacher_texts or [None] * len(texts)
    for text, option, teacher_text, (tokens, topk_ids, topk_lps) in zip(texts, options or [None] * len(texts),
                                                                        teacher_texts, columns.iter_rows()):
        if tokens and min(tokens) >= 0:
            start = answer_start(tokenizer, tokens, marker) if marker else 0
            teacher_ids = prompt_ids(tokenizer, teacher_text) if teacher_text is not None else None
            out.append(Encoded(prompt_ids(tokenizer, text), list(tokens), topk_ids, topk_lps, start, option,
                               teacher_ids))
    return out


def collate(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [B, S] inputs plus flat [N, ...] targets for the N response tokens.

    `mask` marks the positions that predict a response token; the flat tensors follow
    its row-major order, which is the order of `hidden[mask]`. Top-k rows are padded
    to the batch's largest k with absent (-inf) slots that repeat slot 0's id.
    `answer_mask` [N] marks the answer tokens (each example's tokens from its answer_from on).
    """
    seq = max(len(e.prompt_ids) + len(e.token_ids) for e in batch)
    k = max(len(row) for e in batch for row in e.topk_ids)
    input_ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), seq), dtype=torch.long)
    mask = torch.zeros((len(batch), seq), dtype=torch.bool)
    targets, topk_ids, topk_lps, answer = [], [], [], []
    for i, e in enumerate(batch):
        p, r = len(e.prompt_ids), len(e.token_ids)
        input_ids[i, : p + r] = torch.tensor(e.prompt_ids + e.token_ids)
        attention[i, : p + r] = 1
        mask[i, p - 1 : p - 1 + r] = True  # the positions whose logits predict the response
        targets += e.token_ids
        answer += [j >= e.answer_from for j in range(r)]
        for ids, lps in zip(e.topk_ids, e.topk_logprobs):
            topk_ids.append(ids + [ids[0]] * (k - len(ids)))
            topk_lps.append(lps + [float("-inf")] * (k - len(lps)))
    teacher = _teacher_inputs(batch, pad_id) if batch[0].teacher_prompt_ids is not None else {}
    return {"input_ids": input_ids, "attention_mask": attention, "mask": mask, "targets": torch.tensor(targets),
            "topk_ids": torch.tensor(topk_ids), "topk_logprobs": torch.tensor(topk_lps, dtype=torch.float32),
            "answer_mask": torch.tensor(answer, dtype=torch.bool), **collate_options(batch, pad_id), **teacher}


def _teacher_inputs(batch: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """teacher_input_ids / teacher_attention_mask / teacher_mask: the teacher's own context plus the
    response, laid out as the student's inputs are; its mask selects the same response tokens, in order."""
    seq = max(len(e.teacher_prompt_ids) + len(e.token_ids) for e in batch)
    input_ids = torch.full((len(batch), seq), pad_id, dtype=torch.long)
    attention = torch.zeros((len(batch), seq), dtype=torch.long)
    mask = torch.zeros((len(batch), seq), dtype=torch.bool)
    for i, e in enumerate(batch):
        p, r = len(e.teacher_prompt_ids), len(e.token_ids)
        input_ids[i, : p + r] = torch.tensor(e.teacher_prompt_ids + e.token_ids)
        attention[i, : p + r] = 1
        mask[i, p - 1 : p - 1 + r] = True
    return {"teacher_input_ids": input_ids, "teacher_attention_mask": attention, "teacher_mask": mask}


def response_logits(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[N, V] logits at the response positions only: the vocab-sized head skips the prompt.

    Assumes a Llama-family model whose head is the plain output embedding (no logit
    scaling or soft-capping).
    """
    hidden = model.base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              use_cache=False).last_hidden_state
    return model.get_output_embeddings()(hidden[batch["mask"]])
