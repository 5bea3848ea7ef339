"""Soak: mixed Embed / Classify / Generate load on a self-healing local mesh for a while (10 minutes by
default, MAAS_SOAK_SECONDS to change), with a fault injected every minute (kill a component, kill
Triton, SIGSTOP a peer for a few seconds). Reports errors by code, p99 per call, recovery times and
the RSS growth of every process.

An error counts as expected when it falls in a fault's window: from the injection until every call
kind has succeeded again, plus a short grace. Anything else is `soak_unexpected_errors`.

    make soak            # or: python -m bench soak
"""

from __future__ import annotations

import os
import signal
import statistics
import tempfile
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import psutil

from maas.cli.mesh import cat_photo
from maas.local.mesh import FREE_PORTS, SOURCE_MODELS, LocalMesh, MeshConfig
from maas.local.supervisor import RestartPolicy, Supervisor
from maas.v1 import router_pb2, router_pb2_grpc, tensor_pb2

SECONDS = float(os.environ.get("MAAS_SOAK_SECONDS", "600"))
FAULT_EVERY = float(os.environ.get("MAAS_SOAK_FAULT_EVERY", "60"))
GRACE = 2.0  # after recovery, errors still count as the fault's
CALL_TIMEOUT = 10.0
# (what, component): cycled through, one per FAULT_EVERY.
FAULTS = [("kill", "tokenizer"), ("kill", "triton"), ("stop", "vision"), ("kill", "router"), ("kill", "registry")]
STOP_SECONDS = 5.0


@dataclass
class Record:
    at: float
    kind: str
    code: str
    ms: float


@dataclass
class Fault:
    at: float
    what: str
    component: str
    recovered: dict[str, float] = field(default_factory=dict)  # call kind -> first success after


def generation_model() -> str | None:
    return next((m.name for m in SOURCE_MODELS if m.name == "smollm2"), None)


class Load(threading.Thread):
    def __init__(self, mesh: LocalMesh, kind: str, records: list, stop: threading.Event):
        super().__init__(daemon=True, name=f"soak-{kind}")
        self.mesh, self.kind, self.records, self.stopping = mesh, kind, records, stop
        self.examples: dict[str, str] = {}  # code -> the first message seen with it

    def run(self) -> None:
        channel = grpc.insecure_channel(self.mesh.router_address)
        stub = router_pb2_grpc.RouterStub(channel)
        image = cat_photo()
        calls = {
            "embed": lambda: stub.Embed(
                router_pb2.EmbedRequest(model=tensor_pb2.ModelRef(name="minilm"), texts=["soak test sentence"]),
                timeout=CALL_TIMEOUT,
            ),
            "classify": lambda: stub.Classify(
                router_pb2.ClassifyRequest(model=tensor_pb2.ModelRef(name="efficientnet_lite0"), images=[image]),
                timeout=CALL_TIMEOUT,
            ),
            "generate": lambda: stub.GenerateUnary(
                router_pb2.GenerateRequest(
                    model=tensor_pb2.ModelRef(name=generation_model() or ""),
                    prompt="Hello, my name is",
                    sampling=router_pb2.SamplingParams(max_tokens=8),
                ),
                timeout=CALL_TIMEOUT,
            ),
        }
        call = calls[self.kind]
        while not self.stopping.is_set():
            t0 = time.monotonic()
            try:
                call()
                code = "OK"
            except grpc.RpcError as err:
                code = err.code().name
                self.examples.setdefault(code, err.details())
            self.records.append(Record(t0, self.kind, code, (time.monotonic() - t0) * 1000))
            if code != "OK":
                time.sleep(0.1)  # a client backs off a little on errors
        channel.close()


RSS_PARTS = ("RssAnon", "RssFile", "RssShmem")  # /proc/<pid>/status: RSS = their sum


