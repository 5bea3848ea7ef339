"""Python-based Triton backend named "pytorch": serves TorchScript `model.pt` models (platform
pytorch_libtorch) on CPU-only machines whose Triton has no native LibTorch backend. The same config.pbtxt
loads unchanged on the official image, where the native backend takes over.

Like the native backend, tensors are matched by position: INPUT__0, INPUT__1 ... are forward()'s
arguments and OUTPUT__0, OUTPUT__1 ... its returned tensors, by the number after "__".
"""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import torch


def load_common():
    # Loaded by path: the stub imports this file directly, triton_backends is not a package on sys.path.
    path = Path(__file__).resolve().parent.parent / "common" / "batching.py"
    spec = importlib.util.spec_from_file_location("maas_triton_batching", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


batching = load_common()


def index_of(name: str) -> int:
    m = re.fullmatch(r".+__(\d+)", name)
    if not m:
        raise ValueError(f"tensor {name!r} must be named <name>__<index> (e.g. INPUT__0) for TorchScript")
    return int(m.group(1))


class TritonPythonModel:
    def initialize(self, args):
        self.model = batching.BatchedModel(args["model_config"])
        path = batching.model_file(args, self.model.config, "model.pt")
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.input_order = sorted(self.model.inputs, key=lambda s: index_of(s.name))
        self.output_index = [index_of(s.name) for s in self.model.outputs]  # config order -> result index

    def _infer(self, feeds):
        with torch.inference_mode():
            # np.require: Triton's input buffers are read-only, torch wants writable memory.
            out = self.module(*[torch.from_numpy(np.require(feeds[s.name], requirements=["C", "W"]))
                                for s in self.input_order])
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if max(self.output_index) >= len(outs):
            raise RuntimeError(f"model returned {len(outs)} outputs, config wants index {max(self.output_index)}")
        return [outs[i].numpy() for i in self.output_index]

    def execute(self, requests):
        return self.model.execute(requests, self._infer)

    def finalize(self):
        self.module = None
