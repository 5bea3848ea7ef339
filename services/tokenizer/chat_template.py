"""A tokenizer's chat template, rendered the way transformers' apply_chat_template renders it.

Same jinja2 environment (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols) and
the same template globals (raise_exception, tojson, strftime_now, namespace, dict), with the special
tokens of tokenizer_config.json (bos_token, eos_token, ...) as variables. The template comes from the
model folder (chat_template.jinja, else tokenizer_config.json's `chat_template`), so it is the model
author's code: the sandbox keeps it from reaching Python internals.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from services.shared.config import ConfigError
from services.shared.errors import InvalidArgument

# The named special tokens transformers passes to templates (its SPECIAL_TOKENS_ATTRIBUTES).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Roles a request may use: the ones maas.v1.ChatMessage documents.
ROLES = ("system", "user", "assistant")


def token_text(value) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_config(model_dir: Path) -> dict:
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: {exc}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: not a JSON object")
    return config


def template_source(model_dir: Path, tokenizer_config: dict) -> str | None:
    """chat_template.jinja beside tokenizer.json wins over tokenizer_config.json's chat_template (as in
    transformers). A list of named templates (older configs) gives the one named "default"."""
    path = model_dir / "chat_template.jinja"
    if path.is_file():
        return path.read_text(encoding="utf-8")
    source = tokenizer_config.get("chat_template")
    if isinstance(source, list):
        source = next((t.get("template") for t in source if isinstance(t, dict) and t.get("name") == "default"), None)
    return source if isinstance(source, str) else None


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' override: jinja's own tojson escapes HTML characters.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):
    return datetime.now().strftime(format)


class _TemplateNamespace(jinja2.utils.Namespace):
    """namespace() that refuses underscore attributes (transformers' guard against sandbox escapes)."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _TemplateDict:
    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(
        raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_TemplateNamespace
    )
    return env


@dataclass(frozen=True)
class Message:
    role: str
    content: str


class ChatTemplate:
    """One compiled template plus the special tokens it sees; render() is pure and thread-safe."""

    def __init__(self, name: str, source: str, tokenizer_config: dict):
        try:
            self._template = _environment().from_string(source)
        except jinja2.exceptions.TemplateSyntaxError as exc:
            raise ConfigError(f"tokenizer {name!r}: chat template does not compile: {exc}") from None
        self.special_tokens = {
            key: text for key in SPECIAL_TOKEN_NAMES if (text := token_text(tokenizer_config.get(key))) is not None
        }

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self._template.render(
                messages=chat,
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except jinja2.exceptions.TemplateError as exc:
            # raise_exception() in the template (e.g. "roles must alternate"), or a sandbox refusal.
            raise InvalidArgument(f"the chat template refused these messages: {exc}") from None
