"""What distillation costs per training step, and what sharing one pass between students saves.

    .venv/bin/python bench/kd_step.py [--steps 15] [--batch 8] [--students 3]

1. KD step vs plain CE step (target: under 1.1x). The same student (the demo's `tiny` shape,
   the teacher's 49,152-id vocabulary), the same collated batch (student context + 16 teacher
   tokens, stored top-20); one optimizer step each, interleaved so machine noise hits both
   alike. The KD step is the trainer's: distillation_loss (kd 0.7 forward KL at T=2 over the
   top-k and the tail bucket, hard CE 0.3). The CE step is F.cross_entropy on the same logits.
2. N students in one pass vs N separate runs: train_students on one synthetic train split,
   once with N students (one pass: examples encoded and each batch collated once, fed to each
   student in turn) and N times with one student each. Both load the bundled teacher (its
   tokenizer and, for pruning, its weights) as a real run does.

Figures are medians of --steps steps (part 1) and single wall times (part 2), from one run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from engine.models import set_threads
from engine.spec import Spec
from engine.train.data import Encoded, collate, response_logits
from engine.train.losses import distillation_loss

VOCAB = 49152
TINY = {"hidden_size": 192, "num_layers": 4, "num_heads": 4, "intermediate_size": 512}


def synthetic(n: int, rng: np.random.Generator, prompt_len: int = 40, response_len: int = 16, k: int = 20) -> list[Encoded]:
    out = []
    for _ in range(n):
        tokens = rng.integers(0, VOCAB, response_len).tolist()
        topk = [[t] + rng.integers(0, VOCAB, k - 1).tolist() for t in tokens]
        lps = [sorted(np.log(rng.dirichlet(np.ones(k + 1))[:k]).tolist(), reverse=True) for _ in tokens]
        out.append(Encoded(rng.integers(0, VOCAB, prompt_len).tolist(), tokens, topk, lps))
    return out


def step_times(batch: dict, steps: int) -> tuple[list[float], list[float]]:
    torch.manual_seed(0)
    c = TINY
    model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=c["hidden_size"], num_hidden_layers=c["num_layers"],
                                         num_attention_heads=c["num_heads"], intermediate_size=c["intermediate_size"]))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def one(kd: bool) -> float:
        start = time.perf_counter()
        logits = response_logits(model, batch)
        if kd:
            loss = distillation_loss(logits, batch["topk_ids"], batch["topk_logprobs"], batch["targets"],
                                     kd_weight=0.7, hard_weight=0.3, temperature=2.0).loss
        else:
            loss = F.cross_entropy(logits.float(), batch["targets"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    one(True), one(False)  # warm-up
    kd, ce = [], []
    for _ in range(steps):
        kd.append(one(True))
        ce.append(one(False))
    return kd, ce


def examples_frame(encoded: list[Encoded], texts: list[str]) -> pl.DataFrame:
    return pl.DataFrame({
        "prompt_id": [f"p{i}" for i in range(len(encoded))],
        "teacher_prompt": texts,
        "split": ["train"] * len(encoded),
        "token_ids": [e.token_ids for e in encoded],
        "topk_ids": [e.topk_ids for e in encoded],
        "topk_logprobs": [e.topk_logprobs for e in encoded],
    })


def shared_pass(n_students: int, examples: pl.DataFrame, batch: int) -> tuple[float, float]:
    from engine.train import train_students

    students = [{"name": f"s{i}", "config": TINY} for i in range(n_students)]

    def spec(chosen):
        return Spec.model_validate({
            "name": "bench", "teacher": {"model": "smollm2-135m-instruct"}, "sources": [{"inline": ["x"]}],
            "students": chosen, "training": {"epochs": 1, "batch_size": batch}})

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        train_students(spec(students), examples, Path(tmp) / "one", progress=False)
        one_pass = time.perf_counter() - start
        start = time.perf_counter()
        for i, s in enumerate(students):
            train_students(spec([s]), examples, Path(tmp) / f"sep{i}", progress=False)
        separate = time.perf_counter() - start
    return one_pass, separate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--students", type=int, default=3)
    parser.add_argument("--examples", type=int, default=96)
    args = parser.parse_args()
    threads = set_threads()
    rng = np.random.default_rng(0)

    batch = collate(synthetic(args.batch, rng), pad_id=0)
    kd, ce = step_times(batch, args.steps)
    kd_ms, ce_ms = 1000 * statistics.median(kd), 1000 * statistics.median(ce)
    print(f"{threads} thread(s); student {TINY}, vocab {VOCAB}, batch {args.batch}, "
          f"{int(batch['mask'].sum())} response tokens, top-20")
    print(f"KD step {kd_ms:.1f} ms  CE step {ce_ms:.1f} ms  (medians of {args.steps})  "
          f"ratio {kd_ms / ce_ms:.3f} (target < 1.1)")

    encoded = synthetic(args.examples, rng)
    texts = [" ".join(f"word{j}" for j in rng.integers(0, 500, 30)) for _ in encoded]
    one_pass, separate = shared_pass(args.students, examples_frame(encoded, texts), args.batch)
    print(f"{args.students} students, {args.examples} examples, 1 epoch: one pass {one_pass:.1f} s, "
          f"{args.students} separate runs {separate:.1f} s, ratio {separate / one_pass:.2f}x")


if __name__ == "__main__":
    main()
