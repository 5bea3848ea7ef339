"""SQLite persistence: WAL, one transaction per mutation, a revision counter that survives restarts.

Every mutation that changes the routing state bumps the revision in the same transaction, so a Watch
event's revision is exactly the state it describes, and revisions keep increasing across restarts.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

from services.registry.domain import (
    Alias,
    ArtifactFormat,
    Postprocessing,
    PostprocessingKind,
    Preprocessing,
    PreprocessingKind,
    ShadowResult,
    ShadowStats,
    Signature,
    Target,
    TensorSpec,
    TrafficPolicy,
    Version,
    VersionState,
)
from services.registry.tenants import AuditEntry, Priority, Quota, Tenant

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS models (
  name TEXT PRIMARY KEY,
  last_version INTEGER NOT NULL DEFAULT 0,
  created_at REAL NOT NULL,
  policy TEXT
);
CREATE TABLE IF NOT EXISTS versions (
  model TEXT NOT NULL REFERENCES models(name),
  version INTEGER NOT NULL,
  state TEXT NOT NULL,
  state_reason TEXT NOT NULL DEFAULT '',
  format TEXT NOT NULL,
  sha256 TEXT NOT NULL,
  size_bytes INTEGER NOT NULL,
  signature TEXT NOT NULL,
  preprocessing TEXT NOT NULL,
  postprocessing TEXT NOT NULL,
  labels TEXT NOT NULL,
  tags TEXT NOT NULL,
  created_at REAL NOT NULL,
  created_by TEXT NOT NULL,
  description TEXT NOT NULL,
  max_batch_size INTEGER NOT NULL,
  load_ms REAL NOT NULL DEFAULT 0,
  base_config TEXT NOT NULL DEFAULT '',
  PRIMARY KEY (model, version)
);
CREATE TABLE IF NOT EXISTS aliases (
  model TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, previous_version INTEGER NOT NULL,
  updated_by TEXT NOT NULL, updated_at REAL NOT NULL, reason TEXT NOT NULL,
  PRIMARY KEY (model, name)
);
CREATE TABLE IF NOT EXISTS alias_history (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  model TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, previous_version INTEGER NOT NULL,
  updated_by TEXT NOT NULL, updated_at REAL NOT NULL, reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS shadow_stats (
  model TEXT NOT NULL, primary_version INTEGER NOT NULL, shadow_version INTEGER NOT NULL,
  requests INTEGER NOT NULL, items INTEGER NOT NULL, top1_agreed INTEGER NOT NULL, cosine_sum REAL NOT NULL,
  primary_latency_sum REAL NOT NULL, shadow_latency_sum REAL NOT NULL,
  PRIMARY KEY (model, primary_version, shadow_version)
);
CREATE TABLE IF NOT EXISTS tenants (
  name TEXT PRIMARY KEY, key_sha256 TEXT NOT NULL UNIQUE, key_prefix TEXT NOT NULL,
  allowed_models TEXT NOT NULL, quota TEXT NOT NULL, priority TEXT NOT NULL, revoked INTEGER NOT NULL,
  created_at REAL NOT NULL, created_by TEXT NOT NULL, updated_at REAL NOT NULL, updated_by TEXT NOT NULL,
  description TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL, action TEXT NOT NULL,
  target TEXT NOT NULL, reason TEXT NOT NULL, detail TEXT NOT NULL
);
INSERT OR IGNORE INTO meta (key, value) VALUES ('revision', 0);
INSERT OR IGNORE INTO meta (key, value) VALUES ('tenant_revision', 0);
"""


def _signature_json(sig: Signature) -> str:
    return json.dumps({"inputs": [asdict(t) for t in sig.inputs], "outputs": [asdict(t) for t in sig.outputs]})


def _signature(raw: str) -> Signature:
    data = json.loads(raw)
    spec = lambda t: TensorSpec(t["name"], t["datatype"], tuple(t["shape"]))
    return Signature(tuple(map(spec, data["inputs"])), tuple(map(spec, data["outputs"])))


def _policy_json(p: TrafficPolicy) -> str:
    target = lambda t: {"version": t.version, "alias": t.alias, "weight": t.weight}
    return json.dumps(
        {
            "split": [target(t) for t in p.split],
            "shadow": target(p.shadow) if p.shadow else None,
            "shadow_fraction": p.shadow_fraction,
            "updated_by": p.updated_by,
            "updated_at": p.updated_at,
            "reason": p.reason,
        }
    )


