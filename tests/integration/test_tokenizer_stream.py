"""TokenizeStream over real gRPC: the same answers as Tokenize, in request order; a bad request gets
an error answer and the stream goes on; a bug, a cancel or the deadline ends the stream's handler."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY
from tokenizers import Tokenizer

from maas.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.shared.channels import open_channel
from services.shared.tensors import from_proto
from services.tokenizer.dataplane import TokenizerDataplane
from services.tokenizer.server import create_server
from services.tokenizer.tokenization import TokenizeLimits
from tests.fixtures.preprocessing import TEXT_CORPUS, minilm_tokenizer_json, serving

LIMITS = TokenizeLimits(max_batch=300, max_request_bytes=200_000, max_text_chars=20_000, max_tokens=256)


@pytest.fixture
async def stub(tokenizer_config):
    async with (
        serving(create_server, dataclasses.replace(tokenizer_config, limits=LIMITS)) as running,
        open_channel(running.address) as channel,
    ):
        yield tokenizer_pb2_grpc.TokenizerStub(channel)


def encode_batch(texts, max_length):
    tokenizer = Tokenizer.from_file(str(minilm_tokenizer_json()))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding()
    return tokenizer.encode_batch(texts)


def tensors(response) -> dict[str, np.ndarray]:
    return {t.name: from_proto(t) for t in response.tensors}


def inflight() -> float:
    return REGISTRY.get_sample_value("maas_rpc_server_inflight_requests", {"service": "tokenizer"}) or 0.0


async def until_inflight_is(count: float, timeout: float = 5.0) -> None:
    """Waits until `count` RPCs are running (the interceptor counts a handler until it ends)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while inflight() != count:
        assert asyncio.get_running_loop().time() < deadline, f"{inflight()} RPCs running, expected {count}"
        await asyncio.sleep(0.02)


# Batches that take every path: tokenized inline, on a worker (over 16k characters), in chunks (over 64
# texts); truncated to different lengths.
BATCHES = [
    (TEXT_CORPUS, 64),
    (["hello"], 128),
    (TEXT_CORPUS * 2, 256),
    ((TEXT_CORPUS * 10)[:150], 32),
    (["A cat sits on the mat.", "", "Stock markets fell sharply today."], 16),
]


async def test_answers_come_in_request_order_equal_to_tokenize_and_encode_batch(stub):
    requests = [tokenizer_pb2.TokenizeRequest(texts=texts, max_length=length) for texts, length in BATCHES]
    # All requests are sent before any answer is read, so several are in flight on the stream at once.
    answers = [answer async for answer in stub.TokenizeStream(iter(requests))]
    assert len(answers) == len(requests)
    for request, answer, (texts, length) in zip(requests, answers, BATCHES):
        assert answer.WhichOneof("result") == "response"
        assert answer.response == await stub.Tokenize(request)
        got, expected = tensors(answer.response), encode_batch(texts, length)
        assert np.array_equal(got["input_ids"], [e.ids for e in expected])
        assert np.array_equal(got["attention_mask"], [e.attention_mask for e in expected])
        assert len(answer.response.items) == len(texts)


BAD_REQUESTS = [
    (
        tokenizer_pb2.TokenizeRequest(texts=["ok", "x" * 20_001]),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "item 1: text characters is 20001, over the limit of 20000",
    ),
    (
        tokenizer_pb2.TokenizeRequest(texts=["a"] * 301),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "batch size is 301, over the limit of 300",
    ),
    (
        tokenizer_pb2.TokenizeRequest(texts=["a"], max_length=257),
        grpc.StatusCode.INVALID_ARGUMENT,
        "max_length 257 is over the service's limit of 256",
    ),
    (
        tokenizer_pb2.TokenizeRequest(texts=["a"], tokenizer="gpt9"),
        grpc.StatusCode.NOT_FOUND,
        "tokenizer 'gpt9' not found",
    ),
    (tokenizer_pb2.TokenizeRequest(texts=["a"], padding=7), grpc.StatusCode.INVALID_ARGUMENT, "padding 7"),
]


