"""SIGKILL the registry (a real subprocess) mid-registration: no partial version survives, and a restarted
registry has every earlier version, alias and traffic policy."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time

import grpc
import pytest

from maas.v1 import registry_pb2 as pb
from maas.v1 import registry_pb2_grpc
from tests.fixtures.registry import MINILM_ONNX, RegistryProcess, header, tiny_onnx, upload_messages

pytestmark = pytest.mark.slow


@pytest.fixture
def registry_process(empty_triton, tmp_path):
    proc = RegistryProcess(
        empty_triton.repository, tmp_path / "registry.sqlite3", empty_triton.grpc_address, tmp_path / "registry.log"
    )
    try:
        yield proc.start()
    finally:
        proc.stop()


def wait_state(stub, model, version, states, timeout=120.0) -> pb.ModelVersion:
    deadline = time.monotonic() + timeout
    while True:
        v = stub.GetVersion(pb.GetVersionRequest(model=model, version=version), timeout=5)
        if v.state in states:
            return v
        assert time.monotonic() < deadline, f"still {pb.VersionState.Name(v.state)}"
        time.sleep(0.05)


def seed(stub) -> pb.Model:
    """v1 ready, production → v1, a traffic policy: the state a crash must not lose."""
    data = tiny_onnx(2.0)
    v = stub.RegisterVersion(upload_messages(header("tiny", data), data), timeout=60)
    wait_state(stub, "tiny", v.version, (pb.VERSION_STATE_READY,))
    stub.SetAlias(pb.SetAliasRequest(model="tiny", alias="production", version=1, reason="seed"))
    stub.SetTrafficPolicy(
        pb.SetTrafficPolicyRequest(model="tiny", split=[pb.TrafficTarget(alias="production", weight=100)])
    )
    return stub.GetModel(pb.GetModelRequest(model="tiny"))


def db_versions(proc, model) -> list[tuple[int, str]]:
    with sqlite3.connect(proc.database) as db:
        return db.execute("SELECT version, state FROM versions WHERE model=? ORDER BY version", (model,)).fetchall()


def disk_versions(proc, model) -> set[int]:
    d = proc.repository / model
    return {int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()} if d.exists() else set()


def slow_upload(stub, model, data, sent_event: threading.Event, chunk=256 * 1024, delay=0.05):
    def messages():
        yield pb.RegisterVersionRequest(header=header(model, data))
        for i in range(0, len(data), chunk):
            yield pb.RegisterVersionRequest(chunk=data[i : i + chunk])
            if i >= len(data) // 3:
                sent_event.set()
            time.sleep(delay)

    try:
        stub.RegisterVersion(messages(), timeout=120)
    except grpc.RpcError:
        pass


def check_restarted(proc, before: pb.Model) -> pb.Model:
    proc.start()
    with grpc.insecure_channel(proc.address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        after = stub.GetModel(pb.GetModelRequest(model="tiny"))
        assert list(after.versions) == list(before.versions)
        assert list(after.aliases) == list(before.aliases)
        assert after.policy == before.policy
        assert not list(proc.repository.glob("*/.staging/*"))
        return after


def test_sigkill_during_upload_leaves_no_partial_version(registry_process):
    proc = registry_process
    with grpc.insecure_channel(proc.address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        before = seed(stub)
        data = MINILM_ONNX.read_bytes()[: 8 * 1024 * 1024]  # stream only a part; it never completes anyway
        sent = threading.Event()
        uploader = threading.Thread(target=slow_upload, args=(stub, "minilm", data + b"x" * 10, sent))
        uploader.start()
        assert sent.wait(60)
        assert list(proc.repository.glob("*/.staging/*"))  # the upload is really in progress on disk
        proc.kill()
        uploader.join(60)
    assert db_versions(proc, "minilm") == [] and disk_versions(proc, "minilm") == set()
    check_restarted(proc, before)
    assert db_versions(proc, "minilm") == [] and disk_versions(proc, "minilm") == set()
    assert db_versions(proc, "tiny") == [(1, "ready")]


def test_sigkill_after_upload_before_ready(registry_process):
    """Killed while the version loads: either no version, or a whole one that the restart brings to READY."""
    proc = registry_process
    data = MINILM_ONNX.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with grpc.insecure_channel(proc.address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        before = seed(stub)
        v = stub.RegisterVersion(upload_messages(header("minilm", data), data, chunk=4 * 1024 * 1024), timeout=120)
        state = stub.GetVersion(pb.GetVersionRequest(model="minilm", version=v.version)).state
        assert state in (pb.VERSION_STATE_REGISTERED, pb.VERSION_STATE_LOADING)  # loading takes seconds
        proc.kill()
    assert [n for n, _ in db_versions(proc, "minilm")] == [1] and disk_versions(proc, "minilm") == {1}
    check_restarted(proc, before)
    with grpc.insecure_channel(proc.address) as channel:
        stub = registry_pb2_grpc.RegistryStub(channel)
        ready = wait_state(stub, "minilm", 1, (pb.VERSION_STATE_READY, pb.VERSION_STATE_FAILED))
        assert ready.state == pb.VERSION_STATE_READY, ready.state_reason
    stored = proc.repository / "minilm" / "1" / "model.onnx"
    assert hashlib.sha256(stored.read_bytes()).hexdigest() == digest


def test_sigkill_at_random_points_of_a_registration(registry_process):
    """Kill at several moments between the last byte and READY: every outcome is 'none' or 'whole'."""
    proc = registry_process
    data = MINILM_ONNX.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with grpc.insecure_channel(proc.address) as channel:
        before = seed(registry_pb2_grpc.RegistryStub(channel))
    outcomes = []
    for delay in (0.0, 0.3, 0.8):
        with grpc.insecure_channel(proc.address) as channel:
            stub = registry_pb2_grpc.RegistryStub(channel)
            done = threading.Event()

            def messages(done=done):
                yield from upload_messages(header("minilm", data), data, chunk=4 * 1024 * 1024)
                done.set()

            uploader = threading.Thread(
                target=_swallow, args=(stub.RegisterVersion, messages()), kwargs={"timeout": 120}
            )
            uploader.start()
            assert done.wait(60)
            time.sleep(delay)
            proc.kill()
            uploader.join(60)
        rows, dirs = db_versions(proc, "minilm"), disk_versions(proc, "minilm")
        check_restarted(proc, before)
        rows_after, dirs_after = db_versions(proc, "minilm"), disk_versions(proc, "minilm")
        assert {n for n, _ in rows_after} == dirs_after  # a row for every folder and a folder for every row
        assert {n for n, _ in rows} <= dirs  # a committed row always had its whole folder
        for n in dirs_after:
            assert (
                hashlib.sha256((proc.repository / "minilm" / str(n) / "model.onnx").read_bytes()).hexdigest() == digest
            )
        outcomes.append(len(rows_after))
    print("versions present after each kill:", outcomes)


def _swallow(fn, *args, **kwargs):
    try:
        fn(*args, **kwargs)
    except grpc.RpcError:
        pass
