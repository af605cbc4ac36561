"""The development PACS (real Orthanc + DICOMweb plugin, Debian's packages) and the app on a DICOMweb datastore.

The CT series is the real DICOM series of the demo data (``scripts/fetch_demo_data.py``), sent with
dcmtk's ``storescu`` (a DICOM client not written here).
"""

from __future__ import annotations

import json
import stat
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import requests
from conftest import APP_DIR
from pacs_helpers import _storescu, start_dicomweb_server, stop_server
from test_app_server import _free_port, _tail, _wait_for

from lib.pacs import OrthancPACS



def _listeners(port: int) -> list[str]:
    return [c.laddr.ip for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port]


def test_pacs_listens_on_loopback_only_with_authentication(pacs):
    for port in (pacs.http_port, pacs.dicom_port):
        assert _listeners(port) == ["127.0.0.1"], f"port {port}: {_listeners(port)}"
    # Orthanc itself listens only inside its namespace: nothing on its own ports in the host's
    orthanc = [p for p in psutil.process_iter(["name", "cmdline"]) if p.info["name"] == "Orthanc"
               and str(pacs.folder) in " ".join(p.info["cmdline"] or [])]
    assert len(orthanc) == 1
    host_ports = {c.laddr.port for c in psutil.net_connections(kind="inet") if c.pid == orthanc[0].pid}
    assert not host_ports, f"Orthanc has sockets in the host's network namespace: {host_ports}"
    assert requests.get(f"{pacs.url}/system", timeout=5).status_code == 401
    assert requests.get(f"{pacs.url}/system", auth=(pacs.user, "wrong"), timeout=5).status_code == 401
    assert requests.get(f"{pacs.url}/system", auth=pacs.auth, timeout=5).status_code == 200
    creds = pacs.folder / "credentials.json"
    assert stat.S_IMODE(creds.stat().st_mode) == 0o600
    assert stat.S_IMODE((pacs.folder / "orthanc.json").stat().st_mode) == 0o600
    assert pacs.password not in (pacs.folder / "orthanc.log").read_text(errors="replace")


def test_pacs_stops_cleanly_and_restarts_with_its_data(tmp_path, demo_series):
    p = OrthancPACS(tmp_path / "pacs", http_port=_free_port(), dicom_port=_free_port()).start()
    try:
        assert _storescu(p, demo_series).returncode == 0
    finally:
        p.stop()
    assert not p.is_running() and _listeners(p.http_port) == []
    assert p.namespace not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    p.start()  # same folder: same password, same stored series
    try:
        r = requests.get(f"{p.dicomweb_url}/series", params={"Modality": "CT"}, auth=p.auth, timeout=10)
        assert r.status_code == 200 and len(r.json()) == 1
    finally:
        p.stop()


def test_storescu_series_is_served_over_dicomweb(pacs, demo_series):
    r = _storescu(pacs, demo_series)
    assert r.returncode == 0, r.stderr
    from dicomweb_client.api import DICOMwebClient

    s = requests.Session()
    s.auth = pacs.auth
    client = DICOMwebClient(pacs.dicomweb_url, session=s)
    series = client.search_for_series(search_filters={"Modality": "CT"})
    assert len(series) == 1
    uid = series[0]["0020000E"]["Value"][0]
    instances = client.search_for_instances(search_filters={"SeriesInstanceUID": uid})
    assert len(instances) == 20
    # WADO-RS in the uncompressed syntax a DICOMweb datastore asks for (Debian's Orthanc cannot transcode JPEG 2000)
    ds = client.retrieve_instance(instances[0]["0020000D"]["Value"][0], uid, instances[0]["00080018"]["Value"][0])
    assert ds.pixel_array.shape == (512, 512)


