"""The alert severity policy (docs/operations.md, "Severity"), as pure logic: every kind has a severity,
and a box's alert level is the highest of its open alerts that colour it (info never does)."""

from __future__ import annotations

from pathlib import Path

import pytest

from backend.operations.alerts import SEVERITY, AlertKind, Severity, alert_level

ROOT = Path(__file__).parent.parent


def test_every_kind_has_a_severity_and_the_operations_page_states_it() -> None:
    """The policy covers every alert kind, and docs/operations.md names each kind with its severity."""
    assert set(SEVERITY) == set(AlertKind)
    doc = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    table = doc[doc.index("## Severity") :]
    for kind, severity in SEVERITY.items():
        assert f"| `{kind.value}` | {severity.value} |" in table, kind


@pytest.mark.parametrize(
    ("severities", "level"),
    [
        ([], None),
        (["info"], None),
        (["info", "info"], None),
        (["warning", "info"], "warning"),
        (["info", "critical", "warning"], "critical"),
        (["critical"], "critical"),
    ],
)
def test_alert_level_is_the_highest_colouring_severity(severities: list[str], level: str | None) -> None:
    assert alert_level(severities) == level


def test_routine_expiry_is_info_and_faults_are_critical() -> None:
    """The issue's policy: what an operator must act on is critical, a red box filling up a warning,
    a parcel near expiry info."""
    assert SEVERITY[AlertKind.PARCEL_NEAR_EXPIRY] is Severity.INFO
    assert SEVERITY[AlertKind.RED_BOX_NEAR_LIMIT] is Severity.WARNING
    critical = {k for k, s in SEVERITY.items() if s is Severity.CRITICAL}
    assert critical == {
        AlertKind.BOX_OFFLINE,
        AlertKind.DOOR_LEFT_OPEN,
        AlertKind.COMPARTMENT_FAULT,
        AlertKind.RED_BOX_AT_LIMIT,
        AlertKind.TEMPERATURE_OUT_OF_RANGE,
    }
