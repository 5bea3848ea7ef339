"""int8 of efficientnet_lite0 as `maas models optimize --int8 --calibration` makes it (docs/rollouts.md):
the registry's own static quantization (services/registry/optimize.py quantize_int8_static) of the ONNX
version the local mesh registers (tools/build_models.py: model_repository/efficientnet_lite0/1/model.onnx),
calibrated on the calibration inputs the build writes (calibration.npy: scikit-image pictures that are not
evaluation photos). In-process, one thread, same run:

- optimize_int8_efficientnet_top1_agreement: share of evaluation images whose top-1 class is the same
  for the int8 model as for the TorchScript fp32 version (target >= 0.9), over the photos the vision
  benchmarks ship (bench/images.py PHOTOS, scikit-image's) and synthetic variants of each: centre and
  corner crops, a horizontal flip, darker and brighter;
- optimize_int8_efficientnet_latency_ratio: int8 / fp32 ONNX time of a batch of 8 (reported);
- optimize_int8_efficientnet_size_ratio.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.images import PHOTOS
from services.registry.optimize import quantize_int8_static
from tools.build_models import EFFICIENTNET_CALIBRATION_PHOTOS, image_variants, preprocess_image, skimage_photos

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model_repository" / "efficientnet_lite0"
ROUNDS = 15


def main() -> None:
    import onnxruntime as ort
    import torch

    assert not set(EFFICIENTNET_CALIBRATION_PHOTOS) & set(PHOTOS), "calibration and evaluation photos overlap"
    spec = json.loads((MODEL / "preprocess.json").read_text())
    evaluation = np.stack([preprocess_image(v, spec) for p in skimage_photos(PHOTOS) for v in image_variants(p)])
    calibration = np.load(MODEL / "calibration.npy")
    fp32_path = MODEL / "1" / "model.onnx"
    scripted = torch.jit.load(str(MODEL / "1" / "model.pt")).eval()
    with torch.no_grad():
        reference = scripted(torch.from_numpy(evaluation)).numpy()

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    with tempfile.TemporaryDirectory(prefix="maas-bench-optimize-vision-") as tmp:
        int8_path = Path(tmp) / "int8.onnx"
        quantize_int8_static(fp32_path, int8_path, calibration, "INPUT__0")
        size_ratio = int8_path.stat().st_size / fp32_path.stat().st_size
        fp32 = ort.InferenceSession(str(fp32_path), options, providers=["CPUExecutionProvider"])
        int8 = ort.InferenceSession(str(int8_path), options, providers=["CPUExecutionProvider"])
    run = lambda session, x: session.run(None, {"INPUT__0": x})[0]
    quantized = np.concatenate([run(int8, evaluation[i : i + 8]) for i in range(0, len(evaluation), 8)])
    agreed = np.argmax(quantized, axis=1) == np.argmax(reference, axis=1)
    top5 = np.mean([len(set(np.argsort(-a)[:5]) & set(np.argsort(-b)[:5])) / 5 for a, b in zip(reference, quantized)])

    batch = evaluation[:8]
    for session in (fp32, int8):
        run(session, batch)  # warm-up
    ratios = []
    for _ in range(ROUNDS):
        timings = []
        for session in (fp32, int8):  # alternating, so machine load hits both alike
            start = time.perf_counter()
            run(session, batch)
            timings.append(time.perf_counter() - start)
        ratios.append(timings[1] / timings[0])
    print(
        f"efficientnet_lite0 static int8 (the registry's, {len(calibration)} calibration inputs) vs TorchScript "
        f"fp32: top-1 agreed on {int(agreed.sum())} of {len(agreed)} images ({len(PHOTOS)} photos x 7 variants), "
        f"top-5 overlap {top5:.3f}, size {size_ratio:.2f}x, latency of a batch of 8 vs the fp32 ONNX "
        f"{statistics.median(ratios):.2f}x (median of {ROUNDS}; machine shared)"
    )
    print(f"BENCH optimize_int8_efficientnet_top1_agreement {agreed.mean():.3f} >= 0.9")
    print(f"BENCH optimize_int8_efficientnet_latency_ratio {statistics.median(ratios):.3f}")
    print(f"BENCH optimize_int8_efficientnet_size_ratio {size_ratio:.3f} <= 0.35")


if __name__ == "__main__":
    main()