def rss_parts(pid: int) -> tuple[int, ...] | None:
    """(RSS, anonymous, file-backed, shared-memory) bytes of a process, from /proc/<pid>/status; None for
    a zombie (killed by a fault, not yet reaped: no memory lines)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    if not all(k in fields for k in RSS_PARTS):
        return None
    parts = tuple(int(fields[k].split()[0]) * 1024 for k in RSS_PARTS)
    return (sum(parts), *parts)


class RssSampler(threading.Thread):
    """Every few seconds: RSS of every process of the mesh (tritonserver, stubs, services) by pid, with
    its anonymous / file-backed / shared-memory parts."""

    def __init__(self, root_pid: int, stop: threading.Event):
        super().__init__(daemon=True, name="soak-rss")
        self.root, self.stopping = psutil.Process(root_pid), stop
        self.samples: dict[tuple[int, str], list[tuple[float, tuple[int, ...]]]] = defaultdict(list)

    def run(self) -> None:
        while not self.stopping.wait(5):
            for proc in self.root.children(recursive=True):
                try:
                    name = " ".join(proc.cmdline()[:3])[-60:]
                    parts = rss_parts(proc.pid)
                except (psutil.Error, OSError):
                    continue
                if parts is not None:
                    self.samples[(proc.pid, name)].append((time.monotonic(), parts))

    def growth(
        self, settle: float = 60.0, window: float = 20.0, min_span: float = 60.0
    ) -> dict[str, tuple[float, tuple[float, ...], tuple[float, ...], float]]:
        """Per process: (% growth of its RSS from its baseline to the end of its life, baseline MiB, end
        MiB, peak MiB after the baseline), baseline and end as (RSS, anonymous, file-backed, shared
        memory).

        The baseline is taken `settle` s after the process's first sample, past its warm-up (allocator
        arenas, gRPC buffers, a Triton stub warming larger batches on a thread after READY: the
        efficientnet stub doubles in its first ~30 s), and a process needs `min_span` s after it to be
        judged (a restart late in the run is left out). Baseline and end are medians over `window` s, so
        one sample in the middle of a fault's transient (the router's RSS spikes ~20 % while Triton is
        down and drops back) is not the figure."""
        found = {}
        for (pid, name), samples in self.samples.items():
            start, end = samples[0][0], samples[-1][0]
            base_at = start + settle
            if end - base_at < min_span:
                continue
            base = _medians([parts for t, parts in samples if base_at <= t <= base_at + window])
            last = _medians([parts for t, parts in samples if t >= end - window])
            peak = max(parts[0] for t, parts in samples if t >= base_at) / 2**20
            found[f"{pid} {name}"] = ((last[0] / base[0] - 1) * 100, base, last, peak)
        return found


def _medians(samples: list[tuple[int, ...]]) -> tuple[float, ...]:
    """Median of each part over the samples, in MiB."""
    return tuple(statistics.median(part) / 2**20 for part in zip(*samples, strict=True))


def inject(mesh: LocalMesh, fault: Fault) -> None:
    proc = mesh.triton.process if fault.component == "triton" else mesh.processes[fault.component]
    if fault.what == "kill":
        os.killpg(proc.pid, signal.SIGKILL)
        return
    os.killpg(proc.pid, signal.SIGSTOP)
    time.sleep(STOP_SECONDS)
    os.killpg(proc.pid, signal.SIGCONT)


def main() -> None:
    models = [m for m in SOURCE_MODELS if m.name in ("minilm", "efficientnet_lite0", generation_model())]
    kinds = ["embed", "classify"] + (["generate"] if generation_model() else [])
    records: list[Record] = []
    faults: list[Fault] = []
    stop = threading.Event()
    with tempfile.TemporaryDirectory(prefix="maas-soak-") as state:
        with LocalMesh(MeshConfig(state_dir=Path(state), ports=FREE_PORTS, models=models)) as mesh:
            supervisor = Supervisor(mesh, RestartPolicy(max_restarts=20))
            supervisor.start()
            sampler = RssSampler(os.getpid(), stop)
            sampler.start()
            loads = [Load(mesh, kind, records, stop) for kind in kinds]
            for load in loads:
                load.start()
            t0 = time.monotonic()
            next_fault = t0 + FAULT_EVERY
            try:
                while time.monotonic() - t0 < SECONDS:
                    time.sleep(0.5)
                    if time.monotonic() >= next_fault and time.monotonic() - t0 < SECONDS - 20:
                        what, component = FAULTS[len(faults) % len(FAULTS)]
                        fault = Fault(time.monotonic(), what, component)
                        faults.append(fault)
                        print(f"soak t={fault.at - t0:.0f}s: {what} {component}", flush=True)
                        inject(mesh, fault)
                        next_fault += FAULT_EVERY
            finally:
                stop.set()
                for load in loads:
                    load.join(timeout=CALL_TIMEOUT + 5)
                supervisor.stop()
    for load in loads:
        for code, message in load.examples.items():
            print(f"soak {load.kind} {code} e.g.: {message[:200]}")
    report(records, faults, kinds, sampler, t0)
    if os.environ.get("MAAS_SOAK_RSS_DUMP"):  # every RSS sample, for a closer look (json)
        import json

        Path(os.environ["MAAS_SOAK_RSS_DUMP"]).write_text(
            json.dumps(
                {
                    f"{pid} {name}": [(round(t - t0, 1), rss) for t, rss in samples]
                    for (pid, name), samples in sampler.samples.items()
                }
            )
        )


def report(records: list[Record], faults: list[Fault], kinds: list[str], sampler: RssSampler, t0: float) -> None:
    for fault in faults:
        for kind in kinds:
            ok = [r.at for r in records if r.kind == kind and r.code == "OK" and r.at > fault.at]
            fault.recovered[kind] = (min(ok) - fault.at) if ok else float("inf")
    windows = [(f.at, f.at + max(f.recovered.values()) + GRACE) for f in faults]
    errors = [r for r in records if r.code != "OK"]
    # A call counts as the fault's when it overlaps the window (one in flight at the injection, too).
    unexpected = [r for r in errors if not any(r.at <= b and r.at + r.ms / 1000 >= a for a, b in windows)]
    print(
        f"soak: {len(records)} calls over {SECONDS:.0f}s, {len(faults)} faults; errors by code "
        f"{dict(Counter((r.kind, r.code) for r in errors))}; outside fault windows "
        f"{dict(Counter((r.kind, r.code, round(r.at - t0)) for r in unexpected))}"
    )
    for kind in kinds:
        ok = [r.ms for r in records if r.kind == kind and r.code == "OK"]
        if ok:
            print(f"soak {kind}: {len(ok)} ok, p50 {statistics.median(ok):.1f} ms, p99 {np.percentile(ok, 99):.1f} ms")
    for fault in faults:
        print(
            f"soak fault {fault.what} {fault.component} at {fault.at - t0:.0f}s: recovered "
            + ", ".join(f"{k} {v:.1f}s" for k, v in fault.recovered.items())
        )
    growth = sampler.growth()
    print(
        "soak rss growth of each process from its baseline, 60 s after its first sample (its warm-up under "
        "this load; a restarted process from its own), to its end, medians over 20 s; peak = highest sample "
        "after the baseline (fault transients):"
    )
    for name, (pct, base, last, peak) in sorted(growth.items(), key=lambda kv: -kv[1][0]):
        parts = ", ".join(
            f"{k[3:].lower()} {b:.0f} -> {e:.0f}" for k, b, e in zip(RSS_PARTS, base[1:], last[1:], strict=True)
        )
        print(f"soak rss {pct:+.1f}% {base[0]:.0f} -> {last[0]:.0f} MiB, peak {peak:.0f} ({parts}) {name}")
    growth_pct = {name: pct for name, (pct, *_) in growth.items()}
    # Per fault kind (what + component), per call kind: the worst of that fault's injections. A fault
    # is not "recovered" by the slowest call kind of all: killing Triton costs Classify a model reload,
    # Generate the chat model's (far longer); each is its own figure.
    by_kind: dict[tuple[str, str], dict[str, float]] = defaultdict(dict)
    for fault in faults:
        worst = by_kind[(fault.what, fault.component)]
        for kind, seconds in fault.recovered.items():
            worst[kind] = max(worst.get(kind, 0.0), seconds)
    for (what, component), worst in by_kind.items():
        for kind, seconds in worst.items():
            print(f"BENCH soak_recovery_s_{what}_{component}_{kind} {seconds:.1f} >= 0")
    # The figure: Triton killed -> the first successful Classify.
    triton = [f.recovered["classify"] for f in faults if f.component == "triton" and "classify" in f.recovered]
    print(f"BENCH soak_rss_growth_pct_max {max(growth_pct.values(), default=0.0):.1f} <= 5")
    print(f"BENCH soak_unexpected_errors {len(unexpected)} <= 0")
    if triton:
        print(f"BENCH recovery_after_triton_kill_s {max(triton):.1f} <= 15")


if __name__ == "__main__":
    main()
