"""OpenAI request bodies ⇄ maas.v1.Router messages. Plain functions, no I/O.

`model` is "name" (the model's traffic policy picks the version), "name:<version>" (a version
number) or "name:<alias>" (e.g. "smollm2:canary"); `user` is the sticky routing key. Answers name
the version that answered as "name:<version>" in `model`, plus a non-standard `routed` object.
"""

from __future__ import annotations

import base64
import secrets
import time
from typing import Any

import numpy as np

from maas.v1 import router_pb2, tensor_pb2
from services.openai.errors import invalid
from services.openai.schemas import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, SamplingBody

FINISH_REASONS: dict[int, str] = {
    router_pb2.FINISH_REASON_STOP: "stop",
    router_pb2.FINISH_REASON_LENGTH: "length",
    # The client is gone (or its deadline passed): nobody reads this, "stop" keeps the OpenAI enum.
    router_pb2.FINISH_REASON_CANCELLED: "stop",
}
_ROUTE_KINDS = {
    v: tensor_pb2.RouteKind.Name(v).removeprefix("ROUTE_KIND_").lower() for v in tensor_pb2.RouteKind.values()
}


def model_ref(model: str, default: str, routing_key: str | None) -> tensor_pb2.ModelRef:
    name, _, selector = (model or default).partition(":")
    if not name:
        raise invalid("model", f"{model!r} names no model; use name, name:<version> or name:<alias>")
    ref = tensor_pb2.ModelRef(name=name, routing_key=routing_key or "")
    if ":" in (model or default) and not selector:
        raise invalid("model", f"{model!r}: nothing after ':'; use name:<version> or name:<alias>")
    if selector.isdigit():
        if int(selector) <= 0:
            raise invalid("model", f"{model!r}: versions start at 1")
        ref.version = int(selector)
    elif selector:
        ref.alias = selector
    return ref


