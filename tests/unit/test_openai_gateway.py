"""The OpenAI gateway's HTTP layer against a scripted in-process router (tests/fixtures/fake_router.py):
the official `openai` client unmodified, raw HTTP for the wire format, errors, limits and disconnects."""

from __future__ import annotations

import base64
import http.client
import json
import time
from urllib.parse import urlparse

import numpy as np
import openai
import pytest
from grpc_health.v1 import health_pb2
from prometheus_client import REGISTRY


def client(gw, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0, **kw)


def raw(gw, method: str, path: str, body=None, headers=None) -> tuple[int, dict | str]:
    url = urlparse(gw.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
        conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read().decode()
        try:
            return response.status, json.loads(text)
        except json.JSONDecodeError:
            return response.status, text
    finally:
        conn.close()


def sse_events(text: str) -> list[str]:
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


def test_chat_unary_maps_fields_and_answers_like_openai(openai_gateway):
    answer = client(openai_gateway).chat.completions.create(
        model="smollm2",
        messages=CHAT,
        max_completion_tokens=10,
        temperature=0.5,
        top_p=0.9,
        seed=7,
        stop=["zzz", "yyy"],
        user="user-42",
        extra_body={"top_k": 40, "repetition_penalty": 1.1},
    )
    assert answer.choices[0].message.content == "echo: hello there"
    assert answer.choices[0].message.role == "assistant" and answer.choices[0].finish_reason == "stop"
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")
    assert answer.model == "smollm2:2" and answer.model_extra["routed"]["kind"] == "default"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (7, 3, 10)
    sent = openai_gateway.router.requests[-1]
    assert [(m.role, m.content) for m in sent.messages.messages] == [("system", "be brief"), ("user", "hello there")]
    s = sent.sampling
    assert (s.max_tokens, s.top_k, s.seed, list(s.stop)) == (10, 40, 7, ["zzz", "yyy"])
    assert (round(s.temperature, 3), round(s.top_p, 3), round(s.repetition_penalty, 3)) == (0.5, 0.9, 1.1)
    assert sent.model.name == "smollm2" and sent.model.routing_key == "user-42"


def test_unset_sampling_fields_stay_unset(openai_gateway):
    client(openai_gateway).chat.completions.create(model="smollm2", messages=CHAT, max_tokens=5)
    s = openai_gateway.router.requests[-1].sampling
    assert s.max_tokens == 5 and not any(s.HasField(f) for f in ("temperature", "top_p", "seed", "repetition_penalty"))


@pytest.mark.parametrize(
    "model, field, value",
    [("smollm2:1", "version", 1), ("smollm2:canary", "alias", "canary"), ("smollm2", None, None), ("", None, None)],
)
def test_model_names_version_or_alias(openai_gateway, model, field, value):
    status, body = raw(openai_gateway, "POST", "/v1/chat/completions", {"model": model, "messages": CHAT})
    assert status == 200, body
    ref = openai_gateway.router.requests[-1].model
    assert ref.name == "smollm2" and ref.WhichOneof("selector") == field
    if field:
        assert getattr(ref, field) == value


def test_chat_stream_is_openai_sse_and_equals_unary(openai_gateway):
    api = client(openai_gateway)
    unary = api.chat.completions.create(model="smollm2", messages=CHAT).choices[0].message.content
    chunks = list(
        api.chat.completions.create(model="smollm2", messages=CHAT, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == unary
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) == 3  # one per piece
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3
    assert len({c.id for c in chunks}) == 1 and all(c.model == "smollm2:2" for c in chunks)

    status, text = raw(
        openai_gateway, "POST", "/v1/chat/completions", {"model": "smollm2", "messages": CHAT, "stream": True}
    )
    events = sse_events(text)
    assert status == 200 and events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])  # only with include_usage
    assert json.loads(events[-2])["choices"][0] == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}


