"""Loading a config file: YAML read safely, validated once, every error with its YAML path.

A file is checked against its schema (``common.config``) where the program starts; an
unknown key, a wrong type or a value out of range stops it with one message per error,
each naming the key as the user wrote it in the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar, get_args

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from common.config import CONFIG_DIR
from common.errors import ConfigError
from common.safeload import DocumentTooComplex, load_yaml_text

M = TypeVar("M", bound=BaseModel)


def _model_class(annotation: object) -> type[BaseModel] | None:
    """The model a field holds, looking through ``X | None``; None for anything else."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    members = [a for a in get_args(annotation) if a is not type(None)]
    if len(members) == 1:
        return _model_class(members[0])
    return None


def _union_tags(field: FieldInfo) -> dict[str, type[BaseModel]]:
    """Tag -> member model of a discriminated union field; empty for other fields."""
    if not isinstance(field.discriminator, str):
        return {}
    tags: dict[str, type[BaseModel]] = {}
    for member in get_args(field.annotation):
        cls = _model_class(member)
        tag_field = cls.model_fields.get(field.discriminator) if cls is not None else None
        if cls is not None and tag_field is not None:
            for tag in get_args(tag_field.annotation):
                tags[str(tag)] = cls
    return tags


def yaml_path(model: type[BaseModel], loc: tuple[int | str, ...]) -> str:
    """The dotted path a user reads in their YAML file for a pydantic error location.

    Pydantic puts the tag of a discriminated union into the location
    (``model.generated.num_tensors``), but the file has no such key: the tag is the value
    of ``kind``. Walking the schema alongside the location finds the segments that are
    tags and leaves them out (``model.num_tensors``).
    """
    parts: list[str] = []
    cls: type[BaseModel] | None = model
    i = 0
    while i < len(loc):
        part = loc[i]
        parts.append(str(part))
        i += 1
        field = cls.model_fields.get(part) if cls is not None and isinstance(part, str) else None
        if field is None:
            cls = None  # below a list or dict: nothing more to recognise
            continue
        tags = _union_tags(field)
        if i < len(loc) and isinstance(loc[i], str) and loc[i] in tags:
            cls = tags[str(loc[i])]
            i += 1
        else:
            cls = _model_class(field.annotation)
    return ".".join(parts)


def format_validation_error(source: str, err: ValidationError, *, model: type[BaseModel]) -> str:
    """One line per error: YAML path, what is wrong, and the offending value if it is short.

    A mapping or list is not echoed: for an error on a whole section (a model validator)
    the input is the entire section, which would drown the message and may hold secrets.
    """
    lines = [f"{source}: invalid configuration:"]
    for e in err.errors():
        loc = yaml_path(model, e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (check the spelling; see the configuration reference)"
        elif e["type"] == "missing":
            msg = "required but missing"
        quiet = e["type"] in ("missing", "extra_forbidden") or isinstance(e["input"], dict | list)
        got = "" if quiet else f" (got {e['input']!r})"
        lines.append(f"  {loc}: {msg}{got}")
    return "\n".join(lines)


def parse_config(data: object, model: type[M], *, source: str, config_dir: Path | None = None) -> M:
    """Validate ``data``; ``config_dir`` is where relative ``tls:`` paths start from."""
    context = {CONFIG_DIR: config_dir} if config_dir is not None else None
    try:
        return model.model_validate(data, context=context)
    except ValidationError as err:
        first = err.errors()[0]["loc"] if err.errors() else ()
        raise ConfigError(
            format_validation_error(source, err, model=model),
            field=yaml_path(model, first) or None,
        ) from None


def load_yaml(path: Path) -> object:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset "
            f"{exc.start}); save the file as UTF-8"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        data = load_yaml_text(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    except DocumentTooComplex as exc:
        raise ConfigError(f"{path}: {exc}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deep to read") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    return data


def load_config(path: Path, model: type[M]) -> M:
    return parse_config(load_yaml(path), model, source=str(path), config_dir=path.parent)
