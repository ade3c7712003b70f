"""Who may use the console: password hashes, sessions, CSRF tokens, slowed-down logins.

Passwords are stored as scrypt hashes (hashlib, memory-hard: 16 MiB per try) in the config,
``scrypt$N$r$p$salt$hash`` with base64 salt and hash. Sessions live in this process's memory:
a restart logs everyone out, which is acceptable for an operator console and keeps the
database free of secrets.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import secrets
import threading
import time
from dataclasses import dataclass, field

from broker.audit import AuditEvent, Kind
from broker.audit_trail import AuditTrail
from broker.config import WebConfig, WebUser

ROLES = ("viewer", "operator", "admin")
_N, _R, _P = 2**14, 8, 1
_MAX_DELAY_SECONDS = 30.0


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode("utf-8"), salt=salt, n=_N, r=_R, p=_P, dklen=32)
    return "$".join(("scrypt", str(_N), str(_R), str(_P),
                     base64.b64encode(salt).decode(), base64.b64encode(digest).decode()))


def verify_password(password: str, stored: str) -> bool:
    try:
        scheme, n, r, p, salt, digest = stored.split("$")
        if scheme != "scrypt":
            return False
        expected = base64.b64decode(digest)
        actual = hashlib.scrypt(password.encode("utf-8"), salt=base64.b64decode(salt),
                                n=int(n), r=int(r), p=int(p), dklen=len(expected),
                                maxmem=128 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(actual, expected)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def may(role: str, needed: str) -> bool:
    return ROLES.index(role) >= ROLES.index(needed)


@dataclass
class Principal:
    name: str
    role: str


@dataclass
class Session:
    principal: Principal
    csrf: str
    expires: float


@dataclass
class _Failures:
    count: int = 0
    last: float = 0.0


@dataclass
class Guard:
    """Users, sessions and failed-login bookkeeping of one console."""

    config: WebConfig
    # Where logins are audited (success when a password was verified, every failure).
    audit: AuditTrail | None = None
    _sessions: dict[str, Session] = field(default_factory=dict)
    _failures: dict[tuple[str, str], _Failures] = field(default_factory=dict)
    # A verified (user, password digest): HTTP Basic scripts poll, scrypt costs ~50 ms.
    _verified: dict[tuple[str, bytes], float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def open(self) -> bool:
        """No users configured: everyone is an administrator (only allowed on loopback)."""
        return not self.config.users

    def _user(self, name: str) -> WebUser | None:
        return next((u for u in self.config.users if u.name == name), None)

    def wait_seconds(self, name: str, client: str) -> float:
        """How long this user name from this address must still wait before trying again."""
        with self._lock:
            failures = self._failures.get((name, client))
        if failures is None or failures.count < self.config.login_failures_before_delay:
            return 0.0
        extra = failures.count - self.config.login_failures_before_delay
        delay = min(_MAX_DELAY_SECONDS, 2.0 ** extra)
        return max(0.0, failures.last + delay - time.monotonic())

    def check(self, name: str, password: str, client: str) -> Principal | None:
        """The user if the password is right; counts failures. Callers first ask
        :meth:`wait_seconds` and refuse while it is positive."""
        user = self._user(name)
        key = (name, hashlib.sha256(password.encode("utf-8")).digest())
        now = time.monotonic()
        with self._lock:
            cached = self._verified.get(key, 0.0) > now
        ok = user is not None and (cached or verify_password(password, user.password_hash))
        if user is None:
            # Same cost for an unknown name: no user enumeration by timing.
            verify_password(password, hash_password("x"))
        if self.audit is not None and not self.open and not (ok and cached):
            # A script's HTTP Basic calls within the cache's 5 minutes are one login.
            self.audit.record(AuditEvent(Kind.LOGIN if ok else Kind.LOGIN_FAILED, name[:100],
                                         "success" if ok else "failed", address=client,
                                         detail={} if ok or user is not None
                                         else {"reason": "unknown user"}))
        with self._lock:
            if ok and user is not None:
                self._failures.pop((name, client), None)
                self._verified[key] = now + 300
                return Principal(user.name, user.role)
            failures = self._failures.setdefault((name, client), _Failures())
            failures.count += 1
            failures.last = now
        return None

    def new_session(self, principal: Principal) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(principal, secrets.token_urlsafe(32),
                          time.time() + self.config.session_hours * 3600)
        with self._lock:
            self._sessions[token] = session
            if len(self._sessions) > 10_000:
                now = time.time()
                for key in [k for k, s in self._sessions.items() if s.expires < now]:
                    del self._sessions[key]
        return token, session

    def session(self, token: str | None) -> Session | None:
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return None
            if session.expires < time.time():
                del self._sessions[token]
                return None
            # Sliding expiry: a console left open on a ward stays logged in while used.
            session.expires = time.time() + self.config.session_hours * 3600
            return session

    def end_session(self, token: str | None) -> None:
        if token:
            with self._lock:
                self._sessions.pop(token, None)


def csrf_ok(session: Session | None, token: str | None) -> bool:
    return bool(session and token and hmac.compare_digest(session.csrf, token))
