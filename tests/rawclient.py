"""A client site driven by hand, request by request, for tests of what the server refuses.

The daemon (``fl-client``) only ever sends well-formed requests; a test of bad input
needs to send exactly the bytes it chooses: a segment with a wrong digest, a body cut
short, a commit for someone else's task. ``RawSite`` speaks the real HTTP API to the
real server with ``http.client`` and leaves every decision to the test.
"""

from __future__ import annotations

import http.client
import json
import socket
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.digest import segment_range, whole_digest
from common.modelio import ModelReader, ModelWriter, hash_file_segments
from common.tensorfile import Layout, Manifest
from common.wire import CLIENT_HEADER, DIGEST_HEADER, NUM_SAMPLES_HEADER


@dataclass
class Reply:
    status: int
    body: Any

    @property
    def code(self) -> str | None:
        return self.body.get("code") if isinstance(self.body, dict) else None

    @property
    def message(self) -> str:
        return str(self.body.get("message", "")) if isinstance(self.body, dict) else ""


@dataclass
class RawSite:
    port: int
    name: str

    def _conn(self) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)

    def request(
        self,
        method: str,
        path: str,
        body: bytes | Iterable[bytes] | None = None,
        headers: dict[str, str] | None = None,
        *,
        chunked: bool = False,
    ) -> Reply:
        conn = self._conn()
        try:
            conn.request(
                method,
                path,
                body=body,
                headers={CLIENT_HEADER: self.name, **(headers or {})},
                encode_chunked=chunked,
            )
            resp = conn.getresponse()
            raw = resp.read()
        finally:
            conn.close()
        return Reply(resp.status, json.loads(raw) if raw else None)

    def json(self, method: str, path: str, payload: object) -> Reply:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        return self.request(method, path, data, {"Content-Type": "application/json"})

    # the protocol, one call per step
    def hello(self) -> None:
        """A heartbeat: the server now counts this site as connected."""
        reply = self.json("POST", f"/v1/clients/{self.name}/heartbeat", {})
        assert reply.status == 200, reply

    def task(self, wait_s: float = 10.0) -> dict[str, Any]:
        reply = self.request("GET", f"/v1/clients/{self.name}/task?wait={wait_s}")
        assert reply.status == 200 and reply.body["task"] is not None, reply
        task: dict[str, Any] = reply.body["task"]
        return task

    def download(self, task: dict[str, Any], dest: Path) -> Path:
        conn = self._conn()
        try:
            conn.request("GET", task["model_url"], headers={CLIENT_HEADER: self.name})
            resp = conn.getresponse()
            assert resp.status == 200, resp.status
            with open(dest, "wb") as f:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
        finally:
            conn.close()
        return dest

    def put_segment(
        self,
        task_id: str,
        index: int,
        data: bytes,
        digest: str,
        *,
        chunked: bool = False,
        num_samples: int | str | None = None,
    ) -> Reply:
        path = f"/v1/tasks/{task_id}/upload/{index}"
        headers = {DIGEST_HEADER: digest}
        if num_samples is not None:
            headers[NUM_SAMPLES_HEADER] = str(num_samples)
        if chunked:
            pieces = [data[i : i + 65536] for i in range(0, len(data), 65536)]
            return self.request("PUT", path, iter(pieces), headers, chunked=True)
        return self.request("PUT", path, data, headers)

    def put_cut_short(self, task_id: str, index: int, length: int, data: bytes) -> None:
        """Declare ``length`` bytes, send ``data`` (fewer), then drop the connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            head = (
                f"PUT /v1/tasks/{task_id}/upload/{index} HTTP/1.1\r\n"
                f"Host: 127.0.0.1\r\n{CLIENT_HEADER}: {self.name}\r\n"
                f"{DIGEST_HEADER}: 0\r\nContent-Length: {length}\r\n\r\n"
            )
            s.sendall(head.encode() + data)
            s.shutdown(socket.SHUT_WR)
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass

    def upload_status(self, task_id: str) -> Reply:
        return self.request("GET", f"/v1/tasks/{task_id}/upload")

    def commit(self, task_id: str, digest: str, num_samples: int = 1, **extra: Any) -> Reply:
        body = {"digest": digest, "num_samples": num_samples, **extra}
        return self.json("POST", f"/v1/tasks/{task_id}/commit", body)

    def upload(
        self, task_id: str, update: Path, segment_bytes: int, num_samples: int | None = None
    ) -> list[Reply]:
        """Every segment of ``update``, in order, with its true digest (and the weight
        declared, if ``num_samples`` is given)."""
        return [
            self.put_segment(task_id, i, data, digest, num_samples=num_samples)
            for i, data, digest in file_segments(update, segment_bytes)
        ]


def file_segments(path: Path, segment_bytes: int) -> Iterator[tuple[int, bytes, str]]:
    size = path.stat().st_size
    digests = hash_file_segments(path, segment_bytes)
    with open(path, "rb") as f:
        for i in range(len(digests)):
            start, end = segment_range(i, size, segment_bytes)
            f.seek(start)
            yield i, f.read(end - start), digests[i]


def file_digest(path: Path, segment_bytes: int) -> str:
    digests = hash_file_segments(path, segment_bytes)
    return whole_digest([digests[i] for i in range(len(digests))])


Edit = Callable[[str, np.ndarray], np.ndarray]


def write_update(
    model: Path,
    dest: Path,
    manifest: Manifest,
    edit: Edit,
    *,
    layout: Layout | None = None,
) -> Path:
    """``edit(name, tensor)`` of every tensor of ``model``, written as ``dest``.

    ``layout`` (default: the model's) lets a test write tensors other than the model's:
    then ``edit`` gets each tensor of ``layout`` by name from the model where it exists.
    """
    target = layout if layout is not None else manifest.layout
    with (
        ModelReader(model) as reader,
        ModelWriter(dest, target, segment_bytes=manifest.segment_bytes, durable=False) as writer,
    ):
        for spec in target.tensors:
            source = spec.name if spec.name in reader.names else reader.names[0]
            values = edit(spec.name, reader.read_tensor(source))
            writer.write(np.ascontiguousarray(values.reshape(-1)).astype(spec.np_dtype))
        writer.finish()
    return dest
