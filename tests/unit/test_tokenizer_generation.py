"""Generation domain: chat prompts equal transformers' apply_chat_template, Detokenize equals decode,
and streamed pieces concatenate to decode(all ids) however the ids are split."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from services.shared.errors import FailedPrecondition, InvalidArgument, ResourceExhausted
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.chat_template import Message
from services.shared.detokenization import IncrementalDecoder, check_ids
from services.tokenizer.generation import DecodeSession, check_decode, check_messages, decode, render_chat
from services.tokenizer.tokenization import TokenizeLimits
from tests.fixtures.preprocessing import TEXT_CORPUS

LIMITS = TokenizeLimits()

CHATS = [
    [("user", "Hi there")],
    [("system", "You are terse."), ("user", "What is 2+2?")],
    [("user", "Translate: 日本語のテキスト 😀"), ("assistant", "Japanese text 😀"), ("user", "Thanks!")],
    [
        ("system", "Be kind."),
        ("user", "  leading spaces\n\nand newlines  "),
        ("assistant", ""),
        ("user", "e\u0301 👩‍👩‍👧‍👦"),
    ],
    [("assistant", "I start."), ("user", "ok")],
]

# Text a chat model might write: the corpus, plus spacing, chat markup and special tokens.
DECODE_CORPUS = [text for text in TEXT_CORPUS if len(text) < 3000] + [
    "  two leading spaces",
    "a  b   c\n\n\nd\n",
    "\n",
    " ",
    "x\u0300\u0301\u0302 ǅ ﬁ",
    "<|im_start|>user\nhi 👩‍👩‍👧‍👦<|im_end|>\n<|im_start|>assistant\n🏳️‍🌈 ok<|im_end|>",
    "done.<|im_end|>",
]


@pytest.fixture
def catalog(generation_repository) -> TokenizerCatalog:
    return TokenizerCatalog.discover(generation_repository, None, "minilm", LIMITS.max_tokens)


@pytest.fixture
def smollm2(catalog):
    return catalog.get("smollm2")


def messages(chat) -> list[Message]:
    return [Message(role, content) for role, content in chat]


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_ids_equal_transformers(smollm2, add_generation_prompt):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smollm2.path.parent))
    for chat in CHATS:
        as_dicts = [{"role": role, "content": content} for role, content in chat]
        prompt = render_chat(smollm2, messages(chat), add_generation_prompt)
        assert prompt.prompt == reference.apply_chat_template(
            as_dicts, add_generation_prompt=add_generation_prompt, tokenize=False
        )
        assert prompt.input_ids == reference.apply_chat_template(
            as_dicts, add_generation_prompt=add_generation_prompt, return_dict=False
        )
    assert render_chat(smollm2, messages(CHATS[0]), True).prompt.endswith("<|im_start|>assistant\n")


def test_catalog_knows_smollm2_as_a_generation_tokenizer(catalog, smollm2):
    assert smollm2.chat_template is not None and catalog.get("minilm").chat_template is None
    assert smollm2.eos_token_id == 2  # <|im_end|>
    assert smollm2.outputs == ("input_ids", "attention_mask")  # decoupled model: a readable padded batch
    assert smollm2.padding.pad_id == 2  # tokenizer_config.json's pad_token
    assert catalog.get("minilm").outputs == ("input_ids", "attention_mask", "token_type_ids")


def repository_with_template(tmp_path, smollm2, template: str | None, config_template: str | None = None):
    folder = tmp_path / "repo" / "chatty"
    folder.mkdir(parents=True)
    shutil.copyfile(smollm2.path, folder / "tokenizer.json")
    config = json.loads((smollm2.path.parent / "tokenizer_config.json").read_text())
    if config_template is not None:
        config["chat_template"] = config_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    if template is not None:
        (folder / "chat_template.jinja").write_text(template)
    return TokenizerCatalog.discover(tmp_path / "repo", None, "chatty", LIMITS.max_tokens).get("chatty")


def test_template_from_tokenizer_config_and_raise_exception(tmp_path, smollm2):
    strict = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system turns') }}"
        "{% endif %}{{ bos_token + m['role'] + ': ' + m['content'] + eos_token }}{% endfor %}"
    )
    chatty = repository_with_template(tmp_path, smollm2, None, config_template=strict)
    assert render_chat(chatty, messages([("user", "hi")]), True).prompt == "<|im_start|>user: hi<|im_end|>"
    with pytest.raises(InvalidArgument, match="chat template refused these messages: no system turns"):
        render_chat(chatty, messages([("system", "x")]), True)


def test_bad_chat_requests_are_refused_before_rendering(catalog, smollm2):
    with pytest.raises(FailedPrecondition, match="'minilm' has no chat template"):
        check_messages(catalog.get("minilm"), messages(CHATS[0]), LIMITS)
    with pytest.raises(InvalidArgument, match="messages is empty"):
        check_messages(smollm2, [], LIMITS)
    small = TokenizeLimits(max_messages=2, max_chat_chars=10)
    with pytest.raises(ResourceExhausted, match="messages is 3, over the limit of 2"):
        check_messages(smollm2, messages([("user", "a")] * 3), small)
    with pytest.raises(ResourceExhausted, match="chat characters is 14, over the limit of 10"):
        check_messages(smollm2, messages([("user", "0123456789")]), small)
    for role in ("", "tool", "User"):
        with pytest.raises(InvalidArgument, match=rf"messages\[1\].role '{role}' is not one of"):
            check_messages(smollm2, messages([("user", "a"), (role, "b")]), LIMITS)


def test_ids_out_of_the_vocabulary_are_refused_naming_the_index(smollm2):
    with pytest.raises(InvalidArgument, match=r"ids\[2\] = -1 is not a token id"):
        check_decode(smollm2, [1, 2, -1, 49152], LIMITS)
    with pytest.raises(InvalidArgument, match=r"ids\[1\] = 49152 is not a token id of this tokenizer \(0 to 49151\)"):
        check_decode(smollm2, [0, 49152], LIMITS)
    with pytest.raises(ResourceExhausted, match="ids count is 4, over the limit of 3"):
        check_ids([1, 2, 3, 4], smollm2.vocab_size, 3)
    check_decode(smollm2, [], LIMITS)


def encode(smollm2, text) -> list[int]:
    return smollm2.untruncated().encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_detokenize_equals_transformers_decode(smollm2, skip_special_tokens):
    from transformers import AutoTokenizer

    reference = AutoTokenizer.from_pretrained(str(smollm2.path.parent))
    for text in DECODE_CORPUS:
        ids = encode(smollm2, text)
        assert decode(smollm2, ids, skip_special_tokens) == reference.decode(
            ids, skip_special_tokens=skip_special_tokens
        )
    with_im_end = encode(smollm2, "done.<|im_end|>")
    assert decode(smollm2, with_im_end, True) == "done." and decode(smollm2, with_im_end, False) == "done.<|im_end|>"


def streamed(tokenizer: Tokenizer, ids: list[int], sizes, skip: bool) -> list[str]:
    decoder, pieces, start = IncrementalDecoder(tokenizer, skip), [], 0
    for size in sizes:
        pieces.append(decoder.step(ids[start : start + size]))
        start += size
    assert start >= len(ids)
    pieces.append(decoder.flush())
    return pieces


def random_sizes(rng: random.Random, count: int) -> list[int]:
    sizes = []
    while sum(sizes) < count:
        sizes.append(rng.choice([0, 1, 1, 2, 3, 5, 8, 13]))
    return sizes


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_streamed_pieces_concatenate_to_decode(smollm2, skip_special_tokens):
    tokenizer = smollm2.untruncated()
    rng = random.Random(11)
    for text in DECODE_CORPUS:
        ids = encode(smollm2, text)
        expected = tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        one_by_one = streamed(tokenizer, ids, [1] * len(ids), skip_special_tokens)
        assert "".join(one_by_one) == expected
        # Whole characters only, and nothing held back once the ids are whole characters.
        assert all("\ufffd" not in piece for piece in one_by_one) and one_by_one[-1] == ""
        # Fed one id at a time, the same pieces as tokenizers' own DecodeStream.
        stream = DecodeStream(skip_special_tokens=skip_special_tokens)
        assert one_by_one[:-1] == [stream.step(tokenizer, i) or "" for i in ids]
        for _ in range(20):
            assert "".join(streamed(tokenizer, ids, random_sizes(rng, len(ids)), skip_special_tokens)) == expected


def test_flush_sends_what_an_incomplete_character_held_back(smollm2):
    tokenizer = smollm2.untruncated()
    ids = encode(smollm2, "ok 👩‍👩‍👧‍👦")
    cut = ids[:-1]  # the last byte of the last emoji is missing
    decoder = IncrementalDecoder(tokenizer, True)
    pieces = [decoder.step([i]) for i in cut]
    assert "".join(pieces) != tokenizer.decode(cut) and tokenizer.decode(cut).endswith("\ufffd")
    assert "".join(pieces) + decoder.flush() == tokenizer.decode(cut)
    with pytest.raises(FailedPrecondition, match="flushed"):
        decoder.step([1])


def test_a_refused_stream_request_leaves_the_sequence_as_it_was(smollm2):
    ids = encode(smollm2, "héllo wörld 😀 done")
    session = DecodeSession(smollm2, True, TokenizeLimits(max_ids=4))
    pieces = []
    for start in range(0, len(ids), 2):
        with pytest.raises(InvalidArgument, match=r"ids\[1\] = -5"):
            session.step([ids[start], -5], False)
        with pytest.raises(ResourceExhausted):
            session.step([0] * 5, False)
        pieces.append(session.step(ids[start : start + 2], start + 2 >= len(ids)))
    assert "".join(pieces) == decode(smollm2, ids, True)
    with pytest.raises(FailedPrecondition):
        session.step([], False)
