"""Child processes of the local runtime: free ports, and children that die with us.

Every local component (Triton, the services, a kubectl port-forward) is started through spawn() so a
crashed test run or a SIGKILLed `maas up` leaves nothing behind.
"""

from __future__ import annotations

import ctypes
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_with_parent() -> None:
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def spawn(command: Sequence[str], **popen_kwargs) -> subprocess.Popen:
    """Popen in a new session (stop() can signal the whole group) whose child gets SIGKILL when we die.

    PDEATHSIG follows the starting *thread*, so it is only set from the main thread (a finished worker
    thread would otherwise take the child down). setpriv sets it without a Python preexec_fn: such a
    fork runs grpcio's at-fork hooks in the child, which abort it when a gRPC server runs in this process.
    """
    command, preexec = list(command), None
    if sys.platform.startswith("linux") and threading.current_thread() is threading.main_thread():
        setpriv = shutil.which("setpriv")
        if setpriv:
            command = [setpriv, "--pdeathsig", "KILL", "--", *command]
        else:
            preexec = _kill_with_parent
    popen_kwargs.setdefault("start_new_session", True)
    return subprocess.Popen(command, preexec_fn=preexec, **popen_kwargs)
