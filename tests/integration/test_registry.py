"""The registry against a real Triton (explicit model control) on an empty repository of its own."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from maas.v1 import registry_pb2 as pb
from tests.fixtures.registry import (
    MINILM_ONNX,
    header,
    tiny_onnx,
    tiny_torchscript,
    triton_folder,
    triton_versions,
    upload_messages,
    wait_state,
)


async def register(env, model: str, data: bytes, fmt=pb.ARTIFACT_FORMAT_ONNX, wait=True, **kwargs) -> pb.ModelVersion:
    v = await env.stub.RegisterVersion(upload_messages(header(model, data, fmt, **kwargs), data), metadata=env.auth())
    if wait:
        v = await wait_state(env.stub, model, v.version)
        assert v.state == pb.VERSION_STATE_READY, v.state_reason
    return v


async def test_register_alias_rollback_round_trip_tiny(registry_env):
    env = registry_env
    v1 = await register(env, "tiny", tiny_onnx(2.0))
    assert v1.version == 1 and v1.load_ms > 0
    assert [(t.name, t.datatype, list(t.shape)) for t in v1.signature.inputs] == [("x", "FP32", [4])]
    assert await triton_versions(env.triton, "tiny") == {1}
    v2 = await register(env, "tiny", tiny_onnx(3.0))
    assert v2.version == 2
    assert await triton_versions(env.triton, "tiny") == {1, 2}

    a = await env.stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="production", version=1, actor="me"))
    assert (a.version, a.previous_version) == (1, 0)
    a = await env.stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="production", version=2, reason="better"))
    assert (a.version, a.previous_version, a.reason) == (2, 1, "better")
    back = await env.stub.Rollback(pb.RollbackRequest(model="tiny"))
    assert (back.name, back.version, back.previous_version) == ("production", 1, 2)

    archived = await env.stub.ArchiveVersion(pb.ArchiveVersionRequest(model="tiny", version=2))
    assert archived.state == pb.VERSION_STATE_ARCHIVED
    assert await triton_versions(env.triton, "tiny") == {1}
    model = await env.stub.GetModel(pb.GetModelRequest(model="tiny"))
    assert [h.version for h in model.alias_history] == [1, 2, 1]


def versions_on_disk(env, model: str) -> set[int]:
    d = env.repository / model
    return {int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()} if d.exists() else set()


def staged_uploads(repository) -> list:
    return sorted(repository.glob("*/.staging/*"))


def staging_empty(env) -> bool:
    return not staged_uploads(env.repository)


async def test_minilm_register_ready_alias_rollback_archive(registry_env):
    """The real minilm artefact; Triton reports exactly the live versions after each step."""
    env = registry_env
    data = MINILM_ONNX.read_bytes()
    kwargs = dict(
        preprocessing=pb.Preprocessing(kind=pb.Preprocessing.KIND_TOKENIZER, name="minilm"),
        postprocessing=pb.Postprocessing(kind=pb.Postprocessing.KIND_EMBEDDING),
        tags={"git_sha": "abc123"},
        description="all-MiniLM-L6-v2",
    )
    v1 = await register(env, "minilm", data, **kwargs)
    assert [t.name for t in v1.signature.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    outputs = [(t.name, t.datatype, list(t.shape)) for t in v1.signature.outputs]
    assert outputs == [("sentence_embedding", "FP32", [384])]
    assert v1.preprocessing.name == "minilm" and v1.tags["git_sha"] == "abc123" and v1.size_bytes == len(data)
    assert await triton_versions(env.triton, "minilm") == {1}

    await env.stub.SetAlias(pb.SetAliasRequest(model="minilm", alias="production", version=1, reason="launch"))
    v2 = await register(env, "minilm", data, **kwargs)
    assert v2.version == 2
    assert await triton_versions(env.triton, "minilm") == {1, 2}
    moved = await env.stub.SetAlias(pb.SetAliasRequest(model="minilm", alias="production", version=2))
    assert (moved.version, moved.previous_version) == (2, 1)
    back = await env.stub.Rollback(pb.RollbackRequest(model="minilm", reason="regression"))
    assert (back.version, back.previous_version, back.reason) == (1, 2, "regression")
    assert await triton_versions(env.triton, "minilm") == {1, 2}
    await env.stub.ArchiveVersion(pb.ArchiveVersionRequest(model="minilm", version=2, reason="bad"))
    assert await triton_versions(env.triton, "minilm") == {1}

    # The live version really serves embeddings through Triton.
    import numpy as np
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput

    client = triton_aio.InferenceServerClient(env.triton.grpc_address)
    try:
        inputs = []
        for name in ("input_ids", "attention_mask", "token_type_ids"):
            inp = InferInput(name, [1, 5], "INT64")
            inp.set_data_from_numpy(
                np.array(
                    [[101, 7592, 2088, 999, 102]]
                    if name == "input_ids"
                    else [[1] * 5]
                    if name == "attention_mask"
                    else [[0] * 5],
                    np.int64,
                )
            )
            inputs.append(inp)
        result = await client.infer("minilm", inputs, model_version="1")
        vec = result.as_numpy("sentence_embedding")
        assert vec.shape == (1, 384) and abs(float(np.linalg.norm(vec)) - 1.0) < 1e-4
    finally:
        await client.close()
    config = (env.repository / "minilm" / "config.pbtxt").read_text()
    assert 'backend: "onnxruntime"' in config and "versions: 1\n" in config and "versions: 2" not in config


async def test_torchscript_and_triton_folder(registry_env):
    env = registry_env
    sig = pb.Signature(
        inputs=[pb.TensorSpec(name="INPUT__0", datatype="FP32", shape=[4])],
        outputs=[pb.TensorSpec(name="OUTPUT__0", datatype="FP32", shape=[4])],
    )
    labels = ["a", "b", "c", "d"]
    ts = await register(
        env,
        "scaler",
        tiny_torchscript(),
        pb.ARTIFACT_FORMAT_TORCHSCRIPT,
        signature=sig,
        labels=labels,
        postprocessing=pb.Postprocessing(kind=pb.Postprocessing.KIND_SOFTMAX_TOP_K, top_k=2),
    )
    assert ts.labels == labels
    assert (env.repository / "scaler" / "1" / "model.pt").is_file()
    assert (env.repository / "scaler" / "labels.txt").read_text().split() == labels
    assert await triton_versions(env.triton, "scaler") == {1}

    config = (
        'name: "whatever"\nbackend: "onnxruntime"\nmax_batch_size: 4\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    folder = await register(env, "folder", triton_folder(tiny_onnx(5.0), config), pb.ARTIFACT_FORMAT_TRITON_FOLDER)
    assert [t.name for t in folder.signature.inputs] == ["x"]
    assert await triton_versions(env.triton, "folder") == {1}


async def test_invalid_artefacts_and_names_write_nothing(start_registry):
    env = await start_registry(max_artifact_bytes=200_000)
    good = tiny_onnx()
    await register(env, "tiny", good)
    before = versions_on_disk(env, "tiny")

    async def refused(head, data, code, *fragments):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.stub.RegisterVersion(upload_messages(head, data))
        assert info.value.code() == code, info.value.details()
        for fragment in fragments:
            assert fragment in info.value.details(), info.value.details()
        return info.value.details()

    garbage = b"\x08\x07definitely not onnx" * 10
    await refused(header("tiny", garbage), garbage, grpc.StatusCode.INVALID_ARGUMENT, "ONNX")
    wrong_sha = header("tiny", good)
    wrong_sha.sha256 = "0" * 64
    await refused(wrong_sha, good, grpc.StatusCode.INVALID_ARGUMENT, "sha256 mismatch")
    big = b"x" * 200_001
    await refused(header("tiny", big), big, grpc.StatusCode.INVALID_ARGUMENT, "limit")
    short = header("tiny", good)
    await refused(short, good[:-10], grpc.StatusCode.INVALID_ARGUMENT, "upload ended")
    for name in ("../x", "", "x" * 65, "Upper", "a/b", "..", "a.b"):
        await refused(header(name, good), good, grpc.StatusCode.INVALID_ARGUMENT, "model name")
    await refused(
        header(
            "scaler",
            b"PK\x03\x04 not torchscript",
            pb.ARTIFACT_FORMAT_TORCHSCRIPT,
            signature=pb.Signature(
                inputs=[pb.TensorSpec(name="INPUT__0", datatype="FP32", shape=[4])],
                outputs=[pb.TensorSpec(name="OUTPUT__0", datatype="FP32", shape=[4])],
            ),
        ),
        b"PK\x03\x04 not torchscript",
        grpc.StatusCode.INVALID_ARGUMENT,
        "TorchScript",
    )
    # A tarball escaping its folder.
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    evil = buf.getvalue()
    await refused(
        header("evil", evil, pb.ARTIFACT_FORMAT_TRITON_FOLDER), evil, grpc.StatusCode.INVALID_ARGUMENT, "outside"
    )
    assert not (env.repository.parent / "evil.txt").exists()
    # Incompatible signature with the live version: FAILED_PRECONDITION naming the difference.
    other = tiny_onnx(width=8)
    details = await refused(header("tiny", other), other, grpc.StatusCode.FAILED_PRECONDITION, "incompatible")
    assert "input 'x' shape [8] != [4]" in details
    renamed = tiny_onnx(output_name="z")
    details = await refused(header("tiny", renamed), renamed, grpc.StatusCode.FAILED_PRECONDITION, "output 'z' is new")

    assert versions_on_disk(env, "tiny") == before == {1}
    assert staging_empty(env)
    assert not (env.repository / "evil").exists() and not (env.repository / "scaler").exists()
    listed = await env.stub.ListModels(pb.ListModelsRequest(include_archived=True))
    assert [(m.name, [v.version for v in m.versions]) for m in listed.models] == [("tiny", [1])]
    # Bad alias / policy requests.
    for req, code in (
        (pb.SetAliasRequest(model="tiny", alias="../prod", version=1), grpc.StatusCode.INVALID_ARGUMENT),
        (pb.SetAliasRequest(model="tiny", alias="prod", version=9), grpc.StatusCode.NOT_FOUND),
        (pb.SetAliasRequest(model="nope", alias="prod", version=1), grpc.StatusCode.NOT_FOUND),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.stub.SetAlias(req)
        assert info.value.code() == code
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.Rollback(pb.RollbackRequest(model="tiny"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_admin_token(start_registry):
    env = await start_registry(token="s3cret")
    data = tiny_onnx()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.RegisterVersion(upload_messages(header("tiny", data), data))
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer" in info.value.details()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.RegisterVersion(
            upload_messages(header("tiny", data), data), metadata=(("authorization", "Bearer wrong"),)
        )
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not (env.repository / "tiny").exists()
    v = await register(env, "tiny", data)  # env.auth() sends the right token
    for call, req in (
        (env.stub.SetAlias, pb.SetAliasRequest(model="tiny", alias="production", version=1)),
        (env.stub.Rollback, pb.RollbackRequest(model="tiny")),
        (env.stub.SetTrafficPolicy, pb.SetTrafficPolicyRequest(model="tiny")),
        (env.stub.ArchiveVersion, pb.ArchiveVersionRequest(model="tiny", version=1)),
        (env.stub.ReportShadowResults, pb.ReportShadowResultsRequest()),
        (env.stub.ReportVersionStats, pb.ReportVersionStatsRequest()),
        (env.stub.StartRollout, pb.StartRolloutRequest(model="tiny", version=1)),
        (env.stub.AbortRollout, pb.AbortRolloutRequest(model="tiny")),
        (env.stub.OptimizeVersion, pb.OptimizeVersionRequest(model="tiny", from_version=1, int8=True)),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(req)
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED, call
    # Reads need no token.
    assert (
        await env.stub.GetVersion(pb.GetVersionRequest(model="tiny", version=v.version))
    ).state == pb.VERSION_STATE_READY
    alias = await env.stub.SetAlias(
        pb.SetAliasRequest(model="tiny", alias="production", version=1), metadata=env.auth()
    )
    assert alias.version == 1


async def test_traffic_policy_shadow_stats_and_restart(start_registry, tmp_path):
    env = await start_registry()
    await register(env, "tiny", tiny_onnx(2.0))
    await register(env, "tiny", tiny_onnx(3.0))
    await env.stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="production", version=1))
    await env.stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="canary", version=2))
    bad = [
        (
            pb.SetTrafficPolicyRequest(model="tiny", split=[pb.TrafficTarget(alias="nope", weight=1)]),
            grpc.StatusCode.FAILED_PRECONDITION,
            "no alias 'nope'",
        ),
        (
            pb.SetTrafficPolicyRequest(model="tiny", split=[pb.TrafficTarget(version=7, weight=1)]),
            grpc.StatusCode.NOT_FOUND,
            "no version 7",
        ),
        (
            pb.SetTrafficPolicyRequest(model="tiny", split=[pb.TrafficTarget(version=1, weight=0)]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "sum to 0",
        ),
        (
            pb.SetTrafficPolicyRequest(
                model="tiny", shadow=pb.ShadowPolicy(target=pb.TrafficTarget(version=2), fraction=1.5)
            ),
            grpc.StatusCode.INVALID_ARGUMENT,
            "outside [0, 1]",
        ),
    ]
    for req, code, fragment in bad:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await env.stub.SetTrafficPolicy(req)
        assert info.value.code() == code and fragment in info.value.details(), info.value.details()
    policy = await env.stub.SetTrafficPolicy(
        pb.SetTrafficPolicyRequest(
            model="tiny",
            split=[pb.TrafficTarget(alias="production", weight=90), pb.TrafficTarget(alias="canary", weight=10)],
            shadow=pb.ShadowPolicy(target=pb.TrafficTarget(version=2), fraction=0.25),
            reason="canary",
            actor="ops",
        )
    )
    assert [t.weight for t in policy.split] == [90, 10] and policy.shadow.fraction == 0.25
    # A version in the policy or behind an alias cannot be archived.
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await env.stub.ArchiveVersion(pb.ArchiveVersionRequest(model="tiny", version=2))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "canary" in info.value.details()
    await env.stub.ReportShadowResults(
        pb.ReportShadowResultsRequest(
            results=[
                pb.ShadowResult(
                    model="tiny",
                    primary_version=1,
                    shadow_version=2,
                    items=4,
                    top1_agreed=3,
                    cosine_sum=3.6,
                    primary_latency_ms=10,
                    shadow_latency_ms=20,
                ),
                pb.ShadowResult(
                    model="tiny",
                    primary_version=1,
                    shadow_version=2,
                    items=4,
                    top1_agreed=4,
                    cosine_sum=4.0,
                    primary_latency_ms=20,
                    shadow_latency_ms=40,
                ),
            ]
        )
    )
    stats = (await env.stub.GetModel(pb.GetModelRequest(model="tiny"))).shadow_stats[0]
    assert (stats.samples, stats.top1_agreement) == (2, 7 / 8)
    assert (stats.primary_latency_ms, stats.shadow_latency_ms) == (15, 30)
    assert stats.mean_cosine == pytest.approx(7.6 / 8)
    before = await env.stub.GetModel(pb.GetModelRequest(model="tiny"))
    revision_before = await first_revision(env)

    # Restart on the same database: nothing is lost, revisions keep increasing, Triton is reconciled.
    await start_registry.stop(env)
    env2 = await start_registry()
    after = await env2.stub.GetModel(pb.GetModelRequest(model="tiny"))
    assert after == before
    assert await first_revision(env2) == revision_before
    await env2.stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="production", version=2))
    assert await first_revision(env2) > revision_before
    assert await triton_versions(env2.triton, "tiny") == {1, 2}


async def first_revision(env) -> int:
    stream = env.stub.Watch(pb.WatchRequest())
    try:
        event = await stream.read()
        return event.revision
    finally:
        stream.cancel()


async def test_watch_delivers_snapshot_then_each_change_in_order(registry_env):
    env = registry_env
    await register(env, "tiny", tiny_onnx(2.0))
    stream = env.stub.Watch(pb.WatchRequest())
    try:
        snapshot = await stream.read()
        assert snapshot.WhichOneof("event") == "snapshot"
        assert [m.model for m in snapshot.snapshot.models] == ["tiny"]
        assert snapshot.snapshot.models[0].versions[0].state == pb.VERSION_STATE_READY
        v2 = await register(env, "tiny", tiny_onnx(3.0))
        await env.stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="production", version=1))
        await env.stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="production", version=2))
        await env.stub.SetTrafficPolicy(
            pb.SetTrafficPolicyRequest(
                model="tiny", split=[pb.TrafficTarget(version=1, weight=1), pb.TrafficTarget(version=2, weight=3)]
            )
        )
        await env.stub.Rollback(pb.RollbackRequest(model="tiny"))
        events = [await asyncio.wait_for(stream.read(), 10) for _ in range(7)]
    finally:
        stream.cancel()
    revisions = [snapshot.revision] + [e.revision for e in events]
    assert revisions == sorted(revisions) and len(set(revisions)) == len(revisions)
    assert all(e.WhichOneof("event") == "model_changed" and e.model_changed.model == "tiny" for e in events)
    states = [{v.version: v.state for v in e.model_changed.versions}.get(v2.version) for e in events[:3]]
    assert states == [pb.VERSION_STATE_REGISTERED, pb.VERSION_STATE_LOADING, pb.VERSION_STATE_READY]
    assert [dict(e.model_changed.aliases) for e in events[3:5]] == [{"production": 1}, {"production": 2}]
    assert [t.weight for t in events[5].model_changed.policy.split] == [1, 3]
    assert dict(events[6].model_changed.aliases) == {"production": 1}


async def test_efficientnet_torchscript_with_labels(registry_env):
    """The real TorchScript artefact with its 1000 labels: Triton's classification names the class."""
    env = registry_env
    folder = MINILM_ONNX.parents[2] / "efficientnet_lite0"
    labels = (folder / "labels.txt").read_text().splitlines()
    sig = pb.Signature(
        inputs=[pb.TensorSpec(name="INPUT__0", datatype="FP32", shape=[3, 224, 224])],
        outputs=[pb.TensorSpec(name="OUTPUT__0", datatype="FP32", shape=[1000])],
    )
    v = await register(
        env,
        "efficientnet_lite0",
        (folder / "1" / "model.pt").read_bytes(),
        pb.ARTIFACT_FORMAT_TORCHSCRIPT,
        signature=sig,
        labels=labels,
        max_batch_size=16,
        preprocessing=pb.Preprocessing(kind=pb.Preprocessing.KIND_VISION, name="efficientnet_lite0"),
        postprocessing=pb.Postprocessing(kind=pb.Postprocessing.KIND_SOFTMAX_TOP_K, output="OUTPUT__0", top_k=5),
    )
    assert len(v.labels) == 1000 and await triton_versions(env.triton, "efficientnet_lite0") == {1}
    import numpy as np
    import tritonclient.grpc.aio as triton_aio
    from tritonclient.grpc import InferInput, InferRequestedOutput

    client = triton_aio.InferenceServerClient(env.triton.grpc_address)
    try:
        inp = InferInput("INPUT__0", [1, 3, 224, 224], "FP32")
        inp.set_data_from_numpy(np.zeros((1, 3, 224, 224), np.float32))
        result = await client.infer(
            "efficientnet_lite0", [inp], model_version="1", outputs=[InferRequestedOutput("OUTPUT__0", class_count=1)]
        )
        _, index, label = result.as_numpy("OUTPUT__0").reshape(-1)[0].decode().split(":", 2)
        assert label == labels[int(index)]
    finally:
        await client.close()


