"""docs/configuration.md is generated from the schemas; it must match them."""

from __future__ import annotations

from common.config_doc import render
from tests.cluster import REPO


def test_configuration_reference_is_current() -> None:
    on_disk = (REPO / "docs" / "configuration.md").read_text()
    assert on_disk == render() + "\n", (
        "docs/configuration.md is stale: run python -m common.config_doc > docs/configuration.md"
    )
    # the nested sections are in it too, down to the security settings
    assert "| `tls.cert` |" in on_disk and "| `limits.max_uploads_per_client` |" in on_disk
