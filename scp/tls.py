"""DICOM TLS: the server-side SSL context, with modern defaults (TLS 1.2+, forward-secret AEAD ciphers)."""

from __future__ import annotations

import ssl
from pathlib import Path

# TLS 1.2 suites: ECDHE/DHE key exchange with AES-GCM or ChaCha20 only (BCP 195); TLS 1.3 suites are
# always AEAD and are left to OpenSSL.
_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20:!aNULL:!eNULL:!MD5:!DSS:!SHA1"


def server_context(cert: Path, key: Path, ca: Path | None = None, *,
                   require_client_cert: bool = False) -> ssl.SSLContext:
    """An SSL context for accepted DICOM connections.

    ``ca`` is the bundle that client certificates are verified against; with
    ``require_client_cert`` a client without a trusted certificate fails the handshake.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(_TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    context.load_cert_chain(certfile=str(cert), keyfile=str(key))
    if ca is not None:
        context.load_verify_locations(cafile=str(ca))
        context.verify_mode = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
    elif require_client_cert:
        raise ValueError("tls_require_client_cert needs tls_ca (the CA that signs client certificates)")
    return context