async def test_new_triton_replica_loads_live_versions_before_joining(registry_env, tmp_path):
    from maas.local.triton import LocalTriton, TritonConfig

    env = registry_env
    await register(env, "tiny", tiny_onnx(2.0))
    with LocalTriton(TritonConfig(model_repository=env.repository, work_dir=tmp_path / "replica")) as replica:
        await env.registry.set_triton_replicas([env.triton.grpc_address, replica.grpc_address])
        assert replica.grpc_address in env.registry.fleet.addresses, replica.log_tail()
        assert await triton_versions(replica, "tiny") == {1}
        await register(env, "tiny", tiny_onnx(3.0))
        assert await triton_versions(replica, "tiny") == {1, 2} == await triton_versions(env.triton, "tiny")
        await env.stub.ArchiveVersion(pb.ArchiveVersionRequest(model="tiny", version=1))
        assert await triton_versions(replica, "tiny") == {2} == await triton_versions(env.triton, "tiny")
        await env.registry.set_triton_replicas([env.triton.grpc_address])
        assert env.registry.fleet.addresses == [env.triton.grpc_address]


async def test_versions_lost_by_triton_are_loaded_again(start_registry):
    """A Triton that lost its models (restart, manual unload) gets the live versions back by itself."""
    import tritonclient.grpc.aio as triton_aio

    env = await start_registry(reconcile_interval_seconds=0.2)
    await register(env, "tiny", tiny_onnx(2.0))
    client = triton_aio.InferenceServerClient(env.triton.grpc_address)
    try:
        await client.unload_model("tiny")
    finally:
        await client.close()
    for _ in range(200):
        if await triton_versions(env.triton, "tiny") == {1}:
            break
        await asyncio.sleep(0.1)
    assert await triton_versions(env.triton, "tiny") == {1}


