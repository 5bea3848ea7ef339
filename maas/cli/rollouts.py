"""`maas models rollout MODEL --to VERSION | status [MODEL] | abort MODEL` — automatic rollouts (docs/rollouts.md)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from maas.cli.models import JsonOpt, ReasonOpt, RegistryOpt, TokenOpt, registry_client, emit_json, handle_errors, out
from maas.v1 import registry_pb2 as pb
from maas.rollout_defaults import OPTIMIZE_MIN_AGREEMENT, RolloutDefaults

D = RolloutDefaults()  # the registry's defaults, shown in the help (one place: maas/rollout_defaults.py)

# maas.cli.models imports this module at its end (the names above are defined by then) and calls register().

ACTIONS = ("status", "abort")
ENDED = (pb.ROLLOUT_STATE_PROMOTED, pb.ROLLOUT_STATE_ROLLED_BACK, pb.ROLLOUT_STATE_ABORTED)
STATE_STYLES = {"running": "yellow", "promoted": "green", "rolled_back": "red", "aborted": "red", "planned": "cyan"}


def state_name(state: int) -> str:
    return pb.RolloutState.Name(state).removeprefix("ROLLOUT_STATE_").lower()


def _policy_text(p: pb.RolloutPolicy) -> str:
    gates = [f"error rate ≤ {p.max_error_rate:g}"]
    if p.max_p99_ratio:
        gates.append(f"p99 ≤ {p.max_p99_ratio:g}× production")
    if p.min_shadow_agreement:
        gates.append(f"agreement ≥ {p.min_shadow_agreement:g}")
    return (
        f"+{p.step_weight}% every {p.interval_seconds:g}s up to {p.max_weight}%, ≥ {p.min_requests} requests "
        f"a step, rollback after {p.failure_limit} failure(s); gates: {', '.join(gates)}"
    )


def rollout_view(r: pb.Rollout) -> Group:
    """What `rollout status` shows of one rollout: a head line, the policy, a weight bar, the analyses."""
    state = state_name(r.state)
    head = Text.assemble(
        (f"{r.model}", "bold"),
        f": v{r.canary_version} against production v{r.production_version} ",
        (state, STATE_STYLES.get(state, "")),
        f" at {r.weight}%",
    )
    width = 40
    filled = round(width * r.weight / 100)
    bar = Text.assemble(("█" * filled, "yellow"), ("░" * (width - filled), "dim"), f" {r.weight}% canary")
    parts = [head, Text(_policy_text(r.policy), style="dim"), bar]
    if r.planned_weights:
        parts.append(Text("steps: " + " → ".join(f"{w}%" for w in r.planned_weights) + " → promote"))
    if r.reason:
        parts.append(Text(f"reason: {r.reason}"))
    if r.analyses:
        table = Table(
            "time",
            "weight",
            "canary req",
            "prod req",
            "error rate",
            "p99 canary",
            "p99 prod",
            "agreement",
            "outcome",
            "detail",
            box=None,
            pad_edge=False,
        )
        for a in list(r.analyses)[-10:]:
            style = {"passed": "green", "failed": "red", "waiting": "yellow"}.get(a.outcome, "")
            table.add_row(
                a.at.ToDatetime().strftime("%H:%M:%S"),
                f"{a.weight}%",
                str(a.canary_requests),
                str(a.production_requests),
                f"{a.canary_error_rate:.3f}",
                f"{a.canary_p99_ms:.1f} ms",
                f"{a.production_p99_ms:.1f} ms",
                f"{a.shadow_agreement:.4f}" if a.shadow_agreement else "",
                Text(a.outcome, style=style),
                a.detail,
            )
        parts.append(table)
    return Group(*parts)


def register(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def rollout(
        model: Annotated[
            str,
            typer.Argument(
                help="model name; or `status [MODEL]` (live view) or `abort MODEL`", metavar="MODEL|status|abort"
            ),
        ],
        name: Annotated[
            Optional[str], typer.Argument(help="model name after `status` / `abort`", show_default=False)
        ] = None,
        to: Annotated[Optional[int], typer.Option("--to", help="READY version to roll out")] = None,
        step_weight: Annotated[
            Optional[int], typer.Option(help=f"canary weight added per step, 1..100 [{D.step_weight}]")
        ] = None,
        interval: Annotated[
            Optional[float], typer.Option(help=f"seconds between analyses, > 0 [{D.interval_seconds:g}]")
        ] = None,
        max_weight: Annotated[
            Optional[int], typer.Option(help=f"weight reached before promotion, 1..100 [{D.max_weight}]")
        ] = None,
        max_error_rate: Annotated[
            Optional[float], typer.Option(help=f"gate: canary error share, 0..1 [{D.max_error_rate:g}]")
        ] = None,
        max_p99_ratio: Annotated[
            Optional[float],
            typer.Option(help=f"gate: canary p99 / production p99, >= 1; 0 = off [{D.max_p99_ratio:g}]"),
        ] = None,
        min_shadow_agreement: Annotated[
            Optional[float],
            typer.Option(
                help="gate: shadow agreement with production, 0..1; 0 = off (on: production traffic is mirrored) "
                f"[{D.min_shadow_agreement:g}]"
            ),
        ] = None,
        min_requests: Annotated[
            Optional[int], typer.Option(help=f"canary requests an analysis needs [{D.min_requests}]")
        ] = None,
        failure_limit: Annotated[
            Optional[int], typer.Option(help=f"failed analyses in a row that roll back [{D.failure_limit}]")
        ] = None,
        dry_run: Annotated[bool, typer.Option("--dry-run", help="say what it would do; change nothing")] = False,
        follow: Annotated[bool, typer.Option("--watch/--once", help="status: follow live until it ends")] = True,
        reason: ReasonOpt = "",
        registry: RegistryOpt = "",
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Automatic rollout: raise a canary's weight step by step while its gates hold, promote it at the end,
        roll back at once when a gate fails failure-limit times in a row. Unset options take the registry's
        defaults (shown after each option; docs/rollouts.md)."""
        with registry_client(registry, token) as client:
            if model == "status":
                return _status(client, name, follow and not as_json, as_json, out, emit_json)
            if model == "abort":
                if not name:
                    raise ValueError("abort needs the model name: maas models rollout abort MODEL")
                r = client.abort_rollout(name, reason)
            else:
                if name:
                    raise ValueError(f"unexpected argument {name!r}: maas models rollout MODEL --to VERSION")
                if to is None:
                    raise ValueError("--to VERSION is required")
                given: dict[str, Any] = dict(
                    step_weight=step_weight,
                    interval_seconds=interval,
                    max_weight=max_weight,
                    max_error_rate=max_error_rate,
                    max_p99_ratio=max_p99_ratio,
                    min_shadow_agreement=min_shadow_agreement,
                    min_requests=min_requests,
                    failure_limit=failure_limit,
                )
                for field, value in given.items():
                    if value is not None and value < 0:  # the proto's unsigned fields cannot carry it
                        raise ValueError(f"--{field.replace('_seconds', '').replace('_', '-')} {value} is negative")
                r = client.start_rollout(
                    model, to, pb.RolloutPolicy(**{k: v for k, v in given.items() if v is not None}), dry_run, reason
                )
        if as_json:
            emit_json(r)
        else:
            out.print(rollout_view(r))


