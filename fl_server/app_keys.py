"""Typed keys for what the aiohttp application holds."""

from __future__ import annotations

from concurrent.futures import Executor

from aiohttp import web

from common.config import ServerConfig
from common.identity import Identity
from fl_server.limits import Limits
from fl_server.runner import JobRunner
from fl_server.staging import Staging
from fl_server.state import StateDB
from fl_server.workspace import Workspace

CONFIG = web.AppKey("config", ServerConfig)
DB = web.AppKey("db", StateDB)
WORKSPACE = web.AppKey("workspace", Workspace)
RUNNER = web.AppKey("runner", JobRunner)
UPLOADS = web.AppKey("uploads", set[tuple[str, int]])
LIMITS = web.AppKey("limits", Limits)
STAGING = web.AppKey("staging", Staging)  # models uploaded with jobs
SENDERS = web.AppKey("senders", Executor)  # threads of plain-HTTP file sends (filesend)
CALLER = web.RequestKey("caller", Identity)  # set by fl_server.auth when TLS is on
