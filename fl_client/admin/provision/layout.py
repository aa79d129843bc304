"""What ``fl-provision`` writes where, and the configs it writes (pure: no files).

    OUT/ca/ca.pem, ca.key                 the project CA; ca.key stays with the provisioner
    OUT/server/                           copy to the server machine
    OUT/clients/<site>/                   copy to that site
    OUT/admins/<admin>/                   give to that admin
        cert.pem  key.pem  ca.pem  <role>.yaml

Each participant's folder is complete: its certificate and private key (mode 0600), the
CA certificate, and a config for the project's own schema whose ``tls:`` paths are
relative to the folder (``common.config`` resolves them against the config file).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from common.config import AdminConfig, ClientConfig, ServerConfig
from common.identity import Role
from fl_client.admin.provision.certs import Holder
from fl_client.admin.provision.project import ClientEntry, Project

CA_DIR = Path("ca")
CA_CERT = "ca.pem"
CA_KEY = "ca.key"
CERT = "cert.pem"
KEY = "key.pem"
TLS = {"cert": CERT, "key": KEY, "ca": CA_CERT}


@dataclass(frozen=True)
class Participant:
    holder: Holder
    folder: Path  # relative to the output directory
    config_name: str
    config: dict[str, Any]
    schema: type[BaseModel]


def _as_ip(value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        return None


def server_holder(project: Project) -> Holder:
    s = project.server
    host_ip = _as_ip(s.host_name)
    dns = ([] if host_ip else [s.host_name]) + [n for n in s.extra_dns_names if n != s.host_name]
    ips = ([host_ip] if host_ip else []) + [ip for ip in s.ip_addresses if ip != host_ip]
    return Holder(s.host_name, Role.SERVER, tuple(dict.fromkeys(dns)), tuple(dict.fromkeys(ips)))


def server_url(project: Project) -> str:
    host = project.server.host_name
    if isinstance(_as_ip(host), ipaddress.IPv6Address):
        host = f"[{host}]"
    return f"https://{host}:{project.server.port}"


def server_config(project: Project) -> dict[str, Any]:
    s = project.server
    return {"host": s.bind, "port": s.port, "workspace": s.workspace, "tls": dict(TLS)}


def client_config(project: Project, client: ClientEntry) -> dict[str, Any]:
    return {
        "name": client.name,
        "server_url": server_url(project),
        "workspace": client.workspace,
        "num_samples": client.num_samples,
        "tls": dict(TLS),
    }


def admin_config(project: Project) -> dict[str, Any]:
    return {"server_url": server_url(project), "tls": dict(TLS)}


def participants(project: Project) -> list[Participant]:
    out = [
        Participant(
            server_holder(project),
            Path("server"),
            "server.yaml",
            server_config(project),
            ServerConfig,
        )
    ]
    for c in project.clients:
        out.append(
            Participant(
                Holder(c.name, Role.CLIENT),
                Path("clients") / c.name,
                "client.yaml",
                client_config(project, c),
                ClientConfig,
            )
        )
    for a in project.admins:
        out.append(
            Participant(
                Holder(a.name, Role.ADMIN),
                Path("admins") / a.name,
                "admin.yaml",
                admin_config(project),
                AdminConfig,
            )
        )
    return out
