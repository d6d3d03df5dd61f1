"""Trip and CO2 accounting of the MoLo Hubs boxes: one stated method for simulated and ingested events.

Where it sits: the end of a message's journey. Both the simulator (what-if studies) and the backend
(ingested events) use this package, so the two can never disagree; it imports nothing of the project.
The method, its formulas, parameters and sources: ``docs/methodology.md``.
"""

from accounting.activity import COLUMNS, ActivityCounter, BoxDay
from accounting.assumptions import Method
from accounting.geo import Geography, Point, UnknownPlaceError
from accounting.method import (
    CATEGORIES,
    GROUPS,
    Assessment,
    Assessor,
    Line,
    Tally,
    assess,
    describe,
    report,
    summarize,
    tally,
    to_csv,
)
from accounting.overrides import apply_overrides

__all__ = [
    "CATEGORIES",
    "COLUMNS",
    "GROUPS",
    "ActivityCounter",
    "Assessment",
    "Assessor",
    "BoxDay",
    "Geography",
    "Line",
    "Method",
    "Point",
    "Tally",
    "UnknownPlaceError",
    "apply_overrides",
    "assess",
    "describe",
    "report",
    "summarize",
    "tally",
    "to_csv",
]
