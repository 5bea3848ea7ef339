"""The router's DetokenizeStream when the tokenizer process dies mid-generation (the soak's Generate
INTERNALs): the next send is UNAVAILABLE naming the stream, never asyncio.InvalidStateError."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import grpc
import pytest

from maas.local.processes import free_ports
from maas.v1 import tokenizer_pb2_grpc
from services.shared.errors import Unavailable, status_for
from services.tokenizer.client import DetokenizeSession
from tests.fixtures.drain import MODELS, REPO, wait_serving


async def test_a_detokenize_stream_whose_tokenizer_died_is_unavailable():
    port = free_ports(1)[0]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    tokenizer = subprocess.Popen(
        [sys.executable, "-m", "services.tokenizer", "--listen", f"127.0.0.1:{port}", "--model-repository", MODELS],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        await wait_serving(f"127.0.0.1:{port}")
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            session = DetokenizeSession(tokenizer_pb2_grpc.TokenizerStub(channel), "smollm2", timeout=10)
            await session.send([1, 2, 3])
            tokenizer.send_signal(signal.SIGKILL)
            tokenizer.wait()
            for _ in range(3):  # whether or not the client noticed yet: UNAVAILABLE, never an internal error
                with pytest.raises((Unavailable, grpc.aio.AioRpcError)) as failed:
                    await session.send([4])
                assert status_for(failed.value)[0] == grpc.StatusCode.UNAVAILABLE, failed.value
    finally:
        if tokenizer.poll() is None:
            tokenizer.kill()
            tokenizer.wait()
