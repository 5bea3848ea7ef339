"""The tokenizer service over real gRPC: exact tensors, limits as statuses, concurrency, and its
output accepted by the real Triton minilm model."""

from __future__ import annotations

import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
from tokenizers import Tokenizer

from maas.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.shared.channels import open_channel
from services.shared.tensors import from_proto
from services.tokenizer.server import create_server
from services.tokenizer.tokenization import TokenizeLimits
from tests.fixtures.preprocessing import TEXT_CORPUS, minilm_tokenizer_json, serving


@pytest.fixture
async def stub(tokenizer_service):
    async with open_channel(tokenizer_service.address) as channel:
        yield tokenizer_pb2_grpc.TokenizerStub(channel)


def reference(texts, max_length=128, **padding):
    tokenizer = Tokenizer.from_file(str(minilm_tokenizer_json()))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(**padding)
    return tokenizer.encode_batch(texts)


def tensors(response) -> dict[str, np.ndarray]:
    return {t.name: from_proto(t) for t in response.tensors}


async def test_tokenize_equals_encode_batch_over_grpc(stub):
    response = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=TEXT_CORPUS, max_length=64))
    expected = reference(TEXT_CORPUS, 64)
    got = tensors(response)
    assert [t.name for t in response.tensors] == ["input_ids", "attention_mask", "token_type_ids"]
    assert all(t.datatype == "INT64" and list(t.shape) == [len(TEXT_CORPUS), 64] for t in response.tensors)
    assert np.array_equal(got["input_ids"], [e.ids for e in expected])
    assert np.array_equal(got["attention_mask"], [e.attention_mask for e in expected])
    assert np.array_equal(got["token_type_ids"], [e.type_ids for e in expected])
    assert response.tokenizer == "minilm"
    assert len(response.items) == len(TEXT_CORPUS)
    assert response.items[1].length == 2 and not response.items[1].truncated  # ""
    long_item = response.items[TEXT_CORPUS.index("word " * 300)]
    assert long_item.truncated and long_item.length == 64 and long_item.original_length == 302


async def test_large_batch_is_chunked_over_workers_without_changing_output(stub):
    texts = (TEXT_CORPUS * 20)[:300]
    response = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=texts, padding=tokenizer_pb2.PADDING_FIXED))
    got = tensors(response)
    expected = reference(texts, 128, length=128)
    assert got["input_ids"].shape == (300, 128)
    assert np.array_equal(got["input_ids"], [e.ids for e in expected])
    assert np.array_equal(got["attention_mask"], [e.attention_mask for e in expected])


async def test_offsets_tokens_and_listing(stub):
    response = await stub.Tokenize(
        tokenizer_pb2.TokenizeRequest(texts=["Hello, wörld 😀"], return_offsets=True, return_tokens=True)
    )
    item = response.items[0]
    encoding = reference(["Hello, wörld 😀"])[0]
    assert list(item.tokens) == encoding.tokens
    assert [(o.start, o.end) for o in item.offsets] == encoding.offsets
    listing = await stub.ListTokenizers(tokenizer_pb2.ListTokenizersRequest())
    assert listing.default_tokenizer == "minilm"
    (info,) = listing.tokenizers
    assert (info.name, info.max_length, info.vocab_size) == ("minilm", 128, 30522)
    assert list(info.outputs) == ["input_ids", "attention_mask", "token_type_ids"]


@pytest.fixture
async def strict_stub(tokenizer_config):
    limits = TokenizeLimits(max_batch=300, max_request_bytes=200_000, max_text_chars=20_000, max_tokens=256)
    config = dataclasses.replace(tokenizer_config, limits=limits)
    async with serving(create_server, config) as running, open_channel(running.address) as channel:
        yield tokenizer_pb2_grpc.TokenizerStub(channel)


