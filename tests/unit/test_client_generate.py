"""MeshClient / AsyncMeshClient generate+chat and `maas generate|chat` against the scripted router."""

from __future__ import annotations

import json

import grpc
import pytest
from typer.testing import CliRunner

from maas.cli import app
from maas.client import AsyncMeshClient, MeshClient, MeshError


@pytest.fixture(scope="module")
def router_address(openai_gateway):
    return openai_gateway.config.router


def test_chat_unary_and_stream_agree(router_address, openai_gateway):
    with MeshClient(router_address) as mesh:
        whole = mesh.chat(
            [("system", "s"), {"role": "user", "content": "hi you"}],
            max_tokens=8,
            temperature=0.0,
            seed=3,
            stop=["zz"],
            alias="canary",
            routing_key="k",
        )
        assert (whole.text, whole.finish_reason, whole.usage.completion_tokens) == ("echo: hi you", "stop", 3)
        assert whole.routed.version == 1 and whole.routed.kind == "alias"
        sent = openai_gateway.router.requests[-1]
        assert sent.sampling.max_tokens == 8 and sent.sampling.seed == 3 and sent.sampling.HasField("temperature")
        assert list(sent.sampling.stop) == ["zz"] and sent.model.routing_key == "k"
        with mesh.chat("hi you", stream=True) as stream:
            pieces = [p.text for p in stream]
        assert pieces == ["echo:", " hi", " you"] and stream.text == whole.text
        assert stream.finish_reason == "stop" and stream.usage.completion_tokens == 3 and stream.routed.version == 2


def test_generate_prompt_and_errors(router_address, openai_gateway):
    with MeshClient(router_address) as mesh:
        assert mesh.generate("a b c", max_tokens=2).finish_reason == "length"
        assert openai_gateway.router.requests[-1].prompt == "a b c"
        with pytest.raises(MeshError) as caught:
            mesh.generate("x", model="missing")
        assert caught.value.code == grpc.StatusCode.NOT_FOUND
        with pytest.raises(MeshError):
            list(mesh.generate("x", model="midfail", stream=True))


async def test_async_client(router_address):
    async with AsyncMeshClient(router_address) as mesh:
        assert (await mesh.generate("p q")).text == "echo: p q"
        stream = await mesh.chat("p q", stream=True)
        assert [p.text async for p in stream] == ["echo:", " p", " q"] and stream.finish_reason == "stop"


def test_cli_chat_streams_and_json(router_address):
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "chat",
            "hello world",
            "--router",
            router_address,
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            "--seed",
            "1",
            "--stop",
            "zz",
            "--stop",
            "yy",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "echo: hello world" in result.stdout
    result = runner.invoke(app, ["generate", "one two", "--router", router_address, "--json"])
    assert result.exit_code == 0 and json.loads(result.stdout)["text"] == "echo: one two"
    result = runner.invoke(app, ["chat", "x", "--router", router_address, "--model", "missing"])
    assert result.exit_code == 1 and "NOT_FOUND" in result.output
