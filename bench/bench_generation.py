"""Generation: the chat model through Triton and the mesh against the same engine in this process.

- int4 (v2) against fp32 (v1): greedy token agreement on a fixed prompt set and the speed ratio, the
  figures that choose the production version.
- Time to first token and tokens/s of one stream: in-process engine (baseline), Triton directly, the
  mesh's Router.Generate (when the router serves it).
- Aggregate tokens/s at 8 concurrent streams over 1 stream, and the inter-token p99 at 8.
"""

from __future__ import annotations

import queue
import statistics
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "model_repository" / "smollm2"
PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about autumn leaves.",
    "Why is the sky blue?",
    "List three prime numbers.",
    "Translate 'good morning' into Spanish.",
    "What does a CPU do?",
    "Give me a tip for learning to cook.",
    "Name two planets of the solar system.",
]
TOKENS = 64


def chat_prompt(question: str) -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"


def chat_ids(question: str) -> list[int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(MODEL / "tokenizer.json"))
    return tok.encode(chat_prompt(question), add_special_tokens=False).ids


class Engine:
    """ONNX Runtime GenAI in this process: the baseline every figure is measured against."""

    def __init__(self, version: str):
        import onnxruntime_genai as og

        self.og, self.model = og, og.Model(str(MODEL / version))

    def stream(self, ids: list[int], max_tokens: int, exactly: bool = True):
        """Yields (token, seconds since start) greedily; `exactly` masks end-of-sequence."""
        og = self.og
        t0 = time.perf_counter()
        params = og.GeneratorParams(self.model)
        params.set_search_options(
            max_length=len(ids) + max_tokens, do_sample=False, min_length=len(ids) + max_tokens if exactly else 0
        )
        generator = og.Generator(self.model, params)
        generator.append_tokens(np.asarray(ids, dtype=np.int32))
        while not generator.is_done():
            generator.generate_next_token()
            yield int(generator.get_next_tokens()[0]), time.perf_counter() - t0


def stream_stats(times: list[float]) -> tuple[float, float]:
    """(time to first token in ms, tokens/s after the first)."""
    ttft = times[0] * 1000
    rate = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else 0.0
    return ttft, rate


def agreement(a: list[int], b: list[int]) -> tuple[float, int]:
    """(share of positions equal, length of the common prefix)."""
    same = sum(x == y for x, y in zip(a, b))
    prefix = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / max(len(a), 1), prefix


def bench_versions() -> None:
    fp32, int4 = Engine("1"), Engine("2")
    speeds: dict[str, list[float]] = {"1": [], "2": []}
    prefixes, exact = [], []
    for prompt in PROMPTS:
        ids = chat_ids(prompt)
        runs = {}
        for version, engine in (("1", fp32), ("2", int4)):
            out = list(engine.stream(ids, 32))
            runs[version] = [t for t, _ in out]
            speeds[version].append(stream_stats([s for _, s in out])[1])
        share, prefix = agreement(runs["2"], runs["1"])
        exact.append(share)
        prefixes.append(prefix)
    print(
        f"int4 vs fp32 greedy, 32 tokens x {len(PROMPTS)} prompts: common prefix {prefixes}, "
        f"tok/s fp32 {statistics.median(speeds['1']):.1f} int4 {statistics.median(speeds['2']):.1f}"
    )
    print(f"BENCH generate_int4_vs_fp32_prefix_agreement {statistics.mean(prefixes) / 32:.2f} >= 0")
    print(f"BENCH generate_int4_vs_fp32_token_agreement {statistics.mean(exact):.2f} >= 0")
    print(
        f"BENCH generate_int4_over_fp32_tokens_per_s "
        f"{statistics.median(speeds['2']) / statistics.median(speeds['1']):.2f} >= 1"
    )


