"""What every bench task's data generator shares: the checks a pool and its held-out set must pass,
and writing them as JSONL under specs/bench/data/."""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"wrote {path.relative_to(HERE.parents[1])}: {len(rows)} rows")


def write_task(name: str, pool: list[dict], held_out: list[dict]) -> None:
    """data/NAME.jsonl and data/NAME_heldout.jsonl, once no held-out text is in the pool and neither repeats."""
    seen = {r["text"].lower() for r in pool}
    assert not any(r["text"].lower() in seen for r in held_out), "a held-out text is in the pool"
    assert len({r["text"] for r in pool}) == len(pool), "repeated text in the pool"
    assert len({r["text"] for r in held_out}) == len(held_out), "repeated text in the held-out set"
    write(HERE / "data" / f"{name}.jsonl", pool)
    write(HERE / "data" / f"{name}_heldout.jsonl", held_out)
