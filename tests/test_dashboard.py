"""The dashboard in a real browser: headless Chromium (Debian's package, driven by Playwright) against the
real pipeline (Mosquitto with broker_config, PostgreSQL, ingest, the API on uvicorn) while the live
simulator's boxes publish, as in ``molo demo``.

The pipeline gets a database and a Mosquitto (broker_config, the run's credentials) of its own, so the
page shows exactly the demo's boxes, and no other test's ingest session in the shared subscription
group can take a share of its messages. Boxes box-015 .. box-020 belong to this module.
The screenshot is saved to ``test-artifacts/dashboard.png`` (ignored by git).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from playwright.sync_api import Route, sync_playwright

from backend.access.keys import Role, create_key
from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.dashboard import STATIC_DIR
from backend.ingest.run import build_worker
from backend.migrate import migrate
from backend.operations.alerts import AlertKind, raise_alert
from backend.operations.live import LiveEvent, notify, status_data
from backend.settings import Settings, TimescaleMode
from contract.messages import SCHEMA_VERSION, Status, StatusReason, encode
from contract.topics import MessageKind, topic_for
from molo.brokers import RunningBroker, start_mosquitto
from molo.postgres import create_database, drop_database
from molo.provision import Credentials
from molo.registry import register_boxes
from network import FJORD_LINE, Network
from simulator.live import run_live
from simulator.params import resolve
from tests.fixtures.broker import close, mqtt_client, publish
from tests.fixtures.pipeline import renamed_network, settings_for, wait_for

#: Debian's chromium (molo.sh installs it); MOLO_CHROMIUM_BIN names another build.
CHROMIUM = Path(os.environ.get("MOLO_CHROMIUM_BIN", "/usr/bin/chromium"))
#: The flags this machine's headless Chromium needs (no sandbox as root, no calls home).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
ARTIFACTS = Path(__file__).parent.parent / "test-artifacts"
IDS = [f"box-{n:03d}" for n in range(15, 21)]
#: Spread over the city, both sides of the Limfjord: indices into the 50 Aalborg boxes.
PICK = [0, 14, 21, 28, 42, 49]
#: The box whose Last Will the test publishes. It runs no firmware: the test brings it online with a
#: birth and takes it offline with the will, both under its own identity. (A live box's firmware would
#: lose its connection to the test's client under the same client id, reconnect within its first
#: backoff, at most 0.5 s, and its new birth would clear the alert before the page lists it.)
VICTIM = IDS[3]


@dataclass
class Demo:
    url: str
    token: str
    database_url: str
    network: Network
    broker: RunningBroker


def demo_world() -> tuple[Any, Network]:
    """The demo's scenario (telemetry every 30 simulated minutes), six of its boxes renamed to test ids,
    with no random outages (the test makes its own)."""
    scenario = resolve(overrides=["simulation.telemetry_interval_min=30", "faults.box_offline_mtbf_days=100000"])
    return scenario, renamed_network(scenario, IDS, PICK)


@pytest.fixture(scope="module")
def demo(pg_admin_url: str, credentials: Credentials, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The demo pipeline on its own database and broker: boxes registered and publishing live, an
    operator key."""
    broker = start_mosquitto(tmp_path_factory.mktemp("dashboard-mosquitto"), credentials)
    url = create_database(pg_admin_url, "molo_dashboard")
    migrate(url, TimescaleMode.OFF)
    scenario, network = demo_world()
    register_boxes(url, network.boxes)
    with psycopg.connect(url, autocommit=True) as conn:
        token = create_key(conn, role=Role.OPERATOR, name="dashboard test").token
    worker = build_worker(settings_for(url, broker, credentials))
    worker.start()
    assert worker.mqtt.subscribed.wait(10), worker.mqtt.last_error
    server = ApiServer(create_app(settings_for(url, broker, credentials))).start()  # with a broker: commands
    stop = threading.Event()
    victim = next(b for b in network.boxes if b.id == VICTIM)
    publish_status(broker, credentials, Status(v=SCHEMA_VERSION, box_id=VICTIM, online=True, session=1,
                                               reason=StatusReason.BIRTH, layout=victim.layout))  # fmt: skip
    sim = threading.Thread(
        target=run_live,
        name="dashboard-sim",
        kwargs={
            "scenario": scenario,
            "host": broker.host,
            "port": broker.port,
            "passwords": credentials.boxes,
            "state_dir": tmp_path_factory.mktemp("dashboard-boxes"),
            "speed": 3600.0,
            "network": network.model_copy(update={"boxes": [b for b in network.boxes if b.id != VICTIM]}),
            "stop": stop,
        },
        daemon=True,
    )
    sim.start()
    try:
        yield Demo(url=server.url, token=token, database_url=url, network=network, broker=broker)
    finally:
        stop.set()
        sim.join(90)
        worker.retire(quiet_s=0.2)
        server.stop()
        broker.stop()
        drop_database(url, pg_admin_url)


