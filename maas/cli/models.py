"""`maas models register|list|show|alias|traffic|rollback|archive|watch|rollout|compare|optimize`:
the registry from the command line.

Human-readable tables by default, `--json` for scripts. Errors print the server's message (no traceback)
and exit 1; bad arguments exit 2.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from google.protobuf.json_format import MessageToDict
from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn
from rich.table import Table

from maas.registry_client import (
    FORMAT_NAMES,
    STATE_NAMES,
    RegistryClient,
    RegistryError,
    default_address,
    parse_target,
    parse_tensor,
    target_name,
)
from maas.v1 import registry_pb2 as pb

app = typer.Typer(no_args_is_help=True, add_completion=False)
out = Console()
err = Console(stderr=True)

RegistryOpt = Annotated[
    str,
    typer.Option("--registry", envvar="MAAS_REGISTRY_ADDRESS", help="registry address host:port", show_default=False),
]
TokenOpt = Annotated[
    Optional[str],
    typer.Option("--token", envvar="MAAS_ADMIN_TOKEN", help="admin bearer token for changes", show_default=False),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="machine-readable JSON output")]
ReasonOpt = Annotated[str, typer.Option("--reason", "-r", help="why (recorded with the change)")]


def registry_client(registry: str | None, token: str | None = None) -> RegistryClient:
    return RegistryClient(registry or default_address(), token=token or "")


def handle_errors(fn):
    """Server errors become one line on stderr and exit code 1; argument errors exit 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except RegistryError as exc:
            err.print(f"[red]error:[/red] {exc.code.name}: {exc.message}", highlight=False, markup=True)
            raise typer.Exit(1) from None
        except (ValueError, OSError) as exc:
            err.print(f"[red]error:[/red] {exc}", highlight=False)
            raise typer.Exit(2) from None

    return wrapper


def emit_json(message_or_list) -> None:
    data: list[dict] | dict
    if isinstance(message_or_list, list):
        data = [MessageToDict(m, preserving_proto_field_name=True) for m in message_or_list]
    else:
        data = MessageToDict(message_or_list, preserving_proto_field_name=True)
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")


def when(ts) -> str:
    return ts.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if ts.seconds else ""


def _signature(sig: pb.Signature) -> str:
    fmt = lambda t: f"{t.name}:{t.datatype}{list(t.shape)}"
    return ", ".join(map(fmt, sig.inputs)) + " → " + ", ".join(map(fmt, sig.outputs))


def _policy_text(p: pb.TrafficPolicy) -> str:
    parts = [f"{target_name(t)}={t.weight}" for t in p.split] or ["default (production, else newest ready)"]
    if p.HasField("shadow") and p.shadow.HasField("target"):
        parts.append(f"shadow {target_name(p.shadow.target)} {p.shadow.fraction:.0%}")
    return " ".join(parts)


def _versions_table(model: pb.Model) -> Table:
    table = Table(title=f"{model.name}", title_justify="left")
    for col in ("version", "state", "aliases", "format", "size", "created", "by", "load ms", "note"):
        table.add_column(col)
    for v in model.versions:
        state = STATE_NAMES[v.state]
        colour = {"ready": "green", "failed": "red", "archived": "dim", "loading": "yellow"}.get(state, "")
        table.add_row(
            str(v.version),
            f"[{colour}]{state}[/{colour}]" if colour else state,
            ", ".join(v.aliases),
            FORMAT_NAMES.get(v.format, "?"),
            f"{v.size_bytes / 1e6:.1f} MB",
            when(v.created_at),
            v.created_by,
            f"{v.load_ms:.0f}" if v.load_ms else "",
            v.state_reason or v.description,
        )
    return table


# -- commands ---------------------------------------------------------------------------------------


