"""What the Tokenize and ListTokenizers RPCs do, free of protobuf: checks limits, then tokenizes on
the worker pool so the event loop never waits for a batch.

Within a call, tokenizers parallelises over its own (rayon) thread pool, faster than splitting a
batch over Python threads. That pool is shared by every call, and a call waits until the calls
before it are done; so big batches go in chunks of CHUNK texts: a one-text request sent while
4096 texts are being tokenized waits for one chunk (a few ms), not for the whole batch (~200 ms).
"""
from __future__ import annotations

import time

from services.shared.errors import ServiceError
from services.shared.telemetry import BATCH_ITEMS, ITEM_ERRORS, PREPROCESS_SECONDS, annotate
from services.shared.workers import WorkerPool
from services.tokenizer.catalog import LoadedTokenizer, TokenizerCatalog
from services.tokenizer.tokenization import (
    ONE_BY_ONE, TokenizedBatch, TokenizeLimits, TokenizeOptions, check_request, encode_chunk, pad, tokenize_batch,
)

SERVICE = "tokenizer"
# Texts per tokenizers call: big enough to keep its thread pool busy, small enough (a few ms) that
# concurrent requests take turns often.
CHUNK = 64
# Tokenized on the event loop itself (one by one, see ONE_BY_ONE): well under a millisecond of work.
INLINE_TEXTS, INLINE_CHARS = ONE_BY_ONE, 1024


class TokenizerDataplane:
    def __init__(self, catalog: TokenizerCatalog, limits: TokenizeLimits, pool: WorkerPool):
        self.catalog = catalog
        self.limits = limits
        self.pool = pool

    async def tokenize(self, name: str, texts: list[str], options: TokenizeOptions,
                       request_bytes: int) -> TokenizedBatch:
        tokenizer = self.catalog.get(name)
        annotate(model=tokenizer.name, batch=len(texts))
        BATCH_ITEMS.labels(SERVICE, "Tokenize").observe(len(texts))
        start = time.perf_counter()
        try:
            max_length = check_request(texts, request_bytes, options, tokenizer, self.limits)
        except ServiceError as exc:
            ITEM_ERRORS.labels(SERVICE, type(exc).__name__).inc()
            raise
        if len(texts) <= INLINE_TEXTS and sum(map(len, texts)) <= INLINE_CHARS:
            # A sentence or two takes ~50 µs: less than the hop to a worker and back would.
            batch = tokenize_batch(tokenizer, texts, options, max_length)
        elif len(texts) <= CHUNK:
            batch = await self.pool.run(tokenize_batch, tokenizer, texts, options, max_length)
        else:
            chunks = await self.pool.map_chunks(
                lambda first, stop: encode_chunk(tokenizer, texts[first:stop], options, max_length), len(texts), CHUNK)
            batch = pad(tokenizer, chunks, options, max_length)
        PREPROCESS_SECONDS.labels(SERVICE, "text").observe(time.perf_counter() - start)
        return batch

    def tokenizers(self) -> list[LoadedTokenizer]:
        return list(self.catalog.tokenizers.values())
