"""``molo impact``: avoided trips and CO2 of a simulated run from the command line (no services)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest

from accounting import Method, apply_overrides
from molo.cli import main
from simulator.impact import run_impact
from simulator.params import resolve


def test_impact_writes_the_same_figures_as_run_impact(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The command's JSON equals run_impact for the same scenario and method; the CSV has a row per
    box with the method's choices; the report names them and the common-random-numbers check."""
    out = tmp_path / "run"
    code = main(["impact", "--days", "7", "--set", "network.boxes=5", "--van-electric-share", "0.5", "--out", str(out)])
    assert code == 0
    report = capsys.readouterr().out
    assert "electric van share 0.5" in report
    assert "Common-random-numbers check" in report
    written = json.loads((out / "impact.json").read_text())
    scenario = resolve(overrides=["network.boxes=5", "simulation.days=7"])
    expected = run_impact(scenario, apply_overrides(Method(), ["van_electric_share=0.5"]))
    assert written["totals"] == expected["totals"]
    assert written["simulated_counterfactual"] == expected["simulated_counterfactual"]
    rows = list(csv.DictReader((out / "impact.csv").read_text().splitlines()))
    assert sorted(r["box"] for r in rows) == sorted(g["key"]["box"] for g in expected["groups"])
    assert {r["van_electric_share"] for r in rows} == {"0.5"}
    assert json.loads((out / "params.json").read_text())["simulation"]["days"] == 7
    # The report leads with the JSON's headline and lists trips by actor and mode.
    trips = written["headline"]["motorised_trips_avoided"]
    assert f"Motorised vehicle trips avoided: {trips:,}" in report
    assert written["headline"] == expected["headline"]
    for label in ("carriers' vans", "residents by car", "residents on foot/bike/bus"):
        assert label in report


