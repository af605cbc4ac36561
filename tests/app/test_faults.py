"""Faults: processes killed at any point, a full disk, corrupt or foreign checkpoints.

* Publishing a model and saving a label are SIGKILLed at each of their steps (deterministic hooks in a
  subprocess), and a real server's training subprocess and the whole server (during a label save) are
  SIGKILLed at seeded random points: the served model is always a complete, loadable version described
  by its sidecar, labels are the old or the new file (never a part), and the server restarts into a
  consistent state.
* A real tmpfs that is full: publishing and label saving fail with a clear error (507 ``no space left``
  over HTTP), leave the previous file and leave no partial file.
* Truncated, random, foreign, malicious and incompatible checkpoints are refused by ``load_checkpoint``,
  by ``PUT /model/cdpdnet`` (422, served model unchanged) and at start-up (``init_error`` in ``/info``).

The tmpfs tests mount with ``mount -t tmpfs`` (root); they fail, never skip, where that is impossible.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import pickle
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import APP_DIR, REPO, make_studies, write_nifti
from test_app_server import STARTUP_TIMEOUT, _free_port, _tail, _wait_for

from cdpdnet.checkpoint import FORMAT, CheckpointError, load_checkpoint, save_checkpoint

PAGE = 4096
VERSION_RE = re.compile(r"^cdpdnet-v\d{4,}\.pt$")
SEED = 20240611


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def assert_store_consistent(model_dir: Path, load_segmenter: bool = True) -> str:
    """The served model is a complete, loadable version, described by the sidecar; every version file
    loads; temp files are hidden and never listed as versions. Returns the served version."""
    from lib.model_store import ModelStore

    store = ModelStore(model_dir)
    published = model_dir / "cdpdnet.pt"
    assert published.is_file(), f"no served model in {model_dir}: {sorted(p.name for p in model_dir.iterdir())}"
    ck = load_checkpoint(published)  # raises CheckpointError on a partial file
    served = ck["model_version"]
    assert VERSION_RE.match(f"{served}.pt"), served
    side = json.loads((model_dir / "cdpdnet.json").read_text())  # parses
    assert isinstance(side, dict)
    cur = store.current()
    assert cur["version"] == served, f"the sidecar describes {cur.get('version')!r} but {served} is served: {side}"
    names = store.version_names()
    assert served in names, f"served {served} is not among the versions {names}"
    assert published.read_bytes() == (model_dir / "versions" / f"{served}.pt").read_bytes(), \
        "cdpdnet.pt is not a full copy of its version file"
    for p in sorted((model_dir / "versions").iterdir()):
        if VERSION_RE.match(p.name):
            assert load_checkpoint(p)["model_version"] == p.stem
        else:
            assert p.name.startswith(".") and p.name.endswith(".tmp"), f"stray file among the versions: {p.name}"
            assert p.stem not in names
    for p in model_dir.iterdir():
        assert p.name in ("cdpdnet.pt", "cdpdnet.json", "pretrained_cdpdnet.pt", "versions", "cdpdnet") or \
            p.name.startswith("."), f"stray file in the model folder: {p.name}"
    if load_segmenter:
        from cdpdnet.inference import Segmenter

        assert Segmenter(published).loaded.version == served
    return served


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp")) if folder.is_dir() else []


@contextlib.contextmanager
def tmpfs(path: Path, size_kb: int):
    """A real, small tmpfs at ``path`` (root needed); the test fails (not skips) where it cannot be mounted."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={int(size_kb)}k,mode=0755", "tmpfs", str(path)],
                           capture_output=True, text=True, timeout=30)
    except FileNotFoundError as e:
        pytest.fail(f"cannot mount a tmpfs for the disk-full test: {e}")
    if r.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs at {path} for the disk-full test (needs root or CAP_SYS_ADMIN): "
                    f"{(r.stderr or r.stdout).strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True, timeout=30)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> None:
    """Fill the file system of ``path`` (a tmpfs) with a filler file so that ``leave`` bytes stay free."""
    filler = path / "filler"
    if filler.exists():
        filler.unlink()
    n = free_bytes(path) - leave
    assert n >= 0, f"only {free_bytes(path)} bytes free in {path}, cannot leave {leave}"
    with open(filler, "wb") as f:
        f.write(b"\0" * n)
    assert free_bytes(path) == leave, (free_bytes(path), leave)


