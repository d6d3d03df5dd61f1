"""Experiments over the API (issue 10): researchers submit experiment files, real ``molo worker``
processes run them from the procrastinate queue on a database of this module's own, and the API
serves their progress, tables and report; jobs are cancelled, survive an API restart, and a worker
killed with SIGKILL mid-job is resumed by a new one from the replications it had stored.

Nothing is mocked: PostgreSQL, the API on uvicorn, worker processes and their runner children. The
experiments are small (3 boxes, days not years) so the module takes a few minutes on two cores.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from backend.access.keys import Role, create_key
from backend.api.app import create_app
from backend.api.server import ApiServer
from backend.experiments.schema import QueueSchemaError, ensure_queue_schema, library_migrations
from backend.migrate import migrate
from backend.settings import Settings, TimescaleMode
from molo.postgres import create_database, drop_database
from simulator.experiment import ExperimentError, load_experiment, run_experiment
from tests.fixtures.pipeline import wait_for

ROOT = Path(__file__).resolve().parent.parent

#: 2 points x ``n`` replications on 3 boxes for ``days`` days.
EXPERIMENT = """
name = "{name}"
description = "over the API"
seed = 11
days = {days}
warmup_days = 1
baseline = "base"
[set]
"network.boxes" = 3
[design]
kind = "list"
[[design.points]]
name = "base"
[[design.points]]
name = "share-30"
set = {{ "demand.locker_share" = 0.30 }}
[replications]
n = {n}
[metrics]
summary = ["parcels.collected", "parcels.turned_away/parcels.arrived"]
impact = ["avoided.kg_co2e_wtw"]
per_box = ["avoided.kg_co2e_wtw"]
"""
SMALL = EXPERIMENT.format(name="small", days=4, n=2)
TOML = {"Content-Type": "application/toml"}
#: A bundled network, named relative to the project as the built-in studies name theirs, and a path that
#: leaves the bundled folders.
BUNDLED = "network/data/aalborg_boxes.toml"
ESCAPING = "simulator/experiments/networks/../../../../etc/hosts"
#: Limits of this module's API (the defaults are far larger).
MAX_RUNS = 1000
MAX_BOX_DAYS = 100_000


def experiment(name: str, *, days: int, n: int) -> str:
    return EXPERIMENT.format(name=name, days=days, n=n)


@dataclass
class Site:
    """This module's database, results folder, API and keys."""

    database_url: str
    jobs: Path
    settings: Settings
    url: str
    researcher: dict[str, str]
    courier: dict[str, str]
    operator: dict[str, str]

    def client(self, url: str | None = None) -> httpx.Client:
        return httpx.Client(base_url=url or self.url, headers=self.researcher, timeout=30)


@pytest.fixture(scope="module")
def site(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    url = create_database(pg_admin_url, "molo_experiments")
    migrate(url, TimescaleMode.OFF)
    with psycopg.connect(url, autocommit=True) as conn:
        keys = {
            role: {"X-API-Key": create_key(conn, role=role, carrier=carrier, name=f"{role.value} of the test").token}
            for role, carrier in ((Role.RESEARCHER, None), (Role.COURIER, "gls"), (Role.OPERATOR, None))
        }
    jobs = tmp_path_factory.mktemp("experiment-jobs")
    settings = Settings(
        database_url=url, experiments_dir=jobs, experiment_max_runs=MAX_RUNS, experiment_max_box_days=MAX_BOX_DAYS
    )
    server = ApiServer(create_app(settings)).start()
    try:
        yield Site(
            url,
            jobs,
            settings,
            server.url,
            keys[Role.RESEARCHER],
            keys[Role.COURIER],
            keys[Role.OPERATOR],
        )
    finally:
        server.stop()
        drop_database(url, pg_admin_url)


@pytest.fixture
def workers(site: Site, tmp_path: Path) -> Iterator[Callable[[], subprocess.Popen[bytes]]]:
    """Start ``molo worker`` processes on the site (one runner process per job, a heartbeat every 0.5 s,
    taken for dead after 2 s); stopped at teardown."""
    started: list[subprocess.Popen[bytes]] = []
    env = {
        **os.environ,
        "MOLO_DATABASE_URL": site.database_url,
        "MOLO_EXPERIMENTS_DIR": str(site.jobs),
        "MOLO_EXPERIMENT_PROCESSES": "1",
        "MOLO_EXPERIMENT_WORKER_HEARTBEAT_S": "0.5",
        "MOLO_EXPERIMENT_WORKER_STALLED_S": "2",
    }

    def start() -> subprocess.Popen[bytes]:
        with (tmp_path / f"worker-{len(started) + 1}.log").open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "molo.cli", "worker"],
                env=env,
                cwd=tmp_path,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        started.append(proc)
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in started:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for log in sorted(tmp_path.glob("worker-*.log")):
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-4000:]}")  # shown when a test fails


