"""The DICOM Storage SCP (lib/dimse): the real demo CT series sent with dcmtk's storescu, bad DICOM
refused or quarantined without taking the listener down, and DICOM-SEG results sent on to a PACS."""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import requests
from conftest import REPO
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, MRImageStorage, Verification
from test_app_server import _free_port
from pacs_helpers import _storescu

from lib.dimse import Destination, SCPConfig, StorageSCP

DEMO_NIFTI = REPO / "data" / "demo" / "images" / "totalseg_example_ct_dicom.nii.gz"


def _wait(cond, timeout=60.0, what="condition"):
    t = time.monotonic()
    while time.monotonic() - t < timeout:
        if cond():
            return
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


class _FakePACS:  # only the fields _storescu needs
    def __init__(self, aet, port):
        self.aet, self.dicom_port = aet, port


@pytest.fixture()
def scp(tmp_path):
    s = StorageSCP(SCPConfig(studies=tmp_path / "studies", spool=tmp_path / "spool", ae_title="CDPDNET",
                             port=_free_port(), allowed_callers=("STORESCU", "TESTSCU"), complete_after=1.5)).start()
    yield s
    s.stop()


def _series_copy(src: Path, dest: Path, uid: str, edit=None) -> list[Path]:
    dest.mkdir(parents=True)
    out = []
    for i, f in enumerate(sorted(src.iterdir())):
        ds = pydicom.dcmread(str(f))
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = f"{uid}.{i + 1}"
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        if edit:
            edit(i, ds)
        ds.save_as(str(dest / f.name), write_like_original=False)
        out.append(dest / f.name)
    return out


def _send(port: int, files, calling="TESTSCU", abort_after: int | None = None) -> list[int]:
    ae = AE(ae_title=calling)
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(MRImageStorage)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CDPDNET")
    if not assoc.is_established:
        return []
    codes = []
    for i, f in enumerate(files):
        if abort_after is not None and i == abort_after:
            assoc.abort()
            return codes
        codes.append(int(assoc.send_c_store(pydicom.dcmread(str(f))).Status))
    assoc.release()
    return codes


def _echo(port: int) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="CDPDNET")
    ok = assoc.is_established and int(assoc.send_c_echo().Status) == 0
    if assoc.is_established:
        assoc.release()
    return ok


def test_storescu_series_lands_in_the_datastore(scp, demo_series):
    r = _storescu(_FakePACS("CDPDNET", scp.cfg.port), demo_series)
    assert r.returncode == 0, r.stderr
    uid = str(pydicom.dcmread(str(next(demo_series.iterdir())), stop_before_pixels=True).SeriesInstanceUID)
    _wait(lambda: uid in scp.completed or uid in scp.quarantined, what="the series to complete")
    assert uid in scp.completed, scp.quarantined
    img = nib.load(str(scp.cfg.studies / f"{uid}.nii.gz"))
    ref = nib.load(str(DEMO_NIFTI))
    assert img.shape == ref.shape == (512, 512, 20)
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-3)
    np.testing.assert_array_equal(np.asarray(img.dataobj), np.asarray(ref.dataobj))
    from monailabel.datastore.local import LocalDatastore

    assert uid in LocalDatastore(str(scp.cfg.studies), auto_reload=False).list_images()


