"""Throw-away TLS certificates for tests and benchmarks, made as a job makes its own
(slurm/common.sh `saia_make_certificate`): `openssl req -x509`, EC P-256, self-signed,
CN and SAN the host, the key 0600.
"""

from __future__ import annotations

import ipaddress
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from saia.base.pinned_tls import fingerprint

OPENSSL_TIMEOUT = 30.0


@dataclass(frozen=True)
class Certificate:
    key_file: Path
    cert_file: Path
    pem: str

    @property
    def sha256(self) -> str:
        return fingerprint(self.pem)


def _subject_alt_name(host: str) -> str:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return f"subjectAltName=DNS:{host}"
    return f"subjectAltName=IP:{host}"


def make_certificate(folder: Path, host: str = "127.0.0.1", days: int = 1) -> Certificate:
    """A fresh key and self-signed certificate in `folder` (made 0700)."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    argv = ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]
    argv += ["-nodes", "-keyout", str(key_file), "-out", str(cert_file), "-days", str(days)]
    argv += ["-subj", f"/CN={host}", "-addext", _subject_alt_name(host)]
    argv += ["-addext", "basicConstraints=critical,CA:FALSE"]
    subprocess.run(argv, check=True, capture_output=True, timeout=OPENSSL_TIMEOUT)
    os.chmod(key_file, 0o600)
    os.chmod(cert_file, 0o600)
    return Certificate(key_file, cert_file, cert_file.read_text(encoding="ascii"))
