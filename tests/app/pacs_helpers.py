"""Shared by the PACS, DICOM listener and OHIF tests: the demo series, dcmtk's storescu, a real server
on a DICOMweb datastore."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import requests
from conftest import APP_DIR, REPO
from test_app_server import _free_port, _wait_for

from lib.pacs import OrthancPACS

SERIES_DIR = REPO / "data" / "demo" / "dicom" / "totalseg_example_ct_dicom_pacs"
STORESCU = "/usr/bin/storescu"  # dcmtk's (Debian); pynetdicom puts another storescu into the venv


def fetch_demo_series() -> Path:
    """The demo CT series (20 slices) with its UIDs filled in; fetched like the README's demo does."""
    if not SERIES_DIR.is_dir():
        r = subprocess.run([sys.executable, str(REPO / "scripts" / "fetch_demo_data.py"), "--out",
                            str(REPO / "data" / "demo")], capture_output=True, text=True, timeout=1800)
        assert r.returncode == 0, f"fetching the demo data failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    assert len(list(SERIES_DIR.iterdir())) == 20
    return SERIES_DIR


def _storescu(pacs: OrthancPACS, folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run([STORESCU, "-aec", pacs.aet, "+sd", "+r", "127.0.0.1", str(pacs.dicom_port), str(folder)],
                          capture_output=True, text=True, timeout=120)


def start_dicomweb_server(tmp_path: Path, pacs: OrthancPACS, checkpoint, preset: str = "tiny", auth: bool = False):
    """A real ``monailabel.main start_server`` on ``pacs`` over DICOMweb (own session, free port, PATH
    without the venv: dcmqi must be found next to the interpreter). The PACS password reaches the app
    through ``--conf dicomweb_credentials`` (the PACS folder's credentials file), never the environment.
    Authentication is off unless ``auth`` (then the auth folder is ``tmp_path/auth``). Returns
    ``(proc, url, log)`` once the server answers."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "pretrained_cdpdnet.pt").write_bytes(Path(checkpoint).read_bytes())
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    env.update({"HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONUNBUFFERED": "1",
                "MONAI_LABEL_AUTO_UPDATE_SCORING": "false", "HOME": str(tmp_path),
                "MONAI_LABEL_DICOMWEB_CACHE_PATH": str(tmp_path / "dicom-cache")})
    env.pop("PYTHONPATH", None)
    env["PATH"] = "/usr/bin:/bin"
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies",
           pacs.dicomweb_url, "--conf", "models", "cdpdnet", "--conf", "preset", preset, "--conf", "model_dir",
           str(model_dir), "--conf", "device", "cpu", "--host", "127.0.0.1", "--port", str(port),
           "--conf", "dicomweb_credentials", str(pacs.folder / "credentials.json"),
           "--conf", "auth", "true" if auth else "false", "--conf", "auth_dir", str(tmp_path / "auth")]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path),
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: requests.get(f"{url}/auth/" if auth else f"{url}/info/", timeout=5).ok, 300,
                  "server start", proc, log)
    except BaseException:
        stop_server(proc)
        raise
    return proc, url, log


def stop_server(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