def publish_status(broker: RunningBroker, credentials: Credentials, status: Status) -> None:
    """A retained status on the box's topic, under the box's own identity."""
    client = mqtt_client(broker, status.box_id, credentials.boxes[status.box_id])
    try:
        topic = topic_for(status.box_id, MessageKind.STATUS)
        assert not publish(client, topic, encode(status), retain=True).is_failure
    finally:
        close(client)


def publish_last_will(broker: RunningBroker, credentials: Credentials, box_id: str, session: int) -> None:
    """What the broker publishes when a box's connection dies: the retained offline status of its session."""
    will = Status(v=SCHEMA_VERSION, box_id=box_id, online=False, session=session, reason=StatusReason.CONNECTION_LOST)
    publish_status(broker, credentials, will)


def test_plan_data_carries_the_simulators_fjord_line() -> None:
    """The plan's Limfjord line is network.FJORD_LINE, point for point."""
    plan = json.loads((STATIC_DIR / "plan.json").read_text(encoding="utf-8"))
    assert [tuple(p) for p in plan["fjord_line"]] == list(FJORD_LINE)


def test_dashboard_is_served_with_its_assets_and_no_outside_sources(demo: Demo) -> None:
    """/dashboard and its static files answer with a same-origin-only CSP; the page names no other host;
    neither is part of the OpenAPI schema."""
    page = httpx.get(f"{demo.url}/dashboard", timeout=10)
    assert page.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "connect-src 'self'" in page.headers["content-security-policy"]
    for name in ("dashboard.js", "dashboard.css", "plan.json"):
        asset = httpx.get(f"{demo.url}/dashboard/static/{name}", timeout=10)
        assert asset.status_code == 200, name
        assert "http://" not in asset.text.replace("http://www.w3.org/2000/svg", ""), name
        assert "https://" not in asset.text, name
    assert httpx.get(f"{demo.url}/dashboard/static/../routes.py", timeout=10).status_code == 404
    paths = httpx.get(f"{demo.url}/openapi.json", timeout=10).json()["paths"]
    assert not any(p.startswith("/dashboard") for p in paths)


def test_dashboard_in_chromium_shows_the_demo_and_follows_a_status_change(demo: Demo, credentials: Credentials) -> None:
    """In headless Chromium the dashboard (key from the URL fragment) shows every box of the running demo
    on the plan, a box's compartments on click, the KPIs with their chart and the alerts; when a box's
    Last Will arrives its marker turns offline and its alert appears, without a reload; without a key
    the page asks for one; nothing is fetched from outside the API's origin; a screenshot is saved."""
    if not CHROMIUM.exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM} (apt-get install chromium)", pytrace=False)
    with httpx.Client(base_url=demo.url, headers={"X-API-Key": demo.token}, timeout=10) as api:
        check_in_browser(demo, api, credentials)


@contextmanager
def busy_stream(database_url: str, box_id: str, every_s: float = 0.05) -> Iterator[None]:
    """While inside, the live stream carries an unchanged ``box.status`` of ``box_id`` every ``every_s``."""
    stop = threading.Event()

    def chatter() -> None:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while not stop.wait(every_s):
                notify(conn, LiveEvent.BOX_STATUS, status_data(box_id, True, "birth", None, None))

    thread = threading.Thread(target=chatter, name="busy-stream", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=5)


def colouring_alerts(api: httpx.Client, box_id: str) -> list[str]:
    """Kinds of the box's open alerts that colour it (critical or warning)."""
    listed = api.get("/api/v1/alerts", params={"box_id": box_id, "state": "open"}).json()
    items = listed if isinstance(listed, list) else listed["items"]
    return [a["kind"] for a in items if a["severity"] != "info"]