def submit(client: httpx.Client, text: str) -> dict[str, Any]:
    got = client.post("/api/v1/experiments", content=text, headers=TOML)
    assert got.status_code == 201, got.text
    body: dict[str, Any] = got.json()
    assert got.headers["location"] == body["status_url"] == f"/api/v1/experiments/{body['id']}"
    return body


def status(client: httpx.Client, experiment_id: int) -> dict[str, Any]:
    got = client.get(f"/api/v1/experiments/{experiment_id}")
    assert got.status_code == 200, got.text
    body: dict[str, Any] = got.json()
    return body


def wait_status(client: httpx.Client, experiment_id: int, wanted: str, timeout: float = 240) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        body = status(client, experiment_id)
        assert body["status"] not in {"succeeded", "failed", "cancelled"} - {wanted}, body
        return body if body["status"] == wanted else None

    result: dict[str, Any] = wait_for(reached, timeout=timeout, interval=0.3)
    return result


def stored(out: Path) -> int:
    return len(list(out.glob("runs/*/*.json")))


def run_files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "runs").glob("*/*.json"))}


def run_locally(text: str, tmp_path: Path) -> Path:
    """The same file run by the runner in this process: what an uninterrupted run stores."""
    path = tmp_path / "local" / "experiment.toml"
    path.parent.mkdir(parents=True)
    path.write_text(text, encoding="utf-8")
    out = tmp_path / "local" / "out"
    run_experiment(load_experiment(path), out, workers=1)
    return out


def parquet_rows(path: Path) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq

    return [
        {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}
        for row in pq.read_table(path).to_pylist()
    ]


