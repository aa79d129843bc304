"""Render the configuration reference (Markdown) from the schemas themselves.

``python -m common.config_doc > docs/configuration.md``; a test keeps the file in sync.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from common.config import (
    AddEpsilonParams,
    AdminConfig,
    ClientConfig,
    FileModel,
    GeneratedModel,
    JobConfig,
    ServerConfig,
    ServerLimits,
    TlsFiles,
    TrainerSpec,
    TransferSettings,
)
from common.timeouts import Timeouts

SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("Server (`fl-server --config server.yaml`)", ServerConfig, ""),
    ("Client (`fl-client --config client.yaml`)", ClientConfig, ""),
    ("Admin (`fl-admin --config admin.yaml`)", AdminConfig, ""),
    ("`timeouts:` (server, client and admin)", Timeouts, "timeouts."),
    ("`transfer:` (server and client)", TransferSettings, "transfer."),
    ("`tls:` (server, client and admin)", TlsFiles, "tls."),
    ("`limits:` (server)", ServerLimits, "limits."),
    ("Job file (`fl-admin submit job.yaml`)", JobConfig, ""),
    ("`model:` with `kind: generated`", GeneratedModel, "model."),
    ("`model:` with `kind: file`", FileModel, "model."),
    ("`trainer:`", TrainerSpec, "trainer."),
    ("`trainer.params` of `add_epsilon`", AddEpsilonParams, "trainer.params."),
]


def _type_name(info: FieldInfo) -> str:
    ann: Any = info.annotation
    text = getattr(ann, "__name__", None) or str(ann)
    return text.replace("typing.", "").replace("pathlib.", "").replace("common.config.", "")


def _default(info: FieldInfo) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    if info.default_factory is not None:
        return "`" + repr(info.default_factory()) + "`"  # type: ignore[call-arg]
    if isinstance(info.default, BaseModel):
        return "see below"
    return "`null`" if info.default is None else f"`{info.default}`"


def render() -> str:
    out = [
        "# Configuration reference",
        "",
        "Generated from the schemas in `common/config.py` and `common/timeouts.py` by",
        "`python -m common.config_doc`. Every file is validated when the program starts;",
        "an unknown key, a wrong type or a value out of range stops it with one message",
        "naming the file and the field. Durations are seconds; `null` means no limit.",
        "",
    ]
    for title, model, prefix in SECTIONS:
        out += [f"## {title}", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for name, info in model.model_fields.items():
            desc = (info.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{prefix}{name}` | {_type_name(info)} | {_default(info)} | {desc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(render())
