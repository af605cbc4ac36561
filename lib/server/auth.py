"""Authentication and roles in front of MONAI Label's routes (an ASGI middleware).

MONAI Label 0.8.5's own auth needs a Keycloak realm reachable at run time; this server authenticates
by itself (users in the auth folder, see :mod:`lib.server.users`) and speaks the same login protocol,
so MONAI Label's Python client, 3D Slicer's MONAI Label module and a browser all log in:

* ``GET /auth/``: ``{"enabled": true, ...}``: clients ask this before showing a login;
* ``POST /auth/token`` (OAuth2 password form: ``username``, ``password``): ``{"access_token",
  "token_type": "bearer", "expires_in"}``; then send ``Authorization: Bearer <token>``;
* ``GET /auth/token/valid``: the caller's user name and roles;
* ``Authorization: Basic`` also works (curl, scripts, and OHIF: the browser asks for the user name and
  password once, on the 401 of ``/ohif/``, and sends them with OHIF's requests).

Each request needs the role that :mod:`lib.server.policy` gives its route: 401 without valid
credentials, 403 with a role that is too weak. The ``user`` query parameter that MONAI Label's
endpoints take (and log with a label save or an image upload) is set from the login, never from the
client. Repeated failed logins from one address are slowed down with 429. Writes are logged with
the user (``audit:`` lines); passwords and tokens never are.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import time
from collections import OrderedDict
from urllib.parse import parse_qsl, urlencode

from .asgi import header, read_body, route_path, send_json
from .policy import PUBLIC, required_role, role_allows
from .users import AuthError, TokenIssuer, User, UserStore

logger = logging.getLogger(__name__)

__all__ = ["AuthMiddleware"]


class MissingCredentials(AuthError):
    """No ``Authorization`` header (a browser's first request, say): not a failed login."""

REALM = "CDPDNet MONAI Label"
_CHALLENGE = {"www-authenticate": f'Basic realm="{REALM}"'}  # browsers then ask for a login
_BASIC_CACHE_S = 300  # a checked Basic header is trusted this long (scrypt costs ~50 ms a check)
_MAX_FAILURES, _FAILURE_WINDOW_S = 8, 300


class AuthMiddleware:
    def __init__(self, app, users: UserStore, tokens: TokenIssuer):
        self.app = app
        self.users = users
        self.tokens = tokens
        self._basic_ok: OrderedDict[str, tuple[str, float]] = OrderedDict()  # sha256(header) -> (user, when)
        self._failures: dict[str, list[float]] = {}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        method = scope["method"].upper()
        path = route_path(scope)
        if path.rstrip("/") == "/auth" and method in ("GET", "HEAD"):
            return await send_json(send, 200, {"enabled": True, "client_id": "cdpdnet", "realm": REALM})
        if path.rstrip("/") == "/auth/token" and method == "POST":
            return await self._login(scope, receive, send)
        needed = required_role(method, path)
        if needed == PUBLIC:
            return await self.app(scope, receive, send)
        client = _client(scope)
        try:
            user = self._user(scope, client)
        except AuthError as e:
            if not isinstance(e, MissingCredentials) and self._too_many_failures(client):
                return await send_json(send, 429, {"detail": "too many failed logins from this address; "
                                                             "wait a few minutes"}, {"retry-after": "60"})
            return await send_json(send, 401, {"detail": str(e)}, _CHALLENGE)
        if not role_allows(user.role, needed):
            self._audit(user, method, path, 403)
            return await send_json(send, 403, {"detail": f"{method} {path} needs the {needed} role; "
                                                         f"user {user.name!r} is {user.role}"})
        if path.rstrip("/") == "/auth/token/valid":
            return await send_json(send, 200, {"username": user.name, "role": user.role,
                                               "roles": [user.role]})
        scope = dict(scope)
        scope["query_string"] = _with_user(scope.get("query_string", b""), user.name)
        scope.setdefault("state", {})["user"] = user
        if method in ("GET", "HEAD"):
            return await self.app(scope, receive, send)
        status = {}

        async def send_and_note(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            self._audit(user, method, path, status.get("code", "aborted"))

    # ------------------------------------------------------------------------------------------
    def _user(self, scope, client: str) -> User:
        auth = header(scope, b"authorization")
        if not auth:
            raise MissingCredentials("authentication required: log in with POST /auth/token (user name and password) "
                            "and send 'Authorization: Bearer <token>', or use HTTP Basic authentication")
        kind, _, cred = auth.partition(" ")
        kind = kind.lower()
        if kind == "bearer":
            name = self.tokens.check(cred.strip())
            user = self.users.get(name)
            if user is None:
                raise AuthError(f"user {name!r} no longer exists")
            return user
        if kind == "basic":
            return self._basic(cred.strip(), client)
        raise AuthError(f"unsupported authorization scheme {kind!r}: use Bearer or Basic")

    def _basic(self, cred: str, client: str) -> User:
        key = hashlib.sha256(cred.encode()).hexdigest()
        hit = self._basic_ok.get(key)
        if hit and time.monotonic() - hit[1] < _BASIC_CACHE_S:
            user = self.users.get(hit[0])
            if user is not None:
                return user
        try:
            name, _, password = base64.b64decode(cred, validate=True).decode().partition(":")
        except (ValueError, UnicodeDecodeError):
            raise AuthError("malformed Basic credentials") from None
        user = self.users.authenticate(name, password)
        self._basic_ok[key] = (user.name, time.monotonic())
        while len(self._basic_ok) > 256:
            self._basic_ok.popitem(last=False)
        return user

    async def _login(self, scope, receive, send):
        client = _client(scope)
        if self._blocked(client):
            return await send_json(send, 429, {"detail": "too many failed logins from this address; wait a few "
                                                         "minutes"}, {"retry-after": "60"})
        try:
            form = dict(parse_qsl((await read_body(receive, 64 * 1024)).decode("utf-8", "replace")))
        except ValueError as e:
            return await send_json(send, 413, {"detail": f"login form too large: {e}"})
        name, password = form.get("username", ""), form.get("password", "")
        if not name or not password:
            return await send_json(send, 422, {"detail": "send the form fields 'username' and 'password' "
                                                         "(application/x-www-form-urlencoded)"})
        try:
            user = self.users.authenticate(name, password)
        except AuthError as e:
            self._too_many_failures(client)
            logger.warning(f"audit: failed login for {name!r} from {client}")
            return await send_json(send, 401, {"detail": str(e)}, _CHALLENGE)
        logger.info(f"audit: {user.name} ({user.role}) logged in from {client}")
        return await send_json(send, 200, self.tokens.issue(user))

    def _too_many_failures(self, client: str) -> bool:
        """Count a failure; True when this address has failed too often recently."""
        now = time.monotonic()
        recent = [t for t in self._failures.get(client, []) if now - t < _FAILURE_WINDOW_S] + [now]
        self._failures[client] = recent
        if len(self._failures) > 4096:
            self._failures.pop(next(iter(self._failures)))
        return len(recent) > _MAX_FAILURES

    def _blocked(self, client: str) -> bool:
        now = time.monotonic()
        return len([t for t in self._failures.get(client, []) if now - t < _FAILURE_WINDOW_S]) > _MAX_FAILURES

    @staticmethod
    def _audit(user: User, method: str, path: str, status) -> None:
        logger.info(f"audit: {user.name} ({user.role}) {method} {path} -> {status}")


def _client(scope) -> str:
    c = scope.get("client")
    return str(c[0]) if c else "?"


def _with_user(query: bytes, name: str) -> bytes:
    """The query string with ``user`` set to the authenticated user (MONAI Label logs it with saves)."""
    pairs = [(k, v) for k, v in parse_qsl(query.decode("latin-1"), keep_blank_values=True) if k != "user"]
    pairs.append(("user", name))
    return urlencode(pairs).encode("latin-1")
