"""Log lines carry the ids of the work at hand: in tasks, threads, JSON and text."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator

import pytest

from common import logctx
from common.logs import JsonFormatter, TextFormatter


@pytest.fixture
def stream() -> Iterator[tuple[io.StringIO, logging.StreamHandler[io.StringIO]]]:
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.addFilter(logctx.IdsFilter())
    log = logging.getLogger("test.logctx")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield buf, handler
    log.removeHandler(handler)


def lines(buf: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in buf.getvalue().splitlines()]


def test_json_lines_carry_bound_ids_as_keys(stream: tuple[io.StringIO, logging.Handler]) -> None:
    buf, handler = stream
    handler.setFormatter(JsonFormatter("server"))
    log = logging.getLogger("test.logctx")
    log.info("before")
    with logctx.bound(job="j1", round=2):
        with logctx.bound(client="site-1", task="t9"):
            log.info("inside %d", 5)
        log.info("job only")
    log.info("after")
    out = lines(buf)
    assert [o["msg"] for o in out] == ["before", "inside 5", "job only", "after"]
    assert "job" not in out[0] and "job" not in out[3]
    assert {k: out[1][k] for k in ("job", "round", "client", "task", "role")} == {
        "job": "j1",
        "round": 2,
        "client": "site-1",
        "task": "t9",
        "role": "server",
    }
    assert out[2]["job"] == "j1" and "task" not in out[2]


def test_extra_ids_win_for_one_line(stream: tuple[io.StringIO, logging.Handler]) -> None:
    buf, handler = stream
    handler.setFormatter(JsonFormatter("server"))
    log = logging.getLogger("test.logctx")
    with logctx.bound(job="j1", round=1):
        log.info("fold", extra=logctx.ids(client="site-2", task="t2"))
        log.info("plain")
    first, second = lines(buf)
    assert (first["job"], first["round"], first["client"], first["task"]) == (
        "j1",
        1,
        "site-2",
        "t2",
    )
    assert "task" not in second


async def test_ids_follow_tasks_and_threads_but_not_siblings(
    stream: tuple[io.StringIO, logging.Handler],
) -> None:
    buf, handler = stream
    handler.setFormatter(JsonFormatter("client"))
    log = logging.getLogger("test.logctx")

    async def handle(task_id: str) -> None:
        logctx.bind(task=task_id)  # bound for this task only
        await asyncio.sleep(0)
        await asyncio.to_thread(log.info, "thread of %s", task_id)
        log.info("loop of %s", task_id)

    with logctx.bound(client="site-1"):
        async with asyncio.TaskGroup() as tg:
            tg.create_task(handle("a"))
            tg.create_task(handle("b"))
    log.info("outside")
    out = lines(buf)
    for o in out[:-1]:
        assert o["client"] == "site-1"
        assert str(o["msg"]).endswith(f"of {o['task']}")
    assert "task" not in out[-1] and "client" not in out[-1]


def test_text_lines_carry_ids_in_the_message(stream: tuple[io.StringIO, logging.Handler]) -> None:
    buf, handler = stream
    handler.setFormatter(TextFormatter("client site-1"))
    log = logging.getLogger("test.logctx")
    with logctx.bound(job="j1", round=3, client="site-1", task="t7"):
        log.warning("segment %d retried", 4)
    log.info("no ids")
    first, second = buf.getvalue().splitlines()
    ids = "[job=j1 round=3 client=site-1 task=t7]"
    assert first.endswith(f"client site-1 WARNING test.logctx: {ids} segment 4 retried")
    assert second.endswith("client site-1 INFO test.logctx: no ids")


def test_exceptions_stay_one_json_line(stream: tuple[io.StringIO, logging.Handler]) -> None:
    buf, handler = stream
    handler.setFormatter(JsonFormatter("server"))
    log = logging.getLogger("test.logctx")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("failed")
    (out,) = lines(buf)
    assert "ValueError: boom" in str(out["exc"])
