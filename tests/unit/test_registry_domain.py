"""Registry domain logic with a fake Triton fleet: no processes, real SQLite and a real repository folder."""

from __future__ import annotations

import asyncio
import hashlib

import pytest

from services.registry.domain import (
    ArtifactFormat,
    Postprocessing,
    PostprocessingKind,
    RegistrationRequest,
    Signature,
    Target,
    TensorSpec,
    VersionState,
    check_name,
)
from services.registry.registry import Registry
from services.registry.repository import ModelRepository
from services.registry.store import Store
from services.shared.errors import FailedPrecondition, InvalidArgument, NotFound
from tests.fixtures.registry import tiny_onnx


class FakeFleet:
    """Records what Triton would be told; can be made to fail loads."""

    def __init__(self):
        self.live: dict[str, list[int]] = {}
        self.configs: dict[str, object] = {}
        self.fail_versions: set[int] = set()
        self.closed = False

    addresses = members = ["fake:1"]

    async def apply(self, model, config, live, addresses=None):
        if set(live) & self.fail_versions:
            raise RuntimeError(f"load failed for {sorted(set(live) & self.fail_versions)}")
        self.live[model] = sorted(live)
        self.configs[model] = config

    async def ready_versions(self):
        return {"fake:1": {m: set(v) for m, v in self.live.items() if v}}

    async def wait_reachable(self, timeout):
        return True

    async def ready_on(self, address, model):
        return set(self.live.get(model, []))

    async def warm_up(self, model, version, signature, max_batch_size, generation=False):
        await asyncio.sleep(0)
        return len(self.addresses)

    async def close(self):
        self.closed = True


def request(model: str, data: bytes, **kwargs) -> RegistrationRequest:
    return RegistrationRequest(
        model=model,
        format=kwargs.pop("format", ArtifactFormat.ONNX),
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        actor="unit",
        **kwargs,
    )


async def chunks(data: bytes, size: int = 1000):
    for i in range(0, len(data), size):
        yield data[i : i + size]


@pytest.fixture
async def registry(tmp_path):
    reg = Registry(
        Store(tmp_path / "db.sqlite3"),
        ModelRepository(tmp_path / "repo"),
        FakeFleet(),
        executor=None,
        max_artifact_bytes=10_000_000,
        default_max_batch_size=8,
        load_timeout=10,
    )
    await reg.start()
    try:
        yield reg
    finally:
        await reg.stop()
        reg.store.close()


async def register(reg, model="tiny", data=None, **kwargs):
    data = data or tiny_onnx()
    v = await reg.register(request(model, data, **kwargs), chunks(data))
    await reg.wait_idle()
    return reg.get_version(model, v.version)


@pytest.mark.parametrize("name", ["../x", "", "x" * 65, "A", "1abc", "a/b", "a.b", "a b", ".staging"])
def test_names_that_could_reach_a_path_are_refused(name):
    with pytest.raises(InvalidArgument):
        check_name(name)


@pytest.mark.parametrize("name", ["a", "minilm", "efficientnet_lite0", "model-2", "x" * 64])
def test_valid_names(name):
    assert check_name(name) == name


async def test_register_loads_and_becomes_ready(registry):
    v = await register(registry)
    assert (v.version, v.state, v.max_batch_size) == (1, VersionState.READY, 8)
    assert v.signature == Signature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (4,)),))
    assert registry.fleet.live == {"tiny": [1]}
    assert (registry.repository.root / "tiny" / "1" / "model.onnx").read_bytes() == tiny_onnx()
    config = (registry.repository.root / "tiny" / "config.pbtxt").read_text()
    assert "versions: 1" in config and 'name: "tiny"' in config and "max_batch_size: 8" in config
    v2 = await register(registry)
    assert v2.version == 2 and registry.fleet.live == {"tiny": [1, 2]}


