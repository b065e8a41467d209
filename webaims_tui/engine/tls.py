"""DICOM TLS (PS3.15 Annex B, secure transport connection profiles): SSL contexts.

Both sides speak TLS 1.2 or later only (BCP 195, which DCMTK's default profile also follows).
The SCP's context comes from :class:`~webaims_tui.config.ServerSettings`; the SCU side
(:func:`client_ssl_context`) is for the query/retrieve client reaching remote nodes over TLS:
``assoc = ae.associate(host, port, tls_args=(client_ssl_context(...), server_hostname))``.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from webaims_tui.config import ServerSettings


class TLSSetupError(Exception):
    """A certificate, key or CA file cannot be loaded; the message names the file."""


def server_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """The SCP's context, or None when TLS is not configured (plain TCP)."""
    if not settings.tls_enabled:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, settings.tls_certificate, settings.tls_private_key)
    if settings.tls_ca_certificates:
        _load_cas(context, settings.tls_ca_certificates)
        # With a CA list a client certificate is checked when offered; required only if asked.
        context.verify_mode = (
            ssl.CERT_REQUIRED if settings.tls_require_client_certificate else ssl.CERT_OPTIONAL
        )
    return context


def client_ssl_context(
    ca_certificates: str | Path | None = None,
    certificate: str | Path | None = None,
    private_key: str | Path | None = None,
    *,
    check_hostname: bool = False,
) -> ssl.SSLContext:
    """A context for reaching a remote DICOM node over TLS 1.2+.

    ``ca_certificates`` is the PEM file of CAs trusted for the remote's certificate (the system
    store when None). ``certificate``/``private_key`` are our own, for remotes that require a
    client certificate. The remote's certificate is always verified against the CAs; its host
    name is checked only with ``check_hostname`` because DICOM nodes are usually configured by IP
    address and their certificates rarely name it (DCMTK does not check it either). With
    ``check_hostname`` pass the name as ``server_hostname`` in pynetdicom's ``tls_args``.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    if ca_certificates:
        _load_cas(context, str(ca_certificates))
    else:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if certificate or private_key:
        if not (certificate and private_key):
            raise TLSSetupError("a client certificate needs both the certificate and its key")
        _load_chain(context, str(certificate), str(private_key))
    return context


def _load_chain(context: ssl.SSLContext, certificate: str, private_key: str) -> None:
    try:
        context.load_cert_chain(
            str(Path(certificate).expanduser()), str(Path(private_key).expanduser())
        )
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(
            f"cannot load the TLS certificate {certificate} with key {private_key}: {exc}"
        ) from None


def _load_cas(context: ssl.SSLContext, ca_certificates: str) -> None:
    try:
        context.load_verify_locations(cafile=str(Path(ca_certificates).expanduser()))
    except (OSError, ssl.SSLError) as exc:
        raise TLSSetupError(f"cannot load the TLS CA list {ca_certificates}: {exc}") from None
