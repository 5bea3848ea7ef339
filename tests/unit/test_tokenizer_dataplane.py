"""The worker pool's chunked map (shared by tokenizer and vision) and the tokenizer dataplane on it."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from services.shared.errors import InvalidArgument
from services.shared.workers import WorkerPool
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.dataplane import TokenizerDataplane
from services.tokenizer.tokenization import TokenizeLimits, TokenizeOptions, tokenize_batch
from tests.fixtures.preprocessing import TEXT_CORPUS


@pytest.fixture
def pool():
    pool = WorkerPool(2, "test")
    try:
        yield pool
    finally:
        pool.shutdown()


async def test_map_chunks_keeps_order_and_bounds_parallelism(pool):
    running, peak, lock = [0], [0], threading.Lock()

    def work(start, stop):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.005)
        with lock:
            running[0] -= 1
        return list(range(start, stop))

    chunks = await pool.map_chunks(work, 23, 5)
    assert chunks == [list(range(s, min(s + 5, 23))) for s in range(0, 23, 5)]
    assert peak[0] == 2


async def test_map_chunks_raises_the_earliest_failure_and_stops(pool):
    started = []

    def work(start, stop):
        started.append(start)
        time.sleep(0.002 if start == 1 else 0)
        if start in (1, 2):
            raise InvalidArgument(f"item {start}: bad")
        return start

    with pytest.raises(InvalidArgument, match="item 1: bad"):
        await pool.map_chunks(work, 100, 1)
    assert len(started) < 10  # no new chunks once one failed


async def test_chunked_tokenizing_equals_one_batch(pool, tokenizer_repository):
    catalog = TokenizerCatalog.discover(tokenizer_repository, None, "minilm", 512)
    dataplane = TokenizerDataplane(catalog, TokenizeLimits(), pool)
    texts = (TEXT_CORPUS * 30)[:500]
    chunked = await dataplane.tokenize("", texts, TokenizeOptions(max_length=40), request_bytes=0)
    whole = tokenize_batch(catalog.get("minilm"), texts, TokenizeOptions(max_length=40), 40)
    for name in whole.tensors:
        assert np.array_equal(chunked.tensors[name], whole.tensors[name])
    assert chunked.items == whole.items
