"""`maas up|demo|embed|classify`: run the mesh locally and call it through the router (and its OpenAI gateway)."""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from maas import ports
from maas.client import DEFAULT_ADDRESS, MeshClient, MeshError, Routed

console = Console()
err_console = Console(stderr=True)

DEMO_SENTENCES = ("A cat sits on the warm windowsill.", "A kitten is sleeping in the sun by the window.")
DEMO_CHAT = "In one sentence: why do cats like warm windowsills?"
DEMO_CHAT_MODEL = "smollm2"
DEMO_CHAT_TOKENS = 48
CANARY_PERCENT = 10
CANARY_REQUESTS = 200


class StepFailed(Exception):
    pass


def routed_text(r: Routed) -> str:
    why = f"{r.kind.replace('_', ' ')}" + (f" → {r.target}" if r.target else "")
    return f"{r.model} v{r.version} ({why}{', shadowed' if r.shadowed else ''})"


def fail(message: str) -> None:
    err_console.print(f"[bold red]error:[/] {message}")
    raise typer.Exit(1)


# -- maas embed / classify ----------------------------------------------------------------------------
RouterOpt = typer.Option(DEFAULT_ADDRESS, "--router", envvar="MAAS_ROUTER_ADDRESS", help="router host:port")
VersionOpt = typer.Option(None, "--version", "-v", help="a specific version number")
AliasOpt = typer.Option(None, "--alias", "-a", help="an alias, e.g. canary")
KeyOpt = typer.Option(None, "--routing-key", "-k", help="sticky routing key (same key → same version)")
JsonOpt = typer.Option(False, "--json", help="machine-readable output")
TimeoutOpt = typer.Option(30.0, "--timeout", help="deadline in seconds")


