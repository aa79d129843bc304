"""A trainer plugin whose import leaves a mark: the file named by ``FL_TEST_IMPORT_MARKER``.

A site that refuses a trainer must refuse it before importing anything; a test names
this module in a job and then looks for the mark.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fl_client.trainer import AddEpsilon

_marker = os.environ.get("FL_TEST_IMPORT_MARKER")
if _marker:
    Path(_marker).write_text(f"imported by pid {os.getpid()}\n")


def factory(params: dict[str, Any]) -> AddEpsilon:
    return AddEpsilon(params)