class TritonStreams:
    """tritonclient's stream API straight to Triton: one long-lived stream per caller thread, as a
    serving client keeps it (so connection set-up is not counted as time to first token)."""

    def __init__(self, address: str):
        import threading

        import tritonclient.grpc as tg

        self.clients: list = []
        self.tg, self.address, self.local = tg, address, threading.local()

    def _stream(self):
        if not hasattr(self.local, "client"):
            self.local.client = self.tg.InferenceServerClient(self.address)
            self.local.responses = queue.Queue()
            self.local.client.start_stream(
                callback=lambda result, error, q=self.local.responses: q.put((result, error, time.perf_counter()))
            )
            self.clients.append(self.local.client)
        return self.local.client, self.local.responses

    def run(self, ids: list[int], max_tokens: int) -> list[float]:
        tg = self.tg
        client, responses = self._stream()
        inputs = [tg.InferInput("input_ids", [len(ids)], "INT64"), tg.InferInput("max_tokens", [1], "INT32")]
        inputs[0].set_data_from_numpy(np.asarray(ids, dtype=np.int64))
        inputs[1].set_data_from_numpy(np.asarray([max_tokens], dtype=np.int32))
        t0, times = time.perf_counter(), []
        client.async_stream_infer("smollm2", inputs, model_version="2", enable_empty_final_response=True)
        while True:
            result, error, at = responses.get(timeout=120)
            if error is not None:
                raise error
            times += [at - t0] * result.as_numpy("output_ids").size
            if result.get_response().parameters["triton_final_response"].bool_param:
                return times

    def close(self) -> None:
        for client in self.clients:
            client.stop_stream()
            client.close()


def concurrent(run, ids: list[int], streams: int, max_tokens: int) -> tuple[float, float]:
    """(aggregate tokens/s, inter-token p99 ms) of `streams` callers at once."""
    from concurrent.futures import ThreadPoolExecutor

    t0 = time.perf_counter()
    with ThreadPoolExecutor(streams) as pool:
        results = list(pool.map(lambda _: run(ids, max_tokens), range(streams)))
    wall = time.perf_counter() - t0
    gaps = [b - a for times in results for a, b in zip(times, times[1:])]
    return sum(len(t) for t in results) / wall, float(np.percentile(gaps, 99) * 1000) if gaps else 0.0


class MeshStreams:
    """Router.Generate through the mesh (the router, its tokenizer hops, Triton), one channel per caller."""

    def __init__(self, address: str, prompt: str, version: int = 0):
        import threading

        self.address, self.prompt, self.version, self.local = address, prompt, version, threading.local()

    def run(self, ids: list[int], max_tokens: int) -> list[float]:
        import grpc

        from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2

        if not hasattr(self.local, "stub"):
            self.local.stub = router_pb2_grpc.RouterStub(grpc.insecure_channel(self.address))
        request = router_pb2.GenerateRequest(
            model=tensor_pb2.ModelRef(name="smollm2", version=self.version),
            prompt=self.prompt,
            sampling=router_pb2.SamplingParams(max_tokens=max_tokens),
        )
        t0, times = time.perf_counter(), []
        for response in self.local.stub.Generate(request, timeout=120):
            at = time.perf_counter() - t0
            times += [at] * len(response.token_ids)
        return times


