"""The Playground's calls: chat (streamed, or whole when the browser runs no script), embeddings with
their similarity matrix, image classification. Each is one router call and says which version
answered, why, how long it took and its trace id.

The console's own limits (texts, characters, tokens, upload bytes) are checked before the router is
called; everything else (an image that does not decode, one over the vision service's caps, a bad
sampling value) is the router's answer, shown as it said it.

A router with auth on needs a tenant's API key on every call: the user enters it on the page, the
browser keeps it as a session cookie scripts cannot read (API_KEY_COOKIE), and each call sends it as
`authorization: Bearer <key>`; the console keeps no copy.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np

from maas.auth import bearer
from maas.client import finish_reason
from maas.v1 import router_pb2
from services.console.config import ConsoleLimits
from services.console.mesh import Mesh, Refused, invalid, model_ref

log = logging.getLogger(__name__)

# The playground's API key: a session cookie (gone when the browser closes), HttpOnly, for /playground only.
API_KEY_COOKIE = "maas_console_api_key"


def _sse(payload: dict) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _number(text: str, field: str, kind=float, low=None, high=None):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise invalid(field, f"{field} must be a number, got {text!r}") from None
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(field, f"{field} must be in [{low}, {high}], got {text!r}")
    return value


class Playground:
    def __init__(self, mesh: Mesh, limits: ConsoleLimits):
        self.mesh, self.limits = mesh, limits

    @property
    def timeout(self) -> float:
        return self.mesh.config.default_timeout

    def chat_request(
        self,
        model: str,
        target: str,
        message: str,
        system: str,
        max_tokens: str,
        temperature: str,
        history: str = "",
    ) -> router_pb2.GenerateRequest:
        """`history`: the conversation so far, JSON [{"role": "user"|"assistant", "content": ...}] (the page
        keeps it; the console keeps nothing), sent again before the new message."""
        limit = self.limits.max_text_chars
        if not message.strip():
            raise invalid("message", "write a message")
        for field, text in (("message", message), ("system", system)):
            if len(text) > limit:
                raise invalid(field, f"{field} is {len(text)} characters, over the console's limit of {limit}")
        turns = ([router_pb2.ChatMessage(role="system", content=system)] if system.strip() else []) + [
            router_pb2.ChatMessage(role=role, content=content) for role, content in self.conversation(history)
        ]
        turns.append(router_pb2.ChatMessage(role="user", content=message))
        sampling = router_pb2.SamplingParams(
            max_tokens=_number(max_tokens or "128", "max_tokens", int, 1, self.limits.max_chat_tokens),
            temperature=_number(temperature or "0", "temperature", float, 0.0, 2.0),
        )
        return router_pb2.GenerateRequest(
            model=model_ref(model, target), messages=router_pb2.ChatMessages(messages=turns), sampling=sampling
        )

    def conversation(self, history: str) -> list[tuple[str, str]]:
        """The earlier turns of a chat, checked: roles user/assistant, at most max_chat_turns, each within
        the message limit (the model's context bounds the rest: the router says so, INVALID_ARGUMENT)."""
        if not history.strip():
            return []
        try:
            turns = json.loads(history)
        except ValueError:
            raise invalid("history", "the conversation is not JSON") from None
        if not isinstance(turns, list) or not all(
            isinstance(t, dict) and isinstance(t.get("content"), str) and t.get("role") in ("user", "assistant")
            for t in turns
        ):
            raise invalid("history", 'the conversation must be a list of {"role": "user"|"assistant", "content": text}')
        if len(turns) > self.limits.max_chat_turns:
            raise invalid(
                "history",
                f"the conversation has {len(turns)} earlier messages, over the console's limit of "
                f"{self.limits.max_chat_turns}: start a new one",
            )
        for i, t in enumerate(turns):
            if len(t["content"]) > self.limits.max_text_chars:
                raise invalid(
                    "history", f"message {i + 1} of the conversation is over {self.limits.max_text_chars} characters"
                )
        return [(t["role"], t["content"]) for t in turns]

    async def chat_unary(self, request: router_pb2.GenerateRequest, api_key: str = "") -> dict:
        started = time.perf_counter()
        with self.mesh.traced("console.chat") as trace_id:
            try:
                answer = await self.mesh.router.GenerateUnary(request, timeout=self.timeout, metadata=bearer(api_key))
            except grpc.aio.AioRpcError as exc:
                raise Refused.from_rpc(exc) from None
        asked = [m for m in request.messages.messages if m.role != "system"]
        conversation = [{"role": m.role, "content": m.content} for m in asked]
        conversation.append({"role": "assistant", "content": answer.text})
        return {
            "text": answer.text,
            "question": conversation[-2]["content"],
            # What the page sends back with the next message (kept in the form, not by the console).
            "history": json.dumps(conversation[-self.limits.max_chat_turns :]),
            "turns": conversation[:-2],  # the earlier exchanges, shown above this one
            "prompt_tokens": answer.usage.prompt_tokens,
            "finish_reason": finish_reason(answer.finish_reason),
            "completion_tokens": answer.usage.completion_tokens,
            "answered": self.mesh.answered(answer.routed, started, trace_id).as_dict(),
        }

    async def chat_stream(self, request: router_pb2.GenerateRequest, api_key: str = "") -> AsyncIterator[bytes]:
        """Waits for the router's first message (so a refusal is a plain error answer), then yields
        server-sent events: routed, one per text piece, done. Closing the iterator (the browser's Stop,
        or it went away) cancels the router call, and with it the Triton request."""
        started = time.perf_counter()
        with self.mesh.traced("console.chat") as trace_id:
            call = self.mesh.router.Generate(request, timeout=self.timeout, metadata=bearer(api_key))
        messages = call.__aiter__()
        try:
            first = await anext(messages, None)
        except grpc.aio.AioRpcError as exc:
            raise Refused.from_rpc(exc) from None
        if first is None:
            raise Refused(502, "UNAVAILABLE", "the router ended the stream without an answer")
        answered = self.mesh.answered(first.routed, started, trace_id).as_dict()
        return self._events(call, messages, first, answered, started)

    @staticmethod
    async def _events(call, messages, message, answered: dict, started: float):
        yield _sse({"type": "routed", **answered})
        first_text_ms, pieces, finished = None, 0, False
        try:
            while message is not None:
                if message.text:
                    pieces += 1
                    if first_text_ms is None:
                        first_text_ms = round((time.perf_counter() - started) * 1000, 1)
                    yield _sse({"type": "text", "text": message.text})
                if message.finish_reason:
                    yield _sse(
                        {
                            "type": "done",
                            "finish_reason": finish_reason(message.finish_reason),
                            "completion_tokens": message.usage.completion_tokens,
                            "prompt_tokens": message.usage.prompt_tokens,
                            "pieces": pieces,
                            "first_text_ms": first_text_ms,
                            "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                        }
                    )
                    finished = True
                message = await anext(messages, None)
        except grpc.aio.AioRpcError as exc:
            finished = True
            yield _sse({"type": "error", "code": exc.code().name, "message": exc.details() or exc.code().name})
        finally:
            if not finished:
                log.info("chat stopped by the browser: cancelling the router call", extra={"pieces": pieces})
            call.cancel()  # a no-op after the last message

    async def embed(self, model: str, target: str, text: str, api_key: str = "") -> dict:
        texts = [line.strip() for line in text.splitlines() if line.strip()]
        if not texts:
            raise invalid("texts", "write at least one sentence (one per line)")
        if len(texts) > self.limits.max_texts:
            raise invalid("texts", f"{len(texts)} sentences, over the console's limit of {self.limits.max_texts}")
        for i, t in enumerate(texts):
            if len(t) > self.limits.max_text_chars:
                raise invalid(
                    "texts",
                    f"sentence {i + 1} is {len(t)} characters, over the console's limit of "
                    f"{self.limits.max_text_chars}",
                )
        started = time.perf_counter()
        with self.mesh.traced("console.embed") as trace_id:
            try:
                answer = await self.mesh.router.Embed(
                    router_pb2.EmbedRequest(model=model_ref(model, target), texts=texts),
                    timeout=self.timeout,
                    metadata=bearer(api_key),
                )
            except grpc.aio.AioRpcError as exc:
                raise Refused.from_rpc(exc) from None
        answered = self.mesh.answered(answer.routed, started, trace_id).as_dict()
        vectors = np.array([e.values for e in answer.embeddings], dtype=np.float32)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        unit = vectors / np.where(norms == 0, 1, norms)
        similarity = (unit @ unit.T).round(3).tolist()
        return {
            "texts": texts,
            "similarity": similarity,
            "dimensions": answer.dimensions,
            "truncated": list(answer.truncated),
            "answered": answered,
        }

    async def classify(self, model: str, target: str, image: bytes, filename: str, api_key: str = "") -> dict:
        if not image:
            raise invalid("image", "choose an image file")
        started = time.perf_counter()
        with self.mesh.traced("console.classify") as trace_id:
            try:
                answer = await self.mesh.router.Classify(
                    router_pb2.ClassifyRequest(model=model_ref(model, target), images=[image], top_k=5),
                    timeout=self.timeout,
                    metadata=bearer(api_key),
                )
            except grpc.aio.AioRpcError as exc:
                raise Refused.from_rpc(exc) from None
        answered = self.mesh.answered(answer.routed, started, trace_id).as_dict()
        classes = [
            {"label": c.label or f"class {c.index}", "index": c.index, "percent": round(c.score * 100, 2)}
            for c in (answer.results[0].classes if answer.results else [])
        ]
        return {"filename": filename, "bytes": len(image), "classes": classes, "answered": answered}