def pages(n_bytes: int) -> int:
    return -(-n_bytes // PAGE)


def frames(exc: BaseException) -> list[str]:
    """Function names of an exception's traceback and of the exceptions it was raised from."""
    out = []
    while exc is not None:
        out += [f.f_code.co_name for f, _ in traceback.walk_tb(exc.__traceback__)]
        exc = exc.__cause__ or exc.__context__
    return out


def run_py(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_FILE_STORE": "true"}
    return subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=str(REPO))


# The hooks: SIGKILL the process itself at a chosen step. ``os.replace`` is the commit point of every
# atomic write, so "before/after the n-th os.replace" walks a save or publish through its steps.
KILL_HOOKS = r'''
import os, shutil, signal, sys

def _die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def install_kill_hook(step):
    if step.startswith(("before_replace_", "after_replace_")):
        nth = int(step.rsplit("_", 1)[1])
        orig = os.replace
        calls = [0]
        def replace(src, dst, *a, **k):
            calls[0] += 1
            if calls[0] == nth and step.startswith("before"):
                _die()
            out = orig(src, dst, *a, **k)
            if calls[0] == nth:
                _die()
            return out
        os.replace = replace
    elif step == "copy_half":  # killed while the new file is being written: half of it is on disk
        def copyfileobj(fsrc, fdst, length=0):
            data = fsrc.read()
            fdst.write(data[: len(data) // 2])
            fdst.flush()
            os.fsync(fdst.fileno())
            _die()
        def copyfile(src, dst, *a, **k):  # what shutil.copy (MONAI Label's LocalDatastore) writes with
            with open(src, "rb") as fsrc, open(dst, "wb") as fdst:
                copyfileobj(fsrc, fdst)
        shutil.copyfileobj = copyfileobj
        shutil.copyfile = copyfile
    else:
        raise SystemExit(f"unknown step {step}")
'''


# ------------------------------------------------------------------------------------------------
# 4. corrupt or foreign checkpoints
# ------------------------------------------------------------------------------------------------
class _RunsCode:
    """Unpickling this runs a shell command (creates a marker file)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _bad_checkpoints(tiny_checkpoint: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (file, words CheckpointError must contain)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = tiny_checkpoint.read_bytes()
    out = {}
    p = folder / "truncated.pt"
    p.write_bytes(data[: len(data) * 2 // 3])
    out["truncated"] = (p, "truncated")
    p = folder / "random.pt"
    p.write_bytes(np.random.default_rng(0).integers(0, 256, 50_000, dtype=np.uint8).tobytes())
    out["random bytes"] = (p, "not a PyTorch checkpoint")
    p = folder / "empty.pt"
    p.write_bytes(b"")
    out["empty"] = (p, "not a PyTorch checkpoint")
    ck = load_checkpoint(tiny_checkpoint)
    p = folder / "state_dict.pt"
    torch.save(ck["state_dict"], p)  # a plain torch state_dict (what torch.save(model.state_dict()) makes)
    out["plain state_dict"] = (p, "not a CDPDNet checkpoint")
    marker = folder / "PWNED"
    p = folder / "malicious.pt"  # a torch zip whose pickle calls os.system when loaded without weights_only
    torch.save({"format": FORMAT, "format_version": 1, "preset": {}, "tasks": [], "state_dict": {},
                "payload": _RunsCode(str(marker))}, p)
    out["malicious pickle (torch zip)"] = (p, "could not be read")
    p = folder / "malicious.pkl"  # the same as a bare pickle
    p.write_bytes(pickle.dumps(_RunsCode(str(marker))))
    out["malicious pickle (bare)"] = (p, "not a PyTorch checkpoint")
    lite = {k: v for k, v in ck.items() if k not in ("format", "format_version")}
    from cdpdnet.preset import load_preset

    lite["preset"] = load_preset("lite").to_dict()  # tiny weights, lite preset: another network
    p = folder / "incompatible_preset.pt"
    save_checkpoint(p, lite)
    out["weights of another preset"] = (p, "does not fit its preset 'lite'")
    broken = {k: v for k, v in ck.items() if k not in ("format", "format_version")}
    broken["preset"] = {**ck["preset"], "network": {**ck["preset"]["network"], "from_the_future": 1}}
    p = folder / "future_preset.pt"
    save_checkpoint(p, broken)
    out["preset this code cannot build"] = (p, "incompatible preset")
    newer = {k: v for k, v in ck.items() if k not in ("format", "format_version")}
    p = folder / "newer_format.pt"
    torch.save({"format": FORMAT, "format_version": 99, **newer}, p)
    out["newer format version"] = (p, "newer than this code")
    return out


def test_corrupt_and_foreign_checkpoints_are_refused_with_a_clear_message(tiny_checkpoint, tmp_path):
    bad = _bad_checkpoints(tiny_checkpoint, tmp_path / "bad")
    marker = tmp_path / "bad" / "PWNED"
    # the malicious files are real: loading them without weights_only runs their command (in a subprocess)
    r = run_py("import sys, torch; torch.load(sys.argv[1], weights_only=False)", bad["malicious pickle (torch zip)"][0])
    assert marker.exists(), f"the malicious test file did not run its payload when loaded unsafely: {r.stderr[-500:]}"
    marker.unlink()
    for name, (path, words) in bad.items():
        with pytest.raises(CheckpointError) as e:
            load_checkpoint(path)
        msg = str(e.value)
        assert path.name in msg, f"{name}: the message does not name the file: {msg}"
        assert words in msg, f"{name}: expected {words!r} in {msg!r}"
    assert not marker.exists(), "loading a malicious checkpoint ran its code"
    load_checkpoint(tiny_checkpoint)  # the good one still loads


def test_model_upload_validates_and_publishes(client, app_paths, tiny_checkpoint, tmp_path):
    """PUT /model/cdpdnet: every bad file is refused with 422 and its reason, the served model is unchanged;
    a good one becomes the next version (served atomically)."""
    model_dir = app_paths["model_dir"]
    published = model_dir / "cdpdnet.pt"
    before_bytes = published.read_bytes()
    before = client.get("/info/").json()["cdpdnet"]
    bad = _bad_checkpoints(tiny_checkpoint, tmp_path / "bad")
    ck = load_checkpoint(tiny_checkpoint)
    other = {k: v for k, v in ck.items() if k not in ("format", "format_version")}
    other["preset"] = {**ck["preset"], "name": "tiny_other"}  # a valid model of another preset than the served one
    save_checkpoint(tmp_path / "other_preset.pt", other)
    bad["valid, but another preset than the served one"] = (tmp_path / "other_preset.pt", "incompatible preset")
    for name, (path, words) in bad.items():
        with open(path, "rb") as f:
            r = client.put("/model/cdpdnet", files={"file": (path.name, f, "application/octet-stream")})
        assert r.status_code == 422, f"{name}: {r.status_code} {r.text[:500]}"
        detail = r.json()["detail"]
        assert detail.startswith("model refused") and words in detail and path.name in detail, f"{name}: {detail}"
        assert "served model is unchanged" in detail
        assert published.read_bytes() == before_bytes, f"{name}: the served model was changed"
    assert not (tmp_path / "bad" / "PWNED").exists(), "an uploaded malicious pickle ran its code"
    after = client.get("/info/").json()["cdpdnet"]
    assert after["model_version"] == before["model_version"] and after["versions"] == before["versions"]
    assert_store_consistent(model_dir, load_segmenter=False)

    with open(tiny_checkpoint, "rb") as f:  # a good one
        r = client.put("/model/cdpdnet", files={"file": ("good.pt", f, "application/octet-stream")})
    assert r.status_code == 200, r.text
    new = r.json()["model_version"]
    info = client.get("/info/").json()["cdpdnet"]
    assert info["model_version"] == new and info["versions"] == before["versions"] + [new]
    assert info["model_origin"] == "upload"
    assert assert_store_consistent(model_dir) == new
    r = client.post("/infer/cdpdnet?image=ph_unlabelled_a&output=json", data={"params": "{}"})
    assert r.status_code == 200, r.text
    assert r.json()["model_version"] == new


# ------------------------------------------------------------------------------------------------
# 1b. SIGKILL inside publish, at each step
# ------------------------------------------------------------------------------------------------
PUBLISH_SCRIPT = KILL_HOOKS + r'''
step, model_dir, src = sys.argv[1:4]
from lib.model_store import ModelStore
store = ModelStore(model_dir)
import torch
payload = torch.load(src, weights_only=True)  # (the payload, not the path: no network import, a faster test)
install_kill_hook(step)
store.publish(payload, "trained", run_id="killed")
print("PUBLISH RETURNED")
'''

# step -> the version served after the kill ("old" or "new")
PUBLISH_STEPS = {
    "before_replace_1": "old",  # the version file's temp is written, not renamed
    "after_replace_1": "old",   # versions/cdpdnet-v0002.pt exists, cdpdnet.pt not touched
    "copy_half": "old",         # half of the staged copy of cdpdnet.pt written
    "before_replace_2": "old",  # staged copy complete, sidecar temp written
    "after_replace_2": "old",   # sidecar describes the new file, cdpdnet.pt still the old one
    "after_replace_3": "new",   # cdpdnet.pt replaced
}


@pytest.mark.parametrize("step", list(PUBLISH_STEPS))
def test_publish_killed_at_each_step_leaves_a_consistent_store(step, tiny_checkpoint, tmp_path):
    from lib.model_store import ModelStore

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_checkpoint, model_dir / "pretrained_cdpdnet.pt")
    store = ModelStore(model_dir)
    assert store.ensure_model("tiny") == "pretrained"
    old = assert_store_consistent(model_dir, load_segmenter=False)
    old_bytes = (model_dir / "cdpdnet.pt").read_bytes()

    r = run_py(PUBLISH_SCRIPT, step, model_dir, tiny_checkpoint)
    assert r.returncode == -signal.SIGKILL, f"the publish was not killed at {step} (rc {r.returncode}):\n" \
                                            f"{r.stdout[-1000:]}\n{r.stderr[-3000:]}"
    served = assert_store_consistent(model_dir)
    if PUBLISH_STEPS[step] == "old":
        assert served == old and (model_dir / "cdpdnet.pt").read_bytes() == old_bytes
    else:
        assert served == "cdpdnet-v0002"
    # the next publish (or start-up) cleans up and continues the numbering
    v = store.publish(tiny_checkpoint, "trained")
    assert assert_store_consistent(model_dir) == v
    assert int(v[-4:]) == max(int(n[-4:]) for n in store.version_names())
    assert temp_files(model_dir) == [] and temp_files(model_dir / "versions") == []


# ------------------------------------------------------------------------------------------------
# 2b. SIGKILL inside a label save, at each step
# ------------------------------------------------------------------------------------------------
SAVE_SCRIPT = KILL_HOOKS + r'''
step, studies, image_id, label = sys.argv[1:5]
from monailabel.datastore.local import LocalDatastore
from lib.datastore import guard_datastore
ds = guard_datastore(LocalDatastore(studies, extensions=("*.nii.gz", "*.nii"), auto_reload=False))
install_kill_hook(step)
ds.save_label(image_id, label, "final", {"annotated": ["spleen", "liver"]})
print("SAVE RETURNED")
'''

SAVE_STEPS = {
    "copy_half": "old",         # half of the new label written to its temp file
    "before_replace_1": "old",  # the label's temp file complete, not renamed
    "after_replace_1": "new",   # the new label in place, the json not yet written (old info)
    "before_replace_2": "new",  # the json's temp file written
    "after_replace_2": "new",   # done
}


def _two_labels(ph) -> tuple[np.ndarray, np.ndarray]:
    a = np.zeros(ph.image.shape, np.uint8)
    a[ph.label == 6] = 6  # liver
    b = a.copy()
    b[ph.label == 1] = 1  # + spleen
    assert (a != b).any()
    return a, b


@pytest.mark.parametrize("step", list(SAVE_STEPS))
def test_label_save_killed_at_each_step_leaves_a_consistent_datastore(step, phantoms, tmp_path):
    from monailabel.datastore.local import LocalDatastore

    from lib.datastore import guard_datastore

    import nibabel as nib

    iid = "ph_save"
    ph = phantoms[iid]
    studies = tmp_path / "studies"
    studies.mkdir()
    write_nifti(ph.image.astype(np.int16), ph.affine, studies / f"{iid}.nii.gz")
    a, b = _two_labels(ph)
    write_nifti(a, ph.affine, tmp_path / "a.nii.gz")
    write_nifti(b, ph.affine, tmp_path / "b.nii.gz")
    ds = guard_datastore(LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False))
    ds.save_label(iid, str(tmp_path / "a.nii.gz"), "final", {"annotated": ["liver"]})
    json_before = (studies / "datastore_v2.json").read_text()

    r = run_py(SAVE_SCRIPT, step, studies, iid, tmp_path / "b.nii.gz")
    assert r.returncode == -signal.SIGKILL, f"the save was not killed at {step} (rc {r.returncode}):\n" \
                                            f"{r.stdout[-1000:]}\n{r.stderr[-3000:]}"
    # what a restarted server finds: the json parses, the label is the old or the new one, whole
    doc = json.loads((studies / "datastore_v2.json").read_text())
    assert doc["objects"][iid]["labels"]["final"]["info"]["name"] == f"{iid}.nii.gz"
    label_file = studies / "labels" / "final" / f"{iid}.nii.gz"
    got = np.asarray(nib.load(str(label_file)).dataobj)  # a truncated gzip would raise here
    expected = a if SAVE_STEPS[step] == "old" else b
    assert np.array_equal(got, expected), f"after a kill at {step} the label is neither the old nor the new one"
    if step in ("copy_half", "before_replace_1", "after_replace_1"):
        assert (studies / "datastore_v2.json").read_text() == json_before
    reopened = guard_datastore(LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False))
    assert reopened.get_labeled_images() == [iid]
    assert os.path.realpath(reopened.get_label_uri(iid, "final")) == os.path.realpath(label_file)
    info = reopened.get_label_info(iid, "final")
    assert info["annotated"] == (["liver"] if step in ("copy_half", "before_replace_1", "after_replace_1",
                                                       "before_replace_2") else ["spleen", "liver"])
    for folder in (studies, studies / "labels" / "final"):  # temp files of the killed save were removed
        assert temp_files(folder) == [] and not [f for f in os.listdir(folder) if f.startswith(".cdpdnet-save.")]
    reopened.save_label(iid, str(tmp_path / "b.nii.gz"), "final", {"annotated": ["spleen", "liver"]})
    assert np.array_equal(np.asarray(nib.load(str(label_file)).dataobj), b)


# ------------------------------------------------------------------------------------------------
# 3. disk full
# ------------------------------------------------------------------------------------------------
def test_publish_on_a_full_disk_raises_and_changes_nothing(tiny_checkpoint, tmp_path):
    """On a real, full tmpfs: publish fails at each of its writing steps with ENOSPC and a clear message,
    the served model, its sidecar and the versions stay as they were, and no partial file is left."""
    from lib.model_store import ModelStore

    scratch = ModelStore(tmp_path / "scratch")  # the exact size of the next version file, on a normal disk
    scratch.publish(tiny_checkpoint, "trained")
    scratch.publish(tiny_checkpoint, "trained")
    ver = pages((tmp_path / "scratch" / "versions" / "cdpdnet-v0002.pt").stat().st_size)
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, size_kb=(6 * ver + 64) * PAGE // 1024):
        model_dir = mnt / "model"
        model_dir.mkdir()
        store = ModelStore(model_dir)
        v1 = store.publish(tiny_checkpoint, "trained")
        state = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
        failed_at = {}
        # free pages: < ver, the version file cannot be written; < 2 ver, the copy next to cdpdnet.pt cannot;
        # 2 ver, the sidecar's temp file cannot (the old sidecar is still there)
        for leave in [0, ver // 2, ver - 1, ver, ver + ver // 2, 2 * ver - 1, 2 * ver]:
            fill(mnt, leave * PAGE)
            with pytest.raises(OSError) as e:
                store.publish(tiny_checkpoint, "trained")
            assert e.value.errno == errno.ENOSPC
            msg = str(e.value)
            assert "No space left on device" in msg and "served model is unchanged" in msg and v1 in msg, msg
            where = frames(e.value)
            step = "version file" if "save_checkpoint" in where else "cdpdnet.pt copy" if "_staged_copy" in where \
                else "sidecar"
            failed_at.setdefault(step, []).append(leave)
            now = {p.relative_to(model_dir): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
            assert now == state, f"a publish that failed at the {step} (free pages {leave}) changed the store"
            assert store.current_version() == v1 and store.version_names() == [v1]
        assert failed_at == {"version file": [0, ver // 2, ver - 1], "cdpdnet.pt copy": [ver, ver + ver // 2, 2 * ver - 1],
                             "sidecar": [2 * ver]}, failed_at
        (mnt / "filler").unlink()
        v2 = store.publish(tiny_checkpoint, "trained")  # with space again
        assert assert_store_consistent(model_dir) == v2 == "cdpdnet-v0002"


def test_label_save_on_a_full_disk_gives_507_and_keeps_the_old_label(phantoms, tmp_path):
    """A local datastore on a full tmpfs: the save fails with 507 'no space left' both when the label and when
    the datastore json cannot be written; the old label, the json and the listing are unchanged, no temp file."""
    from fastapi import HTTPException
    from monailabel.datastore.local import LocalDatastore

    from lib.datastore import guard_datastore

    import nibabel as nib

    iid = "ph_save"
    ph = phantoms[iid]
    a, b = _two_labels(ph)
    rng = np.random.default_rng(0)
    b = b.copy()
    b[rng.random(b.shape) < 0.3] = 3  # less compressible: several pages
    write_nifti(a, ph.affine, tmp_path / "a.nii.gz")
    write_nifti(b, ph.affine, tmp_path / "b.nii.gz")
    lab_pages = pages((tmp_path / "b.nii.gz").stat().st_size)
    assert lab_pages >= 4
    mnt = tmp_path / "mnt"
    with tmpfs(mnt, size_kb=2048):
        studies = mnt / "studies"
        studies.mkdir()
        write_nifti(ph.image.astype(np.int16), ph.affine, studies / f"{iid}.nii.gz")
        ds = guard_datastore(LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False))
        ds.save_label(iid, str(tmp_path / "a.nii.gz"), "final", {"annotated": ["liver"]})
        label_file = studies / "labels" / "final" / f"{iid}.nii.gz"
        json_path = studies / "datastore_v2.json"
        before = (label_file.read_bytes(), json_path.read_bytes())
        json_pages = pages(len(before[1]) + 200)  # the new json: a little longer than the old one
        seen = {}
        # free pages: < the label's, its temp file cannot be written; then the json's temp file cannot
        for leave in [0, lab_pages - 1, lab_pages, lab_pages + json_pages - 1]:
            fill(mnt, leave * PAGE)
            with pytest.raises(HTTPException) as e:
                ds.save_label(iid, str(tmp_path / "b.nii.gz"), "final", {"annotated": ["spleen", "liver"]})
            assert e.value.status_code == 507 and "no space left on device" in e.value.detail, e.value.detail
            assert "previous label" in e.value.detail
            seen.setdefault("json" if "_update_datastore_file" in frames(e.value) else "label", []).append(leave)
            assert (label_file.read_bytes(), json_path.read_bytes()) == before, f"free pages {leave}: changed"
            assert ds.get_label_info(iid, "final")["annotated"] == ["liver"]
            for folder in (studies, label_file.parent):
                assert temp_files(folder) == [] and not [f for f in os.listdir(folder) if f.startswith(".cdpdnet")]
            again = guard_datastore(LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False))
            assert again.get_label_info(iid, "final")["annotated"] == ["liver"]
        assert seen == {"label": [0, lab_pages - 1], "json": [lab_pages, lab_pages + json_pages - 1]}, seen
        (mnt / "filler").unlink()
        ds.save_label(iid, str(tmp_path / "b.nii.gz"), "final", {"annotated": ["spleen", "liver"]})
        assert np.array_equal(np.asarray(nib.load(str(label_file)).dataobj), b)


def test_label_save_over_http_on_a_full_disk(client, app_paths, phantoms, tmp_path):
    """PUT /datastore/label when the label folder is full: 507 naming 'no space left', old label kept."""
    iid, tag = "ph_save", "faults_disk_full"
    ph = phantoms[iid]
    a, b = _two_labels(ph)
    b = b.copy()
    b[np.random.default_rng(1).random(b.shape) < 0.3] = 3
    write_nifti(a, ph.affine, tmp_path / f"{iid}.nii.gz")
    (tmp_path / "b").mkdir()
    write_nifti(b, ph.affine, tmp_path / "b" / f"{iid}.nii.gz")
    folder = app_paths["studies"] / "labels" / tag
    try:
        with tmpfs(folder, size_kb=1024):
            with open(tmp_path / f"{iid}.nii.gz", "rb") as f:
                r = client.put(f"/datastore/label?image={iid}&tag={tag}", data={"params": "{}"},
                               files={"label": (f"{iid}.nii.gz", f, "application/octet-stream")})
            assert r.status_code == 200, r.text
            saved = folder / f"{iid}.nii.gz"
            before = saved.read_bytes()
            fill(folder, 0)
            with open(tmp_path / "b" / f"{iid}.nii.gz", "rb") as f:
                r = client.put(f"/datastore/label?image={iid}&tag={tag}", data={"params": "{}"},
                               files={"label": (f"{iid}.nii.gz", f, "application/octet-stream")})
            assert r.status_code == 507, f"{r.status_code} {r.text}"
            assert "no space left on device" in r.json()["detail"]
            assert saved.read_bytes() == before
            assert sorted(os.listdir(folder)) == ["filler", f"{iid}.nii.gz"]
            r = client.get(f"/datastore/label?label={iid}&tag={tag}")
            assert r.status_code == 200 and r.content == before
            assert client.delete(f"/datastore/label?id={iid}&tag={tag}").status_code == 200
    finally:
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# real servers
# ------------------------------------------------------------------------------------------------
class Server:
    """A real ``monailabel.main start_server`` process (own process group) on a studies folder and model folder."""

    def __init__(self, tmp_path: Path, studies: Path, model_dir: Path, name: str = "server", **conf):
        self.tmp_path, self.studies, self.model_dir, self.name, self.conf = tmp_path, studies, model_dir, name, conf
        self.proc = None
        self.starts = 0

    def start(self, wait: bool = True) -> "Server":
        import requests

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("MONAI_LABEL_")}
        env.update({"HF_HUB_OFFLINE": "1", "MLFLOW_ALLOW_FILE_STORE": "true", "PYTHONUNBUFFERED": "1",
                    "MONAI_LABEL_AUTO_UPDATE_SCORING": "false"})
        env.pop("PYTHONPATH", None)
        cmd = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies",
               str(self.studies), "--conf", "models", "cdpdnet", "--conf", "preset", "tiny", "--conf", "model_dir",
               str(self.model_dir), "--conf", "device", "cpu", "--conf", "auth", "false",
               "--host", "127.0.0.1", "--port", str(self.port)]
        for k, v in self.conf.items():
            cmd += ["--conf", k, str(v)]
        self.starts += 1
        self.log = self.tmp_path / f"{self.name}.{self.starts}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=str(self.tmp_path),
                                         start_new_session=True)
        if wait:
            _wait_for(lambda: requests.get(f"{self.url}/info/", timeout=5).ok, STARTUP_TIMEOUT, "/info",
                      self.proc, self.log)
        return self

    def kill(self) -> None:
        """SIGKILL the server and everything in its process group."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.kill()
            return
        try:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            pass
        self.kill()

    def get(self, path, **kw):
        import requests

        return requests.get(f"{self.url}{path}", timeout=kw.pop("timeout", 120), **kw)

    def infer(self, image: str = "ph_unlabelled_a"):
        import requests

        return requests.post(f"{self.url}/infer/cdpdnet?image={image}&output=json", data={"params": "{}"},
                             timeout=300)


def _trainer_process(server: Server):
    import psutil

    try:
        kids = psutil.Process(server.proc.pid).children(recursive=True)
    except psutil.Error:
        return None
    for p in kids:
        try:
            cmd = " ".join(p.cmdline())
        except psutil.Error:
            continue
        if "monailabel.interfaces.utils.app" in cmd and "-m train" in cmd:
            return p
    return None


def _log_has(server: Server, pattern: bytes, since: int) -> bool:
    try:
        return re.search(pattern, server.log.read_bytes()[since:]) is not None
    except OSError:
        return False


def _stats(model_dir: Path) -> dict:
    try:
        return json.loads((model_dir / "cdpdnet" / "train_stats.json").read_text())
    except (OSError, ValueError):
        return {}


def _wait_train_idle(server: Server, timeout=120) -> dict:
    return _wait_for(lambda: (s := server.get("/train/").json()).get("status") not in ("SUBMITTED", "RUNNING") and s,
                     timeout, "the train task to end", server.proc, server.log)


@pytest.mark.slow
def test_training_killed_at_random_points(tmp_path, phantoms, tiny_checkpoint):
    """SIGKILL the training subprocess at seeded random points of its phases (start-up, data loading and first
    iterations, mid-epoch, publish, after publish): the served model stays a complete version described by its
    sidecar, infer answers with it, the next round is not blocked and a final round publishes."""
    import psutil
    import requests

    studies = make_studies(tmp_path / "studies", phantoms)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_checkpoint, model_dir / "pretrained_cdpdnet.pt")
    server = Server(tmp_path, studies, model_dir).start()
    rng = random.Random(SEED)
    params = {"max_epochs": 4, "iterations_per_epoch": 3, "val_split": 0, "threads": 1}
    versions = model_dir / "versions"

    def start_round() -> tuple[object, int, float]:
        since = len(server.log.read_bytes())
        t = time.time()
        r = requests.post(f"{server.url}/train/cdpdnet", json=params, timeout=60)
        assert r.status_code == 200, f"a train round after a killed one was refused: {r.status_code} {r.text}"
        p = _wait_for(lambda: _trainer_process(server), 60, "the training subprocess", server.proc, server.log)
        return p, since, t

    def n_version_entries() -> int:
        return len(os.listdir(versions))

    def epoch_done(t: float) -> bool:
        s = _stats(model_dir)
        return s.get("status") == "RUNNING" and s.get("start_ts", 0) >= int(t) and s.get("epoch", 0) >= 1

    # phase -> (trigger(log offset, versions/ entries before, round start), random delay range in s):
    # when the trigger holds, wait the delay, then SIGKILL
    phases = {
        "start-up (app import, datastore)": (lambda since, n0, t: True, (0.3, 6.0)),
        "data loading / first iterations": (lambda since, n0, t: _log_has(server, rb"Training \d+ images", since),
                                            (0.0, 0.4)),
        "mid-epoch": (lambda since, n0, t: epoch_done(t), (0.0, 0.3)),
        "publish": (lambda since, n0, t: n_version_entries() > n0, (0.0, 0.0)),
        "after publish": (lambda since, n0, t: _log_has(server, rb"Training done", since), (0.0, 0.5)),
    }
    report = []
    try:
        served = assert_store_consistent(model_dir)
        for phase, (trigger, (lo, hi)) in phases.items():
            n0 = n_version_entries()
            before_versions = sorted(os.listdir(versions))
            p, since, t_round = start_round()
            t0 = time.time()
            while not trigger(since, n0, t_round):
                assert time.time() - t0 < 120, f"{phase}: the trigger never fired\n{_tail(server.log)}"
                if not p.is_running() and phase != "after publish":
                    pytest.fail(f"{phase}: the training ended before the trigger fired\n{_tail(server.log)}")
                time.sleep(0.002)
            t_fired = time.time()
            time.sleep(rng.uniform(lo, hi))
            try:
                children = p.children(recursive=True)
                p.send_signal(signal.SIGKILL)
                how = f"killed {time.time() - t_fired:.2f}s after the trigger ({time.time() - t0:.2f}s into the run)"
            except psutil.NoSuchProcess:
                children, how = [], "had exited before the kill"
            with contextlib.suppress(psutil.NoSuchProcess):
                p.wait(30)
            _, alive = psutil.wait_procs(children, timeout=30)
            assert not alive, f"{phase}: processes left by the killed training: {alive}"
            task = _wait_train_idle(server)
            new_served = assert_store_consistent(model_dir)
            new_versions = sorted(set(os.listdir(versions)) - set(before_versions))
            report.append(f"{phase}: {how}; served {served} -> {new_served}; "
                          f"new files in versions/: {new_versions}; task {task.get('status')}")
            info = server.get("/info/").json()
            assert info["cdpdnet"]["model_version"] == new_served, info["cdpdnet"]
            assert info["train_stats"]["cdpdnet"].get("status") != "RUNNING", info["train_stats"]
            r = server.infer()
            assert r.status_code == 200, r.text
            assert r.json()["model_version"] == new_served
            served = new_served
        # a last round is not blocked (stale lock of the killed runs) and publishes
        p, _, _ = start_round()
        p.wait(180)
        task = _wait_train_idle(server)
        assert task["status"] == "DONE", task
        final = assert_store_consistent(model_dir)
        assert final != served and server.get("/info/").json()["train_stats"]["cdpdnet"]["published"] is True
        assert server.infer().json()["model_version"] == final
        # and the server restarts into the same state
        server.kill()
        server.start()
        assert server.get("/info/").json()["cdpdnet"]["model_version"] == final == assert_store_consistent(model_dir)
        assert temp_files(model_dir) == [] and temp_files(versions) == []
        assert server.infer().status_code == 200
    finally:
        server.stop()
        print("\n".join(report))


