"""Python-based Triton backend named "onnxruntime_genai": a decoupled text-generation model whose
generation loop (KV cache, sampling) is ONNX Runtime GenAI's, one `og.Generator` per sequence.

The contract (inputs, one response per token, the final response) is in docs/generation.md. Triton has
no native backend for it, so this same file serves on the official GPU image too (with onnxruntime-genai
installed in its Python environment).

Sequences are decoded by one scheduler thread, one token each in turn, so a new request starts after
at most one decode step of every running sequence, and a cancelled one stops within one step. (ONNX
Runtime GenAI's continuous-batching Engine needs paged attention, which its CPU build does not have;
its static-batch Engine on CPU has no per-request seeds, so it cannot serve this contract.)
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime_genai as og
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_SEED_RANGE = 2**31  # ONNX Runtime GenAI's random_seed is a 32-bit int: seeds are taken modulo this


class BadRequest(ValueError):
    """Input the model refuses: answered with INVALID_ARG, naming the input."""


@dataclass
class Limits:
    vocab_size: int
    context_length: int
    max_tokens_cap: int
    default_max_tokens: int
    stop_ids: frozenset[int]


@dataclass
class Sequence:
    request: object
    sender: object
    prompt: np.ndarray
    max_tokens: int
    search: dict
    stop_ids: frozenset[int]
    generator: object = None
    generated: int = 0
    finish: str = ""
    pending: list = field(default_factory=list)


def _scalar(request, name: str, kind: type, default):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        return default
    values = tensor.as_numpy().reshape(-1)
    if values.size != 1:
        raise BadRequest(f"input '{name}' must hold one value, got {values.size}")
    value = kind(values[0])
    if kind is float and not math.isfinite(value):
        raise BadRequest(f"input '{name}' must be a finite number, got {value}")
    return value


def parse(request, sender, limits: Limits) -> Sequence:
    """Every check that can refuse a request, before any compute."""
    ids_tensor = pb_utils.get_input_tensor_by_name(request, "input_ids")
    ids = ids_tensor.as_numpy().reshape(-1).astype(np.int64) if ids_tensor is not None else np.empty(0, np.int64)
    if ids.size == 0:
        raise BadRequest("input 'input_ids' is empty: the prompt needs at least one token")
    bad = np.flatnonzero((ids < 0) | (ids >= limits.vocab_size))
    if bad.size:
        raise BadRequest(f"input 'input_ids'[{bad[0]}] = {ids[bad[0]]} is outside the vocabulary "
                         f"[0, {limits.vocab_size})")
    max_tokens = _scalar(request, "max_tokens", int, limits.default_max_tokens)
    if not 0 < max_tokens <= limits.max_tokens_cap:
        raise BadRequest(f"input 'max_tokens' = {max_tokens} must be in [1, {limits.max_tokens_cap}]")
    if ids.size + max_tokens > limits.context_length:
        raise BadRequest(f"input 'input_ids' has {ids.size} tokens; with max_tokens {max_tokens} that is over "
                         f"the model's context of {limits.context_length} tokens")
    temperature = _scalar(request, "temperature", float, 0.0)
    if temperature < 0:
        raise BadRequest(f"input 'temperature' = {temperature} must be >= 0")
    top_p = _scalar(request, "top_p", float, 1.0)
    if not 0 < top_p <= 1:
        raise BadRequest(f"input 'top_p' = {top_p} must be in (0, 1]")
    top_k = _scalar(request, "top_k", int, 0)
    if top_k < 0:
        raise BadRequest(f"input 'top_k' = {top_k} must be >= 0 (0 = off)")
    penalty = _scalar(request, "repetition_penalty", float, 1.0)
    if penalty <= 0:
        raise BadRequest(f"input 'repetition_penalty' = {penalty} must be > 0")
    seed = _scalar(request, "seed", int, None)
    extra = pb_utils.get_input_tensor_by_name(request, "stop_token_ids")
    stop_ids = limits.stop_ids | frozenset(int(i) for i in (extra.as_numpy().reshape(-1) if extra is not None else ()))
    search = {
        "max_length": int(ids.size + max_tokens),
        "do_sample": temperature > 0,
        "temperature": temperature if temperature > 0 else 1.0,
        "top_p": top_p,
        "top_k": top_k if top_k > 0 else limits.vocab_size,
        "repetition_penalty": penalty,
        "random_seed": (seed if seed is not None else int.from_bytes(os.urandom(4), "little")) % _SEED_RANGE,
    }
    return Sequence(request, sender, ids, max_tokens, search, stop_ids)


def _response(ids: list[int], finish: str, usage: tuple[int, int]):
    return pb_utils.InferenceResponse(output_tensors=[
        pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int64)),
        pb_utils.Tensor("finish_reason", np.asarray([finish.encode()], dtype=np.object_)),
        pb_utils.Tensor("usage", np.asarray(usage, dtype=np.int32)),
    ])


class Scheduler(threading.Thread):
    """Owns the engine: every og call happens on this thread."""

    def __init__(self, model, max_sequences: int, logger):
        super().__init__(name="generation-scheduler", daemon=True)
        self.model, self.max_sequences, self.log = model, max_sequences, logger
        self.incoming: queue.Queue[Sequence | None] = queue.Queue()
        self.active: list[Sequence] = []
        self.stopping = False

    def submit(self, seq: Sequence) -> None:
        self.incoming.put(seq)

    def stop(self) -> None:
        self.stopping = True
        self.incoming.put(None)
        self.join(timeout=30)

    def run(self) -> None:
        while not self.stopping:
            self._admit(block=not self.active)
            for seq in list(self.active):
                self._step(seq)
        for seq in self.active:  # model unloading: end every open stream
            self._finish(seq, "cancelled")

    def _admit(self, block: bool) -> None:
        while len(self.active) < self.max_sequences:
            try:
                seq = self.incoming.get(block=block)
            except queue.Empty:
                return
            if seq is None:
                return
            block = False
            try:
                params = og.GeneratorParams(self.model)
                params.set_search_options(**seq.search)
                seq.generator = og.Generator(self.model, params)
                seq.generator.append_tokens(seq.prompt.astype(np.int32))  # the prefill
            except Exception as exc:  # noqa: BLE001 - the engine raises RuntimeError with its reason
                self._fail(seq, f"generation could not start: {exc}")
                continue
            self.active.append(seq)

    def _step(self, seq: Sequence) -> None:
        if seq.sender.is_cancelled():
            self._finish(seq, "cancelled")
            return
        try:
            seq.generator.generate_next_token()
            token = int(seq.generator.get_next_tokens()[0])
        except Exception as exc:  # noqa: BLE001
            self._fail(seq, f"generation failed after {seq.generated} tokens: {exc}")
            return
        if token in seq.stop_ids:
            self._finish(seq, "stop")
            return
        seq.generated += 1
        seq.sender.send(_response([token], "", (seq.prompt.size, seq.generated)))
        if seq.generated >= seq.max_tokens or seq.generator.is_done():
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str) -> None:
        self._release(seq)
        if reason == "cancelled":
            self.log.log_info(f"generation cancelled after {seq.generated} tokens (request {seq.request.request_id()!r})")
        seq.sender.send(_response([], reason, (seq.prompt.size, seq.generated)), flags=FINAL)

    def _fail(self, seq: Sequence, message: str) -> None:
        self.log.log_error(message)
        self._release(seq)
        seq.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)),
                        flags=FINAL)

    def _release(self, seq: Sequence) -> None:
        if seq in self.active:
            self.active.remove(seq)
        seq.generator = None  # frees the KV cache now, not at the next GC


def _parameter(config: dict, key: str, default: int) -> int:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return int(value) if value else default


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise ValueError(f"{config['name']}: the onnxruntime_genai backend needs "
                             "model_transaction_policy { decoupled: true }")
        folder = Path(args["model_repository"]) / args["model_version"]
        genai = json.loads((folder / "genai_config.json").read_text())["model"]
        eos = genai.get("eos_token_id", [])
        self.limits = Limits(
            vocab_size=int(genai["vocab_size"]),
            context_length=int(genai["context_length"]),
            max_tokens_cap=_parameter(config, "max_tokens_cap", 1024),
            default_max_tokens=_parameter(config, "default_max_tokens", 64),
            stop_ids=frozenset(eos if isinstance(eos, list) else [eos]),
        )
        self.model = og.Model(str(folder))
        self.scheduler = Scheduler(self.model, _parameter(config, "max_sequences", 16), pb_utils.Logger)
        self.scheduler.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.scheduler.submit(parse(request, sender, self.limits))
            except BadRequest as exc:
                error = pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG)
                sender.send(pb_utils.InferenceResponse(error=error), flags=FINAL)
        return None

    def finalize(self):
        self.scheduler.stop()
        self.model = None
