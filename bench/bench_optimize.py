"""Optimize figures (docs/rollouts.md): minilm fp32 against its int8 and fp16 versions made the way `maas
models optimize --int8 / --fp16` makes them (services/registry/optimize.OPTIMIZATIONS), in-process ONNX
Runtime, same run:

- optimize_int8_minilm_latency_ratio: int8 / fp32 time of a batch of 8 sentences (one thread each, the
  two sessions alternating so machine load hits both alike; median of ROUNDS); target <= 0.8;
- optimize_int8_minilm_mean_cosine: mean cosine between the two versions' embeddings of a fixed corpus
  (CORPUS_SIZE sentences); target >= 0.99. The size ratio is printed too;
- the same three for fp16 (optimize_fp16_minilm_*): size <= 0.55, mean cosine >= 0.999, latency reported.
"""

from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from services.registry.optimize import OPTIMIZATIONS

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
    sessions, size_ratio = {}, {}
    with tempfile.TemporaryDirectory(prefix="maas-bench-optimize-") as tmp:
        sessions["fp32"] = ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])
        for name, (transform, _) in OPTIMIZATIONS.items():
            dest = Path(tmp) / f"{name}.onnx"
            transform(source, dest)
            size_ratio[name] = dest.stat().st_size / source.stat().st_size
            sessions[name] = ort.InferenceSession(str(dest), options, providers=["CPUExecutionProvider"])
    names = {i.name for i in sessions["fp32"].get_inputs()}

    def run(session, feed):
        return session.run(None, {k: v for k, v in feed.items() if k in names})[0]

    def unit(session):
        v = np.concatenate([run(session, encode(tokenizer, CORPUS[i : i + 16])) for i in range(0, len(CORPUS), 16)])
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    reference = unit(sessions["fp32"])
    cosines = {name: np.sum(reference * unit(sessions[name]), axis=1) for name in OPTIMIZATIONS}

    feed = encode(tokenizer, CORPUS[:BATCH])
    for session in sessions.values():
        run(session, feed)  # warm-up
    ratios: dict[str, list[float]] = {name: [] for name in OPTIMIZATIONS}
    for _ in range(ROUNDS):
        timings = {}
        for name, session in sessions.items():  # alternating, so machine load hits all alike
            start = time.perf_counter()
            run(session, feed)
            timings[name] = time.perf_counter() - start
        for name in OPTIMIZATIONS:
            ratios[name].append(timings[name] / timings["fp32"])
    for name in OPTIMIZATIONS:
        print(
            f"minilm {name} vs fp32: size {size_ratio[name]:.2f}x, latency of a batch of {BATCH} "
            f"{statistics.median(ratios[name]):.2f}x (median of {ROUNDS}), cosine over {len(CORPUS)} sentences: "
            f"mean {cosines[name].mean():.4f}, min {cosines[name].min():.4f} (machine shared, loaded)"
        )
    print(f"BENCH optimize_int8_minilm_size_ratio {size_ratio['int8']:.3f} <= 0.5")
    print(f"BENCH optimize_int8_minilm_latency_ratio {statistics.median(ratios['int8']):.3f} <= 0.8")
    print(f"BENCH optimize_int8_minilm_mean_cosine {cosines['int8'].mean():.4f} >= 0.99")
    # fp16 on a CPU without fp16 arithmetic: half the size, the same answers, latency reported (no target).
    print(f"BENCH optimize_fp16_minilm_size_ratio {size_ratio['fp16']:.3f} <= 0.55")
    print(f"BENCH optimize_fp16_minilm_latency_ratio {statistics.median(ratios['fp16']):.3f}")
    print(f"BENCH optimize_fp16_minilm_mean_cosine {cosines['fp16'].mean():.4f} >= 0.999")


if __name__ == "__main__":
    main()
