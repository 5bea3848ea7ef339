"""The OpenAI gateway's hop: the same request through HTTP and straight to the router's gRPC API,
interleaved one by one in one mesh so the model's own time cancels out.

`openai_http_added_ms_c1`: POST /v1/chat/completions (max_tokens=1, greedy) against GenerateUnary —
the median of the per-round differences (one caller, a keep-alive connection on each side). The same
for /v1/embeddings against Embed (a shorter model time, so less noise) in base64, what the official
client asks for by default; JSON float lists (`encoding_format: float`, 384 numbers printed as text)
are shown for information, as is the `openai` client's own overhead (spent in the caller, not the mesh).
"""

from __future__ import annotations

import http.client
import json
import statistics
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

from maas.client import MeshClient
from maas.local.mesh import FREE_PORTS, LocalMesh, MeshConfig

MODEL = "smollm2"
PROMPT = "Say hello."
ROUNDS = {"chat": 100, "embed": 300}
WARMUP = 10


def paired(calls: dict, rounds: int) -> dict[str, float]:
    """Median over rounds of (each call's ms minus the first call's ms), the calls interleaved."""
    diffs: dict[str, list[float]] = {name: [] for name in calls}
    for i in range(WARMUP + rounds):
        took = {}
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            took[name] = (time.perf_counter() - start) * 1000
        if i >= WARMUP:
            base = next(iter(took.values()))
            for name, ms in took.items():
                diffs[name].append(ms if name == next(iter(took)) else ms - base)
    return {name: statistics.median(d) for name, d in diffs.items()}


def main() -> None:
    import openai

    chat_body = json.dumps(
        {"model": MODEL, "max_tokens": 1, "temperature": 0, "messages": [{"role": "user", "content": PROMPT}]}
    )
    embed_body = json.dumps({"model": "minilm", "input": ["hello world"], "encoding_format": "base64"})
    float_body = json.dumps({"model": "minilm", "input": ["hello world"], "encoding_format": "float"})
    with (
        tempfile.TemporaryDirectory() as tmp,
        LocalMesh(MeshConfig(state_dir=Path(tmp) / "mesh", ports=FREE_PORTS)) as mesh,
        MeshClient(mesh.router_address) as direct,
    ):
        url = urlparse(mesh.openai_url)
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        api = openai.OpenAI(base_url=mesh.openai_url, api_key="unused", max_retries=0)

        def post(path: str, body: str) -> dict:
            conn.request("POST", path, body, {"Content-Type": "application/json"})
            response = conn.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer
            return answer

        chat = {
            "grpc": lambda: direct.chat(PROMPT, MODEL, max_tokens=1, temperature=0.0).text,
            "http": lambda: post("/v1/chat/completions", chat_body)["choices"][0]["message"]["content"],
            "openai_client": lambda: (
                api.chat.completions.create(
                    model=MODEL, max_tokens=1, temperature=0, messages=[{"role": "user", "content": PROMPT}]
                )
                .choices[0]
                .message.content
            ),
        }
        embed = {
            "grpc": lambda: direct.embed(["hello world"], "minilm"),
            "http": lambda: post("/v1/embeddings", embed_body),
            "http_float": lambda: post("/v1/embeddings", float_body),
            "openai_client": lambda: api.embeddings.create(model="minilm", input=["hello world"]),
        }
        assert len({call() for call in chat.values()}) == 1  # the same answer each way
        results = {"chat": paired(chat, ROUNDS["chat"]), "embed": paired(embed, ROUNDS["embed"])}
        conn.close()
        api.close()
    for kind, r in results.items():
        print(
            f"  {kind}: gRPC median {r['grpc']:.2f} ms; added (median of paired differences): "
            + ", ".join(f"{name} {ms:+.2f} ms" for name, ms in r.items() if name != "grpc")
        )
    print(f"BENCH openai_http_added_ms_c1 {results['chat']['http']:.2f} <= 2")
    print(f"BENCH openai_http_added_ms_embed_c1 {results['embed']['http']:.2f} <= 2")
    print(f"BENCH openai_http_float_added_ms_embed_c1 {results['embed']['http_float']:.2f} >= 0")
    print(f"BENCH openai_client_added_ms_c1 {results['chat']['openai_client']:.2f} >= 0")


if __name__ == "__main__":
    main()
