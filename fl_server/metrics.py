"""The server's Prometheus metrics, served at ``GET /metrics``.

Two kinds. *Events* are counted where they happen, once per segment or request, never
per chunk: bytes sent (models to clients, results to admins) and received (updates),
segments refused and why, segment throughput, requests by route and status. *State*
(jobs by state, rounds completed and how long they took, sites alive, tasks at work)
is read from the state database when scraped, by ``StateCollector``: it is durable,
so these figures survive a restart and never disagree with ``fl-admin``.

``install`` wires it all into the app: the registry, the route, and a middleware that
counts requests; handlers reach the counters through ``request.app[METRICS]``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from common import wire
from common.config import ServerConfig
from common.errors import FLError
from common.metrics import METRICS_PATH, THROUGHPUT_BUCKETS_BPS, metrics_handler, new_registry
from common.wire import JobState, Phase, TaskState
from fl_server.admission import Reason
from fl_server.core.rules import is_alive
from fl_server.core.transitions import TERMINAL_JOB_STATES, RoundState
from fl_server.http_util import Handler
from fl_server.state import StateDB

# A round of the reference job takes hours; of a test job, a second.
ROUND_BUCKETS_S = (1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 28800, 86400)


class ServerMetrics:
    def __init__(self, cfg: ServerConfig, db: StateDB) -> None:
        self.registry: CollectorRegistry = new_registry()
        r = self.registry
        self.sent_bytes = Counter(
            "fl_server_sent_bytes",
            "Bytes sent: global models to sites (what=model), results to admins (what=result).",
            ["what"],
            registry=r,
        )
        self.received_bytes = Counter(
            "fl_server_received_bytes",
            "Bytes of update segments received and acknowledged (what=update).",
            ["what"],
            registry=r,
        )
        self.segments_refused = Counter(
            "fl_server_segments_refused",
            "Update segments refused, by error code (integrity_error: digest mismatch, ...).",
            ["code"],
            registry=r,
        )
        self.segment_throughput = Histogram(
            "fl_server_segment_throughput_bytes_per_second",
            "Throughput of one segment: a model range sent (download), or an update "
            "segment received and checked (upload).",
            ["direction"],
            buckets=THROUGHPUT_BUCKETS_BPS,
            registry=r,
        )
        self.requests = Counter(
            "fl_server_requests",
            "HTTP requests by method, route and status ('cancelled': the peer went away).",
            ["method", "route", "status"],
            registry=r,
        )
        self.connections_closed = Counter(
            "fl_server_connections_closed",
            "Connections the server closed before or between requests, by reason: "
            "handshake_timeout, head_timeout (limits.request_head_timeout_s), idle "
            "(limits.idle_timeout_s), evicted (not authenticated, closed for a newcomer at "
            "limits.max_connections), busy (answered 503: every connection authenticated).",
            ["reason"],
            registry=r,
        )
        for reason in Reason:
            self.connections_closed.labels(reason.value)
        for what in ("model", "result"):
            self.sent_bytes.labels(what)
        self.received_bytes.labels("update")
        for direction in ("download", "upload"):
            self.segment_throughput.labels(direction)
        r.register(StateCollector(cfg, db))

    def model_segment_sent(self, nbytes: int, seconds: float) -> None:
        self.sent_bytes.labels("model").inc(nbytes)
        if seconds > 0:
            self.segment_throughput.labels("download").observe(nbytes / seconds)

    def result_sent(self, nbytes: int, seconds: float) -> None:
        self.sent_bytes.labels("result").inc(nbytes)

    def update_segment_received(self, nbytes: int, seconds: float) -> None:
        self.received_bytes.labels("update").inc(nbytes)
        if seconds > 0:
            self.segment_throughput.labels("upload").observe(nbytes / seconds)


METRICS = web.AppKey("metrics", ServerMetrics)


def _histogram(
    values: Iterable[float], bounds: Iterable[float]
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative Prometheus buckets (``le`` label, count) and the sum of ``values``."""
    data = sorted(values)
    buckets = [(repr(float(b)), float(sum(v <= b for v in data))) for b in bounds]
    buckets.append(("+Inf", float(len(data))))
    return buckets, float(sum(data))


class StateCollector(Collector):
    """Figures read from the state database at scrape time (called in a worker thread)."""

    def __init__(self, cfg: ServerConfig, db: StateDB) -> None:
        self.cfg = cfg
        self.db = db

    def collect(self) -> Iterator[Metric]:
        now = time.time()
        jobs = self.db.list_jobs()
        states = GaugeMetricFamily("fl_server_jobs", "Jobs by state.", labels=["state"])
        for state in JobState:
            states.add_metric([state.value], sum(j.state is state for j in jobs))
        yield states

        durations = []
        for job in jobs:
            for rnd in self.db.list_rounds(job.job_id):
                if rnd.state is RoundState.CLOSED and rnd.closed_at is not None:
                    durations.append(rnd.closed_at - rnd.started_at)
        yield CounterMetricFamily(
            "fl_server_rounds_completed", "Rounds closed, over all jobs.", value=len(durations)
        )
        buckets, total = _histogram(durations, ROUND_BUCKETS_S)
        yield HistogramMetricFamily(
            "fl_server_round_duration_seconds",
            "Rounds closed, by time from opening to the next global model.",
            buckets=buckets,
            sum_value=total,
        )

        clients = self.db.list_clients()
        alive = sum(is_alive(c.last_seen, now, self.cfg.client_gone_after_s) for c in clients)
        yield GaugeMetricFamily(
            "fl_server_clients_alive", "Sites heard from within client_gone_after_s.", value=alive
        )
        yield GaugeMetricFamily("fl_server_clients_known", "Sites ever seen.", value=len(clients))

        active = GaugeMetricFamily(
            "fl_server_active_tasks",
            "Tasks of unfinished jobs still waiting for their update, by the site's phase.",
            labels=["phase"],
        )
        counts = dict.fromkeys(Phase, 0)
        for job in jobs:
            if job.state not in TERMINAL_JOB_STATES:
                for t in self.db.job_tasks(job.job_id):
                    if t.state is TaskState.ASSIGNED:
                        counts[t.phase] += 1
        for phase, n in counts.items():
            active.add_metric([phase.value], n)
        yield active


@web.middleware
async def count_requests(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Count each request by route and status; refused update segments by error code.

    Runs inside the error middleware, so it sees the ``FLError`` itself, not its JSON.
    """
    resource = request.match_info.route.resource
    route = resource.canonical if resource is not None else "unmatched"
    metrics = request.app[METRICS]
    status = "cancelled"
    try:
        response = await handler(request)
        status = str(response.status)
        return response
    except FLError as err:
        status = str(err.http_status)
        if route == wire.UPLOAD_SEGMENT:
            metrics.segments_refused.labels(err.code).inc()
        raise
    except web.HTTPException as exc:
        status = str(exc.status)
        raise
    except Exception:
        status = "500"
        raise
    finally:
        metrics.requests.labels(request.method, route, status).inc()


def install(app: web.Application, cfg: ServerConfig, db: StateDB) -> None:
    """Add the registry, ``GET /metrics`` and the request counter to ``app``."""
    metrics = ServerMetrics(cfg, db)
    app[METRICS] = metrics
    app.middlewares.append(count_requests)
    app.router.add_get(METRICS_PATH, metrics_handler(metrics.registry))
