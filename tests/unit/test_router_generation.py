"""Router.Generate / GenerateUnary and OIP ModelStreamInfer in-process, against fake peers on loopback.

The fake Triton serves a decoupled "gen" model that streams a fixed script of token ids (one response
per token, then a final one, as docs/generation.md says); the fake tokenizer renders chat messages and
detokenizes ids by a small vocabulary. The real-process tests are tests/integration/test_generation.py.
"""

from __future__ import annotations

import asyncio

import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import InferInput, service_pb2

from maas.v1 import router_pb2, tensor_pb2, tokenizer_pb2
from services.router.config import GenerationLimits
from services.router.generation import StopMatcher, check_sampling, Sampling
from services.shared.errors import InvalidArgument
from tests.unit import test_router_service as base

R = base.R
# The fake model's script: token id -> text. It generates these in order, then ends ("stop").
VOCAB = {10: "Hello", 11: ",", 12: " world", 13: "!", 14: " How", 15: " are", 16: " you", 17: "?"}
SCRIPT = list(VOCAB)
WHOLE = "".join(VOCAB.values())
CAP, DEFAULT, CONTEXT = 100, 5, 40
GEN_MODELS = ("gen", "slowgen", "endless")


def generation_models():
    def gen(n, model="gen"):
        return R.ModelVersion(
            model=model,
            version=n,
            state=R.VERSION_STATE_READY,
            preprocessing=R.Preprocessing(kind=R.Preprocessing.KIND_TOKENIZER, name="gentok"),
            postprocessing=R.Postprocessing(kind=R.Postprocessing.KIND_GENERATION),
        )

    return [
        R.ModelRouting(model="gen", versions=[gen(1), gen(2)], aliases={"production": 2}),
        R.ModelRouting(model="slowgen", versions=[gen(1, "slowgen")]),
        R.ModelRouting(model="endless", versions=[gen(1, "endless")]),
    ]


def _tensor(response, name, datatype, array):
    response.outputs.add(name=name, datatype=datatype, shape=list(array.shape))
    response.raw_output_contents.append(array.tobytes())


def contract_response(request, ids, finish, usage):
    response = service_pb2.ModelInferResponse(
        model_name=request.model_name, model_version=request.model_version, id=request.id
    )
    _tensor(response, "output_ids", "INT64", np.asarray(ids, np.int64))
    encoded = finish.encode()
    response.outputs.add(name="finish_reason", datatype="BYTES", shape=[1])
    response.raw_output_contents.append(len(encoded).to_bytes(4, "little") + encoded)
    _tensor(response, "usage", "INT32", np.asarray(usage, np.int32))
    return service_pb2.ModelStreamInferResponse(infer_response=response)


class GenTriton(base.FakeTriton):
    def __init__(self):
        super().__init__()
        self.stream_requests: list[service_pb2.ModelInferRequest] = []
        self.stream_cancelled = asyncio.Event()

    async def ModelConfig(self, request, context):
        response = await super().ModelConfig(request, context)
        if request.name in GEN_MODELS:
            response.config.max_batch_size = 0
            for key, value in (("max_tokens_cap", CAP), ("default_max_tokens", DEFAULT), ("context_length", CONTEXT)):
                response.config.parameters[key].string_value = str(value)
        return response

    async def ModelStreamInfer(self, request_iterator, context):
        try:
            async for request in request_iterator:
                self.stream_requests.append(request)
                inputs = {
                    i.name: np.frombuffer(
                        raw, dtype={"INT64": "<i8", "INT32": "<i4", "FP32": "<f4", "UINT64": "<u8"}[i.datatype]
                    )
                    for i, raw in zip(request.inputs, request.raw_input_contents)
                }
                if request.model_name not in GEN_MODELS:  # a non-decoupled model answers once
                    yield service_pb2.ModelStreamInferResponse(infer_response=await self.ModelInfer(request, context))
                    continue
                prompt = int(inputs["input_ids"].size)
                max_tokens = int(inputs["max_tokens"][0])
                n = 0
                script = SCRIPT * 20 if request.model_name == "endless" else SCRIPT  # endless: paced, long
                for token in script[:max_tokens]:
                    n += 1
                    yield contract_response(request, [token], "", (prompt, n))
                    if request.model_name != "gen":
                        await asyncio.sleep(30 if request.model_name == "slowgen" else 0.01)
                yield contract_response(request, [], "length" if max_tokens <= len(SCRIPT) else "stop", (prompt, n))
        except asyncio.CancelledError:  # the caller cancelled the stream: what Triton passes to the model
            self.stream_cancelled.set()
            raise


