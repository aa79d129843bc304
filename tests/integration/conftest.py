from __future__ import annotations

from collections.abc import Generator, Iterator
from pathlib import Path

import pytest

from tests.cluster import Cluster
from tests.proxy import ProxyProcess

# Small kernel socket buffers on both sides of the proxy: a stall, a cut or a throttle
# then acts on bytes close to where the test says, not a few hundred KiB later.
PROXY_SOCK_BUFFER = 64 * 1024


def _cluster(tmp_path: Path, request: pytest.FixtureRequest, *, tls: bool) -> Iterator[Cluster]:
    c = Cluster(tmp_path, tls=tls)
    yield c
    c.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(c.logs())


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A server and sites on loopback, plain HTTP; stopped and, on failure, logs shown."""
    yield from _cluster(tmp_path, request, tls=False)


@pytest.fixture
def tls_cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """The same with a project provisioned for the test: mutual TLS everywhere."""
    yield from _cluster(tmp_path, request, tls=True)


@pytest.fixture
def proxy(cluster: Cluster) -> Iterator[ProxyProcess]:
    """A fault-injecting proxy in front of the cluster's server (``tests.proxy``)."""
    p = ProxyProcess.start(cluster.port, cluster.root, sock_buffer=PROXY_SOCK_BUFFER)
    yield p
    p.stop()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep
