"""Shared fixtures for the MONAI Label app tests: a tiny trained checkpoint, a studies folder of
tiny phantoms (6 mm, about 55 x 43 x 75 voxels), and an in-process server (FastAPI TestClient).

Everything is built lazily (only tests that ask for these fixtures pay for them) and once per
session; the in-process app is a process-wide singleton in MONAI Label, so it is session-scoped too
and tests use their own image ids when they change the datastore.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
APP_DIR = REPO / "apps" / "cdpdnet"
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")

SPACING = (6.0, 6.0, 6.0)

# image id -> (phantom seed, final label: annotated ROI names or None)
STUDIES = {
    "ph_unlabelled_a": (101, None),
    "ph_unlabelled_b": (102, None),
    "ph_liver": (103, ["liver", "liver_tumor"]),  # partial label: fill-in target, never changed by tests
    "ph_kidneys": (104, ["kidney_right", "kidney_left"]),
    "ph_save": (105, None),  # label-save tests write here
    "ph_bad": (106, None),  # bad-label tests: must stay unlabelled
}


def write_nifti(arr: np.ndarray, affine: np.ndarray, path: Path, dtype=None) -> Path:
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(arr, dtype=dtype or arr.dtype), np.asarray(affine, dtype=np.float64))
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    nib.save(img, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny-preset CDPDNet trained for 2 iterations on phantoms (a few seconds on CPU)."""
    from cdpdnet.data import load_datalist
    from cdpdnet.phantoms import write_phantom_dataset
    from cdpdnet.training import train

    root = tmp_path_factory.mktemp("tiny_model")
    dl = load_datalist(write_phantom_dataset(root / "data", n_per_source=1, n_heldout=0, spacing=SPACING, seed=0))
    summary = train(dl.training[:3], "tiny", out_dir=str(root / "run"), epochs=1, iterations_per_epoch=1,
                    progress=False)
    return Path(summary["model"])


@pytest.fixture(scope="session")
def phantoms() -> dict:
    from cdpdnet.phantoms import make_phantom

    return {iid: make_phantom(seed, spacing=SPACING) for iid, (seed, _) in STUDIES.items()}


def make_studies(root: Path, phantoms: dict) -> Path:
    """Images as ``<id>.nii.gz``; partial final labels imported with their annotated ROIs."""
    from monailabel.datastore.local import LocalDatastore

    from cdpdnet.phantoms import source_label

    root.mkdir(parents=True, exist_ok=True)
    for iid, ph in phantoms.items():
        write_nifti(ph.image.astype(np.int16), ph.affine, root / f"{iid}.nii.gz")
    ds = LocalDatastore(str(root), extensions=("*.nii.gz", "*.nii"), auto_reload=False)
    tmp = root.parent / f"{root.name}_labels"
    tmp.mkdir(exist_ok=True)
    for iid, (_, annotated) in STUDIES.items():
        if annotated:
            ph = phantoms[iid]
            lab = source_label(ph.label, ph.organ_label, annotated).astype(np.uint8)
            write_nifti(lab, ph.affine, tmp / f"{iid}.nii.gz")
            ds.save_label(iid, str(tmp / f"{iid}.nii.gz"), "final", {"annotated": list(annotated), "source": "test"})
    return root


@pytest.fixture(scope="session")
def app_paths(tmp_path_factory, tiny_checkpoint, phantoms) -> dict:
    root = tmp_path_factory.mktemp("app")
    studies = make_studies(root / "studies", phantoms)
    model_dir = root / "model"
    model_dir.mkdir()
    shutil.copy(tiny_checkpoint, model_dir / "pretrained_cdpdnet.pt")
    return {"studies": studies, "model_dir": model_dir, "root": root}


