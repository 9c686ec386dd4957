"""Reviewers, passwords, sessions, CSRF tokens and login throttling, on the standard library.

* Passwords: scrypt (memory-hard, so a stolen users file is expensive to brute-force),
  salted per user, stored as ``name:role:$scrypt$ln=14,r=8,p=1$<salt>$<hash>``
  (``name:$scrypt$...`` lines from before roles existed read as role ``reviewer``).
* Sessions live on the server (:class:`SessionStore`, the review database): the cookie
  only carries a random session id, signed (HMAC-SHA256) so garbage never costs a
  database lookup. A session ends when the reviewer logs out (every session of that
  reviewer), when it has been idle too long, when it reaches its absolute lifetime, when
  the reviewer's password changes or the reviewer is removed from the users file: each
  row records a fingerprint of the password hash it was opened with, checked on every
  request. The database stores a hash of the session id, so a copy of it opens nothing.
* CSRF: a synchroniser token derived from the session id with the same key
  (``HMAC(key, "csrf" + sid)``), required on every POST. Visitors get an anonymous
  session (signed cookie only, nothing stored) so the login form is protected too; the
  id changes on login, so a session planted before login is worthless after it.
* Throttling (:class:`LoginThrottle`): growing delays per source address, per user name
  and globally, never a lock. A browser that logged in before carries a signed
  *device cookie* for that reviewer, and its attempts are counted per device instead of
  per name, so a stranger's failures cannot keep a reviewer out of their own account.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import ipaddress
import json
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

from pipeline.errors import LlmpipeError
from pipeline.review.model import Clock, SessionRow

SCRYPT_LOG_N = 14
SCRYPT_R = 8
SCRYPT_P = 1
SCRYPT_DKLEN = 32
USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
SESSION_COOKIE = "llmpipe_review_session"
DEVICE_COOKIE = "llmpipe_review_device"
MIN_PASSWORD_LENGTH = 8
MAX_COOKIE_CHARS = 4096
Role = Literal["reviewer", "admin"]
ROLES: tuple[Role, ...] = ("reviewer", "admin")


class AuthError(LlmpipeError):
    """A users file, user name, role or secret this module cannot accept."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _scrypt(password: str, salt: bytes, log_n: int, r: int, p: int) -> bytes:
    n = 1 << log_n
    return hashlib.scrypt(
        password.encode("utf-8", "surrogatepass"),
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


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    password_hash: str

    @property
    def fingerprint(self) -> str:
        """Changes with the password: sessions opened under the old one stop matching."""
        return hashlib.sha256(self.password_hash.encode("ascii", "replace")).hexdigest()[:32]


class UsersFile:
    """``name:role:hash`` lines, re-read whenever the file changes (no restart needed).

    Every request checks its session against this file, so it is cached by the file's
    identity (inode, size, modification time); ``add`` and ``remove`` replace the file
    atomically, which changes the inode, so a change is seen on the next request.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cache: tuple[tuple[int, int, int], dict[str, User]] | None = None
        self._lock = threading.Lock()

    def load(self) -> dict[str, User]:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return {}
        identity = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        with self._lock:
            if self._cache is not None and self._cache[0] == identity:
                return self._cache[1]
        users = self._parse(self.path.read_text("utf-8"))
        with self._lock:
            self._cache = (identity, users)
        return users

    def _parse(self, text: str) -> dict[str, User]:
        users: dict[str, User] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            name, sep, rest = line.partition(":")
            role: str = "reviewer"
            if not rest.startswith("$scrypt$"):
                role, _, rest = rest.partition(":")
            if not sep or not USERNAME.match(name) or role not in ROLES:
                raise AuthError(f"{self.path}:{number}: expected name:role:$scrypt$...")
            if not rest.startswith("$scrypt$"):
                raise AuthError(f"{self.path}:{number}: expected name:role:$scrypt$...")
            users[name] = User(name, "admin" if role == "admin" else "reviewer", rest)
        return users

    def get(self, name: str) -> User | None:
        return self.load().get(name)

    def verify(self, name: str, password: str) -> User | None:
        """Unknown users cost the same scrypt as known ones, so timing reveals nothing."""
        user = self.get(name)
        if user is None:
            verify_password(password, _dummy_hash())
            return None
        return user if verify_password(password, user.password_hash) else None

    def add(
        self, name: str, password: str, *, role: Role | None = None, log_n: int = SCRYPT_LOG_N
    ) -> bool:
        """Add a user or set a new password (which ends that user's sessions); True if new.

        ``role`` None keeps an existing user's role and makes a new user a reviewer.
        """
        if not USERNAME.match(name):
            raise AuthError("user names are 1-64 of A-Z a-z 0-9 . _ @ - (not starting with one)")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise AuthError(f"passwords need at least {MIN_PASSWORD_LENGTH} characters")
        users = dict(self.load())
        existing = users.get(name)
        chosen: Role = role or (existing.role if existing is not None else "reviewer")
        users[name] = User(name, chosen, hash_password(password, log_n=log_n))
        self._write(users)
        return existing is None

    def set_role(self, name: str, role: Role) -> None:
        users = dict(self.load())
        if name not in users:
            raise AuthError(f"no user {name!r}")
        users[name] = User(name, role, users[name].password_hash)
        self._write(users)

    def remove(self, name: str) -> bool:
        """Remove a user (their sessions end on their next request); False if unknown."""
        users = dict(self.load())
        if users.pop(name, None) is None:
            return False
        self._write(users)
        return True

    def _write(self, users: dict[str, User]) -> None:
        """Atomically, mode 0600: a half-written file must never lock everybody out."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("# llmpipe review users: name:role:scrypt hash. Manage with `users`.\n")
            handle.writelines(
                f"{u.name}:{u.role}:{u.password_hash}\n" for u in sorted(users.values(), key=_name)
            )
        os.replace(temporary, self.path)


def _name(user: User) -> str:
    return user.name


@dataclass(frozen=True)
class Session:
    """A request's session: anonymous (``user`` None) or a logged-in reviewer with a role."""

    sid: str
    user: str | None
    role: Role | None = None

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"


class SessionSigner:
    """Signs and checks cookie payloads and derives the CSRF tokens bound to sessions."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 32:
            raise AuthError("the session secret must be at least 32 bytes")
        self._key = hashlib.sha256(b"llmpipe-review-session\x00" + secret).digest()
        self._csrf_key = hashlib.sha256(b"llmpipe-review-csrf\x00" + secret).digest()

    def dumps(self, data: dict[str, str | int | None]) -> str:
        payload = _b64(json.dumps(data, separators=(",", ":")).encode())
        return f"{payload}.{self._sign(payload)}"

    def loads(self, cookie: str | None) -> dict[str, object] | None:
        """The payload of a cookie we signed; None for anything else, whatever its bytes."""
        if (
            not cookie
            or len(cookie) > MAX_COOKIE_CHARS
            or not cookie.isascii()
            or cookie.count(".") != 1
        ):
            return None
        payload, signature = cookie.split(".")
        if not hmac.compare_digest(signature, self._sign(payload)):
            return None
        try:
            data = json.loads(_unb64(payload))
        except ValueError:
            return None
        return data if isinstance(data, dict) else None

    def csrf_token(self, session: Session) -> str:
        return _b64(hmac.new(self._csrf_key, b"csrf\x00" + session.sid.encode(), "sha256").digest())

    def check_csrf(self, session: Session | None, token: str | None) -> bool:
        if session is None or not token or not token.isascii():
            return False
        return hmac.compare_digest(token, self.csrf_token(session))

    def _sign(self, payload: str) -> str:
        return _b64(hmac.new(self._key, payload.encode("ascii"), "sha256").digest())


class SessionStore(Protocol):
    """Where logged-in sessions live; the review database implements it."""

    def create_session(self, key: str, user: str, fingerprint: str, now_ms: int) -> None: ...

    def session_row(self, key: str) -> SessionRow | None: ...

    def touch_session(self, key: str, now_ms: int) -> None: ...

    def end_session(self, key: str) -> None: ...

    def end_sessions(self, user: str) -> int: ...

    def purge_sessions(self, idle_before_ms: int, created_before_ms: int) -> int: ...

    def set_flash(self, key: str, text: str | None) -> None: ...

    def take_flash(self, key: str) -> str | None: ...


@dataclass(frozen=True)
class SessionPolicy:
    idle_timeout_s: int = 30 * 60
    """A session unused this long is over."""
    lifetime_s: int = 12 * 3600
    """No session lasts longer than this, however busy."""
    touch_every_s: int = 15
    """``last seen`` is written at most this often: idle time is exact to this much."""
    anonymous_lifetime_s: int = 12 * 3600
    device_lifetime_s: int = 180 * 86400


class SessionManager:
    """Opens, checks and ends sessions: the signed cookie, the server row, the users file."""

    def __init__(
        self,
        store: SessionStore,
        users: UsersFile,
        signer: SessionSigner,
        clock: Clock,
        policy: SessionPolicy | None = None,
    ) -> None:
        self.store = store
        self.users = users
        self.signer = signer
        self.clock = clock
        self.policy = policy or SessionPolicy()

    @staticmethod
    def _key(sid: str) -> str:
        return hashlib.sha256(b"llmpipe-review-sid\x00" + sid.encode()).hexdigest()

    def anonymous(self) -> tuple[Session, str]:
        sid = secrets.token_urlsafe(24)
        expires = self.clock() // 1000 + self.policy.anonymous_lifetime_s
        return Session(sid, None), self.signer.dumps({"sid": sid, "u": None, "exp": expires})

    def open(self, user: User) -> tuple[Session, str]:
        """A new session (new id: no fixation) for a user who just proved their password."""
        sid = secrets.token_urlsafe(24)
        now = self.clock()
        self.store.create_session(self._key(sid), user.name, user.fingerprint, now)
        self.store.purge_sessions(
            now - self.policy.idle_timeout_s * 1000, now - self.policy.lifetime_s * 1000
        )
        expires = now // 1000 + self.policy.lifetime_s
        cookie = self.signer.dumps({"sid": sid, "u": user.name, "exp": expires})
        return Session(sid, user.name, user.role), cookie

    def check(self, cookie: str | None) -> Session | None:
        """The live session a cookie names, or None (forged, expired, ended, any bytes)."""
        data = self.signer.loads(cookie)
        if data is None:
            return None
        sid, user, expires = data.get("sid"), data.get("u"), data.get("exp")
        if not isinstance(sid, str) or not isinstance(expires, int):
            return None
        now = self.clock()
        if expires * 1000 <= now:
            return None
        if user is None:
            return Session(sid, None)
        if not isinstance(user, str):
            return None
        key = self._key(sid)
        row = self.store.session_row(key)
        if row is None or row.user != user:
            return None
        account = self.users.get(user)
        idle = now - row.last_seen_ms >= self.policy.idle_timeout_s * 1000
        old = now - row.created_ms >= self.policy.lifetime_s * 1000
        if account is None or account.fingerprint != row.fingerprint or idle or old:
            self.store.end_session(key)
            return None
        if now - row.last_seen_ms >= self.policy.touch_every_s * 1000:
            self.store.touch_session(key, now)
        return Session(sid, user, account.role)

    def end_all(self, user: str) -> int:
        """Logout, and an admin's "end sessions": every session of that user, everywhere."""
        return self.store.end_sessions(user)

    def flash(self, session: Session, text: str) -> None:
        """A notice for the next page this session sees; stored server-side, unforgeable."""
        if session.user is not None:
            self.store.set_flash(self._key(session.sid), text)

    def take_flash(self, session: Session) -> str | None:
        if session.user is None:
            return None
        return self.store.take_flash(self._key(session.sid))

    def device_cookie(self, user: str) -> str:
        expires = self.clock() // 1000 + self.policy.device_lifetime_s
        return self.signer.dumps({"dev": secrets.token_urlsafe(12), "u": user, "exp": expires})

    def device(self, cookie: str | None, user: str) -> str | None:
        """The device id of a browser that has logged in as ``user`` before, else None."""
        data = self.signer.loads(cookie)
        if data is None:
            return None
        device, owner, expires = data.get("dev"), data.get("u"), data.get("exp")
        if not isinstance(device, str) or owner != user or not isinstance(expires, int):
            return None
        return device if expires * 1000 > self.clock() else None


# -- throttling ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Limit:
    """``free`` failures pass; each further one doubles the wait, from 1 s up to ``max_s``."""

    free: int
    max_s: float


@dataclass(frozen=True)
class ThrottlePolicy:
    address: Limit = Limit(free=10, max_s=300.0)
    name: Limit = Limit(free=5, max_s=60.0)
    device: Limit = Limit(free=5, max_s=300.0)
    global_: Limit = Limit(free=100, max_s=30.0)
    forget_after_s: float = 15 * 60.0
    """A key with no failure for this long starts again from zero."""
    max_keys: int = 50_000


Scope = Literal["address", "name", "device", "global"]


@dataclass
class _Bucket:
    failures: int = 0
    last_failure: float = 0.0
    blocked_until: float = 0.0


class LoginThrottle:
    """Growing delays per key, in memory (it must outlive a burst, not a restart).

    Only a failure that was actually checked counts: an attempt refused because a key
    is waiting is not a failure and does not push the wait further, so the longest
    anyone can make a key wait is its ``max_s`` after their last real attempt.
    """

    def __init__(
        self, policy: ThrottlePolicy | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.policy = policy or ThrottlePolicy()
        self._clock = clock
        self._buckets: dict[tuple[Scope, str], _Bucket] = {}
        self._lock = threading.Lock()

    def _limit(self, scope: Scope) -> Limit:
        policy = self.policy
        return {
            "address": policy.address,
            "name": policy.name,
            "device": policy.device,
            "global": policy.global_,
        }[scope]

    def wait_s(self, keys: Sequence[tuple[Scope, str]]) -> float:
        """Seconds until every key may try again; 0 when the attempt may be checked now."""
        now = self._clock()
        with self._lock:
            waits = [b.blocked_until - now for k in keys if (b := self._buckets.get(k))]
        return max([0.0, *waits])

    def failed(self, keys: Sequence[tuple[Scope, str]]) -> None:
        now = self._clock()
        with self._lock:
            if len(self._buckets) >= self.policy.max_keys:
                self._forget(now)
            for key in keys:
                bucket = self._buckets.setdefault(key, _Bucket())
                if now - bucket.last_failure > self.policy.forget_after_s:
                    bucket.failures = 0
                bucket.failures += 1
                bucket.last_failure = now
                limit = self._limit(key[0])
                over = bucket.failures - limit.free
                if over > 0:
                    bucket.blocked_until = now + min(limit.max_s, 2.0 ** (over - 1))

    def succeeded(self, keys: Sequence[tuple[Scope, str]]) -> None:
        """A right password clears the name or device, never the address or global keys
        (an attacker with one real account must not be able to reset their address)."""
        with self._lock:
            for key in keys:
                if key[0] in ("name", "device"):
                    self._buckets.pop(key, None)

    def _forget(self, now: float) -> None:
        stale = [
            k
            for k, b in self._buckets.items()
            if now - b.last_failure > self.policy.forget_after_s and b.blocked_until <= now
        ]
        for key in stale:
            del self._buckets[key]
        if len(self._buckets) >= self.policy.max_keys:  # a flood of fresh keys: keep the worst
            keep = sorted(self._buckets.items(), key=lambda kv: -kv[1].blocked_until)
            self._buckets = dict(keep[: self.policy.max_keys // 2])


def address_key(host: str | None) -> str:
    """IPv6 clients are counted per /64: one machine can use a whole one."""
    if not host:
        return "unknown"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host[:64]
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.ip_network(f"{address}/64", strict=False))
    return str(address)