def check_severity_colours(page: Any, demo: Demo, api: httpx.Client) -> None:
    """Raise an info and a warning alert the way the ingest does (raise_alert, in the demo's database,
    notified on the stream) and check how the page colours their boxes."""
    boxes = {b["box_id"]: b for b in api.get("/api/v1/boxes").json()}
    calm = next(b for b in IDS[:3] if boxes[b]["online"] and not colouring_alerts(api, b))
    watched = next(b for b in IDS[:3] if b != calm and boxes[b]["online"])
    with psycopg.connect(demo.database_url, autocommit=True) as conn:
        message = f"parcel SEV-1 in compartment 1 of box {calm} expires in 3.0 h"
        raise_alert(conn, box_id=calm, kind=AlertKind.PARCEL_NEAR_EXPIRY, subject="SEV-1", compartment=1,
                    message=message, raised_by="test")  # fmt: skip
    page.wait_for_selector(f'#alerts tr[data-box-id="{calm}"]', timeout=8_000)
    listed = {b["box_id"]: b for b in api.get("/api/v1/boxes").json()}[calm]
    assert "parcel_near_expiry" in listed["open_alert_kinds"]
    if not colouring_alerts(api, calm):  # nothing else of that box needs an operator meanwhile
        assert listed["alert_level"] is None
        time.sleep(0.5)  # the refresh that listed the alert has drawn the plan too
        assert page.locator(f'#plan .box[data-box-id="{calm}"]').get_attribute("data-status") == "online"
    with psycopg.connect(demo.database_url, autocommit=True) as conn:
        raise_alert(conn, box_id=watched, kind=AlertKind.RED_BOX_NEAR_LIMIT, subject="SEV-2", compartment=None,
                    message=f"red box of box {watched} is near its limit", raised_by="test")  # fmt: skip
    page.wait_for_selector(f'#plan .box[data-box-id="{watched}"][data-status="alerting"]', timeout=8_000)
    assert {b["box_id"]: b for b in api.get("/api/v1/boxes").json()}[watched]["alert_level"] in {"warning", "critical"}
    title = page.locator(f'#plan .box[data-box-id="{watched}"] title').text_content() or ""
    assert "red box near limit" in title

    # The operator's alert panel: by default the most severe first; filtered to info it lists only the
    # info alerts; an info alert acknowledged from its row is acknowledged in the API too.
    rows = page.locator("#alerts tr.alert-row")
    severities = rows.evaluate_all("rs => rs.map(r => r.dataset.severity)")
    rank = {"critical": 0, "warning": 1, "info": 2}
    assert [rank[s] for s in severities] == sorted(rank[s] for s in severities), severities
    page.select_option("#alert-severity", "info")
    assert set(rows.evaluate_all("rs => rs.map(r => r.dataset.severity)")) == {"info"}
    row = page.locator(f'#alerts tr.alert-row[data-box-id="{calm}"][data-severity="info"]')
    alert_id = row.get_attribute("data-alert-id")
    row.locator("button.ack").click()
    page.wait_for_selector(f'#alerts tr.alert-row[data-alert-id="{alert_id}"] .acknowledged', timeout=8_000)
    acked = api.get(f"/api/v1/alerts/{alert_id}").json()
    assert acked["acknowledged_at"] is not None
    assert acked["acknowledged_by"].startswith("dashboard test")
    page.select_option("#alert-severity", "all")
    page.select_option("#alert-sort", "box")
    boxes_in_order = rows.evaluate_all("rs => rs.map(r => r.dataset.boxId)")
    assert boxes_in_order == sorted(boxes_in_order)


def check_history(page: Any, api: httpx.Client, box_id: str) -> None:
    """The detail's history over the last 24 h of the box's clock: a line per series, drawn from the
    history endpoint's buckets (as many points as buckets with a reading)."""
    with page.expect_response(lambda r: "/history?" in r.url) as answer:
        page.locator('#detail button.history-range[data-range="24 h"]').click()
    items = answer.value.json()["items"]
    assert answer.value.status == 200
    assert items, "the box has telemetry every 30 simulated minutes"
    line = page.locator('#history svg.series[data-series="temperature_mean_c"] polyline')
    line.wait_for(state="attached", timeout=10_000)  # a flat line (the stub's constant 8 °C) has no height
    points = (line.get_attribute("points") or "").split()
    assert len(points) == len(items)
    assert "temperature:" in page.locator("#history").inner_text()
    assert page.locator('#detail button.history-range[data-range="24 h"]').get_attribute("aria-pressed") == "true"


