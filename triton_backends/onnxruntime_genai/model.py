"""Python-based Triton backend named "onnxruntime_genai": a decoupled text-generation model whose
generation loop (KV cache, sampling) is ONNX Runtime GenAI's.

The contract (inputs, the streamed token responses, the final response) is in docs/generation.md. Triton has
no native backend for it, so this same file serves on the official GPU image too (with onnxruntime-genai
installed in its Python environment).

Batched decoding: requests that arrive while others run are grouped, by compatible sampling settings,
into one `og.Generator` with several rows (right-padded with the `batch_pad_token_id` parameter), so
their decode steps share matrix multiplications. Such a batch cannot take rows once started, so a new
batch forms from whatever waits at each turn; one scheduler thread steps every batch in turn, so a new
request starts after at most one decode step of every running batch. A sequence that must be exact on
its own runs alone: a seeded sample (its random stream must not depend on neighbours), a repetition
penalty (it would count the padding), a prompt holding the pad id. (ONNX Runtime GenAI's
continuous-batching Engine needs paged attention, which its builder exports for CUDA only; its
static-batch Engine on CPU has no per-request seeds and measured slower than a batched Generator.)
After the first token, tokens go out `stream_interval_tokens` to a response: each response is a round
trip to Triton's process on the cores the engine decodes on (docs/generation.md has the figures).
"""

from __future__ import annotations

import json
import math
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime_genai as og
import triton_python_backend_utils as pb_utils

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
_GATHER_S = 0.001
_SEED_RANGE = 2**31  # ONNX Runtime GenAI's random_seed is a 32-bit int: seeds are taken modulo this


class BadRequest(ValueError):
    """Input the model refuses: answered with INVALID_ARG, naming the input."""


class Busy(RuntimeError):
    """The queue is full: answered with UNAVAILABLE."""


@dataclass
class Limits:
    vocab_size: int
    context_length: int
    pad_token_id: int
    max_tokens_cap: int
    default_max_tokens: int
    stop_ids: frozenset[int]


@dataclass
class Sequence:
    request: Any  # Triton's pb_utils.InferenceRequest (no stubs)
    sender: Any  # its response sender
    prompt: np.ndarray
    max_tokens: int
    search: dict
    stop_ids: frozenset[int]
    batch_key: tuple | None  # sequences with equal keys may share a batch; None = runs alone
    generated: int = 0
    arrived: float = 0.0  # time.monotonic() when the scheduler took it
    unsent: list[int] = field(default_factory=list)  # decoded, waiting for the next response


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
        raise BadRequest(
            f"input 'input_ids'[{bad[0]}] = {ids[bad[0]]} is outside the vocabulary [0, {limits.vocab_size})"
        )
    max_tokens = _scalar(request, "max_tokens", int, limits.default_max_tokens)
    if not 0 < max_tokens <= limits.max_tokens_cap:
        raise BadRequest(f"input 'max_tokens' = {max_tokens} must be in [1, {limits.max_tokens_cap}]")
    if ids.size + max_tokens > limits.context_length:
        raise BadRequest(
            f"input 'input_ids' has {ids.size} tokens; with max_tokens {max_tokens} that is over "
            f"the model's context of {limits.context_length} tokens"
        )
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
        "do_sample": temperature > 0,
        "temperature": temperature if temperature > 0 else 1.0,
        "top_p": top_p,
        "top_k": top_k if top_k > 0 else limits.vocab_size,
        "repetition_penalty": penalty,
        "random_seed": (seed if seed is not None else int.from_bytes(os.urandom(4), "little")) % _SEED_RANGE,
    }
    alone = (seed is not None and temperature > 0) or penalty != 1.0 or bool((ids == limits.pad_token_id).any())
    key = None if alone else (search["do_sample"], search["temperature"], top_p, search["top_k"])
    return Sequence(request, sender, ids, max_tokens, search, stop_ids, key)