class GenTokenizer(base.FakeTokenizer):
    async def ApplyChatTemplate(self, request, context):
        ids = [1] + [len(m.content) for m in request.messages] + [2]
        return tokenizer_pb2.ChatTemplateResponse(prompt="rendered", input_ids=ids, tokenizer=request.tokenizer)

    async def GetTokenizer(self, request, context):
        # The router decodes with this definition itself. cut_character: id 11 is half of "é" instead,
        # so the text of [10, 11] ends with a cut character that only the flush at the end sends.
        pieces = {i: text.encode() for i, text in VOCAB.items()}
        if self.cut_character:
            pieces[11] = "é".encode()[:1]
        definition = byte_level_tokenizer(pieces)
        self.definitions_served += 1
        return tokenizer_pb2.GetTokenizerResponse(
            tokenizer=request.tokenizer, digest=str(hash(definition)), tokenizer_json=definition, vocab_size=100
        )

    cut_character = False
    definitions_served = 0


def byte_level_tokenizer(pieces: dict[int, bytes]) -> str:
    """A tokenizer.json whose id i decodes to the bytes pieces[i] (byte-level BPE, as GPT-2's and SmolLM2's)."""
    from tokenizers import Tokenizer, decoders, models

    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    rest = [b for b in range(256) if b not in printable]
    char = {b: chr(b) for b in printable} | {b: chr(256 + n) for n, b in enumerate(rest)}
    vocab = {"".join(char[b] for b in piece): i for i, piece in pieces.items()}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer.to_str()


class GenMesh(base.Mesh):
    async def start(self):
        original = (base.FakeTriton, base.FakeTokenizer, base.routing_state)
        base.FakeTriton, base.FakeTokenizer = GenTriton, GenTokenizer
        base.routing_state = lambda: original[2]() + generation_models()
        try:
            return await super().start()
        finally:
            base.FakeTriton, base.FakeTokenizer, base.routing_state = original


@pytest.fixture
async def mesh():
    m = await GenMesh().start()
    try:
        await m.synced()
        yield m
    finally:
        await m.stop()


def chat(*contents, model="gen", **sampling):
    return router_pb2.GenerateRequest(
        model=tensor_pb2.ModelRef(name=model),
        messages=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="user", content=c) for c in contents]),
        sampling=router_pb2.SamplingParams(**sampling),
    )


async def collect(mesh, request):
    return [m async for m in mesh.stub.Generate(request, timeout=5)]


# -- the stream ---------------------------------------------------------------------------------------
async def test_stream_pieces_routed_first_usage_last_and_equal_to_unary(mesh):
    messages = await collect(mesh, chat("hi there", max_tokens=10))
    assert messages[0].routed.model == "gen" and messages[0].routed.version == 2  # production
    assert all(not m.HasField("routed") for m in messages[1:])
    last = messages[-1]
    assert last.finish_reason == router_pb2.FINISH_REASON_STOP
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (3, len(SCRIPT))
    assert "".join(m.text for m in messages) == WHOLE
    assert [i for m in messages for i in m.token_ids] == SCRIPT
    # The Triton request: the chat template's ids, max_tokens, version chosen by the table.
    sent = mesh.triton.stream_requests[-1]
    assert (sent.model_name, sent.model_version) == ("gen", "2")
    assert np.frombuffer(sent.raw_input_contents[0], "<i8").tolist() == [1, len("hi there"), 2]

    unary = await mesh.stub.GenerateUnary(chat("hi there", max_tokens=10), timeout=5)
    assert unary.text == WHOLE and list(unary.token_ids) == SCRIPT and unary.routed.version == 2
    assert unary.finish_reason == router_pb2.FINISH_REASON_STOP and unary.usage.completion_tokens == len(SCRIPT)


async def test_max_tokens_default_and_length(mesh):
    three = await mesh.stub.GenerateUnary(chat("x", max_tokens=3), timeout=5)
    assert three.text == "Hello, world" and three.finish_reason == router_pb2.FINISH_REASON_LENGTH
    default = await mesh.stub.GenerateUnary(chat("x"), timeout=5)
    assert default.usage.completion_tokens == DEFAULT  # the version's default_max_tokens
    pinned = await mesh.stub.GenerateUnary(
        chat("x", max_tokens=2).__class__(
            model=tensor_pb2.ModelRef(name="gen", version=1),
            prompt="plain text",
            sampling=router_pb2.SamplingParams(max_tokens=2),
        ),
        timeout=5,
    )
    assert pinned.routed.version == 1 and pinned.usage.prompt_tokens == 3  # the fake Tokenize's 3 ids


