"""Text generation through the real mesh (Triton's decoupled smollm2, registry, tokenizer, router):
Router.Generate / GenerateUnary and OIP ModelStreamInfer against the same engine in-process, stop
sequences, max_tokens, a canary between the two versions, cancellation and bad input."""

from __future__ import annotations

import queue
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import tritonclient.grpc as tg
from tritonclient.grpc import service_pb2, service_pb2_grpc

from maas.registry_client import parse_target
from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2, tokenizer_pb2, tokenizer_pb2_grpc
from tests.integration.test_generation_model import engine_greedy

QUESTION = "What is the capital of France?"
TOKENS = 12


@pytest.fixture(scope="module")
def router(mesh):
    with grpc.insecure_channel(mesh.router_address) as channel:
        yield router_pb2_grpc.RouterStub(channel)


@pytest.fixture(scope="module")
def chat_ids(mesh):
    """The prompt ids the mesh builds for a chat (the tokenizer service's template)."""

    def ids(content: str) -> list[int]:
        with grpc.insecure_channel(mesh.addresses["tokenizer"]) as channel:
            response = tokenizer_pb2_grpc.TokenizerStub(channel).ApplyChatTemplate(
                tokenizer_pb2.ChatTemplateRequest(
                    tokenizer="smollm2", messages=[tokenizer_pb2.TemplateMessage(role="user", content=content)]
                ),
                timeout=30,
            )
        return list(response.input_ids)

    return ids


def request(content: str = QUESTION, version: int = 0, routing_key: str = "", **sampling) -> router_pb2.GenerateRequest:
    ref = tensor_pb2.ModelRef(name=sampling.pop("model", "smollm2"), routing_key=routing_key)
    if version:
        ref.version = version
    return router_pb2.GenerateRequest(
        model=ref,
        messages=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content=content)]),
        sampling=router_pb2.SamplingParams(**sampling),
    )


def quick(routing_key: str = "") -> router_pb2.GenerateRequest:
    """One token from a one-token prompt: the cheapest whole generation (routing tests)."""
    return router_pb2.GenerateRequest(
        model=tensor_pb2.ModelRef(name="smollm2", routing_key=routing_key),
        prompt="Hi",
        sampling=router_pb2.SamplingParams(max_tokens=1),
    )


