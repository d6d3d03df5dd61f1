"""bench/open_loop.py, the open-loop load generator of the API benches, against the real API: every
request due is sent and counted, and latency counts from the due time (so queueing shows)."""

from __future__ import annotations

import asyncio
from urllib.parse import urlsplit

import httpx

from bench import open_loop


def test_every_due_request_is_sent_and_answered(api: httpx.Client) -> None:
    """50 requests a second for 1 s over 4 sockets: 50 answers, all 200, none behind schedule."""
    url = urlsplit(str(api.base_url))
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = open_loop.get_request(host, port, "/health", {})
    out = asyncio.run(open_loop.run(host, port, [request], rate=50, duration_s=1.0, connections=4))
    assert (len(out.latencies), out.statuses, out.errors) == (50, {200: 50}, 0)
    assert out.ok
    assert 0 < out.quantile_ms(0.5) <= out.quantile_ms(0.99)


def test_latency_counts_from_the_due_time_when_the_server_is_busy(api: httpx.Client) -> None:
    """With one socket and a rate far above what one connection can answer, requests queue in the
    generator: their latencies grow (from the due time) instead of the rate quietly dropping."""
    url = urlsplit(str(api.base_url))
    host, port = url.hostname or "127.0.0.1", url.port or 80
    request = open_loop.get_request(host, port, "/ready", {})
    out = asyncio.run(open_loop.run(host, port, [request], rate=2000, duration_s=0.5, connections=1))
    assert len(out.latencies) == 1000
    assert out.quantile_ms(0.99) > 10 * out.quantile_ms(0.01)  # the last waited for all before it
