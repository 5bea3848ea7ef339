"""Request bodies of the OpenAI API subset the gateway serves (pydantic; unknown fields are ignored).

Types and ranges that cannot reach the router as they are (negative integers into unsigned proto
fields, max_tokens 0 which would mean "the server's default") are checked here; everything else
(temperature, top_p, the max_tokens cap, stop lengths) by the router, which names the field.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

UINT32 = 2**32 - 1
UINT64 = 2**64 - 1


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingBody(_Body):
    """Fields shared by chat and text completions."""

    model: str = ""  # "name", "name:<version>" or "name:<alias>"; empty = the configured default
    max_tokens: int | None = Field(None, ge=1, le=UINT32)
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = Field(None, ge=0, le=UINT64)
    stop: Any = None  # a string or a list of strings (checked in convert.stop_list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # becomes the sticky routing key
    n: int | None = None  # one choice per request: only 1
    # Not OpenAI's, accepted as extensions (vLLM's names).
    top_k: int | None = Field(None, ge=0, le=UINT32)
    repetition_penalty: float | None = None
    # OpenAI fields the engine has no equivalent for: refused unless neutral (convert.refuse_unsupported).
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logprobs: Any = None


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Body):
    # "developer" is OpenAI's newer name for the system turn.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class ChatCompletionRequest(SamplingBody):
    messages: list[ChatMessageIn] = Field(..., min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=UINT32)  # wins over max_tokens
    tools: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class CompletionRequest(SamplingBody):
    prompt: Any = None  # a string (or a one-string list)
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None


class EmbeddingRequest(_Body):
    model: str = ""
    input: Any = None  # a string or a list of strings
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
