"""The generation backend's batch formation, queue bound and pad choice, without Triton (the real
batched decoding is tested against Triton in tests/integration/test_generation_model.py)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
BACKEND = REPO / "triton_backends" / "onnxruntime_genai" / "model.py"


@pytest.fixture(scope="module")
def backend():
    pytest.importorskip("onnxruntime_genai")
    fake = types.ModuleType("triton_python_backend_utils")
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
    fake.Tensor = lambda name, array: (name, array)
    fake.InferenceResponse = lambda output_tensors: dict(output_tensors)
    previous = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = fake
    spec = importlib.util.spec_from_file_location("genai_backend_under_test", BACKEND)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]
    if previous is None:
        del sys.modules["triton_python_backend_utils"]
    else:
        sys.modules["triton_python_backend_utils"] = previous


class Sender:
    def __init__(self, cancelled: bool = False):
        self.cancelled, self.sent, self.asked = cancelled, [], 0

    def is_cancelled(self) -> bool:
        self.asked += 1
        return self.cancelled

    def send(self, response, flags=0) -> None:
        self.sent.append((response, flags))

    def responses(self) -> list[tuple[list[int], str, int]]:
        """(token ids, finish reason, flags) of each response sent."""
        return [(r["output_ids"].tolist(), r["finish_reason"][0].decode(), flags) for r, flags in self.sent]


class Request:
    def request_id(self) -> str:
        return "r"


class Generator:
    """Hands out scripted tokens, one column per row: 10, 11, 12, ... (never a stop id)."""

    def __init__(self, rows: int):
        self.rows, self.steps = rows, 0

    def generate_next_token(self) -> None:
        self.steps += 1

    def get_next_tokens(self) -> np.ndarray:
        return np.full(self.rows, 9 + self.steps)

    def is_done(self) -> bool:
        return False


def running(backend, rows: list):
    batch = object.__new__(backend.Batch)  # no engine: the scripted generator stands in
    batch.generator, batch.rows = Generator(len(rows)), list(rows)
    return batch


def sequence(backend, key=("greedy",), prompt=8, max_tokens=16, cancelled=False):
    return backend.Sequence(
        request=Request(),
        sender=Sender(cancelled),
        prompt=np.ones(prompt, np.int64),
        max_tokens=max_tokens,
        search={},
        stop_ids=frozenset({2}),
        batch_key=key,
    )


def scheduler(backend, context=8192, max_batch_rows=4, max_queued=3, stream_interval=1):
    limits = backend.Limits(
        vocab_size=100,
        context_length=context,
        pad_token_id=0,
        max_tokens_cap=1024,
        default_max_tokens=64,
        stop_ids=frozenset({2}),
    )
    return backend.Scheduler(
        None,
        limits,
        max_sequences=16,
        max_batch_rows=max_batch_rows,
        batch_window_ms=20,
        max_queued=max_queued,
        logger=types.SimpleNamespace(log_info=lambda message: None, log_error=lambda message: None),
        stream_interval=stream_interval,
    )


def test_compatible_sequences_share_batches_up_to_the_row_limit(backend):
    s = scheduler(backend)
    greedy = [sequence(backend) for _ in range(6)]
    sampled = [sequence(backend, key=(True, 0.7, 1.0, 50)) for _ in range(2)]
    alone = [sequence(backend, key=None) for _ in range(2)]
    batches = s._form(greedy[:3] + alone[:1] + sampled + greedy[3:] + alone[1:])
    assert [len(b) for b in batches] == [4, 1, 2, 2, 1]
    assert batches[0] == greedy[:4] and batches[3] == greedy[4:] and batches[2] == sampled


def test_a_batch_stays_within_the_context(backend):
    s = scheduler(backend, context=100)
    long_prompt, long_answer = sequence(backend, prompt=80, max_tokens=10), sequence(backend, prompt=10, max_tokens=80)
    assert [len(b) for b in s._form([long_prompt, long_answer])] == [1, 1]  # 80 + 80 > 100
    assert [len(b) for b in s._form([long_prompt, sequence(backend, prompt=20, max_tokens=20)])] == [2]


def test_seeded_penalised_and_pad_holding_requests_run_alone(backend):
    class Tensor:
        def __init__(self, values):
            self.values = np.asarray(values)

        def as_numpy(self):
            return self.values

    limits = scheduler(backend).limits

    def parse(ids, **params):
        tensors = {"input_ids": Tensor(ids), **{k: Tensor([v]) for k, v in params.items()}}
        backend.pb_utils.get_input_tensor_by_name = lambda request, name: tensors.get(name)
        return backend.parse(None, Sender(), limits)

    assert parse([5, 6]).batch_key == parse([7]).batch_key is not None  # greedy with greedy
    assert parse([5, 6], temperature=0.8).batch_key is not None
    assert parse([5, 6], temperature=0.8, seed=3).batch_key is None
    assert parse([5, 6], seed=3).batch_key is not None  # greedy ignores the seed
    assert parse([5, 6], repetition_penalty=1.2).batch_key is None
    assert parse([5, 0, 6]).batch_key is None  # holds the pad id


def test_the_queue_is_bounded_and_refuses_with_busy(backend):
    s = scheduler(backend, max_queued=3)
    for _ in range(3):
        s.submit(sequence(backend))
    with pytest.raises(backend.Busy, match="3 generation requests are waiting"):
        s.submit(sequence(backend))


def test_the_pad_is_a_special_token_that_no_chat_prompt_holds(backend, tmp_path):
    genai = {"eos_token_id": 2, "bos_token_id": 1, "pad_token_id": 2}
    added = [{"id": i, "content": c, "special": True} for i, c in enumerate(["<eot>", "<s>", "</s>", "<x>"])]
    (tmp_path / "tokenizer.json").write_text(json.dumps({"added_tokens": added}), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text("{{ '<eot>' }}{{ messages }} ✓", encoding="utf-8")
    assert backend.batch_pad_token_id(tmp_path, genai) == 3  # 0 is in the template, 1 and 2 are BOS/EOS
    (tmp_path / "chat_template.jinja").write_text("<eot><x>", encoding="utf-8")
    assert backend.batch_pad_token_id(tmp_path, genai) == 2  # none left: the export's own
    smollm2 = REPO / "model_repository" / "smollm2" / "2"
    if (smollm2 / "genai_config.json").exists():
        model = json.loads((smollm2 / "genai_config.json").read_text(encoding="utf-8"))["model"]
        assert backend.batch_pad_token_id(smollm2, model) == 0  # <|endoftext|>


def test_the_first_token_goes_at_once_then_stream_interval_at_a_time_and_the_rest_with_the_final(backend):
    s, seq = scheduler(backend, stream_interval=4), sequence(backend, max_tokens=10)
    batch = running(backend, [seq])
    s.batches.append(batch)
    while s.batches:
        s._step(batch)
    final = backend.FINAL
    assert seq.sender.responses() == [
        ([10], "", 0),
        ([11, 12, 13, 14], "", 0),
        ([15, 16, 17, 18], "", 0),
        ([19], "length", final),
    ]
    assert [r["usage"].tolist() for r, _ in seq.sender.sent] == [[8, 1], [8, 5], [8, 9], [8, 10]]


def test_a_lone_row_is_asked_about_cancel_every_step_rows_with_company_before_each_response(backend):
    s = scheduler(backend, stream_interval=4)
    alone, mates = sequence(backend, max_tokens=6), [sequence(backend, max_tokens=6) for _ in range(2)]
    for rows in ([alone], mates):
        batch = running(backend, rows)
        s.batches.append(batch)
        while batch in s.batches:
            s._step(batch)
    assert alone.sender.asked == 6  # before each of its 6 steps: a cancel ends the batch's compute
    assert [m.sender.asked for m in mates] == [2, 2]  # before the responses of tokens 1 and 2-5


def test_a_cancelled_row_with_company_ends_at_its_next_response_and_the_batch_goes_on(backend):
    s = scheduler(backend, stream_interval=4)
    gone, stays = sequence(backend, max_tokens=8), sequence(backend, max_tokens=8)
    batch = running(backend, [gone, stays])
    generator = batch.generator
    s.batches.append(batch)
    s._step(batch)
    gone.sender.cancelled = True
    while batch in s.batches:
        s._step(batch)
    final = backend.FINAL
    assert gone.sender.responses() == [([10], "", 0), ([11, 12, 13, 14], "cancelled", final)]
    assert stays.sender.responses()[-1] == ([15, 16, 17], "length", final)
    assert generator.steps == 8  # its compute went on with the batch until the last row ended
