"""Who a certificate says its holder is: a name and a role, as ``fl-provision`` writes them.

Every certificate the project CA issues names its holder in the subject:

    CN = the participant's name   (a site name, an admin name, the server's host name)
    OU = its role                 (``server``, ``client`` or ``admin``)
    O  = the project's name

The server takes each caller's identity from the verified certificate of its TLS
connection, never from anything the caller sends, and authorizes by it. Pure: values in,
values out; the ``ssl`` module's decoded form of a certificate is the input.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from common.errors import Forbidden

COMMON_NAME = "commonName"
ORG_UNIT = "organizationalUnitName"


class Role(enum.StrEnum):
    SERVER = "server"
    CLIENT = "client"
    ADMIN = "admin"


@dataclass(frozen=True)
class Identity:
    name: str
    role: Role

    def __str__(self) -> str:
        return f"{self.role} {self.name!r}"


def _subject_values(peercert: object, attribute: str) -> list[str]:
    """All values of ``attribute`` in the subject of a ``getpeercert()`` dictionary."""
    if not isinstance(peercert, dict):
        return []
    subject = peercert.get("subject", ())
    values: list[str] = []
    for rdn in subject if isinstance(subject, tuple) else ():
        for pair in rdn if isinstance(rdn, tuple) else ():
            if isinstance(pair, tuple) and len(pair) == 2 and pair[0] == attribute:
                values.append(str(pair[1]))
    return values


def identity_from_peercert(peercert: object) -> Identity:
    """The identity in a verified peer certificate, as ``SSLObject.getpeercert()`` gives it.

    A certificate without exactly one CN and one OU naming a known role is refused: the
    project CA never issues one, so it is not a participant's.
    """
    if not peercert:
        raise Forbidden("the connection carries no client certificate")
    names = _subject_values(peercert, COMMON_NAME)
    roles = _subject_values(peercert, ORG_UNIT)
    if len(names) != 1 or not names[0]:
        raise Forbidden(f"the client certificate must name one holder in its CN, not {names}")
    if len(roles) != 1 or roles[0] not in {r.value for r in Role}:
        raise Forbidden(
            f"the certificate of {names[0]!r} must carry one role (server, client or admin) "
            f"in its OU, not {roles}"
        )
    return Identity(names[0], Role(roles[0]))
