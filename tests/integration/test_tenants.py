"""Tenants end to end on real processes: the registry (in-process) with its admin token, real Triton serving
the tiny model, routers with auth on following WatchTenants.

No key / bad key / revoked key / disallowed model get their codes on every inference API of the router,
the compiled OIP fast path's port included (the same words as the main port, and a revocation reaching it
within a second); the web console's playground sends the API key its user entered;
a revocation reaches both routers within a second (measured); a tenant at 50 req/s sending 200 req/s
through two routers gets 45-55 req/s served; the retry hint rides in trailing metadata.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput
from tritonclient.utils import InferenceServerException

from maas.v1 import registry_pb2 as pb
from maas.v1 import router_pb2, router_pb2_grpc
from tests.fixtures.tenants import ADMIN, X, bearer, create_tenant, infer_request, register_tiny, until


async def _code(call) -> grpc.StatusCode:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def _details(call) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


def _stub(address: str) -> tuple[grpc.aio.Channel, router_pb2_grpc.RouterStub]:
    channel = grpc.aio.insecure_channel(address)
    return channel, router_pb2_grpc.RouterStub(channel)


async def _ready(stub, key: str) -> None:
    async def ok() -> bool:
        return await _code(stub.Infer(infer_request(), metadata=bearer(key), timeout=5)) == grpc.StatusCode.OK

    await until(ok, what="the router serving tiny")


def _all_calls(stub, metadata, model: str = "tiny"):
    """One call of every Router inference method (each named)."""
    ref = {"model": {"name": model}}
    return {
        "Infer": lambda: stub.Infer(infer_request(model), metadata=metadata, timeout=5),
        "Embed": lambda: stub.Embed(router_pb2.EmbedRequest(texts=["hi"], **ref), metadata=metadata, timeout=5),
        "Classify": lambda: stub.Classify(
            router_pb2.ClassifyRequest(images=[b"x"], **ref), metadata=metadata, timeout=5
        ),
        "GenerateUnary": lambda: stub.GenerateUnary(
            router_pb2.GenerateRequest(prompt="hi", **ref), metadata=metadata, timeout=5
        ),
        "Generate": lambda: _drain(
            stub.Generate(router_pb2.GenerateRequest(prompt="hi", **ref), metadata=metadata, timeout=5)
        ),
    }


async def _drain(call) -> None:
    async for _ in call:
        pass


async def _oip(address: str, headers: dict | None, model: str = "tiny"):
    client = triton_aio.InferenceServerClient(address)
    inp = InferInput("x", [1, 4], "FP32")
    inp.set_data_from_numpy(X)
    try:
        result = await client.infer(model, [inp], headers=headers, client_timeout=10)
        return "OK", result.as_numpy("y")
    except InferenceServerException as exc:
        return exc.status(), exc.message()
    finally:
        await client.close()


async def test_every_inference_api_says_which_key_or_model_problem_it_is(start_registry, auth_routers):
    env = await start_registry(token=ADMIN)
    await register_tiny(env)
    await register_tiny(env, "other")
    good = await create_tenant(env, "acme", allowed_models=["tiny"])
    gone = await create_tenant(env, "gone")
    await env.stub.RevokeTenant(pb.RevokeTenantRequest(name="gone", actor="pytest", reason="test"), metadata=env.auth())
    [(server, address)] = await auth_routers(env)
    channel, stub = _stub(address)
    try:
        await _ready(stub, good)
        cases = {
            "no key": ((), grpc.StatusCode.UNAUTHENTICATED, "needs an API key"),
            "bad key": (bearer("maas_not-a-key"), grpc.StatusCode.UNAUTHENTICATED, "is not valid"),
            "not bearer": ((("authorization", f"Basic {good}"),), grpc.StatusCode.UNAUTHENTICATED, "Bearer <key>"),
            "revoked key": (bearer(gone), grpc.StatusCode.UNAUTHENTICATED, "'gone' is revoked"),
        }
        for case, (metadata, code, words) in cases.items():
            for method, call in _all_calls(stub, metadata).items():
                got, details = await _details(call())
                assert (got, words in details) == (code, True), (case, method, got, details)
            status, message = await _oip(address, dict(metadata) or None)
            assert status == "StatusCode.UNAUTHENTICATED" and words in message, (case, "ModelInfer", message)
        # A model the tenant may not call: PERMISSION_DENIED naming it, before any work.
        for method, call in _all_calls(stub, bearer(good), model="other").items():
            got, details = await _details(call())
            assert got == grpc.StatusCode.PERMISSION_DENIED and "may not call model 'other'" in details, (
                method,
                details,
            )
        status, message = await _oip(address, {"authorization": f"Bearer {good}"}, model="other")
        assert status == "StatusCode.PERMISSION_DENIED" and "'acme' may not call model 'other'" in message
        # The good key on an allowed model is served, on the main port's OIP too.
        response = await stub.Infer(infer_request(), metadata=bearer(good), timeout=5)
        assert response.routed.model == "tiny"
        status, y = await _oip(address, {"authorization": f"Bearer {good}"})
        assert status == "OK" and np.array_equal(y, X * 2)
        # The client library sends the key it is given (or $MAAS_API_KEY).
        from maas.client import AsyncMeshClient, MeshError

        async with AsyncMeshClient(address, api_key=good) as mesh:
            assert np.array_equal((await mesh.infer("tiny", {"x": X})).outputs["y"], X * 2)
        async with AsyncMeshClient(address, api_key="") as mesh:
            with pytest.raises(MeshError) as refused:
                await mesh.infer("tiny", {"x": X})
            assert refused.value.code == grpc.StatusCode.UNAUTHENTICATED
        # Embed/Classify/Generate were admitted (their preprocessing service is absent here: UNAVAILABLE).
        for method in ("Embed", "Classify"):
            got = await _code(_all_calls(stub, bearer(good))[method]())
            assert got not in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED), (method, got)
    finally:
        await channel.close()


async def test_the_fast_path_port_checks_keys_like_the_main_port(start_registry, auth_routers, monkeypatch):
    """An unmodified tritonclient with a bearer header on the compiled fast path: the main port's codes and
    words for each key or model problem, the allowed call served by the fast path itself (the main port's
    data plane sees none), counted for its tenant; a quota tenant's calls still meet their quota (the
    main port's, with its retry hint); a revocation reaches the fast path within a second (measured)."""
    from prometheus_client import REGISTRY

    from maas.local.processes import free_ports
    from services.router.dataplane import Dataplane
    from services.router.fastpath import find_binary

    if not find_binary():
        pytest.skip("maas-oip-fastpath is not built (make fastpath)")
    on_main_port: list[bytes] = []
    infer_raw = Dataplane.infer_raw

    async def counted(self, request, *args):
        on_main_port.append(request)
        return await infer_raw(self, request, *args)

    monkeypatch.setattr(Dataplane, "infer_raw", counted)

    def sample(name: str, **labels) -> float:
        return REGISTRY.get_sample_value(name, labels) or 0.0

    env = await start_registry(token=ADMIN)
    await register_tiny(env)
    await register_tiny(env, "other")
    good = await create_tenant(env, "fast-acme", allowed_models=["tiny"])
    gone = await create_tenant(env, "fast-gone")
    metered = await create_tenant(env, "fast-metered", quota=pb.Quota(requests_per_second=0.5, request_burst=1))
    await env.stub.RevokeTenant(
        pb.RevokeTenantRequest(name="fast-gone", actor="pytest", reason="test"), metadata=env.auth()
    )
    fast = f"127.0.0.1:{free_ports(1)[0]}"
    [(_, address)] = await auth_routers(env, oip_fast_listen=fast)
    key = {"authorization": f"Bearer {good}"}

    requests_before = sample("maas_tenant_requests_total", tenant="fast-acme", method="ModelInfer")
    answered: list[str] = []

    async def served() -> bool:
        answered.append((await _oip(fast, key))[0])
        return answered[-1] == "OK"

    await until(served, what="the fast path serving tiny")
    on_main_port.clear()  # calls before the fast path had its first snapshot went to the main port
    cases = {
        "no key": (None, "tiny", "StatusCode.UNAUTHENTICATED", "needs an API key"),
        "bad key": ({"authorization": "Bearer maas_not-a-key"}, "tiny", "StatusCode.UNAUTHENTICATED", "is not valid"),
        "not bearer": ({"authorization": f"Basic {good}"}, "tiny", "StatusCode.UNAUTHENTICATED", "Bearer <key>"),
        "revoked key": ({"authorization": f"Bearer {gone}"}, "tiny", "StatusCode.UNAUTHENTICATED", "is revoked"),
        "disallowed model": (key, "other", "StatusCode.PERMISSION_DENIED", "may not call model 'other'"),
    }
    revoked_before = sample("maas_tenant_refusals_total", tenant="fast-gone", reason="revoked")

    def refused(code: str) -> float:  # as the main port counts a refusal: before routing, no model or version
        return sample(
            "maas_rpc_server_requests_total", service="router", method="ModelInfer", model="", version="", code=code
        )

    refused_before = {code: refused(code) for code in ("UNAUTHENTICATED", "PERMISSION_DENIED")}
    for case, (headers, model, code, words) in cases.items():
        on_fast = await _oip(fast, headers, model)
        assert on_fast == await _oip(address, headers, model), case  # one wording, both ports
        assert on_fast[0] == code and words in on_fast[1], (case, on_fast)
    assert not on_main_port, "a refusal went to the main port"
    # The allowed call: Triton's answer, from the fast path itself, counted for the tenant (each port
    # counted one revoked-key refusal above).
    status, y = await _oip(fast, key)
    assert status == "OK" and np.array_equal(y, X * 2)
    assert not on_main_port, "the fast path handed an admitted call to the main port"
    served_calls = answered.count("OK") + 1
    await until(
        lambda: (
            sample("maas_tenant_requests_total", tenant="fast-acme", method="ModelInfer")
            == requests_before + served_calls
            and sample("maas_tenant_refusals_total", tenant="fast-gone", reason="revoked") == revoked_before + 2
        ),
        what="the fast path's calls and refusals in the tenant metrics",
    )
    # ... and in maas_rpc_server_requests_total, by code, once per port (4 key problems, 1 model problem).
    await until(
        lambda: (
            refused("UNAUTHENTICATED") == refused_before["UNAUTHENTICATED"] + 8
            and refused("PERMISSION_DENIED") == refused_before["PERMISSION_DENIED"] + 2
        ),
        what="both ports' refusals in maas_rpc_server_requests_total",
    )
    assert sample("maas_tenant_cost_units_total", tenant="fast-acme", method="ModelInfer") >= 1  # a batch row
    # A tenant with a quota is admitted by the main port (its token buckets): the burst of 1 is served,
    # the next call refused with the retry hint, through the fast path.
    metered_key = {"authorization": f"Bearer {metered}"}
    assert (await _oip(fast, metered_key))[0] == "OK"
    client = triton_aio.InferenceServerClient(fast)
    try:
        inp = InferInput("x", [1, 4], "FP32")
        inp.set_data_from_numpy(X)
        with pytest.raises(InferenceServerException) as refused:
            await client.infer("tiny", [inp], headers=metered_key, client_timeout=10)
    finally:
        await client.close()
    assert refused.value.status() == "StatusCode.RESOURCE_EXHAUSTED", refused.value.message()
    assert "over its request quota" in refused.value.message()
    assert len(on_main_port) == 1  # the metered tenant's served call
    # Revocation: from the RevokeTenant call to the first refusal on the fast path.
    since = time.monotonic()
    await env.stub.RevokeTenant(
        pb.RevokeTenantRequest(name="fast-acme", actor="pytest", reason="test"), metadata=env.auth()
    )
    while (answer := await _oip(fast, key))[0] == "OK":
        assert time.monotonic() - since < 10, "the key still works on the fast path after 10 s"
    delay = time.monotonic() - since
    print(f"revocation effective on the fast path after {delay * 1000:.1f} ms")
    assert answer[0] == "StatusCode.UNAUTHENTICATED" and "'fast-acme' is revoked" in answer[1], answer
    assert delay < 1.0, delay