def check_commands(page: Any, api: httpx.Client, box_id: str) -> None:
    """From the open box's detail, an operator sends a ping and follows it to the box's answer; a
    command the API refuses shows the API's code on the page and is not sent."""
    page.locator("#command-form").wait_for(timeout=10_000)
    page.select_option("#command-action", "ping")
    page.click("#command-form button[type=submit]")
    page.wait_for_selector("#command-message[data-kind=ok]", timeout=10_000)
    done = page.locator('#commands li[data-status="succeeded"]').first
    done.wait_for(timeout=30_000)
    command_id = done.get_attribute("data-command-id")
    assert api.get(f"/api/v1/commands/{command_id}").json()["status"] == "succeeded"
    assert "ping" in done.inner_text()
    page.select_option("#command-action", "open_compartment")
    page.fill("#command-compartment", "")  # no door given: the API refuses (the browser checks only 1..64)
    page.click("#command-form button[type=submit]")
    page.wait_for_selector("#command-message[data-kind=error]", timeout=10_000)
    assert "not sent: invalid_request" in page.locator("#command-message").inner_text()
    assert [c["action"] for c in api.get(f"/api/v1/boxes/{box_id}/commands").json()] == ["ping"]


def check_kpi_headline(page: Any, kpis: dict[str, Any]) -> None:
    """The largest number is the whole number of motorised vehicle trips avoided (no decimals), with
    a table by actor and mode beside it holding at least the modes of an earlier answer (modes only
    appear as activity accumulates), walking and cycling among them once residents fetched parcels."""
    value = page.locator("#kpi-trips .value").inner_text()
    assert re.fullmatch(r"-?\d{1,3}(,\d{3})*", value), value
    assert "motorised vehicle trips avoided" in page.locator("#kpi-trips").inner_text()
    shown = set(page.locator("#kpi-modes tbody tr").evaluate_all("rows => rows.map(r => r.dataset.mode)"))
    assert set(kpis["modes"]) <= shown <= {"van", "truck", "car", "walk_cycle"}
    if kpis["activity"]["parcels_collected"]:
        assert "walk_cycle" in shown


def check_kpi_chart(page: Any) -> None:
    """The chart has a scale on both sides (round ticks, zero among the per-day ones), every bar stays
    inside the plot, and the boxes' current day, not over yet, is drawn apart and labelled "so far"."""
    left = page.locator("#kpi-chart text.y-tick:not(.total-tick)").all_text_contents()
    right = page.locator("#kpi-chart text.total-tick").all_text_contents()
    assert len(left) >= 2, left
    assert len(right) >= 2, right
    assert any(t.strip().startswith("0") for t in left), left
    box = page.evaluate("""() => {
        const chart = document.getElementById("kpi-chart");
        const [, , , height] = chart.getAttribute("viewBox").split(" ").map(Number);
        const bars = [...chart.querySelectorAll("rect.bar")].map((r) => ({
            top: Number(r.getAttribute("y")), bottom: Number(r.getAttribute("y")) + Number(r.getAttribute("height")),
            partial: r.classList.contains("partial"), day: r.dataset.day }));
        const clock = document.getElementById("clock").textContent;
        return { height, bars, clock };
    }""")
    assert box["bars"], box
    assert all(0 <= b["top"] <= b["bottom"] <= box["height"] - 28 + 0.1 for b in box["bars"]), box
    assert not any(b["partial"] for b in box["bars"][:-1]), box  # only the newest day can be unfinished
    if box["bars"][-1]["day"] in box["clock"]:  # the boxes are on that day now
        assert box["bars"][-1]["partial"], box
        assert "so far" in (page.locator("#kpi-chart").text_content() or "")


