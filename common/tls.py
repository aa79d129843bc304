"""TLS contexts for mutual authentication, and handshake failures in words.

Both sides trust only the project CA (never the system's CAs): a server certificate
from a public CA, or a client certificate from another project, does not get in. Both
present their own certificate; the server requires one. TLS 1.2 is the floor, 1.3 is
what the two ends negotiate. OpenSSL checks the extended key usage fl-provision writes
(server certificates for serverAuth only, client and admin ones for clientAuth only),
so a site's certificate cannot pose as the server and the server's cannot pose as a site.

``describe_handshake_failure`` turns OpenSSL's reason codes into a sentence for logs
and error messages: both the server's log line and the caller's error name the cause.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TypeVar

from common.config import TlsFiles
from common.errors import ConfigError

# OpenSSL reason codes (ssl.SSLError.reason) -> what they mean here.
_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "the peer presented no certificate",
    "HTTP_REQUEST": "plain HTTP was sent to the TLS port; use https:// and a tls: section",
    "WRONG_VERSION_NUMBER": "the peer does not speak TLS (a plain-HTTP server?)",
    "TLSV13_ALERT_CERTIFICATE_REQUIRED": (
        "the server requires a client certificate and none was sent"
    ),
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "the peer refused our certificate: it has expired",
    "TLSV1_ALERT_UNKNOWN_CA": (
        "the peer refused our certificate: it was not issued by the peer's project CA"
    ),
    "SSLV3_ALERT_BAD_CERTIFICATE": "the peer refused our certificate (bad certificate)",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": (
        "the peer refused our certificate: it is not for this use (wrong role?)"
    ),
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the peer refused our certificate (certificate unknown)",
    "TLSV1_ALERT_DECRYPT_ERROR": "the peer could not verify our certificate's key",
}


# X509 verify codes (ssl.SSLCertVerificationError.verify_code) -> what they mean here.
_NOT_OURS = "not issued by this project's CA"
_VERIFY_HINTS = {
    18: _NOT_OURS,  # self-signed certificate
    19: _NOT_OURS,  # self-signed certificate in certificate chain
    20: _NOT_OURS,  # unable to get local issuer certificate
    21: _NOT_OURS,  # unable to verify the first certificate
    26: "a certificate for the other end of a connection: wrong role",  # unsuitable purpose
}


def describe_handshake_failure(exc: BaseException) -> str:
    """One line on why a TLS handshake failed, for either side of it."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        hint = _VERIFY_HINTS.get(exc.verify_code)
        return f"certificate verify failed: {exc.verify_message}" + (f" ({hint})" if hint else "")
    if isinstance(exc, ssl.SSLError):
        reason = str(exc.reason or "")
        if reason in _REASONS:
            return _REASONS[reason]
        return reason.lower().replace("_", " ") if reason else str(exc)
    if isinstance(exc, TimeoutError | ConnectionAbortedError) and "handshake" in str(exc):
        return "the handshake did not complete in time"
    if isinstance(exc, ConnectionError | EOFError):
        return (
            "the peer closed the connection during the handshake (it may have refused "
            "this side's certificate)"
        )
    return str(exc) or type(exc).__name__


C = TypeVar("C", bound=ssl.SSLContext)


def is_handshake_refusal(exc: ssl.SSLError) -> bool:
    """Whether ``exc`` is one side refusing the other, not a broken connection."""
    reason = str(exc.reason or "")
    return isinstance(exc, ssl.SSLCertVerificationError) or reason in _REASONS or "ALERT" in reason


def _load(ctx: C, files: TlsFiles) -> C:
    """Load the CA and our own certificate and key; a failure names the setting and file."""
    try:
        ctx.load_verify_locations(cafile=str(files.ca))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls.ca: cannot load the CA certificate {files.ca}: {_why(exc)}", field="tls.ca"
        ) from None
    for field, path in (("tls.cert", files.cert), ("tls.key", files.key)):
        if not path.is_file():
            raise ConfigError(f"{field}: {path} is not a file", field=field)
    try:
        ctx.load_cert_chain(certfile=str(files.cert), keyfile=str(files.key))
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"tls.cert/tls.key: cannot load {files.cert} with {files.key}: {_why(exc)} "
            "(is the key the certificate's?)",
            field="tls.cert",
        ) from None
    return ctx


def _why(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).lower().replace("_", " ")
    return getattr(exc, "strerror", None) or str(exc)


def server_context(files: TlsFiles, context_class: type[C] = ssl.SSLContext) -> C:  # type: ignore[assignment]
    """The server's side: present ``files.cert``, require a certificate the CA signed."""
    ctx = context_class(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    return _load(ctx, files)


def client_context(files: TlsFiles) -> ssl.SSLContext:
    """A site's or admin's side: check the server against the CA and its host name."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its host name
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return _load(ctx, files)


@dataclass(frozen=True)
class CertificateInfo:
    subject: str
    not_after: datetime


def certificate_info(path: Path) -> CertificateInfo:
    """Subject and expiry of a PEM certificate, for start-up log lines."""
    from cryptography import x509

    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"tls.cert: cannot read {path}: {exc}", field="tls.cert") from None
    return CertificateInfo(cert.subject.rfc4514_string(), cert.not_valid_after_utc)
