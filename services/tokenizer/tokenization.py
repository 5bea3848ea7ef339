"""Batch text → INT64 [batch, sequence] arrays, equal to what `tokenizers`' encode_batch gives with
truncation and padding enabled.

Rust does the tokenizing and releases the GIL meanwhile; we pad in numpy from one flat list of ids
rather than token by token in Python.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum

import numpy as np

from services.shared.errors import InvalidArgument, limit_error
from services.tokenizer.catalog import LoadedTokenizer


class Padding(Enum):
    LONGEST = "longest"  # to the longest item of the batch
    FIXED = "fixed"  # to max_length


@dataclass(frozen=True)
class TokenizeLimits:
    """Refused before any tokenizing; each limit is a flag and a MAAS_* variable."""

    max_batch: int = 1024
    max_request_bytes: int = 16 * 1024 * 1024
    max_text_chars: int = 100_000
    # Largest max_length (and fixed padding) a request may ask for; also caps tokenizer defaults.
    max_tokens: int = 512
    # Generation: ids per Detokenize / DetokenizeStream request; chat messages per ApplyChatTemplate and
    # their characters in all (the template adds a little; its tokens are at most about that many).
    max_ids: int = 65_536
    max_messages: int = 256
    max_chat_chars: int = 200_000


@dataclass(frozen=True)
class TokenizeOptions:
    padding: Padding = Padding.LONGEST
    max_length: int = 0  # 0 = the tokenizer's default
    return_offsets: bool = False
    return_tokens: bool = False


@dataclass
class ItemDetails:
    length: int
    truncated: bool
    original_length: int
    offsets: list[tuple[int, int]] | None = None
    tokens: list[str] | None = None


@dataclass
class TokenizedBatch:
    tokenizer: str
    tensors: dict[str, np.ndarray]  # name → INT64 [batch, sequence], in the tokenizer's output order
    items: list[ItemDetails]


def check_request(
    texts: list[str], request_bytes: int, options: TokenizeOptions, tokenizer: LoadedTokenizer, limits: TokenizeLimits
) -> int:
    """Refuses a request over a limit; returns the max_length to truncate to."""
    if not texts:
        raise InvalidArgument("texts is empty: send at least one text (empty strings are allowed)")
    if len(texts) > limits.max_batch:
        raise limit_error("batch size", limits.max_batch, len(texts))
    if request_bytes > limits.max_request_bytes:
        raise limit_error("request bytes", limits.max_request_bytes, request_bytes)
    for index, text in enumerate(texts):
        if len(text) > limits.max_text_chars:
            raise limit_error("text characters", limits.max_text_chars, len(text), index)
    max_length = options.max_length or tokenizer.default_max_length
    if max_length > limits.max_tokens:
        raise InvalidArgument(f"max_length {max_length} is over the service's limit of {limits.max_tokens} tokens")
    if max_length <= tokenizer.special_tokens:
        raise InvalidArgument(
            f"max_length {max_length} leaves no room for text: tokenizer {tokenizer.name!r} adds "
            f"{tokenizer.special_tokens} special tokens"
        )
    return max_length


# Batches this small are encoded text by text on the calling thread.
ONE_BY_ONE = 4


@dataclass
class EncodedChunk:
    """Some consecutive texts of a batch, tokenized: ids flattened, ready to be padded with the rest."""

    ids: np.ndarray  # INT64, every item's ids back to back
    lengths: np.ndarray  # INT64, tokens per item
    type_ids: np.ndarray | None  # like ids; None when all zero or not returned
    items: list[ItemDetails]


def encode_chunk(
    tokenizer: LoadedTokenizer, texts: list[str], options: TokenizeOptions, max_length: int
) -> EncodedChunk:
    """Tokenize and truncate some texts. CPU-bound: run on a worker thread (the GIL is released while
    tokenizers' Rust threads work)."""
    truncating = tokenizer.truncating(max_length)
    if len(texts) <= ONE_BY_ONE:
        # Not through tokenizers' shared thread pool, where they would wait behind other requests' batches.
        encodings = [truncating.encode(text) for text in texts]
    else:
        # encode_batch_fast: the same ids, masks and truncation; only skips tracking offsets (~15% faster).
        encodings = (truncating.encode_batch if options.return_offsets else truncating.encode_batch_fast)(texts)
    ids = [e.ids for e in encodings]
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    total = int(lengths.sum())
    type_ids = None
    if "token_type_ids" in tokenizer.outputs and not tokenizer.zero_type_ids:
        type_ids = np.fromiter(itertools.chain.from_iterable(e.type_ids for e in encodings), np.int64, count=total)
    return EncodedChunk(
        np.fromiter(itertools.chain.from_iterable(ids), np.int64, count=total),
        lengths,
        type_ids,
        _details(encodings, lengths, options),
    )


def pad(
    tokenizer: LoadedTokenizer, chunks: list[EncodedChunk], options: TokenizeOptions, max_length: int
) -> TokenizedBatch:
    """Join the chunks into [batch, sequence] INT64 arrays padded as tokenizers would (vectorised:
    cheap enough for the event loop)."""
    if len(chunks) == 1:
        lengths, ids, type_ids = chunks[0].lengths, chunks[0].ids, chunks[0].type_ids
    else:
        lengths = np.concatenate([c.lengths for c in chunks])
        ids = np.concatenate([c.ids for c in chunks])
        type_ids = None if chunks[0].type_ids is None else np.concatenate([c.type_ids for c in chunks])
    longest = max_length if options.padding is Padding.FIXED else int(lengths.max())
    style = tokenizer.padding
    width = style.width(longest)
    positions = np.arange(width)
    real = positions >= (width - lengths)[:, None] if style.left else positions < lengths[:, None]

    def padded(flat: np.ndarray, pad_value: int) -> np.ndarray:
        array = np.full((len(lengths), width), pad_value, dtype=np.int64)
        array[real] = flat
        return array

    tensors: dict[str, np.ndarray] = {}
    for name in tokenizer.outputs:
        if name == "input_ids":
            tensors[name] = padded(ids, style.pad_id)
        elif name == "attention_mask":
            tensors[name] = real.astype(np.int64)
        elif type_ids is None:
            tensors[name] = np.zeros((len(lengths), width), dtype=np.int64)
        else:
            tensors[name] = padded(type_ids, style.pad_type_id)
    items = chunks[0].items if len(chunks) == 1 else [item for c in chunks for item in c.items]
    return TokenizedBatch(tokenizer.name, tensors, items)


def tokenize_batch(
    tokenizer: LoadedTokenizer, texts: list[str], options: TokenizeOptions, max_length: int
) -> TokenizedBatch:
    """The whole batch as one chunk."""
    return pad(tokenizer, [encode_chunk(tokenizer, texts, options, max_length)], options, max_length)


def _details(encodings: list, lengths: np.ndarray, options: TokenizeOptions) -> list[ItemDetails]:
    items = []
    for encoding, length in zip(encodings, lengths.tolist()):
        overflowing = encoding.overflowing
        # Each overflowing piece carries its own special tokens; only its text tokens were cut off.
        original = length + sum(len(piece) - sum(piece.special_tokens_mask) for piece in overflowing)
        item = ItemDetails(length=length, truncated=bool(overflowing), original_length=original)
        if options.return_offsets:
            item.offsets = encoding.offsets
        if options.return_tokens:
            item.tokens = encoding.tokens
        items.append(item)
    return items
