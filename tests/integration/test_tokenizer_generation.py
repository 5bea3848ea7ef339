"""The generation RPCs on a real `python -m services.tokenizer` process over gRPC: chat prompts equal
transformers' apply_chat_template, Detokenize equals decode, DetokenizeStream's pieces add up to
Detokenize however the ids are split, and bad requests get the contract's statuses (on the stream, as
error answers while the stream goes on). Limits are set by flags, as an operator would."""

from __future__ import annotations

import random

import grpc
import pytest

from maas.v1 import tokenizer_pb2, tokenizer_pb2_grpc
from services.shared.channels import open_channel
from services.shared.errors import InvalidArgument, NotFound
from services.shared.tensors import from_proto
from services.tokenizer.client import DetokenizeSession
from tests.fixtures.preprocessing import make_generation_repository, service_process
from tests.unit.test_tokenizer_generation import CHATS, DECODE_CORPUS

# The unit tests' corpus without its long texts (thousands of one-id stream messages each).
CORPUS = [text for text in DECODE_CORPUS if len(text) < 1000]
LIMIT_FLAGS = ("--max-ids", "3000", "--max-messages", "8", "--max-chat-chars", "2000")


@pytest.fixture(scope="module")
def tokenizer_process(tmp_path_factory):
    repository = make_generation_repository(tmp_path_factory.mktemp("generation") / "models")
    with service_process("tokenizer", "--model-repository", str(repository), "--workers", "2", *LIMIT_FLAGS) as address:
        yield address, repository


@pytest.fixture
async def stub(tokenizer_process):
    async with open_channel(tokenizer_process[0]) as channel:
        yield tokenizer_pb2_grpc.TokenizerStub(channel)


@pytest.fixture(scope="module")
def reference(tokenizer_process):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_process[1] / "smollm2"))


def chat_request(chat, tokenizer="smollm2", **fields) -> tokenizer_pb2.ChatTemplateRequest:
    return tokenizer_pb2.ChatTemplateRequest(
        tokenizer=tokenizer, messages=[tokenizer_pb2.TemplateMessage(role=r, content=c) for r, c in chat], **fields
    )


async def test_apply_chat_template_equals_transformers(stub, reference):
    for chat in CHATS:
        as_dicts = [{"role": role, "content": content} for role, content in chat]
        for add_generation_prompt in (None, True, False):
            fields = {} if add_generation_prompt is None else {"add_generation_prompt": add_generation_prompt}
            response = await stub.ApplyChatTemplate(chat_request(chat, **fields))
            opened = add_generation_prompt is not False  # unset = true
            assert list(response.input_ids) == reference.apply_chat_template(
                as_dicts, add_generation_prompt=opened, return_dict=False
            )
            assert response.prompt == reference.apply_chat_template(
                as_dicts, add_generation_prompt=opened, tokenize=False
            )
            assert response.tokenizer == "smollm2"


async def test_detokenize_equals_decode(stub, reference):
    for text in CORPUS:
        ids = reference.encode(text, add_special_tokens=False)
        default = await stub.Detokenize(tokenizer_pb2.DetokenizeRequest(tokenizer="smollm2", ids=ids))
        assert default.text == reference.decode(ids, skip_special_tokens=True)  # unset = skip
        kept = await stub.Detokenize(
            tokenizer_pb2.DetokenizeRequest(tokenizer="smollm2", ids=ids, skip_special_tokens=False)
        )
        assert kept.text == reference.decode(ids, skip_special_tokens=False)


async def streamed(stub, ids: list[int], sizes: list[int], **first) -> list[str]:
    """Sends ids in chunks of `sizes` (the last request flushes), all before reading any answer."""
    requests, start = [], 0
    for number, size in enumerate(sizes):
        fields = first if number == 0 else {}
        requests.append(
            tokenizer_pb2.DetokenizeStreamRequest(
                ids=ids[start : start + size], flush=number == len(sizes) - 1, **fields
            )
        )
        start += size
    answers = [answer async for answer in stub.DetokenizeStream(iter(requests))]
    assert len(answers) == len(requests)  # one answer per request
    assert all(answer.WhichOneof("result") == "text" for answer in answers)
    return [answer.text for answer in answers]