async def test_concurrent_registrations_get_distinct_numbers(registry):
    data = tiny_onnx()
    versions = await asyncio.gather(*(registry.register(request("tiny", data), chunks(data)) for _ in range(5)))
    assert sorted(v.version for v in versions) == [1, 2, 3, 4, 5]
    await registry.wait_idle()
    assert registry.fleet.live["tiny"] == [1, 2, 3, 4, 5]


async def test_failed_load_marks_version_failed_and_keeps_live_set(registry):
    await register(registry)
    registry.fleet.fail_versions = {2}
    v2 = await register(registry)
    assert v2.state == VersionState.FAILED and "load failed" in v2.state_reason
    assert registry.fleet.live["tiny"] == [1]
    with pytest.raises(FailedPrecondition, match="failed"):
        await registry.set_alias("tiny", "production", 2, "me", "")


async def test_incompatible_signature_is_refused_and_nothing_written(registry):
    await register(registry)
    with pytest.raises(FailedPrecondition, match=r"input 'x' shape \[8\] != \[4\]"):
        await register(registry, data=tiny_onnx(width=8))
    with pytest.raises(FailedPrecondition, match="datatype FP64 != FP32"):
        await register(registry, data=tiny_onnx(dtype="FP64"))
    assert [v.version for v in registry.store.versions("tiny")] == [1]
    assert sorted(p.name for p in (registry.repository.root / "tiny").iterdir() if p.name.isdigit()) == ["1"]
    assert registry.repository.staged_uploads() == []
    # Once every live version is archived, a new signature is accepted.
    await registry.archive("tiny", 1, "me", "")
    v = await register(registry, data=tiny_onnx(width=8))
    assert v.state == VersionState.READY and registry.fleet.live["tiny"] == [2]


async def test_bad_uploads(registry):
    data = tiny_onnx()
    bad = request("tiny", data)
    with pytest.raises(InvalidArgument, match="sha256 mismatch"):
        await registry.register(RegistrationRequest(**{**bad.__dict__, "sha256": "a" * 64}), chunks(data))
    with pytest.raises(InvalidArgument, match="more than the declared"):
        await registry.register(request("tiny", data), chunks(data + b"extra"))
    with pytest.raises(InvalidArgument, match="over the registry's limit"):
        await registry.register(RegistrationRequest(**{**bad.__dict__, "size_bytes": 10_000_001}), chunks(data))
    with pytest.raises(InvalidArgument, match="ONNX checker"):
        junk = b"\x08\x07" + b"junk" * 50
        await registry.register(request("tiny", junk), chunks(junk))
    with pytest.raises(InvalidArgument, match="labels for output"):
        await registry.register(request("tiny", data, labels=("a", "b")), chunks(data))
    with pytest.raises(InvalidArgument, match="postprocessing output 'nope'"):
        post = Postprocessing(PostprocessingKind.EMBEDDING, "nope")
        await registry.register(request("tiny", data, postprocessing=post), chunks(data))
    assert registry.store.model_names() == []
    assert registry.repository.staged_uploads() == []


async def test_alias_rollback_history(registry):
    for _ in range(3):
        await register(registry)
    a = await registry.set_alias("tiny", "production", 1, "alice", "launch")
    assert (a.version, a.previous_version, a.updated_by) == (1, 0, "alice")
    assert (await registry.set_alias("tiny", "production", 1, "bob", "again")).updated_by == "alice"  # no-op
    await registry.set_alias("tiny", "production", 3, "bob", "v3")
    back = await registry.rollback("tiny", "", "carol", "")
    assert (back.name, back.version, back.previous_version, back.reason) == ("production", 1, 3, "rollback")
    again = await registry.rollback("tiny", "production", "carol", "undo")
    assert again.version == 3
    history = registry.get_model("tiny").alias_history
    assert [(h.version, h.updated_by) for h in history] == [(3, "carol"), (1, "carol"), (3, "bob"), (1, "alice")]
    with pytest.raises(NotFound):
        await registry.rollback("tiny", "canary", "x", "")
    await registry.set_alias("tiny", "canary", 2, "x", "")
    with pytest.raises(FailedPrecondition, match="never pointed"):
        await registry.rollback("tiny", "canary", "x", "")


