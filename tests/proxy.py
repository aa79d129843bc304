"""A fault-injecting TCP proxy for loopback tests, aware of HTTP/1.1 message framing.

Theory of operation. Each accepted connection is paired with a new connection to
127.0.0.1:<target> (never any other host), and two pumps copy bytes, one per direction:
``up`` (client to server) and ``down`` (server to client). Each pump runs its bytes
through a small HTTP/1.1 framer that finds message heads (held back until complete),
bodies (Content-Length, chunked, or until close) and chunk framing, so that a fault can
target one request, e.g. the third ``PUT /v1/tasks/<id>/upload/<i>``, even when the
client reuses connections. A response is matched with the request line it answers.

A fault is a ``Rule``: ``match`` (a regular expression searched in the request line,
e.g. ``r"PUT /v1/tasks/\\S+/upload/"``; ``None`` matches everything), ``direction``
(``up``, ``down`` or ``both``) and exactly one of:

- ``cut_after_bytes=N``: once N bytes of a matching message (head included) have been
  forwarded in ``direction``, close both sides of its connection;
- ``throttle_bps=R``: at most R bytes/s in each of the rule's directions, shared by
  every connection the rule matches;
- ``stall=True``: stop forwarding (sockets stay open) after ``after_bytes`` bytes of
  each matching message, until the rule is removed;
- ``corrupt_at_byte=N``: flip (xor 0xFF) the body byte at decoded offset N, counted
  after the HTTP head and excluding chunk framing;
- ``delay_s=D``: hold each matching message D seconds before its first byte goes on
  (a remote that is slow to answer, e.g. preparing a large model).

``limit=K`` makes a cut or a corruption apply to the first K matching messages only
(corruption defaults to 1). Cuts and corruptions claim a message when its head passes;
stalls and throttles apply at once to bytes still to come, also on open connections.
Rules are replaced as a whole at run time; removing a rule lifts its stall at once.

Counters: bytes forwarded per direction, connections, requests (with their request
lines), body bytes forwarded per direction and request line (decoded: no head, no
chunk framing; a response counts under the line of its request), cuts, corruptions,
pumps stalled right now, and per rule how many messages it claimed and how often it
fired.

Two ways to run it, with the same control API (``set_faults``, ``clear_faults``,
``stats``, ``reset_stats``, ``stop``):

- ``ProxyProcess.start(target_port, workdir)``: ``python -m tests.proxy`` in its own
  process, controlled over a JSON/HTTP port on 127.0.0.1 (``GET /stats``,
  ``PUT /faults`` with a JSON list of rules, ``POST /reset``);
- ``ProxyThread(target_port).start()``: in this process, on a background thread that
  runs its own asyncio loop, for synchronous tests.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    model_validator,
)

HOST = "127.0.0.1"
READ_BYTES = 64 * 1024
MAX_HEAD_BYTES = 64 * 1024
THROTTLE_SLICES_PER_S = 20  # a throttled pump writes at least this often: smooth progress
REQUEST_LINES_KEPT = 5000
REPO = Path(__file__).resolve().parents[1]

Direction = Literal["up", "down", "both"]


class Rule(BaseModel):
    """One fault; see the module docstring."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    match: str | None = None
    direction: Direction = "both"
    limit: PositiveInt | None = None
    cut_after_bytes: NonNegativeInt | None = None
    throttle_bps: PositiveInt | None = None
    stall: bool = False
    after_bytes: NonNegativeInt = 0
    corrupt_at_byte: NonNegativeInt | None = None
    delay_s: PositiveFloat | None = None

    @model_validator(mode="after")
    def _one_fault(self) -> Rule:
        faults = [
            self.cut_after_bytes is not None,
            self.throttle_bps is not None,
            self.stall,
            self.corrupt_at_byte is not None,
            self.delay_s is not None,
        ]
        if sum(faults) != 1:
            raise ValueError(
                "give exactly one of cut_after_bytes, throttle_bps, stall, corrupt_at_byte, delay_s"
            )
        one_way = self.cut_after_bytes is not None or self.corrupt_at_byte is not None
        if one_way and self.direction == "both":
            raise ValueError("cut_after_bytes and corrupt_at_byte need direction 'up' or 'down'")
        if self.after_bytes and not self.stall:
            raise ValueError("after_bytes applies to stall only")
        if self.match is not None:
            re.compile(self.match)
        return self

    @property
    def claims(self) -> bool:
        return self.cut_after_bytes is not None or self.corrupt_at_byte is not None

    @property
    def max_claims(self) -> int | None:
        if self.limit is None and self.corrupt_at_byte is not None:
            return 1
        return self.limit


