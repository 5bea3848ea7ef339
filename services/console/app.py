"""The console's pages (FastAPI, Jinja2 templates rendered on the server).

Every page and every form works without script: a form posts and gets the whole page back with its
result. static/console.js enhances that: forms post in the background and only the result fragment
(header X-Console-Fragment: 1) replaces the old one, the chat streams (server-sent events from the
router's Generate) with a Stop button, the Models page follows the registry's Watch, the charts
refresh. A refusal keeps the HTTP status of the service's gRPC status and shows its text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from prometheus_client import Gauge
from starlette.datastructures import UploadFile

from maas.v1 import registry_pb2 as pb
from services.console import charts
from services.console.config import ConsoleConfig
from services.console.mesh import Mesh, Refused
from services.console.models import audit_view, kind_of, model_view, rollout_view
from services.console.operations import TOKEN_COOKIE, Operations
from services.console.playground import API_KEY_COOKIE, Playground

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
FRAGMENT_HEADER = "x-console-fragment"
_KEEPALIVE = 15.0  # seconds between comments on an idle event stream (finds browsers that went away)

EVENT_STREAMS = Gauge(
    "maas_console_event_streams", "Server-sent event streams the console holds open (Models page feeds, chats)"
)

PAGES = (("models", "Models"), ("playground", "Playground"), ("operations", "Operations"), ("charts", "Charts"))


def environment() -> Environment:
    env = Environment(
        loader=FileSystemLoader(HERE / "templates"),
        autoescape=select_autoescape(["html"]),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(pages=PAGES, split_bar=charts.split_bar)
    return env


class BodyLimit:
    """ASGI middleware: a request body over max_upload_bytes is refused before it is read (413)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for key, value in scope["headers"]:
            if key == b"content-length" and value.isdigit() and int(value) > self.limit:
                return await _too_large(self.limit, scope, send)
        seen = [0]

        async def limited():
            message = await receive()
            if message["type"] == "http.request":
                seen[0] += len(message.get("body", b""))
                if seen[0] > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(self.limit, scope, send)


class _TooLarge(Exception):
    pass


