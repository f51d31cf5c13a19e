"""Shared fixtures: a tiny random Llama with the real bundled tokenizer, and examples from it.

The tiny model speaks the teacher's vocabulary (49152 ids) but has ~1.6 M parameters,
so generating, scoring and training with it take milliseconds. Its embeddings are
initialised wide (std 0.5) so its next-token distributions are peaked like a real
model's rather than near-uniform.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tests share a 2-core machine: one torch thread, since an oversubscribed pool stalls (see engine.train.loop).
os.environ.setdefault("SYLLABUS_THREADS", "1")

import polars as pl  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

TINY_PROMPTS = [
    "Is the sky blue?", "Is fire cold?", "Do cats bark?", "Is water wet?",
    "Can fish fly?", "Is snow white?", "Do birds sing?", "Is the sun a star?",
    "Is ice hot?", "Do trees walk?", "Is two more than one?", "Is grass green?",
    "Can stones talk?", "Is Paris in France?", "Is rain dry?", "Do bees make honey?",
]


@pytest.fixture(scope="session")
def tiny_llm_dir(tmp_path_factory):
    """A folder with a tiny random LlamaForCausalLM + the real tokenizer; load_causal_lm(str(path)) loads it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from engine.models import resolve_causal_lm

    # The first call ever converts the bundled GGUF into the model cache (~20 s), then it is instant.
    tokenizer = AutoTokenizer.from_pretrained(resolve_causal_lm("smollm2-135m-instruct"))
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=64, max_position_embeddings=512,
        tie_word_embeddings=True, initializer_range=0.5,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny-llm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def make_examples(model_dir, *, prompts=TINY_PROMPTS, top_k: int = 8, max_new_tokens: int = 8) -> pl.DataFrame:
    """The examples frame the trainer reads, with the tiny model itself as the teacher.

    Rows 0-9 train, 10-11 val, 12-15 test. Even rows are labelled with the teacher's own
    answer (so the teacher scores 100% on them), odd rows with "no" (which it never says).
    """
    from engine.models import chat_prompt_ids, load_causal_lm
    from engine.teachers.answers import split_answer

    model, tokenizer = load_causal_lm(str(model_dir))  # pads on the left, for batched generation
    eos = tokenizer.eos_token_id
    batch = tokenizer.pad({"input_ids": [chat_prompt_ids(tokenizer, p) for p in prompts]}, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**batch, do_sample=False, max_new_tokens=max_new_tokens, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=eos)
    logprobs = torch.stack(out.logits, 1).float().log_softmax(-1)
    rows = []
    for i, prompt in enumerate(prompts):
        tokens = out.sequences[i, batch["input_ids"].shape[1]:].tolist()
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]  # ends with eos when it stopped
        top = logprobs[i, : len(tokens)].topk(top_k, -1)
        response = tokenizer.decode(tokens, skip_special_tokens=True)
        answer = split_answer(response, "Answer:")[1]
        answer = response.strip() if answer is None else answer  # no marker: the whole reply, as it always was
        rows.append({
            "prompt_id": f"p{i:02d}",
            "split": "train" if i < 10 else "val" if i < 12 else "test",
            "prompt": prompt,
            "teacher_prompt": prompt,
            "label": answer if i % 2 == 0 else "no",
            "response": response,
            "answer": answer,
            "token_ids": tokens,
            "topk_ids": top.indices.tolist(),
            "topk_logprobs": top.values.tolist(),
            "category": "yesno",
        })
    schema = {
        "prompt_id": pl.String, "split": pl.String, "prompt": pl.String, "teacher_prompt": pl.String,
        "label": pl.String, "response": pl.String, "answer": pl.String,
        "token_ids": pl.List(pl.Int32), "topk_ids": pl.List(pl.List(pl.Int32)),
        "topk_logprobs": pl.List(pl.List(pl.Float16)), "category": pl.String,
    }
    return pl.DataFrame(rows, schema=schema)


def edit_spec(project, **changes) -> None:
    """Set dotted fields of <project>/spec.yaml: edit_spec(p, **{"teacher.samples": 3})."""
    import yaml

    spec = yaml.safe_load((project / "spec.yaml").read_text())
    for dotted, value in changes.items():
        *parents, leaf = dotted.split(".")
        node = spec
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    (project / "spec.yaml").write_text(yaml.safe_dump(spec))


def interrupt_teacher_at(monkeypatch, batch: int):
    """The local teacher is interrupted (KeyboardInterrupt) at its `batch`-th generate batch (1-based).
    Returns a function that puts the real one back."""
    from engine.teachers.transformers_backend import TransformersTeacher

    real = TransformersTeacher._generate_batch
    batches = []

    def interrupted(self, *args, **kwargs):
        batches.append(1)
        if len(batches) == batch:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(TransformersTeacher, "_generate_batch", interrupted)
    return lambda: monkeypatch.setattr(TransformersTeacher, "_generate_batch", real)