@pytest.mark.slow
def test_app_on_the_pacs_infer_save_seg_next_sample_and_train(tmp_path, pacs, demo_series, tiny_checkpoint):
    """Server with ``--studies <DICOMweb>``: next sample, infer (WADO), save label -> DICOM-SEG in the PACS
    with the ROIs' names and codes, the saved image counts as labelled at once (no stale cache), and a
    training round reads the SEG back from the PACS as a partial label of those ROIs."""
    import pydicom
    from monailabel.client import MONAILabelClient

    assert _storescu(pacs, demo_series).returncode == 0
    proc, url, log = start_dicomweb_server(tmp_path, pacs, tiny_checkpoint)
    try:
        client = MONAILabelClient(url)
        stats = requests.get(f"{url}/datastore/?output=stats", timeout=30).json()
        assert stats["total"] == 1 and stats["completed"] == 0
        sample = client.next_sample("random", {})
        uid = sample["id"]
        assert sample["SeriesInstanceUID"] == uid

        label_path, params = client.infer("cdpdnet", uid, {})
        import nibabel as nib

        lab = nib.load(label_path)
        assert lab.shape == (512, 512, 20)
        # save a final label with two ROIs (values as in /info) -> DICOM-SEG in the PACS
        arr = np.zeros(lab.shape, dtype=np.uint8)
        arr[200:300, 200:300, 5:15] = 6  # liver
        arr[320:360, 150:190, 8:12] = 27  # liver tumour
        mine = tmp_path / "label.nii.gz"
        nib.save(nib.Nifti1Image(arr, lab.affine), str(mine))
        r = requests.put(f"{url}/datastore/label", params={"image": uid, "tag": "final"},
                         files={"label": open(mine, "rb")}, data={"params": json.dumps({})}, timeout=120)
        assert r.status_code == 200, r.text
        assert set(r.json()["annotated"]) >= {"liver", "liver_tumor"}
        segs = requests.get(f"{pacs.dicomweb_url}/series", params={"Modality": "SEG"}, auth=pacs.auth, timeout=10).json()
        assert len(segs) == 1
        seg_uid, study = segs[0]["0020000E"]["Value"][0], segs[0]["0020000D"]["Value"][0]
        from dicomweb_client.api import DICOMwebClient

        s = requests.Session()
        s.auth = pacs.auth
        ds = DICOMwebClient(pacs.dicomweb_url, session=s).retrieve_series(study, seg_uid)[0]
        assert isinstance(ds, pydicom.Dataset) and ds.Modality == "SEG"
        assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid
        segments = {x.SegmentLabel: x for x in ds.SegmentSequence}
        assert set(segments) == {"liver", "liver_tumor"}
        assert segments["liver"].SegmentedPropertyTypeCodeSequence[0].CodeValue == "10200004"  # SCT Liver
        tumour = segments["liver_tumor"]
        assert tumour.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "49755003"
        assert tumour.SegmentedPropertyTypeCodeSequence[0].CodeValue == "108369006"  # Neoplasm
        assert tumour.AnatomicRegionSequence[0].CodeValue == "10200004"  # ... of the liver
        assert (ds.Rows, ds.Columns) == (512, 512)
        # labelled at once: MONAI Label alone kept it "unlabelled" for 2 hours (its QIDO cache)
        stats = requests.get(f"{url}/datastore/?output=stats", timeout=30).json()
        assert stats["completed"] == 1, f"{stats}\n{_tail(log)}"
        # train one short round from the SEG read back from the PACS: ROI values, segments = annotated ROIs
        v1 = client.info()["cdpdnet"]["model_version"]
        client.train_start("cdpdnet", {"max_epochs": 1, "iterations_per_epoch": 1, "val_split": 0})
        status = _wait_for(lambda: (st := client.train_status()) and st.get("status") not in ("SUBMITTED", "RUNNING")
                           and st, 600, "training", proc, log)
        assert status["status"] == "DONE", f"{status}\n{_tail(log)}"
        info = client.info()
        assert info["cdpdnet"]["model_version"] != v1
        trained = info["train_stats"]["cdpdnet"]
        assert trained["samples"]["train"] == 1 and trained["annotated_rois"] == ["liver", "liver_tumor"], trained
        # the PACS password came from the credentials file (--conf dicomweb_credentials): in no log, and not
        # in the environment of the server or of its training subprocess
        assert pacs.password not in log.read_text(errors="replace")
        for f in (APP_DIR / "logs").glob("*.log*"):
            assert pacs.password not in f.read_text(errors="replace"), f
        assert pacs.password not in (Path("/proc") / str(proc.pid) / "environ").read_bytes().decode(errors="replace")
    finally:
        stop_server(proc)


@pytest.fixture()
def own_pacs(tmp_path):
    """A PACS of this test alone (tests that count SEG series must not see other tests' saves)."""
    p = OrthancPACS(tmp_path / "own-pacs", http_port=_free_port(), dicom_port=_free_port()).start()
    yield p
    p.stop()


def test_training_labels_are_the_newest_seg_with_roi_values(tmp_path, own_pacs, demo_series):
    """Two saves (a first label, then a correction): a fresh DICOMweb datastore trains on the newest SEG,
    voxel for voxel, with ROI values (not dcmqi's segment numbers) and its segments as annotated ROIs."""
    import nibabel as nib
    from dicomweb_client.api import DICOMwebClient
    from monailabel.datastore.dicom import DICOMWebDatastore
    from monailabel.datastore.local import LocalDatastore

    from lib.datastore import guard_datastore
    from lib.runtime import interpreter_bin_on_path

    interpreter_bin_on_path()
    assert _storescu(own_pacs, demo_series).returncode == 0
    s = requests.Session()
    s.auth = own_pacs.auth
    client = DICOMwebClient(own_pacs.dicomweb_url, session=s)
    ds = guard_datastore(DICOMWebDatastore(client, {"Modality": "CT"}, cache_path=str(tmp_path / "c1")))
    uid = ds.list_images()[0]
    img = nib.load(ds.get_image_uri(uid))
    first = np.zeros(img.shape, np.uint8)
    first[200:300, 200:300, 5:15] = 6  # liver
    second = first.copy()
    second[320:360, 150:190, 8:12] = 27  # the correction adds a liver tumour
    second[100:140, 300:340, 2:6] = 2  # and the right kidney
    for i, arr in enumerate((first, second)):
        path = tmp_path / f"label{i}.nii.gz"
        nib.save(nib.Nifti1Image(arr, img.affine), str(path))
        ds.save_label(uid, str(path), "final", {})
        time.sleep(1.1)  # SEG series times differ
    fresh = guard_datastore(DICOMWebDatastore(client, {"Modality": "CT"}, cache_path=str(tmp_path / "c2")))
    dl = fresh.datalist()
    assert len(dl) == 1
    got = np.asarray(nib.load(dl[0]["label"]).dataobj)
    np.testing.assert_array_equal(got, second)
    info = LocalDatastore.get_label_info(fresh, uid, "final")
    assert info["annotated"] == ["kidney_right", "liver", "liver_tumor"]
    assert fresh.get_label_uri(uid, "final") == dl[0]["label"]  # by image id, as the trainer asks
