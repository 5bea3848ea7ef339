"""Shadow agreement for generation through the real mesh (Triton's smollm2 int4 v2 in production, fp32 v1
shadowed): the router mirrors each completed generation with the same prompt ids and parameters, compares
the token ids, and the registry's report (exact-token and prefix agreement, histogram, worst requests)
matches a direct computation on the same requests; `maas models compare` prints it (a real subprocess)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import grpc
import numpy as np
import pytest

from maas.registry_client import parse_target
from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2
from services.registry.shadow_report import PREFIX_BOUNDS, bucket
from tests.fixtures.mesh import REPO

MAAS = [sys.executable, "-c", "from maas.cli import main; main()"]
PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "def fibonacci(n):",
    "The three primary colours are",
    "Water boils at",
    "My favourite animal is",
]
TOKENS = 8


@pytest.fixture(scope="module")
def router(mesh):
    with grpc.insecure_channel(mesh.router_address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


def generate(router, prompt: str, version: int = 0) -> router_pb2.GenerateResponse:
    ref = tensor_pb2.ModelRef(name="smollm2")
    if version:
        ref.version = version
    return router.GenerateUnary(
        router_pb2.GenerateRequest(
            model=ref, prompt=prompt, sampling=router_pb2.SamplingParams(max_tokens=TOKENS, temperature=0.0)
        ),
        timeout=120,
    )


def prefix_share(a: list[int], b: list[int]) -> float:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n / max(len(a), len(b)) if max(len(a), len(b)) else 1.0


def test_generation_shadow_report_matches_a_direct_computation(mesh, mesh_registry):
    with grpc.insecure_channel(mesh.router_address) as channel:
        router = router_pb2_grpc.RouterStub(channel)
        production = mesh_registry.get_model("smollm2")
        primary = next(a.version for a in production.aliases if a.name == "production")
        shadow = 1 if primary != 1 else 2
        mesh_registry.set_traffic("smollm2", [], shadow=parse_target(str(shadow)), shadow_fraction=1.0)
        try:
            answers: list[list[int]] = []
            deadline = time.monotonic() + 60
            while len(answers) < len(PROMPTS):
                assert time.monotonic() < deadline, "the shadow policy never reached the router"
                prompt = PROMPTS[len(answers)]
                response = generate(router, prompt)
                assert response.routed.version == primary
                if response.routed.shadowed:
                    answers.append(list(response.token_ids))

            def report():
                try:
                    r = mesh_registry.compare("smollm2", primary, shadow)
                except Exception:  # noqa: BLE001 - NOT_FOUND until the first report
                    return None
                return r if r.samples >= len(PROMPTS) else None

            deadline = time.monotonic() + 120
            while (r := report()) is None:
                assert time.monotonic() < deadline, "generation shadow results never reached the registry"
                time.sleep(0.5)
        finally:
            mesh_registry.set_traffic("smollm2", [], reason="end of the generation shadow test")

        # Direct computation: the same prompts, greedy, pinned to the shadow version (no shadow copy then).
        pinned = [generate(router, prompt, version=shadow) for prompt in PROMPTS]
        assert all(p.routed.version == shadow and not p.routed.shadowed for p in pinned)
    theirs = [list(p.token_ids) for p in pinned]
    shares = [prefix_share(a, b) for a, b in zip(answers, theirs)]
    exact = [a == b for a, b in zip(answers, theirs)]
    print(f"smollm2 v{shadow} against v{primary}: exact {np.mean(exact):.3f}, prefix {np.mean(shares):.3f}")
    assert (r.kind, r.samples, r.items) == ("generation", len(PROMPTS), len(PROMPTS))
    assert abs(r.exact_agreement - np.mean(exact)) < 1e-9 and abs(r.prefix_agreement - np.mean(shares)) < 1e-6
    assert r.agreement == r.prefix_agreement  # the figure min_shadow_agreement gates on
    expected = np.bincount([bucket(s, PREFIX_BOUNDS) for s in shares], minlength=len(PREFIX_BOUNDS))
    assert list(r.cosine_bounds) == list(PREFIX_BOUNDS) and list(r.cosine_counts) == expected.tolist()
    np.testing.assert_allclose([w.score for w in r.worst], sorted(shares)[: len(r.worst)], rtol=1e-6)
    assert len(r.worst) == 5 and all(len(w.request_id) == 32 and w.items == 1 for w in r.worst)

    env = {**os.environ, "MAAS_REGISTRY_ADDRESS": mesh.registry_address}
    out = subprocess.run(
        [*MAAS, "models", "compare", "smollm2", str(primary), str(shadow)],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "exact-token agreement" in out.stdout and "prefix agreement" in out.stdout
    assert r.worst[0].request_id in out.stdout


def stream_generate(address: str, prompts: list[list[int]], version: str = "", ids: tuple[str, ...] = ()) -> list:
    """Greedy generations over one tritonclient stream against the router, one after the other (int4 rows
    in a batch need not equal the same prompt alone): [(token ids, request ids responses carried, version)]."""
    import queue

    import tritonclient.grpc as tg

    responses: queue.Queue = queue.Queue()
    client = tg.InferenceServerClient(address)
    results = []
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        for prompt, request_id in zip(prompts, ids or [str(i) for i in range(len(prompts))]):
            inputs = [tg.InferInput("input_ids", [len(prompt)], "INT64"), tg.InferInput("max_tokens", [1], "INT32")]
            inputs[0].set_data_from_numpy(np.asarray(prompt, np.int64))
            inputs[1].set_data_from_numpy(np.asarray([TOKENS], np.int32))
            client.async_stream_infer("smollm2", inputs, model_version=version, request_id=request_id)
            tokens, seen, served = [], set(), set()
            while True:
                result, error = responses.get(timeout=120)
                assert error is None, error
                tokens += result.as_numpy("output_ids").tolist()
                seen.add(result.get_response().id)
                served.add(result.get_response().model_version)
                if result.as_numpy("finish_reason")[0]:
                    break
            results.append((tokens, seen, served))
    finally:
        client.stop_stream()
        client.close()
    return results


def test_oip_stream_generations_are_shadowed_like_generate(mesh, mesh_registry):
    """tritonclient's stream API against the router: each completed generation of the production version
    is mirrored to the shadow version, and the registry's figures move by exactly those comparisons; the
    caller's responses keep the caller's request ids (the router forwards a shadowed request under its
    own id, since callers often leave theirs empty, tritonclient's default)."""
    from tests.integration.test_generation_model import MODEL
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    prompts = [tokenizer.encode(p).ids for p in PROMPTS[:3]]
    production = mesh_registry.get_model("smollm2")
    primary = next(a.version for a in production.aliases if a.name == "production")
    shadow = 1 if primary != 1 else 2

    def samples() -> tuple[int, float, float]:
        try:
            r = mesh_registry.compare("smollm2", primary, shadow)
        except Exception:  # noqa: BLE001 - NOT_FOUND before any report
            return 0, 0.0, 0.0
        return r.samples, r.exact_agreement, r.prefix_agreement

    def wait_samples(count: int, what: str) -> None:
        deadline = time.monotonic() + 120
        while samples()[0] < count:
            assert time.monotonic() < deadline, f"{what} never reached the registry"
            time.sleep(0.5)

    mesh_registry.set_traffic("smollm2", [], shadow=parse_target(str(shadow)), shadow_fraction=1.0)
    try:
        with grpc.insecure_channel(mesh.router_address) as channel:
            router = router_pb2_grpc.RouterStub(channel)
            deadline = time.monotonic() + 60
            first = samples()[0]
            while not generate(router, PROMPTS[0]).routed.shadowed:  # the policy has reached the router
                assert time.monotonic() < deadline, "the shadow policy never reached the router"
            wait_samples(first + 1, "the Generate call's shadow result")
        before = samples()
        got = stream_generate(mesh.router_address, prompts, ids=("", "mine", ""))
        wait_samples(before[0] + len(prompts), "the OIP stream's shadow results")
    finally:
        mesh_registry.set_traffic("smollm2", [], reason="end of the OIP stream shadow test")
    after = samples()
    assert after[0] == before[0] + len(prompts)
    assert [seen for _, seen, _ in got] == [{""}, {"mine"}, {""}]  # the caller's ids, not the router's
    assert all(served == {str(primary)} for _, _, served in got)

    # Direct computation: the same prompts pinned to the shadow version (a pinned call gets no copy).
    theirs = stream_generate(mesh.router_address, prompts, version=str(shadow))
    shares = [prefix_share(a, b) for (a, _, _), (b, _, _) in zip(got, theirs)]
    exact = [a == b for (a, _, _), (b, _, _) in zip(got, theirs)]
    n0, n1 = before[0], after[0]
    assert abs(after[1] * n1 - (before[1] * n0 + sum(exact))) < 1e-6
    assert abs(after[2] * n1 - (before[2] * n0 + sum(shares))) < 1e-5
