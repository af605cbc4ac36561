"""Authentication as a new site gets it: a real server started without any auth option has it on,
creates its first admin, and MONAI Label's Python client logs in as an annotator or an admin."""

from __future__ import annotations

import base64
import os
import signal
import stat
import subprocess
import sys

import pytest
import requests
from conftest import REPO
from test_app_server import STARTUP_TIMEOUT, _start_server, _tail, _wait_for


@pytest.mark.slow
def test_real_server_has_auth_on_by_default_with_roles(tmp_path, phantoms, tiny_checkpoint):
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    auth_dir = tmp_path / "auth"
    proc, port, log, studies, model_dir = _start_server(tmp_path, phantoms, tiny_checkpoint, auth=True,
                                                        conf={"auth_dir": auth_dir})
    url = f"http://127.0.0.1:{port}"
    secrets_seen = []
    try:
        _wait_for(lambda: requests.get(f"{url}/auth/", timeout=5).ok, STARTUP_TIMEOUT, "/auth/", proc, log)
        note = auth_dir / "initial-admin-password"
        assert stat.S_IMODE(note.stat().st_mode) == 0o600
        assert stat.S_IMODE((auth_dir / "users.json").stat().st_mode) == 0o600
        admin_pw = note.read_text().strip()
        secrets_seen.append(admin_pw)

        # nothing but the login without credentials
        for method, path in (("GET", "/info/"), ("GET", "/datastore/?output=all"), ("POST", "/train/cdpdnet"),
                             ("GET", "/datastore/image?image=ph_liver"), ("GET", "/logs/"), ("POST", "/reload"),
                             ("GET", "/ohif/")):
            r = requests.request(method, url + path, timeout=30)
            assert r.status_code == 401, (method, path, r.status_code, r.text[:200])
        assert "POST /auth/token" in requests.get(f"{url}/info/", timeout=30).json()["detail"]

        add = subprocess.run([sys.executable, str(REPO / "scripts" / "users.py"), "--auth-dir", str(auth_dir), "add",
                              "alice", "--role", "annotator"], capture_output=True, text=True, timeout=60)
        assert add.returncode == 0, add.stderr
        alice_pw = add.stdout.strip().rsplit(" ", 1)[-1]
        secrets_seen.append(alice_pw)

        alice = MONAILabelClient(url, tmpdir=str(tmp_path / "alice"))
        assert alice.auth_enabled()
        with pytest.raises(MONAILabelClientException):
            alice.auth_token("alice", "not-her-password")
        token = alice.auth_token("alice", alice_pw)
        secrets_seen.append(token["access_token"])
        alice.update_auth(token)
        assert alice.auth_valid_token()
        info = alice.info()
        assert len(info["models"]["cdpdnet"]["labels"]) == 32
        label_file, result = alice.infer("cdpdnet", "ph_unlabelled_a", {})
        assert result["model_version"] == info["cdpdnet"]["model_version"]
        saved = alice.save_label("ph_unlabelled_a", label_file, tag="final")
        assert saved["label"]
        assert alice.next_sample("random", {})["id"]
        with pytest.raises(MONAILabelClientException) as e:  # annotators do not train ...
            alice.train_start("cdpdnet", {"max_epochs": 1})
        assert "403" in str(e.value.msg) and "admin role" in str(e.value.msg)
        hdr = {"Authorization": f"Bearer {token['access_token']}"}
        r = requests.delete(f"{url}/datastore/image", params={"id": "ph_liver"}, headers=hdr, timeout=30)
        assert r.status_code == 403  # ... and do not delete
        assert (studies / "ph_liver.nii.gz").is_file()
        r = requests.get(f"{url}/logs/", headers=hdr, timeout=30)
        assert r.status_code == 403

        # a browser (OHIF) with HTTP Basic credentials
        basic = {"Authorization": "Basic " + base64.b64encode(f"alice:{alice_pw}".encode()).decode()}
        r = requests.get(f"{url}/ohif/", headers=basic, timeout=30)
        assert r.status_code == 200 and "<html" in r.text.lower()

        admin = MONAILabelClient(url, tmpdir=str(tmp_path / "admin"))
        tok = admin.auth_token("admin", admin_pw)
        secrets_seen.append(tok["access_token"])
        admin.update_auth(tok)
        admin.train_start("cdpdnet", {"max_epochs": 1, "iterations_per_epoch": 1, "val_split": 0})
        status = _wait_for(lambda: (s := admin.train_status()) and s.get("status") not in ("SUBMITTED", "RUNNING")
                           and s, STARTUP_TIMEOUT, "training", proc, log)
        assert status["status"] == "DONE", status
        assert alice.info()["cdpdnet"]["model_version"] != info["cdpdnet"]["model_version"]

        text = log.read_text(errors="replace")
        assert "audit: alice (annotator) PUT /datastore/label -> 200" in text
        assert "audit: alice (annotator) POST /train/cdpdnet -> 403" in text
        for s in secrets_seen:  # passwords and tokens never reach the log
            assert s not in text
        logs_dir = REPO / "apps" / "cdpdnet" / "logs"
        for f in logs_dir.glob("*.log*") if logs_dir.is_dir() else []:
            body = f.read_text(errors="replace")
            for s in secrets_seen:
                assert s not in body, f
    except BaseException:
        print(_tail(log, 80))
        raise
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
