"""One pass over the train split feeds every student of the spec.

Each shuffled batch is collated once and handed to each student in turn, so adding a
student costs its own forward/backward only. Students learn from the stored tokens and top-k
log-probs (or sampled draws: engine/train/sampled.py); only with training.loss.hidden or
training.teacher_signal: online is the teacher model kept, to run one no-grad forward per micro-batch
whose hidden states or full-vocabulary log-probs every student reads (engine/train/hidden.py, online.py).
With training.on_policy, a seeded share of the optimizer steps instead learn from each student's own
samples, scored by the teacher (engine/train/on_policy.py).

An optimizer step takes batch_size * grad_accum examples as grad_accum micro-batches, each
weighted by its share of the response tokens (the gradient of one batch holding them all).
The hard weight and the temperature follow their schedules per optimizer step. After each
epoch every student's loss on the val split (no grad) is recorded; early stopping and
`keep: best` act on it. The defaults reproduce the single-batch, fixed-loss trainer exactly.

Every training.checkpoint_every steps the whole state (engine/train/checkpoint.py) is saved, and
a run that finds its checkpoint resumes from it with the same batches, to the same weights. The
students train on training.device: the CPU path is plain float32; on CUDA, forwards run under
bf16 autocast with the losses in float32 (engine/train/device.py). Under --nproc N each rank runs this
same loop on its slice of every micro-batch, the gradients summed across ranks (engine/train/distributed.py).
"""

from __future__ import annotations

import contextlib
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
from engine.spec import Loss, OnPolicy, Spec, SpecError, Student
from engine.train import distributed
from engine.train.data import collate, encode, response_logits, student_conversations
from engine.train.device import autocast, autocast_dtype, resolve_device, to_device
from engine.train.hidden import HiddenDistill, check_teacher_layers, decoder_layers
from engine.train.losses import distillation_loss
from engine.train.on_policy import OnPolicyBatches, check_on_policy, on_policy_loss
from engine.train.online import EachPass, check_online, online_distillation_loss, peak_memory, with_teacher_signal
from engine.train.options import option_targets, option_token_ids, with_option_kd
from engine.train.sampled import check_sampled_training, sampled_distillation_loss
from engine.train.students import build_student, lr_depths
from engine.train.vocab import dataset_ids, remap_for

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


def answer_marker(spec: Spec) -> str | None:
    """The marker whose end starts each response's answer tokens, when the token weights tell them apart."""
    loss = spec.training.loss
    if spec.teacher.reasoning is None or loss.reasoning_weight == loss.answer_weight:
        return None
    return spec.teacher.reasoning.answer_marker


def token_weights(batch: dict[str, torch.Tensor], loss: Loss) -> torch.Tensor | None:
    """[N] per response token: answer_weight on answer tokens, reasoning_weight before them; None when
    both are 1, so the default loss runs the plain mean (bit for bit)."""
    if loss.reasoning_weight == loss.answer_weight == 1.0:
        return None
    return torch.where(batch["answer_mask"], loss.answer_weight, loss.reasoning_weight)


