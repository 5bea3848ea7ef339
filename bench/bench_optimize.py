"""Optimize figures (docs/rollouts.md): minilm fp32 against its int8 version made the way `maas models
optimize --int8` makes it (services/registry/optimize.quantize_int8), in-process ONNX Runtime, same run:

- optimize_int8_minilm_latency_ratio: int8 / fp32 time of a batch of 8 sentences (one thread each, the
  two sessions alternating so machine load hits both alike; median of ROUNDS); target <= 0.8;
- optimize_int8_minilm_mean_cosine: mean cosine between the two versions' embeddings of a fixed corpus
  (CORPUS_SIZE sentences); target >= 0.99. The size ratio is printed too.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from services.registry.optimize import quantize_int8

REPO = Path(__file__).resolve().parents[1]
MINILM = REPO / "model_repository" / "minilm"
ROUNDS = 30
BATCH = 8
SUBJECTS = ["A man", "The cat", "A young girl", "Two dogs", "The committee", "An old sailor", "My neighbour", "A robot"]
VERBS = ["is eating", "was reading", "plays with", "looks at", "talks about", "repairs", "paints", "forgets"]
OBJECTS = [
    "a piece of bread.",
    "the morning newspaper.",
    "a red ball in the park.",
    "the broken engine.",
    "an unexpected letter from home.",
    "the weather forecast for tomorrow.",
    "a song.",
    "the keys.",
]
CORPUS = [f"{s} {v} {o}" for s, v, o in itertools.islice(itertools.product(SUBJECTS, VERBS, OBJECTS), 0, None, 7)]


def encode(tokenizer, texts):
    tokenizer.enable_padding()
    tokenizer.enable_truncation(128)
    enc = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in enc], np.int64)
    mask = np.array([e.attention_mask for e in enc], np.int64)
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def main() -> None:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    source = MINILM / "1" / "model.onnx"
    tokenizer = Tokenizer.from_file(str(MINILM / "tokenizer.json"))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="maas-bench-optimize-") as tmp:
        dest = Path(tmp) / "model.onnx"
        quantize_int8(source, dest)
        size_ratio = dest.stat().st_size / source.stat().st_size
        fp32 = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        int8 = ort.InferenceSession(str(dest), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in fp32.get_inputs()}

    def run(session, feed):
        return session.run(None, {k: v for k, v in feed.items() if k in names})[0]

    vectors = [
        np.concatenate([run(s, encode(tokenizer, CORPUS[i : i + 16])) for i in range(0, len(CORPUS), 16)])
        for s in (fp32, int8)
    ]
    a, b = (v / np.linalg.norm(v, axis=1, keepdims=True) for v in vectors)
    cosines = np.sum(a * b, axis=1)

    feed = encode(tokenizer, CORPUS[:BATCH])
    for session in (fp32, int8):
        run(session, feed)  # warm-up
    ratios = []
    for _ in range(ROUNDS):
        timings = []
        for session in (fp32, int8):
            start = time.perf_counter()
            run(session, feed)
            timings.append(time.perf_counter() - start)
        ratios.append(timings[1] / timings[0])
    print(
        f"minilm int8 vs fp32 (dynamic quantization): size {size_ratio:.2f}x, latency of a batch of {BATCH} "
        f"{statistics.median(ratios):.2f}x (median of {ROUNDS}), cosine over {len(CORPUS)} sentences: mean "
        f"{cosines.mean():.4f}, min {cosines.min():.4f} (machine shared, loaded)"
    )
    print(f"BENCH optimize_int8_minilm_size_ratio {size_ratio:.3f} <= 0.5")
    print(f"BENCH optimize_int8_minilm_latency_ratio {statistics.median(ratios):.3f} <= 0.8")
    print(f"BENCH optimize_int8_minilm_mean_cosine {cosines.mean():.4f} >= 0.99")


if __name__ == "__main__":
    main()