async def test_a_bad_request_gets_an_error_answer_and_the_stream_goes_on(stub):
    call = stub.TokenizeStream()
    for number, (bad, code, message) in enumerate(BAD_REQUESTS):
        await call.write(bad)
        error = (await call.read()).error
        assert (error.code, message in error.message) == (code.value[0], True), error
        with pytest.raises(grpc.aio.AioRpcError) as unary_failure:
            await stub.Tokenize(bad)
        assert error.message == unary_failure.value.details()  # the same words as the unary RPC

        text = f"request {number} after a bad one"
        await call.write(tokenizer_pb2.TokenizeRequest(texts=[text]))
        answer = await call.read()
        assert answer.WhichOneof("result") == "response"
        assert tensors(answer.response)["input_ids"].tolist() == [encode_batch([text], 128)[0].ids]
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK
    assert (await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["still serving"]))).items[0].length == 4


async def test_a_bug_ends_the_stream_with_an_incident_and_the_server_keeps_serving(stub, monkeypatch):
    tokenize = TokenizerDataplane.tokenize

    async def fails_on_boom(self, name, texts, options, request_bytes):
        if texts == ["boom"]:
            raise RuntimeError("a bug")
        return await tokenize(self, name, texts, options, request_bytes)

    monkeypatch.setattr(TokenizerDataplane, "tokenize", fails_on_boom)
    call = stub.TokenizeStream()
    await call.write(tokenizer_pb2.TokenizeRequest(texts=["fine"]))
    assert (await call.read()).WhichOneof("result") == "response"
    await call.write(tokenizer_pb2.TokenizeRequest(texts=["boom"]))
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()
    assert failure.value.code() == grpc.StatusCode.INTERNAL
    assert "incident" in failure.value.details() and "a bug" not in failure.value.details()
    answers = [a async for a in stub.TokenizeStream(iter([tokenizer_pb2.TokenizeRequest(texts=["again"])]))]
    assert answers[0].response.items[0].length == 3


async def test_cancelling_the_stream_ends_its_handler(stub):
    before = inflight()
    call = stub.TokenizeStream()
    await call.write(tokenizer_pb2.TokenizeRequest(texts=["one"]))
    await call.read()
    assert inflight() == before + 1  # the handler waits for the next request
    call.cancel()
    await until_inflight_is(before)


async def test_the_deadline_ends_the_stream_and_its_handler(stub):
    before = inflight()
    call = stub.TokenizeStream(timeout=0.5)
    await call.write(tokenizer_pb2.TokenizeRequest(texts=["one"]))
    await call.read()
    assert inflight() == before + 1
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call.read()  # nothing more is sent, so the deadline passes while the handler waits
    assert failure.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until_inflight_is(before)


async def test_a_message_that_does_not_parse_gets_invalid_argument_and_the_stream_goes_on(tokenizer_config):
    """Bytes that are no TokenizeRequest (truncated, or invalid UTF-8 in texts): INVALID_ARGUMENT for that
    message on the stream, for the whole call on Tokenize; never UNKNOWN or an ended stream."""
    good = tokenizer_pb2.TokenizeRequest(texts=["fine"]).SerializeToString()
    undecodable = [b"\x0a\x03\xff\xfe\xfd", b"\x0a\x40abc", good[:-1] + b"\x80"]
    async with (
        serving(create_server, dataclasses.replace(tokenizer_config, limits=LIMITS)) as running,
        open_channel(running.address) as channel,
    ):
        call = channel.stream_stream(
            "/maas.v1.Tokenizer/TokenizeStream", response_deserializer=tokenizer_pb2.TokenizeStreamResponse.FromString
        )()
        for bad in undecodable:
            await call.write(bad)
            error = (await call.read()).error
            assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0], error
            assert "not a valid maas.v1.TokenizeRequest" in error.message, error
            await call.write(good)
            assert (await call.read()).WhichOneof("result") == "response"
            with pytest.raises(grpc.aio.AioRpcError) as unary:
                await channel.unary_unary("/maas.v1.Tokenizer/Tokenize")(bad)
            assert (unary.value.code(), unary.value.details()) == (grpc.StatusCode.INVALID_ARGUMENT, error.message)
        await call.done_writing()
        assert await call.read() == grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