def test_max_tokens_and_stop_reach_the_answer(openai_gateway):
    api = client(openai_gateway)
    cut = api.chat.completions.create(
        model="smollm2", messages=[{"role": "user", "content": "a b c d e"}], max_tokens=2
    )
    assert cut.choices[0].message.content == "echo: a" and cut.choices[0].finish_reason == "length"
    stopped = api.completions.create(model="smollm2", prompt="one two three", stop=" two")
    assert stopped.choices[0].text == "echo: one" and stopped.object == "text_completion"
    assert openai_gateway.router.requests[-1].prompt == "one two three"


def test_completions_stream(openai_gateway):
    chunks = list(client(openai_gateway).completions.create(model="smollm2:1", prompt="x y", stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "echo: x y"
    assert chunks[-1].choices[0].finish_reason == "stop" and chunks[0].model == "smollm2:1"


def test_content_parts_and_developer_role(openai_gateway):
    status, _ = raw(
        openai_gateway,
        "POST",
        "/v1/chat/completions",
        {
            "messages": [
                {"role": "developer", "content": "rules"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "part one, "}, {"type": "text", "text": "part two"}],
                },
            ]
        },
    )
    assert status == 200
    sent = openai_gateway.router.requests[-1].messages.messages
    assert [(m.role, m.content) for m in sent] == [("system", "rules"), ("user", "part one, part two")]


def test_embeddings_float_and_base64(openai_gateway):
    api = client(openai_gateway)
    default = api.embeddings.create(model="minilm", input=["ab", "abcd"])  # the client asks for base64
    assert [d.embedding for d in default.data] == [[2.0, 0.5, -0.25, 0.0], [4.0, 0.5, -0.25, 0.0]]
    assert default.model == "minilm:2" and openai_gateway.router.requests[-1].texts == ["ab", "abcd"]
    status, body = raw(openai_gateway, "POST", "/v1/embeddings", {"input": "abc", "encoding_format": "base64"})
    assert status == 200 and openai_gateway.router.requests[-1].model.name == "minilm"  # the default model
    assert np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), "<f4").tolist() == [3.0, 0.5, -0.25, 0.0]
    status, body = raw(openai_gateway, "POST", "/v1/embeddings", {"input": "abc", "dimensions": 8})
    assert status == 400 and body["error"]["param"] == "dimensions"


@pytest.mark.parametrize(
    "code, status, error_class",
    [
        ("INVALID_ARGUMENT", 400, openai.BadRequestError),
        ("FAILED_PRECONDITION", 400, openai.BadRequestError),
        ("UNAUTHENTICATED", 401, openai.AuthenticationError),
        ("PERMISSION_DENIED", 403, openai.PermissionDeniedError),
        ("NOT_FOUND", 404, openai.NotFoundError),
        ("RESOURCE_EXHAUSTED", 429, openai.RateLimitError),
        ("UNAVAILABLE", 503, openai.InternalServerError),
        ("DEADLINE_EXCEEDED", 504, openai.InternalServerError),
        ("INTERNAL", 500, openai.InternalServerError),
    ],
)
def test_router_status_becomes_matching_http_status(openai_gateway, code, status, error_class):
    for stream in (False, True):  # a stream that fails before its first message is a plain error answer
        with pytest.raises(error_class) as caught:
            client(openai_gateway).chat.completions.create(model=f"code-{code.lower()}", messages=CHAT, stream=stream)
        assert caught.value.status_code == status
        assert caught.value.body == {
            "message": f"scripted code-{code.lower()}",
            "type": caught.value.body["type"],
            "param": None,
            "code": code.lower(),
        }
    with pytest.raises(error_class):
        client(openai_gateway).embeddings.create(model=f"code-{code.lower()}", input="x")