async def test_revocation_and_rotation_reach_every_router_within_a_second(start_registry, auth_routers):
    env = await start_registry(token=ADMIN)
    await register_tiny(env)
    key = await create_tenant(env, "acme")
    routers = await auth_routers(env, n=2)
    stubs = [_stub(address) for _, address in routers]
    try:
        for _, stub in stubs:
            await _ready(stub, key)

        async def refused_after(stub, key, since: float) -> float:
            while await _code(stub.Infer(infer_request(), metadata=bearer(key), timeout=5)) == grpc.StatusCode.OK:
                assert time.monotonic() - since < 10, "the key still works after 10 s"
            assert (
                await _code(stub.Infer(infer_request(), metadata=bearer(key), timeout=5))
                == grpc.StatusCode.UNAUTHENTICATED
            )
            return time.monotonic() - since

        # Rotation: the old key stops working everywhere, the new one works.
        since = time.monotonic()
        rotated = await env.stub.RotateTenantKey(
            pb.RotateTenantKeyRequest(name="acme", actor="pytest"), metadata=env.auth()
        )
        delays = await asyncio.gather(*(refused_after(stub, key, since) for _, stub in stubs))
        assert max(delays) < 1.0, delays
        for _, stub in stubs:
            await _ready(stub, rotated.api_key)
        # Revocation: measured from the RevokeTenant call to the first refusal at each router.
        since = time.monotonic()
        await env.stub.RevokeTenant(
            pb.RevokeTenantRequest(name="acme", actor="pytest", reason="test"), metadata=env.auth()
        )
        delays = await asyncio.gather(*(refused_after(stub, rotated.api_key, since) for _, stub in stubs))
        print(f"revocation effective at both routers after {max(delays) * 1000:.1f} ms")
        assert max(delays) < 1.0, delays
        audit = await env.stub.ListAudit(pb.ListAuditRequest(target_prefix="tenant/"), metadata=env.auth())
        assert [e.action for e in audit.entries] == ["tenant.revoke", "tenant.rotate_key", "tenant.create"]
    finally:
        for channel, _ in stubs:
            await channel.close()


