"""An open-loop HTTP load generator (wrk2's model): requests are due on a fixed schedule whether or
not earlier ones have returned, and each latency is measured from the moment its request was due,
so a server that falls behind shows the queueing in the figures (no coordinated omission).

Lean, so that on a 2-core machine the generator takes little of the CPU it shares with the server:
one asyncio process, plain HTTP/1.1 keep-alive over ``connections`` sockets, every request encoded
before the run. A request due while every connection is busy waits for one (its wait counts).
"""

from __future__ import annotations

import asyncio
import os
import resource
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Outcome:
    """One run at one rate: latencies in seconds from the due time, statuses, timing."""

    rate: float
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    errors: int = 0
    wall_s: float = 0.0
    cpu_s: float = 0.0  # of this (generator) process
    late_s: float = 0.0  # how far behind schedule the generator itself was at worst

    def quantile_ms(self, q: float) -> float:
        if len(self.latencies) < 2:
            return float("nan") if not self.latencies else self.latencies[0] * 1000
        return statistics.quantiles(self.latencies, n=1000, method="inclusive")[round(q * 1000) - 1] * 1000

    @property
    def achieved(self) -> float:
        return len(self.latencies) / self.wall_s if self.wall_s else 0.0

    @property
    def ok(self) -> bool:
        return self.errors == 0 and set(self.statuses) <= {200}


def get_request(host: str, port: int, target: str, headers: dict[str, str]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}:{port}", *(f"{k}: {v}" for k, v in headers.items()), "", ""]
    return "\r\n".join(lines).encode()


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = None
    chunked = False
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding" and b"chunked" in value.lower():
            chunked = True
    if length is not None:
        await reader.readexactly(length)
    elif chunked:
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            await reader.readexactly(size + 2)
            if size == 0:
                break
    return status


async def run(
    host: str,
    port: int,
    requests: Sequence[bytes],
    *,
    rate: float,
    duration_s: float,
    connections: int = 64,
    timeout_s: float = 30.0,
) -> Outcome:
    """Send ``rate`` requests a second for ``duration_s`` (cycling through ``requests``)."""
    n = max(1, round(rate * duration_s))
    out = Outcome(rate=rate)
    queue: asyncio.Queue[tuple[float, bytes] | None] = asyncio.Queue()

    async def connection() -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while (item := await queue.get()) is not None:
                due, payload = item
                try:
                    writer.write(payload)
                    status = await asyncio.wait_for(_read_response(reader), timeout_s)
                except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError):
                    out.errors += 1
                    writer.close()
                    reader, writer = await asyncio.open_connection(host, port)
                    continue
                out.latencies.append(time.perf_counter() - due)
                out.statuses[status] = out.statuses.get(status, 0) + 1
        finally:
            writer.close()

    workers = [asyncio.create_task(connection()) for _ in range(connections)]
    await asyncio.sleep(0.2)  # connections open before the clock starts
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for i in range(n):
        due = start + i / rate
        delay = due - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        else:
            out.late_s = max(out.late_s, -delay)
        queue.put_nowait((due, requests[i % len(requests)]))
    for _ in workers:
        queue.put_nowait(None)
    await asyncio.gather(*workers)
    out.wall_s = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    out.cpu_s = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return out


def process_cpu_s(pids: Sequence[int]) -> float:
    """User + system CPU seconds of ``pids`` so far (from /proc; Linux)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total