def _strings(value: Any, param: str, what: str) -> list[str]:
    """A string or a list of strings (token-id arrays are not supported)."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return list(value)
    raise invalid(param, f"must be {what} (a string or a list of strings; token arrays are not supported)")


_NEUTRAL: dict[str, tuple] = {
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False, 0),
    "tools": (None, []),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
}


def refuse_unsupported(body) -> None:
    for name, neutral in _NEUTRAL.items():
        if name in type(body).model_fields and getattr(body, name) not in neutral:
            raise invalid(
                name,
                f"{getattr(body, name)!r} is not supported by this server "
                f"(leave it out{'' if neutral[-1] in (None, [], '') else f' or use {neutral[-1]!r}'})",
            )
    fmt = getattr(body, "response_format", None)
    if fmt and fmt.get("type", "text") != "text":
        raise invalid("response_format", f'type {fmt.get("type")!r} is not supported (only "text")')


def sampling(body: SamplingBody) -> router_pb2.SamplingParams:
    params = router_pb2.SamplingParams(
        max_tokens=getattr(body, "max_completion_tokens", None) or body.max_tokens or 0, top_k=body.top_k or 0
    )
    for name in ("temperature", "top_p", "seed", "repetition_penalty"):
        if getattr(body, name) is not None:
            setattr(params, name, getattr(body, name))
    if body.stop is not None:
        params.stop.extend(_strings(body.stop, "stop", "the stop sequence(s)"))
    return params


def _text(content, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.text for part in content)


def chat_request(body: ChatCompletionRequest, default_model: str) -> router_pb2.GenerateRequest:
    refuse_unsupported(body)
    messages = [
        router_pb2.ChatMessage(role="system" if m.role == "developer" else m.role, content=_text(m.content, i))
        for i, m in enumerate(body.messages)
    ]
    return router_pb2.GenerateRequest(
        model=model_ref(body.model, default_model, body.user),
        messages=router_pb2.ChatMessages(messages=messages),
        sampling=sampling(body),
    )


def completion_request(body: CompletionRequest, default_model: str) -> router_pb2.GenerateRequest:
    refuse_unsupported(body)
    if body.prompt is None:
        raise invalid("prompt", "Field required")
    prompts = _strings(body.prompt, "prompt", "the prompt")
    if len(prompts) != 1:
        raise invalid("prompt", f"one prompt per request is supported, got {len(prompts)}")
    return router_pb2.GenerateRequest(
        model=model_ref(body.model, default_model, body.user), prompt=prompts[0], sampling=sampling(body)
    )


def embed_request(body: EmbeddingRequest, default_model: str) -> router_pb2.EmbedRequest:
    if body.input is None:
        raise invalid("input", "Field required")
    return router_pb2.EmbedRequest(
        model=model_ref(body.model, default_model, body.user),
        texts=_strings(body.input, "input", "the text(s) to embed"),
    )


# -- answers -------------------------------------------------------------------------------------------
def completion_id(kind: str) -> str:
    return f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{secrets.token_hex(12)}"


def routed(decision: tensor_pb2.RoutingDecision) -> dict:
    return {
        "model": decision.model,
        "version": decision.version,
        "kind": _ROUTE_KINDS.get(decision.kind, ""),
        "target": decision.target,
        "shadowed": decision.shadowed,
    }


def model_name(decision: tensor_pb2.RoutingDecision) -> str:
    return f"{decision.model}:{decision.version}"


def usage(u: router_pb2.Usage) -> dict:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
    }


def chat_response(r: router_pb2.GenerateResponse) -> dict:
    return {
        "id": completion_id("chat"),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name(r.routed),
        "system_fingerprint": model_name(r.routed),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": r.text, "refusal": None},
                "logprobs": None,
                "finish_reason": FINISH_REASONS.get(r.finish_reason, "stop"),
            }
        ],
        "usage": usage(r.usage),
        "routed": routed(r.routed),
    }


def completion_response(r: router_pb2.GenerateResponse) -> dict:
    return {
        "id": completion_id("text"),
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name(r.routed),
        "system_fingerprint": model_name(r.routed),
        "choices": [
            {"index": 0, "text": r.text, "logprobs": None, "finish_reason": FINISH_REASONS.get(r.finish_reason, "stop")}
        ],
        "usage": usage(r.usage),
        "routed": routed(r.routed),
    }


def embeddings_response(r: router_pb2.EmbedResponse, body: EmbeddingRequest) -> dict:
    if body.dimensions is not None and body.dimensions != r.dimensions:
        raise invalid("dimensions", f"{body.dimensions} is not the model's size ({r.dimensions}); leave it out")
    if body.encoding_format == "base64":  # what the official client asks for by default: float32 LE bytes
        items: list[str] | list[list[float]] = [
            base64.b64encode(np.asarray(e.values, "<f4").tobytes()).decode() for e in r.embeddings
        ]
    else:
        items = [list(e.values) for e in r.embeddings]
    # The router does not count embedding tokens: usage is reported as 0.
    return {
        "object": "list",
        "model": model_name(r.routed),
        "routed": routed(r.routed),
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(items)],
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }


class StreamChunks:
    """The SSE chunks of one streamed completion, in OpenAI's exact format (chat or text)."""

    def __init__(self, kind: str, include_usage: bool):
        self.kind, self.include_usage = kind, include_usage
        self.id, self.created = completion_id(kind), int(time.time())
        self.model = self.routed_model = ""
        self.object = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def _chunk(self, choice: dict | None, usage_: dict | None = None) -> dict:
        chunk = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.model,
            "choices": [choice] if choice is not None else [],
        }
        if self.include_usage:
            chunk["usage"] = usage_
        return chunk

    def _choice(self, text: str | None, finish: str | None, role: bool = False) -> dict:
        if self.kind == "chat":
            delta: dict = (
                {"role": "assistant", "content": text or ""}
                if role
                else ({"content": text} if text is not None else {})
            )
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}

    def first(self, decision: tensor_pb2.RoutingDecision) -> dict:
        self.model, self.routed_model = model_name(decision), decision.model
        chunk = self._chunk(self._choice("", None, role=True))
        chunk["routed"] = routed(decision)
        return chunk

    def text(self, piece: str) -> dict:
        return self._chunk(self._choice(piece, None))

    def finish(self, reason: int) -> dict:
        return self._chunk(self._choice(None, FINISH_REASONS.get(reason, "stop")))

    def usage(self, u: router_pb2.Usage) -> dict | None:
        return self._chunk(None, usage(u)) if self.include_usage else None
