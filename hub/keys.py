"""API key format and hashing.

A key is `sk-saia-` + a 12-character public id + a 43-character secret (32 random bytes).
Only the id and sha256 of the whole key are stored: the secret has 256 bits of entropy, so
a fast hash is enough (no password-style stretching), and the id finds the row without
scanning. Comparison is constant-time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import string
from dataclasses import dataclass

PREFIX = "sk-saia-"
ID_LENGTH = 12
SECRET_LENGTH = 43  # token_urlsafe(32)
_ID_ALPHABET = string.ascii_lowercase + string.digits
_URLSAFE = frozenset(string.ascii_letters + string.digits + "-_")


@dataclass(frozen=True)
class NewKey:
    key_id: str
    secret: str  # the whole key, shown once
    digest: str


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> NewKey:
    key_id = "".join(secrets.choice(_ID_ALPHABET) for _ in range(ID_LENGTH))
    secret = f"{PREFIX}{key_id}{secrets.token_urlsafe(32)}"
    return NewKey(key_id, secret, hash_key(secret))


def key_id_of(key: str) -> str | None:
    """The public id of a well-formed key, or None for anything else."""
    if not key.startswith(PREFIX) or len(key) != len(PREFIX) + ID_LENGTH + SECRET_LENGTH:
        return None
    body = key[len(PREFIX) :]
    key_id = body[:ID_LENGTH]
    if not all(c in _ID_ALPHABET for c in key_id) or not _URLSAFE.issuperset(body):
        return None
    return key_id


def matches(key: str, digest: str) -> bool:
    return hmac.compare_digest(hash_key(key), digest)