def test_bad_dicom_is_refused_or_quarantined_and_the_listener_keeps_serving(scp, demo_series, tmp_path, caplog):
    caplog.set_level(logging.ERROR, logger="lib.dimse.storage_scp")
    port = scp.cfg.port

    def mr(i, ds):
        ds.Modality = "MR"
        ds.SOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage

    def no_pixels(i, ds):
        del ds.PixelData

    def uneven(i, ds):
        if i == 10:
            ds.ImagePositionPatient = [float(v) for v in ds.ImagePositionPatient[:2]] + [
                float(ds.ImagePositionPatient[2]) + 0.7 * float(ds.SliceThickness or 1.0)]

    def mixed_geometry(i, ds):
        if i == 3:
            ds.PixelSpacing = [float(v) * 1.1 for v in ds.PixelSpacing]

    assert set(_send(port, _series_copy(demo_series, tmp_path / "mr", "1.2.3.4.1", mr)[:3])) == {0xC001}
    assert set(_send(port, _series_copy(demo_series, tmp_path / "np", "1.2.3.4.2", no_pixels)[:3])) == {0xC002}
    assert _send(port, _series_copy(demo_series, tmp_path / "evil", "1.2.3.4.3"), calling="EVIL") == []
    assert set(_send(port, _series_copy(demo_series, tmp_path / "un", "1.2.3.4.4", uneven))) == {0}
    assert set(_send(port, _series_copy(demo_series, tmp_path / "mg", "1.2.3.4.5", mixed_geometry))) == {0}
    assert _send(port, _series_copy(demo_series, tmp_path / "ab", "1.2.3.4.6"), abort_after=8) == [0] * 8
    _wait(lambda: {"1.2.3.4.4", "1.2.3.4.5", "1.2.3.4.6"} <= set(scp.quarantined), what="quarantine")
    assert "slice spacing" in scp.quarantined["1.2.3.4.4"]
    assert "PixelSpacing" in scp.quarantined["1.2.3.4.5"]
    assert "aborted" in scp.quarantined["1.2.3.4.6"]
    for uid in ("1.2.3.4.4", "1.2.3.4.5", "1.2.3.4.6"):
        assert (scp.quarantine / uid / "reason.txt").is_file()
    assert list(scp.cfg.studies.iterdir()) == []  # nothing half-written in the datastore
    assert _echo(port)  # still serving
    logs = caplog.text
    for needle in ("modality MR", "no pixel data", "EVIL", "quarantined", "aborted"):
        assert needle in logs, needle


def test_new_series_is_segmented_and_sent_to_the_pacs_as_dicom_seg(tmp_path, pacs, demo_series, tiny_checkpoint):
    from cdpdnet.inference import Segmenter

    seg = Segmenter(tiny_checkpoint, threshold=0.2)
    calls = []

    def segment(image, out):
        calls.append(image)
        res = seg.segment(str(image))
        label = res.label.copy()
        if not label.any():  # a random tiny model may find nothing: give the SEG something to carry
            label[200:260, 200:260, 5:10] = 6
        from cdpdnet.imageio import save_label_map

        save_label_map(label, res.affine, out)

    s = StorageSCP(SCPConfig(studies=tmp_path / "studies", spool=tmp_path / "spool", port=_free_port(),
                             complete_after=1.0, segment_with=segment,
                             send_to=Destination("127.0.0.1", pacs.dicom_port, pacs.aet))).start()
    try:
        assert _storescu(_FakePACS("CDPDNET", s.cfg.port), demo_series).returncode == 0
        uid = str(pydicom.dcmread(str(next(demo_series.iterdir())), stop_before_pixels=True).SeriesInstanceUID)
        _wait(lambda: uid in s.sent or uid in s.failed or uid in s.quarantined, timeout=180,
              what="the DICOM-SEG to be sent")
        assert uid in s.sent, (s.failed, s.quarantined)
    finally:
        s.stop()
    segs = requests.get(f"{pacs.dicomweb_url}/series", params={"Modality": "SEG"}, auth=pacs.auth, timeout=10).json()
    mine = []
    from dicomweb_client.api import DICOMwebClient

    sess = requests.Session()
    sess.auth = pacs.auth
    client = DICOMwebClient(pacs.dicomweb_url, session=sess)
    for x in segs:
        ds = client.retrieve_series(x["0020000D"]["Value"][0], x["0020000E"]["Value"][0])[0]
        if ds.ReferencedSeriesSequence[0].SeriesInstanceUID == uid:
            mine.append(ds)
    assert mine, "no DICOM-SEG referencing the series in the PACS"
    ds = mine[-1]
    assert (ds.Rows, ds.Columns) == (512, 512)
    names = {x.SegmentLabel for x in ds.SegmentSequence}
    assert names and names <= set(__import__("cdpdnet.taxonomy", fromlist=["labels_dict"]).labels_dict())
    ref = pydicom.dcmread(str(sorted(demo_series.iterdir())[0]), stop_before_pixels=True)
    assert [float(v) for v in ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing] == \
        pytest.approx([float(v) for v in ref.PixelSpacing])
    shutil.rmtree(tmp_path / "spool", ignore_errors=True)
