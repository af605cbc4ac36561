"""The server's guards (lib/server): roles of MONAI Label's real routes, login and tokens, the upload
limit, inference admission (503 + Retry-After) and thread-run endpoints, on a small FastAPI app that
stands in for MONAI Label's where the behaviour, not the route list, is tested."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import subprocess
import sys
import threading
import time

import httpx
import pytest
from fastapi import FastAPI, Form, UploadFile

from conftest import REPO
from lib.server.auth import AuthMiddleware
from lib.server.limits import InferAdmission, UploadLimit
from lib.server.offload import OffloadBlocking
from lib.server.policy import ADMIN, ANNOTATOR, PUBLIC, required_role
from lib.server.users import AuthError, TokenIssuer, UserStore


# -- the policy against MONAI Label's own routes -------------------------------------------------------
def _monailabel_routes():
    from monailabel.app import app

    flat = []
    for r in app.routes:  # FastAPI 0.165 keeps included routers as such (MONAI Label's API prefix is "")
        flat += list(r.original_router.routes) if hasattr(r, "original_router") else [r]
    out = []
    for r in flat:
        for m in sorted(getattr(r, "methods", None) or {"GET"}):
            path = r.path.replace("{model}", "cdpdnet").replace("{path:path}", "x/y").replace("{path}", "x")
            out.append((m, path.replace("{op}", "wado").replace("{session_id}", "s1").replace("{name}", "n")))
    return out


EXPECTED = {
    ("POST", "/train/cdpdnet"): ADMIN, ("POST", "/train/"): ADMIN, ("DELETE", "/train/"): ADMIN,
    ("DELETE", "/datastore/image"): ADMIN, ("DELETE", "/datastore/label"): ADMIN, ("DELETE", "/datastore/"): ADMIN,
    ("PUT", "/model/cdpdnet"): ADMIN, ("DELETE", "/model/cdpdnet"): ADMIN, ("GET", "/logs/"): ADMIN,
    ("POST", "/reload"): ADMIN, ("POST", "/scoring/cdpdnet"): ADMIN, ("DELETE", "/scoring/"): ADMIN,
    ("POST", "/batch/infer/cdpdnet"): ADMIN, ("GET", "/logs/gpu"): ADMIN,
    ("POST", "/infer/cdpdnet"): ANNOTATOR, ("PUT", "/datastore/label"): ANNOTATOR, ("GET", "/info/"): ANNOTATOR,
    ("POST", "/activelearning/random"): ANNOTATOR, ("GET", "/datastore/image"): ANNOTATOR,
    ("GET", "/datastore/"): ANNOTATOR, ("GET", "/train/"): ANNOTATOR, ("GET", "/ohif/x/y"): ANNOTATOR,
    ("GET", "/proxy/dicom/wado/x/y"): ANNOTATOR, ("GET", "/model/info/cdpdnet"): ANNOTATOR, ("PUT", "/datastore/image/info"): ANNOTATOR,
    ("POST", "/auth/token"): PUBLIC, ("GET", "/auth/"): PUBLIC, ("GET", "/openapi.json"): PUBLIC,
    ("OPTIONS", "/train/cdpdnet"): PUBLIC,
}


@pytest.mark.parametrize("method,path", sorted(EXPECTED))
def test_role_of_route(method, path):
    assert required_role(method, path) == EXPECTED[(method, path)]


def test_only_login_and_api_page_are_public_among_monailabels_routes():
    routes = _monailabel_routes()
    assert len(routes) > 40, routes
    public = sorted({(m, p) for m, p in routes if required_role(m, p) == PUBLIC})
    assert public == [("GET", "/"), ("GET", "/docs"), ("GET", "/favicon.ico"), ("GET", "/openapi.json"),
                      ("HEAD", "/docs"), ("HEAD", "/openapi.json")], public
    # deleting (but for one's own upload session), training, batch runs, logs and reload need admin
    for m, p in routes:
        if m == "DELETE" and not p.startswith("/session/") or p.startswith(("/train/", "/batch/", "/logs", "/reload")) and m != "GET":
            assert required_role(m, p) == ADMIN, (m, p)


# -- users --------------------------------------------------------------------------------------------
def test_user_store_files_are_private_and_hold_no_clear_passwords(tmp_path):
    store = UserStore(tmp_path / "auth")
    note = store.initialise()
    assert note is not None and store.initialise() is None  # once
    for p in (store.path, note):
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
    assert stat.S_IMODE(store.folder.stat().st_mode) == 0o700
    admin_pw = note.read_text().strip()
    assert admin_pw not in store.path.read_text()
    assert store.authenticate("admin", admin_pw).role == ADMIN
    pw = store.set_user("alice", ANNOTATOR)
    assert pw and pw not in store.path.read_text()
    assert store.authenticate("alice", pw).role == ANNOTATOR
    with pytest.raises(AuthError, match="wrong user name or password"):
        store.authenticate("alice", pw + "x")
    with pytest.raises(AuthError, match="wrong user name or password"):
        store.authenticate("nobody", pw)
    with pytest.raises(AuthError, match="last admin"):
        store.remove("admin")
    with pytest.raises(AuthError, match="user name"):
        store.set_user("../evil", ANNOTATOR)
    with pytest.raises(AuthError, match="role"):
        store.set_user("bob", "root")
    with pytest.raises(AuthError, match="10 characters"):
        store.set_user("bob", ANNOTATOR, "short")


def test_users_script(tmp_path):
    auth = tmp_path / "auth"
    run = lambda *a, **kw: subprocess.run([sys.executable, str(REPO / "scripts" / "users.py"), "--auth-dir", str(auth),
                                           *a], capture_output=True, text=True, timeout=60, **kw)
    r = run("add", "carol", "--role", "annotator")
    assert r.returncode == 0, r.stderr
    pw = r.stdout.strip().rsplit(" ", 1)[-1]
    assert UserStore(auth).authenticate("carol", pw).role == ANNOTATOR
    assert run("add", "carol", "--role", "admin").returncode == 2
    r = run("add", "dave", "--role", "admin", "--password-stdin", input="a-long-password-42\n")
    assert r.returncode == 0 and "a-long-password-42" not in r.stdout
    assert run("role", "carol", "admin").returncode == 0
    assert UserStore(auth).get("carol").role == ADMIN
    assert "carol\tadmin" in run("list").stdout
    assert run("remove", "carol").returncode == 0 and UserStore(auth).get("carol") is None
    r = run("remove", "dave")
    assert r.returncode == 2 and "last admin" in r.stderr


# -- the middleware stack on a stand-in app --------------------------------------------------------------
def _standin_app(seen: dict) -> FastAPI:
    app = FastAPI()

    @app.get("/info/")
    async def info():
        return {"ok": True}

    @app.post("/infer/{model}")
    async def infer(model: str, params: str = Form("{}"), file: UploadFile | None = None):
        time.sleep(float(json.loads(params).get("sleep", 0)))  # blocks like MONAI Label's endpoint does
        return {"model": model}

    @app.put("/datastore/label")
    async def save_label(image: str, user: str | None = None, label: UploadFile | None = None):
        seen["user"] = user
        seen["label_bytes"] = len(label.file.read()) if label else 0
        return {"image": image}

    @app.post("/train/{model}")
    async def train(model: str):
        return {"started": model}

    return app


@pytest.fixture()
def guarded(tmp_path):
    seen: dict = {}
    app = _standin_app(seen)
    users = UserStore(tmp_path / "auth")
    users.initialise()
    admin_pw = (tmp_path / "auth" / "initial-admin-password").read_text().strip()
    anno_pw = users.set_user("alice", ANNOTATOR)
    tokens = TokenIssuer(tmp_path / "auth", hours=1)
    admission = InferAdmission(OffloadBlocking(app.build_middleware_stack()), max_waiting=2)
    stack = AuthMiddleware(UploadLimit(admission, max_bytes=64 * 1024), users, tokens)
    return {"asgi": stack, "users": users, "tokens": tokens, "admin": admin_pw, "alice": anno_pw, "seen": seen,
            "admission": admission, "dir": tmp_path / "auth"}


def _client(g) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=g["asgi"]), base_url="http://server")


def _run(coro):
    return asyncio.run(coro)


def _login(g, name, password):
    async def go():
        async with _client(g) as c:
            return await c.post("/auth/token", data={"username": name, "password": password})

    return _run(go())


def _bearer(g, name):
    r = _login(g, name, g[name])
    assert r.status_code == 200, r.text
    return {"Authorization": f"Bearer {r.json()['access_token']}"}


def test_requests_without_credentials_get_401_with_a_way_in(guarded):
    async def go():
        async with _client(guarded) as c:
            return await c.get("/info/"), await c.get("/auth/")

    r, auth = _run(go())
    assert r.status_code == 401 and "POST /auth/token" in r.json()["detail"]
    assert r.headers["www-authenticate"].startswith("Basic realm=")
    assert auth.status_code == 200 and auth.json()["enabled"] is True


def test_login_roles_and_basic_auth(guarded):
    g = guarded
    assert _login(g, "alice", "wrong-password").status_code == 401
    alice, admin = _bearer(g, "alice"), _bearer(g, "admin")
    basic = {"Authorization": "Basic " + base64.b64encode(f"alice:{g['alice']}".encode()).decode()}
    bad_basic = {"Authorization": "Basic " + base64.b64encode(b"alice:nope-nope-nope").decode()}

    async def go():
        async with _client(g) as c:
            return {
                "info": await c.get("/info/", headers=alice),
                "basic": await c.get("/info/", headers=basic),
                "bad_basic": await c.get("/info/", headers=bad_basic),
                "train_alice": await c.post("/train/cdpdnet", headers=alice),
                "train_admin": await c.post("/train/cdpdnet", headers=admin),
                "valid": await c.get("/auth/token/valid", headers=alice),
                "junk": await c.get("/info/", headers={"Authorization": "Bearer not.a.token"}),
                "scheme": await c.get("/info/", headers={"Authorization": "Digest x"}),
            }

    r = _run(go())
    assert r["info"].status_code == 200 and r["basic"].status_code == 200
    assert r["bad_basic"].status_code == 401
    assert r["train_alice"].status_code == 403 and "admin role" in r["train_alice"].json()["detail"]
    assert r["train_admin"].status_code == 200
    assert r["valid"].json()["username"] == "alice" and r["valid"].json()["role"] == ANNOTATOR
    assert r["junk"].status_code == 401 and "not valid" in r["junk"].json()["detail"]
    assert r["scheme"].status_code == 401 and "unsupported" in r["scheme"].json()["detail"]


def test_tokens_expire_cannot_be_forged_and_follow_user_changes(guarded, tmp_path):
    g = guarded
    from lib.server.users import User

    expired = TokenIssuer(g["dir"], hours=-1).issue(User("alice", ANNOTATOR))["access_token"]
    (tmp_path / "other").mkdir()
    forged = TokenIssuer(tmp_path / "other").issue(User("alice", ADMIN))["access_token"]
    alice = _bearer(g, "alice")

    async def get(path, headers, method="GET"):
        async with _client(g) as c:
            return await c.request(method, path, headers=headers)

    r = _run(get("/info/", {"Authorization": f"Bearer {expired}"}))
    assert r.status_code == 401 and "expired" in r.json()["detail"]
    assert _run(get("/info/", {"Authorization": f"Bearer {forged}"})).status_code == 401
    assert _run(get("/train/x", alice, "POST")).status_code == 403
    g["users"].set_user("alice", ADMIN)  # promoted: the same token now may train
    assert _run(get("/train/x", alice, "POST")).status_code == 200
    g["users"].remove("alice")
    r = _run(get("/info/", alice))
    assert r.status_code == 401 and "no longer exists" in r.json()["detail"]


def test_saved_label_records_the_logged_in_user_not_the_claimed_one(guarded):
    g = guarded
    alice = _bearer(g, "alice")

    async def go():
        async with _client(g) as c:
            return await c.put("/datastore/label?image=x&user=mallory", headers=alice,
                               files={"label": ("l.nii.gz", b"0123", "application/octet-stream")})

    r = _run(go())
    assert r.status_code == 200 and g["seen"]["user"] == "alice"


def test_repeated_failed_logins_are_slowed_down(guarded):
    codes = [_login(guarded, "alice", f"guess-number-{i}").status_code for i in range(10)]
    assert codes[:8] == [401] * 8 and codes[-1] == 429, codes
    assert _login(guarded, "alice", guarded["alice"]).status_code == 429  # even the right one, for a while


def test_oversized_uploads_get_413_and_reach_no_endpoint(guarded):
    g = guarded
    alice = _bearer(g, "alice")
    big = b"x" * (200 * 1024)
    form = (b'--b0und\r\nContent-Disposition: form-data; name="label"; filename="l.nii.gz"\r\n'
            b"Content-Type: application/octet-stream\r\n\r\n" + big + b"\r\n--b0und--\r\n")

    async def chunks():  # no Content-Length: the limit must be found while reading
        for i in range(0, len(form), 16 * 1024):
            yield form[i:i + 16 * 1024]

    async def go():
        async with _client(g) as c:
            declared = await c.put("/datastore/label?image=x", headers=alice,
                                   files={"label": ("l.nii.gz", big, "application/octet-stream")})
            streamed = await c.put("/datastore/label?image=x", headers={**alice, "content-type": "multipart/form-data; boundary=b0und"},
                                   content=chunks())
            small = await c.put("/datastore/label?image=x", headers=alice,
                                files={"label": ("l.nii.gz", b"abc", "application/octet-stream")})
            return declared, streamed, small

    declared, streamed, small = _run(go())
    for r in (declared, streamed):
        assert r.status_code == 413 and "too large" in r.json()["detail"], r.text
    assert small.status_code == 200 and g["seen"]["label_bytes"] == 3


def test_busy_server_answers_503_with_retry_after_and_serves_the_admitted(guarded):
    """Two inferences may run or wait; the rest are refused at once, and /info still answers meanwhile
    (the blocking endpoint runs in a worker thread, not on the event loop)."""
    g = guarded
    alice = _bearer(g, "alice")

    async def go():
        async with _client(g) as c:
            slow = [asyncio.create_task(c.post("/infer/m", headers=alice, data={"params": '{"sleep": 1.5}'}))
                    for _ in range(2)]
            await asyncio.sleep(0.3)
            t = time.monotonic()
            extra = await c.post("/infer/m", headers=alice, data={"params": "{}"})
            info = await c.get("/info/", headers=alice)
            info_s = time.monotonic() - t
            done = await asyncio.gather(*slow)
            after = await c.post("/infer/m", headers=alice, data={"params": "{}"})
            return done, extra, info, info_s, after

    done, extra, info, info_s, after = _run(go())
    assert [r.status_code for r in done] == [200, 200]
    assert extra.status_code == 503 and int(extra.headers["retry-after"]) >= 1
    assert "busy" in extra.json()["detail"]
    assert info.status_code == 200 and info_s < 1.0, info_s
    assert after.status_code == 200 and g["admission"].in_flight == 0


def test_proxy_guard_on_the_real_app(client):
    """A local studies folder has no DICOMweb to proxy (MONAI Label answered 500); static routes serve no
    file outside their package folders."""
    r = client.get("/proxy/dicom/qido/studies")
    assert r.status_code == 404 and "DICOMweb datastore" in r.json()["detail"]
    for path in ("/ohif/../../../../etc/passwd", "/ohif/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
                 "/static/../../../../etc/passwd", "/ohif/..%2f..%2f..%2f..%2fetc%2fpasswd"):
        r = client.get(path)
        assert "root:" not in r.text, path


def test_proxy_guard_refuses_dot_segments():
    from lib.server.proxy_guard import ProxyGuard

    app = FastAPI()

    @app.get("/proxy/dicom/{op}/{path:path}")
    async def proxy(op: str, path: str):
        return {"path": path}

    guard = ProxyGuard(app, dicomweb=True)

    async def go():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=guard), base_url="http://s") as c:
            return [await c.get(p) for p in ("/proxy/dicom/wado/studies/1.2.3",
                                             "/proxy/dicom/wado/studies/%2e%2e/%2e%2e/tools/reset",
                                             "/proxy/dicom/wado/studies/%252e%252e/system")]

    ok, dots, double = asyncio.run(go())
    assert ok.status_code == 200
    for r in (dots, double):
        assert r.status_code == 400 and "'..'" in r.json()["detail"]