def _response(ids: list[int], finish: str, usage: tuple[int, int]):
    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("output_ids", np.asarray(ids, dtype=np.int64)),
            pb_utils.Tensor("finish_reason", np.asarray([finish.encode()], dtype=np.object_)),
            pb_utils.Tensor("usage", np.asarray(usage, dtype=np.int32)),
        ]
    )


class Batch:
    """One `og.Generator` decoding rows that share their sampling options. A finished row (None) is
    still computed until the batch ends: GenAI cannot drop a row, so the batch ends with its last row."""

    def __init__(self, model, rows: list[Sequence], pad_token_id: int):
        length = max(seq.prompt.size for seq in rows)
        prompts = np.full((len(rows), length), pad_token_id, dtype=np.int32)
        for i, seq in enumerate(rows):
            prompts[i, : seq.prompt.size] = seq.prompt
        params = og.GeneratorParams(model)
        params.set_search_options(
            **rows[0].search, batch_size=len(rows), max_length=length + max(seq.max_tokens for seq in rows)
        )
        self.generator = og.Generator(model, params)
        self.generator.append_tokens(prompts)  # the prefill of every row
        self.rows: list[Sequence | None] = list(rows)

    def live(self) -> list[tuple[int, Sequence]]:
        return [(i, seq) for i, seq in enumerate(self.rows) if seq is not None]