def _big_image(studies: Path, shape=(512, 512, 160)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A CT-sized image (0.8 x 0.8 x 2 mm) in the studies folder and two different label maps for it."""
    affine = np.diag([0.8, 0.8, 2.0, 1.0])
    img = np.full(shape, -1000, np.int16)
    img[64:448, 64:448, 10:150] = 40
    write_nifti(img, affine, studies / "big.nii.gz")
    rng = np.random.default_rng(SEED)
    blocks = rng.integers(0, 33, size=(shape[0] // 16, shape[1] // 16, shape[2] // 8), dtype=np.uint8)
    a = np.kron(blocks, np.ones((16, 16, 8), np.uint8))
    b = a.copy()
    b[rng.random(shape) < 0.02] = 5  # both real-size; b less compressible
    return a, b, affine


@pytest.mark.slow
def test_server_killed_during_label_saves(tmp_path, phantoms, tiny_checkpoint):
    """PUT a CT-sized label and SIGKILL the whole server at seeded random points of the request, several times;
    each restart on the same folders finds a parseable datastore json, the label whole (the old or the new one;
    the new one when the save was acknowledged), no temp file, and /datastore and infer answer."""
    import nibabel as nib
    import requests

    studies = make_studies(tmp_path / "studies", phantoms)
    a, b, affine = _big_image(studies)
    for name, arr in (("a", a), ("b", b)):
        (tmp_path / name).mkdir()
        write_nifti(arr, affine, tmp_path / name / "big.nii")  # uncompressed: 42 MB, a long write
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    shutil.copy(tiny_checkpoint, model_dir / "pretrained_cdpdnet.pt")
    label_file = studies / "labels" / "final" / "big.nii"
    server = Server(tmp_path, studies, model_dir).start()
    rng = random.Random(SEED + 1)
    report = []

    def put(which: str, out: dict) -> None:
        try:
            with open(tmp_path / which / "big.nii", "rb") as f:
                r = requests.put(f"{server.url}/datastore/label?image=big&tag=final",
                                 data={"params": json.dumps({"annotated": ["liver"]})},
                                 files={"label": ("big.nii", f, "application/octet-stream")}, timeout=300)
            out["status"] = r.status_code
            out["text"] = r.text[:500]
        except requests.RequestException as e:
            out["error"] = type(e).__name__

    try:
        t0 = time.time()
        out = {}
        put("a", out)
        t_save = time.time() - t0
        assert out.get("status") == 200, out
        current = "a"
        arrays = {"a": a, "b": b}
        def writing() -> bool:  # the save is in its write section (backup link or temp file of the label)
            return any(f.startswith(".cdpdnet-save.") for f in os.listdir(label_file.parent))

        # kill points: uniformly random over the whole request (upload, validation, write), and random within
        # the write section (from the first temp file in the label folder: label write, rename, json)
        plan = [("request", 0.05, 1.1), ("write", 0.0, 0.03), ("request", 0.05, 1.1), ("write", 0.03, 0.2),
                ("request", 0.05, 1.1), ("write", 0.0, 0.03)]
        torn = 0  # trials killed with the save's temp files on disk (inside the write section)
        for trial, (where, lo, hi) in enumerate(plan):
            new = "b" if current == "a" else "a"
            out = {}
            th = threading.Thread(target=put, args=(new, out))
            t0 = time.time()
            th.start()
            if where == "request":
                time.sleep(rng.uniform(lo, hi) * t_save)
            else:
                while not writing():
                    assert th.is_alive() and time.time() - t0 < 120, f"trial {trial}: the write never started {out}"
                    time.sleep(0.001)
                time.sleep(rng.uniform(lo, hi))
            delay = time.time() - t0
            server.kill()
            th.join(120)
            left = [f for f in os.listdir(label_file.parent) if f.startswith(".cdpdnet-save.")]
            torn += bool(left)
            # on disk, before the restart: the json parses, the label file is the old or the new one, whole
            doc = json.loads((studies / "datastore_v2.json").read_text())
            listed = doc["objects"]["big"]["labels"].get("final")
            assert listed and label_file.is_file()
            got = np.asarray(nib.load(str(label_file)).dataobj)
            found = [k for k in (current, new) if np.array_equal(got, arrays[k])]
            assert found, f"trial {trial}: after a kill {delay:.2f}s into the save the label is neither the old " \
                          f"nor the new one"
            if out.get("status") == 200:
                assert found == [new], f"trial {trial}: the save was acknowledged but the old label is on disk"
            report.append(f"trial {trial} ({where}): killed {delay:.2f}s into a {t_save:.2f}s save; answer "
                          f"{out.get('status') or out.get('error')}; temp files at the kill: {left}; "
                          f"on disk: {'new' if found == [new] else 'old'}")
            current = found[0]
            server.start()
            ds = server.get("/datastore/?output=all")
            assert ds.status_code == 200, ds.text
            obj = ds.json()["objects"]["big"]
            assert obj["labels"]["final"]["ext"] == ".nii"
            assert set(ds.json()["objects"]) == set(phantoms) | {"big"}
            json.loads((studies / "datastore_v2.json").read_text())
            for folder in (studies, label_file.parent):
                assert temp_files(folder) == [], f"temp files after the restart: {temp_files(folder)}"
                assert not [f for f in os.listdir(folder) if f.startswith(".cdpdnet-save.")]
            assert sorted(os.listdir(label_file.parent)) == sorted(
                f"{k}{v['labels']['final']['ext']}" for k, v in ds.json()["objects"].items() if "final" in v["labels"])
            r = server.get("/datastore/label?label=big&tag=final")
            assert r.status_code == 200 and len(r.content) == label_file.stat().st_size
            r = server.infer()
            assert r.status_code == 200, r.text
        assert torn >= 1, "no kill landed inside a label write:\n" + "\n".join(report)
        # and a save after all that works
        out = {}
        put("b", out)
        assert out.get("status") == 200, out
        assert np.array_equal(np.asarray(nib.load(str(label_file)).dataobj), b)
    finally:
        server.stop()
        print("\n".join(report))


@pytest.mark.slow
def test_corrupt_pretrained_model_at_start_up(tmp_path, phantoms, tiny_checkpoint):
    """A truncated pretrained_cdpdnet.pt: the server starts, /info says why there is no model, infer says so
    too (no crash), and an upload of a good model through PUT /model/cdpdnet makes the server work."""
    import requests

    studies = make_studies(tmp_path / "studies", phantoms)
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    data = tiny_checkpoint.read_bytes()
    (model_dir / "pretrained_cdpdnet.pt").write_bytes(data[: len(data) // 2])
    server = Server(tmp_path, studies, model_dir).start()
    try:
        info = server.get("/info/").json()
        err = info["cdpdnet"]["init_error"]
        assert "CheckpointError" in err and "pretrained_cdpdnet.pt" in err and "truncated" in err, err
        assert info["cdpdnet"]["model_version"] == "" and not (model_dir / "cdpdnet.pt").exists()
        r = server.infer()
        assert r.status_code in (404, 409, 500) and "no model file" in r.text, r.text
        r = requests.put(f"{server.url}/model/cdpdnet", files={"file": ("pretrained_cdpdnet.pt", io.BytesIO(
            data[: len(data) // 2]))}, timeout=120)
        assert r.status_code == 422 and "model refused" in r.json()["detail"], r.text
        r = requests.put(f"{server.url}/model/cdpdnet", files={"file": ("good.pt", io.BytesIO(data))}, timeout=120)
        assert r.status_code == 200, r.text
        v = r.json()["model_version"]
        assert server.get("/info/").json()["cdpdnet"]["model_version"] == v == assert_store_consistent(model_dir)
        r = server.infer()
        assert r.status_code == 200 and r.json()["model_version"] == v, r.text
    finally:
        server.stop()
