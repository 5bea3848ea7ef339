"""Readiness checks of required upstreams (services.shared.server runs them; READINESS follows them).

The router and the registry are ready only while they reach Triton: at least one replica answers
ServerLive. The reason names every address tried and what it answered, e.g.
"Triton at 127.0.0.1:8001 unreachable: UNAVAILABLE: failed to connect to all addresses ...".
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable

from services.shared.discovery import DiscoveryConfig

# Reasons are logged and shown as they are; an upstream's error text is cut to this many characters.
MAX_ERROR_CHARS = 300

LiveCall = Callable[[str, float], Awaitable[bool]]  # (address, timeout) -> live? (raises when unreachable)


def where_from(discovery: DiscoveryConfig) -> str:
    """Where Triton replicas come from, for "no replica known" reasons."""
    if discovery.mode == "endpointslices":
        return f"ready endpoints of Service {discovery.namespace}/{discovery.service}"
    return "the static --triton list (MAAS_TRITON_ADDRESS)"


def _cut(text: str) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= MAX_ERROR_CHARS else text[:MAX_ERROR_CHARS] + "..."


async def triton_reachable(addresses: Iterable[str], live: LiveCall, timeout: float, where: str) -> str | None:
    """None if one of `addresses` answers live within `timeout`; else why not."""
    addresses = sorted(addresses)
    if not addresses:
        return f"no Triton replica known yet (from {where})"

    async def one(address: str) -> str | None:
        try:
            return None if await asyncio.wait_for(live(address, timeout), timeout) else "answers not live"
        except (asyncio.TimeoutError, TimeoutError):
            return f"no answer within {timeout:g} s"
        except Exception as exc:  # noqa: BLE001 - any failure to answer is the reason, named
            return _cut(error_text(exc))

    failures = await asyncio.gather(*(one(a) for a in addresses))
    if any(f is None for f in failures):
        return None
    return "; ".join(f"Triton at {a} unreachable: {f}" for a, f in zip(addresses, failures))


def error_text(exc: BaseException) -> str:
    """A gRPC error as CODE: details; tritonclient's InferenceServerException by its message."""
    code, details = getattr(exc, "code", None), getattr(exc, "details", None)
    if callable(code) and callable(details):
        return f"{code().name}: {details()}"
    message, status = getattr(exc, "message", None), getattr(exc, "status", None)
    if callable(message):  # tritonclient: status() is "StatusCode.UNAVAILABLE" (or None)
        code = str(status() or "").rsplit(".", 1)[-1] if callable(status) else ""
        return f"{code}: {message()}" if code else str(message())
    return f"{type(exc).__name__}: {exc}"
