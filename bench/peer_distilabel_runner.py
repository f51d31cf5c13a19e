"""distilabel's side of bench/peer.py: runs inside the peer venv (out/peer-venv), never in .venv.

    out/peer-venv/bin/python bench/peer_distilabel_runner.py REQUEST.json

REQUEST.json: {"model": safetensors folder, "prompts": [chat messages, ...], "max_new_tokens": N, "threads": T}.
It loads distilabel's TransformersLLM on the folder and speaks JSON lines on stdout, one object each:
  {"event": "ready", ...}   after loading and one warm-up call: versions, load_seconds, prompt_ids
  {"event": "repeat", ...}  for each `run` line read on stdin: seconds, texts, output_tokens
stdin at EOF (or a `quit` line) ends it. Anything a library prints goes to stderr, so stdout holds only
these lines. bench/peer.py drives the repeats, interleaved with its own, so the machine's load falls on
both alike.
"""

from __future__ import annotations

import json
import os
import sys
import time


def protocol_stream():
    """A private copy of stdout for our lines; fd 1 then points at stderr so stray prints cannot corrupt it."""
    stream = os.fdopen(os.dup(1), "w", buffering=1)
    sys.stdout.flush()
    os.dup2(2, 1)
    return stream


def load(request: dict):
    import torch
    from distilabel.models.llms import TransformersLLM

    torch.set_num_threads(max(1, int(request.get("threads") or 1)))
    # float32 as our backend loads it on CPU; the folder is float32, so "auto" would give the same.
    llm = TransformersLLM(model=request["model"], torch_dtype="float32")
    llm.load()
    return llm


def generate(llm, prompts: list, max_new_tokens: int) -> list[dict]:
    # Greedy: do_sample off and no repetition penalty (distilabel's default is 1.1, which changes the text).
    return llm.generate_outputs(inputs=prompts, num_generations=1, max_new_tokens=max_new_tokens,
                                temperature=1.0, repetition_penalty=1.0, top_p=1.0, top_k=0, do_sample=False)


def versions() -> dict:
    from importlib.metadata import version

    return {name: version(name) for name in ("distilabel", "transformers", "torch")}


def ready_event(llm, request: dict, load_seconds: float) -> dict:
    """What the pipeline will feed the model: the chat template through distilabel, then its tokenizer."""
    tok = llm._pipeline.tokenizer
    ids = [tok(llm.prepare_input(p))["input_ids"] for p in request["prompts"]]
    import torch

    return {"event": "ready", "versions": versions(), "load_seconds": round(load_seconds, 3),
            "threads": torch.get_num_threads(), "dtype": str(llm._pipeline.model.dtype), "prompt_ids": ids}


def repeat_event(llm, request: dict) -> dict:
    began = time.perf_counter()
    outputs = generate(llm, request["prompts"], request["max_new_tokens"])
    seconds = time.perf_counter() - began
    return {"event": "repeat", "seconds": round(seconds, 4),
            "texts": [o["generations"][0] for o in outputs],
            "output_tokens": [o["statistics"]["output_tokens"][0] for o in outputs]}


def main() -> int:
    if len(sys.argv) != 2:  # e.g. `make bench` looping over bench/*.py: nothing to do here
        print("bench/peer_distilabel_runner.py is run by bench/peer.py inside out/peer-venv; nothing to do")
        return 0
    request = json.loads(open(sys.argv[1], encoding="utf-8").read())
    out = protocol_stream()
    began = time.perf_counter()
    llm = load(request)
    load_seconds = time.perf_counter() - began
    generate(llm, request["prompts"][:1], 2)  # warm-up: first calls pay one-off costs
    out.write(json.dumps(ready_event(llm, request, load_seconds)) + "\n")
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        out.write(json.dumps(repeat_event(llm, request)) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