async def test_a_tenant_at_50_per_second_sending_200_gets_50_served_across_two_routers(start_registry, auth_routers):
    env = await start_registry(token=ADMIN)
    await register_tiny(env)
    key = await create_tenant(env, "acme", quota=pb.Quota(requests_per_second=50, request_burst=10))
    warm = await create_tenant(env, "warm")
    routers = await auth_routers(env, n=2)
    stubs = [_stub(address) for _, address in routers]
    try:
        for _, stub in stubs:
            await _ready(stub, warm)
        rate, seconds = 200, 4.0
        outcomes: list[grpc.StatusCode] = []
        hints: list[str] = []

        async def one(stub) -> None:
            call = stub.Infer(infer_request(), metadata=bearer(key), timeout=10)
            try:
                await call
                outcomes.append(grpc.StatusCode.OK)
            except grpc.aio.AioRpcError as exc:
                outcomes.append(exc.code())
                hints.extend(v for k, v in (exc.trailing_metadata() or ()) if k == "retry-after-ms")

        tasks = []
        start = time.monotonic()
        n = int(rate * seconds)
        for i in range(n):  # paced, spread over both routers like a balancer would
            delay = start + i / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(stubs[i % 2][1])))
        sent_for = time.monotonic() - start
        await asyncio.gather(*tasks)
        served = outcomes.count(grpc.StatusCode.OK)
        refused = outcomes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
        assert served + refused == n, {c: outcomes.count(c) for c in set(outcomes)}
        served_rate = served / sent_for
        print(f"sent {n / sent_for:.0f} req/s for {sent_for:.2f} s: {served_rate:.1f} req/s served, {refused} refused")
        assert n / sent_for > 100, "the client could not send fast enough to test the quota"
        assert 45 <= served_rate <= 55, served_rate
        assert hints and all(int(h) >= 1 for h in hints)
        # The per-tenant metrics the dashboard charts (these routers run in this process: its registry).
        from prometheus_client import REGISTRY

        assert REGISTRY.get_sample_value("maas_tenant_requests_total", {"tenant": "acme", "method": "Infer"}) >= served
        assert (
            REGISTRY.get_sample_value("maas_tenant_refusals_total", {"tenant": "acme", "reason": "rate_limited"})
            >= refused
        )
    finally:
        for channel, _ in stubs:
            await channel.close()