async def test_stop_sequence_cuts_the_text_and_cancels_triton(mesh):
    messages = await collect(mesh, chat("x", model="endless", max_tokens=30, stop=["d! H"]))  # spans 3 tokens
    assert "".join(m.text for m in messages) == "Hello, worl"
    assert not any("d!" in m.text for m in messages)  # never shown, not even in part
    assert messages[-1].finish_reason == router_pb2.FINISH_REASON_STOP
    await asyncio.wait_for(mesh.triton.stream_cancelled.wait(), 5)


async def test_cancel_mid_stream_cancels_the_triton_stream(mesh):
    call = mesh.stub.Generate(chat("x", model="slowgen", max_tokens=10), timeout=30)
    first = await call.read()
    assert first.text == "Hello"
    call.cancel()
    await asyncio.wait_for(mesh.triton.stream_cancelled.wait(), 5)


async def test_deadline_cancels_the_triton_stream(mesh):
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await mesh.stub.GenerateUnary(chat("x", model="slowgen", max_tokens=10), timeout=0.5)
    assert failed.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await asyncio.wait_for(mesh.triton.stream_cancelled.wait(), 5)


# -- refused before any work --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "request_, code, names",
    [
        (chat("x", model="nope"), grpc.StatusCode.NOT_FOUND, "nope"),
        (chat("x", model="embedder"), grpc.StatusCode.INVALID_ARGUMENT, "embedder"),
        (chat("x", max_tokens=CAP + 1), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (chat("x", max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "MAAS_GENERATE_MAX_TOKENS"),
        (chat("x", temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (chat("x", top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (chat("x", top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (chat("x", repetition_penalty=0.0), grpc.StatusCode.INVALID_ARGUMENT, "repetition_penalty"),
        (chat("x", stop=[""]), grpc.StatusCode.INVALID_ARGUMENT, "stop[0]"),
        (chat("x", max_tokens=CONTEXT - 2), grpc.StatusCode.INVALID_ARGUMENT, "context"),
        (chat(), grpc.StatusCode.INVALID_ARGUMENT, "messages"),
        (chat(""), grpc.StatusCode.INVALID_ARGUMENT, "messages[0].content"),
        (
            router_pb2.GenerateRequest(
                model=tensor_pb2.ModelRef(name="gen"),
                messages=router_pb2.ChatMessages(messages=[router_pb2.ChatMessage(role="wizard", content="x")]),
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "role",
        ),
        (router_pb2.GenerateRequest(model=tensor_pb2.ModelRef(name="gen")), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (
            router_pb2.GenerateRequest(model=tensor_pb2.ModelRef(name="gen"), prompt=""),
            grpc.StatusCode.INVALID_ARGUMENT,
            "prompt",
        ),
    ],
)
async def test_bad_requests_are_refused_before_triton(mesh, request_, code, names):
    for call in (lambda: collect(mesh, request_), lambda: mesh.stub.GenerateUnary(request_, timeout=5)):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await call()
        assert failed.value.code() == code and names in failed.value.details(), failed.value.details()
    assert not mesh.triton.stream_requests


async def test_one_shot_calls_on_a_generation_model_point_at_generate(mesh):
    with pytest.raises(grpc.aio.AioRpcError) as failed:
        await mesh.stub.Infer(router_pb2.InferRequest(model=tensor_pb2.ModelRef(name="gen"), texts=["x"]), timeout=5)
    assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "Generate" in failed.value.details()


def test_sampling_checks_are_plain_functions():
    limits = GenerationLimits()
    check_sampling(Sampling(max_tokens=0, temperature=0.0, top_p=1.0, repetition_penalty=1.0), limits)
    with pytest.raises(InvalidArgument, match="temperature"):
        check_sampling(Sampling(temperature=float("nan")), limits)


# -- stop matching ------------------------------------------------------------------------------------
def test_stop_matcher_holds_back_possible_starts_and_cuts_before_the_match():
    m = StopMatcher(("END",))
    assert m.feed("abc E", [1]) == ("abc ", [1], False)  # "E" may start "END"
    assert m.feed("N", [2]) == ("", [], False)
    assert m.feed("Dx", [3]) == ("", [], True)  # a match: neither it nor what follows is shown
    m = StopMatcher(("END",))
    assert m.feed("xE", [1]) == ("x", [1], False)
    assert m.feed("Ny", [2]) == ("ENy", [2], False)  # was not a match after all: released
    assert m.flush() == ("", [])
    none = StopMatcher(())
    assert none.feed("any", [5]) == ("any", [5], False)


# -- OIP ModelStreamInfer -----------------------------------------------------------------------------
async def test_oip_stream_routes_each_request_and_relays_every_response(mesh):
    client = triton_aio.InferenceServerClient(mesh.address)
    try:

        def inputs(ids):
            a, b = InferInput("input_ids", [len(ids)], "INT64"), InferInput("max_tokens", [1], "INT32")
            a.set_data_from_numpy(np.asarray(ids, np.int64))
            b.set_data_from_numpy(np.asarray([3], np.int32))
            return [a, b]

        async def requests():
            yield {"model_name": "gen", "inputs": inputs([1, 2]), "request_id": "a"}  # traffic policy
            yield {"model_name": "nope", "inputs": inputs([1]), "request_id": "b"}  # refused, stream goes on
            yield {"model_name": "gen", "model_version": "1", "inputs": inputs([1]), "request_id": "c"}

        results, errors = [], []
        async for result, error in client.stream_infer(requests(), stream_timeout=10):
            if error is not None:
                errors.append(str(error))
            else:
                results.append(result)
        assert len(errors) == 1 and "nope" in errors[0]
        by_id = {}
        for r in results:
            by_id.setdefault(r.get_response().id, []).append(r)
        assert sorted(by_id) == ["a", "c"] and all(len(v) == 4 for v in by_id.values())  # 3 tokens + final
        assert {r.get_response().model_version for r in by_id["a"]} == {"2"}
        assert {r.get_response().model_version for r in by_id["c"]} == {"1"}
        assert [int(r.as_numpy("output_ids")[0]) for r in by_id["a"][:3]] == SCRIPT[:3]
    finally:
        await client.close()


async def test_text_the_detokenizer_held_back_is_flushed_at_the_end(mesh):
    mesh.tokenizer.cut_character = True  # a character cut by max_tokens: sent on the flush, as decode shows it
    messages = await collect(mesh, chat("x", max_tokens=2))
    assert "".join(m.text for m in messages) == "Hello\ufffd" and messages[-1].text == "\ufffd"
    assert (await mesh.stub.GenerateUnary(chat("x", max_tokens=2), timeout=5)).text == "Hello\ufffd"


async def test_the_tokenizer_definition_is_fetched_once_not_per_token(mesh):
    for _ in range(3):
        assert (await mesh.stub.GenerateUnary(chat("x", max_tokens=8), timeout=5)).text == WHOLE
    assert mesh.tokenizer.definitions_served == 1


def test_generation_limits_from_flags_and_env(monkeypatch):
    from services.router.config import load_config
    from services.shared.config import ConfigError

    monkeypatch.setenv("MAAS_GENERATE_MAX_TOKENS", "256")
    monkeypatch.setenv("MAAS_GENERATE_TIMEOUT_SECONDS", "60")
    limits = load_config(["--generate-max-stop", "4"]).generation
    assert (limits.max_tokens, limits.default_timeout, limits.max_stop) == (256, 60.0, 4)
    with pytest.raises(ConfigError, match="generate-max-tokens"):
        load_config(["--generate-max-tokens", "0"])


async def test_undecodable_requests_are_invalid_argument_not_unknown(mesh):
    # GenerateRequest{model: {name: "gen"}, prompt: b"\xff\xfe"}: invalid UTF-8 in a string field.
    raw = bytes([0x0A, 0x05, 0x0A, 0x03]) + b"gen" + bytes([0x12, 0x02, 0xFF, 0xFE])
    for call in (
        mesh.channel.unary_unary("/maas.v1.Router/GenerateUnary"),
        mesh.channel.unary_stream("/maas.v1.Router/Generate"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            result = call(raw, timeout=5)
            await (result if not hasattr(result, "__aiter__") else result.read())
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "GenerateRequest" in failed.value.details()
    assert not mesh.triton.stream_requests


async def test_a_detokenize_stream_that_already_ended_is_unavailable_not_internal():
    """grpc.aio's write() on a finished stream raises asyncio.InvalidStateError (the tokenizer died
    mid-generation in the soak): the caller gets UNAVAILABLE naming the stream, not an INTERNAL."""
    import asyncio

    import grpc

    from services.shared.errors import Unavailable
    from services.tokenizer.client import DetokenizeSession

    class Finished:
        async def write(self, request):
            raise asyncio.InvalidStateError("RPC already finished.")

        async def code(self):
            return grpc.StatusCode.UNAVAILABLE

        async def details(self):
            return "Socket closed"

    class Stub:
        def DetokenizeStream(self, **kwargs):
            return Finished()

    session = DetokenizeSession(Stub(), "smollm2")
    with pytest.raises(Unavailable, match=r"DetokenizeStream ended early \(UNAVAILABLE: Socket closed\)"):
        await session.send([1, 2])