async def test_rollback_to_archived_version_is_refused(registry):
    await register(registry)
    await register(registry)
    await registry.set_alias("tiny", "production", 1, "a", "")
    await registry.set_alias("tiny", "production", 2, "a", "")
    await registry.archive("tiny", 1, "a", "")
    with pytest.raises(FailedPrecondition, match="archived"):
        await registry.rollback("tiny", "production", "a", "")


async def test_traffic_policy_validation(registry):
    await register(registry)
    await register(registry)
    await registry.set_alias("tiny", "canary", 2, "a", "")
    p = await registry.set_traffic_policy(
        "tiny",
        [Target(version=1, weight=90), Target(alias="canary", weight=10)],
        Target(version=2),
        0.1,
        "ops",
        "canary",
    )
    assert registry.store.policy("tiny") == p
    with pytest.raises(InvalidArgument, match="appears twice"):
        await registry.set_traffic_policy(
            "tiny", [Target(version=1, weight=1), Target(version=1, weight=1)], None, 0, "", ""
        )
    with pytest.raises(InvalidArgument, match="exactly one"):
        await registry.set_traffic_policy("tiny", [Target(weight=1)], None, 0, "", "")
    with pytest.raises(InvalidArgument, match="no shadow target"):
        await registry.set_traffic_policy("tiny", [], None, 0.5, "", "")
    with pytest.raises(NotFound):
        await registry.set_traffic_policy("nope", [], None, 0, "", "")
    with pytest.raises(FailedPrecondition, match="traffic policy"):
        await registry.archive("tiny", 1, "a", "")
    assert registry.store.policy("tiny") == p  # refused changes left the policy as it was


async def test_watch_snapshot_then_changes(registry):
    await register(registry)
    stream = registry.watch()
    first = await stream.__anext__()
    assert first.snapshot is not None and [m.model for m in first.snapshot] == ["tiny"]
    await registry.set_alias("tiny", "production", 1, "a", "")
    event = await asyncio.wait_for(stream.__anext__(), 1)
    assert event.revision == first.revision + 1 and event.changed.aliases == {"production": 1}
    await stream.aclose()
    assert registry.hub.subscriber_count == 0


async def test_slow_watcher_is_cut_off_without_blocking_mutations(tmp_path):
    reg = Registry(
        Store(tmp_path / "db"),
        ModelRepository(tmp_path / "repo"),
        FakeFleet(),
        executor=None,
        max_artifact_bytes=10_000_000,
        default_max_batch_size=8,
        load_timeout=10,
        watch_queue_size=3,
    )
    await reg.start()
    try:
        await register(reg)
        await register(reg)
        slow = reg.watch()
        await slow.__anext__()  # snapshot, then never reads again while changes happen
        for i in range(10):
            await reg.set_alias("tiny", "production", 1 + i % 2, "a", "")
        from services.shared.errors import Unavailable

        with pytest.raises(Unavailable, match="reconnect"):
            for _ in range(20):
                await slow.__anext__()
        fresh = reg.watch()
        snap = await fresh.__anext__()
        assert snap.snapshot[0].aliases == {"production": 2}
        await fresh.aclose()
    finally:
        await reg.stop()
        reg.store.close()


