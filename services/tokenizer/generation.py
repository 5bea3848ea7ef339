"""What the generation RPCs do with one tokenizer, free of protobuf: chat prompt → ids, ids → text.

Limits are checked before any rendering or decoding.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from services.shared.errors import FailedPrecondition, InvalidArgument, limit_error
from services.tokenizer.catalog import LoadedTokenizer
from services.tokenizer.chat_template import ROLES, Message
from services.shared.detokenization import IncrementalDecoder, check_ids
from services.tokenizer.tokenization import TokenizeLimits


@dataclass(frozen=True)
class ChatPrompt:
    prompt: str
    input_ids: list[int]


def check_messages(tokenizer: LoadedTokenizer, messages: Sequence[Message], limits: TokenizeLimits) -> int:
    """Refuses a request the tokenizer cannot render or that is over a limit; returns its characters."""
    if tokenizer.chat_template is None:
        raise FailedPrecondition(
            f"tokenizer {tokenizer.name!r} has no chat template "
            "(chat_template.jinja or tokenizer_config.json's chat_template)"
        )
    if not messages:
        raise InvalidArgument("messages is empty: send at least one message")
    if len(messages) > limits.max_messages:
        raise limit_error("messages", limits.max_messages, len(messages))
    chars = sum(len(m.content) + len(m.role) for m in messages)
    if chars > limits.max_chat_chars:
        raise limit_error("chat characters", limits.max_chat_chars, chars)
    for index, message in enumerate(messages):
        if message.role not in ROLES:
            raise InvalidArgument(f"messages[{index}].role {message.role!r} is not one of {', '.join(ROLES)}")
    return chars


def render_chat(tokenizer: LoadedTokenizer, messages: Sequence[Message], add_generation_prompt: bool) -> ChatPrompt:
    """The template's text and its ids. The template writes the special tokens itself, so none are
    added (transformers' apply_chat_template does the same)."""
    prompt = tokenizer.chat_template.render(list(messages), add_generation_prompt)
    encoding = tokenizer.untruncated().encode(prompt, add_special_tokens=False)
    return ChatPrompt(prompt, encoding.ids)


def check_decode(tokenizer: LoadedTokenizer, ids: Sequence[int], limits: TokenizeLimits) -> None:
    check_ids(ids, tokenizer.vocab_size, limits.max_ids)


def decode(tokenizer: LoadedTokenizer, ids: Sequence[int], skip_special_tokens: bool) -> str:
    return tokenizer.untruncated().decode(list(ids), skip_special_tokens=skip_special_tokens)


class DecodeSession:
    """One DetokenizeStream: its tokenizer (named by the first request) and incremental decoder.

    Its ids are decoded on the event loop: each request is a few new ids and a window of a few more,
    microseconds of work, less than a hop to a worker thread."""

    def __init__(self, tokenizer: LoadedTokenizer, skip_special_tokens: bool, limits: TokenizeLimits):
        self.tokenizer = tokenizer
        self.limits = limits
        # The event loop's own copy: one thread uses it, so decoding never waits for another thread.
        self._decoder = IncrementalDecoder(tokenizer.untruncated(), skip_special_tokens)

    def step(self, ids: Sequence[int], flush: bool) -> str:
        """The text these ids complete. A refused request leaves the sequence as it was."""
        if self._decoder.flushed:
            raise FailedPrecondition("this stream's sequence was flushed: open a new stream for the next one")
        check_decode(self.tokenizer, ids, self.limits)
        text = self._decoder.step(ids)
        return text + self._decoder.flush() if flush else text
