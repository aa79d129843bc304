"""Upload handler helpers that must hold under cancellation."""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest

from fl_server.intake import open_in_thread


async def test_a_descriptor_opened_after_the_handler_was_cancelled_is_closed(
    tmp_path: Path,
) -> None:
    go = threading.Event()
    opened: list[int] = []

    def opener(path: Path) -> int:
        go.wait(10)  # the handler is cancelled while the thread is still here
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        opened.append(fd)
        return fd

    handler = asyncio.create_task(open_in_thread(opener, tmp_path / "spool"))
    await asyncio.sleep(0.05)
    handler.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handler
    go.set()
    for _ in range(200):  # the thread returns, then the loop runs the clean-up
        await asyncio.sleep(0.01)
        if opened:
            await asyncio.sleep(0.05)
            break
    assert opened, "the opener never ran"
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(opened[0])