def check_in_browser(demo: Demo, api: httpx.Client, credentials: Credentials) -> None:
    """The browser part of the test above (``api`` authenticates as the operator)."""

    def statuses() -> dict[str, Any]:
        return {b["box_id"]: (b["online"], b["status_reason"]) for b in api.get("/api/v1/boxes").json()}

    try:
        wait_for(lambda: [s[0] for s in statuses().values()] == [True] * len(IDS), timeout=60)
    except AssertionError as exc:
        raise AssertionError(f"not every box came online: {statuses()}") from exc

    outside: list[str] = []
    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("request", lambda r: None if r.url.startswith(demo.url) else outside.append(r.url))
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{demo.url}/dashboard#key={demo.token}&poll=60")  # live updates must come by stream

            markers = page.locator("#plan .box[data-box-id]")
            markers.first.wait_for(timeout=15_000)
            page.wait_for_function(
                "n => document.querySelectorAll('#plan .box[data-status=online]').length === n", arg=len(IDS)
            )
            assert sorted(markers.evaluate_all("ms => ms.map(m => m.dataset.boxId)")) == IDS
            assert page.locator("#unplaced").is_hidden()
            assert "key=" not in page.url  # the key left the address bar ...
            assert page.evaluate("sessionStorage.getItem('molo.apiKey')") == demo.token  # ... for this tab
            assert page.locator("#plan polyline.fjord").count() == 1

            # A box's detail: its compartments as the box announced them.
            box_id = IDS[0]
            expected = len(demo.network.boxes[0].layout.compartments)
            page.locator(f'#plan .box[data-box-id="{box_id}"] circle').click()
            page.locator("#detail .compartment").nth(expected - 1).wait_for(timeout=10_000)
            assert page.locator("#detail .compartment").count() == expected
            assert box_id in page.locator("#detail").inner_text()
            check_history(page, api, box_id)
            check_commands(page, api, box_id)

            # KPIs, once the first activity is stored: the totals and a chart bar per day (or, on a
            # server without the KPI endpoint, the plain "no KPI data").
            if api.get("/api/v1/kpis").status_code == 404:
                page.get_by_text("no KPI data").first.wait_for(timeout=10_000)
            else:
                kpis = wait_for(
                    lambda: (
                        (r := api.get("/api/v1/kpis", params={"group_by": "day"})).is_success
                        and r.json()["groups"]
                        and r
                    ),
                    60,
                )
                page.locator("#kpis .kpi-totals").wait_for(timeout=20_000)
                page.locator("#kpi-chart rect.bar").first.wait_for(timeout=20_000)  # visible
                assert kpis.json()["groups"][0]["key"]["day"] in page.locator("#kpi-chart").inner_html()
                check_kpi_chart(page)
                check_kpi_headline(page, kpis.json())
            has_alerts = api.get("/api/v1/alerts").status_code != 404
            page.locator("#alerts table, #alerts p").first.wait_for(timeout=10_000)
            assert "Alerts unavailable" not in page.locator("#alerts").inner_text()

            # A status change: the box's Last Will arrives; the page, on the live stream, follows
            # without a reload.
            page.wait_for_selector("#connection[data-state=stream]", timeout=10_000)
            assert page.locator("#connection").inner_text() == "live (server-sent events)"
            page.evaluate("window.__sameDocument = true")
            victim = VICTIM
            session = {b["box_id"]: b for b in api.get("/api/v1/boxes").json()}[victim]["session"]
            # A busy stream (an event every 50 ms, more often than the page's 200 ms refresh delay) must
            # not keep postponing the refresh that brings the alert.
            with busy_stream(demo.database_url, IDS[5]):
                publish_last_will(demo.broker, credentials, victim, session)
                page.wait_for_selector(f'#plan .box[data-box-id="{victim}"][data-status="offline"]', timeout=20_000)
                assert page.evaluate("window.__sameDocument === true")
                assert page.locator("#legend li[data-status=offline]").get_attribute("data-count") == "1"
                title = page.locator(f'#plan .box[data-box-id="{victim}"] title').text_content() or ""
                assert "Last Will" in title
                if has_alerts:  # the offline alert the Last Will raised shows up too, well before the 10 s poll
                    page.wait_for_selector(f'#alerts tr[data-box-id="{victim}"]', timeout=8_000)

            # Severity (docs/operations.md): an info alert (a parcel near the end of its pickup window) is
            # listed but leaves its box green; a warning (a red box near its limit) colours its box.
            if has_alerts:
                check_severity_colours(page, demo, api)

            # Without a key (a new tab: empty sessionStorage) the page asks for one, then shows the boxes.
            other = browser.new_page()
            other.on("request", lambda r: None if r.url.startswith(demo.url) else outside.append(r.url))
            other.on("pageerror", lambda e: errors.append(str(e)))
            other.goto(f"{demo.url}/dashboard")
            other.locator("#key-dialog[open]").wait_for(timeout=10_000)
            other.fill("#key-input", demo.token)
            other.click("#key-form button[type=submit]")
            other.wait_for_function(
                "n => document.querySelectorAll('#plan .box[data-box-id]').length === n", arg=len(IDS)
            )
            other.close()

            page.locator(f'#plan .box[data-box-id="{box_id}"] circle').click()  # keep a detail open for the picture
            page.locator("#detail .compartment").first.wait_for()
            time.sleep(0.5)
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            print(f"dashboard screenshot: {shot}")
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
    assert outside == [], f"the page fetched from outside its origin: {outside}"
    assert errors == [], f"the page raised: {errors}"


