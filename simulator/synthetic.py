"""Synthetic networks of any size, made from the bundled Aalborg boxes (benchmarks and scaling studies).

Where it sits: simulator input, beside the ``network`` package. ``synthetic_network(n)`` returns a
``Network`` of ``n`` boxes for the model to run on, for example the 5,000 boxes of the throughput bench
(``bench/sim_throughput.py``, issue #3). It does no I/O beyond reading the base network when none is
given.

How a box is made: synthetic box ``i`` (0-based) is a copy of base box ``i mod m`` (``m`` base boxes),
copy number ``i div m``, with
- the id ``syn-00001``, ``syn-00002``, ... (one-based, matches ``contract.topics.BOX_ID_PATTERN``);
- the base box's households, door layout and area, its name with ``(synthetic N)`` appended;
- its position moved by a small deterministic jitter: a point drawn uniformly in a disc of
  ``jitter_m`` metres (default 400 m) around the base box, redrawn until it lies on the base box's side
  of the Limfjord (by ``network.fjord_side``), so ``side`` stays true. Without the jitter the copies
  would stand on one spot and van routes would be degenerate (zero-length legs, ties everywhere).

The base network's depots and recycling stations are kept unchanged. The jitter of box ``i`` comes from
its own random stream (seeded by ``seed`` and ``i``), so the result is a pure function of its arguments,
identical in every process, and the first ``k`` boxes of ``synthetic_network(n)`` are the boxes of
``synthetic_network(k)`` for any ``k <= n``.

This is a load model, not a plan: 5,000 boxes around Aalborg's 50 sites is a hundred times the pilot's
density, so vans visit many close boxes per round. Use it for how the simulator scales, not for
what-if answers about Aalborg.
"""

from __future__ import annotations

import math
import random

from network import EARTH_RADIUS_KM, Box, Network, fjord_side, load_network

#: Default jitter radius, metres: copies of one base box stand within this distance of it.
DEFAULT_JITTER_M = 400.0
#: Metres per degree of latitude on the model's spherical Earth.
_M_PER_DEG_LAT = 2 * math.pi * EARTH_RADIUS_KM * 1000 / 360


def synthetic_box_id(i: int) -> str:
    """The id of synthetic box ``i`` (0-based): ``syn-00001`` for 0."""
    return f"syn-{i + 1:05d}"


def _jittered(base: Box, rng: random.Random, jitter_m: float) -> tuple[float, float]:
    """A point uniform in a disc of ``jitter_m`` around ``base``, on ``base``'s side of the fjord."""
    m_per_deg_lon = _M_PER_DEG_LAT * math.cos(math.radians(base.lat))
    for _ in range(1000):
        r = jitter_m * math.sqrt(rng.random())
        a = rng.uniform(0.0, 2 * math.pi)
        lat = round(base.lat + r * math.sin(a) / _M_PER_DEG_LAT, 6)
        lon = round(base.lon + r * math.cos(a) / m_per_deg_lon, 6)
        if fjord_side(lat, lon) is base.side:
            return lat, lon
    return base.lat, base.lon  # a base box whose whole disc is across the line: keep its position


def synthetic_network(
    n: int, base: Network | None = None, seed: int = 0, *, jitter_m: float = DEFAULT_JITTER_M
) -> Network:
    """A network of ``n`` boxes replicated from ``base`` (default: the bundled Aalborg network).

    ValueError if ``n < 1`` or ``jitter_m < 0``. See the module docstring for how boxes are made.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if not jitter_m >= 0:
        raise ValueError(f"jitter_m must be >= 0, got {jitter_m}")
    source = base if base is not None else load_network()
    m = len(source.boxes)
    boxes: list[Box] = []
    for i in range(n):
        original = source.boxes[i % m]
        lat, lon = _jittered(original, random.Random(f"synthetic:{seed}:{i}"), jitter_m)
        boxes.append(
            Box(
                id=synthetic_box_id(i),
                name=f"{original.name} (synthetic {i // m + 1})",
                area=original.area,
                side=original.side,
                lat=lat,
                lon=lon,
                households=original.households,
                layout=original.layout,
            )
        )
    return Network(boxes=boxes, depots=dict(source.depots), recycling_stations=list(source.recycling_stations))
