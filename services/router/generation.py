"""Router.Generate: route to a generation version, tokenize, stream tokens from Triton, detokenize, stop.

    request ─ check limits ─ route (table) ─ prompt ids (tokenizer: chat template or plain text)
            ─ Triton ModelStreamInfer (decoupled, a response per chunk of tokens) ─ detokenize ─ stop match

Detokenizing runs here, in the router's process, with the tokenizer service's definition of the
tokenizer (services/router/detokenizers.py): no round trip per generated token.

Everything a request can be refused for is checked before Triton is asked to generate. Stop sequences
are matched here on the detokenized text (the engine has no stop strings on CPU): text that could be
the start of a stop sequence is held back until it cannot be, so no caller ever sees part of a match.
When the request ends early (stop match, caller cancel, deadline) the Triton stream is cancelled, and
Triton cancels the request in the model, which frees its sequence slot (docs/generation.md: when).
Shadowing: when the table picks a shadow generation version (same tokenizer), the same prompt ids and
parameters go to it after the caller's generation completed (a sampled request gets a seed, the same for
both, so the comparison means something); the two token id sequences are compared (shadow.compare_tokens).
No gRPC server types here: the servicer hands in plain values and gets Pieces back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import math
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import grpc
import numpy as np
from tritonclient.grpc import service_pb2

from services.router.config import GenerationLimits
from services.router.detokenizers import LocalDetokenizers
from services.router.dataplane import Dataplane, Deadline, ModelRef
from services.router.metrics import GENERATED_TOKENS, STREAMS_INFLIGHT, TIME_TO_FIRST_TOKEN
from services.router.routing import PostKind, PreKind, Route, VersionInfo
from services.router.shadow import compare_tokens
from services.router.version_stats import code_name
from services.router.triton_errors import NOT_SERVING_MARKER, not_serving_message
from services.shared import generation as contract
from services.shared.errors import FailedPrecondition, InvalidArgument, Unavailable, limit_error
from services.shared.tensors import from_proto
from services.shared.telemetry import annotate
from services.tokenizer.client import ended

ROLES = ("system", "user", "assistant")


class FinishReason(enum.IntEnum):
    """Mirrors maas.v1.FinishReason."""

    UNSPECIFIED = 0
    STOP = 1
    LENGTH = 2
    CANCELLED = 3


_FINISH = {
    contract.FINISH_STOP: FinishReason.STOP,
    contract.FINISH_LENGTH: FinishReason.LENGTH,
    contract.FINISH_CANCELLED: FinishReason.CANCELLED,
}


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 0  # 0 = the version's default
    temperature: float | None = None
    top_p: float | None = None
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    repetition_penalty: float | None = None


@dataclass(frozen=True)
class Prompt:
    """Exactly one of: raw text (no chat template), or chat messages as (role, content)."""

    text: str | None = None
    messages: tuple[tuple[str, str], ...] | None = None


@dataclass
class Piece:
    """One stream message: text and the ids behind it; the first carries route, the last finish + usage."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    route: Route | None = None
    finish: FinishReason = FinishReason.UNSPECIFIED
    usage: tuple[int, int] | None = None  # (prompt tokens, completion tokens)


# -- checks before any work ------------------------------------------------------------------------


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise InvalidArgument(f"{name} must be a finite number, got {value}")
    return value


def check_sampling(s: Sampling, limits: GenerationLimits) -> None:
    if s.max_tokens > limits.max_tokens:
        raise InvalidArgument(
            f"sampling.max_tokens {s.max_tokens} is over the limit of {limits.max_tokens} (MAAS_GENERATE_MAX_TOKENS)"
        )
    if s.temperature is not None and _finite(s.temperature, "sampling.temperature") < 0:
        raise InvalidArgument(f"sampling.temperature {s.temperature} must be >= 0 (0 = greedy)")
    if s.top_p is not None and not 0 < _finite(s.top_p, "sampling.top_p") <= 1:
        raise InvalidArgument(f"sampling.top_p {s.top_p} must be in (0, 1]")
    if s.top_k > 2**31 - 1:
        raise InvalidArgument(f"sampling.top_k {s.top_k} is too large (0 = off)")
    if s.repetition_penalty is not None and _finite(s.repetition_penalty, "sampling.repetition_penalty") <= 0:
        raise InvalidArgument(f"sampling.repetition_penalty {s.repetition_penalty} must be > 0 (1 = off)")
    if len(s.stop) > limits.max_stop:
        raise InvalidArgument(
            f"sampling.stop has {len(s.stop)} sequences, at most {limits.max_stop} (MAAS_GENERATE_MAX_STOP)"
        )
    for i, stop in enumerate(s.stop):
        if not stop:
            raise InvalidArgument(f"sampling.stop[{i}] is empty")
        if len(stop) > limits.max_stop_chars:
            raise InvalidArgument(
                f"sampling.stop[{i}] is {len(stop)} characters, at most {limits.max_stop_chars} "
                f"(MAAS_GENERATE_MAX_STOP_CHARS)"
            )