class Scheduler(threading.Thread):
    """Owns the engine: every og call happens on this thread."""

    def __init__(
        self,
        model,
        limits: Limits,
        max_sequences: int,
        max_batch_rows: int,
        batch_window_ms: int,
        max_queued: int,
        logger,
        stream_interval: int = 1,
    ):
        super().__init__(name="generation-scheduler", daemon=True)
        self.model, self.limits, self.log = model, limits, logger
        self.max_sequences, self.max_batch_rows, self.max_queued = max_sequences, max_batch_rows, max_queued
        self.batch_window_s = batch_window_ms / 1000
        self.stream_interval = max(stream_interval, 1)
        self.incoming: queue.Queue[Sequence | None] = queue.Queue()
        self.waiting: list[Sequence] = []  # taken from `incoming`, over max_sequences for now
        self.batches: list[Batch] = []
        self.stopping = False

    def submit(self, seq: Sequence) -> None:
        """Queues a sequence, or refuses it (UNAVAILABLE: a retry may succeed) when max_queued wait."""
        if self.incoming.qsize() + len(self.waiting) >= self.max_queued:
            raise Busy(
                f"{self.max_queued} generation requests are waiting already (the model's max_queued); retry later"
            )
        self.incoming.put(seq)

    def stop(self) -> None:
        self.stopping = True
        self.incoming.put(None)
        self.join(timeout=30)

    def run(self) -> None:
        while not self.stopping:
            self._admit(block=not self.batches)
            for batch in list(self.batches):
                self._step(batch)
        for batch in self.batches:  # model unloading: end every open stream
            for i, _ in batch.live():
                self._finish(batch, i, "cancelled")

    def _live_count(self) -> int:
        return sum(len(batch.live()) for batch in self.batches)

    def _take(self, block: bool) -> int:
        """Moves what Triton submitted into `waiting`; how many."""
        taken = 0
        while True:
            try:
                seq = self.incoming.get(block=block and not self.waiting and not taken)
            except queue.Empty:
                return taken
            if seq is None:
                return taken
            seq.arrived = time.monotonic()
            self.waiting.append(seq)
            taken += 1

    def _admit(self, block: bool) -> None:
        """Starts batches from what waits. When idle, at once (a lone request starts without delay);
        while others decode, a batch that is not full waits up to batch_window_s for companions, so
        requests that trickle in during a decode step still share a batch."""
        idle = not self.batches
        taken, gathered = self._take(block), 0.0
        # GenAI holds the GIL while it computes, so Triton's thread hands over one request per decode
        # step; when one came, let go of the GIL briefly to take those queued behind it.
        while taken and not idle and gathered < self.batch_window_s:
            time.sleep(_GATHER_S)
            gathered += _GATHER_S
            taken = self._take(False)
        for seq in [w for w in self.waiting if w.sender.is_cancelled()]:  # gone before it started
            self.waiting.remove(seq)
            self.log.log_info(f"generation cancelled while queued (request {seq.request.request_id()!r})")
            seq.sender.send(_response([], "cancelled", (seq.prompt.size, 0)), flags=FINAL)
        free = max(self.max_sequences - self._live_count(), 0)
        now, idle = time.monotonic(), not self.batches
        for rows in self._form(self.waiting[:free]):
            if not idle and len(rows) < self.max_batch_rows and now - rows[0].arrived < self.batch_window_s:
                continue
            for seq in rows:
                self.waiting.remove(seq)
            try:
                self.batches.append(Batch(self.model, rows, self.limits.pad_token_id))
                if len(rows) > 1:
                    self.log.log_info(f"generation batch of {len(rows)} rows started")
            except Exception as exc:  # noqa: BLE001 - the engine raises RuntimeError with its reason
                for seq in rows:
                    self._fail(seq, f"generation could not start: {exc}")

    def _form(self, sequences: list[Sequence]) -> list[list[Sequence]]:
        """Groups sequences of one batch key, up to max_batch_rows a batch, while the longest prompt
        plus the largest max_tokens fits the context (every row's cache is that long)."""
        batches: list[list[Sequence]] = []
        for seq in sequences:
            for rows in batches:
                if (
                    seq.batch_key is not None
                    and rows[0].batch_key == seq.batch_key
                    and len(rows) < self.max_batch_rows
                    and max(seq.prompt.size, *(r.prompt.size for r in rows))
                    + max(seq.max_tokens, *(r.max_tokens for r in rows))
                    <= self.limits.context_length
                ):
                    rows.append(seq)
                    break
            else:
                batches.append([seq])
        return batches

    def _step(self, batch: Batch) -> None:
        # Asking Triton whether a request is cancelled is a round trip to its process (~0.2 ms, the
        # GIL held). The last live row of a batch is asked every step: its cancel ends the batch's
        # compute. Rows with company are asked before each response: their compute goes on with the
        # batch anyway, so asking each step would buy nothing but the round trips.
        live = batch.live()
        if len(live) == 1 and live[0][1].sender.is_cancelled():
            self._finish(batch, live[0][0], "cancelled")
        if not batch.live():
            self._drop(batch)
            return
        try:
            batch.generator.generate_next_token()
            tokens = batch.generator.get_next_tokens()
        except Exception as exc:  # noqa: BLE001
            for i, seq in batch.live():
                batch.rows[i] = None
                self._fail(seq, f"generation failed after {seq.generated} tokens: {exc}")
            self._drop(batch)
            return
        alone = len(live) == 1  # the rows are those asked about above: none ended since
        for i, seq in batch.live():
            token = int(tokens[i])
            if token in seq.stop_ids:
                self._finish(batch, i, "stop")
                continue
            seq.generated += 1
            seq.unsent.append(token)
            if seq.generated >= seq.max_tokens:
                self._finish(batch, i, "length")
            elif seq.generated == 1 or len(seq.unsent) >= self.stream_interval:  # the first token at once
                if not alone and seq.sender.is_cancelled():
                    self._finish(batch, i, "cancelled")
                    continue
                seq.sender.send(_response(seq.unsent, "", (seq.prompt.size, seq.generated)))
                seq.unsent = []
        if batch.generator.is_done():  # every row at its end already; a safety net, not a path
            for i, _ in batch.live():
                self._finish(batch, i, "length")
        if not batch.live():
            self._drop(batch)

    def _finish(self, batch: Batch, row: int, reason: str) -> None:
        seq, batch.rows[row] = batch.rows[row], None
        if reason == "cancelled":
            self.log.log_info(
                f"generation cancelled after {seq.generated} tokens (request {seq.request.request_id()!r})"
            )
        seq.sender.send(_response(seq.unsent, reason, (seq.prompt.size, seq.generated)), flags=FINAL)

    def _fail(self, seq: Sequence, message: str) -> None:
        self.log.log_error(message)
        seq.sender.send(
            pb_utils.InferenceResponse(error=pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)), flags=FINAL
        )

    def _drop(self, batch: Batch) -> None:
        if batch in self.batches:
            self.batches.remove(batch)
        batch.generator = None  # frees the KV cache now, not at the next GC