async def test_the_openai_gateway_answers_401_403_and_429_with_retry_after(start_registry, auth_routers):
    import http.client
    import json

    import uvicorn

    from maas.local.processes import free_ports
    from services.openai.config import GatewayConfig
    from services.openai.server import uvicorn_config
    from services.shared.config import ServerSettings

    env = await start_registry(token=ADMIN)
    await register_tiny(env)
    key = await create_tenant(
        env, "acme", allowed_models=["minilm"], quota=pb.Quota(requests_per_second=0.5, request_burst=1)
    )
    [(_, address)] = await auth_routers(env)
    port = free_ports(1)[0]
    config = GatewayConfig(
        server=ServerSettings(service_name="openai", listen=f"127.0.0.1:{port}", grace_seconds=1),
        router=address,
        registry=env.address,
        default_timeout=10,
    )
    server = uvicorn.Server(uvicorn_config(config))
    serving = asyncio.create_task(server.serve())

    def post(body: dict, key: str | None = None) -> tuple[int, dict, dict]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
            conn.request("POST", "/v1/embeddings", json.dumps(body), headers)
            answer = conn.getresponse()
            return answer.status, json.loads(answer.read()), {k.lower(): v for k, v in answer.getheaders()}
        finally:
            conn.close()

    async def call(body: dict, key: str | None = None):
        return await asyncio.to_thread(post, body, key)  # the gateway and the router run on this loop

    try:
        await until(lambda: server.started, what="the gateway listening")
        body = {"model": "minilm", "input": ["hi"]}
        status, answer, _ = await call(body)
        assert status == 401 and "needs an API key" in answer["error"]["message"], answer
        status, answer, _ = await call(body, "maas_nope")
        assert status == 401 and answer["error"]["type"] == "authentication_error", answer
        status, answer, _ = await call({**body, "model": "tiny"}, key)
        assert status == 403 and "may not call model 'tiny'" in answer["error"]["message"], answer
        # Admitted (minilm is not registered here: 404, after admission), then over the quota of 0.5/s
        # with a burst of 1: 429.
        status, answer, _ = await call(body, key)
        assert status == 404 and "'minilm' is not registered" in answer["error"]["message"], answer
        status, answer, headers = await call(body, key)
        assert status == 429 and "over its request quota" in answer["error"]["message"], answer
        assert int(headers["retry-after"]) >= 1 and int(headers["retry-after-ms"]) >= 1, headers
    finally:
        server.should_exit = True
        await serving


