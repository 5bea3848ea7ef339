"""What a preprocessing service serves, by name: tokenizers (tokenizer service), vision specs (vision
service). Loaded once at start-up; a request naming none gets the default."""

from __future__ import annotations

from typing import Generic, TypeVar

from services.shared.config import ConfigError
from services.shared.errors import NotFound

T = TypeVar("T")


class Catalog(Generic[T]):
    """Items by name, with the one used when a request names none.

    `what` names an item in messages ("tokenizer", "vision spec"); `where` says where items come from,
    for the start-up error when the default is missing."""

    def __init__(self, items: dict[str, T], default: str, what: str, where: str):
        if default not in items:
            raise ConfigError(f"default {what} {default!r} not found; found {sorted(items) or 'none'} ({where})")
        self.items = dict(sorted(items.items()))
        self.default = default
        self.what = what

    def get(self, name: str) -> T:
        try:
            return self.items[name or self.default]
        except KeyError:
            raise NotFound(f"{self.what} {name!r} not found; known: {', '.join(self.items)}") from None
