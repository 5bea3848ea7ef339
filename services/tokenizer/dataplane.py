"""What the tokenizer service's RPCs do, free of protobuf: checks limits, then tokenizes on the worker
pool so the event loop never waits for a batch (generation's chat prompts and decoding the same way).

Within a call, tokenizers parallelises over its own (rayon) thread pool, faster than splitting a
batch over Python threads. That pool is shared by every call, and a call waits until the calls
before it are done; so big batches go in chunks of CHUNK texts: a one-text request sent while
4096 texts are being tokenized waits for one chunk (a few ms), not for the whole batch (~200 ms).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from services.shared.errors import ServiceError
from services.shared.telemetry import BATCH_ITEMS, ITEM_ERRORS, PREPROCESS_SECONDS, annotate
from services.shared.workers import WorkerPool
from services.tokenizer.catalog import LoadedTokenizer, TokenizerCatalog
from services.tokenizer.chat_template import Message
from services.tokenizer.generation import (
    ChatPrompt,
    DecodeSession,
    check_decode,
    check_messages,
    decode,
    render_chat,
)
from services.tokenizer.tokenization import (
    TokenizedBatch,
    TokenizeLimits,
    TokenizeOptions,
    check_request,
    encode_chunk,
    pad,
    tokenize_batch,
)

SERVICE = "tokenizer"
# Texts per tokenizers call: big enough to keep its thread pool busy, small enough (a few ms) that
# concurrent requests take turns often.
CHUNK = 64
# Tokenized on the event loop itself: up to a chunk of short texts, ~1 ms of work. Sent to a worker,
# such a batch would still queue in tokenizers' one shared thread pool, so the hop there and back
# (~0.3 ms of thread hand-offs, a quarter of a 32-text call) would buy no parallelism.
INLINE_TEXTS, INLINE_CHARS = CHUNK, 16 * 1024
# Ids decoded on the event loop (~0.3 ms at most); longer sequences go to a worker.
INLINE_IDS = 4096


class TokenizerDataplane:
    def __init__(self, catalog: TokenizerCatalog, limits: TokenizeLimits, pool: WorkerPool):
        self.catalog = catalog
        self.limits = limits
        self.pool = pool

    async def tokenize(
        self, name: str, texts: list[str], options: TokenizeOptions, request_bytes: int
    ) -> TokenizedBatch:
        tokenizer = self.catalog.get(name)
        annotate(model=tokenizer.name, batch_size=len(texts), items=len(texts), bytes=request_bytes)
        BATCH_ITEMS.labels(SERVICE, "Tokenize").observe(len(texts))
        start = time.perf_counter()
        try:
            max_length = check_request(texts, request_bytes, options, tokenizer, self.limits)
        except ServiceError as exc:
            ITEM_ERRORS.labels(SERVICE, type(exc).__name__).inc()
            raise
        if len(texts) <= INLINE_TEXTS and sum(map(len, texts)) <= INLINE_CHARS:
            # At most ~1 ms: less than the hop to a worker and back would add (see INLINE_TEXTS).
            batch = tokenize_batch(tokenizer, texts, options, max_length)
        elif len(texts) <= CHUNK:
            batch = await self.pool.run(tokenize_batch, tokenizer, texts, options, max_length)
        else:
            chunks = await self.pool.map_chunks(
                lambda first, stop: encode_chunk(tokenizer, texts[first:stop], options, max_length), len(texts), CHUNK
            )
            batch = pad(tokenizer, chunks, options, max_length)
        elapsed = time.perf_counter() - start
        PREPROCESS_SECONDS.labels(SERVICE, "text").observe(elapsed)
        annotate(
            preprocess_ms=elapsed * 1000,
            truncated=sum(item.truncated for item in batch.items),
            sequence_length=int(next(iter(batch.tensors.values())).shape[-1]) if batch.tensors else None,
        )
        return batch

    async def apply_chat_template(
        self, name: str, messages: Sequence[Message], add_generation_prompt: bool
    ) -> tuple[str, ChatPrompt]:
        tokenizer = self.catalog.get(name)
        annotate(model=tokenizer.name, items=len(messages))
        chars = self._checked(check_messages, tokenizer, messages, self.limits)
        start = time.perf_counter()
        if chars <= INLINE_CHARS:
            prompt = render_chat(tokenizer, messages, add_generation_prompt)
        else:
            prompt = await self.pool.run(render_chat, tokenizer, messages, add_generation_prompt)
        elapsed = time.perf_counter() - start
        PREPROCESS_SECONDS.labels(SERVICE, "chat").observe(elapsed)
        annotate(preprocess_ms=elapsed * 1000, sequence_length=len(prompt.input_ids))
        return tokenizer.name, prompt

    async def detokenize(self, name: str, ids: Sequence[int], skip_special_tokens: bool) -> str:
        tokenizer = self.catalog.get(name)
        annotate(model=tokenizer.name, items=len(ids))
        self._checked(check_decode, tokenizer, ids, self.limits)
        if len(ids) <= INLINE_IDS:
            return decode(tokenizer, ids, skip_special_tokens)
        return await self.pool.run(decode, tokenizer, ids, skip_special_tokens)

    def decode_session(self, name: str, skip_special_tokens: bool) -> DecodeSession:
        tokenizer = self.catalog.get(name)
        annotate(model=tokenizer.name)
        return DecodeSession(tokenizer, skip_special_tokens, self.limits)

    @staticmethod
    def _checked(check, *args):
        try:
            return check(*args)
        except ServiceError as exc:
            ITEM_ERRORS.labels(SERVICE, type(exc).__name__).inc()
            raise

    def tokenizers(self) -> list[LoadedTokenizer]:
        return list(self.catalog.items.values())