async def test_restart_keeps_everything_and_cleans_orphans(tmp_path):
    def make():
        return Registry(
            Store(tmp_path / "db"),
            ModelRepository(tmp_path / "repo"),
            FakeFleet(),
            executor=None,
            max_artifact_bytes=10_000_000,
            default_max_batch_size=8,
            load_timeout=10,
        )

    reg = make()
    await reg.start()
    await register(reg)
    await reg.set_alias("tiny", "production", 1, "a", "why")
    await reg.set_traffic_policy("tiny", [Target(alias="production", weight=1)], None, 0, "a", "")
    revision = reg.store.revision()
    model = reg.get_model("tiny")
    await reg.stop()
    reg.store.close()
    # What a crash between rename and commit, or mid-upload, leaves behind:
    (tmp_path / "repo" / "tiny" / "2").mkdir()
    (tmp_path / "repo" / "tiny" / ".staging" / "upload-x").mkdir(parents=True)
    (tmp_path / "repo" / "newmodel" / ".staging" / "upload-z").mkdir(parents=True)  # a first upload
    (tmp_path / "repo" / "newmodel" / ".maas-registry").write_text("")
    (tmp_path / "repo" / "other" / "1").mkdir(parents=True)  # not ours: left alone

    reg = make()
    await reg.start()
    try:
        await reg.wait_idle()
        assert reg.get_model("tiny") == model and reg.store.revision() == revision
        assert not (tmp_path / "repo" / "tiny" / "2").exists()
        assert reg.repository.staged_uploads() == []
        assert not (tmp_path / "repo" / "newmodel").exists()
        assert (tmp_path / "repo" / "other" / "1").exists()
        assert reg.fleet.live == {"tiny": [1]}  # Triton reconciled on start
        v2 = await register(reg)
        assert v2.version == 2
    finally:
        await reg.stop()
        reg.store.close()


async def test_replica_that_lost_its_models_is_repaired(registry):
    await register(registry)
    await register(registry)
    assert await registry.deployment.reconcile_replicas() == []
    registry.fleet.live.clear()  # what a Triton restart looks like
    assert await registry.deployment.reconcile_replicas() == [("fake:1", "tiny")]
    assert registry.fleet.live == {"tiny": [1, 2]}


async def test_metrics(registry):
    from prometheus_client import REGISTRY

    await register(registry, "metered")
    await register(registry, "metered")
    await registry.archive("metered", 1, "a", "")
    sample = lambda name, **labels: REGISTRY.get_sample_value(name, labels)
    assert sample("maas_registry_versions", model="metered", state="ready") == 1
    assert sample("maas_registry_versions", model="metered", state="archived") == 1
    from services.registry.domain import ShadowResult

    registry.report_shadow_results([ShadowResult("metered", 2, 1, 10, 9, 9.5, 5.0, 6.0)])
    assert sample("maas_registry_shadow_agreement", model="metered", primary="2", shadow="1") == 0.9
    assert sample("maas_registry_shadow_samples_total", model="metered", primary="2", shadow="1") >= 1


async def test_folders_the_registry_does_not_own_are_left_alone(registry):
    hand_made = registry.repository.root / "handmade"
    (hand_made / "1").mkdir(parents=True)
    (hand_made / "config.pbtxt").write_text("name: 'handmade'")
    with pytest.raises(FailedPrecondition, match="does not manage"):
        await register(registry, "handmade")
    assert (hand_made / "config.pbtxt").read_text() == "name: 'handmade'"
    assert registry.store.model_names() == []


async def test_a_folder_holding_only_preprocessing_files_is_claimed_and_keeps_them(registry):
    """The chart's volume gets <model>/tokenizer.json before the model's first version (the tokenizer
    reads it there): that folder is registered into, not refused."""
    prepared = registry.repository.root / "tiny"
    prepared.mkdir()
    (prepared / "tokenizer.json").write_text("{}")
    version = await register(registry, "tiny")
    assert version.version == 1 and (prepared / "1").is_dir() and (prepared / "config.pbtxt").is_file()
    assert (prepared / "tokenizer.json").read_text() == "{}"


async def test_files_the_registry_writes_are_readable_by_other_users(registry):
    """Triton reads config.pbtxt and labels as another uid in the chart (1000; the registry is 10001)."""
    await register(registry, "tiny")
    for path in registry.repository.model_dir("tiny").rglob("*"):
        if path.name != ".staging" and ".staging" not in path.parts:
            assert path.stat().st_mode & 0o005 if path.is_dir() else path.stat().st_mode & 0o004, path


def disk_policy(reg, model: str) -> list[int]:
    from services.shared.model_repository import read_model_config

    path = reg.repository.model_dir(model) / "config.pbtxt"
    return list(read_model_config(path).version_policy.specific.versions) if path.exists() else []


