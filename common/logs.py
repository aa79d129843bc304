"""Logging set-up: human-readable lines by default, JSON lines on request.

Lines about a job, round, client or task carry those ids (see ``common.logctx``): as
separate keys in JSON (``job``, ``round``, ``client``, ``task``), as a
``[job=... task=...]`` prefix of the message in text. Log lines never carry model data:
sizes, offsets and digests only.
"""

from __future__ import annotations

import json
import logging
import sys
import time

from common.logctx import IdsFilter, record_ids


class JsonFormatter(logging.Formatter):
    def __init__(self, role: str) -> None:
        super().__init__()
        self.role = role

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "role": self.role,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(record_ids(record).fields())
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


class TextFormatter(logging.Formatter):
    """``12:00:01.234 server INFO fl_server.api: [job=... task=...] message`` (UTC)."""

    def __init__(self, role: str) -> None:
        super().__init__(
            f"%(asctime)s.%(msecs)03d {role} %(levelname)s %(name)s: %(message)s", "%H:%M:%S"
        )
        self.converter = time.gmtime

    def formatMessage(self, record: logging.LogRecord) -> str:
        prefix = record_ids(record).text()
        if not prefix:
            return super().formatMessage(record)
        message = record.message
        record.message = prefix + message
        try:
            return super().formatMessage(record)
        finally:
            record.message = message


def setup_logging(level: str, fmt: str, *, role: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(role) if fmt == "json" else TextFormatter(role))
    handler.addFilter(IdsFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
