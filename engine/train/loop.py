"""One pass over the train split feeds every student of the spec.

Each shuffled batch is collated once and handed to each student in turn, so adding a
student costs its own forward/backward only. Students never see the teacher model:
they learn from the stored tokens and top-k log-probs.

An optimizer step takes batch_size * grad_accum examples as grad_accum micro-batches, each
weighted by its share of the response tokens (the gradient of one batch holding them all).
The hard weight and the temperature follow their schedules per optimizer step. After each
epoch every student's loss on the val split (no grad) is recorded; early stopping and
`keep: best` act on it. The defaults reproduce the single-batch, fixed-loss trainer exactly.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from engine.models import load_causal_lm, set_threads
from engine.spec import Loss, Spec, SpecError, Student
from engine.train.data import collate, encode, response_logits, student_texts
from engine.train.losses import distillation_loss
from engine.train.students import build_student, lr_depths

CURVE_POINTS = 100  # loss-curve points kept per student, whatever the run length


def lr_schedule(total_steps: int, warmup_steps: int, schedule: str = "linear"):
    """Linear warmup to the full lr, then (as HF Trainer does) linear decay towards 0, a constant lr,
    or cosine decay towards 0. No step runs at lr 0: decay reaches 0 only one step past the end."""
    warmup = min(warmup_steps, total_steps)

    def factor(step: int) -> float:  # step: optimizer steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if schedule == "cosine":  # HF get_cosine_schedule_with_warmup, half a cycle
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def hard_weight_at(loss: Loss, step: int) -> float:
    """loss.hard_weight, ramped linearly from 0 at step 0 to full at step hard_warmup_steps."""
    if step >= loss.hard_warmup_steps:
        return loss.hard_weight
    return loss.hard_weight * step / loss.hard_warmup_steps


def temperature_at(loss: Loss, step: int, total_steps: int) -> float:
    """loss.temperature at step 0, linearly to loss.temperature_end at the last step (total_steps - 1)."""
    if loss.temperature_end is None:
        return loss.temperature
    progress = min(1.0, step / max(1, total_steps - 1))
    return loss.temperature + (loss.temperature_end - loss.temperature) * progress


def _loss(model, batch: dict[str, torch.Tensor], loss: Loss, hard_weight: float, temperature: float):
    return distillation_loss(response_logits(model, batch), batch["topk_ids"], batch["topk_logprobs"],
                             batch["targets"], kd_weight=loss.kd_weight, hard_weight=hard_weight,
                             temperature=temperature, divergence=loss.divergence, beta=loss.beta, tail=loss.tail)


@dataclass
class Trainee:
    student: Student
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lr: float  # the top layer's peak lr (spec.training.optimizer.lr)
    losses: list[float] = field(default_factory=list)  # per optimizer step, over all its micro-batches
    lrs: list[float] = field(default_factory=list)  # the top layer's lr at each step
    temperatures: list[float] = field(default_factory=list)
    hard_weights: list[float] = field(default_factory=list)
    grad_norms: list[float] = field(default_factory=list)  # before clipping
    val_losses: list[list[float]] = field(default_factory=list)  # [epoch, step, loss] after each epoch
    tokens: int = 0
    seconds: float = 0.0
    val_seconds: float = 0.0
    active: bool = True  # False once early stopping stopped it
    stopped_early: bool = False
    best: list[float] | None = None  # [epoch, step, loss] of the lowest val loss
    best_state: dict[str, torch.Tensor] | None = None
    epochs_without_improvement: int = 0

    @classmethod
    def create(cls, spec: Spec, student: Student, teacher, tokenizer, total_steps: int,
               calibration: list[list[int]] | None = None) -> "Trainee":
        model = build_student(spec, student, teacher, tokenizer, calibration)
        opt = spec.training.optimizer
        decay = opt.layerwise_lr_decay if student.kind != "config" else 1.0
        groups = []
        for depth, params in lr_depths(model, student.kind):
            lr = opt.lr * decay**depth
            # nanoGPT: decay matrices and embeddings, never norms or biases.
            groups.append({"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": opt.weight_decay})
            groups.append({"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))
        factor = lr_schedule(total_steps, opt.warmup_steps, opt.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        model.train()
        return cls(student, model, optimizer, scheduler, opt.lr)

    def step(self, micro_batches: list[dict[str, torch.Tensor]], spec: Spec, step: int, total_steps: int) -> float:
        """One optimizer step over grad_accum micro-batches; returns its loss."""
        start = time.perf_counter()
        total = self.accumulate(micro_batches, spec, step, total_steps)
        self.lrs.append(self.lr * self.scheduler.lr_lambdas[0](step))
        clip = spec.training.optimizer.clip_grad_norm
        # max_norm inf: measures the norm and scales by exactly 1.
        self.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip or math.inf)))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(total)
        self.seconds += time.perf_counter() - start
        return total

    def accumulate(self, micro_batches: list[dict[str, torch.Tensor]], spec: Spec, step: int,
                   total_steps: int) -> float:
        """Backward over the micro-batches, each weighted by its share of their response tokens: the
        gradients (and the returned loss) are those of one batch holding them all."""
        loss_spec = spec.training.loss
        hard, temperature = hard_weight_at(loss_spec, step), temperature_at(loss_spec, step, total_steps)
        self.temperatures.append(temperature)
        self.hard_weights.append(hard)
        n = sum(int(b["mask"].sum()) for b in micro_batches)
        total = 0.0
        for batch in micro_batches:
            parts = _loss(self.model, batch, loss_spec, hard, temperature)
            loss = parts.loss if len(micro_batches) == 1 else parts.loss * (parts.tokens / n)
            loss.backward()
            total += loss.item()
            self.tokens += parts.tokens
        return total

    def validate(self, batches: list[dict[str, torch.Tensor]], spec: Spec, total_steps: int) -> float:
        """The training loss on the val split, no grad, token-weighted over all of it. At the schedules'
        final values (full hard weight, temperature_end), so every epoch's number is comparable."""
        start = time.perf_counter()
        loss_spec = spec.training.loss
        temperature = temperature_at(loss_spec, max(0, total_steps - 1), total_steps)
        total, n = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for batch in batches:
                parts = _loss(self.model, batch, loss_spec, loss_spec.hard_weight, temperature)
                total += parts.loss.item() * parts.tokens
                n += parts.tokens
        self.model.train()
        self.val_seconds += time.perf_counter() - start
        return total / n

    def after_epoch(self, val_loss: float, epoch: float, keep_best: bool, patience: int | None) -> None:
        """Record the val loss; keep the best weights; stop after `patience` epochs without improvement."""
        point = [round(epoch, 3), len(self.losses), val_loss]
        self.val_losses.append(point)
        if self.best is None or val_loss < self.best[2]:
            self.best, self.epochs_without_improvement = point, 0
            if keep_best:
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        else:
            self.epochs_without_improvement += 1
            if patience is not None and self.epochs_without_improvement >= patience:
                self.active, self.stopped_early = False, True