@dataclass(frozen=True)
class ProxyStats:
    connections: int
    open_connections: int
    requests: int
    bytes_up: int
    bytes_down: int
    cuts: int
    corruptions: int
    stalled: int
    request_lines: list[str]
    rules: list[dict[str, Any]]
    body_bytes: dict[str, dict[str, int]]  # direction -> request line -> body bytes

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProxyStats:
        return cls(
            connections=data["connections"],
            open_connections=data["open_connections"],
            requests=data["requests"],
            bytes_up=data["bytes"]["up"],
            bytes_down=data["bytes"]["down"],
            cuts=data["cuts"],
            corruptions=data["corruptions"],
            stalled=data["stalled"],
            request_lines=list(data["request_lines"]),
            rules=list(data["rules"]),
            body_bytes={d: dict(lines) for d, lines in data["body_bytes"].items()},
        )

    def count(self, pattern: str) -> int:
        """Requests whose line matches ``pattern`` (a regular expression)."""
        rx = re.compile(pattern)
        return sum(1 for line in self.request_lines if rx.search(line))

    def body(self, pattern: str, direction: Literal["up", "down"]) -> int:
        """Body bytes forwarded in ``direction`` for requests whose line matches ``pattern``:
        ``up`` the requests' bodies, ``down`` their responses' bodies; cut ones included."""
        rx = re.compile(pattern)
        return sum(n for line, n in self.body_bytes[direction].items() if rx.search(line))


# HTTP/1.1 framing, one direction of one connection


@dataclass
class Message:
    line: str  # the request line (for a response: the line of the request it answers)
    method: str
    sent: int = 0  # bytes of this message forwarded so far, head included
    claimed: list[_Active] = field(default_factory=list)


@dataclass
class Piece:
    data: bytes
    msg: Message
    body_at: int | None  # decoded body offset of data[0]; None for head and framing


class _Framer:
    """Splits one direction of an HTTP/1.1 stream into heads, body bytes and framing."""

    def __init__(self, on_head: Callable[[bytes], tuple[Message, int | None, bool]]) -> None:
        # on_head(head) -> (message, content_length or None, chunked); a content length of
        # -1 means "until the connection closes"
        self._on_head = on_head
        self._state = "head"
        self._buf = bytearray()
        self._msg: Message | None = None
        self._left = 0  # bytes left in the current body or chunk
        self._body_at = 0

    def feed(self, data: bytes) -> Iterator[Piece]:
        pos = 0
        while pos < len(data):
            if self._state == "head":
                self._buf += data[pos:]
                pos = len(data)
                end = self._buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self._buf) > MAX_HEAD_BYTES:  # not HTTP after all: pass through
                        self._msg = Message(line="", method="")
                        self._state = "opaque"
                        chunk, self._buf = bytes(self._buf), bytearray()
                        yield Piece(chunk, self._msg, None)
                    return
                head = bytes(self._buf[: end + 4])
                rest = bytes(self._buf[end + 4 :])
                self._buf = bytearray()
                msg, length, chunked = self._on_head(head)
                self._msg, self._body_at = msg, 0
                yield Piece(head, msg, None)
                if chunked:
                    self._state = "size"
                elif length == -1:
                    self._state = "until_close"
                elif length:
                    self._state, self._left = "length", length
                else:
                    self._state = "head"
                if rest:
                    yield from self.feed(rest)
                return
            assert self._msg is not None
            if self._state in ("length", "data"):
                n = min(self._left, len(data) - pos)
                yield Piece(data[pos : pos + n], self._msg, self._body_at)
                self._body_at += n
                self._left -= n
                pos += n
                if self._left == 0:
                    self._state = "head" if self._state == "length" else "crlf"
                    self._left = 2
            elif self._state in ("until_close", "opaque"):
                body_at = self._body_at if self._state == "until_close" else None
                yield Piece(data[pos:], self._msg, body_at)
                self._body_at += len(data) - pos
                pos = len(data)
            elif self._state == "crlf":
                n = min(self._left, len(data) - pos)
                yield Piece(data[pos : pos + n], self._msg, None)
                self._left -= n
                pos += n
                if self._left == 0:
                    self._state = "size"
            else:  # "size" or "trailer": one line at a time
                nl = data.find(b"\n", pos)
                if nl < 0:
                    self._buf += data[pos:]
                    yield Piece(data[pos:], self._msg, None)
                    return
                line = bytes(self._buf) + data[pos:nl]
                self._buf = bytearray()
                yield Piece(data[pos : nl + 1], self._msg, None)
                pos = nl + 1
                text = line.strip()
                if self._state == "size":
                    size = int(text.split(b";")[0] or b"0", 16)
                    if size:
                        self._state, self._left = "data", size
                    else:
                        self._state = "trailer"
                elif not text:  # the empty line that ends the trailer
                    self._state = "head"


