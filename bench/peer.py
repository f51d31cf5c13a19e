"""syllabus against a peer: teacher generation beside distilabel, and what `syllabus run` spends outside the teacher.

    SYLLABUS_THREADS=1 .venv/bin/python bench/peer.py [--spec specs/demo.yaml ...] [--prompts 16]
        [--max-new-tokens 16] [--repeats 3] [--quick] [--skip-distilabel] [--source-rows N] [--overhead-repeats 1]
        [--peer-venv out/peer-venv] [--out out/bench/peer.json]

1. Generation. The same prompts (the first --prompts rows of the first spec's sources, rendered as the teach
   stage renders them: teacher.prompt through the chat template), the same model folder (the bundled teacher's
   safetensors folder, engine.models.resolve_causal_lm) and the same settings (greedy, up to --max-new-tokens)
   through three paths in one run:
     engine B    our backend (engine/teachers/transformers_backend.py) at the spec's batch_size: batches
                 grouped by length, the shared prefix run once, top-20 log-probs of every token kept
     engine 1    the same at batch 1
     distilabel  distilabel's TransformersLLM.generate_outputs on every prompt (a transformers text-generation
                 pipeline, one prompt at a time), do_sample off, repetition_penalty 1.0
   distilabel runs in its own venv (--peer-venv, created here on first use; it never touches .venv) through
   bench/peer_distilabel_runner.py, which speaks JSON lines; each repeat runs every path once, in rotating
   order, so a shared machine's load falls on all alike. Tokens count each answer's own tokens without the
   eos (distilabel's output_tokens re-encodes its text; ours counts the generated ids before eos).
   Figures: medians over --repeats of prompts/s and tokens/s, the ratio ours / distilabel, and the share of
   prompts where both give the same greedy text (and the same prompt token ids).
2. Overhead. Each --spec (repeatable; default specs/demo.yaml) is curated into a fresh temporary store by
   bench/demo_overhead.py's one_run (curate + commit, no cached answers): the share of wall time outside the
   teacher (loading it and its generate calls; target under 10%), and teacher calls paid per kept example.
   A spec that is missing or does not load, or whose run fails, is reported as such and the others go on.
   --quick reads only the first 48 rows of each source, where the fixed costs (loading the embedder and the
   teacher) weigh more: a smoke test, not the figure.

Ends with markdown tables; every figure goes to --out (default out/bench/peer.json).
Cost on 2 shared cores, SYLLABUS_THREADS=1: about 8 minutes with the defaults, 3 with --quick
(first use: a minute more to create the peer venv).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUNNER = HERE / "peer_distilabel_runner.py"
# torch pinned (else a CUDA build); transformers at requirements.lock's version, so both sides run the same library.
PEER_PACKAGES = ("torch==2.13.0", "distilabel[hf-transformers]==1.5.3", "transformers==5.24.0", "requests")
DEFAULTS = {"prompts": 16, "max_new_tokens": 16, "repeats": 3, "source_rows": None}
QUICK = {"prompts": 8, "max_new_tokens": 8, "repeats": 2, "source_rows": 48}
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


class RunnerError(RuntimeError):
    """The distilabel runner said something other than its protocol, or stopped."""


# --- the runner's output ------------------------------------------------------------------


def parse_event(line: str) -> dict | None:
    """One protocol line of the runner as a dict; None for anything else (a stray line is not an error)."""
    line = line.strip()
    if not line.startswith("{"):
        return None
    try:
        found = json.loads(line)
    except json.JSONDecodeError:
        return None
    return found if isinstance(found, dict) and "event" in found else None


def parse_runner_output(text: str) -> dict:
    """{"ready": the ready event, "repeats": [repeat events]} from the runner's stdout."""
    events = [e for e in map(parse_event, text.splitlines()) if e is not None]
    ready = [e for e in events if e["event"] == "ready"]
    if not ready:
        raise RunnerError("the distilabel runner never said ready")
    repeats = [e for e in events if e["event"] == "repeat"]
    for i, r in enumerate(repeats):
        missing = {"seconds", "texts", "output_tokens"} - r.keys()
        if missing:
            raise RunnerError(f"repeat {i}: no {', '.join(sorted(missing))}")
        if len(r["texts"]) != len(r["output_tokens"]):
            raise RunnerError(f"repeat {i}: {len(r['texts'])} texts but {len(r['output_tokens'])} token counts")
    return {"ready": ready[0], "repeats": repeats}


# --- arithmetic ----------------------------------------------------------------------------


def rates(seconds: list[float], prompts: int, tokens: int) -> dict:
    """Median seconds over the repeats of one fixed workload, and the rates at that median."""
    median = statistics.median(seconds)
    return {"n": len(seconds), "seconds": median, "each": list(seconds), "prompts": prompts, "tokens": tokens,
            "prompts_per_s": prompts / median, "tokens_per_s": tokens / median}