@pytest.mark.parametrize("skip_special_tokens", [True, False])
async def test_detokenize_stream_pieces_add_up_to_detokenize(stub, reference, skip_special_tokens):
    rng = random.Random(5)
    for text in CORPUS:
        ids = reference.encode(text, add_special_tokens=False)
        expected = (
            await stub.Detokenize(
                tokenizer_pb2.DetokenizeRequest(tokenizer="smollm2", ids=ids, skip_special_tokens=skip_special_tokens)
            )
        ).text
        first = {"tokenizer": "smollm2", "skip_special_tokens": skip_special_tokens}
        one_by_one = await streamed(stub, ids, [1] * len(ids), **first)
        assert "".join(one_by_one) == expected and "\ufffd" not in "".join(one_by_one)
        for _ in range(3):
            sizes = []
            while sum(sizes) < len(ids):
                sizes.append(rng.randint(0, 9))
            assert "".join(await streamed(stub, ids, sizes, **first)) == expected
    # skip_special_tokens unset = true: <|im_end|> is left out.
    im_end = reference.encode("done.<|im_end|>", add_special_tokens=False)
    assert "".join(await streamed(stub, im_end, [1] * len(im_end), tokenizer="smollm2")) == "done."


async def test_flush_sends_a_cut_character_as_detokenize_renders_it(stub, reference):
    cut = reference.encode("ok 👍🏽", add_special_tokens=False)[:-1]
    expected = (await stub.Detokenize(tokenizer_pb2.DetokenizeRequest(tokenizer="smollm2", ids=cut))).text
    assert expected.endswith("\ufffd")
    pieces = await streamed(stub, cut, [1] * len(cut), tokenizer="smollm2")
    assert "".join(pieces) == expected
    assert "\ufffd" not in "".join(pieces[:-1]) and pieces[-1].endswith("\ufffd")  # held back until the flush


