"""Completion-style prompts with option scoring: which wording does the bundled teacher answer best?

    HF_HUB_OFFLINE=1 SYLLABUS_THREADS=1 .venv/bin/python specs/bench/probe_plain_teacher.py [--only NAME,...] [--rows heldout]

specs/bench/probe_teacher.py's companion for specs/bench/topic.yaml, whose teacher reads plain text
(teacher.chat: false): a few-shot prompt ending in "Topic:". For each wording it prints the accuracy of
the greedy reply (matched to the labels as `syllabus eval` does) and of the option with the highest
first-token log-prob after the prompt (what the options stage stores, every option being one token here),
on 30 pool rows per topic (seeded) or on the held-out set.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from engine.models import load_causal_lm  # noqa: E402
from engine.teachers.answers import normalise_answer  # noqa: E402
from engine.train.evaluate import generate_texts, wilson  # noqa: E402

TOPIC_OPTIONS = ["sports", "business", "science", "politics"]
TOPIC_PLAIN = {  # name: template (a "{text}" slot); accuracy of the reply / of the options on 120 pool rows
    # the instruction, then four examples (sports, business, science, politics): 68.3% / 81.7%
    "classify-ex1": "Classify each news headline by its topic: sports, business, science or politics.\n\n" + 'Headline: Striker scores twice as City win the derby\nTopic: sports\n\nHeadline: Central bank raises interest rates to curb inflation\nTopic: business\n\nHeadline: Scientists grow heart tissue from stem cells\nTopic: science\n\nHeadline: Prime minister loses key vote on tax plan\nTopic: politics\n\n'
                    + "Headline: {text}\nTopic:",
    # chosen (templates/bench_topic_teacher.j2): the same, examples in reverse order: 80.8% / 82.5%;
    # on the held-out set 75.0% / 78.0%
    "classify-ex3": "Classify each news headline by its topic: sports, business, science or politics.\n\n" + 'Headline: Prime minister loses key vote on tax plan\nTopic: politics\n\nHeadline: Scientists grow heart tissue from stem cells\nTopic: science\n\nHeadline: Central bank raises interest rates to curb inflation\nTopic: business\n\nHeadline: Striker scores twice as City win the derby\nTopic: sports\n\n'
                    + "Headline: {text}\nTopic:",
    # "technology" for the third topic, with a technology example: 37.5% / 50.8%
    "classify-tech": "Classify each news headline by its topic: sports, business, technology or politics.\n\n" + 'Headline: Striker scores twice as City win the derby\nTopic: sports\n\nHeadline: Central bank raises interest rates to curb inflation\nTopic: business\n\nHeadline: Engineers unveil a phone battery that lasts a week\nTopic: technology\n\nHeadline: Prime minister loses key vote on tax plan\nTopic: politics\n\n'
                     + "Headline: {text}\nTopic:",
    # "Section:" as a newspaper's sections: 44.2% / 50.8%
    "section-ex1": "Which section of the newspaper does each headline belong in: sports, business, science or politics?\n\n"
                   + 'Headline: Striker scores twice as City win the derby\nSection: sports\n\nHeadline: Central bank raises interest rates to curb inflation\nSection: business\n\nHeadline: Scientists grow heart tissue from stem cells\nSection: science\n\nHeadline: Prime minister loses key vote on tax plan\nSection: politics\n\n' + "Headline: {text}\nSection:",
    # "Topics: sports, business, science, politics." and examples whose business is inflation and science a
    # drug trial: 25.0% / 30.8% (sports to nearly everything)
    "list-ex2": "Topics: sports, business, science, politics.\n\n" + 'Headline: Striker scores twice as City win the derby\nTopic: sports\n\nHeadline: Inflation falls as fuel and food prices ease\nTopic: business\n\nHeadline: New drug slows memory loss in a clinical trial\nTopic: science\n\nHeadline: Prime minister loses key vote on tax plan\nTopic: politics\n\n' + "Headline: {text}\nTopic:",
    # the instruction with those examples: 44.2% / 69.2% ("economy" 32 times)
    "classify-ex2": "Classify each news headline by its topic: sports, business, science or politics.\n\n" + 'Headline: Striker scores twice as City win the derby\nTopic: sports\n\nHeadline: Inflation falls as fuel and food prices ease\nTopic: business\n\nHeadline: New drug slows memory loss in a clinical trial\nTopic: science\n\nHeadline: Prime minister loses key vote on tax plan\nTopic: politics\n\n'
                    + "Headline: {text}\nTopic:",
    # no instruction: 25.0% / 25.8%
    "bare-ex2": 'Headline: Striker scores twice as City win the derby\nTopic: sports\n\nHeadline: Inflation falls as fuel and food prices ease\nTopic: business\n\nHeadline: New drug slows memory loss in a clinical trial\nTopic: science\n\nHeadline: Prime minister loses key vote on tax plan\nTopic: politics\n\n' + "Headline: {text}\nTopic:",
    # no instruction, the first examples: 46.7% / 71.7% ("technology" 44 times)
    "bare-ex1": 'Headline: Striker scores twice as City win the derby\nTopic: sports\n\nHeadline: Central bank raises interest rates to curb inflation\nTopic: business\n\nHeadline: Scientists grow heart tissue from stem cells\nTopic: science\n\nHeadline: Prime minister loses key vote on tax plan\nTopic: politics\n\n' + "Headline: {text}\nTopic:",
}


TOPIC_OPTIONS_OF = {TOPIC_PLAIN["classify-tech"]: ["sports", "business", "technology", "politics"]}


def _topic_rows(which: str) -> list[tuple[str, str]]:
    """30 pool rows per topic (seeded), or the held-out set, from make_topic_data."""
    import random

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import make_topic_data as data

    if which == "heldout":
        return [(r["text"], r["answer"]) for r in data.heldout()]
    rng, by = random.Random(1), {}
    for r in data.pool():
        by.setdefault(r["answer"], []).append(r)
    return [(r["text"], r["answer"]) for topic in by for r in rng.sample(by[topic], 30)]


def probe_plain(model, tokenizer, template: str, rows: list[tuple[str, str]], options: list[str], max_new: int,
                batch: int) -> dict:
    """Greedy replies to a plain-text prompt, and the argmax over the options' first-token log-probs."""
    import torch

    if template in TOPIC_OPTIONS_OF:  # another word for a topic: gold renamed to it
        renamed = dict(zip(options, TOPIC_OPTIONS_OF[template]))
        options, rows = TOPIC_OPTIONS_OF[template], [(t, renamed[g]) for t, g in rows]
    option_ids = [tokenizer(" " + o, add_special_tokens=False)["input_ids"][0] for o in options]
    prompts = [tokenizer(template.format(text=text))["input_ids"] for text, _ in rows]
    replies = generate_texts(model, tokenizer, prompts, max_new, batch)
    picked = []
    with torch.inference_mode():
        for start in range(0, len(prompts), batch):
            padded = tokenizer.pad({"input_ids": prompts[start: start + batch]}, padding=True, return_tensors="pt")
            logits = model(**padded).logits[:, -1, option_ids]
            picked += [options[i] for i in logits.argmax(-1).tolist()]
    answers = [normalise_answer(r, set(options)) for r in replies]
    return {"n": len(rows), "generated": sum(a == g for a, (_, g) in zip(answers, rows)),
            "options": sum(p == g for p, (_, g) in zip(picked, rows)),
            "replies": Counter(r.strip().lower() for r in replies if normalise_answer(r, set(options)) not in options),
            "confusion": Counter((g, p) for p, (_, g) in zip(picked, rows) if p != g)}


def main_plain(names: list[str], which: str, max_new: int, batch: int) -> None:
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    tokenizer.padding_side = "left"
    rows = _topic_rows(which)
    for name in names:
        r = probe_plain(model, tokenizer, TOPIC_PLAIN[name], rows, TOPIC_OPTIONS, max_new, batch)
        for what in ("generated", "options"):
            lo, hi = wilson(r[what], r["n"])
            print(f"{name} ({which}) {what}: {r[what]}/{r['n']} = {100 * r[what] / r['n']:.1f}% [{100 * lo:.1f}–{100 * hi:.1f}]")
        print("  off-label replies: " + ", ".join(f"{a!r} {k}" for a, k in r["replies"].most_common(6)))
        print("  option errors (gold, picked): " + ", ".join(f"{g}->{p} {k}" for (g, p), k in r["confusion"].most_common(6)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="all", help="comma-separated TOPIC_PLAIN names (default: all)")
    parser.add_argument("--rows", default="pool", choices=["pool", "heldout"])
    parser.add_argument("--max-new-tokens", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    main_plain(list(TOPIC_PLAIN) if args.only == "all" else args.only.split(","), args.rows, args.max_new_tokens,
               args.batch)


if __name__ == "__main__":
    main()
