"""This machine's raw limits, measured in the same run as the job they are compared with."""

from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path

import numpy as np

BUF_BYTES = 8 * 1024 * 1024


def disk_write_gbps(directory: Path, nbytes: int) -> float:
    """Sequential write of ``nbytes`` with a reused buffer, fsync included: the disk's rate."""
    buf = np.full(BUF_BYTES, 7, dtype=np.uint8)
    path = directory / "disk-baseline.bin"
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        left = nbytes
        while left > 0:
            left -= os.write(fd, buf.data[: min(left, BUF_BYTES)])
        os.fsync(fd)
    finally:
        os.close(fd)
        elapsed = time.perf_counter() - start
        path.unlink(missing_ok=True)
    return nbytes / elapsed / 1e9


def loopback_gbps(nbytes: int) -> float:
    """One TCP stream over 127.0.0.1, sender and receiver reusing their buffers."""
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    received = 0

    def receive() -> None:
        nonlocal received
        conn, _ = server.accept()
        buf = bytearray(1024 * 1024)
        view = memoryview(buf)
        with conn:
            while n := conn.recv_into(view):
                received += n

    t = threading.Thread(target=receive)
    t.start()
    payload = memoryview(bytearray(1024 * 1024))
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        sent = 0
        while sent < nbytes:
            s.sendall(payload)
            sent += len(payload)
    t.join()
    elapsed = time.perf_counter() - start
    server.close()
    return received / elapsed / 1e9
