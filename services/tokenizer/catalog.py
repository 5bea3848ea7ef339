"""The tokenizers this service serves, loaded once at start-up and addressed by name.

Every <model>/tokenizer.json in the model repository (and in an optional extra directory laid out the
same way) is a tokenizer named <model>. Which tensors it returns follows the model's config.pbtxt
inputs, so the router can forward them to Triton as they are. A generation model (decoupled: one
unbatched sequence per request, prompts come from ApplyChatTemplate) gets input_ids and
attention_mask, so a padded Tokenize batch for it can still be read. Beside tokenizer.json,
tokenizer_config.json (special tokens) and chat_template.jinja are read when present.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer

from services.shared.config import ConfigError
from services.shared.catalog import Catalog
from services.shared.model_repository import model_config, models_with
from services.tokenizer.chat_template import ChatTemplate, read_tokenizer_config, template_source, token_text

log = logging.getLogger(__name__)

ALL_OUTPUTS = ("input_ids", "attention_mask", "token_type_ids")
GENERATION_OUTPUTS = ("input_ids", "attention_mask")
# Truncating copies each worker thread keeps per tokenizer (one per max_length callers ask for).
_MAX_COPIES_PER_THREAD = 4
# tokenizer.json spelling → the Python binding's.
_STRATEGIES = {"LongestFirst": "longest_first", "OnlyFirst": "only_first", "OnlySecond": "only_second"}


@dataclass(frozen=True)
class PaddingStyle:
    """How tokenizer.json says to pad: we pad in numpy, the same way tokenizers would."""

    pad_id: int = 0
    pad_type_id: int = 0
    left: bool = False
    multiple_of: int | None = None

    def width(self, longest: int) -> int:
        if self.multiple_of and longest % self.multiple_of:
            return longest + self.multiple_of - longest % self.multiple_of
        return longest


class LoadedTokenizer:
    """One tokenizer.json plus what the service needs to know about it.

    The underlying `tokenizers.Tokenizer` keeps truncation as mutable state, so each max_length gets
    its own copy, configured once and then only read."""

    def __init__(
        self, name: str, path: Path, outputs: tuple[str, ...], max_tokens: int, tokenizer_config: dict | None = None
    ):
        self.name = name
        self.path = path
        self.outputs = outputs
        self._json = path.read_text(encoding="utf-8")
        # Names this definition for callers that decode with a copy of it (GetTokenizer's digest).
        self.digest = hashlib.sha256(self._json.encode("utf-8")).hexdigest()
        try:
            base = Tokenizer.from_str(self._json)
        except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exception on a bad file
            raise ConfigError(f"tokenizer {name!r} ({path}): {exc}") from None
        spec = json.loads(self._json)
        tokenizer_config = tokenizer_config or {}
        self.vocab_size = base.get_vocab_size()
        source = template_source(path.parent, tokenizer_config)
        self.chat_template = None if source is None else ChatTemplate(name, source, tokenizer_config)
        self.eos_token_id = _token_id(base, tokenizer_config.get("eos_token"))
        self.special_tokens = base.num_special_tokens_to_add(False)
        truncation = spec.get("truncation") or {}
        self.default_max_length = min(int(truncation.get("max_length") or max_tokens), max_tokens)
        self._truncation_options = {
            "strategy": _STRATEGIES.get(truncation.get("strategy"), "longest_first"),
            "direction": str(truncation.get("direction", "Right")).lower(),
        }
        self.padding = _padding_style(spec, base, _token_id(base, tokenizer_config.get("pad_token")))
        self.zero_type_ids = self.padding.pad_type_id == 0 and _single_sequence_type_ids_are_zero(
            spec.get("post_processor")
        )
        self._per_thread = threading.local()  # .copies: OrderedDict[max_length, Tokenizer], LRU
        # Built now for the loading thread, the event loop's, which serves small requests inline.
        self.truncating(self.default_max_length)

    def truncating(self, max_length: int) -> Tokenizer:
        """This thread's copy that truncates to max_length (special tokens included) and does not pad.

        Per thread because calls on one Tokenizer object run one at a time even with the GIL released,
        so worker threads sharing one copy would tokenize in turn instead of in parallel."""
        copies = getattr(self._per_thread, "copies", None)
        if copies is None:
            copies = self._per_thread.copies = OrderedDict()
        tokenizer = copies.get(max_length)
        if tokenizer is not None:
            copies.move_to_end(max_length)
            return tokenizer
        tokenizer = Tokenizer.from_str(self._json)
        tokenizer.no_padding()
        # stride 0: the per-item original length is read off the overflowing pieces, which must not overlap.
        tokenizer.enable_truncation(max_length, stride=0, **self._truncation_options)
        copies[max_length] = tokenizer
        while len(copies) > _MAX_COPIES_PER_THREAD:
            copies.popitem(last=False)
        return tokenizer

    @property
    def definition(self) -> str:
        """The tokenizer.json text, as loaded."""
        return self._json

    def untruncated(self) -> Tokenizer:
        """This thread's copy that neither truncates nor pads: for chat prompts and decoding."""
        tokenizer = getattr(self._per_thread, "untruncated", None)
        if tokenizer is None:
            tokenizer = self._per_thread.untruncated = Tokenizer.from_str(self._json)
            tokenizer.no_truncation()
            tokenizer.no_padding()
        return tokenizer