def _policy(model: str, raw: str | None) -> TrafficPolicy:
    if not raw:
        return TrafficPolicy(model=model)
    d = json.loads(raw)
    return TrafficPolicy(
        model=model,
        split=tuple(Target(**t) for t in d["split"]),
        shadow=Target(**d["shadow"]) if d["shadow"] else None,
        shadow_fraction=d["shadow_fraction"],
        updated_by=d["updated_by"],
        updated_at=d["updated_at"],
        reason=d["reason"],
    )


def _version(row: sqlite3.Row) -> Version:
    pre, post = json.loads(row["preprocessing"]), json.loads(row["postprocessing"])
    return Version(
        model=row["model"],
        version=row["version"],
        state=VersionState(row["state"]),
        state_reason=row["state_reason"],
        format=ArtifactFormat(row["format"]),
        sha256=row["sha256"],
        size_bytes=row["size_bytes"],
        signature=_signature(row["signature"]),
        preprocessing=Preprocessing(PreprocessingKind(pre["kind"]), pre["name"]),
        postprocessing=Postprocessing(PostprocessingKind(post["kind"]), post["output"], post["top_k"]),
        labels=tuple(json.loads(row["labels"])),
        tags=json.loads(row["tags"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
        description=row["description"],
        max_batch_size=row["max_batch_size"],
        load_ms=row["load_ms"],
        base_config=row["base_config"],
    )


def _alias(row: sqlite3.Row) -> Alias:
    return Alias(
        row["model"],
        row["name"],
        row["version"],
        row["previous_version"],
        row["updated_by"],
        row["updated_at"],
        row["reason"],
    )


class Store:
    """All registry metadata. Not thread-safe: the registry calls it from its event loop only."""

    def __init__(self, path: Path):
        path = Path(path)
        if str(path) != ":memory:":
            path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: a committed mutation survives power loss, not just a process crash.
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.executescript(SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        """The connection, shared by the registry's other tables (rollouts, shadow reports)."""
        return self._db

    def close(self) -> None:
        self._db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One mutation = one transaction; taken IMMEDIATE so version numbers are allocated atomically."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- revision ----------------------------------------------------------------------------------
    def revision(self) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]

    @staticmethod
    def bump_revision(tx: sqlite3.Connection) -> int:
        tx.execute("UPDATE meta SET value = value + 1 WHERE key='revision'")
        return tx.execute("SELECT value FROM meta WHERE key='revision'").fetchone()[0]

    # -- models and versions -----------------------------------------------------------------------
    def model_names(self) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT name FROM models ORDER BY name")]

    def model_exists(self, model: str) -> bool:
        return self._db.execute("SELECT 1 FROM models WHERE name=?", (model,)).fetchone() is not None

    @staticmethod
    def next_version(tx: sqlite3.Connection, model: str) -> int:
        """Allocate the model's next version number inside the caller's transaction."""
        tx.execute(
            "INSERT OR IGNORE INTO models (name, last_version, created_at) VALUES (?, 0, ?)", (model, time.time())
        )
        tx.execute("UPDATE models SET last_version = last_version + 1 WHERE name=?", (model,))
        return tx.execute("SELECT last_version FROM models WHERE name=?", (model,)).fetchone()[0]

    @staticmethod
    def insert_version(tx: sqlite3.Connection, v: Version) -> None:
        tx.execute(
            "INSERT INTO versions (model, version, state, state_reason, format, sha256, size_bytes, signature,"
            " preprocessing, postprocessing, labels, tags, created_at, created_by, description, max_batch_size,"
            " load_ms, base_config) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                v.model,
                v.version,
                v.state.value,
                v.state_reason,
                v.format.value,
                v.sha256,
                v.size_bytes,
                _signature_json(v.signature),
                json.dumps({"kind": v.preprocessing.kind.value, "name": v.preprocessing.name}),
                json.dumps(
                    {
                        "kind": v.postprocessing.kind.value,
                        "output": v.postprocessing.output,
                        "top_k": v.postprocessing.top_k,
                    }
                ),
                json.dumps(list(v.labels)),
                json.dumps(v.tags, sort_keys=True),
                v.created_at,
                v.created_by,
                v.description,
                v.max_batch_size,
                v.load_ms,
                v.base_config,
            ),
        )

    @staticmethod
    def set_state(
        tx: sqlite3.Connection,
        model: str,
        version: int,
        state: VersionState,
        reason: str = "",
        load_ms: float | None = None,
    ) -> None:
        if load_ms is None:
            tx.execute(
                "UPDATE versions SET state=?, state_reason=? WHERE model=? AND version=?",
                (state.value, reason, model, version),
            )
        else:
            tx.execute(
                "UPDATE versions SET state=?, state_reason=?, load_ms=? WHERE model=? AND version=?",
                (state.value, reason, load_ms, model, version),
            )

    def versions(self, model: str) -> list[Version]:
        rows = self._db.execute("SELECT * FROM versions WHERE model=? ORDER BY version", (model,)).fetchall()
        aliases: dict[int, list[str]] = {}
        for a in self.aliases(model):
            aliases.setdefault(a.version, []).append(a.name)
        out = []
        for row in rows:
            v = _version(row)
            v.aliases = tuple(sorted(aliases.get(v.version, ())))
            out.append(v)
        return out

    def version(self, model: str, version: int) -> Version | None:
        return next((v for v in self.versions(model) if v.version == version), None)

    def all_versions(self) -> list[Version]:
        return [v for name in self.model_names() for v in self.versions(name)]

    def version_dirs_known(self) -> set[tuple[str, int]]:
        return {(r[0], r[1]) for r in self._db.execute("SELECT model, version FROM versions")}

    # -- aliases -----------------------------------------------------------------------------------
    def aliases(self, model: str) -> list[Alias]:
        rows = self._db.execute("SELECT * FROM aliases WHERE model=? ORDER BY name", (model,))
        return [_alias(r) for r in rows]

    def alias(self, model: str, name: str) -> Alias | None:
        row = self._db.execute("SELECT * FROM aliases WHERE model=? AND name=?", (model, name)).fetchone()
        return _alias(row) if row else None

    @staticmethod
    def put_alias(tx: sqlite3.Connection, a: Alias) -> None:
        tx.execute(
            "INSERT OR REPLACE INTO aliases VALUES (?,?,?,?,?,?,?)",
            (a.model, a.name, a.version, a.previous_version, a.updated_by, a.updated_at, a.reason),
        )
        tx.execute(
            "INSERT INTO alias_history (model, name, version, previous_version, updated_by, updated_at, reason)"
            " VALUES (?,?,?,?,?,?,?)",
            (a.model, a.name, a.version, a.previous_version, a.updated_by, a.updated_at, a.reason),
        )

    def alias_history(self, model: str, name: str | None = None, limit: int = 100) -> list[Alias]:
        """Alias moves, newest first."""
        if name is None:
            rows = self._db.execute(
                "SELECT * FROM alias_history WHERE model=? ORDER BY id DESC LIMIT ?", (model, limit)
            )
        else:
            rows = self._db.execute(
                "SELECT * FROM alias_history WHERE model=? AND name=? ORDER BY id DESC LIMIT ?", (model, name, limit)
            )
        return [_alias(r) for r in rows]

    # -- traffic policy ----------------------------------------------------------------------------
    def policy(self, model: str) -> TrafficPolicy:
        row = self._db.execute("SELECT policy FROM models WHERE name=?", (model,)).fetchone()
        return _policy(model, row[0] if row else None)

    @staticmethod
    def put_policy(tx: sqlite3.Connection, p: TrafficPolicy) -> None:
        tx.execute("UPDATE models SET policy=? WHERE name=?", (_policy_json(p), p.model))

    # -- shadow statistics -------------------------------------------------------------------------
    @staticmethod
    def add_shadow_results(tx: sqlite3.Connection, results: list[ShadowResult]) -> None:
        for r in results:
            tx.execute(
                "INSERT INTO shadow_stats VALUES (?,?,?,1,?,?,?,?,?)"
                " ON CONFLICT (model, primary_version, shadow_version) DO UPDATE SET"
                " requests=requests+1, items=items+excluded.items,"
                " top1_agreed=top1_agreed+excluded.top1_agreed, cosine_sum=cosine_sum+excluded.cosine_sum,"
                " primary_latency_sum=primary_latency_sum+excluded.primary_latency_sum,"
                " shadow_latency_sum=shadow_latency_sum+excluded.shadow_latency_sum",
                (
                    r.model,
                    r.primary_version,
                    r.shadow_version,
                    r.items,
                    r.top1_agreed,
                    r.cosine_sum,
                    r.primary_latency_ms,
                    r.shadow_latency_ms,
                ),
            )

    def shadow_stats(self, model: str) -> list[ShadowStats]:
        rows = self._db.execute(
            "SELECT * FROM shadow_stats WHERE model=? ORDER BY primary_version, shadow_version", (model,)
        )
        out = []
        for r in rows:
            items, requests = max(r["items"], 1), max(r["requests"], 1)
            out.append(
                ShadowStats(
                    primary_version=r["primary_version"],
                    shadow_version=r["shadow_version"],
                    samples=r["requests"],
                    top1_agreement=r["top1_agreed"] / items,
                    mean_cosine=r["cosine_sum"] / items,
                    primary_latency_ms=r["primary_latency_sum"] / requests,
                    shadow_latency_ms=r["shadow_latency_sum"] / requests,
                )
            )
        return out

    # -- tenants -----------------------------------------------------------------------------------
    def tenant_revision(self) -> int:
        return self._db.execute("SELECT value FROM meta WHERE key='tenant_revision'").fetchone()[0]

    @staticmethod
    def bump_tenant_revision(tx: sqlite3.Connection) -> int:
        tx.execute("UPDATE meta SET value = value + 1 WHERE key='tenant_revision'")
        return tx.execute("SELECT value FROM meta WHERE key='tenant_revision'").fetchone()[0]

    def tenants(self) -> list[Tenant]:
        return [_tenant(r) for r in self._db.execute("SELECT * FROM tenants ORDER BY name")]

    def tenant(self, name: str) -> Tenant | None:
        row = self._db.execute("SELECT * FROM tenants WHERE name=?", (name,)).fetchone()
        return _tenant(row) if row else None

    @staticmethod
    def insert_tenant(tx: sqlite3.Connection, t: Tenant) -> None:
        tx.execute(
            "INSERT INTO tenants (name, key_sha256, key_prefix, allowed_models, quota, priority, revoked,"
            " created_at, created_by, updated_at, updated_by, description) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
            _tenant_row(t),
        )

    @staticmethod
    def update_tenant(tx: sqlite3.Connection, t: Tenant) -> None:
        row = _tenant_row(t)
        tx.execute(
            "UPDATE tenants SET key_sha256=?, key_prefix=?, allowed_models=?, quota=?, priority=?, revoked=?,"
            " created_at=?, created_by=?, updated_at=?, updated_by=?, description=? WHERE name=?",
            (*row[1:], row[0]),
        )

    # -- audit -------------------------------------------------------------------------------------
    @staticmethod
    def add_audit(tx: sqlite3.Connection, actor: str, action: str, target: str, reason: str, detail: str) -> None:
        tx.execute(
            "INSERT INTO audit (at, actor, action, target, reason, detail) VALUES (?,?,?,?,?,?)",
            (time.time(), actor or "unknown", action, target, reason or "", detail),
        )

    def audit_entries(self, limit: int, target_prefix: str = "") -> list[AuditEntry]:
        rows = self._db.execute(
            "SELECT * FROM audit WHERE substr(target, 1, ?) = ? ORDER BY id DESC LIMIT ?",
            (len(target_prefix), target_prefix, limit),
        )
        return [
            AuditEntry(r["id"], r["at"], r["actor"], r["action"], r["target"], r["reason"], r["detail"]) for r in rows
        ]


def _tenant_row(t: Tenant) -> tuple:
    return (
        t.name,
        t.key_sha256,
        t.key_prefix,
        json.dumps(list(t.allowed_models)),
        json.dumps(asdict(t.quota)),
        t.priority.value,
        int(t.revoked),
        t.created_at,
        t.created_by,
        t.updated_at,
        t.updated_by,
        t.description,
    )


def _tenant(row: sqlite3.Row) -> Tenant:
    return Tenant(
        name=row["name"],
        key_sha256=row["key_sha256"],
        key_prefix=row["key_prefix"],
        allowed_models=tuple(json.loads(row["allowed_models"])),
        quota=Quota(**json.loads(row["quota"])),
        priority=Priority(row["priority"]),
        revoked=bool(row["revoked"]),
        created_at=row["created_at"],
        created_by=row["created_by"],
        updated_at=row["updated_at"],
        updated_by=row["updated_by"],
        description=row["description"],
    )
