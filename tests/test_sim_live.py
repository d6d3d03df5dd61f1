"""Live mode end to end: the simulator drives firmware stubs through real Mosquitto into the backend,
and what is ingested equals the batch trace of the same scenario and seed, event for event.

Boxes box-012 .. box-014 belong to this module (the network's first boxes, renamed to test ids).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg

from backend.ingest.worker import IngestWorker
from contract.messages import PAYLOAD_BY_TYPE, Telemetry
from molo.brokers import RunningBroker
from molo.provision import Credentials
from network import Network
from simulator.live import payload_of, run_live
from simulator.params import Scenario, resolve
from simulator.run import run_batch
from simulator.trace import MemorySink, to_ms
from tests.fixtures.pipeline import renamed_network, wait_for

IDS = ["box-012", "box-013", "box-014"]
Row = tuple[str, int, str, str]


def small_world() -> tuple[Scenario, Network]:
    scenario = resolve(
        overrides=[
            "network.boxes=3",
            "simulation.days=2",
            "simulation.telemetry_interval_min=360",
            "faults.box_offline_mtbf_days=0.6",
            'faults.box_offline_h={kind="constant", mean=3.0}',
        ]
    )
    return scenario, renamed_network(scenario, IDS)


def canonical(kind: str, payload: dict[str, Any]) -> str:
    return payload_of(kind, payload).model_dump_json(exclude_none=True)


def ingested(db: psycopg.Connection[Any]) -> list[Row]:
    rows: list[Row] = []
    for box, ts, kind, payload in db.execute(
        "SELECT box_id, ts, type, payload FROM events WHERE box_id = ANY(%s)", (IDS,)
    ).fetchall():
        rows.append((box, round(ts.timestamp() * 1000), kind, canonical(kind, payload)))
    for box, ts, power, temperature, compartments, red_boxes in db.execute(
        "SELECT box_id, ts, power, temperature_c, compartments, red_boxes FROM telemetry WHERE box_id = ANY(%s)",
        (IDS,),
    ).fetchall():
        data = {"power": power, "temperature_c": temperature, "compartments": compartments, "red_boxes": red_boxes}
        rows.append((box, round(ts.timestamp() * 1000), Telemetry.TYPE, canonical(Telemetry.TYPE, data)))
    return sorted(rows)


def test_live_run_ingests_exactly_the_batch_trace(
    broker: RunningBroker,
    credentials: Credentials,
    ingest: IngestWorker,
    db: psycopg.Connection[Any],
    tmp_path: Path,
) -> None:
    """Two simulated days of three boxes, with outages (Last Will, held events, replay), run live at
    ~8 simulated hours per second: the backend stores the same events, timestamps and payloads as the
    batch run of the same seed."""
    scenario, network = small_world()
    batch = MemorySink()
    run_batch(scenario, batch, network=network)
    start = scenario.simulation.start
    expected = sorted(
        (box, to_ms(start, t), kind, canonical(kind, data))
        for t, box, kind, data in batch.records
        if box is not None and kind in PAYLOAD_BY_TYPE
    )
    assert any(kind == "box.offline" for _, _, kind, _ in batch.records), "the scenario should include outages"
    assert len(expected) > 50

    result = run_live(
        scenario,
        host=broker.host,
        port=broker.port,
        passwords=credentials.boxes,
        state_dir=tmp_path,
        speed=8 * 3600,
        network=network,
    )
    assert result.delivered
    assert result.stats.events == len(expected)
    wait_for(lambda: len(ingested(db)) >= len(expected), timeout=30)
    assert ingested(db) == expected
