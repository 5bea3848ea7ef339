"""The OpenAI gateway in the real mesh (`maas up`'s LocalMesh): the unmodified `openai` client against
real processes — embeddings from minilm in Triton, the model list from the registry, and (with the
chat model registered) chat unary + stream equal to the router's gRPC answers, bad input codes and a
disconnect mid-stream that leaves the mesh serving."""

from __future__ import annotations

import http.client
import json
import time
from urllib.parse import urlparse

import numpy as np
import openai
import pytest

from maas.client import MeshClient, MeshError
from maas.local.mesh import SOURCE_MODELS

CHAT_MODEL = "smollm2"
needs_chat = pytest.mark.skipif(
    all(m.name != CHAT_MODEL for m in SOURCE_MODELS), reason="the local mesh does not register the chat model"
)
MESSAGES = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def api(mesh):
    with openai.OpenAI(base_url=mesh.openai_url, api_key="unused", max_retries=0) as client:
        yield client


def test_embeddings_equal_the_routers(api, mesh):
    texts = ["A man is eating food.", "A man is eating a piece of bread."]
    answer = api.embeddings.create(model="minilm", input=texts)  # the client's default: base64 floats
    with MeshClient(mesh.router_address) as direct:
        expected = direct.embed(texts, "minilm")
    got = np.array([d.embedding for d in answer.data], np.float32)
    assert got.shape == (2, 384) and np.array_equal(got, expected.vectors)
    assert answer.model == f"minilm:{expected.routed.version}"
    floats = api.embeddings.create(model="minilm", input=texts[0], encoding_format="float")
    assert np.allclose(floats.data[0].embedding, expected.vectors[0], atol=1e-6)


def test_models_list_and_errors(api):
    for _ in range(100):  # the gateway's registry Watch catches up right after start-up
        ids = [m.id for m in api.models.list()]
        if "minilm" in ids:
            break
        time.sleep(0.1)
    assert {"minilm", "minilm:production", "efficientnet_lite0"} <= set(ids)
    assert api.models.retrieve("minilm").model_extra["kind"] == "embedding"
    if any(m.name == CHAT_MODEL for m in SOURCE_MODELS):
        chat = api.models.retrieve(CHAT_MODEL)
        assert chat.model_extra["kind"] == "generation" and f"{CHAT_MODEL}:production" in ids
    with pytest.raises(openai.NotFoundError) as caught:
        api.embeddings.create(model="no-such-model", input="x")
    assert caught.value.body["code"] == "not_found"
    with pytest.raises(openai.NotFoundError):
        api.embeddings.create(model="minilm:99", input="x")  # no such version
    with pytest.raises(openai.BadRequestError) as caught:
        api.embeddings.create(model="minilm", input=[[1, 2, 3]])
    assert caught.value.body["param"] == "input"


@needs_chat
def test_chat_unary_and_stream_equal_grpc(api, mesh):
    with MeshClient(mesh.router_address) as direct:
        expected = direct.chat(
            [(m["role"], m["content"]) for m in MESSAGES], CHAT_MODEL, max_tokens=24, temperature=0.0
        )
    unary = api.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=24, temperature=0)
    assert unary.choices[0].message.content == expected.text and expected.text.strip()
    assert unary.usage.completion_tokens == expected.usage.completion_tokens
    assert unary.choices[0].finish_reason == {"stop": "stop", "length": "length"}[expected.finish_reason]
    assert unary.model == f"{CHAT_MODEL}:{expected.routed.version}"
    chunks = list(
        api.chat.completions.create(
            model=CHAT_MODEL,
            messages=MESSAGES,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected.text
    assert chunks[-1].usage.completion_tokens == expected.usage.completion_tokens
    text = api.completions.create(model=CHAT_MODEL, prompt="The capital of France is", max_tokens=8, temperature=0)
    with MeshClient(mesh.router_address) as direct:
        assert (
            text.choices[0].text
            == direct.generate("The capital of France is", CHAT_MODEL, max_tokens=8, temperature=0.0).text
        )


@needs_chat
@pytest.mark.parametrize(
    "fields, status, param",
    [
        ({"temperature": -1}, 400, None),
        ({"top_p": 1.5}, 400, None),
        ({"max_tokens": 0}, 400, "max_tokens"),
        ({"max_tokens": 10**6}, 400, None),
        ({"model": "minilm"}, 400, None),
        ({"model": "nope"}, 404, None),
        ({"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ],
)
def test_bad_generation_input_codes(mesh, fields, status, param):
    url = urlparse(mesh.openai_url)
    body = {"model": CHAT_MODEL, "messages": MESSAGES, **fields}
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
    try:
        conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = conn.getresponse()
        answer = json.loads(response.read())
    finally:
        conn.close()
    assert response.status == status, answer
    assert answer["error"]["message"] and (param is None or answer["error"]["param"] == param)


@needs_chat
def test_disconnect_mid_stream_leaves_the_mesh_serving(api, mesh):
    url = urlparse(mesh.openai_url)
    for stream in (True, True, True, False):  # gone mid-stream three times, and once during a unary answer
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({"model": CHAT_MODEL, "messages": MESSAGES, "max_tokens": 512, "stream": stream}),
            {"Content-Type": "application/json"},
        )
        if stream:
            response = conn.getresponse()
            assert response.status == 200 and response.read1().startswith(b"data: ")
        conn.close()  # gone before the answer ended
    answer = api.chat.completions.create(model=CHAT_MODEL, messages=MESSAGES, max_tokens=4, temperature=0)
    assert answer.choices[0].message.content
    with MeshClient(mesh.router_address) as direct:
        try:
            direct.embed(["still serving"])
        except MeshError as exc:  # pragma: no cover - the assertion message
            pytest.fail(f"the mesh stopped serving after disconnects: {exc}")
