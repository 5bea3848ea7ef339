"""Tokenizer domain: output equals tokenizers' own encode_batch, truncation is reported, limits hold."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from tokenizers import Tokenizer

from services.shared.config import ConfigError
from services.shared.errors import InvalidArgument, NotFound, ResourceExhausted
from services.tokenizer.catalog import TokenizerCatalog
from services.tokenizer.tokenization import (
    Padding,
    TokenizeLimits,
    TokenizeOptions,
    check_request,
    tokenize_batch,
)
from tests.fixtures.preprocessing import TEXT_CORPUS, minilm_tokenizer_json

LIMITS = TokenizeLimits()


@pytest.fixture
def catalog(tokenizer_repository) -> TokenizerCatalog:
    return TokenizerCatalog.discover(tokenizer_repository, None, "minilm", LIMITS.max_tokens)


def reference(path, texts, max_length, fixed=False, **padding):
    """What tokenizers itself gives with truncation and padding switched on."""
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(max_length)
    tokenizer.enable_padding(length=max_length if fixed else None, **padding)
    return tokenizer.encode_batch(texts)


def run(tokenizer, texts, **options):
    opts = TokenizeOptions(**options)
    return tokenize_batch(tokenizer, texts, opts, check_request(texts, 0, opts, tokenizer, LIMITS))


def assert_equal_to(batch, encodings):
    assert np.array_equal(batch.tensors["input_ids"], np.array([e.ids for e in encodings]))
    assert np.array_equal(batch.tensors["attention_mask"], np.array([e.attention_mask for e in encodings]))
    assert np.array_equal(batch.tensors["token_type_ids"], np.array([e.type_ids for e in encodings]))


@pytest.mark.parametrize("max_length", [0, 16, 512])
@pytest.mark.parametrize("padding", [Padding.LONGEST, Padding.FIXED])
def test_equals_encode_batch_on_unicode_corpus(catalog, max_length, padding):
    minilm = catalog.get("minilm")
    batch = run(minilm, TEXT_CORPUS, padding=padding, max_length=max_length)
    effective = max_length or 128  # minilm's tokenizer.json truncates to 128
    expected = reference(minilm.path, TEXT_CORPUS, effective, fixed=padding is Padding.FIXED)
    assert_equal_to(batch, expected)
    for array in batch.tensors.values():
        assert array.dtype == np.dtype("<i8")
        assert array.shape == (len(TEXT_CORPUS), len(expected[0].ids))
    if padding is Padding.FIXED:
        assert batch.tensors["input_ids"].shape[1] == effective


@pytest.mark.parametrize("size", [1, 2, 4])
def test_small_batches_encoded_one_by_one_equal_encode_batch(catalog, size):
    minilm = catalog.get("minilm")
    for start in range(0, len(TEXT_CORPUS) - size + 1, size):
        texts = TEXT_CORPUS[start : start + size]
        batch = run(minilm, texts, max_length=32, return_offsets=True)
        expected = reference(minilm.path, texts, 32)
        assert_equal_to(batch, expected)
        assert [item.offsets for item in batch.items] == [
            e.offsets[: item.length] for e, item in zip(expected, batch.items)
        ]


def test_each_text_alone_equals_batch_row(catalog):
    """Batching must not change an item: row i (unpadded) equals tokenizing text i alone."""
    minilm = catalog.get("minilm")
    batch = run(minilm, TEXT_CORPUS)
    for i, text in enumerate(TEXT_CORPUS):
        alone = run(minilm, [text])
        length = batch.items[i].length
        assert batch.tensors["input_ids"][i, :length].tolist() == alone.tensors["input_ids"][0].tolist()


def test_truncation_reported_per_item(catalog):
    minilm = catalog.get("minilm")
    untruncated = Tokenizer.from_file(str(minilm.path))
    untruncated.no_truncation()
    untruncated.no_padding()
    batch = run(minilm, TEXT_CORPUS, max_length=32)
    for text, item in zip(TEXT_CORPUS, batch.items):
        full = len(untruncated.encode(text).ids)
        assert item.original_length == full, text[:40]
        assert item.truncated == (full > 32)
        assert item.length == min(full, 32)
    assert any(item.truncated for item in batch.items) and not all(item.truncated for item in batch.items)
    assert batch.items[1].length == 2  # "" → [CLS] [SEP]


def test_offsets_and_tokens_on_request(catalog):
    minilm = catalog.get("minilm")
    texts = ["Hello, world!", "日本語 😀"]
    expected = reference(minilm.path, texts, 128)
    batch = run(minilm, texts, return_offsets=True, return_tokens=True)
    for item, encoding in zip(batch.items, expected):
        n = item.length
        assert item.tokens == encoding.tokens[:n]
        assert item.offsets == encoding.offsets[:n]
    assert batch.items[0].tokens[:3] == ["[CLS]", "hello", ","]
    assert run(minilm, texts).items[0].tokens is None


def test_left_padding_and_multiple_of_from_tokenizer_json(tmp_path):
    spec = json.loads(minilm_tokenizer_json().read_text())
    spec["padding"].update(direction="Left", pad_to_multiple_of=8, pad_id=7)
    (tmp_path / "lefty").mkdir()
    (tmp_path / "lefty" / "tokenizer.json").write_text(json.dumps(spec))
    lefty = TokenizerCatalog.discover(tmp_path, None, "lefty", 512).get("lefty")
    texts = ["short", "a somewhat longer text here", ""]
    batch = run(lefty, texts)
    expected = reference(lefty.path, texts, 128, direction="left", pad_to_multiple_of=8, pad_id=7)
    assert_equal_to(batch, expected)
    assert batch.tensors["input_ids"].shape[1] % 8 == 0
    assert batch.tensors["input_ids"][0, 0] == 7


def test_non_zero_type_ids_are_read_from_encodings(tmp_path):
    spec = json.loads(minilm_tokenizer_json().read_text())
    spec["post_processor"]["single"][-1]["SpecialToken"]["type_id"] = 1  # [SEP] gets type 1
    (tmp_path / "typed").mkdir()
    (tmp_path / "typed" / "tokenizer.json").write_text(json.dumps(spec))
    typed = TokenizerCatalog.discover(tmp_path, None, "typed", 512).get("typed")
    assert not typed.zero_type_ids
    texts = ["one", "two words", ""]
    batch = run(typed, texts)
    assert_equal_to(batch, reference(typed.path, texts, 128))
    assert batch.tensors["token_type_ids"].sum() == 3


def test_outputs_follow_model_config(tmp_path, tokenizer_repository):
    minilm = TokenizerCatalog.discover(tokenizer_repository, None, "minilm", 512).get("minilm")
    assert minilm.outputs == ("input_ids", "attention_mask", "token_type_ids")
    (tmp_path / "no_types").mkdir()
    shutil.copyfile(minilm_tokenizer_json(), tmp_path / "no_types" / "tokenizer.json")
    (tmp_path / "no_types" / "config.pbtxt").write_text(
        'name: "no_types"\ninput [ { name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] },'
        ' { name: "attention_mask" data_type: TYPE_INT64 dims: [ -1 ] } ]\n'
    )
    (tmp_path / "bare").mkdir()  # no config.pbtxt: all three
    shutil.copyfile(minilm_tokenizer_json(), tmp_path / "bare" / "tokenizer.json")
    catalog = TokenizerCatalog.discover(tokenizer_repository, tmp_path, "minilm", 512)
    assert sorted(catalog.items) == ["bare", "minilm", "no_types"]
    assert catalog.get("no_types").outputs == ("input_ids", "attention_mask")
    assert set(run(catalog.get("no_types"), ["x"]).tensors) == {"input_ids", "attention_mask"}
    assert catalog.get("bare").outputs == ("input_ids", "attention_mask", "token_type_ids")


def test_unknown_and_missing_default_tokenizer(catalog, tmp_path):
    assert catalog.get("").name == "minilm"
    with pytest.raises(NotFound, match="'nope' not found; known: minilm"):
        catalog.get("nope")
    with pytest.raises(ConfigError, match="default tokenizer 'minilm' not found"):
        TokenizerCatalog.discover(tmp_path, None, "minilm", 512)


def test_broken_tokenizer_json_fails_at_start(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "tokenizer.json").write_text("{not json")
    with pytest.raises(ConfigError, match="broken"):
        TokenizerCatalog.discover(tmp_path, None, "broken", 512)


def test_limits_name_the_limit_and_item(catalog):
    minilm = catalog.get("minilm")
    limits = TokenizeLimits(max_batch=3, max_request_bytes=1000, max_text_chars=10, max_tokens=64)
    options = TokenizeOptions()
    with pytest.raises(ResourceExhausted, match=r"batch size is 4, over the limit of 3"):
        check_request(["a"] * 4, 10, options, minilm, limits)
    with pytest.raises(ResourceExhausted, match=r"request bytes is 2000, over the limit of 1000"):
        check_request(["a"], 2000, options, minilm, limits)
    with pytest.raises(ResourceExhausted, match=r"item 1: text characters is 11, over the limit of 10"):
        check_request(["ok", "x" * 11, "fine"], 10, options, minilm, limits)
    with pytest.raises(InvalidArgument, match="max_length 128 is over the service's limit of 64"):
        check_request(["a"], 10, options, minilm, limits)  # minilm's default 128 > 64
    with pytest.raises(InvalidArgument, match="max_length 2 leaves no room"):
        check_request(["a"], 10, TokenizeOptions(max_length=2), minilm, limits)
    with pytest.raises(InvalidArgument, match="texts is empty"):
        check_request([], 0, options, minilm, limits)
    assert check_request(["a"], 10, TokenizeOptions(max_length=3), minilm, limits) == 3


def test_default_max_length_capped_by_service_limit(tokenizer_repository):
    catalog = TokenizerCatalog.discover(tokenizer_repository, None, "minilm", 64)
    assert catalog.get("minilm").default_max_length == 64


def test_truncating_copies_are_per_thread_cached_and_bounded(catalog):
    minilm = catalog.get("minilm")
    assert minilm.truncating(20) is minilm.truncating(20)
    with ThreadPoolExecutor(1) as other_thread:
        assert other_thread.submit(minilm.truncating, 20).result() is not minilm.truncating(20)
    for n in range(30, 50):
        minilm.truncating(n)
    assert len(minilm._per_thread.copies) <= 4


def test_config_flags_env_and_defaults(monkeypatch):
    from services.tokenizer.config import load_config

    for name in ("MAAS_LISTEN", "MAAS_TOKENIZER_MAX_BATCH", "MAAS_MODEL_REPOSITORY", "MAAS_TOKENIZER_DIR"):
        monkeypatch.delenv(name, raising=False)
    config = load_config([])
    assert config.server.listen == "127.0.0.1:50053" and config.default_tokenizer == "minilm"
    assert str(config.model_repository) == "model_repository" and config.tokenizer_dir is None
    assert config.limits == TokenizeLimits()
    monkeypatch.setenv("MAAS_TOKENIZER_MAX_BATCH", "7")
    monkeypatch.setenv("MAAS_TOKENIZER_DIR", "/srv/tokenizers")
    config = load_config(["--max-text-chars", "99", "--listen", "0.0.0.0:9000"])
    assert (config.limits.max_batch, config.limits.max_text_chars) == (7, 99)
    assert str(config.tokenizer_dir) == "/srv/tokenizers" and config.server.listen == "0.0.0.0:9000"
    with pytest.raises(ConfigError, match="--max-tokens must be positive"):
        load_config(["--max-tokens", "0"])
