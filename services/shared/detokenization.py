"""Token ids back to text: whole sequences, and sequences arriving a few ids at a time.

IncrementalDecoder is the algorithm of tokenizers' own DecodeStream (tokenizers/src/tokenizer/mod.rs,
step_decode_stream), plus flush(): DecodeStream cannot hand out the bytes it holds back at the end
of a sequence (a character cut by max_tokens), so their concatenation would miss Detokenize's U+FFFD.
The window decoded is the ids since the last piece plus the ids of the piece before it, as context
for decoders whose output depends on the previous token (a leading space stripped from the first).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from tokenizers import Tokenizer

from services.shared.errors import FailedPrecondition, InvalidArgument, limit_error

REPLACEMENT = "\ufffd"


def check_ids(ids: Sequence[int], vocab_size: int, max_ids: int, field: str = "ids") -> None:
    """Refuses more than max_ids ids, or an id outside [0, vocab_size), naming its index."""
    if len(ids) > max_ids:
        raise limit_error(f"{field} count", max_ids, len(ids))
    if not ids:
        return
    array = np.asarray(ids, dtype=np.int64)
    bad = np.flatnonzero((array < 0) | (array >= vocab_size))
    if bad.size:
        index = int(bad[0])
        raise InvalidArgument(
            f"{field}[{index}] = {int(array[index])} is not a token id of this tokenizer (0 to {vocab_size - 1})"
        )


class IncrementalDecoder:
    """One sequence's ids in, the text they complete out; concatenated, equal to decode(all ids)."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool):
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []  # context ids, then the ids not yet turned into text
        self._prefix = ""  # decode of the context ids
        self._prefix_index = 0  # where the context ends in _ids
        self.flushed = False

    def step(self, ids: Sequence[int]) -> str:
        """The text these ids complete; "" while the last bytes are not a whole character yet."""
        if self.flushed:
            raise FailedPrecondition("this sequence was flushed: open a new stream for the next one")
        if not ids:
            return ""
        self._ids.extend(ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        if len(text) <= len(self._prefix) or text.endswith(REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """The text held back, as decode renders it (U+FFFD for incomplete bytes); ends the sequence."""
        if self.flushed:
            raise FailedPrecondition("this sequence was flushed: open a new stream for the next one")
        self.flushed = True
        text = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        return self._piece(text)

    def _advance(self, text: str) -> str:
        piece = self._piece(text)
        # The ids just turned into text become the context of the next window.
        new_prefix_index = len(self._ids) - self._prefix_index
        del self._ids[: self._prefix_index]
        self._prefix = self._tokenizer.decode(self._ids, skip_special_tokens=self._skip)
        self._prefix_index = new_prefix_index
        return piece

    def _piece(self, text: str) -> str:
        if not text.startswith(self._prefix):
            # DecodeStream's InvalidPrefix: a decoder whose output for the context changed with the ids
            # after it. Not the case for the byte-level and metaspace decoders; a bug if it happens.
            raise RuntimeError(f"incremental decode lost its prefix: {self._prefix!r} vs {text!r}")
        return text[len(self._prefix) :]
