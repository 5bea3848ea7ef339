"""Python-based Triton backend named "pytorch": serves TorchScript `model.pt` models (platform
pytorch_libtorch) on CPU-only machines whose Triton has no native LibTorch backend. The same config.pbtxt
loads unchanged on the official image, where the native backend takes over.

Like the native backend, tensors are matched by position: INPUT__0, INPUT__1 ... are forward()'s
arguments and OUTPUT__0, OUTPUT__1 ... its returned tensors, by the number after "__".

The native backend's `parameters` are honoured where they apply on CPU: INTRA_OP_THREAD_COUNT,
INTER_OP_THREAD_COUNT, DISABLE_OPTIMIZED_EXECUTION and INFERENCE_MODE (default true here).
"""

import importlib.util
import re
import sys
import threading
from pathlib import Path

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


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


def configure_torch(config: dict) -> None:
    """The native backend's process-wide torch settings, from the config's `parameters`."""
    intra = int(batching.parameter(config, "INTRA_OP_THREAD_COUNT", "0"))
    if intra > 0:
        torch.set_num_threads(intra)
    inter = int(batching.parameter(config, "INTER_OP_THREAD_COUNT", "0"))
    if inter > 0:
        try:
            torch.set_num_interop_threads(inter)
        except RuntimeError:  # only settable before the first inter-op work in this process
            pass
    if batching.parameter(config, "DISABLE_OPTIMIZED_EXECUTION", "false").lower() in ("true", "1", "yes"):
        torch._C._set_graph_executor_optimize(False)  # noqa: SLF001 - torch has no public switch


class TritonPythonModel:
    def initialize(self, args):
        self.model = batching.BatchedModel(args["model_config"])
        config = self.model.config
        path = batching.model_file(args, config, "model.pt")
        batching.keep_freed_memory()  # big batches: see keep_freed_memory
        configure_torch(config)
        self.grad_mode = (
            torch.inference_mode
            if batching.parameter(config, "INFERENCE_MODE", "true").lower() in ("true", "1", "yes")
            else torch.no_grad
        )
        self.module = torch.jit.load(str(path), map_location="cpu").eval()
        self.input_order = sorted(self.model.inputs, key=lambda s: index_of(s.name))
        self.output_index = [index_of(s.name) for s in self.model.outputs]  # config order -> result index
        self._stopping, self._warming = threading.Event(), None
        self._warm_up()

    def _warm_up(self):
        """Run batch sizes 1, the largest and one between twice each on zeros: TorchScript's profiling
        executor specialises the first two shapes it sees and then compiles one dynamic-shape plan
        (~0.5 s at batch 16), which would otherwise land on the first requests. Skipped for variable dims.

        Batch 1 runs before the model is READY; the larger sizes on a thread after it. They were most
        of the load: under CPU load 26 s of a 30 s efficientnet_lite0 load (batch 16 ~7 s a call),
        and after a Triton restart Classify waited for all of it."""
        if any(d < 0 for s in self.input_order for d in s.dims):
            return
        largest = self.model.max_batch_size
        sizes = list(dict.fromkeys([1, largest, max(1, largest // 2)])) if largest > 0 else [None]
        self._warm(sizes[:1])
        if len(sizes) > 1:
            self._warming = threading.Thread(target=self._warm, args=(sizes[1:],), name="warm-up", daemon=True)
            self._warming.start()

    def _warm(self, sizes):
        try:
            for size in sizes:
                feeds = {s.name: np.zeros(((size,) if size else ()) + s.dims, s.dtype) for s in self.input_order}
                for _ in range(2):
                    if self._stopping.is_set():
                        return
                    self._infer(feeds)
        except Exception as exc:  # noqa: BLE001 - a model that cannot take zeros still serves; it only starts cold
            if not self._stopping.is_set():
                pb_utils.Logger.log_warn(f"warm-up skipped: {type(exc).__name__}: {exc}")

    def _infer(self, feeds):
        with self.grad_mode():
            # np.require: Triton's input buffers are read-only, torch wants writable memory.
            out = self.module(
                *[torch.from_numpy(np.require(feeds[s.name], requirements=["C", "W"])) for s in self.input_order]
            )
        outs = list(out) if isinstance(out, (tuple, list)) else [out]
        if max(self.output_index) >= len(outs):
            raise RuntimeError(f"model returned {len(outs)} outputs, config wants index {max(self.output_index)}")
        return [outs[i].numpy() for i in self.output_index]

    def execute(self, requests):
        return self.model.execute(requests, self._infer)

    def finalize(self):
        self._stopping.set()
        if self._warming is not None:
            self._warming.join()  # at most one warm-up call still running
        self.module = None