async def test_the_console_playground_sends_the_api_key_the_user_entered(start_registry, auth_routers):
    """The web console's playground against a router with auth on: refused without a key (the router's
    401 words), then the key entered on the page is kept as a session cookie the page's scripts cannot
    read and sent with each call (the router names its tenant), until it is forgotten."""
    import http.client
    import urllib.parse

    import uvicorn

    from maas.local.processes import free_ports
    from services.console.config import ConsoleConfig
    from services.console.server import uvicorn_config
    from services.shared.config import ServerSettings

    env = await start_registry(token=ADMIN)
    await register_tiny(env)
    key = await create_tenant(env, "console-acme", allowed_models=["tiny"])
    [(_, address)] = await auth_routers(env)
    port = free_ports(1)[0]
    config = ConsoleConfig(
        server=ServerSettings(service_name="console", listen=f"127.0.0.1:{port}", grace_seconds=1),
        router=address,
        registry=env.address,
        default_timeout=10,
    )
    server = uvicorn.Server(uvicorn_config(config))
    serving = asyncio.create_task(server.serve())
    cookies: dict[str, str] = {}

    def post(path: str, form: dict) -> tuple[int, str, list[str]]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        try:
            headers = {"Content-Type": "application/x-www-form-urlencoded", "X-Console-Fragment": "1"}
            if cookies:
                headers["Cookie"] = "; ".join(f"{k}={v}" for k, v in cookies.items())
            conn.request("POST", path, urllib.parse.urlencode(form), headers)
            answer = conn.getresponse()
            set_cookies = [v for k, v in answer.getheaders() if k.lower() == "set-cookie"]
            for line in set_cookies:  # the browser's part, for the one path these requests use
                name, _, rest = line.partition("=")
                value = rest.split(";", 1)[0].strip('"')
                if "Max-Age=0" in line or not value:
                    cookies.pop(name, None)
                else:
                    cookies[name] = value
            return answer.status, answer.read().decode(), set_cookies
        finally:
            conn.close()

    async def call(path: str, form: dict):
        return await asyncio.to_thread(post, path, form)  # the console and the router run on this loop

    try:
        await until(lambda: server.started, what="the console listening")
        embed = {"model": "other", "texts": "hello"}
        status, body, _ = await call("/playground/embed", embed)
        assert status == 401 and "needs an API key" in body, body
        status, _, set_cookies = await call("/playground/key", {"api_key": f"  {key} "})
        assert status == 303
        [cookie] = set_cookies
        attributes = {part.strip().lower() for part in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/playground"} <= attributes, cookie
        assert not {a.split("=")[0] for a in attributes} & {"expires", "max-age"}, cookie  # the browser session only
        assert cookies == {"maas_console_api_key": key}  # stripped
        # The router got the key: it names the tenant, which may not call 'other' ...
        status, body, _ = await call("/playground/embed", embed)
        assert status == 403 and "tenant &#39;console-acme&#39; may not call model &#39;other&#39;" in body, body
        # ... and admits its call of 'tiny' (which then fails for want of a tokenizer here: not a key problem).
        for path, form in (
            ("/playground/embed", {"model": "tiny", "texts": "hello"}),
            ("/playground/chat", {"model": "tiny", "message": "hi"}),
        ):
            status, body, _ = await call(path, form)
            assert status not in (401, 403) and "API key" not in body, (path, status, body)
        status, _, _ = await call("/playground/key", {"forget": "1"})
        assert status == 303 and not cookies
        status, body, _ = await call("/playground/embed", embed)
        assert status == 401 and "needs an API key" in body, body
    finally:
        server.should_exit = True
        await serving