@app.command()
@handle_errors
def register(
    path: Annotated[
        Path, typer.Argument(help="ONNX file, TorchScript file, Triton model folder or its .tar.gz", exists=True)
    ],
    name: Annotated[str, typer.Option("--name", "-n", help="model name")],
    format: Annotated[
        Optional[str], typer.Option("--format", help="onnx | torchscript | triton (default: from the path)")
    ] = None,
    inputs: Annotated[
        list[str],
        typer.Option("--input", help="NAME:DTYPE:DIMS, e.g. INPUT__0:FP32:3,224,224 (TorchScript; repeatable)"),
    ] = [],
    outputs: Annotated[list[str], typer.Option("--output", help="NAME:DTYPE:DIMS (repeatable)")] = [],
    tokenizer: Annotated[Optional[str], typer.Option(help="preprocess texts with this tokenizer")] = None,
    vision: Annotated[Optional[str], typer.Option(help="preprocess images with this vision spec")] = None,
    embedding: Annotated[bool, typer.Option("--embedding", help="output is an embedding (L2-normalised)")] = False,
    top_k: Annotated[int, typer.Option("--top-k", help="softmax then top-k with labels (0 = off)")] = 0,
    post_output: Annotated[str, typer.Option("--postprocess-output", help="output tensor to post-process")] = "",
    labels: Annotated[Optional[Path], typer.Option(help="labels file, one class per line", exists=True)] = None,
    tags: Annotated[list[str], typer.Option("--tag", help="KEY=VALUE (repeatable)")] = [],
    max_batch_size: Annotated[int, typer.Option(help="0 = registry default")] = 0,
    description: Annotated[str, typer.Option(help="free text")] = "",
    wait: Annotated[bool, typer.Option("--wait/--no-wait", help="wait until the version is ready")] = True,
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a model version (with a progress bar) and wait until Triton serves it."""
    if tokenizer and vision:
        raise ValueError("--tokenizer and --vision are exclusive")
    if embedding and top_k:
        raise ValueError("--embedding and --top-k are exclusive")
    pre = ("tokenizer", tokenizer) if tokenizer else ("vision", vision) if vision else ("none", "")
    post = ("embedding", post_output) if embedding else ("softmax_top_k", post_output) if top_k else ("none", "")
    tag_map = {}
    for tag in tags:
        key, sep, value = tag.partition("=")
        if not sep or not key:
            raise ValueError(f"--tag {tag!r} must be KEY=VALUE")
        tag_map[key] = value
    label_list = [line.strip() for line in labels.read_text().splitlines() if line.strip()] if labels else []
    with (
        registry_client(registry, token) as client,
        Progress(
            TextColumn("uploading {task.description}"),
            BarColumn(),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=err,
            transient=True,
            disable=as_json or not err.is_terminal,
        ) as bar,
    ):
        task = bar.add_task(path.name, total=None)
        version = client.register(
            path,
            name,
            format=format,
            inputs=[parse_tensor(i) for i in inputs],
            outputs=[parse_tensor(o) for o in outputs],
            preprocessing=pre,
            postprocessing=post,
            top_k=top_k,
            labels=label_list,
            tags=tag_map,
            max_batch_size=max_batch_size,
            description=description,
            progress=lambda sent, total: bar.update(task, completed=sent, total=total),
        )
        bar.stop()
        if not as_json:
            err.print(f"registered {name} version {version.version} (sha256 {version.sha256[:12]}…)")
        if wait:
            if not as_json:
                err.print("loading into Triton and warming up…")
            version = client.wait_ready(name, version.version)
    if as_json:
        emit_json(version)
    else:
        out.print(
            f"{name} v{version.version} is {STATE_NAMES[version.state]}"
            + (f" (ready in {version.load_ms:.0f} ms)" if version.load_ms else "")
        )


@app.command("list")
@handle_errors
def list_models(
    all_versions: Annotated[bool, typer.Option("--all", help="include archived versions")] = False,
    registry: RegistryOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Models with their versions, aliases and traffic policy."""
    with registry_client(registry) as client:
        models = client.list_models(include_archived=all_versions)
    if as_json:
        emit_json(models)
        return
    table = Table()
    for col in ("model", "versions", "ready", "aliases", "traffic"):
        table.add_column(col)
    for m in models:
        ready = [str(v.version) for v in m.versions if v.state == pb.VERSION_STATE_READY]
        table.add_row(
            m.name,
            str(len(m.versions)),
            ", ".join(ready),
            ", ".join(f"{a.name}→v{a.version}" for a in m.aliases),
            _policy_text(m.policy),
        )
    out.print(table if models else "no models registered")


@app.command()
@handle_errors
def show(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[Optional[int], typer.Argument(help="one version (default: the whole model)")] = None,
    registry: RegistryOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """One model (versions, aliases, traffic, shadow statistics, alias history) or one version."""
    with registry_client(registry) as client:
        if version is not None:
            v = client.get_version(model, version)
            if as_json:
                emit_json(v)
                return
            table = Table(show_header=False, title=f"{model} v{version}", title_justify="left")
            rows = [
                ("state", STATE_NAMES[v.state] + (f" ({v.state_reason})" if v.state_reason else "")),
                ("format", FORMAT_NAMES.get(v.format, "?")),
                ("sha256", v.sha256),
                ("size", f"{v.size_bytes} bytes"),
                ("signature", _signature(v.signature)),
                ("preprocessing", f"{pb.Preprocessing.Kind.Name(v.preprocessing.kind)} {v.preprocessing.name}"),
                (
                    "postprocessing",
                    f"{pb.Postprocessing.Kind.Name(v.postprocessing.kind)} "
                    f"{v.postprocessing.output} {v.postprocessing.top_k or ''}",
                ),
                ("labels", f"{len(v.labels)}"),
                ("tags", ", ".join(f"{k}={t}" for k, t in sorted(v.tags.items()))),
                ("aliases", ", ".join(v.aliases)),
                ("created", f"{when(v.created_at)} by {v.created_by}"),
                ("load", f"{v.load_ms:.0f} ms" if v.load_ms else ""),
                ("description", v.description),
            ]
            for key, value in rows:
                table.add_row(key, value)
            out.print(table)
            return
        m = client.get_model(model)
    if as_json:
        emit_json(m)
        return
    out.print(_versions_table(m))
    out.print(f"traffic: {_policy_text(m.policy)}")
    for s in m.shadow_stats:
        out.print(
            f"shadow v{s.primary_version} vs v{s.shadow_version}: {s.samples} samples, top-1 agreement "
            f"{s.top1_agreement:.3f}, mean cosine {s.mean_cosine:.4f}, latency {s.primary_latency_ms:.1f} / "
            f"{s.shadow_latency_ms:.1f} ms"
        )
    if m.alias_history:
        table = Table(title="alias history (newest first)", title_justify="left")
        for col in ("alias", "version", "was", "when", "by", "reason"):
            table.add_column(col)
        for a in m.alias_history[:20]:
            table.add_row(
                a.name, str(a.version), str(a.previous_version or ""), when(a.updated_at), a.updated_by, a.reason
            )
        out.print(table)


@app.command()
@handle_errors
def alias(
    model: Annotated[str, typer.Argument(help="model name")],
    name: Annotated[str, typer.Argument(help="alias, e.g. production or canary")],
    version: Annotated[int, typer.Argument(help="a ready version")],
    reason: ReasonOpt = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point an alias at a version (atomically; recorded with who, when and why)."""
    with registry_client(registry, token) as client:
        a = client.set_alias(model, name, version, reason)
    if as_json:
        emit_json(a)
    else:
        was = f" (was v{a.previous_version})" if a.previous_version else ""
        out.print(f"{model}: {a.name} → v{a.version}{was}")


@app.command()
@handle_errors
def traffic(
    model: Annotated[str, typer.Argument(help="model name")],
    split: Annotated[
        Optional[list[str]],
        typer.Argument(
            help="TARGET=WEIGHT ... where TARGET is an alias or a version (3 or v3), e.g. production=90 canary=10"
        ),
    ] = None,
    shadow: Annotated[Optional[str], typer.Option(help="mirror requests to this alias or version")] = None,
    shadow_fraction: Annotated[float, typer.Option(help="share of requests mirrored, 0..1")] = 0.0,
    clear: Annotated[bool, typer.Option("--clear", help="remove the policy (default routing)")] = False,
    reason: ReasonOpt = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Show or set the traffic policy: weighted split, shadow traffic."""
    targets = []
    for item in split or []:
        target, sep, weight = item.rpartition("=")
        if not sep or not target or not weight.isdigit():
            raise ValueError(f"{item!r} must be TARGET=WEIGHT with a whole-number weight, e.g. canary=10")
        targets.append(parse_target(target, int(weight)))
    with registry_client(registry, token) as client:
        if not targets and shadow is None and not clear:
            policy = client.get_model(model).policy
        else:
            if shadow is not None and shadow_fraction == 0.0:
                raise ValueError("--shadow needs --shadow-fraction (0..1)")
            policy = client.set_traffic(
                model, targets, parse_target(shadow) if shadow else None, shadow_fraction, reason
            )
    if as_json:
        emit_json(policy)
    else:
        out.print(f"{model}: {_policy_text(policy)}")


@app.command()
@handle_errors
def rollback(
    model: Annotated[str, typer.Argument(help="model name")],
    name: Annotated[str, typer.Option("--alias", help="alias to move back")] = "production",
    reason: ReasonOpt = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move an alias (default production) back to the version it pointed at before."""
    with registry_client(registry, token) as client:
        a = client.rollback(model, name, reason)
    if as_json:
        emit_json(a)
    else:
        out.print(f"{model}: {a.name} rolled back to v{a.version} (was v{a.previous_version})")


@app.command()
@handle_errors
def archive(
    model: Annotated[str, typer.Argument(help="model name")],
    version: Annotated[int, typer.Argument(help="version to retire")],
    reason: ReasonOpt = "",
    registry: RegistryOpt = "",
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Retire a version: unloaded from Triton, no longer routable (kept on disk)."""
    with registry_client(registry, token) as client:
        v = client.archive(model, version, reason)
    if as_json:
        emit_json(v)
    else:
        out.print(f"{model} v{v.version} is {STATE_NAMES[v.state]}")


@app.command()
@handle_errors
def watch(registry: RegistryOpt = "", as_json: JsonOpt = False) -> None:
    """Follow the routing state: the snapshot, then every change (Ctrl-C to stop)."""
    with registry_client(registry) as client:
        try:
            for event in client.watch():
                if as_json:
                    sys.stdout.write(json.dumps(MessageToDict(event, preserving_proto_field_name=True)) + "\n")
                    sys.stdout.flush()
                elif event.WhichOneof("event") == "snapshot":
                    out.print(f"[{event.revision}] snapshot: {len(event.snapshot.models)} model(s)")
                    for m in event.snapshot.models:
                        out.print(f"  {_routing_line(m)}")
                elif event.WhichOneof("event") == "rollout_changed":
                    r = event.rollout_changed
                    out.print(
                        f"[{event.revision}] rollout {r.model} v{r.canary_version}: "
                        f"{pb.RolloutState.Name(r.state).removeprefix('ROLLOUT_STATE_').lower()} at {r.weight}%"
                        + (f" ({r.reason})" if r.reason else "")
                    )
                else:
                    out.print(f"[{event.revision}] {_routing_line(event.model_changed)}")
        except KeyboardInterrupt:
            pass


def _routing_line(m: pb.ModelRouting) -> str:
    versions = " ".join(f"v{v.version}:{STATE_NAMES[v.state]}" for v in m.versions)
    aliases = " ".join(f"{k}→v{v}" for k, v in sorted(m.aliases.items()))
    return f"{m.model}: {versions} | {aliases or 'no aliases'} | {_policy_text(m.policy)}"


from maas.cli import rollouts as _rollouts  # noqa: E402 - registers `maas models rollout` on app

_rollouts.register(app)
_rollouts.register_compare(app)
_rollouts.register_optimize(app)
