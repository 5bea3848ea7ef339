"""`maas models ...` as a user runs it (a real subprocess) against a registry and a real Triton."""

from __future__ import annotations

import asyncio
import json
import os
import sys

from tests.fixtures.registry import REPO, tiny_onnx


async def maas(env, *args: str, token: str | None = None) -> tuple[int, str, str]:
    environ = {**os.environ, "PYTHONPATH": str(REPO), "MAAS_REGISTRY_ADDRESS": env.address, "COLUMNS": "200"}
    environ.pop("MAAS_ADMIN_TOKEN", None)
    if token:
        environ["MAAS_ADMIN_TOKEN"] = token
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from maas.cli import main; main()",
        "models",
        *args,
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 300)
    return proc.returncode, out.decode(), err.decode()


async def test_cli_round_trip(start_registry, tmp_path):
    env = await start_registry(token="tok")
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx())
    labels = tmp_path / "labels.txt"
    labels.write_text("a\nb\nc\nd\n")

    code, out, err = await maas(
        env,
        "register",
        str(model),
        "--name",
        "tiny",
        "--top-k",
        "2",
        "--labels",
        str(labels),
        "--tag",
        "git_sha=abc",
        "--json",
        token="tok",
    )
    assert code == 0, err
    v = json.loads(out)
    assert v["version"] == "1" and v["state"] == "VERSION_STATE_READY" and v["labels"] == ["a", "b", "c", "d"]
    assert v["tags"] == {"git_sha": "abc"}
    code, out, err = await maas(env, "register", str(model), "--name", "tiny", token="tok")
    assert code == 0 and "tiny v2 is ready" in out, err

    # Errors: the server's message, no traceback, exit 1.
    code, out, err = await maas(env, "alias", "tiny", "production", "1")
    assert code == 1 and "UNAUTHENTICATED" in err and "Traceback" not in err
    code, out, err = await maas(env, "alias", "tiny", "production", "9", token="wrong")
    assert code == 1 and "PERMISSION_DENIED" in err
    code, out, err = await maas(env, "register", str(model), "--name", "../evil", token="tok")
    assert code == 1 and "INVALID_ARGUMENT" in err and "model name" in err and "Traceback" not in err

    assert (await maas(env, "alias", "tiny", "production", "1", "-r", "launch", token="tok"))[0] == 0
    code, out, _ = await maas(env, "alias", "tiny", "production", "2", token="tok")
    assert code == 0 and "production → v2 (was v1)" in out
    code, out, err = await maas(
        env,
        "traffic",
        "tiny",
        "production=90",
        "v1=10",
        "--shadow",
        "2",
        "--shadow-fraction",
        "0.5",
        "--json",
        token="tok",
    )
    assert code == 0, err
    policy = json.loads(out)
    assert [t["weight"] for t in policy["split"]] == [90, 10] and policy["shadow"]["fraction"] == 0.5
    code, out, _ = await maas(env, "rollback", "tiny", token="tok")
    assert code == 0 and "rolled back to v1" in out

    code, out, _ = await maas(env, "list")
    assert code == 0 and "tiny" in out and "production→v1" in out and "production=90" in out
    code, out, _ = await maas(env, "list", "--json")
    assert json.loads(out)[0]["name"] == "tiny"
    code, out, _ = await maas(env, "show", "tiny")
    assert code == 0 and "alias history" in out and "launch" in out
    code, out, _ = await maas(env, "show", "tiny", "1")
    assert code == 0 and "x:FP32[4] → y:FP32[4]" in out
    code, out, err = await maas(env, "archive", "tiny", "2", token="tok")
    assert code == 1 and "FAILED_PRECONDITION" in err  # in the traffic policy (shadow)
    code, out, err = await maas(env, "traffic", "tiny", "--clear", token="tok")
    assert code == 0, err
    code, out, err = await maas(env, "archive", "tiny", "2", token="tok")
    assert code == 0 and "archived" in out
    code, out, err = await maas(env, "show", "nope")
    assert code == 1 and "NOT_FOUND" in err


async def test_cli_watch_prints_snapshot_then_changes(start_registry, tmp_path):
    env = await start_registry()
    model = tmp_path / "tiny.onnx"
    model.write_bytes(tiny_onnx())
    assert (await maas(env, "register", str(model), "--name", "tiny"))[0] == 0
    environ = {**os.environ, "PYTHONPATH": str(REPO), "MAAS_REGISTRY_ADDRESS": env.address}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        "from maas.cli import main; main()",
        "models",
        "watch",
        "--json",
        env=environ,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        first = json.loads(await asyncio.wait_for(proc.stdout.readline(), 60))
        assert first["snapshot"]["models"][0]["model"] == "tiny"
        assert (await maas(env, "alias", "tiny", "production", "1"))[0] == 0
        change = json.loads(await asyncio.wait_for(proc.stdout.readline(), 30))
        assert change["model_changed"]["aliases"] == {"production": "1"}
        assert int(change["revision"]) > int(first["revision"])
    finally:
        proc.terminate()
        await proc.wait()