def _loss(model, batch: dict[str, torch.Tensor], loss: Loss, hard_weight: float, temperature: float,
          targets: str = "topk"):
    """targets: what the KD term reads: the stored top-k ("topk"), stored draws ("sampled",
    engine/train/sampled.py) or the live teacher's full vocabulary ("online", engine/train/online.py)."""
    if targets == "online":
        return online_distillation_loss(
            response_logits(model, batch), batch["teacher_log_probs"], batch["targets"], kd_weight=loss.kd_weight,
            hard_weight=hard_weight, temperature=temperature, divergence=loss.divergence, beta=loss.beta,
            weights=token_weights(batch, loss), kd_mask=batch.get("token_kd"))
    if targets == "sampled":  # checked before training: forward KL at T = 1, no trimmed vocabulary
        return sampled_distillation_loss(
            response_logits(model, batch), batch["topk_ids"], batch["topk_logprobs"], batch["targets"],
            kd_weight=loss.kd_weight, hard_weight=hard_weight, weights=token_weights(batch, loss),
            kd_mask=batch.get("token_kd"))
    batch = remap_for(model, batch)  # a trimmed vocabulary: teacher ids -> the student's (engine/train/vocab.py)
    return distillation_loss(response_logits(model, batch), batch["topk_ids"], batch["topk_logprobs"],
                             batch["targets"], kd_weight=loss.kd_weight, hard_weight=hard_weight,
                             temperature=temperature, divergence=loss.divergence, beta=loss.beta, tail=loss.tail,
                             weights=token_weights(batch, loss), kd_mask=batch.get("token_kd"))


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
    # Per optimizer step, token-weighted over its micro-batches and unweighted by the loss weights:
    # kd (T^2 * divergence), hard (CE on the teacher's token) and, with training.loss.hidden, hidden.
    components: dict[str, list[float]] = field(default_factory=dict)
    hidden: HiddenDistill | None = None  # training.loss.hidden: layer map and projections (not saved)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    targets: str = "topk"  # what the KD term reads (_loss): topk, sampled or online

    # What a checkpoint keeps of a trainee beside its model, optimizer, scheduler and projections.
    RECORDS = ("losses", "lrs", "temperatures", "hard_weights", "grad_norms", "val_losses", "components", "tokens",
               "seconds", "val_seconds", "active", "stopped_early", "best", "best_state", "epochs_without_improvement")

    @classmethod
    def create(cls, spec: Spec, student: Student, teacher, tokenizer, total_steps: int,
               calibration: list[list[int]] | None = None, used_ids: set[int] | None = None,
               device: torch.device | None = None, targets: str = "topk") -> "Trainee":
        model = build_student(spec, student, teacher, tokenizer, calibration, used_ids)
        device = device or torch.device("cpu")
        model.to(device)  # on the CPU: nothing moves
        # After the seeded student build: the projections' init is seeded too.
        hidden = HiddenDistill.for_student(spec, student, model, teacher).to(device) \
            if spec.training.loss.hidden is not None else None
        opt = spec.training.optimizer
        decay = opt.layerwise_lr_decay if student.kind != "config" else 1.0
        groups = []
        for depth, params in lr_depths(model, student.kind):
            lr = opt.lr * decay**depth
            # nanoGPT: decay matrices and embeddings, never norms or biases.
            groups.append({"params": [p for p in params if p.dim() >= 2], "lr": lr, "weight_decay": opt.weight_decay})
            groups.append({"params": [p for p in params if p.dim() < 2], "lr": lr, "weight_decay": 0.0})
        if hidden is not None and hidden.projections is not None:  # trained beside the student, at the top lr
            groups.append({"params": list(hidden.parameters()), "lr": opt.lr, "weight_decay": opt.weight_decay})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95))
        factor = lr_schedule(total_steps, opt.warmup_steps, opt.schedule)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        model.train()
        return cls(student, model, optimizer, scheduler, opt.lr, hidden=hidden, device=device, targets=targets)

    def parameters(self) -> list[torch.nn.Parameter]:
        """What the optimizer trains: the student's parameters, then its hidden-state projections."""
        return [*self.model.parameters(), *(self.hidden.parameters() if self.hidden is not None else ())]

    def state_dict(self) -> dict:
        """Everything a checkpoint needs to continue this trainee exactly (engine/train/checkpoint.py)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "hidden": self.hidden.state_dict() if self.hidden is not None else None,
                **{name: getattr(self, name) for name in self.RECORDS}}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.hidden is not None:
            self.hidden.load_state_dict(state["hidden"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        for name in self.RECORDS:
            setattr(self, name, state[name])

    def step(self, micro_batches: list[dict[str, torch.Tensor]], spec: Spec, step: int, total_steps: int,
             on_policy: OnPolicy | None = None) -> float:
        """One optimizer step over grad_accum micro-batches; returns its loss. on_policy: the micro-batches
        hold the student's own samples (engine/train/on_policy.py)."""
        start = time.perf_counter()
        total = self.accumulate(micro_batches, spec, step, total_steps, on_policy)
        distributed.sum_gradients(self.parameters())  # --nproc: every rank now holds the global batch's gradient
        self.lrs.append(self.lr * self.scheduler.lr_lambdas[0](step))
        clip = spec.training.optimizer.clip_grad_norm
        # max_norm inf: measures the norm and scales by exactly 1.
        self.grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.parameters(), clip or math.inf)))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.losses.append(total)
        self.seconds += time.perf_counter() - start
        return total

    def accumulate(self, micro_batches: list[dict[str, torch.Tensor]], spec: Spec, step: int,
                   total_steps: int, on_policy: OnPolicy | None = None) -> float:
        """Backward over the micro-batches, each weighted by its share of their response tokens: the
        gradients (and the returned loss) are those of one batch holding them all. With --nproc the micro-batches
        are this rank's shards, weighted by their share of the tokens on every rank (engine/train/distributed.py)."""
        loss_spec = spec.training.loss
        hard, temperature = hard_weight_at(loss_spec, step), temperature_at(loss_spec, step, total_steps)
        self.temperatures.append(temperature)
        self.hard_weights.append(hard)
        n, = distributed.sum_values([sum(int(b["mask"].sum()) for b in micro_batches)])  # the step's tokens, all ranks
        whole = len(micro_batches) == 1 and distributed.world_size() == 1  # the plain mean, bit for bit
        total, tokens = 0.0, 0
        components = dict.fromkeys(("kd", "hard") + (("hidden",) if self.hidden is not None else ()), 0.0)
        for batch in micro_batches:
            parts, hidden = self.forward(batch, loss_spec, hard, temperature, on_policy)
            objective = parts.loss if hidden is None else parts.loss + loss_spec.hidden.weight * hidden
            share = 1.0 if whole else parts.tokens / n
            loss = objective if whole else objective * share
            loss.backward()
            total += loss.item()
            tokens += parts.tokens
            components["kd"] += parts.kd.item() * share
            components["hard"] += parts.ce.item() * share
            if hidden is not None:
                components["hidden"] += hidden.item() * share
        total, tokens, *values = distributed.sum_values([total, tokens, *components.values()])
        self.tokens += int(tokens)
        for name, value in zip(components, values):
            self.components.setdefault(name, []).append(value)
        return total

    def forward(self, batch: dict[str, torch.Tensor], loss_spec: Loss, hard_weight: float, temperature: float,
                on_policy: OnPolicy | None = None):
        """(LossParts, hidden term or None) of one batch: one student forward (under autocast on CUDA),
        whose mapped layers' outputs the hidden term reads through hooks."""
        hooks = self.hidden.capture(self.model, batch["mask"]) if self.hidden is not None else contextlib.nullcontext()
        with autocast(self.device), hooks as states:
            if on_policy is not None:  # the student's own samples: the divergence alone, no hard CE
                parts = on_policy_loss(self.model, batch, temperature, on_policy.divergence, on_policy.beta)
            else:
                parts = _loss(self.model, batch, loss_spec, hard_weight, temperature, self.targets)
        with autocast(self.device):  # kd_target: options: the option sequences' forward, outside the hooks
            parts = with_option_kd(parts, self.model, batch, loss_spec, temperature)
        hidden = self.hidden(states, batch["teacher_hidden"]) if self.hidden is not None else None
        return parts, hidden

    def validate(self, batches: list[dict[str, torch.Tensor]], spec: Spec, total_steps: int) -> float:
        """The training loss on the val split (the hidden term included), no grad, token-weighted over all
        of it. At the schedules' final values (full hard weight, temperature_end), so every epoch's number
        is comparable."""
        start = time.perf_counter()
        loss_spec = spec.training.loss
        temperature = temperature_at(loss_spec, max(0, total_steps - 1), total_steps)
        total, n = 0.0, 0
        self.model.eval()
        with torch.no_grad():
            for batch in batches:
                parts, hidden = self.forward(batch, loss_spec, loss_spec.hard_weight, temperature)
                loss = parts.loss if hidden is None else parts.loss + loss_spec.hidden.weight * hidden
                total += loss.item() * parts.tokens
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


