"""fl-poc's default job ships inside the package, the same as the one in configs/."""

from __future__ import annotations

import fnmatch
import importlib.resources
import tomllib

from fl_client.admin import poc
from tests.cluster import REPO

PACKAGED = importlib.resources.files("fl_client.admin") / "jobs" / "hello_numpy.yaml"


def test_packaged_hello_numpy_job_is_the_one_in_configs() -> None:
    assert PACKAGED.read_bytes() == (REPO / "configs" / "jobs" / "hello-numpy.yaml").read_bytes()


def test_fl_poc_runs_the_packaged_job_by_default_and_the_wheel_carries_it() -> None:
    assert poc.build_parser().parse_args([]).job is None
    assert poc.DEFAULT_JOB == PACKAGED
    with open(REPO / "pyproject.toml", "rb") as f:
        package_data = tomllib.load(f)["tool"]["setuptools"]["package-data"]["fl_client.admin"]
    assert any(fnmatch.fnmatch("jobs/hello_numpy.yaml", pattern) for pattern in package_data)