async def test_config_on_disk_lists_only_ready_versions_at_every_step(registry):
    """A replica started with --load-model=* reads config.pbtxt: it must never list a version that is
    still loading (or failed), nor miss one that is READY."""
    seen_during_load = []
    apply = registry.fleet.apply

    async def recording_apply(model, config, live, addresses=None):
        seen_during_load.append((sorted(live), disk_policy(registry, model)))
        await apply(model, config, live, addresses)

    registry.fleet.apply = recording_apply
    await register(registry)
    assert seen_during_load[-1] == ([1], [])  # nothing on disk until the first version is READY
    assert disk_policy(registry, "tiny") == [1]
    await register(registry, data=tiny_onnx(3.0))
    assert seen_during_load[-1] == ([1, 2], [1])  # Triton loads {1,2}; the disk still says {1}
    assert disk_policy(registry, "tiny") == [1, 2]
    registry.fleet.fail_versions = {3}
    v3 = await register(registry, data=tiny_onnx(4.0))
    assert v3.state == VersionState.FAILED and disk_policy(registry, "tiny") == [1, 2]
    await registry.archive("tiny", 1, "me", "")
    assert disk_policy(registry, "tiny") == [2]


async def test_no_replica_means_registered_not_ready(registry):
    registry.fleet.addresses = registry.fleet.members = []
    v = await register(registry)
    assert v.state == VersionState.REGISTERED and "waiting for a Triton replica" in v.state_reason
    assert "tiny" not in registry.fleet.live


@pytest.mark.parametrize("field", ["cosine_sum", "primary_latency_ms", "shadow_latency_ms"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
async def test_a_shadow_report_with_a_non_finite_number_is_invalid_argument(registry, field, value):
    from services.registry.domain import ShadowResult
    from services.shared.errors import InvalidArgument

    await register(registry)
    numbers = {"cosine_sum": 1.0, "primary_latency_ms": 2.0, "shadow_latency_ms": 3.0, field: value}
    with pytest.raises(InvalidArgument, match=field):
        registry.report_shadow_results([ShadowResult("tiny", 1, 1, 1, 1, **numbers)])
    registry.report_shadow_results([ShadowResult("tiny", 1, 1, 1, 1, 1.0, 2.0, 3.0)])  # still accepted


async def test_a_restarted_replica_gets_its_models_back_concurrently_smallest_first(tmp_path):
    """reload_concurrency models load at once (not one after another), the smallest artefacts first."""
    fleet = FakeFleet()
    reg = Registry(
        Store(tmp_path / "db.sqlite3"),
        ModelRepository(tmp_path / "repo"),
        fleet,
        executor=None,
        max_artifact_bytes=10_000_000,
        default_max_batch_size=8,
        load_timeout=10,
        reload_concurrency=2,
    )
    await reg.start()
    try:
        import onnx

        for name, padding in (("big", 4000), ("small", 0), ("middle", 1000)):
            model = onnx.load_from_string(tiny_onnx())
            model.doc_string = "x" * padding  # artefact size: what the order goes by
            await register(reg, name, model.SerializeToString())
        fleet.live.clear()  # what a Triton restart looks like
        started: list[str] = []
        release = asyncio.Event()
        apply = fleet.apply

        async def gated(model, config, live, addresses=None):
            started.append(model)
            await release.wait()
            await apply(model, config, live, addresses)

        fleet.apply = gated
        repairing = asyncio.create_task(reg.deployment.reconcile_replicas())
        while len(started) < 2:
            await asyncio.sleep(0)
        for _ in range(20):  # the third would have started by now if it were not held back
            await asyncio.sleep(0)
        assert started == ["small", "middle"]
        release.set()
        assert sorted(await repairing) == [("fake:1", "big"), ("fake:1", "middle"), ("fake:1", "small")]
        assert started == ["small", "middle", "big"]
        assert fleet.live == {"big": [1], "middle": [1], "small": [1]}
    finally:
        await reg.stop()
        reg.store.close()
