"""TLS to one model-server job: its own self-signed certificate is the only trust anchor.

Each job makes a fresh key and certificate (slurm/common.sh) and publishes the
certificate's SHA-256 fingerprint in its endpoint.json; the agent accepts the certificate
file only when it has that fingerprint (`hpc.jobs.system.read_endpoint`) and connects with
`pinned_context(pem)`: the system store is never consulted, verification is never off.

Why the certificate as the only CA rather than a fingerprint compared after the
handshake: Python's ssl has no verify callback, so a post-handshake comparison would need
CERT_NONE during the handshake, and httpx (the health probes) has no hook between the
handshake and its first byte, the job's Bearer key. With the certificate as the only trust
anchor OpenSSL itself refuses any other certificate before a byte is sent. Hostname
checking is off because the pin is stronger than a name: the job's certificate is
trusted for this one job only, whatever name or address the agent reaches the node by
(advertise host, an alias, an address on another network).
"""

from __future__ import annotations

import hashlib
import ssl
from functools import lru_cache

__all__ = ["fingerprint", "pinned_context"]


def fingerprint(pem: str) -> str:
    """The SHA-256 of the certificate's DER form, lower-case hex without colons (as
    `openssl x509 -fingerprint -sha256` prints it, less the colons). ValueError if the
    text holds no PEM certificate."""
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


@lru_cache(maxsize=256)  # one context per job: the HTTP pool keys its connections by it
def pinned_context(pem: str) -> ssl.SSLContext:
    """A client context that trusts this certificate and nothing else (ssl.SSLError if
    the text is no certificate)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False  # the pin, not a name, identifies the job (module doc)
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(cadata=pem)
    context.set_alpn_protocols(["http/1.1"])
    return context
