"""A child memory cgroup (v1) to run the daemons under a hard memory limit."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/memory")


def _own_cgroup() -> Path | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            for candidate in (ROOT / path.lstrip("/"), ROOT):
                if (candidate / "memory.limit_in_bytes").exists():
                    return candidate
    return None


@dataclass
class MemCgroup:
    path: Path

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> MemCgroup:
        """Make the cgroup or raise OSError saying why it cannot be made here."""
        parent = _own_cgroup()
        if parent is None:
            raise OSError("no cgroup v1 memory controller at /sys/fs/cgroup/memory")
        path = parent / name
        path.mkdir(exist_ok=True)
        (path / "memory.limit_in_bytes").write_text(str(limit_bytes))
        return cls(path)

    @property
    def procs(self) -> Path:
        return self.path / "cgroup.procs"

    def _read(self, name: str) -> str:
        return (self.path / name).read_text()

    def stats(self) -> dict[str, int]:
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return {
            "limit_bytes": int(self._read("memory.limit_in_bytes")),
            "max_usage_bytes": int(self._read("memory.max_usage_in_bytes")),
            "failcnt": int(self._read("memory.failcnt")),
            "oom_kill": int(oom.get("oom_kill", 0)),
        }

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            os.rmdir(self.path)
