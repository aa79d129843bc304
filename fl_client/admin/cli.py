"""``fl-admin``: submit, watch, abort and download jobs, and list the connected sites.

Every failure the project can explain is an ``FLError``; it is printed as one
``fl-admin: <message>`` on stderr with exit code 1 (2 for an invalid configuration),
never as a traceback. ``--json`` prints the server's replies as JSON for scripts
(``watch --json``: one JSON object per poll, one per line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from pydantic import BaseModel
from rich.console import Console

from common import humanize, wire
from common.config import AdminConfig, JobConfig
from common.config_load import load_config, load_yaml, parse_config
from common.errors import ConfigError, FLError, TransferError
from common.http_client import Api, make_session
from fl_client.admin import api, download, download_view, render
from fl_client.admin.progress import JobTracker

PROG = "fl-admin"
SERVER_URL_ENV = "FL_SERVER_URL"
DEFAULT_SERVER_URL = "http://127.0.0.1:8470"
WATCH_RETRY_S = 2.0

Command = Callable[[Api, argparse.Namespace], Awaitable[int]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Administer an FL server.")
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--server",
        metavar="URL",
        help=f"server base URL (default: ${SERVER_URL_ENV}, else {DEFAULT_SERVER_URL})",
    )
    where.add_argument(
        "--config", metavar="ADMIN.yaml", type=Path, help="admin settings: server_url, timeouts"
    )
    parser.add_argument("--json", action="store_true", help="print the server's JSON replies")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("submit", help="submit a job file")
    p.add_argument("job_file", metavar="JOB.yaml", type=Path)
    sub.add_parser("list", help="list jobs")
    p = sub.add_parser("status", help="show a job's rounds and each site's progress")
    p.add_argument("job_id", metavar="JOB_ID")
    p = sub.add_parser(
        "watch",
        help="follow a job live: per site phase, bytes, rate, ETA; exit 0 only if it finished",
        description=(
            "Follow a job until it ends: progress bars in a terminal, plain lines otherwise, "
            "one JSON object per poll with --json. An unreachable server (a restart) is "
            "retried. Exit code 0 if the job finished, 1 if it failed or was aborted."
        ),
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between polls")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
    p = sub.add_parser("abort", help="abort a job")
    p.add_argument("job_id", metavar="JOB_ID")
    p = sub.add_parser(
        "delete", help="delete an ended job and all its files on the server (abort it first)"
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p = sub.add_parser(
        "download",
        help="download a job's global model, resumably, checked against its manifest",
        description=(
            "Download a job's global model in segments, each checked against the round's "
            "manifest. Run it again with the same arguments after a break or a kill: it "
            "resumes from the segments already verified (kept in .FILE.fl-download beside "
            "FILE). A job whose input model was a sharded checkpoint is written as its "
            "shards into the folder FILE. Progress goes to stderr, the paths written to "
            "stdout."
        ),
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("-o", "--output", metavar="FILE", type=Path, required=True)
    p.add_argument(
        "--round",
        type=int,
        metavar="N",
        help="the model after round N (0: initial; default: latest)",
    )
    p = sub.add_parser(
        "wait",
        help="wait for a job to end; exit 0 only if it finished",
        description=(
            "Wait until the job ends, printing each round as it starts (nothing with --json, "
            "then the final status). An unreachable server (a restart) is retried. Exit code "
            "0 if the job finished, 1 if it failed or was aborted."
        ),
    )
    p.add_argument("job_id", metavar="JOB_ID")
    p.add_argument("--timeout", type=float, metavar="S", help="give up after S seconds")
    sub.add_parser("clients", help="list connected sites")
    return parser


def admin_config(args: argparse.Namespace) -> AdminConfig:
    if args.config is not None:
        return load_config(args.config, AdminConfig)
    if args.server is not None:
        url, source = args.server, "--server"
    elif os.environ.get(SERVER_URL_ENV):
        url, source = os.environ[SERVER_URL_ENV], SERVER_URL_ENV
    else:
        url, source = DEFAULT_SERVER_URL, "default"
    return parse_config({"server_url": url}, AdminConfig, source=source)


def load_job(path: Path) -> JobConfig:
    return parse_config(load_yaml(path), JobConfig, source=str(path))


# --- output ---------------------------------------------------------------------------


def print_json(reply: BaseModel) -> None:
    print(reply.model_dump_json(indent=2))


def clock(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def job_row(j: wire.JobInfo) -> list[str]:
    rounds = f"{j.round}/{j.num_rounds}"
    return [j.job_id, j.name, j.state, rounds, humanize.size(j.model_bytes), clock(j.updated_at)]


def client_row(c: wire.ClientInfo) -> list[str]:
    seen = f"{c.seconds_since_seen:.1f} s ago"
    return [c.name, "yes" if c.alive else "no", c.phase, c.task_id or "-", seen]


# --- commands -------------------------------------------------------------------------


async def cmd_submit(a: Api, args: argparse.Namespace) -> int:
    config = await asyncio.to_thread(load_job, args.job_file)
    reply = await api.submit(a, config)
    if args.json:
        print_json(reply)
    else:
        print(reply.job_id)
    return 0


async def cmd_list(a: Api, args: argparse.Namespace) -> int:
    jobs = await api.list_jobs(a)
    if args.json:
        print_json(jobs)
        return 0
    rows = [job_row(j) for j in jobs.root]
    print(render.plain_table(["JOB_ID", "NAME", "STATE", "ROUND", "MODEL", "UPDATED"], rows))
    return 0


async def cmd_status(a: Api, args: argparse.Namespace) -> int:
    status = await api.job_status(a, args.job_id)
    if args.json:
        print_json(status)
        return 0
    progress = JobTracker().update(status, time.monotonic())
    if sys.stdout.isatty():
        Console().print(render.status_view(status, progress, time.time()))
    else:
        print(render.status_text(status, progress, time.time()))
    return 0


async def _follow(
    a: Api, job_id: str, show: Callable[[wire.JobStatus], None], poll_s: float
) -> wire.JobStatus:
    """Poll until the job ends, riding out a server restart or a network outage.

    A job runs for hours and the server may restart meanwhile (jobs resume on their own):
    an unreachable server is reported on stderr and asked again, not a reason to stop
    watching. Refusals (an unknown job id) still end the command.
    """
    while True:
        try:
            return await api.wait_for_job(a, job_id, show, poll_s=poll_s)
        except TransferError as err:
            print(f"{PROG}: {err.message}; retrying in {WATCH_RETRY_S:g} s", file=sys.stderr)
            await asyncio.sleep(WATCH_RETRY_S)


async def cmd_watch(a: Api, args: argparse.Namespace) -> int:
    display = render.make_display(render.choose_mode(args.json, sys.stdout), sys.stdout)
    tracker = JobTracker()

    def show(status: wire.JobStatus) -> None:
        now = time.monotonic()
        display.update(tracker.update(status, now), now)

    try:
        async with asyncio.timeout(args.timeout):
            status = await _follow(a, args.job_id, show, args.interval)
    except TimeoutError:
        raise FLError(f"job {args.job_id} has not ended after {args.timeout:g} s") from None
    finally:
        display.close()
    job = status.job
    if job.state != wire.JobState.FINISHED:
        reason = job.reason or "no reason given"
        print(f"{PROG}: job {job.job_id} {job.state}: {reason}", file=sys.stderr)
        return 1
    return 0


async def cmd_delete(a: Api, args: argparse.Namespace) -> int:
    gone = await api.delete(a, args.job_id)
    if args.json:
        print_json(gone)
    else:
        print(f"job {gone.job_id}: deleted")
    return 0


async def cmd_abort(a: Api, args: argparse.Namespace) -> int:
    job = await api.abort(a, args.job_id)
    if args.json:
        print_json(job)
    else:
        print(f"job {job.job_id}: {job.state}")
    return 0


async def cmd_download(a: Api, args: argparse.Namespace) -> int:
    view = download_view.make_view(sys.stderr)
    written = await download.download(a, args.job_id, args.output, round=args.round, view=view)
    total = sum(w.nbytes for w in written)
    if args.json:
        files = [str(w.path) for w in written]
        print(json.dumps({"path": str(args.output), "bytes": total, "files": files}))
    else:
        for w in written:
            print(f"wrote {w.nbytes} bytes ({humanize.size(w.nbytes)}) to {w.path}")
    return 0


async def cmd_wait(a: Api, args: argparse.Namespace) -> int:
    def ignore(_: wire.JobStatus) -> None:
        pass

    on_status = ignore if args.json else api.RoundProgress()
    try:
        async with asyncio.timeout(args.timeout):
            status = await _follow(a, args.job_id, on_status, api.POLL_S)
    except TimeoutError:
        raise FLError(f"job {args.job_id} has not ended after {args.timeout:g} s") from None
    job = status.job
    if args.json:
        print_json(status)
    elif job.state == wire.JobState.FINISHED:
        print(f"job {job.job_id}: finished after {job.round}/{job.num_rounds} rounds")
    else:
        reason = job.reason or "no reason given"
        print(f"{PROG}: job {job.job_id} {job.state}: {reason}", file=sys.stderr)
    return 0 if job.state == wire.JobState.FINISHED else 1


async def cmd_clients(a: Api, args: argparse.Namespace) -> int:
    clients = await api.list_clients(a)
    if args.json:
        print_json(clients)
        return 0
    rows = [client_row(c) for c in clients.root]
    print(render.plain_table(["NAME", "ALIVE", "PHASE", "TASK", "LAST SEEN"], rows))
    return 0


COMMANDS: dict[str, Command] = {
    "submit": cmd_submit,
    "list": cmd_list,
    "status": cmd_status,
    "abort": cmd_abort,
    "delete": cmd_delete,
    "download": cmd_download,
    "wait": cmd_wait,
    "watch": cmd_watch,
    "clients": cmd_clients,
}


async def run(config: AdminConfig, args: argparse.Namespace) -> int:
    async with make_session(identity=None, tls=config.tls) as session:
        return await COMMANDS[args.command](Api(session, config.server_url, config.timeouts), args)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse has already printed
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return asyncio.run(run(admin_config(args), args))
    except ConfigError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    except FLError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
