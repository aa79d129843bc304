"""Render the configuration reference (Markdown) from the schemas themselves.

``python -m common.config_doc > docs/configuration.md``; a test keeps the file in sync.
"""

from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

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
    KeepRounds,
    ServerConfig,
    ServerLimits,
    TlsFiles,
    TrainerSpec,
    TransferSettings,
    UploadedModel,
)
from common.timeouts import Timeouts

SECTIONS: list[tuple[str, type[BaseModel], str]] = [
    ("Server (`fl-server --config server.yaml`)", ServerConfig, ""),
    ("Client (`fl-client --config client.yaml`)", ClientConfig, ""),
    ("Admin (`fl-admin --config admin.yaml`)", AdminConfig, ""),
    ("`timeouts:` (server, client and admin)", Timeouts, "timeouts."),
    (
        "`transfer:` (client and admin; the server takes `io_chunk_kib` only)",
        TransferSettings,
        "transfer.",
    ),
    ("`tls:` (server, client and admin)", TlsFiles, "tls."),
    ("`limits:` (server)", ServerLimits, "limits."),
    ("Job file (`fl-admin submit job.yaml`)", JobConfig, ""),
    ("`model:` with `kind: generated`", GeneratedModel, "model."),
    ("`model:` with `kind: file`", FileModel, "model."),
    ("`model:` with `kind: uploaded` (`fl-admin submit --model`)", UploadedModel, "model."),
    ("`trainer:`", TrainerSpec, "trainer."),
    ("`trainer.params` of `add_epsilon`", AddEpsilonParams, "trainer.params."),
    ("`keep:` (job file): the global models kept on the server", KeepRounds, "keep."),
]


def _type_text(ann: Any) -> str:
    """A type as a reader of a YAML file thinks of it: ``float or null``, ``list of str``."""
    if ann is type(None):
        return "null"
    origin = get_origin(ann)
    if origin is Annotated:
        return _type_text(get_args(ann)[0])
    if origin in (Union, UnionType):
        return " or ".join(_type_text(a) for a in get_args(ann))
    if origin is Literal:
        return " or ".join(f"`{a}`" for a in get_args(ann))
    if origin is list:
        return f"list of {_type_text(get_args(ann)[0])}"
    if origin is dict:
        return "mapping"
    if isinstance(ann, type):
        return {
            "str": "string",
            "int": "integer",
            "float": "number",
            "bool": "boolean",
            "Path": "path",
        }.get(ann.__name__, ann.__name__)
    return str(ann)


def _type_name(info: FieldInfo) -> str:
    return _type_text(info.annotation)


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
