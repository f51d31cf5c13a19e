"""`training.loss.kd_target: options`: the teacher's option distribution as an example's KD target.

An example whose row has option_probs (engine/stages/options.py) is distilled through its options
instead of its tokens' top-k. The student reads each option right after its own prompt (the ids the
example is trained on; an option's ids as engine/teachers/options.py reads them), its mean log-prob per
option token is its score, and a softmax over the options is the student's distribution s. With the
teacher's option_probs p, both tempered at T as the token KD tempers its outcomes, the KD term is

    T^2 * D(p_T || s_T)        (training.loss.divergence: forward KL by default)

carried by each of the example's response tokens, so the loss stays a mean over response tokens:
KD = (sum of token KD over the tokens of examples without options + sum over option examples of
n_e * their option KD) / N. The hard-label CE on the teacher's tokens is unchanged for every example.

A trimmed vocabulary keeps every option token (they join the ids the dataset uses), so the student's
own tokenizer reads an option as the same tokens and the id map carries them over exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl
import torch

from engine.errors import SpecError
from engine.prompts import as_conversation
from engine.teachers.options import option_ids
from engine.train.losses import LossParts, divergence_per_token

NEG_INF = float("-inf")


@dataclass
class OptionTarget:
    ids: list[list[int]]  # each option's token ids, read after the student's prompt
    probs: list[float]  # the teacher's option_probs, aligned with ids


def option_targets(examples: pl.DataFrame, spec, tokenizer, texts: list, *,
                   train: bool = False) -> list[OptionTarget | None] | None:
    """Per row, its OptionTarget (None: no option_probs); None altogether unless kd_target is options.

    texts: what the student reads per row (engine.train.data.student_conversations). train: the rows
    are the train split, which must hold an example with option_probs."""
    if spec.training.loss.kd_target != "options":
        return None
    where = f"{spec.path or '<spec>'}: training.loss.kd_target: options"
    if "option_probs" not in examples.columns:
        raise SpecError(f"{where}, but the dataset has no option_probs: curate it with options on a source or a "
                        "coverage category (syllabus run)")
    if train and examples.height and examples["option_probs"].null_count() == examples.height:
        raise SpecError(f"{where}, but no train example has option_probs (none of its rows' sources or categories "
                        "has options)")
    found = []
    for text, options, probs in zip(texts, examples["options"].to_list(), examples["option_probs"].to_list()):
        found.append(None if probs is None else
                     OptionTarget(option_ids(tokenizer, as_conversation(text), options), list(probs)))
    return found


def option_token_ids(encoded) -> set[int]:
    """Every option token id of the encoded examples: a trimmed vocabulary must keep them."""
    return {i for e in encoded if getattr(e, "options", None) is not None for ids in e.options.ids for i in ids}


def collate_options(batch, pad_id: int) -> dict[str, torch.Tensor]:
    """The option tensors of a batch of Encoded examples (empty when none has options).

    token_kd [N]: False on the response tokens of option examples (no token KD there).
    option_input_ids / option_attention / option_mask [M, L]: one right-padded sequence per option
    example and option, prompt then option; the mask marks the positions predicting option tokens,
    option_targets [T] those tokens in row-major order. option_slot [M]: e * K + j for option j of the
    e-th option example; option_teacher [E, K] the teacher's probabilities (0 beyond an example's
    options), option_valid [E, K]; option_weight [E]: each option example's response tokens.
    """
    owners = [e for e in batch if getattr(e, "options", None) is not None]
    if not owners:
        return {}
    k = max(len(e.options.ids) for e in owners)
    seqs = [(e.prompt_ids, ids) for e in owners for ids in e.options.ids]
    width = max(len(p) + len(o) for p, o in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for m, (p, o) in enumerate(seqs):
        input_ids[m, : len(p) + len(o)] = torch.tensor(p + o)
        attention[m, : len(p) + len(o)] = 1
        mask[m, len(p) - 1 : len(p) - 1 + len(o)] = True
    teacher = torch.zeros((len(owners), k), dtype=torch.float32)
    valid = torch.zeros((len(owners), k), dtype=torch.bool)
    for e, owner in enumerate(owners):
        teacher[e, : len(owner.options.probs)] = torch.tensor(owner.options.probs, dtype=torch.float32)
        valid[e, : len(owner.options.probs)] = True
    return {
        "token_kd": torch.tensor([getattr(e, "options", None) is None for e in batch for _ in e.token_ids]),
        "option_input_ids": input_ids, "option_attention": attention, "option_mask": mask,
        "option_targets": torch.tensor([t for _, o in seqs for t in o]),
        "option_slot": torch.tensor([e * k + j for e, owner in enumerate(owners) for j in range(len(owner.options.ids))]),
        "option_teacher": teacher, "option_valid": valid,
        "option_weight": torch.tensor([float(len(e.token_ids)) for e in owners]),
    }


def student_option_log_probs(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """[E, K] the student's log-distribution over each option example's options (-inf beyond them)."""
    ids, targets = batch["option_input_ids"], batch["option_targets"]
    vocab_map = getattr(model, "vocab_map", None)
    if vocab_map is not None:  # a trimmed vocabulary: pads and option tokens are kept ids by construction
        ids, targets = vocab_map.ids(ids, "an option's prompt"), vocab_map.ids(targets, "an option token")
    mask = batch["option_mask"]
    hidden = model.base_model(input_ids=ids, attention_mask=batch["option_attention"], use_cache=False).last_hidden_state
    logits = model.get_output_embeddings()(hidden[mask]).float()
    token_lp = logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [T]
    seq = mask.nonzero()[:, 0]
    means = torch.zeros(ids.shape[0], device=token_lp.device).index_add(0, seq, token_lp) / mask.sum(-1)
    valid = batch["option_valid"]
    scores = torch.zeros(valid.numel(), device=means.device).index_add(0, batch["option_slot"], means)
    return scores.view(valid.shape).masked_fill(~valid, NEG_INF).log_softmax(-1)


def option_kd(model, batch: dict[str, torch.Tensor], loss_spec, temperature: float) -> torch.Tensor:
    """T^2 * sum over option examples of (response tokens * D(teacher || student options)) / N, N being the
    batch's response tokens: the options' share of the mean KD over response tokens."""
    student = student_option_log_probs(model, batch)
    teacher = batch["option_teacher"].to(student.device)
    present = batch["option_valid"] & (teacher > 0)
    teacher_lp = torch.where(present, teacher.clamp_min(1e-45).log(), torch.full_like(teacher, NEG_INF))
    per_example = divergence_per_token(teacher_lp, student, temperature, loss_spec.divergence, loss_spec.beta)
    return temperature**2 * (per_example * batch["option_weight"]).sum() / batch["mask"].sum()


def with_option_kd(parts: LossParts, model, batch: dict[str, torch.Tensor], loss_spec, temperature: float) -> LossParts:
    """The batch's LossParts with the option examples' KD added (unchanged without option examples)."""
    if "option_input_ids" not in batch:
        return parts
    term = option_kd(model, batch, loss_spec, temperature)
    return LossParts(parts.loss + loss_spec.kd_weight * term, parts.kd + term.detach(), parts.ce, parts.tokens)
