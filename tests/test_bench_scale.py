"""bench/scale.py's projection on a hand example: hours per stage, the total and the limiting stage (nothing measured)."""

from pathlib import Path

import pytest
from conftest import bench_script

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def scale():
    return bench_script("scale")


def hand_rates(scale):
    rate = scale.StageRate
    return [rate("sources", "per_row", rows=1000, seconds=1.0),                     # 1000 rows/s
            rate("embed", "per_row", rows=100, seconds=1.0),                        # 100 rows/s
            rate("teach", "teacher", rows=10, seconds=1.0, rows_per_prompt=0.5),    # 10 rows/s per endpoint
            rate("dedup", "driver", rows=1000, seconds=2.0, exponent=1.5),          # 2 s at 1000 rows
            rate("commit", "driver", rows=1000, seconds=1.0, rows_per_prompt=0.5)]  # 1 s at 1000 rows


def test_per_row_stages_divide_by_workers_teacher_by_endpoints_driver_grows_by_its_exponent(scale):
    # 3.6M prompts: 3600 s of one worker at 1000 rows/s is one hour.
    p = scale.project(hand_rates(scale), prompts=3_600_000, workers=4, endpoints=10)
    assert p["hours"] == pytest.approx({
        "sources": 3_600_000 / 1000 / 4 / 3600,       # 0.25 h
        "embed": 3_600_000 / 100 / 4 / 3600,          # 2.5 h
        "teach": 1_800_000 / 10 / 10 / 3600,          # half the prompts reach it: 5 h
        "dedup": 2.0 * 3600 ** 1.5 / 3600,            # one node, 3600x the rows: 120 h
        "commit": 1.0 * 1800 / 3600})                 # 0.5 h
    assert p["total_hours"] == pytest.approx(0.25 + 2.5 + 5 + 120 + 0.5)
    assert p["limiting"] == "dedup"


def test_with_one_endpoint_and_no_driver_bottleneck_the_teacher_limits(scale):
    rates = [r for r in hand_rates(scale) if r.name != "dedup"]
    p = scale.project(rates, prompts=3_600_000, workers=1, endpoints=1)
    assert p["hours"]["teach"] == pytest.approx(50.0) and p["hours"]["embed"] == pytest.approx(10.0)
    assert p["limiting"] == "teach"
    assert "| 1 | 1 | 1.00 | 10.00 | 50.00 | 0.50 | **61.5** | teach |" in scale.markdown_table([p], list(p["hours"]))


def test_stage_kinds(scale):
    assert [scale.stage_kind(n) for n in ("embed", "teach", "options", "dedup", "commit")] == \
        ["per_row", "teacher", "teacher", "driver", "driver"]
