"""Recovery after a Triton kill, measured alone (the soak measures it among other faults): the soak's
mesh and load (Embed, Classify, Generate when the chat model is built), Triton SIGKILLed a few times
(MAAS_RECOVERY_KILLS, default 2), kill → first successful call of each kind. The supervisor restarts
Triton empty; the registry's watchdog loads every live version again (concurrently: MAAS_RELOAD_CONCURRENCY).

    python -m bench recovery
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
import time
from pathlib import Path

from bench.bench_soak import Load, Record, generation_model
from maas.local.mesh import FREE_PORTS, SOURCE_MODELS, LocalMesh, MeshConfig
from maas.local.supervisor import RestartPolicy, Supervisor

KILLS = int(os.environ.get("MAAS_RECOVERY_KILLS", "2"))
WAIT = 180.0  # longest a recovery may take before the bench gives up on it


def first_ok_after(records: list[Record], kind: str, at: float) -> float | None:
    ok = [r.at + r.ms / 1000 for r in list(records) if r.kind == kind and r.code == "OK" and r.at > at]
    return min(ok) - at if ok else None


def main() -> None:
    models = [m for m in SOURCE_MODELS if m.name in ("minilm", "efficientnet_lite0", generation_model())]
    kinds = ["embed", "classify"] + (["generate"] if generation_model() else [])
    records: list[Record] = []
    stop = threading.Event()
    results: list[dict[str, float]] = []
    keep = os.environ.get("MAAS_RECOVERY_STATE_DIR")  # keep the logs there (else a temporary directory)
    with contextlib.nullcontext(keep) if keep else tempfile.TemporaryDirectory(prefix="maas-recovery-") as state:
        with LocalMesh(MeshConfig(state_dir=Path(state), ports=FREE_PORTS, models=models)) as mesh:
            supervisor = Supervisor(mesh, RestartPolicy(max_restarts=KILLS + 2))
            supervisor.start()
            loads = [Load(mesh, kind, records, stop) for kind in kinds]
            for load in loads:
                load.start()
            try:
                for _ in range(KILLS):
                    settle = time.monotonic()
                    while any(first_ok_after(records, kind, settle) is None for kind in kinds):
                        time.sleep(0.2)  # every kind serving before the kill
                    time.sleep(2.0)
                    at = time.monotonic()
                    os.killpg(mesh.triton.process.pid, signal.SIGKILL)
                    recovered: dict[str, float] = {}
                    while len(recovered) < len(kinds) and time.monotonic() - at < WAIT:
                        time.sleep(0.2)
                        for kind in kinds:
                            took = first_ok_after(records, kind, at)
                            if took is not None:
                                recovered.setdefault(kind, took)
                    results.append(recovered)
                    print(
                        "recovery after a Triton kill: "
                        + ", ".join(f"{k} {recovered.get(k, float('inf')):.1f}s" for k in kinds),
                        flush=True,
                    )
            finally:
                stop.set()
                for load in loads:
                    load.join(timeout=15)
                supervisor.stop()
    worst = {kind: max(r.get(kind, float("inf")) for r in results) for kind in kinds}
    for kind in kinds:
        print(f"recovery {kind}: worst {worst[kind]:.1f}s of {len(results)} kills")
    # The definition: kill → first successful Classify.
    print(f"BENCH recovery_after_triton_kill_s {worst['classify']:.1f} <= 15")


if __name__ == "__main__":
    main()