async def test_client_cancelling_an_upload_leaves_nothing(registry_env):
    env = registry_env
    data = MINILM_ONNX.read_bytes()[: 4 * 1024 * 1024]
    sent = asyncio.Event()

    async def slow():
        yield pb.RegisterVersionRequest(header=header("minilm", data))
        for i in range(0, len(data), 64 * 1024):
            yield pb.RegisterVersionRequest(chunk=data[i : i + 64 * 1024])
            sent.set()
            await asyncio.sleep(0.05)

    call = env.stub.RegisterVersion(slow())
    await asyncio.wait_for(sent.wait(), 10)
    await asyncio.sleep(0.3)
    assert staged_uploads(env.repository)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    for _ in range(50):
        if staging_empty(env):
            break
        await asyncio.sleep(0.1)
    assert staging_empty(env) and not (env.repository / "minilm").exists()
    assert (await env.stub.ListModels(pb.ListModelsRequest())).models == []


async def test_replica_that_comes_up_later_joins_with_the_live_versions(start_registry, tmp_path):
    from maas.local.triton import LocalTriton, TritonConfig, free_ports

    env = await start_registry(reconcile_interval_seconds=0.2)
    await register(env, "tiny", tiny_onnx(2.0))
    grpc_port = free_ports(1)[0]
    late = f"127.0.0.1:{grpc_port}"
    from services.registry.triton_fleet import TritonError

    with pytest.raises(TritonError, match=late):  # the watcher hands the set over again later
        await env.registry.set_triton_replicas({env.triton.grpc_address, late})
    assert env.registry.fleet.addresses == [env.triton.grpc_address]  # unreachable: not joined
    config = TritonConfig(model_repository=env.repository, work_dir=tmp_path / "late", grpc_port=grpc_port)
    with LocalTriton(config) as replica:

        def caught_up() -> bool:  # `addresses`: joined and given the live versions
            return late in env.registry.fleet.addresses

        for _ in range(300):
            if caught_up():
                break
            await asyncio.sleep(0.1)
        assert caught_up()
        assert await triton_versions(replica, "tiny") == {1}
