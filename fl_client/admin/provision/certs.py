"""Building the project CA and the participants' certificates (pure: no files, no clock).

Keys are ECDSA P-256: small, fast handshakes, supported by every TLS stack. The CA may
sign end-entity certificates only (path length 0). An end-entity certificate names its
holder as ``common.identity`` describes (CN name, OU role, O project) and is limited to
its side of a connection by its extended key usage: ``serverAuth`` for the server,
``clientAuth`` for sites and admins. The server's certificate lists the names clients
dial as subject alternative names. ``now`` is passed in; certificates start a few
minutes before it, so a peer whose clock is slightly behind accepts them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from common.identity import Role

PrivateKey = ec.EllipticCurvePrivateKey
IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
CLOCK_SKEW = timedelta(minutes=5)


@dataclass(frozen=True)
class Holder:
    """Who a certificate is for, and (for the server) the names it answers to."""

    name: str
    role: Role
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[IpAddress, ...] = field(default_factory=tuple)


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(project: str, common_name: str, role: str | None) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, project)]
    if role is not None:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def ca_common_name(project: str) -> str:
    return f"{project} CA"


def build_ca(project: str, key: PrivateKey, *, now: datetime, days: int) -> x509.Certificate:
    """A self-signed CA certificate for the project, valid ``days`` from ``now``."""
    name = _name(project, ca_common_name(project), None)
    public = key.public_key()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .sign(key, hashes.SHA256())
    )


def issue(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    holder: Holder,
    public_key: ec.EllipticCurvePublicKey,
    *,
    project: str,
    not_before: datetime,
    not_after: datetime,
) -> x509.Certificate:
    """An end-entity certificate for ``holder``, signed by the CA.

    The validity window is explicit so that tests can build expired certificates with
    the same code that builds real ones.
    """
    usage = (
        ExtendedKeyUsageOID.SERVER_AUTH
        if holder.role is Role.SERVER
        else ExtendedKeyUsageOID.CLIENT_AUTH
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(project, holder.name, holder.role.value))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in holder.dns_names]
    sans += [x509.IPAddress(ip) for ip in holder.ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(ca_key, hashes.SHA256())


def issue_for(
    ca_cert: x509.Certificate,
    ca_key: PrivateKey,
    holder: Holder,
    public_key: ec.EllipticCurvePublicKey,
    *,
    project: str,
    now: datetime,
    days: int,
) -> x509.Certificate:
    """``issue`` valid from just before ``now`` for ``days``, never past the CA's end."""
    end = min(now + timedelta(days=days), ca_cert.not_valid_after_utc)
    return issue(
        ca_cert,
        ca_key,
        holder,
        public_key,
        project=project,
        not_before=now - CLOCK_SKEW,
        not_after=end,
    )


# --- reading certificates back --------------------------------------------------------


def projects_of(cert: x509.Certificate) -> list[str]:
    """The O= values of a certificate's subject: the project(s) it belongs to."""
    return [str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)]


def holder_of(cert: x509.Certificate) -> Holder | None:
    """The holder a certificate names, or None if it does not look like one of ours."""
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1 or ous[0].value not in {r.value for r in Role}:
        return None
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = tuple(san.get_values_for_type(x509.DNSName))
        ips = tuple(
            ip
            for ip in san.get_values_for_type(x509.IPAddress)
            if isinstance(ip, ipaddress.IPv4Address | ipaddress.IPv6Address)
        )
    except x509.ExtensionNotFound:
        dns, ips = (), ()
    return Holder(str(cns[0].value), Role(str(ous[0].value)), dns, ips)


def problems_with(
    cert: x509.Certificate,
    key: PrivateKey | None,
    ca_cert: x509.Certificate,
    expected: Holder,
    *,
    now: datetime,
) -> list[str]:
    """Why an existing certificate cannot be kept for ``expected``; empty if it can."""
    out: list[str] = []
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        out.append("it was not issued by this project's CA")
    holder = holder_of(cert)
    if holder is None:
        out.append("its subject does not name a holder and role")
    else:
        if (holder.name, holder.role) != (expected.name, expected.role):
            out.append(f"it is for {holder.role} {holder.name!r}")
        if set(holder.dns_names) != set(expected.dns_names) or set(holder.ip_addresses) != set(
            expected.ip_addresses
        ):
            out.append(f"it names {_names(holder)}, the project file {_names(expected)}")
    if key is not None and not _same_key(cert, key):
        out.append("the private key beside it is not its key")
    if cert.not_valid_after_utc <= now:
        out.append(f"it expired on {cert.not_valid_after_utc:%Y-%m-%d}")
    return out


def _names(holder: Holder) -> str:
    shown = [*holder.dns_names, *(str(ip) for ip in holder.ip_addresses)]
    return "[" + ", ".join(shown) + "]"


def _same_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    raw = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return cert.public_key().public_bytes(der, raw) == key.public_key().public_bytes(der, raw)


# --- PEM ------------------------------------------------------------------------------


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8: daemons start unattended; the file's 0600 mode protects it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def load_cert(data: bytes) -> x509.Certificate:
    return x509.load_pem_x509_certificate(data)


def load_key(data: bytes) -> PrivateKey:
    key = serialization.load_pem_private_key(data, password=None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"expected an EC private key, found {type(key).__name__}")
    return key
