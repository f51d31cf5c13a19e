"""Teacher vs students on the eval split: size, speed, accuracy, agreement, token KL.

The teacher's answers are the stored ones (it is never asked again); its token KL
against its own stored top-k is a sanity check that should read about 0. Students
answer greedily from the same context they were trained on.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.table import Table
from transformers import GenerationConfig

from engine.teachers.answers import normalise_answer, split_answer
from engine.models import chat_prompt_ids, load_causal_lm, resolve_causal_lm, set_threads
from engine.spec import Spec, SpecError
from engine.train.data import collate, encode, response_logits, student_texts
from engine.train.losses import token_kl

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")


def evaluate(spec: Spec, examples: pl.DataFrame, student_dirs: dict[str, Path], *, progress: bool = True) -> list[dict]:
    """One row per model, the teacher first, on the rows of split spec.eval.split."""
    rows = examples.filter(pl.col("split") == spec.eval.split)
    if rows.is_empty():
        raise SpecError(f"{spec.path or '<spec>'}: eval.split: no rows in split {spec.eval.split!r}")
    set_threads()
    labels = set(examples["label"].drop_nulls().to_list()) if "label" in examples.columns else set()
    gold = rows["label"].to_list() if "label" in rows.columns else [None] * rows.height
    teacher_answers = [normalise_answer(a or "", labels) for a in rows["answer"].to_list()]
    marker = spec.teacher.reasoning.answer_marker if spec.teacher.reasoning else None
    max_new = spec.eval.max_new_tokens or spec.teacher.generation.max_new_tokens
    batch = spec.teacher.batch_size
    kinds = {s.name: s.kind for s in spec.students}

    n_speed = min(spec.eval.speed_prompts, rows.height)
    n_batches = -(-rows.height // batch)
    steps = (n_batches + n_speed) + len(student_dirs) * (2 * n_batches + n_speed)
    with Progress(TextColumn("[bold]eval {task.description}"), BarColumn(), MofNCompleteColumn(),
                  disable=not progress) as bar:
        task = bar.add_task(spec.teacher.model, total=steps)
        tick = lambda: bar.advance(task)  # noqa: E731

        teacher, tokenizer = load_causal_lm(spec.teacher.model)
        # Every model is timed on the same ids: the teacher's context of the first rows.
        speed_ids = [chat_prompt_ids(tokenizer, t) for t in rows["teacher_prompt"].to_list()[:n_speed]]
        teacher_acc = accuracy(teacher_answers, gold, labels)
        results = [{
            "name": spec.teacher.model,
            "kind": "teacher",
            "examples": rows.height,
            "params": count_params(teacher),
            "disk_bytes": weights_bytes(resolve_causal_lm(spec.teacher.model)),
            "decode_tok_s": decode_speed(teacher, tokenizer, speed_ids, spec.eval.speed_tokens, tick),
            "accuracy": teacher_acc,
            "agreement": 1.0,
            "token_kl": mean_token_kl(teacher, tokenizer, rows, rows["teacher_prompt"].to_list(), batch, tick),
            "retention": 1.0 if teacher_acc else None,
        }]
        del teacher

        texts = student_texts(rows, spec.training.student_prompt)
        for name, folder in student_dirs.items():
            bar.update(task, description=name)
            model, tok = load_causal_lm(str(folder))
            prompts = [chat_prompt_ids(tok, t) for t in texts]
            answers = [normalise_answer(split_answer(r, marker)[1], labels)
                       for r in generate_texts(model, tok, prompts, max_new, batch, tick)]
            acc = accuracy(answers, gold, labels)
            results.append({
                "name": name,
                "kind": kinds.get(name, "student"),
                "examples": rows.height,
                "params": count_params(model),
                "disk_bytes": weights_bytes(Path(folder)),
                "decode_tok_s": decode_speed(model, tok, speed_ids, spec.eval.speed_tokens, tick),
                "accuracy": acc,
                "agreement": float(np.mean([a == t for a, t in zip(answers, teacher_answers)])),
                "token_kl": mean_token_kl(model, tok, rows, texts, batch, tick),
                "retention": acc / teacher_acc if acc is not None and teacher_acc else None,
            })
            del model
    return results


def accuracy(answers: list[str], gold: list[str | None], labels: set[str]) -> float | None:
    """Share of labelled rows whose normalised answer is the normalised gold label."""
    pairs = [(a, g) for a, g in zip(answers, gold) if g is not None]
    if not pairs:
        return None
    return float(np.mean([a == normalise_answer(g, labels) for a, g in pairs]))


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())  # shared (tied) tensors count once


def weights_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in Path(folder).iterdir() if f.suffix in WEIGHT_SUFFIXES)


def _greedy(model, tokenizer, n_new: int, *, exactly: bool) -> GenerationConfig:
    eos = model.generation_config.eos_token_id
    return GenerationConfig(do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new if exactly else 0,
                            pad_token_id=tokenizer.pad_token_id, eos_token_id=eos if eos is not None else tokenizer.eos_token_id)


@torch.inference_mode()
def generate_texts(model, tokenizer, prompts: list[list[int]], max_new: int, batch: int, tick=lambda: None) -> list[str]:
    """Greedy replies, batched with left padding, cut at the first end-of-sequence token."""
    config = _greedy(model, tokenizer, max_new, exactly=False)
    stops = set(np.atleast_1d(config.eos_token_id).tolist())
    texts = []
    for start in range(0, len(prompts), batch):
        padded = tokenizer.pad({"input_ids": prompts[start : start + batch]}, padding=True, return_tensors="pt")
        out = model.generate(**padded, generation_config=config)
        for row in out[:, padded["input_ids"].shape[1] :].tolist():
            cut = next((i for i, t in enumerate(row) if t in stops), len(row))
            texts.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        tick()
    return texts


@torch.inference_mode()
def decode_speed(model, tokenizer, prompts: list[list[int]], n_tokens: int, tick=lambda: None) -> float:
    """Median batch-1 greedy tokens/s over the prompts, each decoding exactly n_tokens."""
    config = _greedy(model, tokenizer, n_tokens, exactly=True)
    model.generate(torch.tensor([prompts[0]]), generation_config=_greedy(model, tokenizer, 2, exactly=True))  # warm-up
    rates = []
    for ids in prompts:
        start = time.perf_counter()
        model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                       generation_config=config)
        rates.append(n_tokens / (time.perf_counter() - start))
        tick()
    return float(np.median(rates))


@torch.inference_mode()
def mean_token_kl(model, tokenizer, rows: pl.DataFrame, texts: list[str], batch: int, tick=lambda: None) -> float | None:
    """Mean over response tokens of KL(teacher top-k + tail at T=1 || model), teacher-forced."""
    encoded = encode(rows, tokenizer, texts)
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch):
        b = collate(encoded[start : start + batch], tokenizer.pad_token_id)
        kl = token_kl(response_logits(model, b), b["topk_ids"], b["topk_logprobs"], temperature=1.0)
        total, count = total + kl.sum().item(), count + kl.numel()
        tick()
    return total / count if count else None


def _share(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def format_table(rows: list[dict]) -> Table:
    table = Table(title="teacher vs students")
    for column in ("model", "kind", "params", "disk", "decode tok/s", "accuracy", "agreement", "token KL", "retention"):
        table.add_column(column, justify="left" if column in ("model", "kind") else "right")
    for r in rows:
        table.add_row(
            Path(r["name"]).name or r["name"], r["kind"],  # a teacher given as a path shows its folder name
            f"{r['params'] / 1e6:.1f}M", f"{r['disk_bytes'] / 1e6:.1f} MB",
            f"{r['decode_tok_s']:.1f}", _share(r["accuracy"]), _share(r["agreement"]),
            "–" if r["token_kl"] is None else f"{r['token_kl']:.4f}", _share(r["retention"]),
        )
    return table
