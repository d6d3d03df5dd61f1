"""Saved runs (issue 10): Parquet traces with typed columns, and `molo impact --run DIR`, which applies
the CO2 method to a saved `molo simulate` run instead of simulating it again."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from simulator.params import resolve
from simulator.run import run_batch
from simulator.trace import MemorySink, ParquetSink, TeeSink, read_trace

DAYS = "10"


def molo(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "molo.cli", "--log-level", "WARNING", *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_parquet_trace_has_typed_columns_and_reads_back_every_record(tmp_path: Path) -> None:
    """Every record of a run written to Parquet comes back equal (times to the millisecond, as in the
    CSV trace), with int, float and dictionary-encoded string columns instead of a JSON column."""
    scenario = resolve(overrides=["simulation.days=7", "network.boxes=6"])
    memory = MemorySink()
    # Small chunks: the chunks' schemas differ (a field absent from a chunk) and must be unified.
    parquet = ParquetSink(tmp_path / "trace.parquet", scenario.simulation.start, chunk=97)
    run_batch(scenario, TeeSink([memory, parquet]))
    parquet.close()
    schema = pq.read_schema(tmp_path / "trace.parquet")
    assert schema.field("ts_ms").type == pa.int64()
    assert schema.field("compartment").type == pa.int64()
    assert schema.field("weight_kg").type == pa.float64()
    assert pa.types.is_dictionary(schema.field("box_id").type)
    assert "data" not in schema.names
    back = list(read_trace(tmp_path / "trace.parquet"))
    assert len(back) == len(memory.records) > 500
    expected = [(round(t, 3), b, k, d) for t, b, k, d in memory.records]
    assert back == expected


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_impact_of_a_saved_run_equals_the_impact_of_the_same_scenario(tmp_path: Path, fmt: str) -> None:
    """`molo impact --run DIR` on a saved run gives the figures `molo impact` computes for the same
    scenario and seed (without the counterfactual)."""
    run = tmp_path / "run"
    assert (
        molo("simulate", "--days", DAYS, "--set", "network.boxes=8", "--format", fmt, "--out", str(run)).returncode == 0
    )
    saved = molo("impact", "--run", str(run), "--out", str(tmp_path / "saved"))
    assert saved.returncode == 0, saved.stderr
    direct = molo(
        "impact", "--days", DAYS, "--set", "network.boxes=8", "--no-counterfactual", "--out", str(tmp_path / "direct")
    )
    assert direct.returncode == 0, direct.stderr
    a = json.loads((tmp_path / "saved" / "impact.json").read_text())
    b = json.loads((tmp_path / "direct" / "impact.json").read_text())
    assert a["totals"] == b["totals"]
    assert a["groups"] == b["groups"]


def test_impact_reads_the_saved_trace_not_a_new_simulation(tmp_path: Path) -> None:
    """Removing one box's records from a saved trace removes exactly that box from `molo impact --run`'s
    per-box figures and lowers the totals: the figures come from the file."""
    run = tmp_path / "run"
    assert (
        molo("simulate", "--days", DAYS, "--set", "network.boxes=5", "--format", "jsonl", "--out", str(run)).returncode
        == 0
    )
    full = molo("impact", "--run", str(run), "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr
    trace = run / "trace.jsonl"
    kept = [line for line in trace.read_text().splitlines() if json.loads(line)["box_id"] != "aal-003"]
    trace.write_text("\n".join(kept) + "\n")
    cut = molo("impact", "--run", str(run), "--out", str(tmp_path / "cut"))
    assert cut.returncode == 0, cut.stderr

    def per_box(d: str) -> dict[str, Any]:
        result = json.loads((tmp_path / d / "impact.json").read_text())
        return {g["key"]["box"]: g["project"]["trips"] for g in result["groups"]}

    assert "aal-003" in per_box("full")
    assert "aal-003" not in per_box("cut")
    totals = [
        json.loads((tmp_path / d / "impact.json").read_text())["totals"]["project"]["trips"] for d in ("full", "cut")
    ]
    assert totals[1] < totals[0]


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--set", "demand.locker_share=0.2"], "--run takes the saved run's scenario"),
        ([], "no params.json"),
    ],
)
def test_impact_run_errors_are_one_line(tmp_path: Path, args: list[str], expected: str) -> None:
    """--run with scenario flags, or on a folder that is not a saved run, is one line and exit code 2."""
    done = molo("impact", "--run", str(tmp_path), *args)
    assert done.returncode == 2
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
