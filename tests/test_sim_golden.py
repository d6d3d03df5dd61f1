"""Golden tests: short runs of the default Aalborg scenario compared with stored outputs, byte for byte.

Where it sits: tests of the whole batch path (``simulator.params.resolve`` -> ``simulator.run.run_batch``
-> ``summary_json`` and the CSV ``FileSink``), like SimPy's docs comparing every example's output with
a stored ``.out`` file. Stored outputs live in ``tests/golden/``:

- ``aalborg_14d.json``: ``summary_json`` of the bundled scenario with ``simulation.days=14``;
- ``aalborg_3d_trace.sha256``: the SHA-256 of the CSV trace of a 3-day run (the trace itself is ~300 kB).

A change to the model or its defaults that changes the output makes these fail. If the change is
intended, regenerate the files and review the difference before committing it::

    MOLO_UPDATE_GOLDEN=1 uv run pytest tests/test_sim_golden.py
    git diff tests/golden/

The outputs must not depend on the process: random streams are seeded from strings
(``random.Random("1:dwell:aal-001")``, hashed with SHA-512, not with ``hash()``) and the model sorts
every set it iterates, so runs in fresh interpreters with different ``PYTHONHASHSEED`` values must
reproduce the stored files too.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from simulator.params import resolve
from simulator.run import run_batch, summary_json
from simulator.trace import FileSink

GOLDEN = Path(__file__).parent / "golden"
SUMMARY_FILE = GOLDEN / "aalborg_14d.json"
DIGEST_FILE = GOLDEN / "aalborg_3d_trace.sha256"
UPDATE = os.environ.get("MOLO_UPDATE_GOLDEN") == "1"
ROOT = Path(__file__).parent.parent


def summary_text() -> str:
    """The 14-day default-scenario summary, as ``molo simulate`` prints and saves it."""
    return summary_json(run_batch(resolve(overrides=["simulation.days=14"])).summary)


def trace_digest(directory: Path) -> str:
    """SHA-256 (hex) of the CSV trace of a 3-day default-scenario run, written into ``directory``."""
    scenario = resolve(overrides=["simulation.days=3"])
    path = directory / "trace.csv"
    sink = FileSink(path, scenario.simulation.start)
    try:
        run_batch(scenario, sink)
    finally:
        sink.close()
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_golden(path: Path, actual: str) -> None:
    """Compare ``actual`` with the stored file, or store it when MOLO_UPDATE_GOLDEN=1."""
    if UPDATE:
        path.parent.mkdir(exist_ok=True)
        path.write_text(actual, encoding="utf-8")
        return
    assert path.read_text(encoding="utf-8") == actual, f"{path.name} differs (MOLO_UPDATE_GOLDEN=1 to update)"


def test_default_scenario_14_day_summary_matches_golden() -> None:
    """The 14-day Aalborg summary equals tests/golden/aalborg_14d.json byte for byte."""
    text = summary_text()
    assert json.loads(text)["days"] == 14
    check_golden(SUMMARY_FILE, text)


def test_default_scenario_3_day_trace_digest_matches_golden(tmp_path: Path) -> None:
    """The 3-day Aalborg CSV trace hashes to tests/golden/aalborg_3d_trace.sha256."""
    check_golden(DIGEST_FILE, trace_digest(tmp_path) + "\n")


def test_golden_outputs_repeat_within_one_process(tmp_path: Path) -> None:
    """Running the golden scenarios again in the same process gives the same bytes (no state leaks
    between runs)."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert summary_text() == summary_text()
    assert trace_digest(tmp_path / "a") == trace_digest(tmp_path / "b")


FRESH_PROCESS = """
import json, sys
from pathlib import Path
from tests.test_sim_golden import summary_text, trace_digest
print(json.dumps({"summary": summary_text(), "digest": trace_digest(Path(sys.argv[1]))}))
"""


def test_golden_outputs_reproduce_in_fresh_processes_with_other_hash_seeds(tmp_path: Path) -> None:
    """Fresh interpreters with PYTHONHASHSEED 1 and 2 produce the stored summary and trace digest."""
    outputs = []
    for hash_seed in ("1", "2"):
        work = tmp_path / hash_seed
        work.mkdir()
        done = subprocess.run(
            [sys.executable, "-c", FRESH_PROCESS, str(work)],
            cwd=ROOT,
            env={**os.environ, "PYTHONHASHSEED": hash_seed},
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        outputs.append(json.loads(done.stdout))
    assert outputs[0] == outputs[1]
    if not UPDATE:
        assert outputs[0]["summary"] == SUMMARY_FILE.read_text(encoding="utf-8")
        assert outputs[0]["digest"] + "\n" == DIGEST_FILE.read_text(encoding="utf-8")
    else:
        assert outputs[0]["summary"] == summary_text()


def test_replications_in_a_process_pool_equal_runs_in_turn() -> None:
    """run_replications gives the same summaries with a ProcessPoolExecutor as without one, in seed order."""
    from concurrent.futures import ProcessPoolExecutor

    from simulator.run import run_replications

    scenario = resolve(overrides=["simulation.days=2", "network.boxes=5"])
    in_turn = run_replications(scenario, [1, 2, 3])
    with ProcessPoolExecutor(max_workers=2) as pool:
        pooled = run_replications(scenario, [1, 2, 3], executor=pool)
    assert pooled == in_turn
    assert [s["seed"] for s in pooled] == [1, 2, 3]
    assert in_turn[0] != in_turn[1]
