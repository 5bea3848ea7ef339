"""The web console in a real browser (Debian's chromium driven by Playwright) against a real mesh
(`maas up`'s LocalMesh, started once for this module, with an admin token on the registry).

Models (the three source models with their aliases; a split changed with the CLI appears without a
reload), Playground (a chat that streams and is stopped — the router counts a CANCELLED Generate;
embeddings; the API key kept for the browser session only; the cat photo; a non-image and an
over-limit image show the router's own error text and the page keeps working), Operations (refused
without / with a wrong token, then done), Charts, and every page at 1280x800 and 390x844 without
console errors or sideways scrolling. Screenshots go to
build/console-screenshots/.
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from maas.client import MeshClient, MeshError
from maas.local.mesh import FREE_PORTS, LocalMesh, MeshConfig
from maas.registry_client import RegistryClient, RegistryError
from maas.registry_client import parse_target
from tests.fixtures.mesh import register_tiny
from tests.fixtures.preprocessing import encode, photo

playwright_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')"
)

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path(os.environ.get("MAAS_CHROMIUM", "/usr/bin/chromium"))
SHOTS = REPO / "build" / "console-screenshots"
TOKEN = "console-test-token"
WIDE, NARROW = {"width": 1280, "height": 800}, {"width": 390, "height": 844}
MODELS = ("minilm", "efficientnet_lite0", "smollm2")

playwright_api.expect.set_options(timeout=30_000)  # a wait, not a bound: the 2 s check names its own

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"no Chromium at {CHROMIUM} (Debian: apt-get install chromium; make browser installs it as root; "
    f"MAAS_CHROMIUM names another)",
)


@pytest.fixture(scope="module")
def console_mesh(tmp_path_factory, otlp_receiver):
    subprocess.run([sys.executable, str(REPO / "tools" / "build_models.py")], check=True, cwd=REPO)
    # Traced, so the trace id a page shows can be looked up among the spans the services exported.
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp_receiver.http_endpoint,
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
        "OTEL_BSP_SCHEDULE_DELAY": "200",
        "OTEL_SDK_DISABLED": "false",
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_TRACES_SAMPLER": "parentbased_always_on",
    }
    saved = os.environ.get("MAAS_ADMIN_TOKEN")
    os.environ["MAAS_ADMIN_TOKEN"] = TOKEN  # the registry's token; also what register_models sends
    try:
        config = MeshConfig(state_dir=tmp_path_factory.mktemp("console-mesh"), ports=FREE_PORTS, env=env)
        with LocalMesh(config) as mesh:
            yield mesh
    finally:
        if saved is None:
            os.environ.pop("MAAS_ADMIN_TOKEN", None)
        else:
            os.environ["MAAS_ADMIN_TOKEN"] = saved


@pytest.fixture(scope="module")
def registry(console_mesh):
    with RegistryClient(console_mesh.registry_address, token=TOKEN, timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with playwright_api.sync_playwright() as driver:
        # --no-sandbox: Chromium's sandbox refuses to run as root (CI and these machines).
        chromium = driver.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(browser, console_mesh):
    context = browser.new_context(viewport=WIDE, base_url=console_mesh.console_url)
    tab = context.new_page()
    tab.errors = []
    tab.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)
    tab.on("pageerror", lambda e: tab.errors.append(f"page error: {e}"))
    tab.set_default_timeout(30_000)
    try:
        yield tab
    finally:
        context.close()


def assert_no_console_errors(tab, refused_statuses=()):
    """Only the failed fetches a test provoked on purpose (Chromium logs each non-2xx answer)."""
    allowed = re.compile(r"Failed to load resource: the server responded with a status of (\d+)")
    unexpected = [e for e in tab.errors if not ((m := allowed.match(e)) and int(m.group(1)) in refused_statuses)]
    assert unexpected == []


def shoot(tab, name: str) -> None:
    tab.screenshot(path=str(SHOTS / f"{name}-1280x800.png"), full_page=True)
    tab.set_viewport_size(NARROW)
    overflow = tab.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    tab.screenshot(path=str(SHOTS / f"{name}-390x844.png"), full_page=True)
    tab.set_viewport_size(WIDE)
    assert overflow <= 0, f"{name}: the page scrolls sideways by {overflow}px on a narrow screen"


def labelled(tab) -> list[str]:
    """Form controls without an accessible label (none expected)."""
    return tab.evaluate("""[...document.querySelectorAll('input:not([type=hidden]), select, textarea')]
        .filter(el => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')).map(el => el.outerHTML)""")


def router_count(mesh, method: str, code: str) -> float:
    with urllib.request.urlopen(f"http://{mesh.addresses['router_metrics']}/metrics", timeout=5) as response:
        text = response.read().decode()
    pattern = re.compile(r"^maas_rpc_server_requests_total\{([^}]*)\} (\S+)$", re.M)
    return sum(
        float(v)
        for labels, v in pattern.findall(text)
        if 'service="router"' in labels and f'method="{method}"' in labels and f'code="{code}"' in labels
    )


def test_models_page_lists_models_and_follows_the_cli(page, console_mesh, registry):
    page.goto("/models")
    for name in MODELS:
        assert page.locator(f"#model-{name} .alias[data-alias=production]").count() == 1
    assert page.locator("#model-smollm2 .alias[data-alias=production]").get_attribute("data-version") == "2"
    assert page.locator("#model-smollm2 .kind").inner_text() == "generator"
    assert page.locator("#model-minilm .kind").inner_text() == "embedding"
    assert page.locator("#model-efficientnet_lite0 .kind").inner_text() == "classifier"
    assert page.locator("#model-smollm2 tr[data-version]").count() == 2
    assert labelled(page) == []
    playwright_api.expect(page.locator("#live-status")).to_have_attribute("data-state", "live")
    page.evaluate("window.__sameDocument = true")
    env = {**os.environ, "MAAS_REGISTRY_ADDRESS": console_mesh.registry_address, "MAAS_ADMIN_TOKEN": TOKEN}
    try:
        subprocess.run(
            [
                str(Path(sys.executable).parent / "maas"),
                "models",
                "traffic",
                "smollm2",
                "v1=30",
                "v2=70",
                "--reason",
                "console test",
            ],
            check=True,
            env=env,
            capture_output=True,
            timeout=60,
        )
        # The bound: the change shows within 2 s of the CLI returning, without a reload.
        playwright_api.expect(page.locator("#model-smollm2 .split-legend")).to_have_attribute(
            "data-split", "v1=30.0 v2=70.0", timeout=2_000
        )
        assert page.evaluate("window.__sameDocument") is True
        assert "console test" in page.locator("#model-smollm2").inner_text()
        shoot(page, "models")
    finally:
        registry.set_traffic("smollm2", [], reason="console test done")
    playwright_api.expect(page.locator("#model-smollm2 .split-legend")).to_have_attribute(
        "data-split", "production=100.0"
    )
    assert_no_console_errors(page)


def test_chat_streams_and_stop_cancels_the_router_call(page, console_mesh):
    cancelled_before = router_count(console_mesh, "Generate", "CANCELLED")
    page.goto("/playground")
    page.fill("#chat-target", "v1")  # fp32: the slower version, so Stop lands mid-answer
    page.fill("#chat-message", "Write a long story about a dragon who learns to fly, with many chapters.")
    page.fill("#chat-max-tokens", "512")
    page.click("#chat-send")
    page.wait_for_function("Number(document.querySelector('#chat-answer')?.dataset.pieces || 0) >= 2")
    assert page.locator("#chat-result .answered-version").inner_text() == "smollm2 v1"
    assert page.locator("#chat-result .answered-reason").inner_text().startswith("explicit version")
    page.click("#chat-stop")
    playwright_api.expect(page.locator("#chat-status")).to_have_attribute("data-state", "stopped")
    pieces = int(page.locator("#chat-answer").get_attribute("data-pieces"))
    assert pieces >= 2 and page.locator("#chat-answer").inner_text().strip()
    deadline = time.monotonic() + 30  # the router records the call when its handler is cancelled
    while router_count(console_mesh, "Generate", "CANCELLED") <= cancelled_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert router_count(console_mesh, "Generate", "CANCELLED") == cancelled_before + 1
    # The page keeps working: a short answer to the end, via the traffic policy.
    page.fill("#chat-target", "")
    page.fill("#chat-message", "Name a colour.")
    page.fill("#chat-max-tokens", "8")
    page.click("#chat-send")
    playwright_api.expect(page.locator("#chat-status")).to_have_attribute("data-state", "done")
    assert page.locator("#chat-result .answered-version").inner_text() == "smollm2 v2"  # production
    assert (
        "traffic policy" in page.locator("#chat-result .answered-reason").inner_text()
        or "default" in page.locator("#chat-result .answered-reason").inner_text()
    )
    assert page.locator("#chat-result .answered-latency").inner_text().endswith("ms to the first message")
    assert_no_console_errors(page)


def test_chat_keeps_the_conversation_until_a_new_one(page, console_mesh):
    """Each message goes with the exchanges before it (the page keeps them: transcript and a hidden field)."""
    page.goto("/playground")

    def ask(text: str) -> int:
        page.fill("#chat-message", text)
        page.fill("#chat-max-tokens", "12")
        page.click("#chat-send")
        status = page.locator("#chat-status")
        playwright_api.expect(status).to_have_attribute("data-state", "done")
        return int(re.search(r"prompt (\d+) tokens", status.inner_text()).group(1))

    first = ask("My name is Ada.")
    assert json.loads(page.locator("#chat-history").input_value())[0] == {"role": "user", "content": "My name is Ada."}
    second = ask("What is my name?")
    turns = page.locator("#chat-transcript li")
    assert turns.count() == 2 and "My name is Ada." in turns.nth(0).inner_text()  # the first exchange moved up
    history = json.loads(page.locator("#chat-history").input_value())
    assert [t["role"] for t in history] == ["user", "assistant", "user", "assistant"]
    assert second > first + 4  # the model saw the first exchange again (its prompt holds it)
    assert "What is my name?" in page.locator("#chat-question").inner_text()
    shoot(page, "playground-conversation")
    page.click("#chat-new")
    assert page.locator("#chat-transcript li").count() == 0 and page.locator("#chat-history").input_value() == ""
    assert ask("Hello.") < second  # a new conversation: no earlier exchange sent
    assert_no_console_errors(page)


def test_embeddings_show_a_similarity_matrix(page, console_mesh, otlp_receiver):
    page.goto("/playground")
    page.locator("#embed-form button[type=submit]").focus()
    page.keyboard.press("Enter")  # keyboard only
    matrix = page.locator("#embed-result table.matrix")
    playwright_api.expect(matrix).to_be_visible()
    cells = [[float(c) for c in row.locator("td.sim").all_inner_texts()] for row in matrix.locator("tbody tr").all()]
    texts = ["A man is eating food.", "A man is eating a piece of bread.", "The new movie is awesome."]
    with MeshClient(console_mesh.router_address) as direct:
        vectors = direct.embed(texts, "minilm").vectors
    expected = (vectors @ vectors.T).round(3)
    assert len(cells) == 3 and all(abs(cells[i][j] - expected[i][j]) <= 0.0011 for i in range(3) for j in range(3))
    assert cells[0][1] > cells[0][2]
    assert page.locator("#embed-result .answered-version").inner_text() == "minilm v1"
    trace_id = page.locator("#embed-result .answered-trace code").inner_text()
    assert re.fullmatch(r"[0-9a-f]{32}", trace_id)
    otlp_receiver.wait_for(
        lambda _: (
            {"maas-console", "maas-router", "maas-tokenizer"}
            <= {span.service for span in otlp_receiver.trace(trace_id)}
        ),
        timeout=40,
    )
    shoot(page, "playground")
    assert_no_console_errors(page)


def test_playground_keeps_the_api_key_for_the_browser_session_only(page, console_mesh):
    """The API key box: the key becomes a session cookie for /playground that the page's scripts cannot
    read, the playground keeps working with it (this mesh's router has auth off and ignores it; a router
    with auth on gets it: tests/integration/test_tenants.py), and Forget key deletes it."""
    page.goto("/playground")
    assert labelled(page) == []
    page.fill("#api-key", "maas_browser-session-key")
    page.click("#key-h ~ form button[type=submit]:not([name=forget])")
    playwright_api.expect(page.locator("#key-state")).to_have_text("A key is set for this session.")
    [cookie] = [c for c in page.context.cookies() if c["name"] == "maas_console_api_key"]
    assert cookie["value"] == "maas_browser-session-key" and cookie["httpOnly"] and cookie["path"] == "/playground"
    assert cookie["expires"] == -1 and cookie["sameSite"] == "Strict"  # a session cookie
    assert "maas_browser-session-key" not in page.evaluate("document.cookie")
    assert page.locator("#api-key").input_value() == ""  # not written back into the page
    page.click("#embed-form button[type=submit]")
    playwright_api.expect(page.locator("#embed-result table.matrix")).to_be_visible()
    page.click("#key-h ~ form button[name=forget]")
    playwright_api.expect(page.locator("#key-state")).to_have_text("No key set: calls go without one.")
    assert not [c for c in page.context.cookies() if c["name"] == "maas_console_api_key"]
    assert_no_console_errors(page)


def test_classify_the_cat_and_show_the_services_refusals(page, console_mesh, tmp_path):
    cat = tmp_path / "chelsea.jpg"
    cat.write_bytes(encode(photo("chelsea")))
    notes = tmp_path / "notes.txt"
    notes.write_text("this is not an image\n")
    thin = tmp_path / "thin.png"  # 2100 x 100: over the vision service's aspect-ratio cap (20), a small file
    buffer = io.BytesIO()
    Image.new("RGB", (2100, 100), "white").save(buffer, "PNG")
    thin.write_bytes(buffer.getvalue())

    def classify(path: Path):
        page.set_input_files("#classify-image", str(path))
        page.click("#classify-form button[type=submit]")

    def router_error(path: Path) -> str:
        with MeshClient(console_mesh.router_address) as direct, pytest.raises(MeshError) as caught:
            direct.classify([path.read_bytes()])
        return caught.value

    page.goto("/playground")
    classify(cat)
    playwright_api.expect(page.locator("#classify-result table.topk")).to_be_visible()
    assert "cat" in page.locator("#classify-result th.label").first.inner_text()
    assert page.locator("#classify-result .answered-version").inner_text() == "efficientnet_lite0 v1"
    statuses = []
    for path, status in ((notes, 400), (thin, 429)):
        expected = router_error(path)
        classify(path)
        error = page.locator("#classify-result[role=alert], #classify-result [role=alert]")
        playwright_api.expect(error).to_contain_text(expected.code.name)
        assert page.locator("#classify-result .error-text").inner_text() == expected.details
        statuses.append(status)
    assert "RESOURCE_EXHAUSTED" in page.locator("#classify-result").inner_text()
    classify(cat)  # the page keeps working
    playwright_api.expect(page.locator("#classify-result table.topk")).to_be_visible()
    assert "cat" in page.locator("#classify-result th.label").first.inner_text()
    assert_no_console_errors(page, refused_statuses=statuses)


def test_operations_show_refusals_then_change_the_mesh(page, console_mesh, registry):
    page.goto("/operations")
    assert labelled(page) == []
    result = page.locator("#operation-result")

    def set_alias(version: str, alias: str = "canary"):
        page.select_option("#alias-model", "smollm2")
        page.fill("#alias-alias", alias)
        page.fill("#alias-version", version)
        page.fill("#alias-reason", "console test")
        page.click("#alias-form button[type=submit]")

    def api_error(token: str) -> RegistryError:
        with (
            RegistryClient(console_mesh.registry_address, token=token) as client,
            pytest.raises(RegistryError) as caught,
        ):
            client.set_alias("smollm2", "canary", 1)
        return caught.value

    set_alias("1")  # no token yet
    expected = api_error("")
    playwright_api.expect(result).to_contain_text("401 UNAUTHENTICATED")
    assert page.locator("#operation-result .error-text").inner_text() == expected.message
    page.fill("#token", "wrong-token")
    page.click("text=Use token")
    set_alias("1")
    playwright_api.expect(result).to_contain_text("403 PERMISSION_DENIED")
    assert page.locator("#operation-result .error-text").inner_text() == api_error("wrong-token").message
    page.fill("#token", TOKEN)
    page.click("text=Use token")
    playwright_api.expect(page.locator("#token-state")).to_contain_text("A token is set")
    set_alias("99")  # no such version: the registry's own refusal
    playwright_api.expect(result.locator("[role=alert]")).to_be_visible()
    assert "99" in page.locator("#operation-result .error-text").inner_text()
    set_alias("1")
    playwright_api.expect(result).to_contain_text("Done — smollm2: canary → v1")
    assert {a.name: a.version for a in registry.get_model("smollm2").aliases}["canary"] == 1
    try:
        page.select_option("#split-model", "smollm2")
        page.fill("#split-split", "production=80 canary=20")
        page.click("#split-form button[type=submit]")
        playwright_api.expect(result).to_contain_text("Done — smollm2: split production=80 canary=20")
        page.select_option("#shadow-model", "smollm2")
        page.fill("#shadow-target", "v1")
        page.fill("#shadow-fraction", "10")
        page.click("#shadow-form button:has-text('Start shadow')")
        playwright_api.expect(result).to_contain_text("Done — smollm2: shadow v1 at 10%")
        policy = registry.get_model("smollm2").policy
        assert [t.weight for t in policy.split] == [80, 20] and policy.shadow.fraction == pytest.approx(0.1)
        page.click("#shadow-form button:has-text('Stop shadow')")
        playwright_api.expect(result).to_contain_text("Done — smollm2: shadow stopped")
        set_alias("1", alias="production")
        playwright_api.expect(result).to_contain_text("production → v1 (was v2)")
        page.select_option("#rollback-model", "smollm2")
        page.click("#rollback-form button[type=submit]")
        playwright_api.expect(result).to_contain_text("production rolled back to v2")
        assert {a.name: a.version for a in registry.get_model("smollm2").aliases}["production"] == 2
        shoot(page, "operations")
    finally:
        registry.set_traffic("smollm2", [], reason="console test done")
    assert_no_console_errors(page, refused_statuses=(401, 403, 400, 404))


def test_charts_draw_the_routers_metrics(page, console_mesh):
    with MeshClient(console_mesh.router_address) as direct:
        direct.embed(["traffic for the charts"], "minilm")
    page.goto("/charts")
    playwright_api.expect(page.locator("svg.chart")).to_have_count(4)
    # The page refreshes itself; the rate series appears once two reads saw the router's counters.
    playwright_api.expect(page.locator(".chart-card").first.locator("table.legend")).to_contain_text("minilm v1")
    # Latency per version (the router's maas_router_version_duration_seconds), not per method.
    playwright_api.expect(page.locator(".chart-card").nth(2).locator("table.legend")).to_contain_text("minilm v1")
    shoot(page, "charts")
    assert_no_console_errors(page)


def test_pages_work_without_script(browser, console_mesh):
    """Progressive enhancement: with JavaScript off every form posts and the whole page comes back."""
    context = browser.new_context(viewport=WIDE, base_url=console_mesh.console_url, java_script_enabled=False)
    try:
        tab = context.new_page()
        tab.goto("/playground")
        tab.click("#embed-form button[type=submit]")
        tab.wait_for_url("**/playground/embed")
        assert tab.locator("#embed-result table.matrix tbody tr").count() == 3
        tab.fill("#chat-message", "Name a colour.")
        tab.fill("#chat-max-tokens", "4")
        tab.click("#chat-send")
        tab.wait_for_url("**/playground/chat")
        assert tab.locator("#chat-answer").inner_text().strip()
        assert tab.locator("#chat-result .answered-version").inner_text().startswith("smollm2 v")
        tab.goto("/operations")
        tab.fill("#alias-version", "1")
        tab.click("#alias-form button[type=submit]")
        tab.wait_for_url("**/operations/alias")
        assert "401 UNAUTHENTICATED" in tab.locator("#operation-result").inner_text()
        tab.goto("/models")
        assert tab.locator("#model-smollm2 .alias[data-alias=production]").count() == 1
    finally:
        context.close()


def test_models_page_draws_the_shadow_agreement_histogram(page, console_mesh, registry, tmp_path):
    """A shadowed pair's card shows the registry's report: the cosine distribution as a bar per bucket."""
    import numpy as np

    v1 = register_tiny(registry, "shadowed_tiny", tmp_path, scale=1.0)
    v2 = register_tiny(registry, "shadowed_tiny", tmp_path, scale=3.0)
    registry.set_alias("shadowed_tiny", "production", v1)
    registry.set_traffic("shadowed_tiny", [], shadow=parse_target(str(v2)), shadow_fraction=1.0)
    with MeshClient(console_mesh.router_address) as client:
        shadowed, deadline = 0, time.monotonic() + 30
        while shadowed < 5:
            assert time.monotonic() < deadline, "the shadow policy never reached the router"
            shadowed += client.infer("shadowed_tiny", {"x": np.ones((2, 4), np.float32)}).routed.shadowed
    card = page.locator("#model-shadowed_tiny")
    deadline = time.monotonic() + 30
    while True:  # the routers report shadow results every second or so
        page.goto("/models")
        if card.locator("figure.agreement svg.histogram").count() == 1:
            break
        assert time.monotonic() < deadline, card.inner_text()
        time.sleep(1)
    bars = card.locator("figure.agreement svg.histogram rect")
    assert bars.count() > 1
    assert "cosine agreement of shadowed_tiny v1 vs v2" in card.locator("svg.histogram").get_attribute("aria-label")
    assert f"v{v1} → v{v2}" in card.locator("figure.agreement figcaption").inner_text()
    shoot(page, "models-shadow-histogram")
    assert_no_console_errors(page)


def test_operations_show_rollout_progress_and_the_audit_log(page, console_mesh, registry, tmp_path):
    from maas.v1 import registry_pb2 as pb

    v1 = register_tiny(registry, "rolled_tiny", tmp_path, scale=1.0)
    v2 = register_tiny(registry, "rolled_tiny", tmp_path, scale=2.0)
    registry.set_alias("rolled_tiny", "production", v1)
    # A long interval: the rollout stays at its first step while the page is looked at.
    registry.start_rollout(
        "rolled_tiny",
        v2,
        pb.RolloutPolicy(step_weight=10, interval_seconds=300, max_weight=50),
        reason="console rollout test",
    )
    try:
        page.goto("/operations")
        playwright_api.expect(page.locator("#audit [role=alert]")).to_contain_text("UNAUTHENTICATED")  # no token yet
        row = page.locator("#rollouts tr[data-model=rolled_tiny]")
        assert row.get_attribute("data-state") == "running"
        assert (
            row.locator("progress").get_attribute("value") == "10"
            and row.locator("progress").get_attribute("max") == "50"
        )
        assert f"v{v2} (production v{v1})" in row.inner_text()
        page.fill("#token", TOKEN)
        page.click("text=Use token")
        audit = page.locator("#audit table.audit")
        playwright_api.expect(audit).to_contain_text("rollout.started")
        assert "model/rolled_tiny" in audit.inner_text() and "console rollout test" in audit.inner_text()
        assert labelled(page) == []
        shoot(page, "operations-rollout")
    finally:
        registry.abort_rollout("rolled_tiny", reason="console test done")
    page.goto("/operations")
    assert page.locator("#rollouts tr[data-model=rolled_tiny]").get_attribute("data-state") == "aborted"
    assert_no_console_errors(page)
