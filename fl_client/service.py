"""The client daemon as a service: metrics port, systemd notifications, stop signals.

Around ``ClientDaemon.run``: the optional metrics server (``metrics_port``), and the
notifications a ``Type=notify`` unit waits for: ``READY=1`` once the server has
answered the daemon (it is registered), watchdog pings from the event loop, and
``STOPPING=1`` as soon as SIGTERM arrives, before the segments in flight are finished.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from common import sdnotify
from common.config import ClientConfig
from common.errors import ConfigError
from common.metrics import serve_metrics
from fl_client.daemon import ClientDaemon, install_stop_handlers

log = logging.getLogger("fl_client")


async def _stopping_when(notifier: sdnotify.Notifier, stop: asyncio.Event, name: str) -> None:
    await stop.wait()
    notifier.stopping(f"site {name}: stopping, finishing the segments in flight")


async def run_service(cfg: ClientConfig) -> None:
    stop = asyncio.Event()
    install_stop_handlers(stop)
    daemon = ClientDaemon(cfg)
    notifier = sdnotify.Notifier.from_environ()
    try:
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(sdnotify.watchdog(notifier))
            if cfg.metrics_port is not None:
                try:
                    url = await stack.enter_async_context(
                        serve_metrics(daemon.metrics.registry, cfg.metrics_host, cfg.metrics_port)
                    )
                except OSError as exc:
                    raise ConfigError(
                        f"metrics_port: cannot listen on {cfg.metrics_host}:{cfg.metrics_port}: "
                        f"{exc.strerror or exc}; choose a free port or remove metrics_port",
                        field="metrics_port",
                    ) from exc
                log.info("metrics at %s", url)
            async with asyncio.TaskGroup() as tg:
                status = f"site {cfg.name}: connected to {cfg.server_url}"
                helpers = [
                    tg.create_task(sdnotify.ready_when(notifier, daemon.registered, status)),
                    tg.create_task(_stopping_when(notifier, stop, cfg.name)),
                ]
                await daemon.run(stop)
                for helper in helpers:
                    helper.cancel()
    finally:
        notifier.close()