def _status(client, model: str | None, follow: bool, as_json: bool, out, emit) -> None:
    def fetch() -> list[pb.Rollout]:
        return [client.get_rollout(model)] if model else client.list_rollouts()

    rollouts = fetch()
    if as_json:
        emit(rollouts if not model else rollouts[0])
        return
    if not rollouts:
        out.print("no rollouts")
        return
    if not follow or all(r.state in ENDED for r in rollouts):
        out.print(Group(*(rollout_view(r) for r in rollouts)))
        return
    try:
        with Live(Group(*(rollout_view(r) for r in rollouts)), console=out, refresh_per_second=4) as live:
            while any(r.state == pb.ROLLOUT_STATE_RUNNING for r in rollouts):
                time.sleep(0.5)
                rollouts = fetch()
                live.update(Group(*(rollout_view(r) for r in rollouts)))
    except KeyboardInterrupt:
        pass


def report_view(r: pb.ShadowReport) -> Group:
    """What `maas models compare` prints: the per-kind figures, the cosine histogram (prefix agreement for
    generation), the worst requests."""
    generation = r.kind == "generation"
    head = Text.assemble(
        (r.model, "bold"),
        f": v{r.shadow_version} (shadow) against v{r.primary_version} (primary), {r.kind}: agreement ",
        (f"{r.agreement:.4f}", "bold"),
        f" over {r.samples} requests / {r.items} items",
    )
    figures = Table("figure", "value", box=None, pad_edge=False)
    if r.kind == "classifier":
        figures.add_row("top-1 agreement", f"{r.top1_agreement:.4f}")
        figures.add_row("top-5 overlap", f"{r.top5_agreement:.4f}")
    if generation:
        figures.add_row("exact-token agreement", f"{r.exact_agreement:.4f}")
        figures.add_row("prefix agreement", f"{r.prefix_agreement:.4f}")
    else:
        figures.add_row("mean cosine", f"{r.mean_cosine:.6f}")
    figures.add_row("latency primary / shadow", f"{r.primary_latency_ms:.1f} / {r.shadow_latency_ms:.1f} ms")
    histogram = Table("prefix agreement" if generation else "cosine", "items", "", box=None, pad_edge=False)
    top = max(r.cosine_counts, default=0) or 1
    low = None if generation else "-1"  # prefix agreement: bucket 0 is exactly 0
    for bound, count in zip(r.cosine_bounds, r.cosine_counts):
        label = f"({low}, {bound:g}]" if low is not None else f"{bound:g}"
        histogram.add_row(label, str(count), Text("█" * round(30 * count / top), style="cyan"))
        low = f"{bound:g}"
    worst = Table("worst requests (request id)", "score", "items", box=None, pad_edge=False)
    for w in r.worst:
        worst.add_row(w.request_id, f"{w.score:.4f}", str(w.items))
    return Group(head, figures, Text(""), histogram, Text(""), worst)