def test_unknown_model_is_404_naming_model(openai_gateway):
    with pytest.raises(openai.NotFoundError) as caught:
        client(openai_gateway).chat.completions.create(model="missing", messages=CHAT)
    assert caught.value.body["param"] == "model" and "missing" in caught.value.body["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": CHAT, "temperature": "hot"}, "temperature"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": CHAT, "max_tokens": 0}, "max_tokens"),
        ({"messages": CHAT, "max_completion_tokens": -3}, "max_completion_tokens"),
        ({"messages": CHAT, "seed": -1}, "seed"),
        ({"messages": CHAT, "n": 2}, "n"),
        ({"messages": CHAT, "stop": 5}, "stop"),
        ({"messages": CHAT, "tools": [{"type": "function"}]}, "tools"),
        ({"messages": CHAT, "response_format": {"type": "json_object"}}, "response_format"),
        ({"messages": CHAT, "model": "smollm2:"}, "model"),
        ({"messages": CHAT, "model": ":3"}, "model"),
    ],
)
def test_bad_chat_input_is_400_naming_the_field(openai_gateway, body, param):
    before = len(openai_gateway.router.requests)
    status, answer = raw(openai_gateway, "POST", "/v1/chat/completions", body)
    assert status == 400, answer
    assert answer["error"]["param"] == param and answer["error"]["type"] == "invalid_request_error"
    assert param.split("[")[0] in answer["error"]["message"]
    assert len(openai_gateway.router.requests) == before  # refused before the router


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/completions", {"prompt": [1, 2, 3]}, "prompt"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "prompt"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/completions", {"prompt": "x", "echo": True}, "echo"),
        ("/v1/embeddings", {"input": [[1, 2]]}, "input"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ],
)
def test_bad_completion_and_embedding_input(openai_gateway, path, body, param):
    status, answer = raw(openai_gateway, "POST", path, body)
    assert status == 400 and answer["error"]["param"] == param, answer


def test_malformed_json_and_unknown_route(openai_gateway):
    status, answer = raw(openai_gateway, "POST", "/v1/chat/completions", "{not json")
    assert status == 400 and "JSON" in answer["error"]["message"]
    status, answer = raw(openai_gateway, "GET", "/v1/nothing")
    assert status == 404 and answer["error"]["type"] == "not_found_error"


def test_error_mid_stream_is_an_error_event(openai_gateway):
    stream = client(openai_gateway).chat.completions.create(model="midfail", messages=CHAT, stream=True)
    seen = []
    with pytest.raises(openai.APIError) as caught:
        for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "echo:", " hello"] and "Triton went away" in str(caught.value)
    status, text = raw(
        openai_gateway, "POST", "/v1/chat/completions", {"model": "midfail", "messages": CHAT, "stream": True}
    )
    events = sse_events(text)
    assert json.loads(events[-1])["error"]["code"] == "unavailable" and "[DONE]" not in events


def test_client_disconnect_mid_stream_cancels_the_router_call(openai_gateway):
    router = openai_gateway.router
    router.cancelled.clear()
    router.slow_started.clear()
    url = urlparse(openai_gateway.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "slow", "messages": CHAT, "stream": True}),
        {"Content-Type": "application/json"},
    )
    response = conn.getresponse()
    assert response.status == 200 and b"thinking" not in response.read1()  # the role chunk
    assert router.slow_started.wait(10)
    conn.close()  # the client goes away mid-stream
    assert router.cancelled.wait(10), "the router call was not cancelled"
    assert client(openai_gateway).chat.completions.create(model="smollm2", messages=CHAT).choices  # still serving


