"""PIN hashing: scrypt with a random salt, parameters stored in the hash, compared in constant time."""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets

# n=2**14, r=8 costs about 30 ms and 16 MiB per hash here: slow enough for an offline guesser,
# and paid once per call, in a thread, never when loading the registry.
DEFAULT_N = 2**14
_R, _P, _DKLEN = 8, 1, 32


def hash_pin(pin: str, n: int = DEFAULT_N) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(pin.encode(), salt=salt, n=n, r=_R, p=_P, dklen=_DKLEN)
    b64 = base64.urlsafe_b64encode
    return f"scrypt${n}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def is_pin_hash(value: str) -> bool:
    parts = value.split("$")
    return len(parts) == 6 and parts[0] == "scrypt" and all(p.isascii() and p.isdigit() for p in parts[1:4])


def verify_pin(pin: str, pin_hash: str) -> bool:
    """True when `pin` matches; a malformed hash never matches."""
    if not is_pin_hash(pin_hash):
        return False
    _, n, r, p, salt, digest = pin_hash.split("$")
    try:
        expected = base64.urlsafe_b64decode(digest)
        actual = hashlib.scrypt(
            pin.encode(),
            salt=base64.urlsafe_b64decode(salt),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(expected),
            maxmem=256 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(actual, expected)
