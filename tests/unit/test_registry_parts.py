"""Registry building blocks: artefact validation, generated Triton config, auth, config, client helpers."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import zipfile

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from maas.registry_client import detect_format, pack_folder, parse_target, parse_tensor, sha256_file
from services.registry import artifacts
from services.registry.auth import AdminAuth
from services.registry.config import load_config
from services.registry.domain import (
    ArtifactFormat,
    Postprocessing,
    PostprocessingKind,
    RegistrationRequest,
    Signature,
    TensorSpec,
    Version,
    VersionState,
    Preprocessing,
    PreprocessingKind,
)
from services.registry.tritonconfig import model_config, to_json, to_pbtxt
from services.shared.config import ConfigError
from services.shared.errors import InvalidArgument, PermissionDenied, Unauthenticated
from tests.fixtures.registry import tiny_onnx, tiny_torchscript, triton_folder

TS_SIG = Signature((TensorSpec("INPUT__0", "FP32", (4,)),), (TensorSpec("OUTPUT__0", "FP32", (4,)),))


def upload(tmp_path, data: bytes, fmt=ArtifactFormat.ONNX, **kwargs) -> artifacts.Upload:
    req = RegistrationRequest(
        model="m", format=fmt, sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), **kwargs
    )
    staging = tmp_path / "staging"
    staging.mkdir(parents=True)
    up = artifacts.Upload(staging, req)
    up.write(data)
    up.finish()
    return up


def test_onnx_signature_is_read_from_the_graph(tmp_path):
    art = artifacts.validate(upload(tmp_path, tiny_onnx(width=6)), 16, 10**9)
    assert art.signature == Signature((TensorSpec("x", "FP32", (6,)),), (TensorSpec("y", "FP32", (6,)),))
    assert art.max_batch_size == 16 and (art.version_dir / "model.onnx").is_file()


def test_onnx_header_signature_must_agree(tmp_path):
    wrong = Signature((TensorSpec("x", "FP32", (5,)),), (TensorSpec("y", "FP32", (4,)),))
    with pytest.raises(InvalidArgument, match=r"disagrees with the ONNX graph: input 'x' shape \[5\] != \[4\]"):
        artifacts.validate(upload(tmp_path, tiny_onnx(), signature=wrong), 16, 10**9)


def test_torchscript_is_loaded_and_needs_a_positional_signature(tmp_path):
    art = artifacts.validate(
        upload(tmp_path, tiny_torchscript(), ArtifactFormat.TORCHSCRIPT, signature=TS_SIG), 4, 10**9
    )
    assert (art.version_dir / "model.pt").is_file() and art.signature == TS_SIG
    req = RegistrationRequest(model="m", format=ArtifactFormat.TORCHSCRIPT, sha256="a" * 64, size_bytes=1)
    with pytest.raises(InvalidArgument, match="needs its signature"):
        artifacts.check_request(req, 100)
    named = Signature((TensorSpec("image", "FP32", (4,)),), (TensorSpec("OUTPUT__0", "FP32", (4,)),))
    with pytest.raises(InvalidArgument, match="INPUT__0"):
        artifacts.check_request(RegistrationRequest(**{**req.__dict__, "signature": named}), 100)


def test_torchscript_without_torch_checks_the_archive_layout(tmp_path):
    """The services image has no torch: a real TorchScript file passes, a zip that is not one does not."""
    good = tmp_path / "model.pt"
    good.write_bytes(tiny_torchscript())
    artifacts.check_torchscript_archive(good)
    bad = tmp_path / "bad.pt"
    with zipfile.ZipFile(bad, "w") as z:
        z.writestr("model/data.pkl", b"")
    with pytest.raises(InvalidArgument, match="lacks data.pkl, constants.pkl or code/"):
        artifacts.check_torchscript_archive(bad)
    bad.write_bytes(b"PK\x03\x04 not torchscript")
    with pytest.raises(InvalidArgument, match="not a TorchScript archive"):
        artifacts.check_torchscript_archive(bad)


def test_triton_folder_keeps_its_config(tmp_path):
    config = (
        'name: "x"\nbackend: "onnxruntime"\nmax_batch_size: 2\n'
        'input [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'parameters { key: "k" value: { string_value: "v" } }\n'
    )
    art = artifacts.validate(
        upload(tmp_path, triton_folder(tiny_onnx(), config), ArtifactFormat.TRITON_FOLDER), 8, 10**9
    )
    assert art.max_batch_size == 2 and json.loads(art.base_config)["parameters"]["k"]["stringValue"] == "v"
    assert (art.version_dir / "model.onnx").is_file()


@pytest.mark.parametrize("member,reason", [("../evil", "outside"), ("/abs", "outside")])
def test_triton_folder_traversal_is_refused(tmp_path, member, reason):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(InvalidArgument, match=reason):
        artifacts.validate(upload(tmp_path, buf.getvalue(), ArtifactFormat.TRITON_FOLDER), 8, 10**9)


def test_triton_folder_symlink_and_backend_are_refused(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(InvalidArgument, match="only files and folders"):
        artifacts.validate(upload(tmp_path, buf.getvalue(), ArtifactFormat.TRITON_FOLDER), 8, 10**9)
    python = (
        'backend: "python"\ninput [ { name: "x" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
        'output [ { name: "y" data_type: TYPE_FP32 dims: [ 4 ] } ]\n'
    )
    with pytest.raises(InvalidArgument, match="not served here"):
        artifacts.validate(
            upload(tmp_path / "second", triton_folder(b"", python), ArtifactFormat.TRITON_FOLDER), 8, 10**9
        )


def test_upload_size_and_digest(tmp_path):
    req = RegistrationRequest(
        model="m", format=ArtifactFormat.ONNX, sha256=hashlib.sha256(b"abc").hexdigest(), size_bytes=3
    )
    (tmp_path / "a").mkdir()
    up = artifacts.Upload(tmp_path / "a", req)
    with pytest.raises(InvalidArgument, match="more than the declared"):
        up.write(b"abcd")
    up.discard()
    assert not (tmp_path / "a").exists()
    with pytest.raises(InvalidArgument, match="not 64 lower-case hex"):
        artifacts.check_request(RegistrationRequest(**{**req.__dict__, "sha256": "xyz"}), 100)
    with pytest.raises(InvalidArgument, match="needs the name"):
        artifacts.check_request(
            RegistrationRequest(**{**req.__dict__, "preprocessing": Preprocessing(PreprocessingKind.TOKENIZER)}), 100
        )


def version(fmt=ArtifactFormat.ONNX, labels=(), max_batch=8, sig=None) -> Version:
    sig = sig or Signature((TensorSpec("x", "INT64", (-1,)),), (TensorSpec("y", "FP32", (3,)),))
    return Version(
        model="m",
        version=3,
        state=VersionState.READY,
        format=fmt,
        sha256="",
        size_bytes=1,
        signature=sig,
        preprocessing=Preprocessing(),
        postprocessing=Postprocessing(PostprocessingKind.SOFTMAX_TOP_K),
        labels=labels,
        tags={},
        created_at=0,
        created_by="",
        description="",
        max_batch_size=max_batch,
    )


def test_generated_config_round_trips_and_lists_live_versions():
    config = model_config("m", version(labels=("a", "b", "c")), [1, 3], with_labels=True)
    parsed = text_format.Parse(to_pbtxt(config), model_config_pb2.ModelConfig())
    assert parsed == config
    assert list(parsed.version_policy.specific.versions) == [1, 3]
    assert parsed.backend == "onnxruntime" and parsed.default_model_filename == "model.onnx"
    assert parsed.input[0].data_type == model_config_pb2.TYPE_INT64 and list(parsed.input[0].dims) == [-1]
    assert parsed.output[0].label_filename == "labels.txt"
    assert parsed.dynamic_batching.max_queue_delay_microseconds > 0
    assert json.loads(to_json(config))["version_policy"]["specific"]["versions"] == ["1", "3"]
    ts = model_config("m", version(ArtifactFormat.TORCHSCRIPT, max_batch=0), [3], with_labels=False)
    assert (ts.backend, ts.platform, ts.default_model_filename, ts.max_batch_size) == (
        "pytorch",
        "pytorch_libtorch",
        "model.pt",
        0,
    )
    assert not ts.HasField("dynamic_batching")


def test_signature_differences_say_what_differs():
    a = Signature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (4,)),))
    b = Signature((TensorSpec("x", "FP16", (4,)), TensorSpec("z", "FP32", (1,))), (TensorSpec("y", "FP32", (5,)),))
    assert b.differences(a) == ["input 'z' is new", "input 'x' datatype FP16 != FP32", "output 'y' shape [5] != [4]"]
    assert a.differences(a) == []


def test_admin_auth():
    AdminAuth(None).check([])  # no token configured: open
    auth = AdminAuth("tok")
    with pytest.raises(Unauthenticated):
        auth.check([])
    with pytest.raises(Unauthenticated):
        auth.check([("authorization", "Basic dG9r")])
    with pytest.raises(PermissionDenied):
        auth.check([("authorization", "Bearer nope")])
    auth.check([("authorization", "Bearer tok")])
    auth.check([("Authorization", b"bearer tok")])


def test_config_from_flags_and_env(monkeypatch):
    monkeypatch.setenv("MAAS_ADMIN_TOKEN", "t")
    monkeypatch.setenv("MAAS_TRITON_ADDRESS", "a:1, b:2")
    cfg = load_config(["--database", "/tmp/x.db"])
    assert cfg.server.listen == "127.0.0.1:50052" and cfg.triton_addresses == ("a:1", "b:2")
    assert cfg.admin_token == "t" and str(cfg.database) == "/tmp/x.db"
    with pytest.raises(ConfigError):
        load_config(["--triton", "nohost"])
    with pytest.raises(ConfigError):
        load_config(["--max-artifact-bytes", "0"])


def test_client_helpers(tmp_path):
    assert parse_tensor("INPUT__0:fp32:3,224,224").shape == [3, 224, 224]
    with pytest.raises(ValueError):
        parse_tensor("bad")
    assert parse_target("v3", 10).version == 3 and parse_target("7").version == 7
    assert parse_target("canary", 5).alias == "canary"
    assert detect_format(tmp_path / "m.onnx") == "onnx" and detect_format(tmp_path / "m.pt") == "torchscript"
    folder = tmp_path / "model"
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text('backend: "onnxruntime"')
    (folder / "1" / "model.onnx").write_bytes(tiny_onnx())
    assert detect_format(folder) == "triton"
    packed = pack_folder(folder, tmp_path / "m.tar.gz")
    with tarfile.open(packed) as tar:
        assert sorted(tar.getnames()) == ["1", "1/model.onnx", "config.pbtxt"]
    assert sha256_file(packed) == hashlib.sha256(packed.read_bytes()).hexdigest()


async def test_fleet_reports_an_unreachable_triton():
    from maas.local.triton import free_ports
    from services.registry.triton_fleet import TritonFleet

    fleet = TritonFleet([f"127.0.0.1:{free_ports(1)[0]}"], timeout=1)
    try:
        assert await fleet.wait_reachable(0.2) is False
        assert await fleet.ready_versions() == {}
    finally:
        await fleet.close()


def test_warmup_inputs_follow_the_signature():
    from services.registry.triton_fleet import warmup_inputs

    sig = Signature(
        (TensorSpec("ids", "INT64", (-1,)), TensorSpec("img", "FP32", (3, 8, 8))), (TensorSpec("y", "FP32", (2,)),)
    )
    batched = warmup_inputs(sig, 8)
    assert [(i.name(), i.shape(), i.datatype()) for i in batched] == [
        ("ids", [1, 8], "INT64"),
        ("img", [1, 3, 8, 8], "FP32"),
    ]
    assert [i.shape() for i in warmup_inputs(sig, 0)] == [[8], [3, 8, 8]]


def test_config_discovery_static_by_default_and_endpointslices_from_env(monkeypatch):
    for name in ("MAAS_TRITON_DISCOVERY", "MAAS_TRITON_SERVICE", "MAAS_NAMESPACE", "MAAS_TRITON_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    cfg = load_config(["--triton", "a:1,b:2"])
    assert cfg.replica_discovery.mode == "static" and cfg.replica_discovery.static_addresses == ("a:1", "b:2")
    # What the chart sets: no --triton needed, every ready replica of the headless Service.
    monkeypatch.setenv("MAAS_TRITON_DISCOVERY", "endpointslices")
    monkeypatch.setenv("MAAS_TRITON_SERVICE", "rel-maas-mesh-triton-headless")
    monkeypatch.setenv("MAAS_NAMESPACE", "models")
    cfg = load_config([])
    assert cfg.replica_discovery.mode == "endpointslices" and cfg.triton_addresses == ()
    assert (cfg.replica_discovery.service, cfg.replica_discovery.namespace) == (
        "rel-maas-mesh-triton-headless",
        "models",
    )
    monkeypatch.delenv("MAAS_TRITON_SERVICE")
    with pytest.raises(ConfigError, match="MAAS_TRITON_SERVICE"):
        load_config([])


def test_one_config_reader_for_uploads_and_services(tmp_path):
    from services.shared.model_repository import model_input_names, read_model_config

    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.pbtxt").write_text('input { name: "ids" } input { name: "mask" } future_field: 1')
    assert model_input_names(tmp_path / "m") == ["ids", "mask"]  # a newer Triton's field is tolerated
    with pytest.raises(ConfigError, match="future_field"):
        read_model_config(tmp_path / "m" / "config.pbtxt")  # validating an upload: it is a typo
