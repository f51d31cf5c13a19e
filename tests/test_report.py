"""`syllabus report`: the figures it gathers agree with the store, and the page renders in a real browser.

One small store is curated on the tiny random teacher (tests/conftest.py) with categories and quotas,
an augmentation template, embeddings and clusters, and a mining band that drops rows; two tiny students
are trained and evaluated on it. The browser test opens the report in headless Chromium (Debian's
package, driven by playwright; `make browser` installs it) and keeps a screenshot under
out/test-artefacts/.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import polars as pl
import pytest
import yaml

import store
from engine import report
from engine.curate import pipeline
from engine.spec import load_spec
from engine.train import runs as training

ROOT = Path(__file__).resolve().parent.parent
ARTEFACTS = ROOT / "out" / "test-artefacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
N_PROMPTS = 40
STUDENTS = [{"name": "fresh", "config": {"hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
            {"name": "halves", "from_teacher": {"layers": [0, 2]}}]
CHARTS = ["chart-coverage", "chart-funnel", "chart-confidence", "chart-clusters", "chart-augmentation",
          "chart-training-0", "chart-training-1", "chart-speed-accuracy"]


def write_project(folder: Path, teacher_dir: Path) -> Path:
    rows = [{"text": f"Question {i}: is {i} an even number?", "gold": "yes" if i % 2 == 0 else "no",
             "cat": "low" if i < N_PROMPTS // 2 else "high"} for i in range(N_PROMPTS)]
    rows.append(dict(rows[0]))  # an exact duplicate, for dedup to drop
    (folder / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "asked.j2").write_text("{{ prompt }} (asked {{ how }})")
    spec = {
        "name": "rep",
        "teacher": {"model": str(teacher_dir), "generation": {"max_new_tokens": 4}, "logprobs": {"top_k": 8},
                    "batch_size": 8},
        "sources": [{"path": "prompts.jsonl", "text": "text", "label": "gold", "category": "cat"}],
        "coverage": {"categories": {"low": {"max": 12}, "high": {"max": 8}}},
        "augment": [{"template": "asked.j2", "categories": ["low"], "vars": {"how": ["politely", "twice"]}}],
        "dedup": {"exact": True},
        "diversity": {"clusters": 3, "seed": 1},
        "mining": {"confidence": "mean_token_prob", "band": [0.0, 1.0]},
        "splits": {"train": 0.6, "val": 0.2, "test": 0.2, "seed": 3},
        "students": STUDENTS,
        "training": {"epochs": 2, "batch_size": 8},
        "eval": {"speed_prompts": 1, "speed_tokens": 2},
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return folder / "spec.yaml"


def narrow_band(spec_path: Path, scores: pl.Series) -> None:
    """A band holding the upper half of the teacher's scores, so mining drops rows."""
    spec = yaml.safe_load(spec_path.read_text())
    spec["mining"]["band"] = [float(scores.sort()[len(scores) // 2]), 1.0]
    spec_path.write_text(yaml.safe_dump(spec, sort_keys=False))


@pytest.fixture(scope="module")
def project(tmp_path_factory, tiny_llm_dir):
    """A store holding rep@2 (curated twice: the second time with a narrow band), trained and evaluated."""
    folder = tmp_path_factory.mktemp("report")
    spec_path = write_project(folder, tiny_llm_dir)
    st = store.open(folder / "store")
    old = Path.cwd()
    os.chdir(folder)
    try:
        first = pipeline.run(load_spec(spec_path), st, progress=False)
        narrow_band(spec_path, st.read(f"rep@{first.version}", "examples")["conf_mean_token_prob"])
        pipeline.run(load_spec(spec_path), st, progress=False)
        spec = load_spec(spec_path)
        trained = training.train(spec, st, progress=False)
        training.evaluate(spec, st, progress=False)
    finally:
        os.chdir(old)
    return {"folder": folder, "store": st, "spec": spec, "run_id": trained.run_id}


@pytest.fixture(scope="module")
def gathered(project):
    return report.gather(project["store"], "rep@latest")


def tables(st, ref):
    info = st.resolve(ref)
    return info, st.read(info, "examples"), st.read(info, "rejections")


# --- the figures agree with the store ------------------------------------------------------------


def test_funnel_counts_are_the_stores_counts(project, gathered):
    info, examples, rejections = tables(project["store"], "rep@latest")
    rows = gathered["funnel"].data
    stages = [r["stage"] for r in rows]
    assert stages[0] == "sources" and stages[-1] == "select" and stages.index("mine") > stages.index("teach")
    by_stage = dict(rejections.group_by("stage").len().iter_rows())
    assert {r["stage"]: r["dropped"] for r in rows if r["dropped"]} == by_stage
    assert sum(r["dropped"] for r in rows) == rejections.height == info.row_counts["rejections"]
    assert by_stage.get("mine", 0) > 0 and by_stage.get("sources") == 1  # the narrow band, the repeated line
    assert rows[-1]["rows_out"] == examples.height
    for r in rows:  # each stage's reasons add up to its drops
        assert sum(why["n"] for why in r["reasons"]) == r["dropped"]


def test_histogram_counts_sum_to_the_rows(project, gathered):
    _, examples, rejections = tables(project["store"], "rep@latest")
    hist = gathered["confidence"].data
    assert hist["measure"] == "conf_mean_token_prob" and len(hist["edges"]) == len(hist["kept"]) + 1
    assert sum(hist["kept"]) == examples["conf_mean_token_prob"].drop_nulls().len() == examples.height
    mined_out = rejections.filter(pl.col("stage") == "mine").height
    assert sum(hist["rejected"]) == mined_out > 0
    assert hist["unscored_rejected"] == rejections.filter(pl.col("stage") == "select").height
    lo = hist["band"][0]
    assert all(r == 0 for r, left in zip(hist["rejected"], hist["edges"]) if left >= lo)  # drops lie below the band


def test_coverage_matches_categories_splits_and_quotas(project, gathered):
    _, examples, _ = tables(project["store"], "rep@latest")
    rows = {r["category"]: r for r in gathered["coverage"].data}
    assert set(rows) == {"low", "high"}
    assert rows["low"]["quota"] == 12 and rows["high"]["quota"] == 8
    for category, r in rows.items():
        mine = examples.filter(pl.col("category") == category)
        assert r["total"] == mine.height == r["train"] + r["val"] + r["test"]
        assert r["train"] + r["val"] <= r["quota"]  # selection keeps at most the quota of train and val


def test_clusters_and_augmentation_yield(project, gathered):
    info, examples, _ = tables(project["store"], "rep@latest")
    sizes = [r["n"] for r in gathered["clusters"].data]
    assert sum(sizes) == examples.height and sizes == sorted(sizes, reverse=True) and len(sizes) <= 3
    rows = {r["template"]: r for r in gathered["augmentation"].data}
    assert set(rows) == {"asked.j2"}  # per template file, its vars' combinations together
    kept = examples.filter(pl.col("template_id").is_not_null())
    assert sum(r["kept"] for r in rows.values()) == kept.height
    assert sum(r["made"] for r in rows.values()) == info.stats["augment"]["variations"] == N_PROMPTS // 2 * 2
    for r in rows.values():
        assert r["graded"] == r["kept"] and r["made"] >= r["kept"]  # every variation keeps its parent's label
        assert r["accuracy"] is None or 0.0 <= r["accuracy"] <= 1.0


def test_training_and_eval_come_from_the_latest_run(project, gathered):
    assert gathered["run_id"] == project["run_id"]
    students = gathered["training"].data
    assert [s["student"] for s in students] == ["fresh", "halves"]
    for s in students:
        assert s["loss"] and s["components"] and len(s["val"]) == 2  # two epochs, a val loss after each
    (test_set,) = gathered["eval"].data["sets"]
    assert [m["name"] for m in test_set["models"]][1:] == ["fresh", "halves"]
    assert test_set["models"][0]["kind"] == "teacher"


def test_a_bare_version_says_what_is_not_available(tmp_path, tiny_examples):
    st = store.open(tmp_path / "store")
    st.commit("bare", {"examples": tiny_examples}, {"spec_text": "name: bare\n", "stats": {}}, parent=None)
    path = report.write_report(st, "bare@1", out=tmp_path / "bare.html")
    page = path.read_text()
    assert page.count("not available:") == 6  # funnel, confidence, clusters, augmentation, training, eval
    assert 'id="chart-coverage"' in page and "no training run on bare@1 yet" in page


# --- the verb ------------------------------------------------------------------------------------


def test_report_verb_writes_the_page_and_prints_its_path(project, cli, monkeypatch, tmp_path):
    monkeypatch.setenv("SYLLABUS_STORE", str(project["folder"] / "store"))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("report", "rep@latest")
    assert code == 0, err
    assert project["run_id"].startswith("rep-v2-")  # named by its run, which names the version
    path = tmp_path / "out" / "reports" / f"{project['run_id']}.html"
    assert out.strip() == f"wrote {path}" and path.is_file()
    code, out, err = cli("report", "rep@1", "--out", str(tmp_path / "one.html"))  # rep@1 has no run: no curves
    assert code == 0 and (tmp_path / "one.html").is_file()
    assert "no training run on rep@1 yet" in (tmp_path / "one.html").read_text()


@pytest.mark.parametrize("args, message", [
    (["rep@9"], "error: dataset 'rep' has no version 9 (latest is 2)"),
    (["nope@1"], "error: no dataset 'nope' in store "),
    (["rep@2", "--train", "no-such-run"], "error: --train no-such-run: no such training run in "),
])
def test_bad_input_is_a_one_line_error(project, cli, monkeypatch, tmp_path, args, message):
    monkeypatch.setenv("SYLLABUS_STORE", str(project["folder"] / "store"))
    monkeypatch.chdir(tmp_path)
    code, out, err = cli("report", *args)
    assert code == 1 and out == "" and err.count("\n") == 1 and err.startswith(message), err
    assert not (tmp_path / "out").exists()


# --- the page in a browser -----------------------------------------------------------------------


def launch(playwright):
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"{CHROMIUM} is missing: run `make browser` (installs Debian's chromium)", pytrace=False)
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def test_every_chart_renders_in_a_browser(project, tmp_path):
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run `make setup` (requirements.lock pins it)", pytrace=False)
    path = report.write_report(project["store"], "rep@latest", out=tmp_path / "report.html")
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTEFACTS / "report.png"
    with sync_playwright() as p:
        browser = launch(p)
        page = browser.new_page(viewport={"width": 1100, "height": 900})
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.on("request", lambda r: problems.append(f"fetched {r.url}") if not r.url.startswith("file:") else None)
        page.goto(path.as_uri())
        found = {}
        for svg in page.query_selector_all("svg.chart"):
            box = svg.bounding_box()
            drawn = svg.eval_on_selector_all("rect, line, polyline, circle, path", "els => els.length")
            found[svg.get_attribute("id")] = (box, drawn)
        page.screenshot(path=str(shot), full_page=True)
        missing_lines = page.locator("p.missing").count()
        browser.close()
    print(f"report screenshot: {shot}")
    assert sorted(found) == sorted(CHARTS)
    for chart, (box, drawn) in found.items():
        assert box and box["width"] > 100 and box["height"] > 100, chart
        assert drawn >= 3, chart
    assert problems == [] and missing_lines == 0