def metric(mesh, name: str) -> float:
    with urllib.request.urlopen(f"http://{mesh.addresses['router_metrics']}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    return sum(float(line.split()[-1]) for line in lines if line.startswith(name + " ") or line.startswith(name + "{"))


def test_greedy_through_the_mesh_is_the_engine_in_process(mesh, router, chat_ids):
    ids = chat_ids(QUESTION)
    expected = {v: engine_greedy(v, ids, TOKENS) for v in ("1", "2")}
    assert len(expected["2"]) == TOKENS and 2 not in expected["2"]  # no early end: 12 tokens to compare

    stream = list(router.Generate(request(max_tokens=TOKENS), timeout=120))
    assert stream[0].routed.version == 2 and stream[0].routed.target == "production"  # v2 (int4) by default
    assert [t for m in stream for t in m.token_ids] == expected["2"]
    assert stream[-1].finish_reason == router_pb2.FINISH_REASON_LENGTH
    assert (stream[-1].usage.prompt_tokens, stream[-1].usage.completion_tokens) == (len(ids), TOKENS)

    unary = router.GenerateUnary(request(max_tokens=TOKENS), timeout=120)
    assert list(unary.token_ids) == expected["2"]
    assert unary.text == "".join(m.text for m in stream) and "Paris" in unary.text
    fp32 = router.GenerateUnary(request(version=1, max_tokens=TOKENS), timeout=120)
    assert fp32.routed.version == 1 and list(fp32.token_ids) == expected["1"]

    # An unmodified tritonclient stream against the router: the decoupled model's responses, routed.
    responses: queue.Queue = queue.Queue()
    client = tg.InferenceServerClient(mesh.router_address)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        for version in ("", "1"):
            inputs = [tg.InferInput("input_ids", [len(ids)], "INT64"), tg.InferInput("max_tokens", [1], "INT32")]
            inputs[0].set_data_from_numpy(np.asarray(ids, np.int64))
            inputs[1].set_data_from_numpy(np.asarray([TOKENS], np.int32))
            client.async_stream_infer("smollm2", inputs, model_version=version, request_id=version or "policy")
            got, served = [], set()
            while True:
                result, error = responses.get(timeout=120)
                assert error is None, error
                got += result.as_numpy("output_ids").tolist()
                served.add(result.get_response().model_version)
                if result.as_numpy("finish_reason")[0]:
                    break
            assert got == expected[version or "2"] and served == {version or "2"}
    finally:
        client.stop_stream()
        client.close()


def test_plain_prompt_uses_no_chat_template(router):
    from tests.integration.test_generation_model import MODEL
    from tokenizers import Tokenizer

    prompt = "The capital of France is"
    ids = Tokenizer.from_file(str(MODEL / "tokenizer.json")).encode(prompt).ids
    unary = router.GenerateUnary(
        router_pb2.GenerateRequest(
            model=tensor_pb2.ModelRef(name="smollm2"), prompt=prompt, sampling=router_pb2.SamplingParams(max_tokens=6)
        ),
        timeout=120,
    )
    assert unary.usage.prompt_tokens == len(ids)
    assert list(unary.token_ids) == [t for t in engine_greedy("2", ids, 6) if t != 2]


def test_stop_sequences_and_max_tokens_are_honoured(router):
    whole = router.GenerateUnary(request(max_tokens=16), timeout=120).text
    stop = " Paris"
    assert stop in whole
    cut = router.GenerateUnary(request(max_tokens=16, stop=["no such text", stop]), timeout=120)
    assert cut.text == whole[: whole.index(stop)] and cut.finish_reason == router_pb2.FINISH_REASON_STOP
    streamed = list(router.Generate(request(max_tokens=16, stop=[stop]), timeout=120))
    assert "".join(m.text for m in streamed) == cut.text and stop.strip() not in "".join(m.text for m in streamed)
    short = router.GenerateUnary(request(max_tokens=3), timeout=120)
    assert len(short.token_ids) == short.usage.completion_tokens == 3
    assert short.finish_reason == router_pb2.FINISH_REASON_LENGTH and whole.startswith(short.text)


def test_canary_sticky_keys_and_rollback_between_two_generation_versions(mesh, mesh_registry, router):
    mesh_registry.set_traffic("smollm2", [parse_target("production", 90), parse_target("1", 10)], reason="canary")
    try:
        deadline = time.monotonic() + 20
        while router.GenerateUnary(quick(), timeout=60).routed.kind != tensor_pb2.ROUTE_KIND_TRAFFIC_POLICY:
            assert time.monotonic() < deadline, "the router never applied the canary policy"
        with ThreadPoolExecutor(8) as pool:
            versions = Counter(
                pool.map(lambda _: router.GenerateUnary(quick(), timeout=120).routed.version, range(400))
            )
            assert set(versions) == {1, 2}
            assert 0.07 <= versions[1] / 400 <= 0.13, versions
            print(f"canary share of v1 over 400 requests: {versions[1] / 400:.3f}")
            keyed = list(
                pool.map(
                    lambda i: (
                        f"user-{i % 10}",
                        router.GenerateUnary(quick(f"user-{i % 10}"), timeout=120).routed.version,
                    ),
                    range(40),
                )
            )
        per_key: dict[str, set[int]] = {}
        for key, version in keyed:
            per_key.setdefault(key, set()).add(version)
        assert all(len(seen) == 1 for seen in per_key.values()), per_key
    finally:
        mesh_registry.set_traffic("smollm2", [], reason="end of the canary test")

    def default_route(version: int) -> None:
        deadline = time.monotonic() + 20
        while True:
            routed = router.GenerateUnary(quick(), timeout=60).routed
            if (routed.kind, routed.target, routed.version) == (tensor_pb2.ROUTE_KIND_DEFAULT, "production", version):
                return
            assert time.monotonic() < deadline, f"production never answered with v{version}: {routed}"

    mesh_registry.set_alias("smollm2", "production", 1, reason="try fp32")
    default_route(1)
    mesh_registry.rollback("smollm2", reason="back to int4")
    default_route(2)


def test_cancel_mid_stream_reaches_the_model_and_frees_its_slot(mesh, router):
    stats = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(mesh.router_address))

    def finished_requests() -> int:
        response = stats.ModelStatistics(service_pb2.ModelStatisticsRequest(name="smollm2", version="2"), timeout=10)
        return sum(s.inference_stats.success.count + s.inference_stats.fail.count for s in response.model_stats)

    before = finished_requests()
    log_before = mesh.triton.log_path.read_text().count("generation cancelled after")
    call = router.Generate(request("Tell me a very long story about dragons.", max_tokens=1000), timeout=300)
    pieces = [next(call) for _ in range(3)]
    assert pieces[0].routed.version == 2
    call.cancel()
    # Triton cancelled the request in the model, which stopped decoding well before its 1000 tokens
    # and released the request (Triton's statistics count it).
    deadline = time.monotonic() + 60
    while mesh.triton.log_path.read_text().count("generation cancelled after") == log_before:
        assert time.monotonic() < deadline, "the model never saw the cancellation"
        time.sleep(0.1)
    line = [ln for ln in mesh.triton.log_path.read_text().splitlines() if "generation cancelled after" in ln][-1]
    assert int(line.split("generation cancelled after ")[1].split()[0]) < 1000
    while finished_requests() == before:
        assert time.monotonic() < deadline, "Triton's statistics never showed the cancelled request released"
        time.sleep(0.1)
    # A deadline does the same: the caller gets DEADLINE_EXCEEDED and the model stops decoding.
    cancelled = mesh.triton.log_path.read_text().count("generation cancelled after")
    with pytest.raises(grpc.RpcError) as late:
        router.GenerateUnary(request("Tell me a very long story about dragons.", max_tokens=1000), timeout=1.5)
    assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    while mesh.triton.log_path.read_text().count("generation cancelled after") == cancelled:
        assert time.monotonic() < deadline + 30, "the model never saw the deadline"
        time.sleep(0.1)
    # The next request starts and completes; no stream is left open on the router.
    assert router.GenerateUnary(request(max_tokens=4), timeout=120).usage.completion_tokens == 4
    while metric(mesh, "maas_router_inflight_streams") != 0:
        assert time.monotonic() < deadline, "the router still counts a stream in flight"
        time.sleep(0.1)
    assert metric(mesh, "maas_router_generated_tokens_total") > 0


def test_64_concurrent_streams_with_disconnects_leave_the_mesh_serving(mesh, router):
    """More streams than the model's sequence slots (16), a quarter of them dropped mid-stream."""

    def one(i: int) -> int:
        call = router.Generate(
            router_pb2.GenerateRequest(
                model=tensor_pb2.ModelRef(name="smollm2"),
                prompt=f"Count to {i}:",
                sampling=router_pb2.SamplingParams(max_tokens=1 if i % 4 else 200),
            ),
            timeout=300,
        )
        if i % 4 == 0:  # disconnects after its first piece
            next(call)
            call.cancel()
            return -1
        return sum(len(m.token_ids) for m in call)

    with ThreadPoolExecutor(64) as pool:
        done = list(pool.map(one, range(64)))
    assert done.count(-1) == 16 and all(n <= 1 for n in done if n != -1)  # max_tokens=1 held
    deadline = time.monotonic() + 60
    while metric(mesh, "maas_router_inflight_streams") != 0:
        assert time.monotonic() < deadline, "a stream is still counted in flight"
        time.sleep(0.1)
    # Every slot is free again: 16 sequences at once all complete.
    with ThreadPoolExecutor(16) as pool:
        assert all(
            pool.map(
                lambda i: router.GenerateUnary(quick(f"after-{i}"), timeout=120).usage.completion_tokens == 1, range(16)
            )
        )


@pytest.mark.parametrize(
    "bad, code, names",
    [
        (request(model="no_such_model"), grpc.StatusCode.NOT_FOUND, "no_such_model"),
        (request(model="minilm"), grpc.StatusCode.INVALID_ARGUMENT, "minilm"),
        (request(max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (request(temperature=-1.0), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (request(top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (request(top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (request(repetition_penalty=0.0), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
        (request(""), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content"),
        (request("hello " * 9000, max_tokens=8), grpc.StatusCode.INVALID_ARGUMENT, "context"),
        (
            router_pb2.GenerateRequest(
                model=tensor_pb2.ModelRef(name="smollm2"),
                messages=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="robot", content="hi")]),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "role",
        ),
        (
            router_pb2.GenerateRequest(model=tensor_pb2.ModelRef(name="smollm2")),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt or messages",
        ),
    ],
)
def test_bad_input_gets_its_code_naming_the_field(router, bad, code, names):
    for call in (lambda: router.GenerateUnary(bad, timeout=60), lambda: list(router.Generate(bad, timeout=60))):
        with pytest.raises(grpc.RpcError) as failed:
            call()
        assert failed.value.code() == code and names in failed.value.details(), failed.value.details()


def test_one_shot_calls_on_the_generation_model_point_at_the_stream(mesh, router):
    with pytest.raises(grpc.RpcError) as failed:
        router.Infer(router_pb2.InferRequest(model=tensor_pb2.ModelRef(name="smollm2"), texts=["hi"]), timeout=30)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Generate" in failed.value.details()
    inputs = [tg.InferInput("input_ids", [2], "INT64")]
    inputs[0].set_data_from_numpy(np.asarray([1, 2], np.int64))
    with tg.InferenceServerClient(mesh.router_address) as client, pytest.raises(Exception, match="ModelStreamInfer"):
        client.infer("smollm2", inputs)
