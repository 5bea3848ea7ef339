"""Generated ids → text in the router's own process, with the tokenizer service's definition of each tokenizer.

A generation streams one token at a time; asking the tokenizer service to detokenize each one
(DetokenizeStream) cost a round trip and two more processes' CPU per token, on the cores the engine
decodes on (~0.8× the engine's tokens/s at one stream). The router instead fetches the tokenizer's
definition once (GetTokenizer: its tokenizer.json and a digest) and runs the same incremental decoder
as DetokenizeStream (services/shared/detokenization.py), so the text is the same piece for piece.

The definition is re-checked in the background every `refresh_seconds` by digest (a restarted tokenizer
service may have loaded another file); a failed re-check keeps the copy in use. At most
`max_tokenizers` definitions are kept (least recently used dropped).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from tokenizers import Tokenizer

from services.shared.detokenization import IncrementalDecoder, check_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Definition:
    tokenizer: Tokenizer
    digest: str
    vocab_size: int
    fetched_at: float


class SequenceDecoder:
    """One generated sequence: ids in, the text they complete out (the DetokenizeSession contract)."""

    def __init__(self, definition: Definition, skip_special_tokens: bool = True):
        self._decoder = IncrementalDecoder(definition.tokenizer, skip_special_tokens)
        self._vocab_size = definition.vocab_size

    def step(self, ids: Sequence[int], flush: bool = False) -> str:
        # Ids come from our own model; one outside the vocabulary is refused as the service would.
        check_ids(ids, self._vocab_size, len(ids), "generated ids")
        text = self._decoder.step(ids)
        return text + self._decoder.flush() if flush else text


class LocalDetokenizers:
    def __init__(self, peer, refresh_seconds: float = 30.0, max_tokenizers: int = 8):
        self._peer = peer  # services.router.peers.TokenizerPeer
        self._refresh_seconds, self._max = refresh_seconds, max_tokenizers
        self._cache: OrderedDict[str, Definition] = OrderedDict()
        self._loading: dict[str, asyncio.Future[Definition]] = {}
        self._refreshing: set[str] = set()
        self._tasks: set[asyncio.Task] = set()

    async def decoder(self, tokenizer: str, timeout: float | None) -> SequenceDecoder:
        """A decoder for one sequence; the first use of a tokenizer fetches its definition (once, shared
        by the calls that wait for it)."""
        definition = self._cache.get(tokenizer)
        if definition is None:
            definition = await self._load(tokenizer, timeout)
        else:
            self._cache.move_to_end(tokenizer)
            if time.monotonic() - definition.fetched_at > self._refresh_seconds:
                self._refresh_later(tokenizer, definition)
        return SequenceDecoder(definition)

    async def _load(self, tokenizer: str, timeout: float | None) -> Definition:
        pending = self._loading.get(tokenizer)
        if pending is None:
            pending = asyncio.ensure_future(self._fetch(tokenizer, None, timeout))
            self._loading[tokenizer] = pending
            pending.add_done_callback(lambda _: self._loading.pop(tokenizer, None))
        # shield: one caller giving up does not cancel the fetch the others wait for.
        definition = await asyncio.shield(pending)
        self._store(tokenizer, definition)
        return definition

    async def _fetch(self, tokenizer: str, current: Definition | None, timeout: float | None) -> Definition:
        answer = await self._peer.tokenizer_definition(tokenizer, current.digest if current else "", timeout)
        if current is not None and answer.digest == current.digest:
            return dataclasses.replace(current, fetched_at=time.monotonic())
        # Parsing a tokenizer.json of a few MB takes tens of ms: off the event loop.
        parsed = await asyncio.to_thread(Tokenizer.from_str, answer.tokenizer_json)
        parsed.no_truncation()
        parsed.no_padding()
        log.info("tokenizer %r loaded for detokenizing (digest %s)", tokenizer, answer.digest[:12])
        return Definition(parsed, answer.digest, int(answer.vocab_size), time.monotonic())

    def _store(self, tokenizer: str, definition: Definition) -> None:
        self._cache[tokenizer] = definition
        self._cache.move_to_end(tokenizer)
        while len(self._cache) > self._max:
            self._cache.popitem(last=False)

    def _refresh_later(self, tokenizer: str, current: Definition) -> None:
        if tokenizer in self._refreshing:
            return
        self._refreshing.add(tokenizer)
        task = asyncio.create_task(self._refresh(tokenizer, current))
        self._tasks.add(task)  # a reference, so the task is not collected while it runs
        task.add_done_callback(self._tasks.discard)

    async def _refresh(self, tokenizer: str, current: Definition) -> None:
        try:
            self._store(tokenizer, await self._fetch(tokenizer, current, self._refresh_seconds))
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:  # gone from the service: the next call gets it
                self._cache.pop(tokenizer, None)
            else:
                self._keep(tokenizer, current, exc)
        except Exception as exc:  # noqa: BLE001 - keep the copy in use; the next use tries again
            self._keep(tokenizer, current, exc)
        finally:
            self._refreshing.discard(tokenizer)

    def _keep(self, tokenizer: str, current: Definition, exc: BaseException) -> None:
        log.warning("re-checking tokenizer %r failed (%s); still using digest %s", tokenizer, exc, current.digest[:12])
        self._store(tokenizer, dataclasses.replace(current, fetched_at=time.monotonic()))

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
