"""The chat model itself: the ONNX export against transformers, and the decoupled Triton model against
the same engine in-process (docs/generation.md has the contract)."""

from __future__ import annotations

import queue
import time
from pathlib import Path

import numpy as np
import pytest

from maas.local.triton import LocalTriton, TritonConfig

REPO = Path(__file__).resolve().parents[2]
MODEL = REPO / "model_repository" / "smollm2"
PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "system", "content": "You answer in one sentence."}, {"role": "user", "content": "Why is the sky blue?"}],
    [{"role": "user", "content": "List three prime numbers."}],
    [{"role": "user", "content": "Translate 'good morning' into Spanish."}],
]
TOKENS = 32


def chat_ids(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


def engine_greedy(version: str, ids: list[int], max_tokens: int, exactly: bool = False) -> list[int]:
    """The same engine and artefact as Triton's, in this process (`exactly`: end-of-sequence masked)."""
    import onnxruntime_genai as og

    model = og.Model(str(MODEL / version))
    params = og.GeneratorParams(model)
    params.set_search_options(
        max_length=len(ids) + max_tokens, do_sample=False, min_length=len(ids) + max_tokens if exactly else 0
    )
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)[len(ids) :]]


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL / "1")


def test_fp32_export_matches_transformers_greedy(hf_tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from tools.build_models import smollm2_gguf

    gguf = smollm2_gguf()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    for messages in PROMPTS:
        ids = chat_ids(hf_tokenizer, messages)
        with torch.no_grad():
            out = reference.generate(torch.tensor([ids]), max_new_tokens=TOKENS, do_sample=False, min_new_tokens=TOKENS)
        expected = out[0, len(ids) :].tolist()
        # Both with the end-of-sequence token masked, so every prompt compares 32 tokens.
        assert engine_greedy("1", ids, TOKENS, exactly=True) == expected, messages


def test_fp32_chat_answer_is_sensible(hf_tokenizer):
    ids = chat_ids(hf_tokenizer, PROMPTS[0])
    assert "Paris" in hf_tokenizer.decode(engine_greedy("1", ids, 16))


# -- the decoupled model in a real Triton ------------------------------------------------------------
@pytest.fixture(scope="module")
def triton():
    with LocalTriton(TritonConfig(models=["smollm2"], startup_timeout=300)) as server:
        yield server


class Stream:
    """tritonclient's streaming API, collected per request."""

    def __init__(self, address: str):
        import tritonclient.grpc as tg

        self.tg = tg
        self.client = tg.InferenceServerClient(address)
        self.responses: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.responses.put((result, error)))

    def send(self, ids, version: str = "2", **params) -> None:
        tg = self.tg
        types = {
            "max_tokens": ("INT32", np.int32),
            "temperature": ("FP32", np.float32),
            "top_p": ("FP32", np.float32),
            "top_k": ("INT32", np.int32),
            "seed": ("UINT64", np.uint64),
            "repetition_penalty": ("FP32", np.float32),
        }
        inputs = [tg.InferInput("input_ids", [len(ids)], "INT64")]
        inputs[0].set_data_from_numpy(np.asarray(ids, dtype=np.int64))
        for name, value in params.items():
            datatype, dtype = types[name]
            tensor = tg.InferInput(name, [1], datatype)
            tensor.set_data_from_numpy(np.asarray([value], dtype=dtype))
            inputs.append(tensor)
        self.client.async_stream_infer("smollm2", inputs, model_version=version, enable_empty_final_response=True)

    def collect(self, timeout: float = 120.0):
        """(token ids, finish reason, usage) of one request, or raises its error."""
        ids: list[int] = []
        while True:
            result, error = self.responses.get(timeout=timeout)
            if error is not None:
                raise error
            ids += result.as_numpy("output_ids").tolist()
            if result.get_response().parameters["triton_final_response"].bool_param:
                return ids, result.as_numpy("finish_reason")[0].decode(), result.as_numpy("usage").tolist()

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def wait_for_log(triton, holds, seconds: float = 30.0) -> bool:
    """The Python backend's log lines reach Triton's log asynchronously."""
    deadline = time.monotonic() + seconds
    while not holds(triton.log_path.read_text()):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def stream(triton):
    s = Stream(triton.grpc_address)
    yield s
    s.close(cancel=True)


