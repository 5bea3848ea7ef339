"""Run the real Triton Inference Server locally, CPU only, from the nvidia-pytriton wheel.

The wheel ships `tritonserver` and the Python backend but no native ONNX Runtime / LibTorch backends,
so we assemble a backend directory with the Python backend plus our Python-based backends
(triton_backends/onnxruntime, triton_backends/pytorch), which serve the same config.pbtxt files.

    with LocalTriton(TritonConfig(models=["minilm"])) as triton:
        client = tritonclient.grpc.InferenceServerClient(triton.grpc_address)

    python -m maas.local.triton --model-repository model_repository --model minilm --model efficientnet_lite0
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import signal
import site
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from maas import ports
from maas.local.processes import free_ports, spawn  # free_ports is part of this API
from maas.local.triton_backends import BackendsError, assemble_backends, wheel_paths
from services.shared.memory import malloc_arena_env

REPO = Path(__file__).resolve().parents[2]


class TritonError(RuntimeError):
    """Triton failed to start or to become ready; the message ends with the tail of its log."""


@dataclass
class TritonConfig:
    model_repository: Path = Path("model_repository")
    models: Sequence[str] = ()  # loaded at start (explicit model control); empty = none
    grpc_port: int = 0  # 0 = a free loopback port (`maas up` passes 8001/8000/8002)
    http_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    work_dir: Path | None = None  # backends/ and tritonserver.log go here; None = a temp dir removed on stop
    backends_source: Path = REPO / "triton_backends"
    extra_args: Sequence[str] = ()  # appended to the command line, e.g. ["--trace-config", "mode=opentelemetry"]
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment for tritonserver and stubs
    startup_timeout: float = 180.0
    stop_grace: float = 15.0


def _wheel_paths() -> tuple[Path, Path]:
    try:
        return wheel_paths()
    except BackendsError as e:
        raise TritonError(str(e)) from None


class LocalTriton:
    def __init__(self, config: TritonConfig | None = None) -> None:
        self.config = config or TritonConfig()
        self.process: subprocess.Popen | None = None
        self.work_dir: Path | None = None
        self.log_path: Path | None = None
        self._temp = False
        self._ports: tuple[int, ...] | None = None
        self._shm_prefix = ""
        self._lock = threading.RLock()  # start() calls stop() on failure

    # -- addresses ---------------------------------------------------------------------------------
    def _addr(self, i: int) -> str:
        if self._ports is None:
            raise TritonError("Triton is not started")
        return f"{self.config.host}:{self._ports[i]}"

    @property
    def grpc_address(self) -> str:
        return self._addr(0)

    @property
    def http_address(self) -> str:
        return self._addr(1)

    @property
    def metrics_address(self) -> str:
        return self._addr(2)

    # -- lifecycle ---------------------------------------------------------------------------------
    def _assemble_backends(self, server_dir: Path) -> Path:
        """<work>/backends/{python,onnxruntime,pytorch,common}: the Python backend + ours."""
        try:
            return assemble_backends(server_dir, self.work_dir / "backends", self.config.backends_source)
        except BackendsError as e:
            raise TritonError(str(e)) from None

    def _env(self, libs_dir: Path) -> dict[str, str]:
        env = dict(os.environ)
        # libpython of *this* interpreter first, so the stub embeds the same Python build as the venv.
        ld = [sysconfig.get_config_var("LIBDIR") or "", str(libs_dir), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in ld if p)
        # The stub's embedded Python does not know about the venv: hand it our site-packages.
        py = site.getsitepackages() + [env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in py if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(self.config.env)
        # tritonserver is C++ (our services bound their arenas with mallopt): 15 arenas on 2 cores let
        # its RSS climb with each burst of gRPC threads (services/shared/memory.py).
        env.update(malloc_arena_env(env))
        return env

    def start(self) -> "LocalTriton":
        with self._lock:
            if self.process is not None:
                return self
            try:
                cfg = self.config
                server_dir, libs_dir = _wheel_paths()
                repo = Path(cfg.model_repository).resolve()
                if not repo.is_dir():
                    raise TritonError(f"model repository not found: {repo}")
                if cfg.work_dir is None:
                    self.work_dir, self._temp = Path(tempfile.mkdtemp(prefix="maas-triton-")), True
                else:
                    self.work_dir = Path(cfg.work_dir).resolve()
                    self.work_dir.mkdir(parents=True, exist_ok=True)
                backends = self._assemble_backends(server_dir)
                wanted = (cfg.grpc_port, cfg.http_port, cfg.metrics_port)
                picked = iter(free_ports(wanted.count(0), cfg.host))
                self._ports = tuple(p or next(picked) for p in wanted)
                grpc, http, metrics = self._ports
                self._shm_prefix = f"maas{os.getpid()}_{grpc}_"
                cmd = [
                    str(server_dir / "bin" / "tritonserver"),
                    f"--model-repository={repo}",
                    f"--backend-directory={backends}",
                    "--model-control-mode=explicit",
                    *[f"--load-model={m}" for m in cfg.models],
                    f"--grpc-address={cfg.host}",
                    f"--grpc-port={grpc}",
                    f"--http-address={cfg.host}",
                    f"--http-port={http}",
                    f"--metrics-address={cfg.host}",
                    f"--metrics-port={metrics}",
                    "--allow-gpu-metrics=false",
                    # Unique shared-memory names: several Triton instances on one host must not collide.
                    f"--backend-config=python,shm-region-prefix-name={self._shm_prefix}",
                    *cfg.extra_args,
                ]
                self.log_path = self.work_dir / "tritonserver.log"
                with open(self.log_path, "ab") as log:
                    # Own process group (stop() signals tritonserver and its stubs), dies with us.
                    self.process = spawn(
                        cmd,
                        stdin=subprocess.DEVNULL,
                        stdout=log,
                        stderr=subprocess.STDOUT,
                        cwd=self.work_dir,
                        env=self._env(libs_dir),
                    )
                atexit.register(self.stop)
                self._wait_ready(cfg.models, cfg.startup_timeout)
            except BaseException:
                self.stop()  # also removes a temp work dir
                raise
        return self

    def _get(self, path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://{self.http_address}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    def _wait_ready(self, models: Sequence[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        # "*" (load everything) names no model to wait for: server readiness covers it.
        pending = ["/v2/health/ready"] + [f"/v2/models/{m}/ready" for m in models if m != "*"]
        while pending:
            if self.process.poll() is not None:
                raise TritonError(
                    f"tritonserver exited with code {self.process.returncode} during startup:\n{self._failure_report()}"
                )
            if time.monotonic() > deadline:
                raise TritonError(
                    f"Triton not ready after {timeout:.0f}s (waiting for {pending[0]}):\n{self._failure_report()}"
                )
            if self._get(pending[0]) == 200:
                pending.pop(0)
            else:
                time.sleep(0.2)

    def _failure_report(self) -> str:
        # Triton's error lines ("E1124 ...") first: the tail is often just its shutdown tables.
        try:
            errors = [ln for ln in self.log_path.read_text(errors="replace").splitlines() if ln.startswith("E")]
        except OSError:
            errors = []
        return "\n".join([*errors[-10:], f"--- last lines of {self.log_path}:", self.log_tail(25)])

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AttributeError):
            return "(no log)"

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after the grace. Safe to call twice."""
        with self._lock:
            proc, self.process = self.process, None
            if proc is not None:
                pgid = proc.pid  # start_new_session: the group id is the leader's pid
                self._signal_group(pgid, signal.SIGTERM)
                try:
                    proc.wait(self.config.stop_grace)
                except subprocess.TimeoutExpired:
                    pass
                # Also reaps stubs still alive after tritonserver itself exited.
                self._signal_group(pgid, signal.SIGKILL)
                proc.wait()
                atexit.unregister(self.stop)
                # Killed stubs leave their Python backend shared memory behind.
                if self._shm_prefix:  # never an empty pattern: /dev/shm is shared with others
                    for shm in Path("/dev/shm").glob(f"{self._shm_prefix}*"):
                        shm.unlink(missing_ok=True)
            if self._temp and self.work_dir is not None:
                shutil.rmtree(self.work_dir, ignore_errors=True)
                self._temp = False

    @staticmethod
    def _signal_group(pgid: int, sig: int) -> None:
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def __enter__(self) -> "LocalTriton":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m maas.local.triton", description="Run Triton locally until Ctrl-C.")
    ap.add_argument(
        "--model-repository", type=Path, default=Path(os.environ.get("MAAS_MODEL_REPOSITORY", "model_repository"))
    )
    ap.add_argument("--model", action="append", default=[], help="model to load (repeatable)")
    ap.add_argument("--grpc-port", type=int, default=ports.TRITON_GRPC)
    ap.add_argument("--http-port", type=int, default=ports.TRITON_HTTP)
    ap.add_argument("--metrics-port", type=int, default=ports.TRITON_METRICS)
    ap.add_argument("--work-dir", type=Path, default=Path(".maas/triton"))
    ap.add_argument("--timeout", type=float, default=180.0)
    ap.add_argument("extra", nargs=argparse.REMAINDER, help="after --: extra tritonserver arguments")
    args = ap.parse_args(argv)
    extra = args.extra[1:] if args.extra[:1] == ["--"] else args.extra
    config = TritonConfig(
        model_repository=args.model_repository,
        models=args.model,
        grpc_port=args.grpc_port,
        http_port=args.http_port,
        metrics_port=args.metrics_port,
        work_dir=args.work_dir,
        extra_args=extra,
        startup_timeout=args.timeout,
    )
    # Both end in the context manager's stop(); SIGINT explicitly, as it is ignored when started with `&`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    t0 = time.monotonic()
    try:
        with LocalTriton(config) as triton:
            print(
                f"Triton ready in {time.monotonic() - t0:.1f}s: grpc {triton.grpc_address} "
                f"http {triton.http_address} metrics {triton.metrics_address} log {triton.log_path}",
                flush=True,
            )
            while triton.process.poll() is None:
                time.sleep(1)
            print(f"tritonserver exited with code {triton.process.returncode}:\n{triton.log_tail()}", file=sys.stderr)
            return 1
    except KeyboardInterrupt:
        return 0
    except TritonError as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