def train_students(spec: Spec, examples: pl.DataFrame, out_dir: Path, *, progress: bool = True,
                   checkpoints=None, logprobs_mode: str = "topk") -> dict[str, dict]:
    """Train every student of the spec on the train split; save each to out_dir/<name>/.

    checkpoints: the run's RunCheckpoints (engine/train/checkpoint.py), held open by the caller. Every
    training.checkpoint_every optimizer steps the whole training state is saved there, and a checkpoint
    found there is resumed from: the run then ends with exactly the weights of an uninterrupted one.
    logprobs_mode: what the dataset's topk_* columns hold (its teach stage's lineage: engine.train.runs.logprobs_mode).
    """
    where = spec.path or "<spec>"
    if not spec.students:
        raise SpecError(f"{where}: students: the spec names no student to train")
    cfg = spec.training
    device = distributed.rank_device(resolve_device(cfg.device, where))
    check_on_policy(spec, where)
    online = cfg.teacher_signal == "online"
    if online:
        check_online(spec.students, where)
    elif logprobs_mode == "sampled":
        check_sampled_training(cfg.loss, where, spec.students)
    targets = "online" if online else logprobs_mode
    patience = cfg.early_stopping.patience if cfg.early_stopping else None
    keep_best = (cfg.keep or ("best" if cfg.early_stopping else "last")) == "best"
    train = examples.filter(pl.col("split") == "train")
    val = examples.filter(pl.col("split") == "val")
    set_threads()
    teacher, tokenizer = load_causal_lm(spec.teacher.model)
    if cfg.loss.hidden is not None:  # before any student is built: a bad teacher layer fails at once
        check_teacher_layers(cfg.loss.hidden.layer_map, len(decoder_layers(teacher)), where)
    marker = answer_marker(spec)
    from engine.stages.teach import teacher_contexts  # here, not above: engine.stages imports the trainer

    texts = student_conversations(train, spec)
    encoded = encode(train, tokenizer, texts, marker, options=option_targets(train, spec, tokenizer, texts, train=True),
                     teacher_texts=teacher_contexts(train, spec) if online or cfg.on_policy else None)
    if not encoded:
        raise SpecError(f"{where}: training: the train split has no example with teacher tokens to learn from")
    val_texts = student_conversations(val, spec) if val.height else []
    val_encoded = encode(val, tokenizer, val_texts, marker, options=option_targets(val, spec, tokenizer, val_texts),
                         teacher_texts=teacher_contexts(val, spec) if online else None) if val.height else []
    if (patience is not None or keep_best) and not val_encoded:
        what = "early_stopping" if patience is not None else "keep: best"
        raise SpecError(f"{where}: training.{what} needs the val loss, and the val split has no example "
                        "with teacher tokens (give splits.val a share)")
    val_batches = [to_device(collate(val_encoded[i : i + cfg.batch_size], tokenizer.pad_token_id), device)
                   for i in range(0, len(val_encoded), cfg.batch_size)]

    group = cfg.batch_size * cfg.grad_accum  # examples per optimizer step
    steps_per_epoch = math.ceil(len(encoded) / group)
    total_steps = min(cfg.epochs * steps_per_epoch, cfg.max_steps or math.inf)
    calibration = [e.prompt_ids + e.token_ids for e in encoded]  # where from_teacher pruning measures importance
    # What a trimmed vocabulary must keep: the ids the examples use, and with kd_target: options their options'.
    used_ids = dataset_ids(encoded + val_encoded) | option_token_ids(encoded + val_encoded)
    trainees = [Trainee.create(spec, s, teacher, tokenizer, total_steps, calibration, used_ids, device=device,
                               targets=targets) for s in spec.students]
    for t in trainees:  # --nproc: rank 0's build on every rank (engine/train/distributed.py)
        distributed.same_start(t.student.name, [t.model] + ([t.hidden] if t.hidden is not None else []))
    for t in trainees:  # what pruning kept and why (also in metrics.json under "pruning")
        if progress and getattr(t.model, "pruning_report", None):
            print(t.model.pruning_report["summary"], file=sys.stderr)
    # The teacher layers some student's hidden term reads; none: students learn from stored log-probs alone.
    teacher_layers = sorted({layer for t in trainees if t.hidden is not None for layer in t.hidden.layer_map.values()})
    if teacher_layers or online or cfg.on_policy:
        teacher.to(device).requires_grad_(False)  # kept, in eval mode, for one no-grad forward per micro-batch
    else:
        del teacher  # free its memory for training
    own_samples = OnPolicyBatches(spec, teacher, tokenizer, device, teacher_layers) if cfg.on_policy else None
    teacher_seconds = 0.0  # the live teacher's forwards (online / hidden), shared by every student

    def with_teacher(batches: list[dict]) -> list[dict]:
        nonlocal teacher_seconds
        if not (teacher_layers or online):
            return batches
        began = time.perf_counter()
        out = [with_teacher_signal(teacher, b, teacher_layers, online) for b in batches]
        teacher_seconds += time.perf_counter() - began
        return out

    rng = np.random.default_rng(cfg.seed)  # batch order
    torch.manual_seed(cfg.seed)  # anything stochastic inside a student (dropout)
    # Where the run stands: optimizer steps taken, this epoch's batch order and the next example in it.
    step, order, position = 0, None, 0
    before = 0.0  # run seconds spent by the processes this run resumes
    resumed_from = None
    names = [s.name for s in spec.students]
    fits = {"students": names, "examples": len(encoded), "total_steps": total_steps}
    # Loaded onto the CPU: RNG states must stay there; weights and optimizer state are copied onto the
    # device by load_state_dict, so a checkpoint written on one device resumes on another.
    state = checkpoints.load(map_location="cpu") if checkpoints is not None else None
    if state is not None and state["fits"] != fits:  # the key matched, the data did not: start over
        print(f"ignoring a checkpoint of run {checkpoints.folder.name} that does not fit it "
              f"({state['fits']} vs {fits})", file=sys.stderr)
        checkpoints.discard()
        state = None
    state = distributed.broadcast(state)  # --nproc: rank 0 alone reads the checkpoint; every rank resumes from it
    if state is not None:
        for t, saved in zip(trainees, state["trainees"]):
            t.load_state_dict(saved)
        step, position, before = state["step"], state["position"], state["run_seconds"]
        order = state["order"].numpy() if state["order"] is not None else None
        rng.bit_generator.state = state["numpy_rng"]
        if own_samples is not None:
            own_samples.load_state_dict(state["on_policy"])
        torch.set_rng_state(state["torch_rng"])
        if device.type == "cuda" and state.get("cuda_rng") is not None:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        resumed_from = step
        if distributed.is_writer():
            print(f"resuming from step {step}", file=sys.stderr)
        del state
    started = time.perf_counter()

    def save_checkpoint() -> None:
        checkpoints.save({
            "fits": fits, "step": step, "position": position, "run_seconds": before + time.perf_counter() - started,
            "order": torch.from_numpy(order) if order is not None else None,
            "numpy_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
            "trainees": [t.state_dict() for t in trainees],
            "on_policy": own_samples.state_dict() if own_samples is not None else None,
        })

    every = cfg.checkpoint_every if checkpoints is not None else None
    columns = [TextColumn("[bold]training"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
               TextColumn("{task.fields[losses]}")]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task("training", total=total_steps, losses="", completed=step)
        while step < total_steps and any(t.active for t in trainees):
            if order is None:  # a new epoch (a resumed one goes on with its saved order)
                order, position = rng.permutation(len(encoded)), 0
            while position < len(order) and step < total_steps:
                chunk = order[position : position + group]
                micro_examples = [[encoded[i] for i in chunk[j : j + cfg.batch_size]]
                                  for j in range(0, len(chunk), cfg.batch_size)]
                if distributed.world_size() > 1:  # this rank's slice of each micro-batch (some may be empty)
                    micro_examples = [part for part in map(distributed.shard, micro_examples) if part]
                if own_samples is not None and own_samples.takes(step):  # each student learns from its own samples
                    for t in trainees:
                        if t.active:
                            batches = own_samples.micro_batches(t.model, t.student.name, micro_examples, step)
                            t.step(batches, spec, step, total_steps, on_policy=cfg.on_policy)
                else:
                    micro = [to_device(collate(e, tokenizer.pad_token_id), device) for e in micro_examples]
                    micro = with_teacher(micro)  # the teacher's hidden states, once for every student
                    for t in trainees:
                        if t.active:
                            t.step(micro, spec, step, total_steps)
                step += 1
                position += group
                running = "  ".join(f"{t.student.name} {np.mean(t.losses[-20:]):.3f}" for t in trainees)
                bar.update(task, advance=1, losses=running)
                if every and step % every == 0 and step < total_steps:
                    save_checkpoint()
            if val_batches:  # after each epoch (or the partial one max_steps ended)
                batches = None  # --nproc: rank 0 alone reads the val split
                if distributed.is_writer():
                    # online: each val batch meets the teacher as it is read (one [N, V] target held at a time)
                    batches = EachPass(val_batches, lambda b: with_teacher([b])[0]) if online else with_teacher(val_batches)
                for t in trainees:
                    if t.active:  # --nproc: rank 0's val loss, so every rank stops alike
                        val_loss = t.validate(batches, spec, total_steps) if distributed.is_writer() else None
                        t.after_epoch(distributed.broadcast(val_loss), step / steps_per_epoch, keep_best, patience)
                del batches
            order = None
    run_seconds = before + time.perf_counter() - started
    run = {"device": str(device), "autocast": str(autocast_dtype(device)).removeprefix("torch.") if
           autocast_dtype(device) else None, "resumed_from_step": resumed_from,
           "checkpoints": {"every": every, "written": checkpoints.written, "seconds": round(checkpoints.seconds, 3),
                           "bytes": checkpoints.bytes} if checkpoints is not None else None,
           # What the KD term read: the stored top-k or draws (targets: topk | sampled), or the live teacher.
           "teacher_signal": cfg.teacher_signal, "targets": targets,
           "teacher_forward_seconds": round(teacher_seconds, 3), "peak_memory": peak_memory(device),
           # --nproc: processes the global batch was sharded across, and their torch.distributed backend
           "nproc": distributed.world_size(), "backend": distributed.backend()}

    out_dir = Path(out_dir)
    results = {}
    for t in trainees:
        if keep_best and t.best_state is not None:
            t.model.load_state_dict(t.best_state)
        metrics = {**_metrics(t, spec, len(encoded), steps_per_epoch, run_seconds, keep_best), **run,
                   "on_policy": own_samples.metrics(t.student.name) if own_samples is not None else None}
        if distributed.is_writer():  # --nproc: rank 0 alone writes
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
        # Each term of the loss as it ran, unweighted, window means like loss_curve: kd (T^2 * divergence),
        # hard (CE on the teacher's token) and, with training.loss.hidden, hidden.
        "loss_components": {name: _loss_curve(values)[1] for name, values in t.components.items()},
        # [[student layer, teacher layer], ...] the hidden term compared (the spec's layer_map or the default).
        "hidden_layer_map": [list(p) for p in t.hidden.layer_map.items()] if t.hidden is not None else None,
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
        "seconds_per_step": round(t.seconds / steps, 4) if steps else None,  # of wall_seconds
        "val_seconds": round(t.val_seconds, 3),
        "run_seconds": round(run_seconds, 3),  # the whole shared pass
    }


def _save(t: Trainee, tokenizer, folder: Path, metrics: dict) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    t.model.eval()
    t.model.save_pretrained(folder)
    own = getattr(t.model, "vocab_map", None)  # a trimmed vocabulary saves its own tokenizer
    (own.tokenizer if own is not None else tokenizer).save_pretrained(folder)
    (folder / "metrics.json").write_text(json.dumps(metrics, indent=2))
