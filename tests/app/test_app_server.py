"""A real server process (``python -m monailabel.main start_server``) driven by MONAI Label's Python client."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import nibabel as nib
import pytest
from conftest import APP_DIR, make_studies

STARTUP_TIMEOUT = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(fn, timeout, what, proc=None, log=None):
    t = time.time()
    while time.time() - t < timeout:
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"server exited ({proc.returncode}) while waiting for {what}:\n{_tail(log)}")
        try:
            out = fn()
            if out:
                return out
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(1.0)
    pytest.fail(f"timed out waiting for {what}:\n{_tail(log)}")


def _tail(log, n=60) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-n:])
    except Exception:  # noqa: BLE001
        return ""


def _start_server(tmp_path, phantoms, tiny_checkpoint, auth: bool = False, conf: dict | None = None):
    """A real ``monailabel.main start_server`` process (own session) on a free loopback port, tiny model,
    auto-scoring off, PYTHONPATH removed (the app must find lib/ and cdpdnet on its own). Authentication
    is off unless ``auth`` (then it is left at the app's default, on); ``conf``: more ``--conf`` pairs."""
    studies = make_studies(tmp_path / "studies", phantoms)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_checkpoint, model_dir / "pretrained_cdpdnet.pt")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
    env.update({"HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONUNBUFFERED": "1",
                "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
    env.pop("PYTHONPATH", None)
    cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", str(studies),
           "--conf", "models", "cdpdnet", "--conf", "preset", "tiny", "--conf", "model_dir", str(model_dir),
           "--conf", "device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    if not auth:
        cmd += ["--conf", "auth", "false"]
    for k, v in (conf or {}).items():
        cmd += ["--conf", k, str(v)]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(tmp_path),
                                start_new_session=True)
    return proc, port, log, studies, model_dir


@pytest.mark.slow
def test_real_server_with_monailabel_client(tmp_path, phantoms, tiny_checkpoint):
    from monailabel.client import MONAILabelClient
    from monailabel.client.client import MONAILabelClientException

    proc, port, log, studies, model_dir = _start_server(tmp_path, phantoms, tiny_checkpoint)
    try:
        client = MONAILabelClient(f"http://127.0.0.1:{port}", tmpdir=str(tmp_path / "client"))
        info = _wait_for(client.info, STARTUP_TIMEOUT, "/info", proc, log)
        assert info["models"]["cdpdnet"]["type"] == "segmentation"
        assert info["models"]["cdpdnet_prompt"]["type"] == "vista3d"
        assert len(info["models"]["cdpdnet"]["labels"]) == 32
        v1 = info["cdpdnet"]["model_version"]

        sample = client.next_sample("first", {})
        image_id = sample["id"]
        assert image_id in ("ph_bad", "ph_save", "ph_unlabelled_a", "ph_unlabelled_b")

        label_file, result = client.infer("cdpdnet", image_id, {})
        img = nib.load(str(studies / f"{image_id}.nii.gz"))
        lab = nib.load(label_file)
        assert lab.shape == img.shape and result["model_version"] == v1

        _, result = client.infer("cdpdnet_prompt", image_id, {"text": "liver, spleen"})
        assert result["requested_rois"] == ["spleen", "liver"]
        with pytest.raises(MONAILabelClientException) as e:
            client.infer("cdpdnet_prompt", image_id, {"text": "banana"})
        assert "422" in str(e.value.msg) and "closest ROIs" in str(e.value.msg)

        saved = client.save_label(image_id, label_file, tag="final",
                                  params={"label_info": [{"name": "liver", "idx": 6}]})
        assert "liver" in saved["annotated"]

        nxt = client.next_sample("random", {})
        assert nxt["id"] != image_id

        # scoring in MONAI Label's background subprocess; the server sees its results (datastore reload)
        import requests

        url = f"http://127.0.0.1:{port}"
        r = requests.post(f"{url}/scoring/cdpdnet_uncertainty", json={"images": ["ph_kidneys", "ph_unlabelled_b"]})
        assert r.status_code == 200, r.text
        done = _wait_for(lambda: (s := requests.get(f"{url}/scoring/").json()).get("status") not in
                         ("SUBMITTED", "RUNNING") and s, STARTUP_TIMEOUT, "scoring", proc, log)
        assert done["status"] == "DONE", done
        nxt = _wait_for(lambda: (n := client.next_sample("cdpdnet_uncertainty", {})).get("scored") and n, 30,
                        "scores visible to the server", proc, log)
        assert nxt["id"] == "ph_unlabelled_b"
        nxt = client.next_sample("cdpdnet_missing_rois", {"labelled_only": True})
        assert nxt["id"] == "ph_kidneys" and nxt["scored"] is True
        assert "kidney_right" in nxt["annotated_rois"] and "kidney_right" not in nxt["missing_rois"]
        assert set(nxt["fill_in_rois"]) <= set(nxt["missing_rois"])

        client.train_start("cdpdnet", {"max_epochs": 1, "iterations_per_epoch": 1, "val_split": 0})
        status = _wait_for(lambda: (s := client.train_status()) and s.get("status") not in ("SUBMITTED", "RUNNING")
                           and s, STARTUP_TIMEOUT, "training", proc, log)
        assert status["status"] == "DONE", status
        _, result = client.infer("cdpdnet", image_id, {})
        assert result["model_version"] != v1 and result["model_version"] == client.info()["cdpdnet"]["model_version"]
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        try:  # also whatever the server spawned meanwhile (train/scoring subprocesses share its group)
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)


@pytest.mark.slow
def test_background_tasks_die_with_the_server(tmp_path, phantoms, tiny_checkpoint):
    """Killing the server must not leave its training/scoring subprocess running (PR_SET_PDEATHSIG)."""
    import psutil
    import requests

    proc, port, log, _, _ = _start_server(tmp_path, phantoms, tiny_checkpoint)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_for(lambda: requests.get(f"{url}/info/", timeout=5).ok, STARTUP_TIMEOUT, "/info",
                  proc, log)
        r = requests.post(f"{url}/train/cdpdnet", json={"max_epochs": 1000, "max_minutes": 10}, timeout=30)
        assert r.status_code == 200, r.text

        def worker():
            kids = [p for p in psutil.Process(proc.pid).children(recursive=True)
                    if "interfaces.utils.app" in " ".join(p.cmdline())]
            assert kids, "no training subprocess yet"
            return kids

        kids = _wait_for(worker, 60, "training subprocess", proc, log)
        proc.send_signal(signal.SIGKILL)  # the harshest way the server can go
        proc.wait(timeout=30)
        gone, alive = psutil.wait_procs(kids, timeout=60)
        assert not alive, f"orphaned background tasks: {[p.pid for p in alive]}\n{_tail(log)}"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