@pytest.fixture(scope="session")
def client(app_paths, tmp_path_factory):
    """In-process MONAI Label server on the app (pattern of monailabel-notes.md section C)."""
    from fastapi.testclient import TestClient

    from monailabel.config import settings

    settings.MONAI_LABEL_APP_DIR = str(APP_DIR)
    settings.MONAI_LABEL_STUDIES = str(app_paths["studies"])
    settings.MONAI_LABEL_APP_CONF = {
        "models": "cdpdnet",
        "preset": "tiny",
        "use_pretrained_model": "true",
        "model_dir": str(app_paths["model_dir"]),
        "device": "cpu",
        "server_mode": "true",
        "auth": "false",  # the in-process server tests the app; authentication has its own tests (test_auth.py)
        "auto_update_scoring": "false",
    }
    settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD = False
    settings.MONAI_LABEL_TRACKING_ENABLED = False
    settings.MONAI_LABEL_AUTO_UPDATE_SCORING = False
    settings.MONAI_LABEL_SESSION_PATH = str(tmp_path_factory.mktemp("sessions"))
    for k, v in settings.model_dump().items():
        if v is not None:
            os.environ[k] = json.dumps(v) if isinstance(v, (list, dict)) else str(v)

    from monailabel.app import app
    from monailabel.interfaces.utils.app import app_instance, clear_cache

    clear_cache()
    with TestClient(app) as c:
        c.app_instance = app_instance()
        yield c
    clear_cache()


def infer(client, model: str, image: str, params: dict | None = None, output: str = "all"):
    """POST /infer/{model}; returns the response (multipart for output=all)."""
    return client.post(f"/infer/{model}?image={image}" + (f"&output={output}" if output != "all" else ""),
                       data={"params": json.dumps(params or {})})


def infer_label(client, model: str, image: str, params: dict | None, tmp_path: Path):
    """Infer and return (label array, affine, result json) from the multipart answer."""
    import nibabel as nib
    from requests_toolbelt.multipart import decoder

    r = infer(client, model, image, params)
    assert r.status_code == 200, r.text
    parts = decoder.MultipartDecoder(r.content, r.headers["content-type"]).parts
    result, label_bytes = None, None
    for p in parts:
        disp = p.headers.get(b"Content-Disposition", b"").decode()
        if 'name="params"' in disp:
            result = json.loads(p.content)
        elif 'name="image"' in disp:
            label_bytes = p.content
    assert result is not None and label_bytes is not None
    ext = ".nrrd" if (params or {}).get("result_extension") == ".nrrd" else ".nii.gz"
    path = tmp_path / f"{model}_{image}{ext}"
    path.write_bytes(label_bytes)
    if ext == ".nrrd":
        from monai.transforms import LoadImage

        img = LoadImage(image_only=True)(str(path))
        return np.asarray(img), np.asarray(img.affine), result
    nii = nib.load(str(path))
    return np.asarray(nii.dataobj), nii.affine, result


def save_label(client, image: str, path: Path, params: dict | None = None, tag: str = "final"):
    with open(path, "rb") as f:
        return client.put(f"/datastore/label?image={image}&tag={tag}",
                          data={"params": json.dumps(params or {})},
                          files={"label": (path.name, f, "application/octet-stream")})


# -- hospital integration (PACS, DICOM listener, OHIF): real Orthanc, the real demo DICOM series ---------
@pytest.fixture(scope="module")
def demo_series():
    """The demo CT series (20 slices, UIDs filled in), fetched like the README's demo does if missing."""
    from pacs_helpers import fetch_demo_series

    return fetch_demo_series()


@pytest.fixture(scope="module")
def pacs(tmp_path_factory):
    """A development PACS (Orthanc + DICOMweb, loopback only) for one test module."""
    from test_app_server import _free_port

    from lib.pacs import OrthancPACS, PACSError

    p = OrthancPACS(tmp_path_factory.mktemp("pacs"), http_port=_free_port(), dicom_port=_free_port())
    try:
        p.start()
    except PACSError as e:
        pytest.fail(f"development PACS not available: {e}")
    yield p
    p.stop()