def bench_serving() -> None:
    """In-process engine, Triton direct (the mesh's own Triton) and Router.Generate, taking turns so the
    machine's load changes hit all three alike; added figures are medians of paired differences."""
    import tempfile

    from maas.local.mesh import FREE_PORTS, SOURCE_MODELS, LocalMesh, MeshConfig

    prompt = chat_prompt("Tell me a long story about a dragon and a knight.")
    ids = chat_ids("Tell me a long story about a dragon and a knight.")
    engine = Engine("2")

    def in_process(ids: list[int], max_tokens: int) -> list[float]:
        return [at for _, at in engine.stream(ids, max_tokens, exactly=False)]

    with (
        tempfile.TemporaryDirectory(prefix="maas-bench-gen-") as state,
        LocalMesh(
            MeshConfig(
                state_dir=Path(state), ports=FREE_PORTS, models=[m for m in SOURCE_MODELS if m.name == "smollm2"]
            )
        ) as mesh,
    ):
        direct, streams = TritonStreams(mesh.triton.grpc_address), MeshStreams(mesh.router_address, prompt)
        paths = {"engine": in_process, "triton": direct.run, "mesh": streams.run}
        for run in paths.values():
            run(ids, 8)  # warm-up
        rounds: dict[str, list[tuple[float, float]]] = {name: [] for name in paths}
        for _ in range(5):
            for name, run in paths.items():
                rounds[name].append(stream_stats(run(ids, TOKENS)))
        c1_total, _ = concurrent(streams.run, ids, 1, TOKENS)
        c8_total, p99 = concurrent(streams.run, ids, 8, TOKENS)
        fp32 = MeshStreams(mesh.router_address, prompt, version=1)
        fp32_c1, _ = concurrent(fp32.run, ids, 1, TOKENS)
        fp32_c8, _ = concurrent(fp32.run, ids, 8, TOKENS)
        direct.close()

    def added_ttft(name: str, base: str = "engine") -> float:
        return statistics.median(r[0] - e[0] for r, e in zip(rounds[name], rounds[base]))

    def rate_ratio(name: str) -> float:
        return statistics.median(r[1] / e[1] for r, e in zip(rounds[name], rounds["engine"]))

    for name in paths:
        print(
            f"{name}: ttft median {statistics.median(r[0] for r in rounds[name]):.1f} ms, "
            f"{statistics.median(r[1] for r in rounds[name]):.1f} tok/s"
        )
    print(
        f"mesh Router.Generate, production (int4): c1 {c1_total:.1f} tok/s, c8 {c8_total:.1f} tok/s (aggregate); "
        f"v1 (fp32): c1 {fp32_c1:.1f}, c8 {fp32_c8:.1f}"
    )
    print(f"BENCH generate_triton_ttft_added_ms_c1 {added_ttft('triton'):.1f} <= 5")
    print(f"BENCH generate_ttft_added_ms_c1 {added_ttft('mesh'):.1f} <= 5")
    # The mesh's own share (router, chat template, detokenizer) over Triton's stream, same Triton.
    print(f"BENCH generate_mesh_over_triton_ttft_added_ms_c1 {added_ttft('mesh', 'triton'):.1f} <= 5")
    print(f"BENCH generate_tokens_per_s_ratio_c1 {rate_ratio('mesh'):.2f} >= 0.9")
    print(f"BENCH generate_tokens_per_s_c8_over_c1 {c8_total / c1_total:.2f} >= 3")
    print(f"BENCH generate_tokens_per_s_c8_over_c1_fp32 {fp32_c8 / fp32_c1:.2f} >= 3")
    print(f"BENCH generate_inter_token_p99_ms_c8 {p99:.1f} >= 0")


def bench_engine_batching() -> None:
    """What batching buys in the engine itself (8 rows of one Generator over 1, decode steps only): the
    ceiling of the mesh's c8/c1, per version."""
    import onnxruntime_genai as og

    ids = chat_ids("Tell me a long story about a dragon and a knight.")
    for version, precision in (("2", "int4"), ("1", "fp32")):
        model = og.Model(str(MODEL / version))

        def rate(rows: int) -> float:
            params = og.GeneratorParams(model)
            params.set_search_options(
                batch_size=rows, max_length=len(ids) + TOKENS, min_length=len(ids) + TOKENS, do_sample=False
            )
            generator = og.Generator(model, params)
            generator.append_tokens(np.tile(np.asarray(ids, dtype=np.int32), (rows, 1)))
            generator.generate_next_token()
            t0, steps = time.perf_counter(), 0
            while not generator.is_done():
                generator.generate_next_token()
                steps += 1
            return rows * steps / (time.perf_counter() - t0)

        ratio = statistics.median(rate(8) / rate(1) for _ in range(3))
        print(f"BENCH generate_engine_batch8_over_batch1_{precision} {ratio:.2f} >= 0")


def main() -> None:
    bench_versions()
    bench_engine_batching()
    bench_serving()


if __name__ == "__main__":
    main()
