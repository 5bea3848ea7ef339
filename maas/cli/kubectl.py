"""`kubectl maas ...`: the `maas models` commands, reaching the registry of a MaaS Mesh release in a cluster.

kubectl runs any `kubectl-<name>` executable on PATH as `kubectl <name>`; this one is the `kubectl-maas`
console script. Unless a registry address is given (`--registry` / MAAS_REGISTRY_ADDRESS, e.g. a local
mesh from `maas up`), it runs `kubectl port-forward svc/<registry Service> :50052` for the duration of
the command and points the command at the local end:

    kubectl maas -n models models list
    kubectl maas -n models --release prod models alias embedder production 3
    kubectl maas models list --registry 127.0.0.1:50052
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Optional

import click
import rich.markup
import typer
from typer.core import TyperGroup

from maas import ports
from maas.cli import models, tenants
from maas.local.processes import spawn

REGISTRY_PORT = ports.REGISTRY
ADDRESS_ENV = "MAAS_REGISTRY_ADDRESS"
REGISTRY_SELECTOR = "app.kubernetes.io/part-of=maas-mesh,app.kubernetes.io/component=registry"
_FORWARDING = re.compile(r"Forwarding from 127\.0\.0\.1:(\d+) ->")
_REST = "maas.kubectl.rest"


class PluginError(Exception):
    """Reaching the cluster failed; printed as one `error:` line, exit code 1."""


@dataclass(frozen=True)
class Cluster:
    """Where the release lives; the flags are handed to every kubectl call."""

    kubectl: str = "kubectl"
    namespace: str | None = None
    context: str | None = None
    kubeconfig: str | None = None

    def command(self, *args: str) -> list[str]:
        cmd = [self.kubectl, *args]
        for flag, value in (
            ("--namespace", self.namespace),
            ("--context", self.context),
            ("--kubeconfig", self.kubeconfig),
        ):
            if value:
                cmd += [flag, value]
        return cmd

    def where(self) -> str:
        return f"namespace {self.namespace!r}" if self.namespace else "the current namespace"


def registry_service(cluster: Cluster, release: str | None, service: str | None) -> str:
    """The registry Service: named by --service, derived from --release, or the only one found."""
    if service:
        return service
    if release:
        return f"{release}-maas-mesh-registry"
    argv = cluster.command("get", "services", "-l", REGISTRY_SELECTOR, "-o", "name")
    try:
        found = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise PluginError(f"`{' '.join(argv)}` failed: {exc}") from None
    if found.returncode != 0:
        raise PluginError(f"could not list Services ({found.stderr.strip()}); name the release with --release")
    names = [line.removeprefix("service/") for line in found.stdout.split()]
    if len(names) != 1:
        what = f"several MaaS Mesh registries ({', '.join(names)})" if names else "no MaaS Mesh registry Service"
        raise PluginError(f"{what} in {cluster.where()}; pick one with --release or --service")
    return names[0]


class PortForward:
    """`kubectl port-forward svc/<service> :<port>` on a free local port; stop() always ends it."""

    def __init__(self, cluster: Cluster, service: str, port: int = REGISTRY_PORT, timeout: float = 30.0):
        self.argv = cluster.command("port-forward", f"svc/{service}", f":{port}", "--address", "127.0.0.1")
        self.timeout = timeout
        self.process: subprocess.Popen | None = None
        self.local_port: int | None = None
        self._stderr: list[str] = []

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.local_port}"

    def start(self) -> "PortForward":
        try:
            # Dies with this process, even on SIGKILL: no port-forward is left running.
            self.process = spawn(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=False,
            )
        except OSError as exc:
            raise PluginError(f"could not run {self.argv[0]!r}: {exc}") from None
        lines: queue.Queue[str | None] = queue.Queue()
        # Both pipes are drained for the whole run: kubectl logs every connection and must never block.
        threading.Thread(target=_pump, args=(self.process.stdout, lines.put, lines.put), daemon=True).start()
        stderr_pump = threading.Thread(target=_pump, args=(self.process.stderr, self._stderr.append), daemon=True)
        stderr_pump.start()
        try:
            while True:
                try:
                    line = lines.get(timeout=self.timeout)
                except queue.Empty:
                    raise PluginError(f"`{' '.join(self.argv)}` printed no local port in {self.timeout:.0f}s") from None
                if line is None:  # stdout closed: kubectl exited
                    self.process.wait(5)
                    stderr_pump.join(5)
                    detail = "".join(self._stderr).strip() or f"exit code {self.process.returncode}"
                    raise PluginError(f"`{' '.join(self.argv)}` failed: {detail}")
                match = _FORWARDING.search(line)
                if match:
                    self.local_port = int(match.group(1))
                    return self
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _pump(stream, sink, at_end=None) -> None:
    for line in stream:
        sink(line)
    stream.close()
    if at_end is not None:
        at_end(None)


# -- the command line --------------------------------------------------------------------------------
class _PluginGroup(TyperGroup):
    def invoke(self, ctx: click.Context):
        # Click empties the remaining arguments before the group callback runs; keep them so the callback
        # can tell whether the subcommand needs the registry at all (not for --help) or names it itself.
        protected = getattr(ctx, "_protected_args", None)
        if protected is None:  # click < 8.2
            protected = ctx.protected_args
        ctx.meta[_REST] = [*protected, *ctx.args]
        return super().invoke(ctx)


app = typer.Typer(
    cls=_PluginGroup,
    name="kubectl maas",
    no_args_is_help=True,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="MaaS Mesh in a Kubernetes cluster: the `maas models`, `maas tenants` and `maas audit` commands against "
    "a release's registry.",
)
app.add_typer(models.app, name="models", help="Register, list and route model versions (the registry).")
tenants.register(app)  # `kubectl maas tenants …`, `kubectl maas audit`


def needs_registry(root: click.Group, ctx: click.Context, rest: Sequence[str]) -> bool:
    """Does `rest` run a command that talks to the registry, without naming it (--registry) itself?"""
    command: click.Command | None = root
    args = list(rest)
    while isinstance(command, click.Group):
        if not args or args[0].startswith("-"):
            return False  # a group's own help
        command, args = command.get_command(ctx, args[0]), args[1:]
    if command is None:
        return False  # unknown command: let click say so
    helps = set(ctx.help_option_names)
    if any(a in helps for a in args):
        return False
    return not any(a == "--registry" or a.startswith("--registry=") for a in args)


@app.callback()
def plugin(
    ctx: typer.Context,
    namespace: Annotated[
        Optional[str],
        typer.Option("--namespace", "-n", help="namespace of the release (default: the context's)", show_default=False),
    ] = None,
    release: Annotated[
        Optional[str],
        typer.Option(
            "--release",
            envvar="MAAS_RELEASE",
            show_default=False,
            help="Helm release name: the registry is Service <release>-maas-mesh-registry (default: the only "
            "MaaS Mesh registry in the namespace)",
        ),
    ] = None,
    service: Annotated[
        Optional[str],
        typer.Option("--service", show_default=False, help="registry Service name (with fullnameOverride)"),
    ] = None,
    context: Annotated[Optional[str], typer.Option("--context", help="kubeconfig context", show_default=False)] = None,
    kubeconfig: Annotated[
        Optional[str], typer.Option("--kubeconfig", help="kubeconfig file", show_default=False)
    ] = None,
    registry: Annotated[
        Optional[str],
        typer.Option(
            "--registry",
            envvar=ADDRESS_ENV,
            show_default=False,
            help="registry host:port; skips the port-forward (e.g. a local mesh from `maas up`)",
        ),
    ] = None,
    port: Annotated[int, typer.Option("--registry-port", help="registry Service port")] = REGISTRY_PORT,
    timeout: Annotated[
        float, typer.Option("--port-forward-timeout", help="seconds to wait for the port-forward")
    ] = 30.0,
) -> None:
    """Global options go before the command: `kubectl maas -n NS [--release R] models list`."""
    if registry:
        os.environ[ADDRESS_ENV] = registry
        return
    if ctx.resilient_parsing or not needs_registry(ctx.command, ctx, ctx.meta.get(_REST, [])):
        return
    try:
        kubectl = os.environ.get("MAAS_KUBECTL") or shutil.which("kubectl")
        if not kubectl:
            raise PluginError("kubectl is not on PATH (set MAAS_KUBECTL, or pass --registry)")
        cluster = Cluster(kubectl, namespace, context, kubeconfig)
        forward = PortForward(cluster, registry_service(cluster, release, service), port, timeout)
        ctx.call_on_close(forward.stop)  # runs when the command ends, also on errors and Ctrl-C
        forward.start()
    except PluginError as exc:
        models.err.print(f"[red]error:[/red] {rich.markup.escape(str(exc))}", soft_wrap=True)
        raise typer.Exit(1) from None
    os.environ[ADDRESS_ENV] = forward.address


def main(argv: Sequence[str] | None = None) -> None:
    # SIGTERM (e.g. from a CI timeout) unwinds like Ctrl-C, so the port-forward is stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    app(args=None if argv is None else list(argv), prog_name="kubectl maas")
