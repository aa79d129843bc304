"""The client daemon as a service: metrics port, systemd notifications, stop signals.

Around ``ClientDaemon.run``: the optional metrics server (``metrics_port``), and the
notifications a ``Type=notify`` unit waits for: ``READY=1`` once the server has
answered the daemon (it is registered), watchdog pings from the event loop, and
``STOPPING=1`` as soon as SIGTERM arrives, before the segments in flight are finished.

The daemon runs inside a ``TaskGroup`` (with the notification helpers), which wraps what
escapes it in an ``ExceptionGroup``; a lone error is unwrapped on the way out, so that
the command line sees the daemon's own ``FLError`` and prints it as one line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from common import sdnotify
from common.config import ClientConfig
from common.errors import ConfigError
from common.metrics import serve_metrics
from fl_client.site.daemon import ClientDaemon, install_stop_handlers

log = logging.getLogger("fl_client")


async def _stopping_when(notifier: sdnotify.Notifier, stop: asyncio.Event, name: str) -> None:
    await stop.wait()
    notifier.stopping(f"site {name}: stopping, finishing the segments in flight")


def _sole(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The one error inside ``group`` (nested groups looked through), or None if several."""
    inner = group.exceptions
    if len(inner) != 1:
        return None
    return _sole(inner[0]) if isinstance(inner[0], BaseExceptionGroup) else inner[0]


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
            try:
                async with asyncio.TaskGroup() as tg:
                    status = f"site {cfg.name}: connected to {cfg.server_url}"
                    helpers = [
                        tg.create_task(sdnotify.ready_when(notifier, daemon.registered, status)),
                        tg.create_task(_stopping_when(notifier, stop, cfg.name)),
                    ]
                    await daemon.run(stop)
                    for helper in helpers:
                        helper.cancel()
            except BaseExceptionGroup as group:
                sole = _sole(group)
                if sole is None:
                    raise
                raise sole from None
    finally:
        notifier.close()
