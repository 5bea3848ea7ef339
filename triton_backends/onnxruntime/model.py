"""Python-based Triton backend named "onnxruntime": serves `backend: "onnxruntime"` models on CPU-only
machines whose Triton has no native ONNX Runtime backend. The same config.pbtxt loads unchanged on the
official image, where the native backend takes over.
"""

import importlib.util
import sys
from pathlib import Path

import onnxruntime as ort


def load_common():
    # Loaded by path: the stub imports this file directly, triton_backends is not a package on sys.path.
    path = Path(__file__).resolve().parent.parent / "common" / "batching.py"
    spec = importlib.util.spec_from_file_location("maas_triton_batching", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


batching = load_common()


def session_options() -> ort.SessionOptions:
    """No CPU arena and no memory patterns: ONNX Runtime would otherwise keep the peak of every shape
    it has seen (a burst of max-batch, max-length requests) for the life of the stub; the allocator
    then returns buffers after each run, for a few percent of throughput."""
    options = ort.SessionOptions()
    options.enable_cpu_mem_arena = False
    options.enable_mem_pattern = False
    return options


class TritonPythonModel:
    def initialize(self, args):
        self.model = batching.BatchedModel(args["model_config"])
        path = batching.model_file(args, self.model.config, "model.onnx")
        self.session = ort.InferenceSession(str(path), session_options(), providers=["CPUExecutionProvider"])
        # The native backend matches config tensors to graph tensors by name; fail loading, not serving.
        graph_in = {i.name for i in self.session.get_inputs()}
        graph_out = {o.name for o in self.session.get_outputs()}
        missing = [s.name for s in self.model.inputs if s.name not in graph_in]
        missing += [s.name for s in self.model.outputs if s.name not in graph_out]
        if missing:
            raise ValueError(
                f"{path}: config tensors {missing} not in graph (inputs {sorted(graph_in)}, "
                f"outputs {sorted(graph_out)})"
            )
        self.output_names = [s.name for s in self.model.outputs]

    def execute(self, requests):
        return self.model.execute(requests, lambda feeds: self.session.run(self.output_names, feeds))

    def finalize(self):
        self.session = None
