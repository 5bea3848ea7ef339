"""Tokenizer service settings: flags, then MAAS_* environment, then loopback defaults."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from maas import ports
from services.shared.config import (
    ServerSettings,
    add_limit_arguments,
    add_server_arguments,
    env,
    limits_from_args,
    server_settings,
)
from services.shared.model_repository import add_model_repository_argument
from services.tokenizer.tokenization import TokenizeLimits

DEFAULT_LISTEN = ports.loopback(ports.TOKENIZER)
DEFAULT_TOKENIZER = "minilm"
LIMIT_HELP = {
    "max_batch": "texts per request",
    "max_request_bytes": "encoded request size",
    "max_text_chars": "characters per text",
    "max_tokens": "largest max_length a request may ask for",
    "max_ids": "token ids per Detokenize or DetokenizeStream request",
    "max_messages": "chat messages per ApplyChatTemplate request",
    "max_chat_chars": "characters of all chat messages of an ApplyChatTemplate request",
}


@dataclass(frozen=True)
class TokenizerConfig:
    server: ServerSettings
    model_repository: Path
    tokenizer_dir: Path | None  # extra <name>/tokenizer.json tree, beside the model repository's
    default_tokenizer: str
    limits: TokenizeLimits


def load_config(argv: list[str] | None = None) -> TokenizerConfig:
    parser = argparse.ArgumentParser(prog="maas-tokenizer", description="MaaS Mesh tokenizer service")
    add_server_arguments(parser, DEFAULT_LISTEN)
    add_model_repository_argument(parser)
    parser.add_argument(
        "--tokenizer-dir",
        type=Path,
        default=env("MAAS_TOKENIZER_DIR"),
        help="extra directory of <name>/tokenizer.json (MAAS_TOKENIZER_DIR)",
    )
    parser.add_argument(
        "--default-tokenizer",
        default=env("MAAS_DEFAULT_TOKENIZER", DEFAULT_TOKENIZER),
        help="tokenizer used when a request names none (MAAS_DEFAULT_TOKENIZER)",
    )
    add_limit_arguments(parser, "MAAS_TOKENIZER", TokenizeLimits(), LIMIT_HELP)
    args = parser.parse_args(argv)
    limits_config = limits_from_args(TokenizeLimits, args, LIMIT_HELP)
    return TokenizerConfig(
        server=server_settings("tokenizer", args),
        model_repository=args.model_repository,
        tokenizer_dir=args.tokenizer_dir,
        default_tokenizer=args.default_tokenizer,
        limits=limits_config,
    )
