"""End to end through the mesh (router → tokenizer/vision → Triton) against an in-process baseline.

16 closed-loop callers, one text or one image per request. The baseline does the same work in this
process with the same libraries: `tokenizers` + onnxruntime for embeddings, PIL + torch for images.
Triton's dynamic batching is what lets the mesh keep up despite three extra hops.
Mesh and baseline take turns for ROUNDS rounds and each keeps its best, so a burst of load from other
processes on a shared machine does not decide the ratio.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from maas.client import AsyncMeshClient
from maas.local.mesh import FREE_PORTS, LocalMesh, MeshConfig

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "model_repository"
CONCURRENCY = 16
SECONDS = 6.0
WARMUP_SECONDS = 2.0
ROUNDS = 2
SENTENCES = [
    f"Sentence number {i}: the quick brown fox jumps over the lazy dog near the river bank." for i in range(64)
]


def cat_jpeg() -> bytes:
    from maas.cli.mesh import cat_photo

    return cat_photo()


# -- in-process baselines ------------------------------------------------------------------------------
def embed_baseline() -> Callable[[int], None]:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(MODELS / "minilm" / "tokenizer.json"))
    session = ort.InferenceSession(str(MODELS / "minilm" / "1" / "model.onnx"), providers=["CPUExecutionProvider"])

    def run(i: int) -> None:
        e = tokenizer.encode(SENTENCES[i % len(SENTENCES)])
        feed = {
            "input_ids": np.array([e.ids], np.int64),
            "attention_mask": np.array([e.attention_mask], np.int64),
            "token_type_ids": np.array([e.type_ids], np.int64),
        }
        session.run(None, feed)

    return run


def classify_baseline() -> Callable[[int], None]:
    import io

    import torch
    from PIL import Image

    spec = json.loads((MODELS / "efficientnet_lite0" / "preprocess.json").read_text())
    model = torch.jit.load(str(MODELS / "efficientnet_lite0" / "1" / "model.pt")).eval()
    jpeg = cat_jpeg()
    mean, std = np.float32(spec["mean"]), np.float32(spec["std"])

    def run(i: int) -> None:
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
        scale = spec["resize_shorter"] / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BILINEAR)
        ch, cw = spec["crop"]
        left, top = (img.width - cw) // 2, (img.height - ch) // 2
        x = (np.asarray(img.crop((left, top, left + cw, top + ch)), np.float32) / 255.0 - mean) / std
        with torch.inference_mode():
            logits = model(torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)[None])))
        torch.softmax(logits, 1).topk(5)

    return run


def threaded_qps(run: Callable[[int], None], concurrency: int, seconds: float) -> float:
    """Requests per second of `concurrency` threads calling run() in a closed loop."""
    counts = [0] * concurrency

    def worker(slot: int, until: float, record: bool) -> None:
        i = slot
        while time.perf_counter() < until:
            run(i)
            i += concurrency
            if record:
                counts[slot] += 1

    for record, duration in ((False, WARMUP_SECONDS), (True, seconds)):
        until = time.perf_counter() + duration
        threads = [threading.Thread(target=worker, args=(s, until, record)) for s in range(concurrency)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return sum(counts) / (time.perf_counter() - started)


# -- through the mesh ------------------------------------------------------------------------------------
async def mesh_qps(address: str, call: str, concurrency: int, seconds: float) -> tuple[float, float]:
    """(requests per second, p50 ms) of `concurrency` callers through the router."""
    jpeg = cat_jpeg()
    latencies: list[float] = []
    async with AsyncMeshClient(address) as client:

        async def one(i: int) -> None:
            if call == "embed":
                await client.embed([SENTENCES[i % len(SENTENCES)]], "minilm")
            else:
                await client.classify([jpeg], "efficientnet_lite0", top_k=5)

        async def caller(slot: int, until: float, record: bool) -> None:
            i = slot
            while (now := time.perf_counter()) < until:
                await one(i)
                i += concurrency
                if record:
                    latencies.append((time.perf_counter() - now) * 1000)

        await asyncio.gather(*(caller(s, time.perf_counter() + WARMUP_SECONDS, False) for s in range(concurrency)))
        started = time.perf_counter()
        await asyncio.gather(*(caller(s, started + seconds, True) for s in range(concurrency)))
        return len(latencies) / (time.perf_counter() - started), float(np.percentile(latencies, 50))


def main() -> None:
    baselines = {"embed": embed_baseline(), "classify": classify_baseline()}
    best = {(call, where): (0.0, 0.0) for call in baselines for where in ("mesh", "in-process")}
    with tempfile.TemporaryDirectory(prefix="maas-bench-e2e-") as tmp:
        with LocalMesh(MeshConfig(state_dir=Path(tmp) / "mesh", ports=FREE_PORTS)) as mesh:
            # Contenders take turns, best of ROUNDS each: other processes' load bursts on this shared
            # machine then cannot land on one side only (the idle mesh costs the baseline nothing).
            for _ in range(ROUNDS):
                for call, run in baselines.items():
                    best[call, "in-process"] = max(
                        best[call, "in-process"], (threaded_qps(run, CONCURRENCY, SECONDS), 0.0)
                    )
                    best[call, "mesh"] = max(
                        best[call, "mesh"], asyncio.run(mesh_qps(mesh.router_address, call, CONCURRENCY, SECONDS))
                    )
    for call in baselines:
        (qps, p50), (base, _) = best[call, "mesh"], best[call, "in-process"]
        print(
            f"{call}: mesh {qps:.1f} req/s (p50 {p50:.1f} ms) vs in-process {base:.1f} req/s "
            f"at concurrency {CONCURRENCY}, best of {ROUNDS}"
        )
    for call in baselines:
        ratio = best[call, "mesh"][0] / best[call, "in-process"][0]
        print(f"BENCH e2e_{call}_qps_ratio_c{CONCURRENCY} {ratio:.3f} >= 0.8")


if __name__ == "__main__":
    main()