def register_compare(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def compare(
        model: Annotated[str, typer.Argument(help="model name")],
        a: Annotated[int, typer.Argument(help="primary version (what callers got)")],
        b: Annotated[int, typer.Argument(help="shadow version")],
        registry: RegistryOpt = "",
        as_json: JsonOpt = False,
    ) -> None:
        """Shadow agreement report of B against A: top-1/top-5 (classifiers), cosine distribution (embeddings),
        exact-token and prefix agreement with its distribution (generation), the worst requests by id.
        Needs shadow traffic (maas models traffic MODEL --shadow B ...)."""
        with registry_client(registry) as client:
            report = client.compare(model, a, b)
        if as_json:
            emit_json(report)
        else:
            out.print(report_view(report))


def register_optimize(app: typer.Typer) -> None:
    @app.command()
    @handle_errors
    def optimize(
        model: Annotated[str, typer.Argument(help="model name")],
        from_version: Annotated[int, typer.Option("--from", help="READY ONNX version to optimize")],
        int8: Annotated[
            bool, typer.Option("--int8", help="ONNX Runtime int8 quantization (static with --calibration)")
        ] = False,
        calibration: Annotated[
            Optional[Path],
            typer.Option(
                help="--int8: a .npy of model inputs to calibrate static quantization on (needed for image "
                "classifiers; `make models` builds model_repository/efficientnet_lite0/calibration.npy)",
                exists=True,
                dir_okay=False,
            ),
        ] = None,
        fp16: Annotated[
            bool, typer.Option("--fp16", help="float16 weights and compute, float32 inputs and outputs")
        ] = False,
        int4: Annotated[
            bool, typer.Option("--int4", help="generation versions: 4-bit MatMul weights (MatMulNBits)")
        ] = False,
        interval: Annotated[
            Optional[float], typer.Option(help=f"rollout: seconds between analyses [{D.interval_seconds:g}]")
        ] = None,
        step_weight: Annotated[Optional[int], typer.Option(help=f"rollout: weight per step [{D.step_weight}]")] = None,
        max_weight: Annotated[
            Optional[int], typer.Option(help=f"rollout: weight before promotion [{D.max_weight}]")
        ] = None,
        min_shadow_agreement: Annotated[
            Optional[float],
            typer.Option(
                help=f"rollout gate: mean cosine / top-1 agreement with production [{OPTIMIZE_MIN_AGREEMENT:g}]"
            ),
        ] = None,
        max_p99_ratio: Annotated[
            Optional[float], typer.Option(help=f"rollout gate: p99 / production's, 0 = off [{D.max_p99_ratio:g}]")
        ] = None,
        min_requests: Annotated[
            Optional[int], typer.Option(help=f"rollout: requests per analysis [{D.min_requests}]")
        ] = None,
        follow: Annotated[bool, typer.Option("--watch/--no-watch", help="follow the rollout live")] = False,
        reason: ReasonOpt = "",
        registry: RegistryOpt = "",
        token: TokenOpt = None,
        as_json: JsonOpt = False,
    ) -> None:
        """Optimize a version (--int8 or --fp16; --int4 for generation versions), register the result, shadow
        it and roll it out: promoted only if the agreement and latency gates hold (docs/rollouts.md)."""
        given: dict[str, Any] = dict(
            interval_seconds=interval,
            step_weight=step_weight,
            max_weight=max_weight,
            min_shadow_agreement=min_shadow_agreement,
            max_p99_ratio=max_p99_ratio,
            min_requests=min_requests,
        )
        for field, value in given.items():
            if value is not None and value < 0:
                raise ValueError(f"--{field.replace('_seconds', '').replace('_', '-')} {value} is negative")
        with registry_client(registry, token) as client:
            done = client.optimize(
                model,
                from_version,
                int8,
                pb.RolloutPolicy(**{k: v for k, v in given.items() if v is not None}),
                reason,
                fp16=fp16,
                int4=int4,
                calibration=calibration.read_bytes() if calibration else b"",
            )
            if as_json:
                emit_json(done)
                return
            out.print(
                f"{model}: v{done.version.version} = {done.version.tags['optimization']} of v{from_version}: "
                f"{done.size_before_bytes / 1e6:.1f} MB → {done.size_after_bytes / 1e6:.1f} MB "
                f"({done.size_after_bytes / max(done.size_before_bytes, 1):.2f}×)"
            )
            out.print(rollout_view(done.rollout))
            if follow:
                _status(client, model, True, False, out, emit_json)
