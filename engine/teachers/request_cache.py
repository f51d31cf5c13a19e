"""Per-row cache of teacher answers, keyed by content.

key = sha256(teacher fingerprint, generation parameters, the exact request: for one chat user turn the
prompt text itself, else the whole conversation: chat or plain, system message, turns and prompt).
Each batch is committed as soon as it is answered, so an interrupted run resumes
without paying again for any completed teacher call.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path

import numpy as np

from engine.teachers import TeacherOutput


def request_key(fingerprint: str, params: dict, prompt) -> str:
    """`prompt`: a text (one chat user turn) or an engine.prompts.Conversation."""
    text = prompt if isinstance(prompt, str) else prompt.key
    payload = json.dumps([fingerprint, params, text], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


class TeacherCache:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.db = sqlite3.connect(path, timeout=60)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute(
            "CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, text TEXT, k INTEGER,"
            " token_ids BLOB, token_logprobs BLOB, topk_ids BLOB, topk_logprobs BLOB, finish_reason TEXT)"
        )
        columns = {row[1] for row in self.db.execute("PRAGMA table_info(answers)")}
        if "finish_reason" not in columns:  # a cache written before answers kept it: theirs is NULL, derived later
            self.db.execute("ALTER TABLE answers ADD COLUMN finish_reason TEXT")
        # Measured generation speed, so `plan` can estimate the time of the calls still to pay.
        self.db.execute("CREATE TABLE IF NOT EXISTS speed (fingerprint TEXT, rows INTEGER, tokens INTEGER, seconds REAL)")
        self.db.commit()

    def get_many(self, keys: list[str]) -> dict[str, TeacherOutput]:
        found = {}
        for start in range(0, len(keys), 500):
            chunk = keys[start : start + 500]
            marks = ",".join("?" * len(chunk))
            for row in self.db.execute(f"SELECT {_COLUMNS} FROM answers WHERE key IN ({marks})", chunk):
                found[row[0]] = _decode(row)
        return found

    def put_many(self, items: dict[str, TeacherOutput]) -> None:
        with self.db:  # one transaction per batch: all of it or none
            self.db.executemany(
                f"INSERT OR REPLACE INTO answers ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [_encode(key, out) for key, out in items.items()],
            )

    def record_speed(self, fingerprint: str, rows: int, tokens: int, seconds: float) -> None:
        with self.db:
            self.db.execute("INSERT INTO speed VALUES (?, ?, ?, ?)", (fingerprint, rows, tokens, seconds))

    def speed(self, fingerprint: str) -> tuple[float, float] | None:
        """(seconds per row, tokens per row) over the recorded runs of this teacher, or None."""
        rows, tokens, seconds = self.db.execute(
            "SELECT sum(rows), sum(tokens), sum(seconds) FROM speed WHERE fingerprint = ?", (fingerprint,)).fetchone()
        return (seconds / rows, tokens / rows) if rows else None

    def close(self) -> None:
        self.db.close()


_COLUMNS = "key, text, k, token_ids, token_logprobs, topk_ids, topk_logprobs, finish_reason"


def _encode(key: str, out: TeacherOutput) -> tuple:
    return (
        key,
        out.text,
        int(out.topk_ids.shape[1]) if out.topk_ids.ndim == 2 else 0,
        out.token_ids.astype(np.int32).tobytes(),
        out.token_logprobs.astype(np.float32).tobytes(),
        out.topk_ids.astype(np.int32).tobytes(),
        out.topk_logprobs.astype(np.float16).tobytes(),
        out.finish_reason,
    )


def _decode(row: tuple) -> TeacherOutput:
    _, text, k, ids, lps, top_ids, top_lps, finish_reason = row
    return TeacherOutput(
        text=text,
        token_ids=np.frombuffer(ids, dtype=np.int32),
        token_logprobs=np.frombuffer(lps, dtype=np.float32),
        topk_ids=np.frombuffer(top_ids, dtype=np.int32).reshape(-1, k),
        topk_logprobs=np.frombuffer(top_lps, dtype=np.float16).reshape(-1, k),
        finish_reason=finish_reason,
    )