def ratio(ours: dict, theirs: dict, key: str) -> float:
    """ours / theirs for one rate: above 1, ours is faster."""
    return ours[key] / theirs[key]


def same_count(a: list, b: list, same=lambda x, y: x == y) -> int:
    return sum(1 for x, y in zip(a, b) if same(x, y))


def same_text(a: str, b: str) -> bool:
    return a.strip() == b.strip()


def distilabel_figures(parsed: dict) -> dict:
    """Rates of the runner's repeats (greedy: every repeat generates the same tokens; the last one counts)."""
    repeats = parsed["repeats"]
    if not repeats:
        raise RunnerError("the distilabel runner ran no repeat")
    last = repeats[-1]
    return rates([r["seconds"] for r in repeats], len(last["texts"]), sum(last["output_tokens"]))


# --- the peer venv and its runner ----------------------------------------------------------


def has_distilabel(python: Path) -> bool:
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('distilabel') is None)"
    return python.exists() and subprocess.run([str(python), "-c", probe]).returncode == 0


def ensure_peer_venv(venv: Path) -> Path:
    """The peer venv's python, creating the venv first if needed (about a minute: torch's CPU wheel is local)."""
    python = venv / "bin" / "python"
    if has_distilabel(python):
        return python
    base = shutil.which("python3.11") or shutil.which("python3")
    print(f"creating {venv} with distilabel (once)", flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PEER_PACKAGES],
                   check=True)
    return python


