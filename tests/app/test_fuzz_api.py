"""Fuzzing the REST API from its own OpenAPI description (schemathesis + hypothesis), on a real server
with authentication on, as an annotator: every generated request must get an answer below 500, a 4xx
must carry a message, the server must keep serving, and the studies folder must be unchanged.

The run's counts (per operation and status) go to ``test-artifacts/fuzz-api-summary.json``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
import requests
from conftest import REPO
from test_app_server import STARTUP_TIMEOUT, _start_server, _tail, _wait_for

EXAMPLES_PER_OPERATION = 25


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != ".lock"}


@pytest.mark.slow
def test_fuzz_rest_api_as_annotator(tmp_path, phantoms, tiny_checkpoint):
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    from lib.server.users import UserStore

    auth_dir = tmp_path / "auth"
    users = UserStore(auth_dir)
    users.initialise()
    password = users.set_user("fuzzer", "annotator")
    proc, port, log, studies, model_dir = _start_server(tmp_path, phantoms, tiny_checkpoint, auth=True,
                                                        conf={"auth_dir": auth_dir, "max_upload_mb": 16})
    url = f"http://127.0.0.1:{port}"
    counts: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    try:
        _wait_for(lambda: requests.get(f"{url}/auth/", timeout=5).ok, STARTUP_TIMEOUT, "/auth/", proc, log)
        token = requests.post(f"{url}/auth/token", data={"username": "fuzzer", "password": password},
                              timeout=30).json()["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        before = _snapshot(studies)
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        session = requests.Session()
        operations = [r.ok() for r in schema.get_all_operations()]
        assert len(operations) > 30, len(operations)
        for op in operations:
            label = f"{op.method.upper()} {op.path}"
            seen = counts.setdefault(label, {})

            @settings(max_examples=EXAMPLES_PER_OPERATION, derandomize=True, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy())
            def run(case):
                try:
                    r = case.call(base_url=url, session=session, headers=headers, timeout=120)
                    status = r.status_code
                except requests.RequestException as e:
                    status = f"no answer ({type(e).__name__})"
                seen[str(status)] = seen.get(str(status), 0) + 1
                if not isinstance(status, int) or status >= 500:
                    failures.append(f"{label}: {status} for {case.path_parameters} {case.query} "
                                    f"{str(case.body)[:200]}: {getattr(r, 'text', '')[:300]}")
                elif 400 <= status < 500 and op.method.upper() != "HEAD":  # HEAD answers have no body
                    try:
                        detail = r.json().get("detail")
                    except ValueError:
                        detail = None
                    if not detail:
                        failures.append(f"{label}: {status} without a message: {r.text[:200]}")

            run()
        assert requests.get(f"{url}/info/", headers=headers, timeout=60).status_code == 200
        after = _snapshot(studies)
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
        out = REPO / "test-artifacts"
        out.mkdir(exist_ok=True)
        total = sum(sum(v.values()) for v in counts.values())
        (out / "fuzz-api-summary.json").write_text(json.dumps({"cases": total, "by_operation": counts,
                                                               "failures": failures}, indent=2))
        print(f"\nREST API fuzz: {total} cases over {len(counts)} operations")
        for label, seen in sorted(counts.items()):
            print(f"  {label:45s} {seen}")
    assert not failures, f"{len(failures)} bad answers of {total}:\n" + "\n".join(failures[:40])
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"studies folder changed: {changed[:20]}"
