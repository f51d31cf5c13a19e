"""End to end on the real bundled teacher: validate -> run -> sql -> train -> eval.

One curated run per test session (the teacher answers a handful of demo reviews);
every test below reads what that run left in the store.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

import store
from engine.curate import pipeline
from engine.train import runs as training
from engine.cli import app
from engine.models import chat_prompt_ids, load_causal_lm
from engine.spec import load_spec
from engine.teachers.answers import normalise_answer, split_answer
from engine.stages.split import assign_split
from engine.train.evaluate import generate_texts, wilson

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
N_ROWS = 16
N_EVAL = 5  # rows of the external eval set (plus one duplicate)


@pytest.fixture(scope="session")
def e2e(tmp_path_factory):
    work = tmp_path_factory.mktemp("e2e")
    all_lines = (ROOT / "specs/data/demo.jsonl").read_text().splitlines()
    lines = all_lines[:N_ROWS]
    (work / "reviews.jsonl").write_text("\n".join(lines) + "\n")
    # An external labelled eval set, as written: other reviews, one of them twice.
    held_out = all_lines[-N_EVAL:]
    (work / "held_out.jsonl").write_text("\n".join(held_out + held_out[:1]) + "\n")
    spec = yaml.safe_load((ROOT / "specs/demo.yaml").read_text())
    spec["sources"][0]["path"] = str(work / "reviews.jsonl")
    spec["teacher"]["prompt"] = str(ROOT / spec["teacher"]["prompt"])
    spec["teacher"]["generation"]["max_new_tokens"] = 12
    for curation in ("coverage", "augment", "diversity"):  # covered by their own tests on a tiny teacher
        spec.pop(curation, None)
    spec["dedup"] = {"exact": True}
    # A band that the real scores straddle, so mining both keeps and drops.
    spec["mining"] = {"confidence": "mean_token_prob", "band": [0.62, 1.0], "outside_band_keep": 0.5, "seed": 1}
    spec["splits"] = {"train": 0.5, "val": 0.0, "test": 0.5, "seed": 1}
    spec["students"] = [{"name": "drop2", "from_teacher": {"layers": [0, 29]}},
                        {"name": "tiny", "config": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 128}}]
    spec["training"].update(epochs=3, batch_size=4, max_steps=None)
    spec["training"]["optimizer"].update(lr=1e-3, warmup_steps=0)
    spec["eval"] = {"split": "test", "speed_prompts": 1, "speed_tokens": 4,
                    "sources": [{"path": str(work / "held_out.jsonl"), "text": "review", "category": "category",
                                 "label": "answer"}]}
    spec_path = work / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))
    st = store.open(work / "store")
    result = pipeline.run(load_spec(spec_path), st, progress=False)
    return {"spec_path": spec_path, "store": st, "result": result, "work": work}


def sql(e2e, query):
    return e2e["store"].sql(query, at="demo@latest").to_pylist()


def test_validate_and_versions_cli(e2e):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(e2e["spec_path"])])
    assert ok.exit_code == 0 and "ok" in ok.output
    listing = runner.invoke(app, ["versions", "--store", str(e2e["store"].root)])
    assert listing.exit_code == 0 and "demo@1" in listing.output


def test_run_commits_once_and_rerun_is_free(e2e):
    first = e2e["result"]
    assert first.created and first.version == 1 and first.teacher_calls == N_ROWS
    again = pipeline.run(load_spec(e2e["spec_path"]), e2e["store"], progress=False)
    assert not again.created and again.version == 1 and again.teacher_calls == 0
    assert [v.version for v in e2e["store"].versions("demo")] == [1]


def test_topk_records_are_valid(e2e):
    (bad,) = sql(e2e, """
        SELECT count(*) FILTER (WHERE list_max(topk_logprobs) > 0) AS positive,
               count(*) FILTER (WHERE list_sum(list_transform(topk_logprobs, lambda x: exp(x))) > 1.001) AS over_one,
               count(*) FILTER (WHERE topk_logprobs <> list_reverse_sort(topk_logprobs)) AS unsorted,
               count(*) FILTER (WHERE len(topk_ids) <> 20) AS wrong_k,
               count(*) AS tokens
        FROM tokens""")
    assert bad["tokens"] > N_ROWS  # several tokens per answer
    assert bad["positive"] == bad["over_one"] == bad["unsorted"] == bad["wrong_k"] == 0


def test_stored_tokens_are_what_the_teacher_generated(e2e):
    model, tokenizer = load_causal_lm("smollm2-135m-instruct")
    rows = e2e["store"].read("demo@latest", "examples").head(3).to_dicts()
    for row in rows:
        prompt = chat_prompt_ids(tokenizer, row["teacher_prompt"])
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        generated = out[0, len(prompt):].tolist()
        assert generated[: len(row["token_ids"])] == row["token_ids"]
        assert tokenizer.decode(row["token_ids"], skip_special_tokens=True).strip() == row["response"]


def test_band_mining_keeps_band_plus_share_and_rejects_rest(e2e):
    """Mining decides over train and val; the test split, drawn before the teacher answered, keeps every row."""
    st = e2e["store"]
    examples = st.read("demo@latest", "examples")
    rejected = st.read("demo@latest", "rejections").filter(stage="mine")
    spec = load_spec(e2e["spec_path"])
    test = examples.filter(examples["split"] == "test")
    expected_test = [pid for pid in examples["prompt_id"].to_list() + rejected["prompt_id"].to_list()
                     if assign_split(pid, spec.splits) == "test"]
    assert sorted(test["prompt_id"]) == sorted(expected_test) and test.height > 0  # none lost to mining
    assert (test["conf_mean_token_prob"] < 0.62).any()  # test rows outside the band stay all the same
    mined = examples.filter(examples["split"] != "test")
    scores = mined["conf_mean_token_prob"].to_numpy()
    in_band = int(((scores >= 0.62) & (scores <= 1.0)).sum())
    outside = N_ROWS - test.height - in_band
    assert mined.height == in_band + round(0.5 * outside)
    assert rejected.height == N_ROWS - examples.height > 0
    assert all("outside band [0.62, 1.0]" in r for r in rejected["reason"])
    assert (rejected["prompt_id"].is_in(examples["prompt_id"].implode()).sum()) == 0


def test_train_then_eval(e2e):
    spec, st = load_spec(e2e["spec_path"]), e2e["store"]
    trained = training.train(spec, st, progress=False)
    assert trained.created and trained.dataset_ref == "demo@1"
    for name in ("drop2", "tiny"):
        metrics = json.loads((trained.run_dir / name / "metrics.json").read_text())
        losses = [loss for _, loss in metrics["loss_curve"]]
        per_epoch = len(losses) // round(metrics["epochs"])
        first_epoch, last_epoch = losses[:per_epoch], losses[-per_epoch:]  # the same rows, reshuffled
        assert sum(last_epoch) < sum(first_epoch), (name, losses)
    assert {m["student"] for m in st.models("demo", 1)} == {"drop2", "tiny"}
    assert not training.train(spec, st, progress=False).created  # the same run is reused

    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(trained.run_dir / "drop2")
    assert student.config.num_hidden_layers == 2
    out = student.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=3, do_sample=False, pad_token_id=2)
    assert out.shape == (1, 6)

    report, path = training.evaluate(spec, st, progress=False)
    split_report, held_out = report["sets"]
    rows = split_report["models"]
    by_name = {r["name"]: r for r in rows}
    teacher = by_name["smollm2-135m-instruct"]
    # Every figure below is recounted by hand from the stored rows and the saved students.
    examples = st.read("demo@1", "examples")
    test = examples.filter(examples["split"] == "test")
    labels = set(examples["label"].drop_nulls().to_list())
    gold = [normalise_answer(g, labels) for g in test["label"]]
    teacher_answers = [normalise_answer(a or "", labels) for a in test["answer"]]
    n = test.height
    assert teacher["examples"] == n > 0
    assert teacher["accuracy"] == pytest.approx(sum(a == g for a, g in zip(teacher_answers, gold)) / n)
    assert teacher["accuracy"] > 0.5
    assert teacher["token_kl"] == pytest.approx(0.0, abs=0.02)
    for name in ("drop2", "tiny"):
        row = by_name[name]
        model, tokenizer = load_causal_lm(str(trained.run_dir / name))
        prompts = [chat_prompt_ids(tokenizer, t) for t in test["teacher_prompt"]]
        replies = generate_texts(model, tokenizer, prompts, spec.teacher.generation.max_new_tokens, spec.teacher.batch_size)
        marker = spec.teacher.reasoning.answer_marker if spec.teacher.reasoning else None
        answers = [normalise_answer(split_answer(r, marker)[1], labels) for r in replies]
        assert row["accuracy"] == pytest.approx(sum(a == g for a, g in zip(answers, gold)) / n), name
        assert row["agreement"] == pytest.approx(sum(a == t for a, t in zip(answers, teacher_answers)) / n), name
        assert row["retention"] == pytest.approx(row["accuracy"] / teacher["accuracy"])
        assert row["token_kl"] == pytest.approx(reference_token_kl(model, tokenizer, test), rel=1e-3, abs=1e-4), name
        assert row["token_kl"] > 0.01 and row["decode_tok_s"] > 0 and row["params"] < teacher["params"]
    assert json.loads(path.read_text()) == json.loads(json.dumps(report, default=str))
    assert np.isfinite([r["decode_tok_s"] for r in rows]).all()
    for r in rows:  # every accuracy beside n, its interval and the majority baseline of the same rows
        k = round(r["accuracy"] * n)
        assert r["n"] == n and r["accuracy_ci"] == pytest.approx(wilson(k, n))
        assert r["baseline"]["n"] == n and r["baseline"]["label"] in labels
    assert "drawn by hash of parent_id (seed 1) before the teacher answered" in split_report["description"]

    # The external eval set: every row as written (the duplicate too), the real teacher asked once per prompt.
    assert held_out["rows"] == N_EVAL + 1 and report["teacher_calls"] == N_EVAL
    teacher_held = held_out["models"][0]
    assert teacher_held["n"] == N_EVAL + 1 and teacher_held["accuracy"] > 0.5
    assert [m["name"] for m in held_out["models"][1:]] == ["drop2", "tiny"]
    again, _ = training.evaluate(spec, st, progress=False)
    assert again["teacher_calls"] == 0  # cached: a second eval never asks the teacher
    assert again["sets"][1]["models"][0]["accuracy"] == teacher_held["accuracy"]


def reference_token_kl(model, tokenizer, rows) -> float:
    """Mean over response tokens of KL(teacher || model) over the stored top-k ids plus one bucket for
    every other id, at T=1: one row at a time, without padding, in plain Python arithmetic."""
    total, count = 0.0, 0
    for row in rows.iter_rows(named=True):
        prompt, tokens = chat_prompt_ids(tokenizer, row["teacher_prompt"]), row["token_ids"]
        if not tokens:
            continue
        with torch.no_grad():
            logits = model(torch.tensor([prompt + tokens])).logits[0].double()
        logp = logits[len(prompt) - 1 : len(prompt) - 1 + len(tokens)].log_softmax(-1)
        for step, (ids, lps) in enumerate(zip(row["topk_ids"], row["topk_logprobs"])):
            p = [math.exp(lp) for lp in lps]
            s = [math.exp(logp[step, i].item()) for i in ids]
            p.append(max(0.0, 1.0 - sum(p)))
            s.append(max(1e-300, 1.0 - sum(s)))
            total += sum(pi * math.log(pi / si) for pi, si in zip(p, s) if pi > 0)
            count += 1
    return total / count
