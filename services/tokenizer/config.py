"""Tokenizer service settings: flags, then MAAS_* environment, then loopback defaults."""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path

from services.shared.config import (
    ConfigError, ServerSettings, add_server_arguments, env, env_int, server_settings,
)
from services.shared.model_repository import add_model_repository_argument
from services.tokenizer.tokenization import TokenizeLimits

DEFAULT_LISTEN = "127.0.0.1:50053"
DEFAULT_TOKENIZER = "minilm"


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
    parser.add_argument("--tokenizer-dir", type=Path, default=env("MAAS_TOKENIZER_DIR"),
                        help="extra directory of <name>/tokenizer.json (MAAS_TOKENIZER_DIR)")
    parser.add_argument("--default-tokenizer", default=env("MAAS_DEFAULT_TOKENIZER", DEFAULT_TOKENIZER),
                        help="tokenizer used when a request names none (MAAS_DEFAULT_TOKENIZER)")
    defaults = TokenizeLimits()
    limits = parser.add_argument_group("limits")
    limits.add_argument("--max-batch", type=int, default=env_int("MAAS_TOKENIZER_MAX_BATCH", defaults.max_batch),
                        help="texts per request (MAAS_TOKENIZER_MAX_BATCH)")
    limits.add_argument("--max-request-bytes", type=int,
                        default=env_int("MAAS_TOKENIZER_MAX_REQUEST_BYTES", defaults.max_request_bytes),
                        help="encoded request size (MAAS_TOKENIZER_MAX_REQUEST_BYTES)")
    limits.add_argument("--max-text-chars", type=int,
                        default=env_int("MAAS_TOKENIZER_MAX_TEXT_CHARS", defaults.max_text_chars),
                        help="characters per text (MAAS_TOKENIZER_MAX_TEXT_CHARS)")
    limits.add_argument("--max-tokens", type=int, default=env_int("MAAS_TOKENIZER_MAX_TOKENS", defaults.max_tokens),
                        help="largest max_length a request may ask for (MAAS_TOKENIZER_MAX_TOKENS)")
    args = parser.parse_args(argv)
    limits_config = TokenizeLimits(
        max_batch=args.max_batch, max_request_bytes=args.max_request_bytes,
        max_text_chars=args.max_text_chars, max_tokens=args.max_tokens,
    )
    for field in dataclasses.fields(limits_config):
        if getattr(limits_config, field.name) <= 0:
            raise ConfigError(f"--{field.name.replace('_', '-')} must be positive")
    return TokenizerConfig(
        server=server_settings("tokenizer", args),
        model_repository=args.model_repository,
        tokenizer_dir=args.tokenizer_dir,
        default_tokenizer=args.default_tokenizer,
        limits=limits_config,
    )