class DistilabelRunner:
    """bench/peer_distilabel_runner.py in the peer venv: loaded once, one repeat per `run` line."""

    def __init__(self, python: Path, request: dict, workdir: Path):
        path = workdir / "request.json"
        path.write_text(json.dumps(request))
        self.stderr = open(workdir / "runner.stderr", "w+")
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}  # nothing of .venv
        env.update(OFFLINE, OMP_NUM_THREADS=str(request["threads"]))
        self.proc = subprocess.Popen([str(python), str(RUNNER), str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.stderr, text=True, env=env)
        self.transcript: list[str] = []

    def _next_event(self) -> dict:
        for line in self.proc.stdout:
            self.transcript.append(line)
            if (event := parse_event(line)) is not None:
                return event
        self.stderr.seek(0)
        raise RunnerError(f"the distilabel runner stopped (exit {self.proc.wait()}):\n{self.stderr.read()[-2000:]}")

    def ready(self) -> dict:
        return self._next_event()

    def run_once(self) -> dict:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        return self._next_event()

    def close(self) -> str:
        """Ends the runner; returns its whole stdout (what parse_runner_output reads)."""
        if self.proc.poll() is None:
            self.proc.stdin.close()  # EOF: the runner ends its loop
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.stderr.close()
        return "".join(self.transcript)


# --- generation ------------------------------------------------------------------------------


def load_prompts(spec: Path, n: int):
    """(teacher section, prompts as the teach stage renders them): bench/teacher.py's reading."""
    from teacher import teacher_prompts

    return teacher_prompts(spec, n)


def answer_tokens(output) -> int:
    """Generated tokens before eos: what distilabel's re-encoded output_tokens counts."""
    return len(output.token_ids) - (output.finish_reason == "stop")


def our_paths(teacher, prompts: list, max_new: int) -> dict:
    """name -> callable giving (texts, tokens): the engine at the spec's batch size and at batch 1."""
    from teacher import engine_view

    paths = {}
    for batch in dict.fromkeys((teacher.spec.batch_size, 1)):
        view = engine_view(teacher, batch, prefix=True)

        def go(view=view):
            outs = view.generate(prompts, max_new_tokens=max_new)
            return [o.text for o in outs], sum(answer_tokens(o) for o in outs)

        paths[f"engine {batch}"] = go
    return paths


def chat_messages(prompts: list) -> list[list[dict]] | None:
    """Each prompt as chat messages for distilabel; None when the spec sends plain text (chat: false),
    which TransformersLLM cannot send as it is (it always applies the chat template)."""
    from engine.prompts import as_conversation

    conversations = [as_conversation(p) for p in prompts]
    return None if any(not c.chat for c in conversations) else [c.messages() for c in conversations]


def start_distilabel(args, folder: Path, messages: list, threads: int, workdir: Path) -> DistilabelRunner:
    """The runner loaded and warmed up: started before our teacher loads, so it loads while nothing else runs."""
    python = ensure_peer_venv(args.peer_venv)
    runner = DistilabelRunner(python, {"model": str(folder), "prompts": messages,
                                       "max_new_tokens": args.max_new_tokens, "threads": threads}, workdir)
    runner.ready()
    return runner


def timed_repeats(paths: dict, runner: DistilabelRunner | None, repeats: int) -> tuple[dict, dict]:
    """Each repeat runs every path once, in rotating order. Returns (our seconds per path, our last answers);
    distilabel's repeats time themselves and stay in the runner's transcript."""
    names = [*paths, *(["distilabel"] if runner else [])]
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    answers: dict[str, tuple[list[str], int]] = {}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            if name == "distilabel":
                runner.run_once()
                continue
            began = time.perf_counter()
            answers[name] = paths[name]()
            seconds[name].append(time.perf_counter() - began)
    return seconds, answers


def compare(result: dict, transcript: str, our_ids: list, answers: dict) -> dict:
    """distilabel's figures beside ours: rates, ratios, and where both read and wrote the same."""
    parsed = parse_runner_output(transcript)
    figures = result["figures"]
    figures["distilabel"] = distilabel_figures(parsed)
    theirs = parsed["repeats"][-1]["texts"]
    result["texts"]["distilabel"] = theirs
    result.update(distilabel={k: parsed["ready"][k] for k in ("versions", "load_seconds", "threads", "dtype")},
                  same_prompt_ids=same_count(our_ids, parsed["ready"]["prompt_ids"]),
                  same_text={name: same_count(answers[name][0], theirs, same_text) for name in answers},
                  ratios={name: {k: ratio(figures[name], figures["distilabel"], k)
                                 for k in ("prompts_per_s", "tokens_per_s")} for name in answers},
                  transcript=transcript)
    return result


def generation(args, workdir: Path) -> dict:
    from engine.models import resolve_causal_lm, set_threads
    from engine.prompts import prompt_ids
    from engine.teachers.transformers_backend import TransformersTeacher

    threads = set_threads()
    spec = args.spec[0]
    spec_teacher, prompts = load_prompts(spec, args.prompts)
    folder = resolve_causal_lm(spec_teacher.model)
    messages = None if args.skip_distilabel else chat_messages(prompts)
    runner = start_distilabel(args, folder, messages, threads, workdir) if messages is not None else None
    try:
        teacher = TransformersTeacher(spec_teacher, str(spec))
        paths = our_paths(teacher, prompts, args.max_new_tokens)
        teacher.generate(prompts[:1], max_new_tokens=2)  # warm-up: first calls pay one-off costs
        seconds, answers = timed_repeats(paths, runner, args.repeats)
    finally:
        transcript = runner.close() if runner else ""
    result = {"spec": str(spec), "model_folder": str(folder), "threads": threads, "prompts": len(prompts),
              "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "batch_size": spec_teacher.batch_size,
              "figures": {name: rates(seconds[name], len(prompts), answers[name][1]) for name in paths},
              "texts": {name: texts for name, (texts, _) in answers.items()}}
    if runner is None:
        result["distilabel_skipped"] = "--skip-distilabel" if args.skip_distilabel else "the spec's teacher is not chat"
        return result
    return compare(result, transcript, [prompt_ids(teacher.tokenizer, p) for p in prompts], answers)


# --- overhead of a run outside the teacher --------------------------------------------------


def limited(spec, rows: int | None):
    """The spec with each source read only to its first `rows` rows (--quick); None: as written."""
    if rows is None:
        return spec
    sources = [s.model_copy(update={"limit": min(rows, s.limit or rows)}) for s in spec.sources]
    return spec.model_copy(update={"sources": sources})


@contextmanager
def watched_curate(rows: int | None):
    """pipeline.curate, each source cut to `rows` rows, recording the rows each call keeps: one_run reports
    wall, teacher time and calls, not the kept rows."""
    from engine.curate import pipeline

    real, kept = pipeline.curate, []

    def curate(spec, *a, **k):
        result = real(limited(spec, rows), *a, **k)
        kept.append(result[0].height)
        return result

    pipeline.curate = curate
    try:
        yield kept
    finally:
        pipeline.curate = real


def overhead(spec: Path, repeats: int, rows: int | None = None) -> dict:
    """bench/demo_overhead.py's fresh curation of one spec, `repeats` times; medians."""
    from demo_overhead import one_run

    from engine.errors import SpecError
    from engine.spec import load_spec

    try:
        load_spec(spec)  # a spec still being written, or missing: skipped, not fatal
    except SpecError as e:
        return {"spec": str(spec), "skipped": str(e).splitlines()[0]}
    runs = []
    for _ in range(repeats):
        with watched_curate(rows) as kept:
            try:
                run = one_run(spec)
            except Exception as e:  # noqa: BLE001 -- one spec's failure must not lose the other figures
                return {"spec": str(spec), "skipped": f"run failed: {type(e).__name__}: {str(e)[:200]}"}
        runs.append({**run, "kept": kept[-1]})
    last = runs[-1]
    return {"spec": str(spec), "source_rows": rows, "n": len(runs), "wall": statistics.median(r["wall"] for r in runs),
            "teacher": statistics.median(r["teacher"] for r in runs),
            "outside_share": statistics.median(r["outside"] / r["wall"] for r in runs),
            "teacher_calls": last["calls"], "kept": last["kept"],
            "calls_per_kept": last["calls"] / last["kept"] if last["kept"] else None, "stages": last["stages"]}


# --- output ------------------------------------------------------------------------------------


def generation_table(g: dict) -> str:
    f = g["figures"]
    n = g["prompts"]
    rows = ["| path | batch | prompts/s | tokens/s | ours / distilabel (prompts/s, tokens/s) | same text as distilabel |",
            "|---|---:|---:|---:|---:|---:|"]
    for name, fig in f.items():
        if name == "distilabel":
            rows.append(f"| distilabel TransformersLLM | 1 | {fig['prompts_per_s']:.2f} | {fig['tokens_per_s']:.1f} "
                        "| 1.00, 1.00 | - |")
            continue
        r = g.get("ratios", {}).get(name)
        vs = f"{r['prompts_per_s']:.2f}, {r['tokens_per_s']:.2f}" if r else "-"
        same = f"{g['same_text'][name]}/{n}" if "same_text" in g else "-"
        rows.append(f"| syllabus engine | {name.split()[-1]} | {fig['prompts_per_s']:.2f} | {fig['tokens_per_s']:.1f} "
                    f"| {vs} | {same} |")
    return "\n".join(rows)


def overhead_table(results: list[dict]) -> str:
    rows = ["| spec | runs n | wall s | teacher s | outside teacher | teacher calls | kept | calls per kept |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for o in results:
        if "skipped" in o:
            rows.append(f"| {o['spec']} | skipped: {o['skipped']} | | | | | | |")
            continue
        per = f"{o['calls_per_kept']:.2f}" if o["calls_per_kept"] is not None else "-"
        name = f"{o['spec']} (first {o['source_rows']} rows per source)" if o["source_rows"] else o["spec"]
        rows.append(f"| {name} | {o['n']} | {o['wall']:.1f} | {o['teacher']:.1f} | {o['outside_share']:.1%} "
                    f"| {o['teacher_calls']} | {o['kept']} | {per} |")
    return "\n".join(rows)


def print_report(g: dict, over: list[dict]) -> None:
    head = (f"\n## Teacher generation: {g['prompts']} prompts of {g['spec']}, greedy, up to {g['max_new_tokens']} new "
            f"tokens, {g['threads']} torch thread(s), medians of {g['repeats']}")
    print(head)
    if "distilabel" in g:
        d = g["distilabel"]
        print(f"distilabel {d['versions']['distilabel']} (transformers {d['versions']['transformers']}, torch "
              f"{d['versions']['torch']}, {d['dtype']}); same prompt token ids on {g['same_prompt_ids']}/{g['prompts']}")
    else:
        print(f"distilabel skipped: {g['distilabel_skipped']}")
    print("\n" + generation_table(g))
    print("\n## Overhead of a fresh curation outside teacher calls (target < 10%)\n")
    print(overhead_table(over))


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", type=Path, action="append", help="repeatable (default specs/demo.yaml); "
                        "generation reads the first")
    parser.add_argument("--prompts", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--source-rows", type=int, help="overhead runs read each source only to this many rows "
                        "(default: all; --quick: 48, where fixed costs weigh more)")
    parser.add_argument("--quick", action="store_true", help=f"small sizes: {QUICK}")
    parser.add_argument("--overhead-repeats", type=int, default=1, help="fresh curations per spec (each pays "
                        "every teacher call again)")
    parser.add_argument("--skip-distilabel", action="store_true", help="our engine and the overhead only")
    parser.add_argument("--peer-venv", type=Path, default=Path("out/peer-venv"))
    parser.add_argument("--out", type=Path, default=Path("out/bench/peer.json"))
    args = parser.parse_args(argv)
    args.spec = args.spec or [Path("specs/demo.yaml")]
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main() -> None:
    args = parse_args()
    os.environ.update(OFFLINE)
    began = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        g = generation(args, Path(tmp))
    over = [overhead(spec, args.overhead_repeats, args.source_rows) for spec in args.spec]
    print_report(g, over)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"quick": args.quick, "wall_s": time.perf_counter() - began,
                                    "generation": g, "overhead": over}, indent=2))
    print(f"\nfigures: {args.out}")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))  # bench/teacher.py and bench/demo_overhead.py, run as scripts
    main()