def train_students(spec: Spec, examples: pl.DataFrame, out_dir: Path, *, progress: bool = True) -> dict[str, dict]:
    """Train every student of the spec on the train split; save each to out_dir/<name>/."""
    where = spec.path or "<spec>"
    if not spec.students:
        raise SpecError(f"{where}: students: the spec names no student to train")
    cfg = spec.training
    patience = cfg.early_stopping.patience if cfg.early_stopping else None
    keep_best = (cfg.keep or ("best" if cfg.early_stopping else "last")) == "best"
    train = examples.filter(pl.col("split") == "train")
    val = examples.filter(pl.col("split") == "val")
    set_threads()
    teacher, tokenizer = load_causal_lm(spec.teacher.model)
    encoded = encode(train, tokenizer, student_texts(train, cfg.student_prompt))
    if not encoded:
        raise SpecError(f"{where}: training: the train split has no example with teacher tokens to learn from")
    val_encoded = encode(val, tokenizer, student_texts(val, cfg.student_prompt)) if val.height else []
    if (patience is not None or keep_best) and not val_encoded:
        what = "early_stopping" if patience is not None else "keep: best"
        raise SpecError(f"{where}: training.{what} needs the val loss, and the val split has no example "
                        "with teacher tokens (give splits.val a share)")
    val_batches = [collate(val_encoded[i : i + cfg.batch_size], tokenizer.pad_token_id)
                   for i in range(0, len(val_encoded), cfg.batch_size)]

    group = cfg.batch_size * cfg.grad_accum  # examples per optimizer step
    steps_per_epoch = math.ceil(len(encoded) / group)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    calibration = [e.prompt_ids + e.token_ids for e in encoded]  # where from_teacher pruning measures importance
    trainees = [Trainee.create(spec, s, teacher, tokenizer, total_steps, calibration) for s in spec.students]
    for t in trainees:  # what pruning kept and why (also in metrics.json under "pruning")
        if progress and getattr(t.model, "pruning_report", None):
            print(t.model.pruning_report["summary"], file=sys.stderr)
    del teacher  # students learn from stored log-probs; free its memory for training

    rng = np.random.default_rng(cfg.seed)  # batch order
    torch.manual_seed(cfg.seed)  # anything stochastic inside a student (dropout)
    started = time.perf_counter()
    step = 0
    columns = [TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[losses]}")]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("training", total=total_steps, losses="")
        while step < total_steps and any(t.active for t in trainees):
            order = rng.permutation(len(encoded))
            for start in range(0, len(order), group):
                if step >= total_steps:
                    break
                chunk = order[start : start + group]
                micro = [collate([encoded[i] for i in chunk[j : j + cfg.batch_size]], tokenizer.pad_token_id)
                         for j in range(0, len(chunk), cfg.batch_size)]
                for t in trainees:
                    if t.active:
                        t.step(micro, spec, step, total_steps)
                step += 1
                running = "  ".join(f"{t.student.name} {np.mean(t.losses[-20:]):.3f}" for t in trainees)
                bar.update(task, advance=1, losses=running)
            if val_batches:  # after each epoch (or the partial one max_steps ended)
                for t in trainees:
                    if t.active:
                        t.after_epoch(t.validate(val_batches, spec, total_steps), step / steps_per_epoch,
                                      keep_best, patience)
    run_seconds = time.perf_counter() - started

    out_dir = Path(out_dir)
    results = {}
    for t in trainees:
        if keep_best and t.best_state is not None:
            t.model.load_state_dict(t.best_state)
        metrics = _metrics(t, spec, len(encoded), steps_per_epoch, run_seconds, keep_best)
        _save(t, tokenizer, out_dir / t.student.name, metrics)
        results[t.student.name] = metrics
    return results


