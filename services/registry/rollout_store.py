"""Rollouts in the registry's SQLite database: one row per rollout, its state as JSON.

Its own table on the registry Store's connection, written inside the Store's transactions (so a rollout's
step and the revision of its Watch event commit together).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import asdict
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.registry.rollout import Rollout
    from services.registry.store import Store

SCHEMA = """
CREATE TABLE IF NOT EXISTS rollouts (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  model TEXT NOT NULL,
  state TEXT NOT NULL,
  data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rollouts_model ON rollouts (model, id);
"""


def _json(r: "Rollout") -> str:
    data = asdict(r)
    data["state"] = r.state.value
    data.pop("id")
    return json.dumps(data)


def _rollout(row: sqlite3.Row) -> "Rollout":
    from services.registry.rollout import Analysis, Rollout, RolloutPolicy, RolloutState

    d = json.loads(row["data"])
    d["state"] = RolloutState(d["state"])
    d["policy"] = RolloutPolicy(**d["policy"])
    d["analyses"] = [Analysis(**a) for a in d["analyses"]]
    return Rollout(id=row["id"], **d)


class RolloutStore:
    def __init__(self, store: "Store"):
        self._db = store.db
        self._db.executescript(SCHEMA)

    @staticmethod
    def insert(tx: sqlite3.Connection, r: "Rollout") -> int:
        cur = tx.execute("INSERT INTO rollouts (model, state, data) VALUES (?,?,?)", (r.model, r.state.value, _json(r)))
        return cur.lastrowid

    @staticmethod
    def update(tx: sqlite3.Connection, r: "Rollout") -> None:
        tx.execute("UPDATE rollouts SET state=?, data=? WHERE id=?", (r.state.value, _json(r), r.id))

    def latest(self, model: str) -> "Rollout | None":
        row = self._db.execute("SELECT * FROM rollouts WHERE model=? ORDER BY id DESC LIMIT 1", (model,)).fetchone()
        return _rollout(row) if row else None

    def latest_all(self) -> list["Rollout"]:
        rows = self._db.execute(
            "SELECT * FROM rollouts WHERE id IN (SELECT MAX(id) FROM rollouts GROUP BY model) ORDER BY model"
        )
        return [_rollout(r) for r in rows]
