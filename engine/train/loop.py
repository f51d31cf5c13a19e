"""One pass over the train split feeds every student of the spec.

Each shuffled batch is collated once and handed to each student in turn, so adding a
student costs its own forward/backward only. Students never see the teacher model:
they learn from the stored tokens and top-k log-probs.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from engine.models import load_causal_lm, set_threads
from engine.spec import Spec, SpecError, Student
from engine.train.data import collate, encode, response_logits, student_texts
from engine.train.losses import distillation_loss
from engine.train.students import build_student, lr_depths

CURVE_POINTS = 100  # loss-curve points kept per student, whatever the run length


def lr_schedule(total_steps: int, warmup_steps: int):
    """Linear warmup to the full lr, then linear decay towards 0 (as HF Trainer does)."""
    warmup = min(warmup_steps, total_steps)

    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


@dataclass
class Trainee:
    student: Student
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    losses: list[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0

    @classmethod
    def create(cls, spec: Spec, student: Student, teacher, tokenizer, total_steps: int) -> "Trainee":
        model = build_student(spec, student, teacher, tokenizer)
        opt = spec.training.optimizer
        decay = opt.layerwise_lr_decay if student.kind != "config" else 1.0
        groups = []
        for depth, params in lr_depths(model, student.kind):
            lr = opt.lr * decay**depth
            # nanoGPT: decay matrices and embeddings, never norms or biases.
            groups.append({"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": opt.weight_decay})
            groups.append({"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(total_steps, opt.warmup_steps))
        model.train()
        return cls(student, model, optimizer, scheduler)

    def step(self, batch: dict[str, torch.Tensor], spec: Spec) -> float:
        start = time.perf_counter()
        loss_spec = spec.training.loss
        parts = distillation_loss(response_logits(self.model, batch), batch["topk_ids"], batch["topk_logprobs"],
                                  batch["targets"], kd_weight=loss_spec.kd_weight, hard_weight=loss_spec.hard_weight,
                                  temperature=loss_spec.temperature)
        parts.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(parts.loss.item())
        self.tokens += parts.tokens
        self.seconds += time.perf_counter() - start
        return self.losses[-1]


def train_students(spec: Spec, examples: pl.DataFrame, out_dir: Path, *, progress: bool = True) -> dict[str, dict]:
    """Train every student of the spec on the train split; save each to out_dir/<name>/."""
    where = spec.path or "<spec>"
    if not spec.students:
        raise SpecError(f"{where}: students: the spec names no student to train")
    train = examples.filter(pl.col("split") == "train")
    set_threads()
    teacher, tokenizer = load_causal_lm(spec.teacher.model)
    encoded = encode(train, tokenizer, student_texts(train, spec.training.student_prompt))
    if not encoded:
        raise SpecError(f"{where}: training: the train split has no example with teacher tokens to learn from")

    cfg = spec.training
    steps_per_epoch = math.ceil(len(encoded) / cfg.batch_size)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    trainees = [Trainee.create(spec, s, teacher, tokenizer, total_steps) for s in spec.students]
    del teacher  # students learn from stored log-probs; free its memory for training

    rng = np.random.default_rng(cfg.seed)  # batch order
    torch.manual_seed(cfg.seed)  # anything stochastic inside a student (dropout)
    started = time.perf_counter()
    step = 0
    columns = [TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[losses]}")]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("training", total=total_steps, losses="")
        while step < total_steps:
            order = rng.permutation(len(encoded))
            for start in range(0, len(order), cfg.batch_size):
                if step >= total_steps:
                    break
                batch = collate([encoded[i] for i in order[start : start + cfg.batch_size]], tokenizer.pad_token_id)
                for t in trainees:
                    t.step(batch, spec)
                step += 1
                running = "  ".join(f"{t.student.name} {np.mean(t.losses[-20:]):.3f}" for t in trainees)
                bar.update(task, advance=1, losses=running)
    run_seconds = time.perf_counter() - started

    out_dir = Path(out_dir)
    results = {}
    for t in trainees:
        metrics = _metrics(t, spec, len(encoded), step, steps_per_epoch, run_seconds)
        _save(t, tokenizer, out_dir / t.student.name, metrics)
        results[t.student.name] = metrics
    return results


def _loss_curve(losses: list[float]) -> tuple[int, list[list[float]]]:
    """[[step, mean loss of the window ending there], ...] with at most CURVE_POINTS points."""
    every = max(1, math.ceil(len(losses) / CURVE_POINTS))
    curve = [[min(end, len(losses)), float(np.mean(losses[end - every : end]))]
             for end in range(every, len(losses) + every, every)]
    return every, curve


def _metrics(t: Trainee, spec: Spec, n_examples: int, steps: int, steps_per_epoch: int, run_seconds: float) -> dict:
    every, curve = _loss_curve(t.losses)
    return {
        "student": t.student.name,
        "kind": t.student.kind,
        "params": sum(p.numel() for p in t.model.parameters()),
        "steps": steps,
        "epochs": round(steps / steps_per_epoch, 3),  # fractional when max_steps stopped early
        "train_examples": n_examples,
        "train_tokens": t.tokens,  # response tokens seen, repeats across epochs included
        "batch_size": spec.training.batch_size,
        "first_loss": t.losses[0],
        "last_loss": t.losses[-1],
        "curve_every": every,
        "loss_curve": curve,
        "wall_seconds": round(t.seconds, 3),  # this student's own forward/backward/step time
        "run_seconds": round(run_seconds, 3),  # the whole shared pass
    }


def _save(t: Trainee, tokenizer, folder: Path, metrics: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t.model.eval()
    t.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