def embed(
    texts: list[str] = typer.Argument(..., help="texts to embed"),
    model: str = typer.Option("minilm", "--model", "-m"),
    version: Optional[int] = VersionOpt,
    alias: Optional[str] = AliasOpt,
    routing_key: Optional[str] = KeyOpt,
    router: str = RouterOpt,
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Embed texts through the router."""
    try:
        with MeshClient(router, timeout=timeout) as client:
            result = client.embed(texts, model, version=version, alias=alias, routing_key=routing_key)
    except (MeshError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        print(
            json.dumps(
                {"embeddings": result.vectors.tolist(), "truncated": result.truncated, "routed": result.routed.__dict__}
            )
        )
        return
    table = Table(title=f"{len(texts)} embedding(s), {result.vectors.shape[1]} dimensions")
    for column in ("text", "first values", "norm", "truncated"):
        table.add_column(column)
    for text, vector, cut in zip(texts, result.vectors, result.truncated):
        table.add_row(
            text[:60],
            " ".join(f"{x:+.3f}" for x in vector[:4]) + " …",
            f"{np.linalg.norm(vector):.3f}",
            "yes" if cut else "",
        )
    console.print(table)
    console.print(f"answered by {routed_text(result.routed)}")


def classify(
    images: list[Path] = typer.Argument(..., exists=True, dir_okay=False, help="image files"),
    model: str = typer.Option("efficientnet_lite0", "--model", "-m"),
    top_k: int = typer.Option(5, "--top-k"),
    version: Optional[int] = VersionOpt,
    alias: Optional[str] = AliasOpt,
    routing_key: Optional[str] = KeyOpt,
    router: str = RouterOpt,
    as_json: bool = JsonOpt,
    timeout: float = TimeoutOpt,
) -> None:
    """Classify images through the router."""
    try:
        with MeshClient(router, timeout=timeout) as client:
            result = client.classify(images, model, top_k=top_k, version=version, alias=alias, routing_key=routing_key)
    except (MeshError, ValueError) as exc:
        fail(str(exc))
    if as_json:
        print(
            json.dumps(
                {
                    "results": [
                        {"image": str(path), "classes": [c.__dict__ for c in classes]}
                        for path, classes in zip(images, result.results)
                    ],
                    "routed": result.routed.__dict__,
                }
            )
        )
        return
    for path, classes in zip(images, result.results):
        table = Table(title=str(path))
        for column in ("#", "class", "label", "score"):
            table.add_column(column)
        for rank, c in enumerate(classes, 1):
            table.add_row(str(rank), str(c.index), c.label, f"{c.score:.3f}")
        console.print(table)
    console.print(f"answered by {routed_text(result.routed)}")


# -- demo steps (shared by `maas demo` and `maas up --demo`) ---------------------------------------------
def cat_photo() -> bytes:
    """scikit-image's Chelsea the cat, as a JPEG."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@contextmanager
def step(title: str, summary: dict):
    console.print(f"[bold cyan]▶ {title}[/]")
    started = time.perf_counter()
    try:
        yield
    except Exception as exc:  # noqa: BLE001 - every failure (MeshError, RegistryError...) ends the demo with its message
        raise StepFailed(f"{title}: {exc}") from None
    summary.setdefault("steps", []).append({"step": title, "seconds": round(time.perf_counter() - started, 3)})


def demo_requests(client: MeshClient, summary: dict) -> None:
    with step("Embed two sentences through the router", summary):
        result = client.embed(list(DEMO_SENTENCES), "minilm")
        cosine = float(result.vectors[0] @ result.vectors[1])
        for text in DEMO_SENTENCES:
            console.print(f"  • {text}")
        console.print(
            f"  {result.vectors.shape[1]}-dimensional vectors, cosine similarity [bold]{cosine:.3f}[/] — "
            f"{routed_text(result.routed)}"
        )
        summary["embed"] = {
            "cosine": cosine,
            "dimensions": int(result.vectors.shape[1]),
            "version": result.routed.version,
        }
    with step("Classify the cat photo (scikit-image's chelsea)", summary):
        classified = client.classify([cat_photo()], "efficientnet_lite0", top_k=3)
        for c in classified.results[0]:
            console.print(f"  {c.score:6.1%}  {c.label} (class {c.index})")
        console.print(f"  {routed_text(classified.routed)}")
        top = classified.results[0][0]
        if "cat" not in top.label:
            raise StepFailed(f"expected a cat, got {top.label!r}")
        summary["classify"] = {"top1": top.label, "score": top.score, "version": classified.routed.version}


def openai_chat(base_url: str, body: dict, timeout: float = 120.0) -> dict:
    """POST /v1/chat/completions with the standard library (what any OpenAI client sends). HTTPS
    trusts MAAS_TLS_ROOT_CERT when set (the CA of `maas up --tls`)."""
    import ssl
    import urllib.request

    request = urllib.request.Request(
        f"{base_url}/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    cafile = os.environ.get("MAAS_TLS_ROOT_CERT")
    context = ssl.create_default_context(cafile=cafile) if base_url.startswith("https") and cafile else None
    with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
        return json.load(response)


def demo_chat(client: MeshClient, openai_url: str, summary: dict) -> None:
    with step(f"Chat with {DEMO_CHAT_MODEL} through the router (streamed, greedy)", summary):
        console.print(f"  [bold]you:[/] {DEMO_CHAT}")
        console.print("  [bold]model:[/] ", end="")
        with client.chat(
            DEMO_CHAT, DEMO_CHAT_MODEL, stream=True, max_tokens=DEMO_CHAT_TOKENS, temperature=0.0
        ) as stream:
            for piece in stream:
                console.print(piece.text, end="", markup=False, highlight=False)
        console.print()
        console.print(
            f"  {stream.usage.completion_tokens} tokens, finish {stream.finish_reason} — {routed_text(stream.routed)}"
        )
        if not stream.text.strip():
            raise StepFailed("the chat model answered nothing")
        summary["chat"] = {
            "text": stream.text,
            "finish_reason": stream.finish_reason,
            "completion_tokens": stream.usage.completion_tokens,
            "version": stream.routed.version,
        }
    with step("Ask the same through the OpenAI-compatible gateway", summary):
        answer = openai_chat(
            openai_url,
            {
                "model": DEMO_CHAT_MODEL,
                "max_tokens": DEMO_CHAT_TOKENS,
                "temperature": 0,
                "messages": [{"role": "user", "content": DEMO_CHAT}],
            },
        )
        text = answer["choices"][0]["message"]["content"]
        same = text == summary["chat"]["text"]
        console.print(
            f"  POST {openai_url}/chat/completions → {answer['model']}: "
            f"{'the same answer' if same else 'a different answer: ' + text!r}"
        )
        console.print(f"  from Python: OpenAI(base_url={openai_url!r}, api_key='unused')")
        summary["openai"] = {"base_url": openai_url, "model": answer["model"], "same_as_grpc": same}
        if not same:
            raise StepFailed("greedy answers through HTTP and gRPC differ")


def _wait_route(client: MeshClient, check, what: str, timeout: float = 15.0) -> None:
    """The router follows the registry's Watch stream: wait until it routes as expected."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(client.embed(["probe"], "minilm").routed):
            return
        time.sleep(0.05)
    raise StepFailed(f"the router did not {what} within {timeout:.0f}s")


def demo_rollout(client: MeshClient, registry, source_repository: Path, summary: dict) -> None:
    from maas.registry_client import parse_target

    with step("Register a second minilm version", summary):
        production = registry.get_model("minilm")
        current = next(a.version for a in production.aliases if a.name == "production")
        v2 = registry.register(
            source_repository / "minilm" / "1" / "model.onnx",
            "minilm",
            preprocessing=("tokenizer", "minilm"),
            postprocessing=("embedding", "sentence_embedding"),
            tags={"source": "maas demo"},
            description="canary candidate (maas demo)",
        ).version
        ready = registry.wait_ready("minilm", v2)
        console.print(f"  minilm v{v2} is READY (loaded in {ready.load_ms:.0f} ms); production is v{current}")
        summary["versions"] = {"production": current, "candidate": v2}
    with step(f"Send it {CANARY_PERCENT}% canary traffic", summary):
        registry.set_traffic(
            "minilm",
            [parse_target("production", 100 - CANARY_PERCENT), parse_target(str(v2), CANARY_PERCENT)],
            reason="maas demo canary",
        )
        _wait_route(client, lambda r: r.kind == "traffic_policy", "pick up the canary policy")
        with ThreadPoolExecutor(8) as pool:
            versions = Counter(
                pool.map(lambda i: client.embed([f"request {i}"], "minilm").routed.version, range(CANARY_REQUESTS))
            )
        for version, count in sorted(versions.items()):
            console.print(f"  v{version}: {count:4d} requests ({count / CANARY_REQUESTS:.1%})")
        summary["canary"] = {f"v{v}": n for v, n in sorted(versions.items())}
        if set(versions) != {current, v2}:
            raise StepFailed(f"expected traffic on v{current} and v{v2}, got {dict(versions)}")
    with step(f"Promote v{v2} to production", summary):
        registry.set_alias("minilm", "production", v2, reason="maas demo: canary looked fine")
        registry.set_traffic("minilm", [], reason="maas demo: promoted")
        _wait_route(client, lambda r: r.version == v2 and r.kind == "default", f"route to v{v2}")
        console.print(f"  every request now goes to v{v2}")
    with step("Roll back production", summary):
        alias = registry.rollback("minilm", "production", reason="maas demo rollback")
        _wait_route(client, lambda r: r.version == current, f"route back to v{current}")
        versions = Counter(client.embed(["after rollback"], "minilm").routed.version for _ in range(20))
        if set(versions) != {current}:
            raise StepFailed(f"after the rollback traffic went to {dict(versions)}")
        console.print(f"  production: v{alias.previous_version} → v{alias.version}; 20/20 requests on v{current}")
        summary["rollback"] = {"from": alias.previous_version, "to": alias.version}


# -- maas up / maas demo -------------------------------------------------------------------------------
def _print_addresses(mesh) -> None:
    table = Table(title="MaaS Mesh is up")
    for column in ("component", "address", "log"):
        table.add_column(column)
    for row in mesh.rows():
        table.add_row(*row)
    console.print(table)
    console.print(f"logs in {mesh.log_dir}")


def _print_tls(mesh) -> None:
    tls = mesh.client_tls
    console.print(
        f"TLS on every hop; callers: [bold]maas --tls[/] (or --tls-root-cert {tls.root_cert} --tls-client-cert "
        f"{tls.client_cert} --tls-client-key {tls.client_key}); env MAAS_TLS_ROOT_CERT, MAAS_TLS_CLIENT_CERT, "
        f"MAAS_TLS_CLIENT_KEY; tritonclient: ssl=True, root_certificates={tls.root_cert} "
        f"(+ private_key/certificate_chain when the router requires client certificates)"
    )


@contextmanager
def _running_mesh(config):
    from maas.local.mesh import LocalMesh

    def interrupt(*_):
        raise KeyboardInterrupt

    # SIGTERM behaves like Ctrl-C: leave through the finally below, stopping every component.
    previous = signal.signal(signal.SIGTERM, interrupt)
    mesh = LocalMesh(config, log=lambda message: console.print(f"[dim]{message}[/]"))
    try:
        try:
            with console.status("starting the mesh (Triton + registry + tokenizer + vision + router)…"):
                mesh.start()
        except Exception as exc:  # noqa: BLE001 - MeshStartError, TritonError, RegistryError: all end here
            fail(f"the mesh did not start: {exc}")
        yield mesh
    finally:
        with console.status("stopping the mesh…"):
            mesh.stop()
        signal.signal(signal.SIGTERM, previous)


def _serves_chat(config) -> bool:
    """The demo's chat steps run when the mesh registers the chat model on first start."""
    return any(m.name == DEMO_CHAT_MODEL for m in config.models)


def _ports(free: bool, **ports: int) -> dict[str, int]:
    from maas.local.mesh import FREE_PORTS

    return dict(FREE_PORTS) if free else ports


def up(
    state_dir: Path = typer.Option(
        Path(".maas"), "--state-dir", envvar="MAAS_STATE_DIR", help="registry database, working model repository, logs"
    ),
    model_repository: Path = typer.Option(
        Path("model_repository"),
        "--model-repository",
        envvar="MAAS_MODEL_REPOSITORY",
        help="source models registered on first start",
    ),
    router_port: int = typer.Option(ports.ROUTER, envvar="MAAS_ROUTER_PORT"),
    router_oip_fast_port: int = typer.Option(
        ports.ROUTER_OIP_FAST,
        "--router-oip-fast-port",
        "--router-oip-port",  # its former name
        envvar=["MAAS_ROUTER_OIP_FAST_PORT", "MAAS_ROUTER_OIP_PORT"],
        help="the router's OIP fast path",
    ),
    registry_port: int = typer.Option(ports.REGISTRY, envvar="MAAS_REGISTRY_PORT"),
    tokenizer_port: int = typer.Option(ports.TOKENIZER, envvar="MAAS_TOKENIZER_PORT"),
    vision_port: int = typer.Option(ports.VISION, envvar="MAAS_VISION_PORT"),
    openai_port: int = typer.Option(ports.OPENAI, envvar="MAAS_OPENAI_PORT", help="the OpenAI-compatible HTTP gateway"),
    console_port: int = typer.Option(ports.CONSOLE, envvar="MAAS_CONSOLE_PORT", help="the web console"),
    triton_grpc_port: int = typer.Option(ports.TRITON_GRPC, envvar="MAAS_TRITON_GRPC_PORT"),
    triton_http_port: int = typer.Option(ports.TRITON_HTTP, envvar="MAAS_TRITON_HTTP_PORT"),
    triton_metrics_port: int = typer.Option(ports.TRITON_METRICS, envvar="MAAS_TRITON_METRICS_PORT"),
    free_ports: bool = typer.Option(False, "--free-ports", help="use any free ports instead"),
    demo: bool = typer.Option(False, "--demo", help="run the demo requests once the mesh is up"),
    tls: bool = typer.Option(
        False,
        "--tls",
        help="mTLS on every hop, HTTPS for the gateway and the console: "
        "a local CA and certificates under <state-dir>/tls",
    ),
    tls_client_auth: str = typer.Option(
        "required",
        "--tls-client-auth",
        help="with --tls: whether callers of the router must present a client certificate (required|optional)",
    ),
) -> None:
    """Run the whole mesh locally (Triton + registry + tokenizer + vision + router) until Ctrl-C."""
    from maas.local.mesh import MeshConfig
    from maas.local.supervisor import Supervisor

    config = MeshConfig(
        source_repository=model_repository,
        state_dir=state_dir,
        ports=_ports(
            free_ports,
            router=router_port,
            router_oip_fast=router_oip_fast_port,
            registry=registry_port,
            tokenizer=tokenizer_port,
            vision=vision_port,
            openai=openai_port,
            console=console_port,
            triton_grpc=triton_grpc_port,
            triton_http=triton_http_port,
            triton_metrics=triton_metrics_port,
        ),
        tls=tls,
        tls_client_auth=tls_client_auth,
    )
    if tls_client_auth not in ("required", "optional"):
        fail(f"--tls-client-auth must be required or optional, got {tls_client_auth!r}")
    try:
        with _running_mesh(config) as mesh:
            _print_addresses(mesh)
            if tls:
                _print_tls(mesh)
                os.environ["MAAS_TLS_ROOT_CERT"] = str(mesh.client_tls.root_cert)  # the demo's HTTPS call
            if demo:
                with MeshClient(mesh.router_address, tls=mesh.client_tls) as client:
                    try:
                        demo_requests(client, {})
                        if _serves_chat(config):
                            demo_chat(client, mesh.openai_url, {})
                    except StepFailed as exc:
                        fail(str(exc))
            maas = f"maas --tls --tls-state-dir {state_dir}" if tls else "maas"
            console.print(
                f"[green]serving[/] — try: {maas} embed 'hello world' --router {mesh.router_address}; "
                f"{maas} chat 'hello' --router {mesh.router_address}; OpenAI clients at base_url "
                f"{mesh.openai_url}; the web console at {mesh.console_url}; tritonclient at "
                f"{mesh.addresses['router_oip_fast']} (the router's OIP fast path)   (Ctrl-C stops everything)"
            )
            supervisor = Supervisor(mesh, log=lambda message: console.print(f"[yellow]{message}[/]"))
            supervisor.start()
            try:
                while not supervisor.failed.wait(1):
                    pass
            finally:
                supervisor.stop()
            gave_up = next(s.gave_up for s in supervisor.status.values() if s.gave_up)
            fail(gave_up)
    except KeyboardInterrupt:
        console.print("stopped")


def demo(
    model_repository: Path = typer.Option(
        Path("model_repository"), "--model-repository", envvar="MAAS_MODEL_REPOSITORY"
    ),
    state_dir: Optional[Path] = typer.Option(
        None, "--state-dir", help="keep the mesh state here (default: a temporary directory)"
    ),
    free_ports: bool = typer.Option(
        True, "--free-ports/--default-ports", help="free ports (default) or the standard ones"
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Start the mesh, embed, classify and chat through the router (and its OpenAI gateway), canary a new
    version, roll back, stop."""
    from maas.local.mesh import DEFAULT_PORTS, MeshConfig
    from maas.registry_client import RegistryClient

    if as_json:
        console.file = sys.stderr  # progress to stderr: stdout carries only the JSON summary
    temp = None if state_dir else Path(tempfile.mkdtemp(prefix="maas-demo-"))
    config = MeshConfig(
        source_repository=model_repository, state_dir=state_dir or temp, ports=_ports(free_ports, **DEFAULT_PORTS)
    )
    summary: dict = {}
    ok = False
    try:
        with _running_mesh(config) as mesh:
            _print_addresses(mesh)
            with MeshClient(mesh.router_address) as client, RegistryClient(mesh.registry_address) as registry:
                demo_requests(client, summary)
                if _serves_chat(config):
                    demo_chat(client, mesh.openai_url, summary)
                demo_rollout(client, registry, Path(model_repository), summary)
        ok = True
    except StepFailed as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail("interrupted")
    finally:
        if temp is not None:
            if ok:
                shutil.rmtree(temp, ignore_errors=True)
            else:
                err_console.print(f"mesh state and logs kept in {temp}")
    if as_json:
        print(json.dumps(summary))
    else:
        chatted = "chatted (gRPC and OpenAI HTTP), " if "chat" in summary else ""
        console.print(
            f"[bold green]demo complete[/]: embedded, classified, {chatted}canaried, promoted and rolled "
            "back through one router — callers never saw a redeploy."
        )


def status(
    state_dir: Path = typer.Option(
        Path(".maas"), "--state-dir", envvar="MAAS_STATE_DIR", help="the state directory of the `maas up` to look at"
    ),
    as_json: bool = JsonOpt,
) -> None:
    """Each component of a running `maas up`: alive, restarts, why it last stopped."""
    from maas.local.supervisor import read_status

    found = read_status(state_dir)
    if not found:
        fail(f"no mesh status in {state_dir} (is `maas up --state-dir {state_dir}` running?)")
    if as_json:
        print(json.dumps(found))
        return
    age = time.time() - found["updated"]
    table = Table(title=f"mesh in {state_dir} (status written {age:.0f}s ago)")
    for column in ("component", "state", "restarts", "last stop", "last restart"):
        table.add_column(column)
    for name, row in found["components"].items():
        state = (
            "[red]given up[/]" if row["gave_up"] else "[green]running[/]" if row["alive"] else "[yellow]restarting[/]"
        )
        when = time.strftime("%H:%M:%S", time.localtime(row["last_restart"])) if row["last_restart"] else ""
        table.add_row(name, state, str(row["restarts"]), row["last_exit"], when)
    console.print(table)


def register(app: typer.Typer) -> None:
    app.command(help="Run the whole mesh locally until Ctrl-C.")(up)
    app.command(help="Components of a running `maas up`: alive, restarts, last stop.")(status)
    app.command(help="Start the mesh, run the demo story, stop; exit 0 when every step worked.")(demo)
    app.command(help="Embed texts through the router.")(embed)
    app.command(help="Classify images through the router.")(classify)