def _loss_curve(losses: list[float]) -> tuple[int, list[list[float]]]:
    """[[step, mean loss of the window ending there], ...] with at most CURVE_POINTS points."""
    every = max(1, math.ceil(len(losses) / CURVE_POINTS))
    curve = [[min(end, len(losses)), float(np.mean(losses[end - every : end]))]
             for end in range(every, len(losses) + every, every)]
    return every, curve


def _sampled(values: list[float], every: int) -> list[list[float]]:
    """[[step, value at that step], ...]: every `every`-th optimizer step (0-based) and the last."""
    steps = list(range(0, len(values), every))
    if values and steps[-1] != len(values) - 1:
        steps.append(len(values) - 1)
    return [[s, float(values[s])] for s in steps]


def _metrics(t: Trainee, spec: Spec, n_examples: int, steps_per_epoch: int, run_seconds: float,
             keep_best: bool) -> dict:
    every, curve = _loss_curve(t.losses)
    steps = len(t.losses)
    cfg = spec.training
    return {
        "student": t.student.name,
        "kind": t.student.kind,
        "params": sum(p.numel() for p in t.model.parameters()),
        "steps": steps,  # optimizer steps
        "epochs": round(steps / steps_per_epoch, 3),  # fractional when max_steps or early stopping stopped it
        "train_examples": n_examples,
        "train_tokens": t.tokens,  # response tokens seen, repeats across epochs included
        "batch_size": cfg.batch_size,
        "grad_accum": cfg.grad_accum,
        "first_loss": t.losses[0],
        "last_loss": t.losses[-1],
        "curve_every": every,
        "loss_curve": curve,
        "grad_norm_curve": _loss_curve(t.grad_norms)[1],  # before clipping, window means like loss_curve
        "loss": cfg.loss.model_dump(),
        "optimizer": cfg.optimizer.model_dump(),
        # What the schedules gave, at every curve_every-th step (0-based) and the last.
        "schedules": {"lr": _sampled(t.lrs, every), "temperature": _sampled(t.temperatures, every),
                      "hard_weight": _sampled(t.hard_weights, every)},
        "val_losses": t.val_losses,  # [epoch, step, val loss] after each epoch; empty without a val split
        "best_val": t.best,  # [epoch, step, val loss] of the lowest
        "early_stopping": cfg.early_stopping.model_dump() if cfg.early_stopping else None,
        "stopped_early": t.stopped_early,
        "kept": "best" if keep_best and t.best_state is not None else "last",  # whose weights were saved
        "pruning": getattr(t.model, "pruning_report", None),  # from_teacher: what was kept and why
        "wall_seconds": round(t.seconds, 3),  # this student's own forward/backward/step time
        "val_seconds": round(t.val_seconds, 3),
        "run_seconds": round(run_seconds, 3),  # the whole shared pass
    }


def _save(t: Trainee, tokenizer, folder: Path, metrics: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t.model.eval()
    t.model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