async def test_bad_requests_get_statuses_naming_the_limit_and_item(strict_stub):
    stub = strict_stub
    cases = [
        (
            tokenizer_pb2.TokenizeRequest(texts=["a"] * 301),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "batch size is 301, over the limit of 300",
        ),
        (
            tokenizer_pb2.TokenizeRequest(texts=["ok", "x" * 20_001]),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            "item 1: text characters is 20001, over the limit of 20000",
        ),
        (tokenizer_pb2.TokenizeRequest(texts=["y" * 19_000] * 11), grpc.StatusCode.RESOURCE_EXHAUSTED, "request bytes"),
        (
            tokenizer_pb2.TokenizeRequest(texts=["a"], max_length=257),
            grpc.StatusCode.INVALID_ARGUMENT,
            "max_length 257 is over the service's limit of 256",
        ),
        (tokenizer_pb2.TokenizeRequest(texts=[]), grpc.StatusCode.INVALID_ARGUMENT, "texts is empty"),
        (
            tokenizer_pb2.TokenizeRequest(texts=["a"], tokenizer="gpt9"),
            grpc.StatusCode.NOT_FOUND,
            "tokenizer 'gpt9' not found",
        ),
        (tokenizer_pb2.TokenizeRequest(texts=["a"], padding=7), grpc.StatusCode.INVALID_ARGUMENT, "padding 7"),
    ]
    for request, code, message in cases:
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.Tokenize(request)
        assert failure.value.code() == code, failure.value.details()
        assert message in failure.value.details()
    ok = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=["still serving"]))
    assert ok.items[0].length == 4


async def test_small_request_is_not_stuck_behind_a_big_one(stub):
    """A one-text request sent while a big batch is being tokenized is answered before it."""
    big_texts = ["The quick brown fox jumps over the lazy dog again and again. " * 40] * 300
    finished = []

    async def call(name, texts):
        await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=texts, max_length=256))
        finished.append(name)

    big = asyncio.create_task(call("big", big_texts))
    await asyncio.sleep(0.05)  # the big batch is on the workers by now
    await call("small", ["hello"])
    await big
    assert finished == ["small", "big"]


async def test_extra_tokenizer_dir_serves_side_by_side(tokenizer_config, tmp_path):
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "tokenizer.json").write_text(minilm_tokenizer_json().read_text())
    config = dataclasses.replace(tokenizer_config, tokenizer_dir=tmp_path)
    async with serving(create_server, config) as running, open_channel(running.address) as channel:
        stub = tokenizer_pb2_grpc.TokenizerStub(channel)
        listing = await stub.ListTokenizers(tokenizer_pb2.ListTokenizersRequest())
        assert [t.name for t in listing.tokenizers] == ["minilm", "other"]
        response = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(tokenizer="other", texts=["hi"]))
        assert response.tokenizer == "other"
        other = next(t for t in listing.tokenizers if t.name == "other")
        assert list(other.outputs) == ["input_ids", "attention_mask", "token_type_ids"]  # no config.pbtxt


async def test_triton_minilm_accepts_the_tensors_as_they_are(stub, triton):
    """The router forwards raw_contents untouched: check Triton takes them and embeds sensibly."""
    import tritonclient.grpc as triton_grpc

    texts = ["A cat sits on the mat.", "A kitten is sitting on a rug.", "Stock markets fell sharply today."]
    response = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(texts=texts))
    inputs = []
    for tensor in response.tensors:
        infer_input = triton_grpc.InferInput(tensor.name, list(tensor.shape), tensor.datatype)
        infer_input.set_data_from_numpy(from_proto(tensor))
        inputs.append(infer_input)
    client = triton_grpc.InferenceServerClient(triton.grpc_address)
    try:
        result = client.infer("minilm", inputs)
    finally:
        client.close()
    embeddings = result.as_numpy("sentence_embedding")
    assert embeddings.shape == (3, 384)
    similarity = embeddings @ embeddings.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2  # cat/kitten closer than cat/stocks
