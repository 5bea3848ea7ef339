"""The Operations page's actions, each one registry call with the caller's admin token.

The registry's only authentication today is one admin bearer token for every mutation (reads are
open; services/registry/auth.py): the console asks the user for it, keeps it in an HttpOnly
SameSite=Strict session cookie of the browser, never on the server, and passes it on as the
`authorization` metadata. Whatever the registry answers — UNAUTHENTICATED without a token,
PERMISSION_DENIED with a wrong one, INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION for a bad
change — is shown as it said it.
"""

from __future__ import annotations

import math

import grpc

from maas.auth import bearer
from maas.registry_client import parse_target, target_name
from maas.v1 import registry_pb2 as pb
from services.console.mesh import Mesh, Refused, invalid

TOKEN_COOKIE = "maas_console_admin_token"


def parse_split(text: str) -> list[pb.TrafficTarget]:
    """'production=90 canary=10' (or 'v1=30, v2=70'); empty = back to the production alias."""
    targets = []
    for item in text.replace(",", " ").split():
        name, sep, weight = item.partition("=")
        if not sep or not name or not weight.isdigit():
            raise invalid("split", f"{item!r} is not TARGET=WEIGHT (e.g. production=90 canary=10)")
        targets.append(parse_target(name, int(weight)))
    return targets


def parse_version(text: str) -> int:
    raw = text.strip().removeprefix("v")
    if not raw.isdigit() or int(raw) <= 0:
        raise invalid("version", f"version must be a version number like 2, got {text!r}")
    return int(raw)


def parse_fraction(text: str) -> float:
    try:
        percent = float(text)
    except ValueError:
        raise invalid("fraction", f"shadow share must be a percentage, got {text!r}") from None
    if not math.isfinite(percent) or not 0 < percent <= 100:
        raise invalid("fraction", f"shadow share must be in (0, 100] percent, got {text!r}")
    return percent / 100


class Operations:
    def __init__(self, mesh: Mesh, actor: str = "console"):
        self.mesh = mesh
        self.actor = actor

    async def _call(self, method, request, token: str):
        try:
            return await method(request, metadata=bearer(token), timeout=self.mesh.config.default_timeout)
        except grpc.aio.AioRpcError as exc:
            raise Refused.from_rpc(exc) from None

    def _actor(self, who: str) -> str:
        return f"{self.actor}:{who.strip()}" if who.strip() else self.actor

    async def set_alias(self, token: str, model: str, alias: str, version: str, reason: str, who: str = "") -> str:
        if not alias:
            raise invalid("alias", "name the alias (e.g. canary)")
        answer = await self._call(
            self.mesh.registry.SetAlias,
            pb.SetAliasRequest(
                model=model, alias=alias, version=parse_version(version), reason=reason, actor=self._actor(who)
            ),
            token,
        )
        before = f" (was v{answer.previous_version})" if answer.previous_version else ""
        return f"{model}: {answer.name} → v{answer.version}{before}"

    async def set_split(self, token: str, model: str, split: str, reason: str, who: str = "") -> str:
        """A new split; the current shadow stays (SetTrafficPolicy replaces the whole policy)."""
        current = (await self.mesh.model(model)).policy
        request = pb.SetTrafficPolicyRequest(
            model=model, split=parse_split(split), reason=reason, actor=self._actor(who)
        )
        if current.HasField("shadow"):
            request.shadow.CopyFrom(current.shadow)
        policy = await self._call(self.mesh.registry.SetTrafficPolicy, request, token)
        shown = " ".join(f"{target_name(t)}={t.weight}" for t in policy.split) or "production (no split)"
        return f"{model}: split {shown}"

    async def set_shadow(
        self, token: str, model: str, target: str, fraction: str | None, reason: str, who: str = ""
    ) -> str:
        """Start (fraction given) or stop (None) mirroring; the current split stays."""
        current = (await self.mesh.model(model)).policy
        request = pb.SetTrafficPolicyRequest(
            model=model, split=list(current.split), reason=reason, actor=self._actor(who)
        )
        if fraction is not None:
            if not target:
                raise invalid("target", "name the shadow version or alias")
            request.shadow.CopyFrom(pb.ShadowPolicy(target=parse_target(target), fraction=parse_fraction(fraction)))
        policy = await self._call(self.mesh.registry.SetTrafficPolicy, request, token)
        if policy.HasField("shadow") and policy.shadow.fraction > 0:
            return f"{model}: shadow {target_name(policy.shadow.target)} at {policy.shadow.fraction * 100:g}%"
        return f"{model}: shadow stopped"

    async def rollback(self, token: str, model: str, alias: str, reason: str, who: str = "") -> str:
        answer = await self._call(
            self.mesh.registry.Rollback,
            pb.RollbackRequest(model=model, alias=alias or "production", reason=reason, actor=self._actor(who)),
            token,
        )
        return f"{model}: {answer.name} rolled back to v{answer.version} (was v{answer.previous_version})"