def _parameter(config: dict, key: str, default: int | None) -> int | None:
    value = config.get("parameters", {}).get(key, {}).get("string_value")
    return int(value) if value else default


def batch_pad_token_id(folder: Path, genai: dict) -> int:
    """The id that pads a batch's shorter prompts. GenAI masks pad ids in a batch's prompts, so it must
    be an id prompts do not hold; the export's own pad id is often the EOS (SmolLM2: <|im_end|>), which
    every chat prompt holds. The first special token that is neither EOS nor BOS nor written by the chat
    template does; else the export's pad id (a prompt holding the pad id runs alone, so this is about
    batching, never correctness)."""
    eos = genai.get("eos_token_id", [])
    taken = set(eos if isinstance(eos, list) else [eos]) | {genai.get("bos_token_id")}
    template_file = folder / "chat_template.jinja"
    template = template_file.read_text(encoding="utf-8") if template_file.exists() else ""
    try:
        added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8")).get("added_tokens", [])
    except (OSError, ValueError):
        added = []
    for token in added:
        if token.get("special") and token["id"] not in taken and token["content"] not in template:
            return int(token["id"])
    return int(genai.get("pad_token_id", 0))


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        if not pb_utils.using_decoupled_model_transaction_policy(config):
            raise ValueError(
                f"{config['name']}: the onnxruntime_genai backend needs model_transaction_policy {{ decoupled: true }}"
            )
        folder = Path(args["model_repository"]) / args["model_version"]
        genai = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]
        eos = genai.get("eos_token_id", [])
        self.limits = Limits(
            vocab_size=int(genai["vocab_size"]),
            context_length=int(genai["context_length"]),
            pad_token_id=_pad
            if (_pad := _parameter(config, "batch_pad_token_id", None)) is not None
            else batch_pad_token_id(folder, genai),
            max_tokens_cap=_parameter(config, "max_tokens_cap", 1024),
            default_max_tokens=_parameter(config, "default_max_tokens", 64),
            stop_ids=frozenset(eos if isinstance(eos, list) else [eos]),
        )
        engine_config = og.Config(str(folder))
        # The export's pad id is its EOS (<|im_end|>), which every chat prompt holds: GenAI masks pad ids
        # in a batch's prompts, so batches pad with an id that prompts do not hold.
        engine_config.overlay(json.dumps({"model": {"pad_token_id": self.limits.pad_token_id}}))
        self.model = og.Model(engine_config)
        self.scheduler = Scheduler(
            self.model,
            self.limits,
            _parameter(config, "max_sequences", 16),
            _parameter(config, "max_batch_rows", 8),
            _parameter(config, "batch_window_ms", 20),
            _parameter(config, "max_queued", 256),
            pb_utils.Logger,
            _parameter(config, "stream_interval_tokens", 1),
        )
        self.scheduler.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                self.scheduler.submit(parse(request, sender, self.limits))
            except (BadRequest, Busy) as exc:
                code = (
                    pb_utils.TritonError.INVALID_ARG
                    if isinstance(exc, BadRequest)
                    else pb_utils.TritonError.UNAVAILABLE
                )
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(exc), code)), flags=FINAL)
        return None

    def finalize(self):
        self.scheduler.stop()
        self.model = None