async def _too_large(limit: int, scope, send) -> None:
    text = (
        f"the upload is over the console's limit of {limit} bytes (--max-upload-bytes / MAAS_CONSOLE_MAX_UPLOAD_BYTES)"
    )
    body = f'<div class="result error" role="alert"><p><strong>413 request too large</strong>: {text}</p></div>'
    await send(
        {
            "type": "http.response.start",
            "status": 413,
            "headers": [
                (b"content-type", b"text/html; charset=utf-8"),
                (b"content-length", str(len(body.encode())).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body.encode()})


async def _counted(events):
    EVENT_STREAMS.inc()
    try:
        async for event in events:
            yield event
    finally:
        EVENT_STREAMS.dec()
        await events.aclose()  # cancels the router call now, not when the generator is collected


def create_app(config: ConsoleConfig):
    state: dict = {}
    env = environment()

    @asynccontextmanager
    async def lifespan(_app):
        mesh = Mesh(config)  # channels belong to the serving event loop
        state.update(mesh=mesh, playground=Playground(mesh, config.limits), operations=Operations(mesh))
        mesh.start()
        try:
            yield
        finally:
            await mesh.close()

    app = FastAPI(title="MaaS Mesh console", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")

    def mesh() -> Mesh:
        return state["mesh"]

    def html(template: str, status: int = 200, **context) -> HTMLResponse:
        return HTMLResponse(env.get_template(template).render(**context), status_code=status)

    def page(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
        return html(f"{name}.html", status, active=name, limits=config.limits, **context)

    def wants_fragment(request: Request) -> bool:
        return request.headers.get(FRAGMENT_HEADER) == "1"

    async def result(request: Request, page_name: str, fragment: str, work, page_context) -> HTMLResponse:
        """Run `work()`; the result (or the refusal) as a fragment for the script, else in the whole page."""
        status, context = 200, {}
        try:
            context["result"] = await work()
        except Refused as exc:
            status, context["error"] = exc.status, exc
        except Exception:  # the page gets an incident id, the log the traceback
            incident = uuid.uuid4().hex[:12]
            log.exception("unhandled error", extra={"incident": incident})
            status, context["error"] = 500, Refused(500, "INTERNAL", f"console error (incident {incident})")
        if wants_fragment(request):
            return html(fragment, status, **context)
        return page(request, page_name, status, **(await page_context()), **{f"{fragment[1:-5]}": context})

    # -- models ------------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return RedirectResponse("/models", status_code=303)

    async def model_card(name: str) -> dict:
        """A model's card: the registry's model, and for each shadowed pair its agreement histogram."""
        view = model_view(await mesh().model(name))
        for pair in view["shadow_stats"]:
            report = await mesh().shadow_report(name, pair["primary"], pair["shadow"])
            if report is not None and any(report.cosine_counts):
                pair["histogram"] = charts.agreement_histogram(
                    list(report.cosine_bounds),
                    list(report.cosine_counts),
                    name,
                    f"v{pair['primary']} vs v{pair['shadow']}",
                )
            if report is not None:
                pair["top5"] = round(report.top5_agreement * 100, 1) if report.kind == "classifier" else None
                pair["worst"] = [w.request_id for w in report.worst[:3]]
        return view

    @app.get("/models", response_class=HTMLResponse)
    async def models_page(request: Request):
        try:
            views = [await model_card(m.name) for m in await mesh().models()]
        except Refused as exc:
            return page(request, "models", exc.status, models=[], error=exc)
        return page(request, "models", models=views)

    @app.get("/events/models")
    async def model_events(request: Request):
        """Server-sent events: `model` with a changed model's re-rendered card (JSON {name, html})."""
        feed = mesh().feed
        queue = feed.subscribe()

        async def events():
            EVENT_STREAMS.inc()
            try:
                yield f"event: hello\ndata: {json.dumps({'revision': feed.revision})}\n\n".encode()
                while True:
                    try:
                        name = await asyncio.wait_for(queue.get(), _KEEPALIVE)
                    except TimeoutError:
                        yield b": keep-alive\n\n"
                        continue
                    names = {name}
                    while not queue.empty():  # a burst of changes: each model once
                        names.add(queue.get_nowait())
                    for changed in sorted(names):
                        try:
                            card = env.get_template("_model_card.html").render(m=await model_card(changed))
                        except Refused as exc:
                            card = f'<p class="error" role="alert">{exc.code}: {exc.message}</p>'
                        yield f"event: model\ndata: {json.dumps({'name': changed, 'html': card})}\n\n".encode()
            finally:
                EVENT_STREAMS.dec()
                feed.unsubscribe(queue)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        )

    # -- playground --------------------------------------------------------------------------------
    def api_key(request: Request) -> str:
        return request.cookies.get(API_KEY_COOKIE, "")

    def session_cookie(request: Request, response, name: str, value: str, path: str) -> None:
        """A secret the browser keeps for its session only (no expiry), sent to `path`, unreadable by scripts;
        an empty value (or the form's forget button) deletes it. The console keeps no copy."""
        if not value:
            response.delete_cookie(name, path=path)
        else:
            response.set_cookie(
                name, value, path=path, httponly=True, samesite="strict", secure=request.url.scheme == "https"
            )

    async def remember(request: Request, field: str, cookie: str, path: str) -> Response:
        """A form that hands the browser a session secret (the admin token, an API key), or forgets it."""
        form = await request.form()
        response = RedirectResponse(path, status_code=303)
        value = "" if form.get("forget") else str(form.get(field, "")).strip()
        session_cookie(request, response, cookie, value, path)
        return response

    async def playground_context(request: Request) -> dict:
        has_key = bool(api_key(request))
        try:
            models = await mesh().models()
        except Refused as exc:
            return {"choices": {}, "error": exc, "has_key": has_key}
        choices: dict[str, list[dict]] = {}
        for m in models:
            targets = sorted({a.name for a in m.aliases}) + [
                f"v{v.version}"
                for v in sorted(m.versions, key=lambda v: v.version)
                if v.state == pb.VERSION_STATE_READY
            ]
            choices.setdefault(kind_of(m), []).append({"name": m.name, "targets": targets})
        return {"choices": choices, "has_key": has_key}

    @app.get("/playground", response_class=HTMLResponse)
    async def playground_page(request: Request):
        return page(request, "playground", **(await playground_context(request)))

    @app.post("/playground/key")
    async def playground_key(request: Request):
        return await remember(request, "api_key", API_KEY_COOKIE, "/playground")

    @app.post("/playground/chat")
    async def chat(request: Request):
        form = await request.form()
        play: Playground = state["playground"]
        streamed = "text/event-stream" in request.headers.get("accept", "")
        if streamed:
            try:
                call = play.chat_request(
                    form.get("model", ""),
                    form.get("target", ""),
                    form.get("message", ""),
                    form.get("system", ""),
                    form.get("max_tokens", ""),
                    form.get("temperature", ""),
                    form.get("history", ""),
                )
                events = await play.chat_stream(call, api_key(request))
            except Refused as exc:
                return html("_chat.html", exc.status, error=exc)
            return StreamingResponse(
                _counted(events),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )

        async def work():
            return await play.chat_unary(
                play.chat_request(
                    form.get("model", ""),
                    form.get("target", ""),
                    form.get("message", ""),
                    form.get("system", ""),
                    form.get("max_tokens", ""),
                    form.get("temperature", ""),
                    form.get("history", ""),
                ),
                api_key(request),
            )

        return await result(request, "playground", "_chat.html", work, lambda: playground_context(request))

    @app.post("/playground/embed")
    async def embed(request: Request):
        form = await request.form()
        return await result(
            request,
            "playground",
            "_embed.html",
            lambda: state["playground"].embed(
                form.get("model", ""), form.get("target", ""), form.get("texts", ""), api_key(request)
            ),
            lambda: playground_context(request),
        )

    @app.post("/playground/classify")
    async def classify(request: Request):
        form = await request.form(max_files=1, max_fields=8)
        upload = form.get("image")

        async def work():
            if not isinstance(upload, UploadFile):
                raise Refused(400, "INVALID_ARGUMENT", "choose an image file", "image")
            return await state["playground"].classify(
                form.get("model", ""),
                form.get("target", ""),
                await upload.read(),
                upload.filename or "",
                api_key(request),
            )

        return await result(request, "playground", "_classify.html", work, lambda: playground_context(request))

    # -- operations --------------------------------------------------------------------------------
    async def operations_context(request: Request) -> dict:
        try:
            models = [model_view(await mesh().model(m.name)) for m in await mesh().models()]
            rollouts = [rollout_view(r) for r in await mesh().rollouts()]
        except Refused as exc:
            return {"models": [], "error": exc, "has_token": False}
        token_value = request.cookies.get(TOKEN_COOKIE, "")
        try:  # the audit log needs the admin token: without it the page says what the registry answered
            audit, audit_error = [audit_view(e) for e in await mesh().audit(token_value)], None
        except Refused as exc:
            audit, audit_error = [], exc
        return {
            "models": models,
            "has_token": bool(token_value),
            "rollouts": rollouts,
            "audit": audit,
            "audit_error": audit_error,
        }

    @app.get("/operations", response_class=HTMLResponse)
    async def operations_page(request: Request):
        return page(request, "operations", **(await operations_context(request)))

    @app.post("/operations/token")
    async def token(request: Request):
        return await remember(request, "token", TOKEN_COOKIE, "/operations")

    @app.post("/operations/{action}")
    async def operate(action: str, request: Request):
        form = await request.form()
        ops: Operations = state["operations"]
        token_value = request.cookies.get(TOKEN_COOKIE, "")
        f = {k: str(v) for k, v in form.items()}
        model, reason, who = f.get("model", ""), f.get("reason", ""), f.get("who", "")
        actions = {
            "alias": lambda: ops.set_alias(token_value, model, f.get("alias", ""), f.get("version", ""), reason, who),
            "split": lambda: ops.set_split(token_value, model, f.get("split", ""), reason, who),
            "shadow": lambda: ops.set_shadow(
                token_value, model, f.get("target", ""), f.get("fraction", ""), reason, who
            ),
            "shadow-stop": lambda: ops.set_shadow(token_value, model, "", None, reason, who),
            "rollback": lambda: ops.rollback(token_value, model, f.get("alias", ""), reason, who),
        }
        if action not in actions:
            return html("_operation.html", 404, error=Refused(404, "NOT_FOUND", f"no operation {action!r}"))

        async def context():
            return await operations_context(request)

        return await result(request, "operations", "_operation.html", actions[action], context)

    # -- charts ------------------------------------------------------------------------------------
    def chart_context() -> dict:
        scraper = mesh().scraper
        samples = scraper.history.samples
        # The x axis covers what is kept, at least a minute: a fresh console's points are not squashed at the right.
        age = samples[-1].at - samples[0].at if samples else 0.0
        span = min(config.history_seconds, max(60.0, age))
        drawn = [
            {
                "svg": charts.line_chart(s, span, f"chart{i}"),
                "title": s.title,
                "unit": s.unit,
                "legend": charts.legend(s),
            }
            for i, s in enumerate(scraper.history.charts(time.time()))
        ]
        return {
            "charts": drawn,
            "source": config.router_metrics,
            "scrape_error": scraper.last_error,
            "samples": len(scraper.history.samples),
            "interval": config.scrape_interval,
        }

    @app.get("/charts", response_class=HTMLResponse)
    async def charts_page(request: Request):
        if wants_fragment(request):
            return html("_charts.html", **chart_context())
        return page(request, "charts", **chart_context())

    # -- health ------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if await mesh().ready():
            return {"status": "ready"}
        return JSONResponse({"status": "router not serving or registry not reached"}, status_code=503)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return Response((HERE / "static" / "favicon.svg").read_bytes(), media_type="image/svg+xml")

    return BodyLimit(app, config.limits.max_upload_bytes)