def runner_children(out: Path) -> list[int]:
    """Pids of runner processes working in ``out``."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            args = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue
        if b"backend.experiments.child" in args and str(out).encode() in args:
            found.append(int(cmdline.parent.name))
    return found


# --------------------------------------------------------------------------------- the queue's schema


def test_queue_schema_is_installed_once_and_recorded(site: Site) -> None:
    """molo migrate installed procrastinate's schema and recorded its newest migration; running it
    again changes nothing, and a database recorded as newer than the library is refused."""
    with psycopg.connect(site.database_url, autocommit=True) as conn:
        recorded = conn.execute("SELECT version FROM queue_schema WHERE library = 'procrastinate'").fetchone()
        assert recorded == (library_migrations()[-1].stem,)
        assert conn.execute("SELECT to_regclass('procrastinate_jobs') IS NOT NULL").fetchone() == (True,)
        assert ensure_queue_schema(conn).action == "current"
    assert migrate(site.database_url, TimescaleMode.OFF).applied == []
    with psycopg.connect(site.database_url, autocommit=True) as conn:
        conn.execute("UPDATE queue_schema SET version = '99.00.00_01_future' WHERE library = 'procrastinate'")
        try:
            with pytest.raises(QueueSchemaError, match="newer than the installed library"):
                ensure_queue_schema(conn)
        finally:
            conn.execute("UPDATE queue_schema SET version = %s WHERE library = 'procrastinate'", recorded)


# ------------------------------------------------------------------------------- submitting a file


def test_small_experiment_succeeds_with_the_runners_tables(
    site: Site, workers: Callable[[], subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """A researcher's 2 points x 2 replications run by a worker: succeeded with 4 of 4 replications, and
    its summary, comparisons and results.csv are what the runner writes for the same file."""
    workers()
    with site.client() as client:
        job = submit(client, SMALL)
        assert (job["status"], job["points"], job["replications"]) == ("queued", 2, {"done": 0, "target": 4, "max": 4})
        assert job["submitted_by"] == "researcher of the test"
        assert job["box_days"] == 2 * 2 * 4 * 3
        done = wait_status(client, job["id"], "succeeded")
        assert done["replications"] == {"done": 4, "target": 4, "max": 4}
        assert done["started_at"]
        assert done["finished_at"]
        assert done["attempts"] == 1
        assert done["error"] is None
        assert any(j["id"] == job["id"] for j in client.get("/api/v1/experiments").json())
        local = run_locally(SMALL, tmp_path)
        out = site.jobs / str(job["id"])
        assert run_files(out) == run_files(local)
        summary = client.get(f"/api/v1/experiments/{job['id']}/summary").json()
        assert summary["table"] == "summary"
        assert summary["name"] == "small"
        assert summary["rows"] == parquet_rows(local / "summary.parquet")
        assert {r["point"] for r in summary["rows"]} == {"base", "share-30"}
        comparisons = client.get(f"/api/v1/experiments/{job['id']}/comparisons").json()
        assert comparisons["rows"] == parquet_rows(local / "comparisons.parquet") != []
        csv = client.get(f"/api/v1/experiments/{job['id']}/results.csv")
        assert csv.headers["content-type"].startswith("text/csv")
        assert csv.content == (local / "results.csv").read_bytes()
        assert client.get(done["links"]["summary_csv"]).content == (local / "summary.csv").read_bytes()
        report = client.get(done["links"]["report"])
        if importlib.util.find_spec("simulator.report") is None:
            assert (report.status_code, report.json()["error"]["code"]) == (404, "report_not_available")
            assert not done["report_available"]
        else:
            assert report.status_code == 200, report.text
            assert report.headers["content-type"].startswith("text/html")
            assert "sandbox" in report.headers["content-security-policy"]
            assert "small" in report.text
            assert "<script" not in report.text
            assert done["report_available"]


BAD_FILES = {
    "unknown parameter": SMALL.replace('"network.boxes" = 3', '"network.boxess" = 3'),
    "not TOML": SMALL.replace("[design]", "[design"),
    "value out of range": SMALL.replace("0.30", "1.30"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gets_422_with_the_runners_message(site: Site, case: str, tmp_path: Path) -> None:
    """A bad experiment file is refused with 422 invalid_experiment and exactly the runner's one-line
    message (naming experiment.toml and the line), and nothing is queued."""
    text = BAD_FILES[case]
    path = tmp_path / "experiment.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ExperimentError) as raised:
        load_experiment(path)
    expected = str(raised.value).replace(str(path), "experiment.toml")
    with site.client() as client:
        before = len(client.get("/api/v1/experiments").json())
        got = client.post("/api/v1/experiments", content=text, headers=TOML)
        assert (got.status_code, got.json()["error"]["code"]) == (422, "invalid_experiment")
        assert got.json()["error"]["message"] == expected
        assert "\n" not in expected
        assert expected.startswith("experiment.toml")
        assert len(client.get("/api/v1/experiments").json()) == before


def test_what_only_a_server_refuses(site: Site) -> None:
    """Over the API the base scenario must be a bundled one and network.file cannot be set (both would
    read the server's files); a body that is not TOML text, or not sent as such, is refused."""
    with site.client() as client:
        for text, needle in (
            ('scenario = "/etc/passwd"\n' + SMALL, "bundled scenarios"),
            (SMALL.replace('"network.boxes" = 3', '"network.boxes" = 3\n"network.file" = "/etc/hosts"'), "bundled"),
            (SMALL.replace('"network.boxes" = 3', f'"network.boxes" = 3\n"network.file" = "{ESCAPING}"'), "bundled"),
        ):
            got = client.post("/api/v1/experiments", content=text, headers=TOML)
            assert (got.status_code, got.json()["error"]["code"]) == (422, "invalid_experiment"), got.text
            assert needle in got.json()["error"]["message"]
        as_json = client.post("/api/v1/experiments", json={"name": "x"})
        assert (as_json.status_code, as_json.json()["error"]["code"]) == (415, "unsupported_media_type")
        binary = client.post("/api/v1/experiments", content=b"name = '\xff'", headers={"Content-Type": "text/plain"})
        assert (binary.status_code, binary.json()["error"]["code"]) == (422, "invalid_experiment")
        plain = client.post("/api/v1/experiments", content=SMALL, headers={"Content-Type": "text/plain; charset=utf-8"})
        assert plain.status_code == 201, plain.text
        assert client.delete(plain.json()["status_url"]).json()["status"] == "cancelled"


def test_a_bundled_network_file_is_run_from_the_project_whatever_the_workers_directory(
    site: Site, workers: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """network.file may name a bundled network relative to the project, as the built-in studies do: the
    API sizes the job on it and a worker started in another directory runs it (from the project's root);
    one replication per point gives null standard deviations, not NaN."""
    text = experiment("bundled", days=2, n=1).replace(
        '"network.boxes" = 3', f'"network.boxes" = 8\n"network.file" = "{BUNDLED}"'
    )
    workers()
    with site.client() as client:
        job = submit(client, text)
        assert job["box_days"] == 2 * 1 * 2 * 8
        done = wait_status(client, job["id"], "succeeded")
        assert done["error"] is None
        rows = client.get(f"/api/v1/experiments/{job['id']}/summary").json()["rows"]
    assert {r["n"] for r in rows} == {1}
    assert {r["sd"] for r in rows} == {None}
    per_box = [json.loads(p.read_text()) for p in (site.jobs / str(job["id"]) / "runs").glob("*/*.json")]
    assert {len(r["per_box"]["avoided.kg_co2e_wtw"]) for r in per_box} == {8}


def test_too_large_a_job_gets_the_limit_and_its_size(site: Site) -> None:
    """Over the box-days or the runs limit: 422 experiment_too_large stating the limit and the job's
    size, with both in the details; nothing is queued."""
    with site.client() as client:
        before = len(client.get("/api/v1/experiments").json())
        big = experiment("big", days=365, n=50).replace('"network.boxes" = 3', '"network.boxes" = 10')
        got = client.post("/api/v1/experiments", content=big, headers=TOML)
        error = got.json()["error"]
        assert (got.status_code, error["code"]) == (422, "experiment_too_large")
        assert error["details"]["box_days"] == 2 * 50 * 365 * 10 > MAX_BOX_DAYS == error["details"]["limit"]
        assert f"{2 * 50 * 365 * 10:,}" in error["message"]
        assert f"{MAX_BOX_DAYS:,}" in error["message"]
        assert "MOLO_EXPERIMENT_MAX_BOX_DAYS" in error["message"]
        many = client.post("/api/v1/experiments", content=experiment("many", days=2, n=600), headers=TOML)
        error = many.json()["error"]
        assert (many.status_code, error["code"]) == (422, "experiment_too_large")
        assert (error["details"]["runs"], error["details"]["limit"]) == (1200, MAX_RUNS)
        assert "1,200 runs" in error["message"]
        assert f"{MAX_RUNS:,}" in error["message"]
        assert len(client.get("/api/v1/experiments").json()) == before


def test_couriers_are_refused_and_researchers_see_operators_jobs(site: Site) -> None:
    """A courier key gets 403 forbidden_role on submit and list; a job an operator submitted is listed
    for a researcher."""
    with site.client() as client:
        for method, path in (("POST", "/api/v1/experiments"), ("GET", "/api/v1/experiments")):
            got = client.request(method, path, content=SMALL, headers={**site.courier, **TOML})
            assert (got.status_code, got.json()["error"]["code"]) == (403, "forbidden_role")
        by_operator = client.post("/api/v1/experiments", content=SMALL, headers={**site.operator, **TOML})
        assert by_operator.status_code == 201
        listed = {j["id"]: j for j in client.get("/api/v1/experiments").json()}
        assert listed[by_operator.json()["id"]]["submitted_by"] == "operator of the test"
        client.post(f"/api/v1/experiments/{by_operator.json()['id']}/cancel")


# ------------------------------------------------------------------------------------ cancelling


def test_cancel_of_a_queued_job_is_at_once(site: Site) -> None:
    """With no worker running, a queued job is cancelled at once (its procrastinate job too) and its
    results answer 409 results_not_ready; a second cancel is accepted, nothing changes."""
    with site.client() as client:
        job = submit(client, experiment("queued", days=4, n=2))
        cancelled = client.delete(f"/api/v1/experiments/{job['id']}")
        assert cancelled.status_code == 202
        assert (cancelled.json()["status"], cancelled.json()["cancel_requested"]) == ("cancelled", True)
        with psycopg.connect(site.database_url) as conn:
            row = conn.execute(
                "SELECT j.status FROM procrastinate_jobs j JOIN experiments e ON e.job_id = j.id WHERE e.id = %s",
                (job["id"],),
            ).fetchone()
        assert row == ("cancelled",)
        assert client.post(f"/api/v1/experiments/{job['id']}/cancel").json()["status"] == "cancelled"
        summary = client.get(f"/api/v1/experiments/{job['id']}/summary")
        assert (summary.status_code, summary.json()["error"]["code"]) == (409, "results_not_ready")


def test_cancel_stops_a_running_job_within_seconds_keeping_its_replications(
    site: Site, workers: Callable[[], subprocess.Popen[bytes]]
) -> None:
    """Cancelling a running job (2 x 20 replications): cancelled within seconds, with the finished
    replications kept and counted, its runner process gone, and nothing stored after that."""
    workers()
    with site.client() as client:
        job = submit(client, experiment("cancel-me", days=45, n=20))
        out = site.jobs / str(job["id"])
        running = wait_for(
            lambda: (b := status(client, job["id"]))["status"] == "running" and b["replications"]["done"] >= 1 and b,
            timeout=180,
            interval=0.2,
        )
        assert running["replications"]["done"] < 40
        asked = time.monotonic()
        got = client.delete(f"/api/v1/experiments/{job['id']}")
        assert got.status_code == 202
        assert got.json()["cancel_requested"]
        ended = wait_status(client, job["id"], "cancelled", timeout=15)
        assert time.monotonic() - asked < 15
        kept = stored(out)
        assert ended["replications"]["done"] == kept
        assert 1 <= kept < 40
        wait_for(lambda: runner_children(out) == [], timeout=5)
        time.sleep(3)
        assert stored(out) == kept  # nothing ran on after the cancel
        assert status(client, job["id"])["status"] == "cancelled"


# ------------------------------------------------------------------------------ workers and the API


def test_killed_worker_is_resumed_by_a_new_one_with_the_runs_of_an_uninterrupted_run(
    site: Site, workers: Callable[[], subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """SIGKILL of the worker mid-job kills its runner too; a new worker takes the job over once the dead
    one's heartbeat is stale and finishes it: the stored runs are byte for byte those of an uninterrupted
    run of the same file, and timings.jsonl has one line per replication (none ran twice)."""
    text = experiment("killed", days=45, n=5)
    first = workers()
    with site.client() as client:
        job = submit(client, text)
        out = site.jobs / str(job["id"])
        wait_for(lambda: stored(out) >= 2, timeout=180, interval=0.1)
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        wait_for(lambda: runner_children(out) == [], timeout=5)
        at_kill = stored(out)
        assert 2 <= at_kill < 10, "the job ended before the kill: make it longer"
        assert status(client, job["id"])["status"] == "running"  # as the dead worker left it
        workers()
        done = wait_status(client, job["id"], "succeeded", timeout=240)
        assert done["attempts"] == 2
        assert done["replications"] == {"done": 10, "target": 10, "max": 10}
    local = run_locally(text, tmp_path)
    assert run_files(out) == run_files(local)
    timings = [json.loads(line) for line in (out / "timings.jsonl").read_text().splitlines()]
    assert len(timings) == 10
    assert len({(t["point"], t["replication"]) for t in timings}) == 10


def test_a_job_survives_an_api_restart(site: Site, workers: Callable[[], subprocess.Popen[bytes]]) -> None:
    """A job submitted to one API process is read by a new app instance after that one stopped, and a
    worker started afterwards runs it to the end, seen through the new instance."""
    first = ApiServer(create_app(site.settings)).start()
    try:
        with site.client(first.url) as client:
            job = submit(client, experiment("restart", days=4, n=2))
    finally:
        first.stop()
    second = ApiServer(create_app(site.settings)).start()
    try:
        with site.client(second.url) as client:
            again = status(client, job["id"])
            assert {k: again[k] for k in ("id", "name", "status", "created_at", "replications")} == {
                k: job[k] for k in ("id", "name", "status", "created_at", "replications")
            }
            workers()
            assert wait_status(client, job["id"], "succeeded")["replications"]["done"] == 4
    finally:
        second.stop()