# ------------------------------------------------------------------------------------ experiments page

#: A small experiment: 2 points x 2 replications on 3 boxes for 4 days.
SMALL_EXPERIMENT = """name = "page-study"
description = "submitted from the dashboard"
seed = 5
days = 4
warmup_days = 1
[set]
"network.boxes" = 3
[design]
kind = "list"
[[design.points]]
name = "base"
[[design.points]]
name = "share-30"
set = { "demand.locker_share" = 0.30 }
[replications]
n = 2
[metrics]
summary = ["parcels.collected"]
impact = ["avoided.kg_co2e_wtw"]
per_box = ["avoided.kg_co2e_wtw"]
"""


@dataclass
class ExperimentsSite:
    url: str
    token: str
    jobs: Path


@pytest.fixture(scope="module")
def experiments_site(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ExperimentsSite]:
    """The API on a database of its own with a researcher key, and a real ``molo worker`` running its jobs."""
    url = create_database(pg_admin_url, "molo_dashboard_experiments")
    migrate(url, TimescaleMode.OFF)
    with psycopg.connect(url, autocommit=True) as conn:
        token = create_key(conn, role=Role.RESEARCHER, name="dashboard researcher").token
    jobs = tmp_path_factory.mktemp("dashboard-experiment-jobs")
    server = ApiServer(create_app(Settings(database_url=url, experiments_dir=jobs))).start()
    env = {**os.environ, "MOLO_DATABASE_URL": url, "MOLO_EXPERIMENTS_DIR": str(jobs), "MOLO_EXPERIMENT_PROCESSES": "1"}
    log_path = tmp_path_factory.mktemp("dashboard-worker") / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "molo.cli", "worker"], env=env, cwd=jobs, stdout=log, stderr=subprocess.STDOUT
        )
    try:
        yield ExperimentsSite(url=server.url, token=token, jobs=jobs)
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        print(f"--- molo worker\n{log_path.read_text(errors='replace')[-4000:]}")
        server.stop()
        drop_database(url, pg_admin_url)


