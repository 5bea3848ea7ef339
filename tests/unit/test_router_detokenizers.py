"""The router's in-process detokenizers: one fetch per tokenizer (shared by concurrent first calls), a
background re-check by digest that swaps in a changed definition, keeps the copy on a failed re-check
and drops a tokenizer the service no longer has."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from maas.v1 import tokenizer_pb2
from services.router.detokenizers import LocalDetokenizers
from services.shared.errors import InvalidArgument
from tests.unit.test_router_generation import byte_level_tokenizer


class NotFoundError(grpc.aio.AioRpcError):
    def __init__(self):
        super().__init__(grpc.StatusCode.NOT_FOUND, grpc.aio.Metadata(), grpc.aio.Metadata(), "tokenizer 'x' not found")


class Peer:
    def __init__(self):
        self.text = "one"
        self.calls: list[str] = []  # if_none_match of each call
        self.fail: Exception | None = None

    async def tokenizer_definition(self, tokenizer, if_none_match, timeout):
        self.calls.append(if_none_match)
        await asyncio.sleep(0.01)
        if self.fail:
            raise self.fail
        definition = byte_level_tokenizer({0: self.text.encode()})
        digest = str(hash(definition))
        return tokenizer_pb2.GetTokenizerResponse(
            tokenizer=tokenizer,
            digest=digest,
            tokenizer_json="" if digest == if_none_match else definition,
            vocab_size=1,
        )


async def refreshed(detokenizers: LocalDetokenizers) -> str:
    decoder = await detokenizers.decoder("x", 1)  # starts a re-check, answers with the copy in use
    text = decoder.step([0], flush=True)
    await asyncio.gather(*detokenizers._tasks)
    return text


async def test_one_fetch_for_concurrent_first_calls_then_the_cached_copy():
    peer = Peer()
    detokenizers = LocalDetokenizers(peer)
    decoders = await asyncio.gather(*(detokenizers.decoder("x", 1) for _ in range(5)))
    assert [d.step([0], flush=True) for d in decoders] == ["one"] * 5
    await detokenizers.decoder("x", 1)
    assert peer.calls == [""]


async def test_a_re_check_by_digest_swaps_in_a_changed_definition_only():
    peer = Peer()
    detokenizers = LocalDetokenizers(peer, refresh_seconds=0)
    await detokenizers.decoder("x", 1)
    assert await refreshed(detokenizers) == "one" and peer.calls[1]  # asked with the digest held
    peer.text = "two"  # the service restarted with another tokenizer.json
    assert await refreshed(detokenizers) == "one"  # the call that noticed still used the old copy
    assert (await detokenizers.decoder("x", 1)).step([0], flush=True) == "two"


async def test_a_failed_re_check_keeps_the_copy_and_a_removed_tokenizer_is_dropped():
    peer = Peer()
    detokenizers = LocalDetokenizers(peer, refresh_seconds=0)
    await detokenizers.decoder("x", 1)
    peer.fail = OSError("connection refused")
    assert await refreshed(detokenizers) == "one"
    assert (await detokenizers.decoder("x", 1)).step([0], flush=True) == "one"
    await asyncio.gather(*detokenizers._tasks)
    peer.fail = NotFoundError()
    await refreshed(detokenizers)
    with pytest.raises(NotFoundError):  # fetched anew: the service's NOT_FOUND reaches the caller
        await detokenizers.decoder("x", 1)


async def test_generated_ids_outside_the_vocabulary_are_refused_naming_them():
    detokenizers = LocalDetokenizers(Peer())
    with pytest.raises(InvalidArgument, match=r"generated ids\[0\] = 7"):
        (await detokenizers.decoder("x", 1)).step([7])