def check_prompt(p: Prompt, limits: GenerationLimits) -> None:
    if (p.text is None) == (p.messages is None):
        raise InvalidArgument("give exactly one of prompt or messages")
    if p.text is not None:
        if not p.text:
            raise InvalidArgument("prompt is empty")
        if len(p.text) > limits.max_prompt_chars:
            raise limit_error("prompt characters", limits.max_prompt_chars, len(p.text))
        return
    if not p.messages:
        raise InvalidArgument("messages is empty: give at least one message")
    if len(p.messages) > limits.max_messages:
        raise limit_error("number of messages", limits.max_messages, len(p.messages))
    for i, (role, content) in enumerate(p.messages):
        if role not in ROLES:
            raise InvalidArgument(f"messages[{i}].role {role[:40]!r} is not one of {', '.join(ROLES)}")
        if not content:
            raise InvalidArgument(f"messages[{i}].content is empty")
    total = sum(len(content) for _, content in p.messages)
    if total > limits.max_prompt_chars:
        raise limit_error("characters of all messages", limits.max_prompt_chars, total)


def check_generation_model(info: VersionInfo) -> None:
    if info.post_kind != PostKind.GENERATION:
        raise InvalidArgument(
            f"model {info.model!r} v{info.version} is not a generation model (postprocessing "
            f"{info.post_kind.name}); use Embed, Classify or Infer"
        )
    if info.pre_kind != PreKind.TOKENIZER or not info.pre_name:
        raise FailedPrecondition(
            f"model {info.model!r} v{info.version} has no tokenizer to build its prompt with "
            f"(register it with preprocessing tokenizer:<name>)"
        )


# -- stop sequences --------------------------------------------------------------------------------


class StopMatcher:
    """Finds the first stop sequence in the generated text, holding back what could start one.

    feed() takes each detokenized piece with its ids and returns what may be shown now: text that can
    no longer be part of a match, and the ids whose text (at least partly) is in it."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.held = ""
        self._ids: list[tuple[int, list[int]]] = []  # (offset in held, ids) not returned yet

    def _hold(self) -> int:
        """Length of the longest end of `held` that is a proper prefix of a stop sequence."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(self.held)), best, -1):
                if self.held.endswith(stop[:k]):
                    best = k
                    break
        return best

    def feed(self, text: str, ids: list[int]) -> tuple[str, list[int], bool]:
        self._ids.append((len(self.held), ids))
        self.held += text
        found = [i for i in (self.held.find(s) for s in self.stops) if i >= 0]
        cut = min(found) if found else len(self.held) - self._hold()
        out_ids = [i for offset, chunk in self._ids if offset < cut for i in chunk]
        self._ids = [(offset - cut, chunk) for offset, chunk in self._ids if offset >= cut]
        out, self.held = self.held[:cut], self.held[cut:]
        return out, out_ids, bool(found)

    def flush(self) -> tuple[str, list[int]]:
        out, ids = self.held, [i for _, chunk in self._ids for i in chunk]
        self.held, self._ids = "", []
        return out, ids


# -- Triton messages -------------------------------------------------------------------------------


def triton_request(info: VersionInfo, ids: list[int], max_tokens: int, s: Sampling) -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name=info.triton_model, model_version=info.triton_version)
    contract.add_input(request, "input_ids", ids)
    contract.add_input(request, "max_tokens", [max_tokens])
    optional = {  # None: not sent, the model's default applies (top_k 0 = off)
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k or None,
        "seed": s.seed,
        "repetition_penalty": s.repetition_penalty,
    }
    for name, value in optional.items():
        if value is not None:
            contract.add_input(request, name, [value])
    return request


def read_response(response: service_pb2.ModelInferResponse) -> tuple[list[int], str, tuple[int, int] | None]:
    """(new token ids, finish reason or "", usage or None) of one response of the contract."""
    ids, finish, usage = [], "", None
    for out, raw in zip(response.outputs, response.raw_output_contents):
        if out.name == "output_ids":
            ids = np.frombuffer(raw, dtype="<i8").tolist()
        elif out.name == "finish_reason" and len(raw) >= 4:
            size = int.from_bytes(raw[:4], "little")  # BYTES: 4-byte length, then the bytes
            finish = raw[4 : 4 + size].decode("utf-8", "replace")
        elif out.name == "usage" and len(raw) >= 8:
            prompt, completion = np.frombuffer(raw[:8], dtype="<i4").tolist()
            usage = (prompt, completion)
    return ids, finish, usage


