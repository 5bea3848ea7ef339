"""`maas tenants ...` and `maas audit` as a user runs them (real subprocesses) against a registry with an
admin token: the key is printed once and works at a router, list shows no key, every change is audited."""

from __future__ import annotations

import asyncio
import json
import os
import sys

import grpc

from maas.v1 import router_pb2_grpc
from tests.fixtures.registry import REPO
from tests.fixtures.tenants import ADMIN, bearer, infer_request, register_tiny, until


async def maas(env, *args: str, token: str | None = ADMIN) -> tuple[int, str, str]:
    environ = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "MAAS_REGISTRY_ADDRESS": env.address,
        "COLUMNS": "250",
        "USER": "alice",
    }
    environ.pop("MAAS_ADMIN_TOKEN", None)
    if token:
        environ["MAAS_ADMIN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from maas.cli import main; main()",
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return proc.returncode, out.decode(), err.decode()


async def test_tenants_cli_round_trip(start_registry, auth_routers):
    env = await start_registry(token=ADMIN)
    await register_tiny(env)
    [(_, address)] = await auth_routers(env)

    code, out, err = await maas(
        env,
        "tenants",
        "create",
        "search",
        "--allow",
        "tiny",
        "--rps",
        "50",
        "--burst",
        "10",
        "--priority",
        "critical",
        "-r",
        "search team",
    )
    assert code == 0, err
    key = out.strip().splitlines()[-1]
    assert "shown once" in out and key.startswith("maas_")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = router_pb2_grpc.RouterStub(channel)

        async def works(k) -> bool:
            try:
                await stub.Infer(infer_request(), metadata=bearer(k), timeout=5)
                return True
            except grpc.aio.AioRpcError:
                return False

        await until(lambda: works(key), what="the new key working at the router")

        code, out, err = await maas(env, "tenants", "list", "--json")
        assert code == 0, err
        [tenant] = json.loads(out)
        assert tenant["name"] == "search" and tenant["allowed_models"] == ["tiny"]
        assert tenant["priority"] == "PRIORITY_CRITICAL" and tenant["quota"]["requests_per_second"] == 50
        assert key not in out and key.startswith(tenant["key_prefix"])
        code, out, _ = await maas(env, "tenants", "list")
        assert code == 0 and "search" in out and "50 req/s (burst 10)" in out and key not in out

        code, out, err = await maas(env, "tenants", "rotate-key", "search", "-r", "leaked")
        assert code == 0, err
        new_key = out.strip().splitlines()[-1]
        assert new_key != key
        code, out, err = await maas(
            env,
            "tenants",
            "set-quota",
            "search",
            "--rps",
            "5",
            "--priority",
            "sheddable",
            "--allow-all",
            "-r",
            "smaller plan",
        )
        assert code == 0 and "5 req/s" in out and "sheddable" in out and "models: all" in out, err
        code, out, err = await maas(env, "tenants", "revoke", "search", "-r", "contract ended")
        assert code == 0 and "revoked" in out, err
        await until(lambda: _not(works(new_key)), what="the revoked key refused")

    # Errors: the server's message, exit 1, no traceback.
    code, _, err = await maas(env, "tenants", "list", token=None)
    assert code == 1 and "UNAUTHENTICATED" in err and "Traceback" not in err
    code, _, err = await maas(env, "tenants", "create", "search")
    assert code == 1 and "ALREADY_EXISTS" in err
    code, _, err = await maas(env, "tenants", "create", "x", "--priority", "urgent")
    assert code == 2 and "urgent" in err

    code, out, err = await maas(env, "audit", "--json")
    assert code == 0, err
    entries = json.loads(out)
    assert [e["action"] for e in entries] == [
        "tenant.revoke",
        "tenant.set_quota",
        "tenant.rotate_key",
        "tenant.create",
        "version.register",
    ]
    assert all(e["actor"] == "alice" for e in entries[:4])
    assert entries[0]["reason"] == "contract ended" and entries[0]["target"] == "tenant/search"
    assert key not in out and new_key not in out
    code, out, _ = await maas(env, "audit", "--target", "tenant/")
    assert code == 0 and "tenant.revoke" in out and "version.register" not in out


async def _not(awaitable) -> bool:
    return not await awaitable
