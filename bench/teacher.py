"""What the transformers teacher backend's batching and prefix cache buy, on the bundled teacher.

    .venv/bin/python bench/teacher.py [--spec specs/demo.yaml] [--prompts 24] [--max-new-tokens 16]
                                      [--repeats 3] [--out FILE]

Prompts: the first --prompts rows of the spec's sources, evenly spaced through them, rendered as the teach
stage renders them (teacher.prompt, chat template, system message and turns). The demo's teacher prompt
puts its instruction before the review, so every prompt shares a prefix of some 50 tokens (the chat
template's system part and the instruction); specs/bench/language.yaml puts the sentence first.

1. Generation, greedy, --max-new-tokens at most, on the same prompts:
     plain       model.generate one prompt at a time (batch 1, no padding, no log-probs)
     engine B    the backend (engine/teachers/transformers_backend.py) at batch_size B = 1, 8, 16:
                 batches grouped by length across all prompts, the shared prefix run once and its
                 key/value cache reused, top-20 log-probs in float32 for every generated token
     no prefix   the same at B = 8, 16 with the prefix cache off (length grouping only)
   Generated tokens/s counts each answer's own tokens (up to and including eos), not the padding of rows
   that finished early. Also: padding share of what the model ran before generating, and how many
   answers are token for token the plain path's.
2. Prompt scoring: a teacher-forced forward over the prompt tokens (float32 log-prob of every next
   token), at batch 1 and in length-grouped batches of 8 and 16: prompt tokens/s.

Each repeat runs every method once, in rotating order, so a shared machine's load falls on all alike;
figures are medians over --repeats. They go to a JSON file too (default out/bench/teacher-<time>.json).
Cost on 2 shared cores with the defaults: about 3 minutes.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import yaml
from rich.console import Console
from rich.table import Table

from engine.models import set_threads
from engine.prompts import prompt_ids
from engine.spec import parse_spec
from engine.stages.base import RunContext
from engine.stages.sources import Sources
from engine.stages.teach import render_teacher_prompts
from engine.teachers.prefix import shared_prefix
from engine.teachers.transformers_backend import Tally, TransformersTeacher

BATCHES = (1, 8, 16)


def teacher_prompts(path: Path, n: int) -> tuple[object, list]:
    """(the spec's teacher section, n prompts as the teach stage renders them). Only name, teacher and
    sources are read, so a spec whose other sections this checkout cannot validate still serves."""
    data = yaml.safe_load(path.read_text())
    spec = parse_spec({k: data[k] for k in ("name", "teacher", "sources")}, path=path, check_files=True)
    with tempfile.TemporaryDirectory() as tmp:
        rows, _, _ = Sources().run(None, RunContext(spec=spec, cache_dir=Path(tmp), progress=False))
    rows = rows.gather_every(max(1, rows.height // n)).head(n)
    return spec.teacher, [p for p in render_teacher_prompts(rows, spec)[0] if p is not None]


def answer_ids(ids: list[int], eos: int) -> list[int]:
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@torch.inference_mode()
def plain_generate(teacher: TransformersTeacher, encoded: list[list[int]], max_new: int) -> list[list[int]]:
    """model.generate one prompt at a time: what a script without the backend would do."""
    tok, device = teacher.tokenizer, teacher.device
    answers = []
    for ids in encoded:
        out = teacher.model.generate(input_ids=torch.tensor([ids], device=device),
                                     attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
                                     max_new_tokens=max_new, do_sample=False, temperature=None, top_p=None, top_k=None,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
        answers.append(answer_ids(out[0, len(ids):].tolist(), tok.eos_token_id))
    return answers


def engine_view(teacher: TransformersTeacher, batch: int, prefix: bool) -> TransformersTeacher:
    """The loaded teacher at another batch size, prefix cache on or off, with its own tally (weights shared)."""
    view = copy.copy(teacher)
    view.spec = teacher.spec.model_copy(update={"batch_size": batch})
    view.prefix_cache = prefix and teacher.prefix_cache
    view.tally = Tally()
    return view


@torch.inference_mode()
def score_prompts(model, pad: int, encoded: list[list[int]], batch: int) -> None:
    """Teacher-forced log-prob of every prompt token after the first, batches grouped by length."""
    ordered = sorted(encoded, key=len)
    for start in range(0, len(ordered), batch):
        seqs = ordered[start : start + batch]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=model.device)
        mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=model.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def run(teacher: TransformersTeacher, prompts: list, args) -> dict:
    tok = teacher.tokenizer
    encoded = [prompt_ids(tok, p) for p in prompts]
    max_new = args.max_new_tokens
    methods = {"plain": lambda: plain_generate(teacher, encoded, max_new)}
    views = {}
    for b in BATCHES:
        views[f"engine {b}"] = engine_view(teacher, b, prefix=True)
    for b in BATCHES[1:]:
        views[f"no prefix {b}"] = engine_view(teacher, b, prefix=False)
    for name, view in views.items():
        methods[name] = lambda view=view: [o.token_ids.tolist() for o in view.generate(prompts, max_new_tokens=max_new)]
    for b in BATCHES:
        methods[f"score {b}"] = lambda b=b: score_prompts(teacher.model, tok.pad_token_id, encoded, b)

    plain_generate(teacher, encoded[:1], 2)  # warm-up: first calls pay one-off costs
    seconds: dict[str, list[float]] = {name: [] for name in methods}
    answers: dict[str, list[list[int]]] = {}
    names = list(methods)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            took, result = timed(methods[name])
            seconds[name].append(took)
            if result is not None:
                answers[name] = result
    prompt_tokens = sum(len(ids) for ids in encoded)
    figures = {}
    for name, times in seconds.items():
        median = statistics.median(times)
        if name.startswith("score"):
            figures[name] = {"seconds": median, "tokens_per_s": prompt_tokens / median}
            continue
        tokens = sum(len(a) for a in answers[name])
        figures[name] = {"seconds": median, "tokens": tokens, "tokens_per_s": tokens / median,
                         "same_as_plain": sum(a == p for a, p in zip(answers[name], answers["plain"]))}
        if name in views:
            tally = views[name].tally
            figures[name]["padding_share"] = tally.padding_share
            figures[name]["prefilled_per_repeat"] = tally.prefilled_tokens // args.repeats
    return {"prompt_tokens": prompt_tokens, "shared_prefix": shared_prefix(encoded),
            "lengths": sorted(len(ids) for ids in encoded), "figures": figures}


def tables(result: dict, n: int) -> tuple[Table, Table]:
    figures = result["figures"]
    plain = figures["plain"]["tokens_per_s"]
    gen = Table(title="generation (greedy): generated tokens/s, medians", title_justify="left")
    for col in ("method", "batch", "tok/s", "x plain", "padding", "prompt tokens run", "same as plain"):
        gen.add_column(col, justify="left" if col == "method" else "right")
    for name, f in figures.items():
        if name.startswith("score"):
            continue
        method, _, batch = ("plain generate", "", "1") if name == "plain" else name.rpartition(" ")
        gen.add_row(method, batch, f"{f['tokens_per_s']:.1f}", f"{f['tokens_per_s'] / plain:.2f}",
                    f"{f['padding_share']:.1%}" if "padding_share" in f else "-",
                    str(f.get("prefilled_per_repeat", result["prompt_tokens"])), f"{f['same_as_plain']}/{n}")
    score = Table(title="prompt scoring: tokens/s", title_justify="left")
    for col in ("batch", "tok/s", "x batch 1"):
        score.add_column(col, justify="right")
    one = figures["score 1"]["tokens_per_s"]
    for b in BATCHES:
        f = figures[f"score {b}"]
        score.add_row(str(b), f"{f['tokens_per_s']:.0f}", f"{f['tokens_per_s'] / one:.2f}")
    return gen, score


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, default=Path("specs/demo.yaml"))
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: the spec's teacher.device)")
    parser.add_argument("--out", type=Path, help="JSON file of every figure (default out/bench/teacher-<time>.json)")
    args = parser.parse_args()
    console = Console()
    if not console.is_terminal:  # piped or redirected: rich would wrap the tables at 80 columns
        console = Console(width=160)
    threads = set_threads()
    spec_teacher, prompts = teacher_prompts(args.spec, args.prompts)
    if args.device:
        spec_teacher = spec_teacher.model_copy(update={"device": args.device})
    teacher = TransformersTeacher(spec_teacher, str(args.spec))
    result = run(teacher, prompts, args)
    lengths = result["lengths"]
    console.print(f"{threads} torch thread(s); {teacher.spec.model} on {teacher.device}; {len(prompts)} prompts of "
                  f"{args.spec} ({lengths[0]}-{lengths[-1]} tokens, median {statistics.median(lengths):.0f}; "
                  f"shared prefix {result['shared_prefix']}); up to {args.max_new_tokens} new tokens; "
                  f"top-{teacher.spec.logprobs.top_k} log-probs; medians of {args.repeats}", highlight=False)
    for table in tables(result, len(prompts)):
        console.print(table)
    out = args.out or Path("out/bench") / f"teacher-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"threads": threads, "spec": str(args.spec), "prompts": len(prompts),
                               "max_new_tokens": args.max_new_tokens, "repeats": args.repeats,
                               "device": str(teacher.device), **result}, indent=2))
    console.print(f"figures: {out}", highlight=False)


if __name__ == "__main__":
    main()