@pytest.mark.parametrize("version", ["1", "2"])
def test_triton_greedy_equals_the_engine_in_process(stream, hf_tokenizer, version):
    ids = chat_ids(hf_tokenizer, PROMPTS[1])
    stream.send(ids, version, max_tokens=24)
    got, finish, usage = stream.collect()
    expected = engine_greedy(version, ids, 24)
    expected = [t for t in expected if t != 2]
    assert got == expected
    assert finish == ("length" if len(got) == 24 else "stop")
    assert usage == [len(ids), len(got)]


def test_concurrent_sequences_decode_in_one_batch_with_their_own_greedy_tokens(triton, hf_tokenizer):
    """Requests that arrive together share a batched generator; fp32's rows (right-padded) give each
    prompt's own greedy tokens, and a seeded sample among them runs alone, so it repeats exactly."""
    prompts = [chat_ids(hf_tokenizer, p) for p in PROMPTS[:4]]
    solo = Stream(triton.grpc_address)
    try:
        solo.send(prompts[0], "1", temperature=0.8, seed=7, max_tokens=12)
        seeded = solo.collect()
    finally:
        solo.close()
    logged = triton.log_path.read_text().count("generation batch of")
    streams = [Stream(triton.grpc_address) for _ in range(len(prompts) + 1)]
    try:
        for s, ids in zip(streams, prompts):  # one burst: they wait together behind the first
            s.send(ids, "1", max_tokens=TOKENS)
        streams[-1].send(prompts[0], "1", temperature=0.8, seed=7, max_tokens=12)
        results = [s.collect() for s in streams]
    finally:
        for s in streams:
            s.close()
    for ids, (got, finish, usage) in zip(prompts, results):
        assert got == [t for t in engine_greedy("1", ids, TOKENS) if t != 2]
        assert usage == [len(ids), len(got)]
    assert results[-1] == seeded
    assert wait_for_log(triton, lambda text: text.count("generation batch of") > logged)  # they shared one


def test_seeded_sampling_repeats_and_max_tokens_holds(stream, hf_tokenizer):
    ids = chat_ids(hf_tokenizer, PROMPTS[1])
    runs = []
    for _ in range(2):
        stream.send(ids, temperature=0.9, top_p=0.95, top_k=40, seed=1234, max_tokens=12, repetition_penalty=1.1)
        runs.append(stream.collect())
    assert runs[0] == runs[1]
    assert len(runs[0][0]) <= 12
    stream.send(ids, temperature=0.9, seed=99, max_tokens=12)
    assert stream.collect()[0] != runs[0][0]


@pytest.mark.parametrize(
    "params, field",
    [
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"temperature": -1.0}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ],
)
def test_bad_parameters_are_refused_naming_the_input(stream, params, field):
    stream.send([1, 2, 3], **params)
    with pytest.raises(Exception) as err:
        stream.collect()
    assert f"'{field}'" in str(err.value)


def test_ids_outside_the_vocabulary_and_overlong_prompts_are_refused(stream):
    stream.send([1, 49152])
    with pytest.raises(Exception, match=r"input_ids'\[1\] = 49152 is outside the vocabulary"):
        stream.collect()
    stream.send([1] * 8000, max_tokens=500)
    with pytest.raises(Exception, match="context of 8192"):
        stream.collect()


def test_cancelled_stream_frees_its_slot(triton, hf_tokenizer):
    ids = chat_ids(hf_tokenizer, [{"role": "user", "content": "Tell me a very long story about dragons."}])
    doomed = Stream(triton.grpc_address)
    doomed.send(ids, max_tokens=1000)
    doomed.responses.get(timeout=60)  # generation is running
    doomed.close(cancel=True)
    # The model saw Triton's cancellation and stopped decoding (well before its 1000 tokens).
    wait_for_log(triton, lambda text: "generation cancelled after" in text)
    line = next(ln for ln in triton.log_path.read_text().splitlines() if "generation cancelled after" in ln)
    assert int(line.split("generation cancelled after ")[1].split()[0]) < 1000
    fresh = Stream(triton.grpc_address)
    try:
        t0 = time.monotonic()
        fresh.send(ids, max_tokens=4)
        got, _, _ = fresh.collect(timeout=60)
        assert len(got) == 4
    finally:
        fresh.close()
    print(f"next request after cancel: {time.monotonic() - t0:.2f}s")