def tiny_train_spec(teacher_dir, students: list[dict], backend: str = "transformers", **training):
    """A spec over the tiny teacher for training tests: its students and training fields as given."""
    from engine.spec import parse_spec

    teacher = {"model": str(teacher_dir), "backend": backend, "generation": {"max_new_tokens": 8},
               "logprobs": {"top_k": 8}, "batch_size": 4}
    if backend == "openai":
        teacher.update(base_url="http://127.0.0.1:9/v1", tokenizer=str(teacher_dir))
    return parse_spec({"name": "tiny", "teacher": teacher, "sources": [{"path": "unused.jsonl"}],
                       "students": students, "training": training, "eval": {"speed_prompts": 2, "speed_tokens": 4}})


@pytest.fixture(scope="session")
def tiny_examples(tiny_llm_dir) -> pl.DataFrame:
    """16 examples answered by the tiny model (the teacher of these tests), top-8 log-probs stored."""
    return make_examples(tiny_llm_dir)


# --- a real OpenAI-compatible server, for the openai teacher backend -------------------------

LLAMA_SERVER_MODEL = "smollm2-135m-instruct"  # the name it serves the bundled GGUF under


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def llama_server(tmp_path_factory):
    """Base URL (http://127.0.0.1:PORT/v1) of llama-cpp-python's server on the bundled SmolLM2 GGUF.

    No --chat_format: the server then uses the GGUF's own chat template, which is the tokenizer's
    (default system prompt included), so the teacher reads exactly what chat_prompt_ids gives the
    student; `--chat_format chatml` would drop that system prompt. Its log is server.log under the
    fixture's tmp folder. Without llama_cpp installed the tests skip here and fail under CI=true.
    """
    try:
        import llama_cpp.server.app  # noqa: F401 - the server and its own dependencies (fastapi, uvicorn...)
    except ImportError as e:
        message = (f"llama-cpp-python's server cannot be imported ({e}): run `make llama-server` "
                   "(it builds once per machine, about 6 minutes)")
        if _ci():
            pytest.fail(f"{message}; CI must run the real-server tests of the openai backend", pytrace=False)
        pytest.skip(message)
    with _llama_server_process(tmp_path_factory, "llama-server") as url:
        yield url


@pytest.fixture
def cli(capsys, monkeypatch):
    """cli("validate", "spec.yaml") -> (exit code, stdout, stderr), as the console script runs it."""
    import sys

    from engine.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["syllabus", *args])
        try:
            main()
            code = 0
        except SystemExit as e:
            code = 0 if e.code is None else e.code
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture
def syllabus(capsys, monkeypatch):
    """syllabus("train", "spec.yaml") -> (exit code, stdout, stderr), as the console script runs it (quiet)."""
    import sys

    from engine.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["syllabus", *args, "-q"])
        with pytest.raises(SystemExit) as exit_info:
            main()
        captured = capsys.readouterr()
        code = exit_info.value.code
        return (0 if code is None else code), captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def second_llama_server(llama_server, tmp_path_factory):
    """A second llama-cpp-python server on another port, serving the same bundled GGUF under the same name
    (an endpoint pool's other member). Started after the first, so the two do not load at once on 2 cores."""
    with _llama_server_process(tmp_path_factory, "llama-server-2") as url:
        yield url


def _llama_server_process(tmp_path_factory, name: str):
    """llama_cpp.server on the bundled GGUF: a context manager giving its base URL; its log is server.log
    under a tmp folder called `name`."""
    import contextlib
    import socket
    import subprocess
    import sys
    import time

    import httpx2

    from engine.models import locate

    @contextlib.contextmanager
    def serving():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        log_path = tmp_path_factory.mktemp(name) / "server.log"
        command = [sys.executable, "-m", "llama_cpp.server", "--model", str(locate(LLAMA_SERVER_MODEL)),
                   "--model_alias", LLAMA_SERVER_MODEL, "--host", "127.0.0.1", "--port", str(port),
                   # One thread: on a shared 2-core machine a 2-thread llama.cpp stalls at every barrier
                   # (measured here: 3.5 s a token instead of 0.03 s).
                   "--n_ctx", "1024", "--n_threads", "1", "--n_threads_batch", "1"]
        with open(log_path, "wb") as log:
            server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}/v1"
        try:
            deadline = time.monotonic() + 180
            while True:
                if server.poll() is not None:
                    pytest.fail(f"llama_cpp.server exited with {server.returncode}:\n"
                                f"{log_path.read_text(errors='replace')[-2000:]}", pytrace=False)
                try:
                    if httpx2.get(f"{url}/models", timeout=5).status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not answer on {url} within 180 s:\n"
                                f"{log_path.read_text(errors='replace')[-2000:]}", pytrace=False)
                time.sleep(0.25)
            yield url
        finally:
            server.terminate()
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()

    return serving()


def bench_script(name: str):
    """bench/NAME.py imported as the module bench_NAME (the benchmarks are scripts, not a package)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module