def test_client_gone_during_a_unary_completion_cancels_the_router_call(openai_gateway):
    router = openai_gateway.router
    router.cancelled.clear()
    router.slow_started.clear()
    url = urlparse(openai_gateway.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    conn.request(
        "POST",
        "/v1/chat/completions",
        json.dumps({"model": "slow", "messages": CHAT}),
        {"Content-Type": "application/json"},
    )
    assert router.slow_started.wait(10)
    conn.close()
    assert router.cancelled.wait(10), "the router call was not cancelled"


def test_models_list_names_models_aliases_and_versions(openai_gateway):
    api = client(openai_gateway)
    for _ in range(100):  # the registry Watch snapshot arrives right after start-up
        try:
            ids = [m.id for m in api.models.list()]
            break
        except openai.InternalServerError:
            time.sleep(0.05)
    assert ids == [
        "minilm",
        "minilm:production",
        "minilm:1",
        "smollm2",
        "smollm2:canary",
        "smollm2:production",
        "smollm2:1",
        "smollm2:2",
    ]
    assert api.models.retrieve("smollm2").model_extra["kind"] == "generation"
    assert api.models.retrieve("minilm").model_extra["kind"] == "embedding"
    canary = api.models.retrieve("smollm2:canary")
    assert canary.owned_by == "maas-mesh" and canary.model_extra["version"] == 1 and canary.created == 1_700_000_001
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("loading")  # no READY version


def test_health_and_readiness_follow_the_router(openai_gateway):
    assert raw(openai_gateway, "GET", "/healthz")[0] == 200
    assert raw(openai_gateway, "GET", "/readyz")[0] == 200
    openai_gateway.set_router_health(health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        assert raw(openai_gateway, "GET", "/readyz")[0] == 503
        assert raw(openai_gateway, "GET", "/healthz")[0] == 200
    finally:
        openai_gateway.set_router_health(health_pb2.HealthCheckResponse.SERVING)


def test_body_size_limit_is_413_before_parsing(openai_gateway):
    before = len(openai_gateway.router.requests)
    big = {"messages": [{"role": "user", "content": "x" * (openai_gateway.config.limits.max_request_bytes + 1)}]}
    status, answer = raw(openai_gateway, "POST", "/v1/chat/completions", big)
    assert status == 413 and "max_request_bytes" in answer["error"]["message"]
    assert len(openai_gateway.router.requests) == before


def test_inflight_limit_is_429(openai_gateway_one_slot):
    gw = openai_gateway_one_slot
    url = urlparse(gw.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({"model": "slow", "messages": CHAT, "stream": True}),
            {"Content-Type": "application/json"},
        )
        assert conn.getresponse().status == 200 and gw.router.slow_started.wait(10)
        status, answer = raw(gw, "POST", "/v1/chat/completions", {"messages": CHAT})
        assert status == 429 and "max_inflight" in answer["error"]["message"]
        assert raw(gw, "GET", "/healthz")[0] == 200  # probes are never refused
    finally:
        conn.close()
    assert gw.router.cancelled.wait(10)


def test_metrics_count_requests_by_route_and_code(openai_gateway):
    def count(code: str) -> float:
        return (
            REGISTRY.get_sample_value(
                "maas_http_requests_total", {"service": "openai", "route": "/v1/embeddings", "code": code}
            )
            or 0.0
        )

    ok, bad = count("200"), count("404")
    client(openai_gateway).embeddings.create(model="minilm", input="x")
    with pytest.raises(openai.NotFoundError):
        client(openai_gateway).embeddings.create(model="missing", input="x")
    assert (count("200"), count("404")) == (ok + 1, bad + 1)
    assert (
        REGISTRY.get_sample_value(
            "maas_http_request_duration_seconds_count", {"service": "openai", "route": "/v1/embeddings"}
        )
        >= 2
    )


def test_trace_context_reaches_the_router(openai_gateway_traced):
    gw = openai_gateway_traced
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    for path, body in (("/v1/chat/completions", {"messages": CHAT}), ("/v1/embeddings", {"input": "x"})):
        status, _ = raw(gw, "POST", path, body, {"traceparent": f"00-{trace_id}-00f067aa0ba902b7-01"})
        assert status == 200
        version, got_trace, parent, flags = gw.router.metadata[-1]["traceparent"].split("-")
        assert got_trace == trace_id and parent != "00f067aa0ba902b7"  # a child: the gateway's own spans
    status, _ = raw(gw, "POST", "/v1/chat/completions", {"messages": CHAT})
    assert status == 200 and "traceparent" in gw.router.metadata[-1]  # a new trace when the caller sent none
