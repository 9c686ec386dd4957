"""Reviewers, passwords, sessions and CSRF tokens, on the standard library only.

* Passwords: scrypt (memory-hard, so a stolen users file is expensive to brute-force),
  salted per user, stored as ``name:$scrypt$ln=14,r=8,p=1$<salt>$<hash>``.
* Sessions: a signed cookie (HMAC-SHA256) holding a random session id, the user (or none,
  before login) and an expiry. No server-side session table is needed, and a forged or
  altered cookie fails the signature check.
* CSRF: a synchroniser token derived from the session id with the same key
  (``HMAC(key, "csrf" + sid)``). It is put in every form and required on every POST;
  an attacker's page can make the browser send the cookie (SameSite=Strict already
  stops most of that) but can never read or compute the token. Every visitor, even
  before login, gets a session so the login form is protected as well; the id changes on
  login so a session planted before login is worthless after it.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

SCRYPT_LOG_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
SESSION_COOKIE = "llmpipe_review_session"
MIN_PASSWORD_LENGTH = 8


class AuthError(Exception):
    """A users file or user name this module cannot accept."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(
        password.encode("utf-8"),
        salt=salt,
        n=n,
        r=r,
        p=p,
        dklen=SCRYPT_DKLEN,
        maxmem=2 * 128 * r * n + 1_048_576,
    )


def hash_password(password: str, *, log_n: int = SCRYPT_LOG_N) -> str:
    salt = secrets.token_bytes(16)
    digest = _scrypt(password, salt, log_n, SCRYPT_R, SCRYPT_P)
    return f"$scrypt$ln={log_n},r={SCRYPT_R},p={SCRYPT_P}${_b64(salt)}${_b64(digest)}"


def verify_password(password: str, encoded: str) -> bool:
    """Constant-time comparison; parameters come from the stored hash so they can evolve."""
    try:
        _, scheme, params, salt, digest = encoded.split("$")
        if scheme != "scrypt":
            return False
        fields = dict(part.split("=", 1) for part in params.split(","))
        log_n, r, p = int(fields["ln"]), int(fields["r"]), int(fields["p"])
        if not (1 <= log_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
            return False
        expected = _unb64(digest)
        actual = _scrypt(password, _unb64(salt), log_n, r, p)
    except (ValueError, KeyError):
        return False
    return hmac.compare_digest(actual, expected)


@functools.cache
def _dummy_hash() -> str:
    """Computed on first use, not at import: scrypt is deliberately slow."""
    return hash_password("timing-equaliser")


class UsersFile:
    """``name:hash`` lines; re-read on every login so ``users add`` needs no restart."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> dict[str, str]:
        users: dict[str, str] = {}
        if not self.path.exists():
            return users
        for number, line in enumerate(self.path.read_text("utf-8").splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, encoded = line.partition(":")
            if not sep or not USERNAME.match(name) or not encoded.startswith("$scrypt$"):
                raise AuthError(f"{self.path}:{number}: expected name:$scrypt$...")
            users[name] = encoded
        return users

    def verify(self, name: str, password: str) -> bool:
        """Unknown users cost the same scrypt as known ones, so timing reveals nothing."""
        encoded = self.load().get(name)
        if encoded is None:
            verify_password(password, _dummy_hash())
            return False
        return verify_password(password, encoded)

    def add(self, name: str, password: str, *, log_n: int = SCRYPT_LOG_N) -> bool:
        """Add or replace a user; True if the user is new. Written atomically, mode 0600."""
        if not USERNAME.match(name):
            raise AuthError("user names are 1-64 of A-Z a-z 0-9 . _ @ - (not starting with one)")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise AuthError(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")
        users = self.load()
        new = name not in users
        users[name] = hash_password(password, log_n=log_n)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("# llmpipe review users: name:scrypt hash. Manage with `users add`.\n")
            handle.writelines(f"{user}:{encoded}\n" for user, encoded in sorted(users.items()))
        os.replace(temporary, self.path)
        return new


@dataclass(frozen=True)
class Session:
    sid: str
    user: str | None
    expires_at: int


class SessionSigner:
    """Issues and checks session cookies and the CSRF tokens bound to them."""

    def __init__(
        self, secret: bytes, max_age_s: int = 12 * 3600, clock: Callable[[], float] = time.time
    ) -> None:
        if len(secret) < 32:
            raise AuthError("the session secret must be at least 32 bytes")
        self._key = hashlib.sha256(b"llmpipe-review-session\x00" + secret).digest()
        self._csrf_key = hashlib.sha256(b"llmpipe-review-csrf\x00" + secret).digest()
        self.max_age_s = max_age_s
        self._clock = clock

    def new(self, user: str | None = None) -> Session:
        return Session(secrets.token_urlsafe(24), user, int(self._clock()) + self.max_age_s)

    def dumps(self, session: Session) -> str:
        payload = _b64(
            json.dumps(
                {"sid": session.sid, "u": session.user, "exp": session.expires_at},
                separators=(",", ":"),
            ).encode()
        )
        return f"{payload}.{self._sign(payload)}"

    def loads(self, cookie: str | None) -> Session | None:
        """None for anything not signed by us, malformed or expired."""
        if not cookie or cookie.count(".") != 1:
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
            sid, user, expires = data["sid"], data["u"], int(data["exp"])
        except (ValueError, KeyError, TypeError):
            return None
        if not isinstance(sid, str) or not (user is None or isinstance(user, str)):
            return None
        if expires <= self._clock():
            return None
        return Session(sid, user, expires)

    def csrf_token(self, session: Session) -> str:
        return _b64(hmac.new(self._csrf_key, b"csrf\x00" + session.sid.encode(), "sha256").digest())

    def check_csrf(self, session: Session | None, token: str | None) -> bool:
        if session is None or not token:
            return False
        return hmac.compare_digest(token, self.csrf_token(session))

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), "sha256").digest())


class LoginThrottle:
    """After ``limit`` failures for one user name, refuse logins for ``window_s`` seconds.

    Keeps online guessing slow without a lockout that lasts; in memory, because it only
    needs to outlive a burst of attempts, not a restart.
    """

    def __init__(
        self, limit: int = 5, window_s: float = 300.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._limit = limit
        self._window_s = window_s
        self._clock = clock
        self._failures: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def blocked(self, name: str) -> bool:
        with self._lock:
            return len(self._recent(name)) >= self._limit

    def failed(self, name: str) -> None:
        with self._lock:
            self._failures[name] = [*self._recent(name), self._clock()]

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._failures.pop(name, None)

    def _recent(self, name: str) -> list[float]:
        cutoff = self._clock() - self._window_s
        return [t for t in self._failures.get(name, []) if t > cutoff]
