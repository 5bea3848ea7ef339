"""Automatic rollouts through the real mesh (Triton, registry, router as processes; docs/rollouts.md):
a healthy canary is promoted after its steps, a canary failing 20 % of requests and a slow one are rolled
back, a registry restarted mid-rollout resumes, and bad input changes nothing."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections import Counter
from pathlib import Path

import grpc
import numpy as np
import pytest

from maas.client import AsyncMeshClient, MeshClient, MeshError
from maas.registry_client import RegistryClient, RegistryError
from maas.v1 import registry_pb2 as pb
from tests.fixtures.mesh import REPO, register_tiny
from tests.fixtures.rollout_models import FAIL_MARKER, faulty_onnx, slow_onnx

X = np.ones((1, 4), np.float32)
MARKED = np.full((1, 4), FAIL_MARKER, np.float32)
INTERVAL = 1.0


def fast_policy(**overrides) -> pb.RolloutPolicy:
    fields = dict(
        step_weight=25,
        interval_seconds=INTERVAL,
        max_weight=50,
        max_error_rate=0.05,
        max_p99_ratio=0.0,
        min_requests=5,
        failure_limit=2,
    )
    fields.update(overrides)
    return pb.RolloutPolicy(**fields)


def register_file(registry: RegistryClient, model: str, path: Path, data: bytes, description: str) -> int:
    path.write_bytes(data)
    version = registry.register(path, model, format="onnx", description=description)
    registry.wait_ready(model, version.version, timeout=300)
    return version.version


def wait_for(check, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (found := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)
    return found


class Traffic:
    """Requests to `model` from a background thread (concurrency 4, every `mark_every`-th one carrying the
    fault marker) until stopped or `limit` seconds passed; counts answers by version and failures.
    `oip`: an unmodified tritonclient's ModelInfer calls on the router's OIP port at `address` (the fast
    path's, whose per-version figures the forwarder reports) instead of the mesh client's Infer."""

    def __init__(
        self,
        address: str,
        model: str,
        mark_every: int = 0,
        limit: float = 120.0,
        texts: bool = False,
        oip: bool = False,
        images: list[bytes] | None = None,
    ):
        self.address, self.model, self.mark_every, self.limit = address, model, mark_every, limit
        self.texts = texts  # Embed calls (sentences) instead of Infer
        self.oip = oip
        self.images = images or []  # Classify calls, one image each, in turn
        self.answered: Counter[int] = Counter()
        self.failed: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _run(self) -> None:
        if self.oip:
            await self._run_oip()
            return
        deadline = time.monotonic() + self.limit
        async with AsyncMeshClient(self.address) as client:

            async def worker(w: int) -> None:
                i = w
                while not self._stop.is_set() and time.monotonic() < deadline:
                    x = MARKED if self.mark_every and i % self.mark_every == 0 else X
                    i += 4
                    try:
                        if self.texts:
                            result = await client.embed([f"sentence {i} about rollouts"], self.model, timeout=30)
                        elif self.images:
                            image = self.images[i // 4 % len(self.images)]
                            result = await client.classify([image], self.model, timeout=30)
                        else:
                            result = await client.infer(self.model, {"x": x}, timeout=10)
                        self.answered[result.routed.version] += 1
                    except MeshError as exc:
                        self.failed[exc.code.name] += 1
                    await asyncio.sleep(0.005)

            await asyncio.gather(*(worker(w) for w in range(4)))

    async def _run_oip(self) -> None:
        import tritonclient.grpc as grpcclient
        import tritonclient.grpc.aio as triton_aio
        from tritonclient.utils import InferenceServerException

        deadline = time.monotonic() + self.limit
        client = triton_aio.InferenceServerClient(self.address)

        async def worker() -> None:
            while not self._stop.is_set() and time.monotonic() < deadline:
                inp = grpcclient.InferInput("x", list(X.shape), "FP32")
                inp.set_data_from_numpy(X)
                try:
                    result = await client.infer(self.model, [inp], client_timeout=10)
                    self.answered[int(result.get_response().model_version)] += 1
                except InferenceServerException as exc:
                    self.failed[str(exc.status())] += 1
                await asyncio.sleep(0.005)

        try:
            await asyncio.gather(*(worker() for _ in range(4)))
        finally:
            await client.close()

    def __enter__(self) -> "Traffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(30)


def ended(registry: RegistryClient, model: str, timeout: float = 90.0) -> pb.Rollout:
    return wait_for(
        lambda: (r := registry.get_rollout(model)).state != pb.ROLLOUT_STATE_RUNNING and r,
        f"the rollout of {model} to end",
        timeout,
    )


def production(registry: RegistryClient, model: str) -> int:
    return next(a.version for a in registry.get_model(model).aliases if a.name == "production")


def outcomes(r: pb.Rollout) -> list[tuple[int, str]]:
    return [(a.weight, a.outcome) for a in r.analyses]


class Events:
    """Watch events of one model's rollouts, collected from a background thread."""

    def __init__(self, address: str):
        self.client = RegistryClient(address, timeout=30)
        self.rollouts: list[pb.Rollout] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._stream = None

    def _run(self) -> None:
        try:
            for event in self.client.watch():
                if event.WhichOneof("event") == "rollout_changed":
                    self.rollouts.append(event.rollout_changed)
        except RegistryError:
            pass

    def __enter__(self) -> "Events":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()  # ends the stream
        self._thread.join(10)


def test_healthy_canary_is_promoted_after_its_steps(mesh, mesh_registry, tmp_path):
    v1 = register_tiny(mesh_registry, "ro_healthy", tmp_path, scale=1.0)
    v2 = register_tiny(mesh_registry, "ro_healthy", tmp_path, scale=2.0)
    mesh_registry.set_alias("ro_healthy", "production", v1)
    with Events(mesh.registry_address) as events, Traffic(mesh.router_address, "ro_healthy") as traffic:
        # A generous p99 gate and 3 failures to roll back: a loaded machine's outliers must not roll it back.
        started = mesh_registry.start_rollout("ro_healthy", v2, fast_policy(max_p99_ratio=10.0, failure_limit=3))
        assert started.state == pb.ROLLOUT_STATE_RUNNING and started.weight == 25
        r = ended(mesh_registry, "ro_healthy")
        wait_for(
            lambda: events.rollouts and events.rollouts[-1].state == pb.ROLLOUT_STATE_PROMOTED,
            "the promotion's Watch event",
        )
    assert r.state == pb.ROLLOUT_STATE_PROMOTED, (r.reason, outcomes(r))
    assert [w for w, outcome in outcomes(r) if outcome == "passed"] == [25, 50]
    assert production(mesh_registry, "ro_healthy") == v2
    model = mesh_registry.get_model("ro_healthy")
    assert not model.policy.split and model.policy.updated_by == "rollout"
    assert not traffic.failed and set(traffic.answered) == {v1, v2}
    assert [e.weight for e in events.rollouts if e.state == pb.ROLLOUT_STATE_RUNNING][-1] == 50
    with MeshClient(mesh.router_address) as client:
        wait_for(lambda: client.infer("ro_healthy", {"x": X}).routed.version == v2, "production on v2")


def test_canary_failing_a_fifth_of_requests_is_rolled_back(mesh, mesh_registry, tmp_path):
    v1 = register_tiny(mesh_registry, "ro_faulty", tmp_path, scale=1.0)
    v2 = register_file(mesh_registry, "ro_faulty", tmp_path / "faulty.onnx", faulty_onnx(2.0), "fails on the marker")
    mesh_registry.set_alias("ro_faulty", "production", v1)
    with Traffic(mesh.router_address, "ro_faulty", mark_every=5) as traffic:
        # At least 40 canary requests an analysis, and any error among them over 2 %: an interval of the
        # 20 %-failing canary passes with probability 0.8^40 (~1e-4), so it rolls back at its first weight.
        mesh_registry.start_rollout(
            "ro_faulty", v2, fast_policy(step_weight=20, max_weight=60, min_requests=40, max_error_rate=0.02)
        )
        r = ended(mesh_registry, "ro_faulty")
    assert r.state == pb.ROLLOUT_STATE_ROLLED_BACK, (r.reason, outcomes(r))
    assert "error rate" in r.reason and "INVALID_ARGUMENT" in r.reason, r.reason
    # Rolled back at its first weight, within failure_limit judged intervals (waiting ones judge nothing).
    assert [o for o in outcomes(r) if o[1] != "waiting"] == [(20, "failed"), (20, "failed")]
    assert production(mesh_registry, "ro_faulty") == v1
    assert not mesh_registry.get_model("ro_faulty").policy.split
    # Only the canary's share saw errors: 20 % of the canary's 20 % (far below the marked 20 %).
    total = sum(traffic.answered.values()) + sum(traffic.failed.values())
    assert set(traffic.failed) <= {"INVALID_ARGUMENT"} and sum(traffic.failed.values()) < 0.1 * total, traffic.failed
    # The audit log (maas audit) holds the rollout beside the traffic changes it made, with the reason.
    entries = {e.action: e for e in mesh_registry.audit(target_prefix="model/ro_faulty")}
    assert {"rollout.started", "rollout.rolled_back", "traffic.set"} <= set(entries), sorted(entries)
    assert entries["rollout.rolled_back"].actor == "rollout" and "error rate" in entries["rollout.rolled_back"].reason
    with MeshClient(mesh.router_address) as client:  # the marker is fine for production
        wait_for(lambda: client.infer("ro_faulty", {"x": MARKED}).routed.version == v1, "traffic back on v1")


def main_port_timed(mesh, model: str, version: int) -> float:
    """Requests of `version` the router's Python data plane answered and timed (maas_router_version_duration)."""
    with urllib.request.urlopen(f"http://{mesh.addresses['router_metrics']}/metrics", timeout=5) as response:
        lines = response.read().decode().splitlines()
    labels = f'model="{model}",version="{version}"'
    return sum(
        float(line.split()[-1])
        for line in lines
        if line.startswith("maas_router_version_duration_seconds_count{") and labels in line
    )


@pytest.mark.parametrize("port", ["main", "oip_fast"])
def test_slow_canary_is_rolled_back_on_latency(mesh, mesh_registry, tmp_path, port):
    """Also for a canary served only by the compiled OIP fast path: its per-version latency histogram
    reaches the registry, so the p99 gate holds there too."""
    model = "ro_slow" if port == "main" else "ro_slow_fast"
    v1 = register_tiny(mesh_registry, model, tmp_path, scale=1.0)
    v2 = register_file(
        mesh_registry,
        model,
        tmp_path / "slow.onnx",
        slow_onnx(2.0, iterations=20000),
        "a Loop of 20000 steps per request",
    )
    mesh_registry.set_alias(model, "production", v1)
    traffic = (
        Traffic(mesh.router_address, model)
        if port == "main"
        else Traffic(mesh.addresses["router_oip_fast"], model, oip=True)
    )
    with traffic:
        # Five steps to promotion, two failures in a row to roll back.
        mesh_registry.start_rollout(model, v2, fast_policy(step_weight=10, max_p99_ratio=3.0, max_error_rate=0.5))
        r = ended(mesh_registry, model)
    assert r.state == pb.ROLLOUT_STATE_ROLLED_BACK, (r.reason, outcomes(r))
    assert "p99" in r.reason, r.reason
    # The failed analyses (failure_limit in a row) are the ones whose canary p99 was over 3x production's
    # (an earlier one may pass: the slow canary's CPU use slows production too on a small machine).
    last = [a for a in r.analyses if a.outcome != "waiting"][-2:]
    assert all(a.outcome == "failed" and a.canary_p99_ms > 3 * a.production_p99_ms for a in last), [
        (a.outcome, a.canary_p99_ms, a.production_p99_ms) for a in r.analyses
    ]
    assert production(mesh_registry, model) == v1
    assert traffic.answered[v2] > 0, traffic.answered
    if port == "oip_fast":  # every canary call was the forwarder's: the Python data plane timed none
        assert main_port_timed(mesh, model, v2) == 0


def test_registry_restart_mid_rollout_resumes(mesh, mesh_registry, tmp_path):
    v1 = register_tiny(mesh_registry, "ro_restart", tmp_path, scale=1.0)
    v2 = register_tiny(mesh_registry, "ro_restart", tmp_path, scale=2.0)
    mesh_registry.set_alias("ro_restart", "production", v1)
    with Traffic(mesh.router_address, "ro_restart"):
        mesh_registry.start_rollout("ro_restart", v2, fast_policy(step_weight=20, max_weight=80))
        wait_for(lambda: mesh_registry.get_rollout("ro_restart").weight >= 40, "the second step")
        mesh.stop_component("registry")
        mesh.restart_component("registry")
        with RegistryClient(mesh.registry_address, timeout=30) as registry:
            after = registry.get_rollout("ro_restart")
            assert after.state in (pb.ROLLOUT_STATE_RUNNING, pb.ROLLOUT_STATE_PROMOTED)
            assert after.weight >= 40
            r = ended(registry, "ro_restart")
            assert r.state == pb.ROLLOUT_STATE_PROMOTED, (r.reason, outcomes(r))
            assert [w for w, o in outcomes(r) if o == "passed"] == [20, 40, 60, 80]
            assert production(registry, "ro_restart") == v2


def test_bad_rollouts_change_nothing(mesh, mesh_registry, tmp_path):
    v1 = register_tiny(mesh_registry, "ro_bad", tmp_path, scale=1.0)
    v2 = register_tiny(mesh_registry, "ro_bad", tmp_path, scale=2.0)
    v3 = register_tiny(mesh_registry, "ro_bad", tmp_path, scale=3.0)
    mesh_registry.archive("ro_bad", v3)

    def refused(code, words, version, **policy):
        before = mesh_registry.get_model("ro_bad").policy
        with pytest.raises(RegistryError) as caught:
            mesh_registry.start_rollout("ro_bad", version, fast_policy(**policy))
        assert caught.value.code == code and all(w in caught.value.message for w in words), caught.value
        assert mesh_registry.get_model("ro_bad").policy == before

    refused(grpc.StatusCode.FAILED_PRECONDITION, ["production"], v2)  # no production alias yet
    mesh_registry.set_alias("ro_bad", "production", v1)
    refused(grpc.StatusCode.FAILED_PRECONDITION, ["archived", "not ready"], v3)
    refused(grpc.StatusCode.NOT_FOUND, ["no version 9"], 9)
    refused(grpc.StatusCode.FAILED_PRECONDITION, ["already", "production"], v1)
    refused(grpc.StatusCode.INVALID_ARGUMENT, ["step_weight"], v2, step_weight=150, max_weight=100)
    refused(grpc.StatusCode.INVALID_ARGUMENT, ["max_weight"], v2, max_weight=101)
    refused(grpc.StatusCode.INVALID_ARGUMENT, ["interval_seconds"], v2, interval_seconds=-1.0)
    refused(grpc.StatusCode.INVALID_ARGUMENT, ["failure_limit"], v2, failure_limit=0)
    refused(grpc.StatusCode.INVALID_ARGUMENT, ["max_error_rate"], v2, max_error_rate=1.5)

    before = mesh_registry.get_model("ro_bad").policy
    plan = mesh_registry.start_rollout("ro_bad", v2, fast_policy(step_weight=30, max_weight=100), dry_run=True)
    assert plan.state == pb.ROLLOUT_STATE_PLANNED and list(plan.planned_weights) == [30, 60, 90, 100]
    assert mesh_registry.get_model("ro_bad").policy == before
    with pytest.raises(RegistryError) as caught:
        mesh_registry.get_rollout("ro_bad")  # a dry run leaves no rollout behind
    assert caught.value.code == grpc.StatusCode.NOT_FOUND

    running = mesh_registry.start_rollout("ro_bad", v2, fast_policy(interval_seconds=60.0))
    policy = mesh_registry.get_model("ro_bad").policy
    assert [(t.version, t.weight) for t in policy.split] == [(v1, 75), (v2, 25)]
    refused(grpc.StatusCode.FAILED_PRECONDITION, ["already has a rollout running"], v2)
    aborted = mesh_registry.abort_rollout("ro_bad", "test")
    assert aborted.state == pb.ROLLOUT_STATE_ABORTED and running.canary_version == v2
    assert not mesh_registry.get_model("ro_bad").policy.split
    assert production(mesh_registry, "ro_bad") == v1


def test_optimize_int8_minilm_is_shadowed_then_promoted(mesh, mesh_registry):
    source = REPO / "model_repository" / "minilm" / "1" / "model.onnx"
    v1 = mesh_registry.register(
        source,
        "ro_minilm",
        format="onnx",
        preprocessing=("tokenizer", "minilm"),
        postprocessing=("embedding", "sentence_embedding"),
    ).version
    mesh_registry.wait_ready("ro_minilm", v1, timeout=300)
    mesh_registry.set_alias("ro_minilm", "production", v1)
    with pytest.raises(RegistryError) as caught:
        mesh_registry.optimize("ro_minilm", v1, int8=False)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "int8" in caught.value.message
    with Traffic(mesh.router_address, "ro_minilm", texts=True, limit=600) as traffic:
        done = mesh_registry.optimize(
            "ro_minilm",
            v1,
            policy=pb.RolloutPolicy(
                step_weight=50, max_weight=50, interval_seconds=INTERVAL, min_requests=3, max_p99_ratio=0.0
            ),
        )
        assert done.version.tags["optimization"] == "int8" and done.version.tags["optimized_from"] == str(v1)
        assert done.size_after_bytes < 0.5 * done.size_before_bytes
        assert done.rollout.policy.min_shadow_agreement == 0.99  # the optimize default gate
        r = ended(mesh_registry, "ro_minilm", timeout=300)
    v2 = done.version.version
    assert r.state == pb.ROLLOUT_STATE_PROMOTED, (r.reason, outcomes(r))
    assert production(mesh_registry, "ro_minilm") == v2 and not traffic.failed
    report = mesh_registry.compare("ro_minilm", v1, v2)
    assert report.kind == "embedding" and report.agreement >= 0.99 and report.agreement == report.mean_cosine
    assert r.analyses[-1].shadow_agreement >= 0.99


def evaluation_pngs() -> list[bytes]:
    """The vision benchmarks' photos and their variants (bench_optimize_vision's evaluation set), as PNG."""
    import io

    from bench.images import PHOTOS
    from tools.build_models import image_variants, skimage_photos

    encoded = []
    for photo in skimage_photos(PHOTOS):
        for variant in image_variants(photo):
            buffer = io.BytesIO()
            variant.save(buffer, format="PNG")
            encoded.append(buffer.getvalue())
    return encoded


def test_optimize_int8_efficientnet_is_calibrated_shadowed_then_promoted(mesh, mesh_registry):
    """`maas models optimize efficientnet_lite0 --from 1 --int8 --calibration calibration.npy`: the local
    mesh's efficientnet_lite0 is the ONNX export; its static int8 (calibrated on pictures that are not the
    ones sent here) is served by Triton's onnxruntime backend beside it, shadowed on classify traffic and
    promoted because the top-1 agreement gate holds. Run on a copy (ro_effnet) so other tests keep v1."""
    folder = REPO / "model_repository" / "efficientnet_lite0"
    calibration = (folder / "calibration.npy").read_bytes()
    shipped = mesh_registry.get_model("efficientnet_lite0").versions[0]
    assert shipped.format == pb.ARTIFACT_FORMAT_ONNX
    for wrong, code, field in (
        (b"", grpc.StatusCode.FAILED_PRECONDITION, "calibration: "),  # an image model's int8 needs it
        (b"not numpy", grpc.StatusCode.INVALID_ARGUMENT, "calibration: not a NumPy"),
    ):
        with pytest.raises(RegistryError) as caught:
            mesh_registry.optimize("efficientnet_lite0", shipped.version, calibration=wrong)
        assert caught.value.code == code and field in caught.value.message, caught.value.message
    assert len(mesh_registry.get_model("efficientnet_lite0").versions) == 1  # nothing registered by the refusals
    v1 = mesh_registry.register(
        folder / "1" / "model.onnx",
        "ro_effnet",
        format="onnx",
        preprocessing=("vision", "efficientnet_lite0"),
        postprocessing=("softmax_top_k", "OUTPUT__0"),
        top_k=5,
        labels=(folder / "labels.txt").read_text().splitlines(),
        max_batch_size=16,
    ).version
    mesh_registry.wait_ready("ro_effnet", v1, timeout=300)
    mesh_registry.set_alias("ro_effnet", "production", v1)
    with Traffic(mesh.router_address, "ro_effnet", images=evaluation_pngs(), limit=600) as traffic:
        done = mesh_registry.optimize(
            "ro_effnet",
            v1,
            calibration=calibration,
            policy=pb.RolloutPolicy(
                step_weight=50,
                max_weight=50,
                interval_seconds=2.0,
                min_requests=28,
                max_p99_ratio=0.0,
                min_shadow_agreement=0.8,
            ),
        )
        assert done.version.tags["optimization"] == "int8" and done.version.tags["optimized_from"] == str(v1)
        items = len(np.load(folder / "calibration.npy"))
        assert done.version.format == pb.ARTIFACT_FORMAT_ONNX
        assert f"calibrated on {items} inputs" in done.version.description
        assert done.size_after_bytes < 0.4 * done.size_before_bytes
        r = ended(mesh_registry, "ro_effnet", timeout=300)
    v2 = done.version.version
    report = mesh_registry.compare("ro_effnet", v1, v2)
    print(
        f"efficientnet_lite0 static int8 vs fp32 through the mesh: size "
        f"{done.size_after_bytes / done.size_before_bytes:.2f}x, top-1 {report.top1_agreement:.3f}, "
        f"top-5 {report.top5_agreement:.3f} over {report.samples} requests"
    )
    assert report.kind == "classifier" and report.agreement == report.top1_agreement >= 0.8
    assert r.state == pb.ROLLOUT_STATE_PROMOTED, (r.reason, outcomes(r))
    assert production(mesh_registry, "ro_effnet") == v2 and not traffic.failed and traffic.answered[v2] > 0
    assert r.analyses[-1].shadow_agreement >= 0.8


def test_optimize_fp16_minilm_is_shadowed_then_promoted_and_bad_choices_are_refused(mesh, mesh_registry):
    source = REPO / "model_repository" / "minilm" / "1" / "model.onnx"
    v1 = mesh_registry.register(
        source,
        "ro_minilm16",
        format="onnx",
        preprocessing=("tokenizer", "minilm"),
        postprocessing=("embedding", "sentence_embedding"),
    ).version
    mesh_registry.wait_ready("ro_minilm16", v1, timeout=300)
    mesh_registry.set_alias("ro_minilm16", "production", v1)
    with pytest.raises(RegistryError) as caught:
        mesh_registry.optimize("ro_minilm16", v1, int8=True, fp16=True)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "int8, fp16" in caught.value.message
    smollm2 = mesh_registry.get_model("smollm2").versions[0].version
    with pytest.raises(RegistryError) as caught:
        mesh_registry.optimize("smollm2", smollm2, int8=False, fp16=True)
    assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "from_version" in caught.value.message
    assert len(mesh_registry.get_model("ro_minilm16").versions) == 1  # nothing registered by the refusals
    with Traffic(mesh.router_address, "ro_minilm16", texts=True, limit=600) as traffic:
        done = mesh_registry.optimize(
            "ro_minilm16",
            v1,
            int8=False,
            fp16=True,
            policy=pb.RolloutPolicy(
                step_weight=50, max_weight=50, interval_seconds=INTERVAL, min_requests=3, max_p99_ratio=0.0
            ),
        )
        assert done.version.tags["optimization"] == "fp16" and done.version.tags["optimized_from"] == str(v1)
        assert 0.4 * done.size_before_bytes < done.size_after_bytes < 0.6 * done.size_before_bytes
        r = ended(mesh_registry, "ro_minilm16", timeout=300)
    v2 = done.version.version
    assert r.state == pb.ROLLOUT_STATE_PROMOTED, (r.reason, outcomes(r))
    assert production(mesh_registry, "ro_minilm16") == v2 and not traffic.failed
    report = mesh_registry.compare("ro_minilm16", v1, v2)
    assert report.kind == "embedding" and report.agreement >= 0.999  # fp16 keeps the embeddings


class GenerationTraffic:
    """Greedy GenerateUnary calls (a few tokens) to `model` from a background thread until stopped."""

    PROMPTS = ("The capital of France is", "Once upon a time", "Water boils at", "The three primary colours are")

    def __init__(self, address: str, model: str, limit: float = 300.0):
        from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2

        self.address, self.model, self.limit = address, model, limit
        self._pb, self._grpc, self._tensor = router_pb2, router_pb2_grpc, tensor_pb2
        self.answered: Counter[int] = Counter()
        self.failed: Counter[str] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        deadline, i = time.monotonic() + self.limit, 0
        with grpc.insecure_channel(self.address) as channel:
            router = self._grpc.RouterStub(channel)
            while not self._stop.is_set() and time.monotonic() < deadline:
                request = self._pb.GenerateRequest(
                    model=self._tensor.ModelRef(name=self.model),
                    prompt=self.PROMPTS[i % len(self.PROMPTS)],
                    sampling=self._pb.SamplingParams(max_tokens=4, temperature=0.0),
                )
                i += 1
                try:
                    self.answered[router.GenerateUnary(request, timeout=60).routed.version] += 1
                except grpc.RpcError as exc:
                    self.failed[exc.code().name] += 1

    def __enter__(self) -> "GenerationTraffic":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(90)


def test_optimize_int4_smollm2_from_fp32_is_shadowed_on_tokens_and_gated(mesh, mesh_registry):
    folder = REPO / "model_repository" / "smollm2" / "1"  # the fp32 export
    v1 = mesh_registry.register(
        folder, "ro_smollm2", format="genai", preprocessing=("tokenizer", "smollm2"), postprocessing=("generation", "")
    ).version
    mesh_registry.wait_ready("ro_smollm2", v1, timeout=300)
    mesh_registry.set_alias("ro_smollm2", "production", v1)
    for wrong in (dict(int8=True), dict(int8=False, fp16=True)):
        with pytest.raises(RegistryError) as caught:
            mesh_registry.optimize("ro_smollm2", v1, **wrong)
        assert caught.value.code == grpc.StatusCode.FAILED_PRECONDITION and "from_version" in caught.value.message
        assert "--int4" in caught.value.message
    with pytest.raises(RegistryError) as caught:
        mesh_registry.optimize("ro_smollm2", v1, int8=True, int4=True)
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT and "int8, int4" in caught.value.message
    assert len(mesh_registry.get_model("ro_smollm2").versions) == 1  # nothing registered by the refusals
    with GenerationTraffic(mesh.router_address, "ro_smollm2") as traffic:
        done = mesh_registry.optimize(
            "ro_smollm2",
            v1,
            int8=False,
            int4=True,
            policy=pb.RolloutPolicy(
                step_weight=50,
                max_weight=50,
                interval_seconds=2.0,
                min_requests=3,
                max_p99_ratio=0.0,
                min_shadow_agreement=0.2,
            ),
        )
        assert done.version.tags["optimization"] == "int4" and done.version.tags["optimized_from"] == str(v1)
        assert done.size_after_bytes < 0.5 * done.size_before_bytes
        r = ended(mesh_registry, "ro_smollm2", timeout=600)
    v2 = done.version.version
    report = mesh_registry.compare("ro_smollm2", v1, v2)
    print(
        f"smollm2 int4 (MatMulNBits) vs fp32: size {done.size_after_bytes / done.size_before_bytes:.2f}x, "
        f"exact {report.exact_agreement:.3f}, prefix {report.prefix_agreement:.3f} over {report.samples}"
    )
    assert report.kind == "generation" and report.samples > 0 and report.agreement == report.prefix_agreement
    assert not traffic.failed and traffic.answered[v2] > 0  # the canary served callers
    # The gate decides on the token agreement, whatever it is: an int4 of a 135M model often changes the
    # greedy text at its first tokens (then it is rolled back, production untouched), or it holds.
    last = r.analyses[-1]
    if last.shadow_agreement >= 0.2:
        assert r.state == pb.ROLLOUT_STATE_PROMOTED, (r.reason, outcomes(r))
        assert production(mesh_registry, "ro_smollm2") == v2
    else:
        assert r.state == pb.ROLLOUT_STATE_ROLLED_BACK and "shadow agreement" in r.reason, (r.reason, outcomes(r))
        assert production(mesh_registry, "ro_smollm2") == v1
        assert not mesh_registry.get_model("ro_smollm2").policy.split
    assert abs(last.shadow_agreement - report.agreement) < 0.5  # the same figure (a few late copies may land)
