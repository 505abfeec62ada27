"""API key material: generation, parsing and Argon2id hashing.

A key is `nz_` + 8 lowercase alphanumerics (the public prefix, shown in logs and by
`list-keys`, used by `revoke-key --prefix`) followed by a secret of 43 URL-safe characters
(`secrets.token_urlsafe(32)`, 256 bits). Only an Argon2id hash of the whole key is stored.

Argon2id parameters follow OWASP's password storage cheat sheet (m=19 MiB, t=2, p=1): tens of
milliseconds of CPU per verification (`python3 build.py bench auth` measures it). Keys carry 256
random bits, so the slow hash guards against a leaked database rather than guessing;
verification happens only on a cache miss, in a bounded thread pool (auth.py), never on the
event loop.
"""

from __future__ import annotations

import re
import secrets
import string
from dataclasses import dataclass

import argon2

PREFIX_LENGTH = 11  # "nz_" + 8
MIN_SECRET_LENGTH = 32
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_KEY = re.compile(rf"nz_[a-z0-9]{{8}}[A-Za-z0-9_-]{{{MIN_SECRET_LENGTH},256}}")
PREFIX_PATTERN = re.compile(r"nz_[a-z0-9]{8}")

HASHER = argon2.PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1, hash_len=32, salt_len=16)


@dataclass(frozen=True)
class NewKey:
    prefix: str
    key: str  # shown to the user exactly once, never stored

    def hash(self) -> str:
        return HASHER.hash(self.key)


def generate() -> NewKey:
    prefix = "nz_" + "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    return NewKey(prefix, prefix + secrets.token_urlsafe(32))


def prefix_of(key: str) -> str | None:
    """The public prefix of a well-formed key, None for anything else."""
    return key[:PREFIX_LENGTH] if _KEY.fullmatch(key) else None


def verify(key_hash: str, key: str) -> bool:
    """Argon2id verification (constant-time in the hash comparison). CPU-heavy: call it from
    a worker thread."""
    try:
        return HASHER.verify(key_hash, key)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError):
        return False
