"""Self-healing for the local mesh, the way a kubelet treats a pod's containers.

A component that exits is started again on the same address after a back-off (doubling from
`initial_backoff` to `max_backoff`, reset once it has run for `healthy_after` seconds); the others keep
serving meanwhile. A component that crashes `max_restarts` times within `window` seconds is given up on,
with the reason, and `maas up` stops with that message (CrashLoopBackOff would go on forever; locally a
person is there to read why).

A component that reads files at start only (Triton and its TLS certificate, key and CA: it has no reload)
is restarted when one of them changes, the way a renewal reaches it: once the files have stayed the same
for one poll (a renewal writes the key, then the certificate) and the key matches the certificate (a
half-done renewal waits). The other services re-read their certificates by themselves (services/shared/tls.py).

After a Triton restart the registry's watchdog re-applies every live version (the local mesh runs it
every `MeshConfig.reconcile_interval` seconds), and the router and registry reconnect by themselves.
The state is written to <state_dir>/status.json after every change, which `maas status` prints.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from services.shared.tls import TlsFileError, certificate_info


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    healthy_after: float = 60.0  # a run this long resets the back-off and the crash count
    max_restarts: int = 5
    window: float = 300.0
    poll_interval: float = 0.5


@dataclass
class ComponentStatus:
    alive: bool = True
    restarts: int = 0
    last_exit: str = ""  # "exit code 1", "signal 9"
    last_restart: float = 0.0  # time.time() of the last restart
    gave_up: str = ""  # why it is no longer restarted
    crashes: list[float] = field(default_factory=list)  # monotonic times of recent crashes
    started: float = field(default_factory=time.monotonic)
    backoff: float = 0.0


class Supervisor(threading.Thread):
    """Watches `mesh.alive()` and restarts what died; `failed` is set once a component is given up on."""

    def __init__(self, mesh, policy: RestartPolicy | None = None, log: Callable[[str], None] | None = None):
        super().__init__(name="maas-supervisor", daemon=True)
        self.mesh, self.policy = mesh, policy or RestartPolicy()
        self.log = log or (lambda message: None)
        self.status: dict[str, ComponentStatus] = {name: ComponentStatus() for name in mesh.alive()}
        self.failed = threading.Event()
        self._stopping = threading.Event()
        self.status_path = Path(mesh.state_dir) / "status.json"
        # Components restarted when files they read at start only change: name -> (cert, key, CA).
        self.watched: dict[str, tuple[Path, ...]] = dict(getattr(mesh, "start_only_files", dict)())
        self._stamps = {name: _stamp(files) for name, files in self.watched.items()}  # as last (re)started
        self._seen = dict(self._stamps)  # as seen at the previous poll
        self._unusable: dict[str, tuple] = {}  # the files' stamp last found unusable (logged once)
        self._write()

    def stop(self) -> None:
        self._stopping.set()
        if self.is_alive():
            self.join(timeout=60)

    def run(self) -> None:
        while not self._stopping.wait(self.policy.poll_interval):
            for name, alive in self.mesh.alive().items():
                state = self.status.setdefault(name, ComponentStatus())
                if alive:
                    if not state.alive:
                        state.alive = True
                        self._write()
                    if time.monotonic() - state.started > self.policy.healthy_after:
                        state.backoff, state.crashes = 0.0, []
                    if name in self.watched and not self._stopping.is_set():
                        self._check_files(name, state)
                    continue
                if state.gave_up or self._stopping.is_set():
                    continue
                self._crashed(name, state)

    def _check_files(self, name: str, state: ComponentStatus) -> None:
        files = self.watched[name]
        stamp = _stamp(files)
        previous, self._seen[name] = self._seen[name], stamp
        if stamp == self._stamps[name] or stamp != previous:
            return  # unchanged, or still changing: look again at the next poll
        try:
            certificate_info(Path(files[0]).read_bytes(), Path(files[1]).read_bytes())
        except (OSError, TlsFileError) as exc:
            if self._unusable.get(name) != stamp:
                self._unusable[name] = stamp
                self.log(f"{name}: its certificate files changed but are not usable yet ({exc}); waiting")
            return
        self._stamps[name] = stamp
        self.log(f"{name}'s certificate files changed; restarting it (it reads them at start only)")
        try:
            self.mesh.revive(name)
        except Exception as exc:  # noqa: BLE001 - not running now: the crash handling takes it from here
            state.last_exit = f"restart failed: {exc}"
            self.log(f"{name}: {state.last_exit}")
        else:
            state.last_exit = "restarted: certificate files changed"
        state.restarts += 1
        state.last_restart = time.time()
        state.started = time.monotonic()
        self._write()

    def _crashed(self, name: str, state: ComponentStatus) -> None:
        policy, now = self.policy, time.monotonic()
        state.alive = False
        state.last_exit = self.mesh.exit_reason(name)
        state.crashes = [t for t in state.crashes if now - t < policy.window] + [now]
        if len(state.crashes) > policy.max_restarts:
            state.gave_up = (
                f"{name} crashed {len(state.crashes)} times in {policy.window:.0f}s "
                f"(last: {state.last_exit}); not restarting it. Last log lines:\n{self.mesh.log_tail(name)}"
            )
            self.log(state.gave_up)
            self._write()
            self.failed.set()
            return
        state.backoff = min(policy.max_backoff, state.backoff * 2 if state.backoff else policy.initial_backoff)
        self.log(
            f"{name} stopped ({state.last_exit}); restarting in {state.backoff:.1f}s (restart {state.restarts + 1})"
        )
        self._write()
        if self._stopping.wait(state.backoff):
            return
        try:
            self.mesh.revive(name)
        except Exception as exc:  # noqa: BLE001 - a failed start counts as one more crash, next round
            state.last_exit = f"restart failed: {exc}"
            self.log(f"{name}: {state.last_exit}")
        state.restarts += 1
        state.last_restart = time.time()
        state.started = time.monotonic()
        self._write()

    def _write(self) -> None:
        rows = {
            name: {
                k: v for k, v in asdict(s).items() if k in ("alive", "restarts", "last_exit", "last_restart", "gave_up")
            }
            for name, s in self.status.items()
        }
        temp = self.status_path.with_suffix(".tmp")
        temp.write_text(json.dumps({"updated": time.time(), "components": rows}, indent=1))
        temp.replace(self.status_path)


def _stamp(files: tuple[Path, ...]) -> tuple:
    """What tells a file changed: mtime, size and inode (a Secret update swaps a symlink: a new inode)."""
    out = []
    for path in files:
        try:
            st = os.stat(path)
            out.append((st.st_mtime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def read_status(state_dir: Path) -> dict:
    """What the supervisor of the mesh using `state_dir` last wrote ({} when none ran there)."""
    try:
        return json.loads((Path(state_dir) / "status.json").read_text())
    except (OSError, ValueError):
        return {}