def _int_parameter(params: dict[str, str], key: str, default: int) -> int:
    try:
        return int(params.get(key) or default)
    except ValueError:
        return default


class Generation:
    def __init__(self, plane: Dataplane, limits: GenerationLimits):
        self.plane, self.limits = plane, limits
        self.triton, self.tokenizer = plane.triton, plane.tokenizer
        self.detokenizers = LocalDetokenizers(plane.tokenizer)

    async def collect(self, ref: ModelRef, prompt: Prompt, sampling: Sampling, timeout: float | None) -> Piece:
        """GenerateUnary: the same stream, joined into one Piece."""
        whole = Piece()
        async for piece in self.stream(ref, prompt, sampling, timeout):
            whole.text += piece.text
            whole.token_ids += piece.token_ids
            whole.route = whole.route or piece.route
            whole.finish, whole.usage = piece.finish or whole.finish, piece.usage or whole.usage
        return whole

    async def stream(
        self, ref: ModelRef, prompt: Prompt, sampling: Sampling, timeout: float | None
    ) -> AsyncIterator[Piece]:
        started = time.perf_counter()
        check_sampling(sampling, self.limits)
        check_prompt(prompt, self.limits)
        route = self.plane.route(ref)
        info = route.info
        check_generation_model(info)
        route = dataclasses.replace(route, shadow=comparable_shadow(info, route.shadow))
        if route.shadow is not None and sampling.seed is None and (sampling.temperature or 0) > 0:
            sampling = dataclasses.replace(sampling, seed=secrets.randbits(63))  # the same draw for both
        deadline = Deadline(timeout if timeout is not None else self.limits.default_timeout)
        STREAMS_INFLIGHT.inc()
        error = None
        try:
            max_tokens, context = await self._limits(info, sampling, deadline)
            ids = await self._prompt_ids(info, prompt, deadline)
            if context and len(ids) + max_tokens > context:
                raise InvalidArgument(
                    f"prompt is {len(ids)} tokens; with max_tokens {max_tokens} that is over the "
                    f"context of {context} tokens of model {info.model!r} v{info.version}"
                )
            annotate(prompt_tokens=len(ids), max_tokens=max_tokens)
            generated: list[int] = []
            async for piece in self._generate(route, ids, max_tokens, sampling, deadline, started):
                generated += piece.token_ids
                if route.shadow is not None and piece.finish in (FinishReason.STOP, FinishReason.LENGTH):
                    self._shadow(route, ids, max_tokens, sampling, generated, (time.perf_counter() - started) * 1000)
                yield piece
        except GeneratorExit:  # the caller stopped reading (went away)
            error = grpc.StatusCode.CANCELLED.name
            raise
        except BaseException as exc:
            error = code_name(exc)
            raise
        finally:
            STREAMS_INFLIGHT.dec()
            # The stream counts against its version in the rollout figures (version_stats.py): answered
            # with its whole duration, or failed by code (a caller's cancel is CANCELLED, not a canary error).
            if self.plane.version_stats is not None:
                self.plane.version_stats.record(info.model, info.version, error, time.perf_counter() - started)

    def _shadow(
        self, route: Route, ids: list[int], max_tokens: int, sampling: Sampling, generated: list[int], ms: float
    ) -> None:
        """Mirror the completed generation to the shadow version (the shadow runner's task and deadline)."""
        runner, shadow = self.plane.shadow, route.shadow
        primary_ids = np.asarray(generated, dtype=np.int64)

        async def primary_output() -> np.ndarray:
            return primary_ids

        async def shadow_output() -> np.ndarray:
            deadline, out = Deadline(runner.timeout), []
            copy = Route(shadow, route.kind, route.target, None)
            async for piece in self._generate(copy, ids, max_tokens, sampling, deadline, 0.0, count=False):
                out += piece.token_ids
            return np.asarray(out, dtype=np.int64)

        runner.submit(route.info, shadow, primary_output, shadow_output, ms, comparator=compare_tokens)

    async def _limits(self, info: VersionInfo, sampling: Sampling, deadline: Deadline) -> tuple[int, int]:
        """(max_tokens to ask for, context length or 0): the router's caps and the version's own."""
        params = await self.triton.model_parameters(info.triton_model, info.triton_version, deadline.remaining())
        cap = min(self.limits.max_tokens, _int_parameter(params, contract.PARAM_MAX_TOKENS_CAP, self.limits.max_tokens))
        if sampling.max_tokens > cap:
            raise InvalidArgument(
                f"sampling.max_tokens {sampling.max_tokens} is over the limit of {cap} of model "
                f"{info.model!r} v{info.version}"
            )
        default = _int_parameter(params, contract.PARAM_DEFAULT_MAX_TOKENS, contract.DEFAULT_DEFAULT_MAX_TOKENS)
        return sampling.max_tokens or min(default, cap), _int_parameter(params, contract.PARAM_CONTEXT_LENGTH, 0)

    async def _prompt_ids(self, info: VersionInfo, prompt: Prompt, deadline: Deadline) -> list[int]:
        if prompt.messages is not None:
            ids = await self.tokenizer.chat_template(info.pre_name, list(prompt.messages), deadline.remaining())
        else:
            tokenized = await self.tokenizer.tokenize(info.pre_name, [prompt.text], deadline.remaining())
            if tokenized.truncated and tokenized.truncated[0]:
                length = tokenized.original_lengths[0] if tokenized.original_lengths else "more"
                raise InvalidArgument(
                    f"prompt is {length} tokens, over the longest text tokenizer {info.pre_name!r} takes"
                )
            tensor = next((t for t in tokenized.tensors if t.name == "input_ids"), None)
            if tensor is None:
                raise FailedPrecondition(f"tokenizer {info.pre_name!r} returned no input_ids")
            ids = from_proto(tensor).reshape(-1).tolist()
        if not ids:
            raise InvalidArgument("the prompt has no tokens")
        return ids

    async def _generate(
        self,
        route: Route,
        ids: list[int],
        max_tokens: int,
        sampling: Sampling,
        deadline: Deadline,
        started: float,
        count: bool = True,
    ) -> AsyncIterator[Piece]:
        """`count`: False for a shadow copy (its tokens are not the callers' generated tokens)."""
        info = route.info
        stops = StopMatcher(sampling.stop)
        first, sent, matched = True, 0, False
        finish = FinishReason.UNSPECIFIED
        tokens = GENERATED_TOKENS.labels(info.model, str(info.version)) if count else _NoCount()
        detokenizer = await self.detokenizers.decoder(info.pre_name, deadline.remaining())
        async with self.triton.stream(deadline.remaining()) as call:
            try:
                await call.write(triton_request(info, ids, max_tokens, sampling))
                await call.done_writing()
            except asyncio.InvalidStateError:  # the stream ended before it started (Triton died)
                raise await ended(call, f"Triton's stream of model {info.model!r} v{info.version}") from None
            async for response in call:
                if response.error_message:
                    raise _triton_failure(info, response.error_message)
                new_ids, reason, _ = read_response(response.infer_response)
                if new_ids:
                    if started:
                        TIME_TO_FIRST_TOKEN.labels(info.model).observe(time.perf_counter() - started)
                        started = 0.0
                    text, shown, matched = stops.feed(detokenizer.step(new_ids), new_ids)
                    if text or shown:
                        sent += len(shown)
                        tokens.inc(len(shown))
                        yield Piece(text, shown, route if first else None)
                        first = False
                    if matched:
                        finish = FinishReason.STOP
                        break  # leaving the block cancels the Triton stream: the model stops
                if reason:
                    finish = _FINISH.get(reason, FinishReason.UNSPECIFIED)
                    break
            else:
                raise Unavailable(
                    f"Triton ended the stream of model {info.model!r} v{info.version} before its final response"
                )
            text, shown = "", []
            if not matched:  # what the detokenizer held back (a character cut at the end)
                text, shown, matched = stops.feed(detokenizer.step([], flush=True), [])
                if matched:
                    finish = FinishReason.STOP
        if not matched:  # after a match the rest is never shown
            rest, rest_ids = stops.flush()
            text, shown = text + rest, shown + rest_ids
        sent += len(shown)
        tokens.inc(len(shown))
        yield Piece(text, shown, route if first else None, finish, (len(ids), sent))


class _NoCount:
    def inc(self, amount: float = 1) -> None:
        pass


def comparable_shadow(info: VersionInfo, shadow: VersionInfo | None) -> VersionInfo | None:
    """The shadow version when its token ids can be compared with the primary's: a generation model with
    the same tokenizer (the same prompt ids then mean the same prompt); otherwise no shadow copy."""
    if shadow is None or shadow.post_kind != PostKind.GENERATION:
        return None
    if (shadow.pre_kind, shadow.pre_name) != (info.pre_kind, info.pre_name):
        return None
    return shadow


def _triton_failure(info: VersionInfo, message: str) -> Exception:
    """An error response of the model: its own input checks name the input (INVALID_ARG); anything else
    failed in Triton or the engine."""
    if message.startswith("input '") or "input '" in message[:80]:
        return InvalidArgument(f"model {info.model!r} v{info.version}: {message}")
    if message.startswith(NOT_SERVING_MARKER):  # the replica has not (re)loaded the READY version yet
        return Unavailable(not_serving_message(info.triton_model, info.triton_version, message))
    return Unavailable(f"Triton failed the generation on model {info.model!r} v{info.version}: {message}")
