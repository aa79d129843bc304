"""The project file of ``fl-provision``: the server's names, the client sites, the admins.

Validated like every other file of the project (``common.config``): unknown keys,
duplicate names and malformed host names stop the command with one message naming the
file and the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    PositiveInt,
    ValidationInfo,
    field_validator,
)

from common.config import SiteName

DNS_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
DNS_NAME = re.compile(rf"^{DNS_LABEL}(\.{DNS_LABEL})*$")
ADMIN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.@+-]{0,63}$"
PROJECT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9 _.-]{0,63}$"


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _host(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not DNS_NAME.match(value) or len(value) > 253:
            raise ValueError(f"{value!r} is neither a DNS name nor an IP address") from None
    return value


class ServerEntry(_Frozen):
    host_name: str = Field(
        description=(
            "The name (or IP address) clients and admins connect to: the server "
            "certificate's CN and first subject alternative name, and the host of every "
            "server_url written."
        )
    )
    port: int = Field(8470, ge=1, le=65535, description="TCP port of the server.")
    bind: str = Field("0.0.0.0", description="Address the server binds (host in server.yaml).")
    extra_dns_names: list[str] = Field(
        default_factory=list, description="More DNS names the server certificate is valid for."
    )
    ip_addresses: list[IPvAnyAddress] = Field(
        default_factory=list, description="IP addresses the server certificate is valid for."
    )
    workspace: str = Field(
        "workspace",
        description="workspace in server.yaml (relative: to where fl-server is started).",
    )

    @field_validator("host_name")
    @classmethod
    def _host_name(cls, value: str) -> str:
        return _host(value)

    @field_validator("extra_dns_names")
    @classmethod
    def _dns_names(cls, values: list[str]) -> list[str]:
        for v in values:
            if not DNS_NAME.match(v):
                raise ValueError(f"{v!r} is not a DNS name")
        return values


class ClientEntry(_Frozen):
    name: SiteName = Field(description="Site name: its certificate's CN and its identity.")
    num_samples: PositiveInt = Field(1, description="num_samples in the site's client.yaml.")
    workspace: str = Field("workspace", description="workspace in the site's client.yaml.")


class AdminEntry(_Frozen):
    name: str = Field(pattern=ADMIN_NAME_PATTERN, description="Admin name: certificate CN.")


class Validity(_Frozen):
    ca_days: PositiveInt = Field(3650, le=36500, description="Days the project CA is valid.")
    cert_days: PositiveInt = Field(
        365, le=36500, description="Days a server, site or admin certificate is valid."
    )


def _duplicates(names: list[str]) -> list[str]:
    return sorted(n for n, k in Counter(names).items() if k > 1)


class Project(_Frozen):
    name: str = Field(pattern=PROJECT_NAME_PATTERN, description="Project name: O= of every cert.")
    server: ServerEntry
    clients: list[ClientEntry] = Field(default_factory=list)
    admins: list[AdminEntry] = Field(default_factory=list)
    validity: Validity = Validity()

    @field_validator("clients")
    @classmethod
    def _unique_clients(cls, clients: list[ClientEntry]) -> list[ClientEntry]:
        if dup := _duplicates([c.name for c in clients]):
            raise ValueError(f"site names must be unique; listed more than once: {dup}")
        return clients

    @field_validator("admins")
    @classmethod
    def _unique_admins(cls, admins: list[AdminEntry], info: ValidationInfo) -> list[AdminEntry]:
        if dup := _duplicates([a.name for a in admins]):
            raise ValueError(f"admin names must be unique; listed more than once: {dup}")
        sites = {c.name for c in info.data.get("clients", [])}
        if both := sorted(sites & {a.name for a in admins}):
            raise ValueError(f"names used by both a site and an admin: {both}")
        return admins
