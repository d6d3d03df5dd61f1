"""Progress of a batch simulation on the terminal: a tqdm bar in simulated days.

The bar shows only on a terminal and only once a run has taken ``DELAY_S`` (a short run prints
nothing extra), goes to stderr (stdout stays the result, for pipes), and is cleared when the run ends.
Not on a terminal (logs, pipes, CI), nothing is printed: the command's last line says how long it took.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from simulator.run import Progress

#: Seconds a run goes before its bar appears.
DELAY_S = 2.0


class DayBar:
    """One tqdm bar per simulation, named by it (``bar("counterfactual")`` gives that run's callback)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled and sys.stderr.isatty()
        self._bars: list[Any] = []

    def __call__(self, name: str = "simulated days") -> Progress:
        if not self.enabled:
            return lambda done, total: None
        from tqdm import tqdm  # noqa: PLC0415 - only on a terminal

        bar = tqdm(total=0, desc=name, unit="day", file=sys.stderr, delay=DELAY_S, leave=False)
        self._bars.append(bar)

        def report(done: float, total: float) -> None:
            bar.total = round(total, 2)
            bar.n = round(done, 2)
            bar.refresh()

        return report

    def close(self) -> None:
        for bar in self._bars:
            bar.close()


@contextmanager
def day_bars(enabled: bool) -> Iterator[DayBar]:
    """A :class:`DayBar` whose bars are closed when the block ends (also on Ctrl-C or an error)."""
    bars = DayBar(enabled)
    try:
        yield bars
    finally:
        bars.close()