def _token_id(tokenizer: Tokenizer, token) -> int | None:
    text = token_text(token)
    return None if text is None else tokenizer.token_to_id(text)


def _padding_style(spec: dict, tokenizer: Tokenizer, config_pad_id: int | None = None) -> PaddingStyle:
    padding = spec.get("padding")
    if padding:
        return PaddingStyle(
            pad_id=int(padding.get("pad_id", 0)),
            pad_type_id=int(padding.get("pad_type_id", 0)),
            left=str(padding.get("direction", "Right")).lower() == "left",
            multiple_of=padding.get("pad_to_multiple_of") or None,
        )
    # No padding section (e.g. GPT-style tokenizers): tokenizer_config.json's pad_token, else a
    # conventional pad token if there is one.
    if config_pad_id is not None:
        return PaddingStyle(pad_id=config_pad_id)
    for token in ("[PAD]", "<pad>", "<|pad|>"):
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return PaddingStyle(pad_id=token_id)
    return PaddingStyle()


def _single_sequence_type_ids_are_zero(processor: dict | None) -> bool:
    """True when the post-processor gives every token of a single sequence type id 0, so
    token_type_ids can be built as zeros instead of read token by token."""
    if processor is None:
        return True
    kind = processor.get("type")
    if kind in ("BertProcessing", "RobertaProcessing", "ByteLevel"):
        return True
    if kind == "TemplateProcessing":
        return all(next(iter(piece.values())).get("type_id", 0) == 0 for piece in processor.get("single", []))
    if kind == "Sequence":
        return all(_single_sequence_type_ids_are_zero(p) for p in processor.get("processors", []))
    return False


class TokenizerCatalog(Catalog[LoadedTokenizer]):
    """Tokenizers by name, with the one used when a request names none."""

    def __init__(self, tokenizers: dict[str, LoadedTokenizer], default: str):
        super().__init__(
            tokenizers, default, "tokenizer", "<model>/tokenizer.json under --model-repository or --tokenizer-dir"
        )

    @classmethod
    def discover(
        cls, model_repository: Path, extra_dir: Path | None, default: str, max_tokens: int
    ) -> TokenizerCatalog:
        loaded = {}
        for name, path in models_with("tokenizer.json", model_repository, extra_dir).items():
            config = model_config(path.parent)
            outputs: tuple[str, ...]
            if config is not None and config.model_transaction_policy.decoupled:
                outputs = GENERATION_OUTPUTS
            else:
                inputs = None if config is None else {tensor.name for tensor in config.input}
                outputs = tuple(n for n in ALL_OUTPUTS if inputs is None or n in inputs) or ALL_OUTPUTS
            loaded[name] = LoadedTokenizer(name, path, outputs, max_tokens, read_tokenizer_config(path.parent))
            log.info(
                "tokenizer loaded",
                extra={
                    "tokenizer": name,
                    "path": str(path),
                    "outputs": list(outputs),
                    "chat_template": loaded[name].chat_template is not None,
                },
            )
        return cls(loaded, default)
