"""Prometheus plumbing shared by server and client: registries, scraping, the endpoint.

Each daemon keeps its metrics in a ``CollectorRegistry`` of its own, never the process
global one, so two apps in one process (tests, embedding) do not share counters. A
scrape renders the registry in a worker thread: the process collector reads ``/proc``
and the server's state collector queries SQLite, neither of which may run on the event
loop.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

METRICS_PATH = "/metrics"

# Segment throughput spans 1 MB/s (a thin cross-cloud link) to 10 GB/s (loopback, NVMe).
THROUGHPUT_BUCKETS_BPS = (
    1e6,
    5e6,
    1e7,
    2.5e7,
    5e7,
    1e8,
    2.5e8,
    5e8,
    1e9,
    2.5e9,
    5e9,
    1e10,
)


def new_registry() -> CollectorRegistry:
    """A registry with the process metrics: RSS, open files, CPU time, GC, Python version."""
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


async def scrape(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format, rendered off the event loop."""
    return await asyncio.to_thread(generate_latest, registry)


def metrics_handler(
    registry: CollectorRegistry,
) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        body = await scrape(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return handle


@contextlib.asynccontextmanager
async def serve_metrics(registry: CollectorRegistry, host: str, port: int) -> AsyncIterator[str]:
    """Serve ``registry`` at ``http://host:port/metrics`` while the block runs.

    Yields the URL. A port that cannot be bound raises ``OSError`` at entry.
    """
    app = web.Application()
    app.router.add_get(METRICS_PATH, metrics_handler(registry))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
        yield f"http://{host}:{port}{METRICS_PATH}"
    finally:
        await runner.cleanup()