def test_experiments_page_submits_a_job_shows_its_progress_and_opens_its_report(
    experiments_site: ExperimentsSite,
) -> None:
    """In headless Chromium the experiments page (researcher key from the URL fragment) refuses a bad file
    with the API's message, submits a small experiment, lists it with its progress until the worker has
    stored all 4 replications, and opens the runner's report in its sandboxed frame; its assets are served
    with a same-origin policy and nothing is fetched from elsewhere."""
    if not CHROMIUM.exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM} (apt-get install chromium)", pytrace=False)
    site = experiments_site
    page_response = httpx.get(f"{site.url}/dashboard/experiments", timeout=10)
    assert page_response.status_code == 200
    assert "frame-src blob:" in page_response.headers["content-security-policy"]
    for name in ("experiments.js", "experiments.css"):
        asset = httpx.get(f"{site.url}/dashboard/static/{name}", timeout=10)
        assert asset.status_code == 200, name
        assert "http://" not in asset.text, name
        assert "https://" not in asset.text, name
    outside: list[str] = []
    errors: list[str] = []
    progress_seen: set[str] = set()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1300})
            page.on(
                "request", lambda r: None if r.url.startswith((site.url, "blob:", "data:")) else outside.append(r.url)
            )
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{site.url}/dashboard/experiments#key={site.token}&poll=1")
            page.get_by_text("No experiments yet").wait_for(timeout=15_000)
            assert "key=" not in page.url

            # A bad file: the API's one-line message, shown as it came.
            page.fill("#experiment-source", SMALL_EXPERIMENT.replace('"network.boxes"', '"network.boxess"'))
            page.click("#submit-form button[type=submit]")
            page.wait_for_selector("#submit-message[data-kind=error]", timeout=10_000)
            message = page.locator("#submit-message").inner_text()
            assert message.startswith("invalid_experiment: experiment.toml:"), message
            assert "network.boxess" in message

            page.fill("#experiment-source", SMALL_EXPERIMENT)
            page.click("#submit-form button[type=submit]")
            page.wait_for_selector("#submit-message[data-kind=ok]", timeout=15_000)
            row = page.locator("#experiments tr.job-row").first
            row.wait_for(timeout=10_000)
            experiment_id = row.get_attribute("data-experiment-id")
            assert experiment_id is not None
            assert "page-study" in row.inner_text()
            deadline = time.monotonic() + 240
            # One reading of the status per turn: read twice, the job could finish in between.
            while (status := row.get_attribute("data-status")) != "succeeded":
                assert status in {"queued", "running"}, row.inner_text()
                progress_seen.add(row.locator(".progress-text").inner_text())
                assert time.monotonic() < deadline, f"not done: {row.inner_text()}"
                time.sleep(0.2)
            assert row.locator(".progress-text").inner_text() == "4 / 4"
            assert row.locator("progress").get_attribute("value") == "4"
            assert progress_seen <= {f"{n} / 4" for n in range(5)}

            row.locator("button.open-report").wait_for(timeout=10_000)
            row.locator("button.open-report").click()
            page.wait_for_selector("#report-panel:not([hidden])", timeout=10_000)
            assert page.locator("#report-frame").get_attribute("data-experiment-id") == experiment_id
            frame = page.frame_locator("#report-frame")
            frame.locator("h1, h2").first.wait_for(timeout=20_000)
            assert "page-study" in frame.locator("body").inner_text()
            assert frame.locator("img[src^='data:image/png']").count() > 0
            # Its own inline CSS applies in the frame (the page's policy lets it in): a body width of its own.
            assert frame.locator("body").evaluate("b => getComputedStyle(b).maxWidth") not in ("", "none")
            page.evaluate("window.scrollTo(0, 0)")
            time.sleep(0.5)
            ARTIFACTS.mkdir(exist_ok=True)
            shot = ARTIFACTS / "experiments.png"
            page.screenshot(path=str(shot))  # the viewport: a full-page shot leaves the report's frame blank
            print(f"experiments screenshot: {shot}")
        finally:
            browser.close()
    assert (site.jobs / experiment_id / "report.html").is_file()
    assert outside == [], f"the page fetched from outside its origin: {outside}"
    assert errors == [], f"the page raised: {errors}"


def test_api_docs_render_with_no_outside_requests(experiments_site: ExperimentsSite) -> None:
    """Swagger UI (``/docs``) renders the API's operations in headless Chromium while every request that
    leaves the API's origin is refused: its script and styles come from the API itself, so it works in
    a control room without internet. ReDoc is not offered: its page fetches a logo from redoc.ly."""
    if not CHROMIUM.exists():
        pytest.fail(f"the browser test needs Chromium at {CHROMIUM} (apt-get install chromium)", pytrace=False)
    site = experiments_site
    outside: list[str] = []
    errors: list[str] = []

    def refuse_outside(route: Route) -> None:
        if route.request.url.startswith((site.url, "data:", "blob:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.route("**/*", refuse_outside)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"{site.url}/docs")
            page.wait_for_selector(".swagger-ui .opblock-summary-path[data-path='/api/v1/boxes']", timeout=20_000)
            assert "MoLo Hubs API" in page.locator(".swagger-ui .info .title").inner_text()
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "api-docs.png"))
        finally:
            browser.close()
    assert outside == []
    assert errors == []
    assert httpx.get(f"{site.url}/redoc", timeout=10).status_code == 404
