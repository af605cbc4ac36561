"""A development PACS: Orthanc (Debian's ``orthanc`` + ``orthanc-dicomweb``), reachable on loopback only.

Orthanc 1.10 has no bind-address option and listens on every interface. So it runs in a network
namespace of its own (``ip netns``), which has nothing but its own loopback, and two ``socat``
bridges listening on the host's ``127.0.0.1`` only carry its HTTP (REST + DICOMweb) and DICOM ports
into it. Nothing of it is reachable from another host.

* Authentication is on: one user, with a random password kept in ``<folder>/credentials.json``
  (mode 0600), never printed or logged.
* Its storage, index, configuration, log and state live in ``<folder>``, never a system path.
* :meth:`OrthancPACS.start` waits until the REST API answers an authenticated request, and
  :meth:`OrthancPACS.stop` ends Orthanc and the bridges and removes the namespace.

Needs root (network namespaces) and the Debian packages ``orthanc orthanc-dicomweb socat iproute2``.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from ..private_files import write_private_json

__all__ = ["OrthancPACS", "PACSError"]

DICOMWEB_PLUGIN = "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"
INNER_HTTP, INNER_DICOM = 8042, 4242  # inside the namespace


class PACSError(RuntimeError):
    """The development PACS could not be started, reached or stopped; the message says why."""


@dataclass
class OrthancPACS:
    """Orthanc in ``folder``; HTTP on ``127.0.0.1:http_port``, DICOM on ``127.0.0.1:dicom_port``."""

    folder: Path
    http_port: int = 8042
    dicom_port: int = 4242
    aet: str = "CDPDNETPACS"
    user: str = "cdpdnet"

    def __post_init__(self):
        self.folder = Path(self.folder).resolve()

    # -- where things are -------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        return f"{self.url}/dicom-web"

    @property
    def namespace(self) -> str:
        return "cdpdnet-pacs-" + hashlib.sha1(str(self.folder).encode()).hexdigest()[:8]

    @property
    def password(self) -> str:
        return self._credentials()["password"]

    @property
    def auth(self) -> tuple[str, str]:
        return self.user, self.password

    def _credentials(self) -> dict:
        path = self.folder / "credentials.json"
        if not path.is_file():
            write_private_json(path, {"user": self.user, "password": secrets.token_urlsafe(18)})
        return json.loads(path.read_text())

    def _config(self) -> dict:
        db = self.folder / "db"
        return {
            "Name": self.aet,
            "StorageDirectory": str(db),
            "IndexDirectory": str(db),
            "Plugins": [DICOMWEB_PLUGIN],
            "HttpPort": INNER_HTTP,
            "DicomPort": INNER_DICOM,
            "DicomAet": self.aet,
            "DicomCheckCalledAet": False,
            "RemoteAccessAllowed": False,  # the bridges connect from the namespace's own loopback
            "AuthenticationEnabled": True,
            "RegisteredUsers": {self.user: self.password},
            "StableAge": 5,
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                         "Ssl": False, "StudiesMetadata": "Full", "SeriesMetadata": "Full"},
        }

    # -- life cycle -------------------------------------------------------------------------
    def _state_path(self) -> Path:
        return self.folder / "state.json"

    def is_running(self) -> bool:
        state = self._state()
        return bool(state) and all(_alive(p) for p in state["pids"])

    def _state(self) -> dict:
        try:
            return json.loads(self._state_path().read_text())
        except (OSError, ValueError):
            return {}

    def start(self, timeout: float = 60.0) -> OrthancPACS:
        missing = [b for b in ("Orthanc", "socat", "ip") if shutil.which(b) is None]
        if missing or not Path(DICOMWEB_PLUGIN).is_file():
            raise PACSError(f"missing {', '.join(missing) or DICOMWEB_PLUGIN}: install the Debian packages "
                            "orthanc orthanc-dicomweb socat iproute2 (scripts/setup.sh does, as root)")
        if os.geteuid() != 0:
            raise PACSError("the development PACS runs Orthanc in a network namespace, which needs root")
        if self.is_running():
            return self
        self.stop()  # leftovers of a crashed run
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "db").mkdir(exist_ok=True)
        cfg = self.folder / "orthanc.json"
        write_private_json(cfg, self._config())  # holds the password
        ns = self.namespace
        _run(["ip", "netns", "add", ns])
        _run(["ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up"])
        log = open(self.folder / "orthanc.log", "ab")
        procs = [subprocess.Popen(["ip", "netns", "exec", ns, "Orthanc", str(cfg)], stdout=log, stderr=log,
                                  stdin=subprocess.DEVNULL, start_new_session=True)]
        for outer, inner in ((self.http_port, INNER_HTTP), (self.dicom_port, INNER_DICOM)):
            procs.append(subprocess.Popen(
                ["socat", f"TCP-LISTEN:{outer},bind=127.0.0.1,fork,reuseaddr",
                 f'EXEC:"ip netns exec {ns} socat STDIO TCP:127.0.0.1:{inner}"'],
                stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True))
        self._state_path().write_text(json.dumps({"namespace": ns, "pids": [p.pid for p in procs]}))
        try:
            self._wait_ready(procs, timeout)
        except PACSError:
            self.stop()
            raise
        return self

    def _wait_ready(self, procs, timeout: float) -> None:
        import requests

        deadline = time.monotonic() + timeout
        last = "no answer"
        while time.monotonic() < deadline:
            dead = [p for p in procs if p.poll() is not None]
            if dead:
                raise PACSError(f"Orthanc or a bridge exited (code {dead[0].returncode}); "
                                f"see {self.folder / 'orthanc.log'}")
            try:
                r = requests.get(f"{self.url}/system", auth=self.auth, timeout=2)
                if r.status_code == 200:
                    return
                last = f"HTTP {r.status_code}"
            except requests.RequestException as e:
                last = type(e).__name__
            time.sleep(0.3)
        raise PACSError(f"Orthanc did not answer on {self.url} within {timeout:g} s ({last}); "
                        f"see {self.folder / 'orthanc.log'}")

    def stop(self) -> None:
        state = self._state()
        for pid in state.get("pids", []):
            try:
                os.killpg(pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in state.get("pids", []):
            _wait_gone(pid, 10.0)
        ns = state.get("namespace", self.namespace)
        if ns in _run(["ip", "netns", "list"], check=False):
            for pid in _run(["ip", "netns", "pids", ns], check=False).split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run(["ip", "netns", "del", ns], check=False)
        self._state_path().unlink(missing_ok=True)


def _run(cmd: list[str], check: bool = True) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise PACSError(f"{' '.join(cmd)} failed: {r.stderr.strip()}")
    return r.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie child of ours counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _alive(pid) and time.monotonic() < deadline:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    if _alive(pid):
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