def test_impact_csv_can_have_a_row_per_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--group-by mode`` writes a row per mode, walking and cycling included, with their stops."""
    out = tmp_path / "run"
    assert main(["impact", "--days", "3", "--set", "network.boxes=3", "--group-by", "mode",
                 "--no-counterfactual", "--out", str(out)]) == 0  # fmt: skip
    rows = {r["mode"]: r for r in csv.DictReader((out / "impact.csv").read_text().splitlines())}
    assert {"van", "car", "walk_cycle"} <= set(rows) <= {"van", "truck", "car", "walk_cycle"}
    assert float(rows["van"]["baseline_stops"]) > float(rows["van"]["project_stops"]) > 0
    assert float(rows["walk_cycle"]["project_kg_co2e_wtw"]) == 0.0


def test_sensitivity_prints_a_table_per_choice(capsys: pytest.CaptureFixture[str]) -> None:
    """--sensitivity prints the baseline-by-e-van table and the allocation table."""
    assert main(["impact", "--sensitivity", "--days", "3", "--set", "network.boxes=4"]) == 0
    text = capsys.readouterr().out
    assert "| waste baseline | parcel baseline | e-van 0% | e-van 50% | e-van 100% |" in text
    assert "| resident_trips | parcel_shop |" in text
    assert "| marginal |" in text
    assert "| waste baseline (home delivery, e-van 0%) | motorised trips avoided |" in text
    for name in ("residual_bin", "bin_bag", "resident_trips, 50% of trips chained", "**range**"):
        assert f"| {name} |" in text


def test_sensitivity_moves_as_the_method_says() -> None:
    """Against parcel shops the vans drive the same rounds in both scenarios, so the e-van share
    changes nothing; against home delivery the avoided door stops are worth less with electric vans;
    under the marginal allocation waste carries no van km, so its figure ignores the e-van share.
    Across the waste baselines the avoided figure falls from station trips to half of them chained
    to the bin bag to the residual bin, which avoids nothing and costs the box trips."""
    from simulator.impact import sensitivity

    rows = sensitivity(resolve(overrides=["network.boxes=6", "simulation.days=7"]))
    chained = [r for r in rows if r["recycling_chained_share"]]
    by = {
        (r["waste_baseline"], r["parcel_baseline"], r["allocation"], r["van_electric_share"]): r
        for r in rows
        if not r["recycling_chained_share"]
    }
    shop = [by[("resident_trips", "parcel_shop", "load_distance", s)]["avoided"]["kg_co2e_wtw"] for s in (0, 0.5, 1)]
    assert shop == pytest.approx([shop[0]] * 3)
    home = [by[("resident_trips", "home_delivery", "load_distance", s)]["avoided"]["kg_co2e_wtw"] for s in (0, 0.5, 1)]
    assert home[0] > home[1] > home[2]
    marginal = [
        by[("resident_trips", "home_delivery", "marginal", s)]["categories"]["hazardous_waste"]["kg_co2e_wtw"]
        for s in (0, 0.5, 1)
    ]
    assert marginal == pytest.approx([marginal[0]] * 3)
    assert marginal[0] > 0

    def waste(row: dict[str, Any]) -> float:
        return float(row["categories"]["hazardous_waste"]["kg_co2e_wtw"])

    plain = {
        w: waste(by[(w, "home_delivery", "load_distance", 0.0)]) for w in ("resident_trips", "bin_bag", "residual_bin")
    }
    half = waste(next(r for r in chained if r["van_electric_share"] == 0.0))
    assert plain["resident_trips"] > half > plain["bin_bag"] > 0 > plain["residual_bin"]
    assert {r["recycling_chained_share"] for r in chained} == {0.5}


def test_bad_method_parameters_are_refused(capsys: pytest.CaptureFixture[str]) -> None:
    """An unknown or out-of-range method parameter exits 2 with the reason."""
    assert main(["impact", "--days", "1", "--method-set", "residents.box_car_share=3"]) == 2
    assert "box_car_share" in capsys.readouterr().err


SCENARIO_MISTAKES = [
    (["--scenario", "missing.toml"], "scenario file missing.toml not found (bundled in simulator/scenarios/"),
    (["--set", "demand.lockr_share=0.2"], "did you mean 'demand.locker_share'?"),
    (["--set", "demand.locker_share=7"], "demand.locker_share: Input should be less than or equal to 1 (given 7)"),
    (["--set", "delivery.carriers.gls.share=0.9"], "carrier shares must sum to 1, not 1.7"),
    (["--set", "novalue"], "override 'novalue' is not key.path=value"),
    (["--out", "/proc/molo-nope"], "cannot write results to --out /proc/molo-nope: No such file or directory"),
]


@pytest.mark.parametrize("command", ["simulate", "impact"])
@pytest.mark.parametrize(("flags", "expected"), SCENARIO_MISTAKES)
def test_user_errors_are_one_line_and_exit_2(
    command: str, flags: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """A missing scenario file, an unknown or out-of-range --set, a malformed override and an --out
    that cannot be written: exit code 2 and one line on stderr naming it (no traceback, no pydantic
    help URL)."""
    assert main([command, "--days", "1", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"molo {command}: "), err
    assert err.count("\n") == 1, err
    assert expected in err, err
    assert "errors.pydantic.dev" not in err


def test_set_changes_one_carriers_field_and_keeps_the_others() -> None:
    """`--set delivery.carriers.gls.van_capacity=150` (the example in aalborg.toml) merges into that
    carrier: its share, depot and schedule stay as the file has them, and so do the other carriers."""
    base = resolve()
    changed = resolve(overrides=["delivery.carriers.gls.van_capacity=150"])
    assert changed.delivery.carriers["gls"].van_capacity == 150
    assert changed.delivery.carriers["gls"].model_copy(update={"van_capacity": 0}) == base.delivery.carriers[
        "gls"
    ].model_copy(update={"van_capacity": 0})
    assert {k: v for k, v in changed.delivery.carriers.items() if k != "gls"} == {
        k: v for k, v in base.delivery.carriers.items() if k != "gls"
    }


def _run_on_a_terminal(args: list[str]) -> tuple[int, str]:
    """``molo`` ``args`` in a child process whose stdout and stderr are a pseudo-terminal; its exit code
    and everything it wrote there."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import sys
    import termios

    leader, follower = pty.openpty()
    # A terminal has a size (a new pseudo-terminal has 0 x 0, and tqdm fits its bar into 0 columns).
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    child = subprocess.Popen([sys.executable, "-m", "molo.cli", *args], stdout=follower, stderr=follower)
    os.close(follower)
    chunks: list[bytes] = []
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    return child.wait(60), b"".join(chunks).decode(errors="replace")


def test_a_long_simulation_shows_a_progress_bar_on_a_terminal_and_nothing_elsewhere() -> None:
    """On a terminal, a run longer than two seconds shows tqdm's bar in simulated days (to stderr,
    stdout stays the summary); --no-progress hides it; into a pipe nothing but the summary and the
    closing line is written."""
    import subprocess
    import sys

    long_run = ["simulate", "--days", "1200", "--set", "network.boxes=25"]
    code, shown = _run_on_a_terminal(long_run)
    assert code == 0, shown
    assert "simulated days:" in shown, shown[-2000:]
    assert "day/s" in shown
    assert '"parcels"' in shown  # the summary still comes
    code, shown = _run_on_a_terminal([*long_run, "--no-progress"])
    assert code == 0, shown
    assert "simulated days:" not in shown
    piped = subprocess.run(
        [sys.executable, "-m", "molo.cli", *long_run], check=False, capture_output=True, text=True, timeout=120
    )
    assert piped.returncode == 0, piped.stderr
    assert "simulated days" not in piped.stderr
    assert piped.stderr.startswith("# "), piped.stderr
    assert piped.stderr.count("\n") == 1, piped.stderr