async def assert_status(call, code: grpc.StatusCode, message: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as failure:
        await call
    assert failure.value.code() == code, failure.value.details()
    assert message in failure.value.details()


async def test_bad_unary_requests_get_statuses_naming_what_was_wrong(stub):
    hi = [("user", "hi")]
    await assert_status(
        stub.ApplyChatTemplate(chat_request(hi, tokenizer="gpt9")),
        grpc.StatusCode.NOT_FOUND,
        "tokenizer 'gpt9' not found",
    )
    await assert_status(
        stub.ApplyChatTemplate(chat_request(hi, tokenizer="minilm")),
        grpc.StatusCode.FAILED_PRECONDITION,
        "'minilm' has no chat template",
    )
    await assert_status(
        stub.ApplyChatTemplate(chat_request([("user", "a"), ("", "b")])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "messages[1].role '' is not one of system, user, assistant",
    )
    await assert_status(stub.ApplyChatTemplate(chat_request([])), grpc.StatusCode.INVALID_ARGUMENT, "messages is empty")
    await assert_status(
        stub.ApplyChatTemplate(chat_request(hi * 9)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "messages is 9, over the limit of 8",
    )
    await assert_status(
        stub.ApplyChatTemplate(chat_request([("user", "x" * 2000)])),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "chat characters is 2004, over the limit of 2000",
    )
    await assert_status(
        stub.Detokenize(tokenizer_pb2.DetokenizeRequest(tokenizer="smollm2", ids=[5, 49152])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ids[1] = 49152 is not a token id",
    )
    await assert_status(
        stub.Detokenize(tokenizer_pb2.DetokenizeRequest(tokenizer="smollm2", ids=[-3])),
        grpc.StatusCode.INVALID_ARGUMENT,
        "ids[0] = -3",
    )
    await assert_status(
        stub.Detokenize(tokenizer_pb2.DetokenizeRequest(tokenizer="smollm2", ids=[1] * 3001)),
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        "ids count is 3001, over the limit of 3000",
    )
    await assert_status(
        stub.Detokenize(tokenizer_pb2.DetokenizeRequest(tokenizer="nope", ids=[1])),
        grpc.StatusCode.NOT_FOUND,
        "tokenizer 'nope' not found",
    )


async def test_a_bad_stream_request_gets_an_error_answer_and_the_sequence_goes_on(stub, reference):
    ids = reference.encode("Straße 日本 😀!", add_special_tokens=False)
    call = stub.DetokenizeStream()
    await call.write(tokenizer_pb2.DetokenizeStreamRequest(tokenizer="nope", ids=ids[:1]))
    error = (await call.read()).error
    assert (error.code, "tokenizer 'nope' not found" in error.message) == (grpc.StatusCode.NOT_FOUND.value[0], True)
    pieces = []
    for index, token in enumerate(ids):
        first = {"tokenizer": "smollm2"} if index == 0 else {}
        await call.write(tokenizer_pb2.DetokenizeStreamRequest(ids=[token, -1], **first))
        error = (await call.read()).error
        assert error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "ids[1] = -1" in error.message
        await call.write(tokenizer_pb2.DetokenizeStreamRequest(ids=[token], flush=index == len(ids) - 1, **first))
        answer = await call.read()
        assert answer.WhichOneof("result") == "text"
        pieces.append(answer.text)
    assert "".join(pieces) == reference.decode(ids)
    await call.write(tokenizer_pb2.DetokenizeStreamRequest(ids=[1]))
    error = (await call.read()).error
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0] and "flushed" in error.message
    await call.done_writing()
    assert await call.read() == grpc.aio.EOF
    assert await call.code() == grpc.StatusCode.OK


async def test_listing_and_tokenize_for_a_generation_tokenizer(stub, reference):
    listing = await stub.ListTokenizers(tokenizer_pb2.ListTokenizersRequest())
    infos = {info.name: info for info in listing.tokenizers}
    assert set(infos) == {"minilm", "smollm2"} and listing.default_tokenizer == "minilm"
    smollm2, minilm = infos["smollm2"], infos["minilm"]
    assert (smollm2.chat_template, smollm2.eos_token_id, smollm2.vocab_size) == (True, 2, 49152)
    assert list(smollm2.outputs) == ["input_ids", "attention_mask"]
    assert not minilm.chat_template and not minilm.HasField("eos_token_id")
    texts = ["Hello there", "日本語 😀 and a longer second text"]
    response = await stub.Tokenize(tokenizer_pb2.TokenizeRequest(tokenizer="smollm2", texts=texts))
    got = {t.name: from_proto(t) for t in response.tensors}
    for row, text in enumerate(texts):
        ids = reference.encode(text, add_special_tokens=False)
        length = response.items[row].length
        assert length == len(ids) and got["input_ids"][row, :length].tolist() == ids
        assert got["attention_mask"][row].tolist() == [1] * length + [0] * (got["attention_mask"].shape[1] - length)
        assert set(got["input_ids"][row, length:].tolist()) <= {reference.pad_token_id}


async def test_detokenize_session_helper(stub, reference):
    ids = reference.encode("Grüße 👩‍👩‍👧‍👦 from the router", add_special_tokens=False)
    session = DetokenizeSession(stub, "smollm2", timeout=30)
    try:
        with pytest.raises(InvalidArgument, match=r"ids\[0\] = 99999"):
            await session.send([99999])  # refused first request: the next one names the tokenizer again
        pieces = [await session.send(ids[i : i + 3], flush=i + 3 >= len(ids)) for i in range(0, len(ids), 3)]
    finally:
        await session.close()
    assert "".join(pieces) == reference.decode(ids)
    missing = DetokenizeSession(stub, "gpt9", timeout=30)
    try:
        with pytest.raises(NotFound, match="tokenizer 'gpt9' not found"):
            await missing.send([1])
    finally:
        await missing.close()


async def test_get_tokenizer_gives_the_definition_the_router_decodes_with(stub, reference, tokenizer_process):
    """The router's in-process decoder, built from GetTokenizer, gives the same pieces as DetokenizeStream."""
    from services.router.detokenizers import LocalDetokenizers
    from services.router.peers import TokenizerPeer

    answer = await stub.GetTokenizer(tokenizer_pb2.GetTokenizerRequest(tokenizer="smollm2"))
    assert answer.tokenizer == "smollm2" and len(answer.digest) == 64 and answer.vocab_size == len(reference)
    again = await stub.GetTokenizer(tokenizer_pb2.GetTokenizerRequest(tokenizer="smollm2", if_none_match=answer.digest))
    assert again.digest == answer.digest and again.tokenizer_json == ""  # still current: no text
    await assert_status(
        stub.GetTokenizer(tokenizer_pb2.GetTokenizerRequest(tokenizer="nope")), grpc.StatusCode.NOT_FOUND, "'nope'"
    )
    async with open_channel(tokenizer_process[0]) as channel:
        detokenizers = LocalDetokenizers(TokenizerPeer(channel))
        for text in CORPUS + ["ok 👍🏽"]:
            ids = reference.encode(text, add_special_tokens=False)
            if text == "ok 👍🏽":
                ids = ids[:-1]  # a cut character: held back, then flushed as Detokenize renders it
            decoder = await detokenizers.decoder("smollm2", 10)
            local = [decoder.step([i], flush=n == len(ids) - 1) for n, i in enumerate(ids)]
            remote = await streamed(stub, ids, [1] * len(ids), tokenizer="smollm2")
            assert local == remote
        await detokenizers.close()
