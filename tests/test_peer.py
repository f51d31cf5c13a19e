"""bench/peer.py's reading of the distilabel runner and its arithmetic: no distilabel, no model, milliseconds.

The sample under tests/data/ is the runner's real stdout from `bench/peer.py --quick` (8 prompts of
specs/demo.yaml, 8 new tokens, 2 repeats), with our engine's texts of the same run beside it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import bench_script

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = json.loads((ROOT / "tests/data/peer_distilabel_output.json").read_text())


peer = bench_script("peer")


def test_recorded_output_parses():
    parsed = peer.parse_runner_output(SAMPLE["stdout"])
    ready, repeats = parsed["ready"], parsed["repeats"]
    assert ready["versions"]["distilabel"]
    assert len(ready["prompt_ids"]) == SAMPLE["prompts"]
    assert len(repeats) == 2
    for r in repeats:
        assert len(r["texts"]) == len(r["output_tokens"]) == SAMPLE["prompts"]
        assert all(0 < n <= SAMPLE["max_new_tokens"] for n in r["output_tokens"])


def test_recorded_figures_are_medians_of_the_repeats():
    parsed = peer.parse_runner_output(SAMPLE["stdout"])
    fig = peer.distilabel_figures(parsed)
    seconds = sorted(r["seconds"] for r in parsed["repeats"])
    assert fig["n"] == 2
    assert fig["seconds"] == pytest.approx((seconds[0] + seconds[1]) / 2)
    assert fig["prompts"] == SAMPLE["prompts"]
    assert fig["tokens"] == sum(parsed["repeats"][-1]["output_tokens"])
    assert fig["prompts_per_s"] == pytest.approx(SAMPLE["prompts"] / fig["seconds"])


def test_recorded_greedy_text_agrees_with_ours():
    theirs = peer.parse_runner_output(SAMPLE["stdout"])["repeats"][-1]["texts"]
    assert peer.same_count(SAMPLE["engine_texts"], theirs, peer.same_text) == SAMPLE["prompts"]


def test_stray_lines_are_skipped():
    ready = json.dumps({"event": "ready", "versions": {}, "prompt_ids": [[1, 2]]})
    repeat = json.dumps({"event": "repeat", "seconds": 1.5, "texts": ["a"], "output_tokens": [3]})
    text = "\n".join(["Loading weights...", "{not json", json.dumps({"no": "event"}), ready, "", repeat])
    parsed = peer.parse_runner_output(text)
    assert parsed["ready"]["prompt_ids"] == [[1, 2]]
    assert [r["seconds"] for r in parsed["repeats"]] == [1.5]


def test_runner_that_never_got_ready_is_an_error():
    with pytest.raises(peer.RunnerError, match="never said ready"):
        peer.parse_runner_output("Traceback (most recent call last):\n  ...\n")


def test_malformed_repeat_is_an_error():
    ready = json.dumps({"event": "ready"})
    short = json.dumps({"event": "repeat", "seconds": 1.0, "texts": ["a", "b"], "output_tokens": [1]})
    with pytest.raises(peer.RunnerError, match="2 texts but 1 token counts"):
        peer.parse_runner_output(f"{ready}\n{short}\n")
    missing = json.dumps({"event": "repeat", "texts": []})
    with pytest.raises(peer.RunnerError, match="no output_tokens, seconds"):
        peer.parse_runner_output(f"{ready}\n{missing}\n")


def test_no_repeat_has_no_figures():
    with pytest.raises(peer.RunnerError, match="no repeat"):
        peer.distilabel_figures(peer.parse_runner_output(json.dumps({"event": "ready"})))


def test_rates_at_the_median():
    odd = peer.rates([3.0, 1.0, 2.0], prompts=10, tokens=40)
    assert (odd["n"], odd["seconds"], odd["prompts_per_s"], odd["tokens_per_s"]) == (3, 2.0, 5.0, 20.0)
    even = peer.rates([1.0, 4.0, 2.0, 3.0], prompts=5, tokens=10)
    assert even["seconds"] == 2.5 and even["prompts_per_s"] == 2.0 and even["tokens_per_s"] == 4.0


def test_ratio_is_ours_over_theirs():
    ours, theirs = peer.rates([1.0], 8, 64), peer.rates([4.0], 8, 32)
    assert peer.ratio(ours, theirs, "prompts_per_s") == 4.0
    assert peer.ratio(ours, theirs, "tokens_per_s") == 8.0


def test_same_text_ignores_surrounding_space_only():
    assert peer.same_count([" yes.", "no", "maybe"], ["yes.\n", "No", "maybe"], peer.same_text) == 2
    assert peer.same_count([[1, 2], [3]], [[1, 2], [3, 4]]) == 1


def test_quick_sizes_and_explicit_flags():
    quick = peer.parse_args(["--quick", "--prompts", "5"])
    assert (quick.prompts, quick.max_new_tokens, quick.repeats, quick.source_rows) == (5, 8, 2, 48)
    plain = peer.parse_args(["--spec", "a.yaml", "--spec", "b.yaml"])
    assert [str(s) for s in plain.spec] == ["a.yaml", "b.yaml"]
    assert (plain.prompts, plain.max_new_tokens, plain.repeats, plain.source_rows) == (16, 16, 3, None)
    assert [str(s) for s in peer.parse_args([]).spec] == ["specs/demo.yaml"]
