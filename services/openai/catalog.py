"""/v1/models from the registry's Watch stream — the same feed (and reconnect loop) as the router's table.

The gateway keeps each model's last ModelRouting view; while the registry is away it lists what it
last knew. Listed: every model with a READY version, as "name", "name:<alias>" (aliases pointing at a
READY version) and "name:<version>" — exactly the `model` strings the gateway accepts; the "name"
entry also says what the model answers (`kind`: generation, embedding, softmax_top_k, none).
"""

from __future__ import annotations

import grpc

from maas.v1 import registry_pb2
from services.router.watcher import RegistryWatcher

OWNER = "maas-mesh"


class ModelCatalog(RegistryWatcher):
    def __init__(self, channel: grpc.aio.Channel, **backoff):
        super().__init__(channel, table=None, **backoff)
        self.models: dict[str, registry_pb2.ModelRouting] = {}

    def apply(self, event: registry_pb2.WatchEvent) -> None:
        which = event.WhichOneof("event")
        if which == "snapshot":
            self.models = {m.model: m for m in event.snapshot.models}
            self.synced.set()
        elif which == "model_changed":
            self.models = {**self.models, event.model_changed.model: event.model_changed}

    def entries(self) -> list[dict]:
        out = []
        for name in sorted(self.models):
            out.extend(model_entries(self.models[name]))
        return out


def model_entries(m: registry_pb2.ModelRouting) -> list[dict]:
    ready = {v.version: v for v in m.versions if v.state == registry_pb2.VERSION_STATE_READY}
    if not ready:
        return []

    def entry(id_: str, v: registry_pb2.ModelVersion | None, **extra) -> dict:
        created = (v or ready[max(ready)]).created_at.seconds
        return {"id": id_, "object": "model", "created": created, "owned_by": OWNER, **extra}

    aliases = {a: n for a, n in sorted(m.aliases.items()) if n in ready}
    newest = ready[max(ready)].postprocessing.kind  # what the model answers: generation, embedding, ...
    kind = registry_pb2.Postprocessing.Kind.Name(newest).removeprefix("KIND_").lower() if newest else "none"
    rows = [entry(m.model, None, kind=kind, aliases=aliases, versions=sorted(ready))]
    rows += [entry(f"{m.model}:{alias}", ready[n], version=n) for alias, n in aliases.items()]
    rows += [entry(f"{m.model}:{n}", ready[n], version=n) for n in sorted(ready)]
    return rows