def _headers(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    out: dict[str, str] = {}
    for h in lines[1:]:
        if ":" in h:
            k, v = h.split(":", 1)
            out[k.strip().lower()] = v.strip()
    return lines[0], out


def _framing(headers: dict[str, str]) -> tuple[int | None, bool]:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return None, True
    if "content-length" in headers:
        return int(headers["content-length"]), False
    return None, False


# the proxy core


class _Cut(Exception):
    """A cut rule fired: the connection is closed on purpose."""


class _Bucket:
    """A shared rate limit: each caller reserves the next free slot of the line."""

    def __init__(self, bps: int) -> None:
        self.bps = bps
        self._next_free = 0.0

    async def take(self, nbytes: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(now, self._next_free)
        self._next_free = start + nbytes / self.bps
        await asyncio.sleep(max(0.0, self._next_free - now))


class _Active:
    """A rule as installed: its compiled pattern, counters and rate buckets."""

    def __init__(self, rule: Rule) -> None:
        self.rule = rule
        self.rx = re.compile(rule.match) if rule.match is not None else None
        self.claimed = 0
        self.fired = 0
        self.buckets = (
            {"up": _Bucket(rule.throttle_bps), "down": _Bucket(rule.throttle_bps)}
            if rule.throttle_bps is not None
            else {}
        )

    def applies(self, direction: str, msg: Message | None) -> bool:
        if self.rule.direction not in ("both", direction):
            return False
        if self.rx is None:
            return True
        return msg is not None and self.rx.search(msg.line) is not None


class FaultProxy:
    """The proxy on the running asyncio loop; see the module docstring."""

    def __init__(self, target_port: int, *, sock_buffer: int | None = None) -> None:
        self.target_port = target_port
        self.sock_buffer = sock_buffer
        self.port = 0
        self._rules: list[_Active] = []
        self._changed = asyncio.Event()
        self._server: asyncio.Server | None = None
        self._conns: set[asyncio.Task[None]] = set()
        self.reset_stats()

    # control
    def set_rules(self, rules: list[Rule]) -> None:
        self._rules = [_Active(r) for r in rules]
        old, self._changed = self._changed, asyncio.Event()
        old.set()

    def reset_stats(self) -> None:
        self.connections = 0
        self.requests = 0
        self.bytes = {"up": 0, "down": 0}
        self.cuts = 0
        self.corruptions = 0
        self.stalled = 0
        self.request_lines: collections.deque[str] = collections.deque(maxlen=REQUEST_LINES_KEPT)
        # one entry per distinct request line: a test's handful of tasks and segments
        self.body_bytes: dict[str, collections.Counter[str]] = {
            "up": collections.Counter(),
            "down": collections.Counter(),
        }
        for a in self._rules:
            a.claimed = a.fired = 0

    def stats(self) -> dict[str, Any]:
        return {
            "connections": self.connections,
            "open_connections": len(self._conns),
            "requests": self.requests,
            "bytes": dict(self.bytes),
            "cuts": self.cuts,
            "corruptions": self.corruptions,
            "stalled": self.stalled,
            "request_lines": list(self.request_lines),
            "body_bytes": {d: dict(lines) for d, lines in self.body_bytes.items()},
            "rules": [
                {
                    "rule": a.rule.model_dump(exclude_defaults=True),
                    "claimed": a.claimed,
                    "fired": a.fired,
                }
                for a in self._rules
            ],
        }

    # lifetime
    def _socket(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if self.sock_buffer is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, self.sock_buffer)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, self.sock_buffer)
        return sock

    async def start(self, listen_port: int = 0) -> None:
        sock = self._socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((HOST, listen_port))
        self._server = await asyncio.start_server(self._handle, sock=sock, backlog=256)
        self.port = int(sock.getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._conns):
            t.cancel()
        for t in list(self._conns):
            with contextlib.suppress(BaseException):
                await t
        if self._server is not None:
            await self._server.wait_closed()

    # one connection
    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        # the root task of one connection: a cancellation (proxy closing) ends it quietly
        with contextlib.suppress(asyncio.CancelledError):
            await self._connection(c_reader, c_writer)

    async def _connection(
        self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter
    ) -> None:
        me = asyncio.current_task()
        assert me is not None
        self._conns.add(me)
        self.connections += 1
        s_writer: asyncio.StreamWriter | None = None
        try:
            sock = self._socket()
            sock.setblocking(False)
            try:
                await asyncio.get_running_loop().sock_connect(sock, (HOST, self.target_port))
            except OSError:
                sock.close()
                return
            s_reader, s_writer = await asyncio.open_connection(sock=sock)
            pending: collections.deque[Message] = collections.deque()
            writers = (c_writer, s_writer)

            def request_head(head: bytes) -> tuple[Message, int | None, bool]:
                line, headers = _headers(head)
                msg = Message(line=line, method=line.split(" ", 1)[0])
                self.requests += 1
                self.request_lines.append(line)
                pending.append(msg)
                self._claim("up", msg)
                length, chunked = _framing(headers)
                return msg, length or 0, chunked

            def response_head(head: bytes) -> tuple[Message, int | None, bool]:
                line, headers = _headers(head)
                parts = line.split(" ", 2)
                status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0
                if 100 <= status < 200:
                    req = pending[0] if pending else Message(line="", method="")
                else:
                    req = pending.popleft() if pending else Message(line="", method="")
                msg = Message(line=req.line, method=req.method)
                self._claim("down", msg)
                length, chunked = _framing(headers)
                if req.method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                    return msg, 0, False
                if chunked:
                    return msg, None, True
                return msg, -1 if length is None else length, False

            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._pump("up", c_reader, s_writer, _Framer(request_head), writers))
                tg.create_task(
                    self._pump("down", s_reader, c_writer, _Framer(response_head), writers)
                )
        except* (OSError, _Cut, ValueError):
            pass
        finally:
            for w in (c_writer, s_writer):
                if w is not None:
                    w.close()
            for w in (c_writer, s_writer):
                if w is not None:
                    with contextlib.suppress(Exception):
                        await w.wait_closed()
            self._conns.discard(me)

    def _claim(self, direction: str, msg: Message) -> None:
        for a in self._rules:
            cap = a.rule.max_claims
            if a.rule.claims and a.applies(direction, msg) and (cap is None or a.claimed < cap):
                a.claimed += 1
                msg.claimed.append(a)

    def _stall_room(self, direction: str, msg: Message | None) -> int | None:
        """Bytes that may pass before a stall applies (0: stalled now; None: no stall)."""
        room: int | None = None
        for a in self._rules:
            if a.rule.stall and a.applies(direction, msg):
                left = max(0, a.rule.after_bytes - (msg.sent if msg is not None else 0))
                if msg is None and a.rule.after_bytes:
                    continue
                room = left if room is None else min(room, left)
        return room

    async def _wait_unstalled(self, direction: str, msg: Message | None) -> int | None:
        counted = False
        try:
            while (room := self._stall_room(direction, msg)) == 0:
                if not counted:
                    counted = True
                    self.stalled += 1
                    for a in self._rules:
                        if a.rule.stall and a.applies(direction, msg):
                            a.fired += 1
                await self._changed.wait()
            return room
        finally:
            if counted:
                self.stalled -= 1

    async def _pump(
        self,
        direction: str,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        framer: _Framer,
        writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        while True:
            await self._wait_unstalled(direction, None)
            data = await reader.read(READ_BYTES)
            if not data:
                if writer.can_write_eof():
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                return
            for piece in framer.feed(data):
                await self._forward(direction, piece, writer, writers)

    async def _forward(
        self,
        direction: str,
        piece: Piece,
        writer: asyncio.StreamWriter,
        writers: tuple[asyncio.StreamWriter, asyncio.StreamWriter],
    ) -> None:
        msg = piece.msg
        data = piece.data
        body_at = piece.body_at
        while True:
            cuts = [
                a for a in msg.claimed if a.rule.cut_after_bytes is not None and a in self._rules
            ]
            for a in cuts:
                assert a.rule.cut_after_bytes is not None
                if msg.sent >= a.rule.cut_after_bytes:
                    a.fired += 1
                    self.cuts += 1
                    for w in writers:
                        w.close()
                    raise _Cut(f"{direction} {msg.line!r} cut after {msg.sent} bytes")
            if not data:
                return
            if msg.sent == 0:
                await self._delay(direction, msg)
            room = await self._wait_unstalled(direction, msg)
            n = len(data)
            if room is not None:
                n = min(n, room)
            for a in cuts:
                assert a.rule.cut_after_bytes is not None
                n = min(n, a.rule.cut_after_bytes - msg.sent)
            throttles = [
                a
                for a in self._rules
                if a.rule.throttle_bps is not None and a.applies(direction, msg)
            ]
            for a in throttles:
                assert a.rule.throttle_bps is not None
                n = min(n, max(1, a.rule.throttle_bps // THROTTLE_SLICES_PER_S))
            for a in throttles:
                await a.buckets[direction].take(n)
            chunk = data[:n]
            if body_at is not None:
                chunk = self._corrupt(msg, chunk, body_at)
                body_at += n
            writer.write(chunk)
            await writer.drain()
            self.bytes[direction] += n
            if piece.body_at is not None:
                self.body_bytes[direction][msg.line] += n
            msg.sent += n
            data = data[n:]

    async def _delay(self, direction: str, msg: Message) -> None:
        delays = [
            a for a in self._rules if a.rule.delay_s is not None and a.applies(direction, msg)
        ]
        for a in delays:
            a.fired += 1
        if delays:
            await asyncio.sleep(max(a.rule.delay_s or 0.0 for a in delays))

    def _corrupt(self, msg: Message, chunk: bytes, body_at: int) -> bytes:
        for a in msg.claimed:
            at = a.rule.corrupt_at_byte
            if at is not None and a in self._rules and body_at <= at < body_at + len(chunk):
                buf = bytearray(chunk)
                buf[at - body_at] ^= 0xFF
                chunk = bytes(buf)
                a.fired += 1
                self.corruptions += 1
        return chunk


# control over HTTP (process mode)


async def _control(
    proxy: FaultProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        line, headers = _headers(head)
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        method, path = line.split(" ")[:2]
        status, reply = 200, {}
        try:
            if method == "GET" and path == "/stats":
                reply = proxy.stats()
            elif method == "PUT" and path == "/faults":
                proxy.set_rules([Rule.model_validate(r) for r in json.loads(body or b"[]")])
                reply = proxy.stats()
            elif method == "POST" and path == "/reset":
                proxy.reset_stats()
                reply = proxy.stats()
            else:
                status, reply = 404, {"error": f"no such control route: {method} {path}"}
        except ValueError as exc:
            status, reply = 400, {"error": str(exc)}
        out = json.dumps(reply).encode()
        writer.write(
            f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(out)}\r\nConnection: close\r\n\r\n".encode()
            + out
        )
        await writer.drain()
    except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        pass
    finally:
        writer.close()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


async def _serve(args: argparse.Namespace) -> None:
    proxy = FaultProxy(args.target_port, sock_buffer=args.sock_buffer)
    if args.faults:
        proxy.set_rules([Rule.model_validate(r) for r in json.loads(args.faults)])
    await proxy.start(args.listen_port)
    control = await asyncio.start_server(
        lambda r, w: _control(proxy, r, w), HOST, args.control_port
    )
    control_port = int(control.sockets[0].getsockname()[1])
    if args.ready_file:
        ports = {"listen_port": proxy.port, "control_port": control_port}
        await asyncio.to_thread(_write_atomic, Path(args.ready_file), json.dumps(ports))
    print(
        f"proxy 127.0.0.1:{proxy.port} -> 127.0.0.1:{args.target_port}, control "
        f"127.0.0.1:{control_port}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    control.close()
    await proxy.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.proxy", description=__doc__.split("\n")[0])
    p.add_argument("--target-port", type=int, required=True, help="port on 127.0.0.1 to forward to")
    p.add_argument("--listen-port", type=int, default=0, help="port to accept on (0: pick one)")
    p.add_argument("--control-port", type=int, default=0, help="JSON control port (0: pick one)")
    p.add_argument("--ready-file", help="write the chosen ports here as JSON once listening")
    p.add_argument("--faults", help="initial rules, a JSON list")
    p.add_argument("--sock-buffer", type=int, help="SO_RCVBUF/SO_SNDBUF bytes of every socket")
    asyncio.run(_serve(p.parse_args(argv)))
    return 0


# the two ways to drive it from a synchronous test


RuleLike = Rule | dict[str, Any]


def _rules(rules: tuple[RuleLike, ...]) -> list[Rule]:
    return [r if isinstance(r, Rule) else Rule.model_validate(r) for r in rules]


class ProxyProcess:
    """``python -m tests.proxy`` as a child process, driven over its control port."""

    def __init__(
        self, popen: subprocess.Popen[bytes], port: int, control_port: int, log: Path
    ) -> None:
        self.popen = popen
        self.port = port
        self.control_port = control_port
        self.log = log

    @classmethod
    def start(
        cls,
        target_port: int,
        workdir: Path,
        *,
        name: str = "proxy",
        sock_buffer: int | None = None,
        timeout: float = 20.0,
    ) -> ProxyProcess:
        ready = workdir / f"{name}.ready.json"
        log = workdir / f"{name}.log"
        args = [
            sys.executable,
            "-m",
            "tests.proxy",
            "--target-port",
            str(target_port),
            "--ready-file",
            str(ready),
        ]
        if sock_buffer is not None:
            args += ["--sock-buffer", str(sock_buffer)]
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        with open(log, "ab") as f:
            popen = subprocess.Popen(
                args, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not ready.exists():
            if popen.poll() is not None or time.monotonic() > deadline:
                popen.kill()
                popen.wait()
                raise RuntimeError(f"proxy did not start:\n{log.read_text(errors='replace')}")
            time.sleep(0.02)
        ports = json.loads(ready.read_text())
        return cls(popen, ports["listen_port"], ports["control_port"], log)

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(
            f"http://{HOST}:{self.control_port}{path}", data=data, method=method
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def set_faults(self, *rules: RuleLike) -> None:
        self._call("PUT", "/faults", [r.model_dump() for r in _rules(rules)])

    def clear_faults(self) -> None:
        self.set_faults()

    def stats(self) -> ProxyStats:
        return ProxyStats.from_json(self._call("GET", "/stats"))

    def reset_stats(self) -> None:
        self._call("POST", "/reset")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def __enter__(self) -> ProxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class ProxyThread:
    """The proxy on a background thread running its own asyncio loop."""

    def __init__(self, target_port: int, *, sock_buffer: int | None = None) -> None:
        self.target_port = target_port
        self.sock_buffer = sock_buffer
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="fault-proxy", daemon=True
        )
        self._proxy: FaultProxy | None = None

    def start(self) -> ProxyThread:
        self._thread.start()
        self._proxy = self._run(self._start())
        return self

    async def _start(self) -> FaultProxy:
        proxy = FaultProxy(self.target_port, sock_buffer=self.sock_buffer)
        await proxy.start()
        return proxy

    def _run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(30)

    def _call(self, fn: Callable[[], Any]) -> Any:
        async def wrapped() -> Any:
            return fn()

        return self._run(wrapped())

    @property
    def proxy(self) -> FaultProxy:
        assert self._proxy is not None, "call start() first"
        return self._proxy

    @property
    def port(self) -> int:
        return self.proxy.port

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    def set_faults(self, *rules: RuleLike) -> None:
        parsed = _rules(rules)
        self._call(lambda: self.proxy.set_rules(parsed))

    def clear_faults(self) -> None:
        self.set_faults()

    def stats(self) -> ProxyStats:
        return ProxyStats.from_json(self._call(self.proxy.stats))

    def reset_stats(self) -> None:
        self._call(self.proxy.reset_stats)

    def stop(self) -> None:
        if not self._thread.is_alive():
            return
        if self._proxy is not None:
            self._run(self._proxy.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.run_until_complete(self._loop.shutdown_asyncgens())
        self._loop.close()

    def __enter__(self) -> ProxyThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
