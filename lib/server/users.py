"""Users, passwords and access tokens of the server (the auth folder).

The auth folder (``--conf auth_dir``, default ``apps/cdpdnet/auth``) holds, each with mode 0600::

    users.json         {"users": {"<name>": {"role": "annotator" | "admin", "password": "scrypt$..."}}}
    token.key          the key that signs access tokens (HS256 JWTs); replacing it logs everyone out
    initial-admin-password   written once, when the folder is created, for the first admin

Passwords are stored as scrypt hashes (stdlib ``hashlib.scrypt``), never in clear. Access tokens are
JWTs with the user's name and role, an expiry, and the role also in Keycloak's ``realm_access.roles``
claim with MONAI Label's role names, so a client written for MONAI Label's own auth reads them.
Every request re-checks the user against ``users.json`` (re-read when the file changes): removing a
user or changing a role takes effect at once, even for tokens already issued.

Manage users with ``scripts/users.py`` (add, remove, passwd, list).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..private_files import write_private_bytes, write_private_json
from .policy import ADMIN, ROLES

logger = logging.getLogger(__name__)

__all__ = ["AuthError", "User", "UserStore", "TokenIssuer"]

_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1}
_NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-@")
MONAI_LABEL_ROLES = {  # MONAI Label's role names (monailabel.config settings defaults)
    "annotator": ["monailabel-annotator", "monailabel-user"],
    "admin": ["monailabel-admin", "monailabel-reviewer", "monailabel-annotator", "monailabel-user"],
}


class AuthError(ValueError):
    """Bad credentials, a bad token, or a bad user-management request (the message says which)."""


@dataclass(frozen=True)
class User:
    name: str
    role: str


def hash_password(password: str) -> str:
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, dklen=32, **_SCRYPT)
    return "scrypt${n}${r}${p}${salt}${digest}".format(
        **_SCRYPT, salt=base64.b64encode(salt).decode(), digest=base64.b64encode(digest).decode())


def verify_password(password: str, stored: str) -> bool:
    try:
        kind, n, r, p, salt, digest = stored.split("$")
        if kind != "scrypt":
            return False
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n), r=int(r), p=int(p),
                             dklen=len(base64.b64decode(digest)))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, base64.b64decode(digest))


class UserStore:
    """``users.json`` in the auth folder; thread-safe; re-read when another process changed it."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.path = self.folder / "users.json"
        self._lock = threading.Lock()
        self._users: dict[str, dict] = {}
        self._stamp: tuple | None = None

    # -- reading -----------------------------------------------------------------------------
    def _load(self) -> dict[str, dict]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._users, self._stamp = {}, None
            return self._users
        stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            try:
                data = json.loads(self.path.read_text())
                users = data.get("users", {})
                if not isinstance(users, dict):
                    raise ValueError("'users' is not an object")
            except (OSError, ValueError) as e:
                raise AuthError(f"{self.path} is not a readable users file: {e}") from None
            self._users, self._stamp = users, stamp
        return self._users

    def get(self, name: str) -> User | None:
        with self._lock:
            entry = self._load().get(name)
        if not isinstance(entry, dict) or entry.get("role") not in ROLES:
            return None
        return User(name, entry["role"])

    def authenticate(self, name: str, password: str) -> User:
        with self._lock:
            entry = self._load().get(name)
        if not isinstance(entry, dict) or not verify_password(password, str(entry.get("password", ""))):
            verify_password(password, hash_password("x"))  # same time for unknown users
            raise AuthError("wrong user name or password")
        if entry.get("role") not in ROLES:
            raise AuthError(f"user {name!r} has no valid role")
        return User(name, entry["role"])

    def list(self) -> list[User]:
        with self._lock:
            users = dict(self._load())
        return [User(n, e.get("role", "?")) for n, e in sorted(users.items())]

    # -- writing (scripts/users.py, first start) -------------------------------------------------
    def _write(self, users: dict[str, dict]) -> None:
        write_private_json(self.path, {"users": users})
        self._stamp = None

    def set_user(self, name: str, role: str, password: str | None = None) -> str | None:
        """Add a user or change its role (and password, when given or when the user is new).

        Returns the password when one was generated (for a new user without ``password``)."""
        if not name or not set(name) <= _NAME_CHARS or len(name) > 64:
            raise AuthError(f"user name {name!r}: use 1-64 letters, digits and . _ - @")
        if role not in ROLES:
            raise AuthError(f"role {role!r}: use one of {', '.join(ROLES)}")
        generated = None
        with self._lock:
            users = dict(self._load())
            entry = dict(users.get(name) or {})
            if password is None and "password" not in entry:
                password = generated = secrets.token_urlsafe(15)
            if password is not None:
                if len(password) < 10:
                    raise AuthError("a password needs at least 10 characters")
                entry["password"] = hash_password(password)
            entry["role"] = role
            users[name] = entry
            self._write(users)
        return generated

    def remove(self, name: str) -> None:
        with self._lock:
            users = dict(self._load())
            if name not in users:
                raise AuthError(f"no user {name!r}")
            others = [n for n, e in users.items() if n != name and e.get("role") == ADMIN]
            if users[name].get("role") == ADMIN and not others:
                raise AuthError(f"{name!r} is the last admin; add another admin first")
            del users[name]
            self._write(users)

    def initialise(self) -> Path | None:
        """On first use: create the folder with an ``admin`` user whose password goes to a 0600 file.

        Returns that file's path when it was created now (the caller logs the path, never the password)."""
        if self.path.exists():
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        os.chmod(self.folder, 0o700)
        password = secrets.token_urlsafe(15)
        self.set_user("admin", ADMIN, password)
        note = self.folder / "initial-admin-password"
        write_private_bytes(note, (password + "\n").encode())
        return note


class TokenIssuer:
    """Signs and checks access tokens with the key in ``token.key`` (created on first use)."""

    def __init__(self, folder: str | os.PathLike, hours: float = 12.0):
        self.path = Path(folder) / "token.key"
        self.seconds = int(hours * 3600)
        self._key: bytes | None = None

    @property
    def key(self) -> bytes:
        if self._key is None:
            if not self.path.exists():
                write_private_bytes(self.path, secrets.token_hex(32).encode())
            self._key = self.path.read_bytes().strip()
        return self._key

    def issue(self, user: User) -> dict:
        import jwt

        now = int(time.time())
        claims = {"sub": user.name, "preferred_username": user.name, "role": user.role,
                  "realm_access": {"roles": MONAI_LABEL_ROLES[user.role]}, "iat": now, "exp": now + self.seconds}
        token = jwt.encode(claims, self.key, algorithm="HS256")
        return {"access_token": token, "token_type": "bearer", "expires_in": self.seconds}

    def check(self, token: str) -> str:
        """The user name in a valid token; :class:`AuthError` for an expired, forged or malformed one."""
        import jwt

        try:
            claims = jwt.decode(token, self.key, algorithms=["HS256"], options={"require": ["exp", "sub"]})
        except jwt.ExpiredSignatureError:
            raise AuthError("the access token has expired; log in again (POST /auth/token)") from None
        except jwt.InvalidTokenError:
            raise AuthError("the access token is not valid") from None
        return str(claims["sub"])
