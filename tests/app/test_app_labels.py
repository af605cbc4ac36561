"""Label saving: the annotated-ROI record, and refusal of bad labels with the datastore left unchanged."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import save_label, write_nifti


def _label_info(client, image: str) -> dict:
    r = client.get(f"/datastore/label/info?label={image}&tag=final")
    assert r.status_code == 200, r.text
    return r.json()


def _partial(phantom, values) -> np.ndarray:
    return np.where(np.isin(phantom.label, list(values)), phantom.label, 0).astype(np.uint8)


def test_saving_partial_labels_records_annotated_rois(client, phantoms, tmp_path):
    ph = phantoms["ph_save"]
    # 1. no declaration: the values present
    p = write_nifti(_partial(ph, [1]), ph.affine, tmp_path / "spleen.nii.gz")
    r = save_label(client, "ph_save", p)
    assert r.status_code == 200, r.text
    assert r.json()["annotated"] == ["spleen"]
    info = _label_info(client, "ph_save")
    assert info["annotated"] == ["spleen"] and info["annotated_from"] == "values present + previously annotated"

    # 2. saving again keeps what was annotated before (an absent spleen stays "annotated: absent")
    p = write_nifti(_partial(ph, [6]), ph.affine, tmp_path / "liver.nii.gz")
    r = save_label(client, "ph_save", p)
    assert r.status_code == 200, r.text
    assert _label_info(client, "ph_save")["annotated"] == ["spleen", "liver"]

    # 3. the client's own list (names or values), plus what the file holds
    r = save_label(client, "ph_save", p, {"annotated": ["kidney_right", 1]})
    assert r.status_code == 200, r.text
    assert _label_info(client, "ph_save")["annotated"] == ["spleen", "kidney_right", "liver"]

    # 4. MONAI Label / OHIF label_info: by name, else by idx
    r = save_label(client, "ph_save", p, {"label_info": [{"name": "Gall Bladder", "idx": 99},
                                                         {"name": "Segment_1", "idx": 1}]})
    assert r.status_code == 200, r.text
    info = _label_info(client, "ph_save")
    assert info["annotated"] == ["spleen", "gallbladder", "liver"]
    assert info["annotated_from"] == "client label_info + values present"
    # the datastore counts it as labelled
    assert "ph_save" not in client.app_instance.datastore().get_unlabeled_images()


def _snapshot(app_paths) -> tuple:
    studies = app_paths["studies"]
    files = sorted(str(p.relative_to(studies)) for p in (studies / "labels").rglob("*") if p.is_file())
    return (studies / "datastore_v2.json").read_bytes(), files


def _bad_label_cases(ph, tmp_path):
    small = write_nifti(np.zeros((10, 10, 10), np.uint8), ph.affine, tmp_path / "small.nii.gz")
    big = ph.label.astype(np.int16).copy()
    big[0, 0, 0] = 40
    values = write_nifti(big, ph.affine, tmp_path / "values.nii.gz")
    frac = write_nifti(ph.label.astype(np.float32) + 0.5, ph.affine, tmp_path / "frac.nii.gz")
    garbage = tmp_path / "garbage.nii.gz"
    garbage.write_bytes(b"this is not an image" * 10)
    empty = tmp_path / "empty.nii.gz"
    empty.write_bytes(b"")
    shifted = ph.affine.copy()
    shifted[:3, 3] += 30.0
    moved = write_nifti(ph.label.astype(np.uint8), shifted, tmp_path / "moved.nii.gz")
    good = write_nifti(ph.label.astype(np.uint8), ph.affine, tmp_path / "good.nii.gz")
    return [
        ("ph_bad", small, {}, 422, "voxel shape"),
        ("ph_bad", values, {}, 422, "[40]"),
        ("ph_bad", frac, {}, 422, "non-integer"),
        ("ph_bad", garbage, {}, 422, "could not be read as an image"),
        ("ph_bad", empty, {}, 422, "empty"),
        ("ph_bad", moved, {}, 422, "geometry"),
        ("ph_bad", good, {"annotated": ["not_an_organ"]}, 422, "unknown ROI"),
        ("ph_bad", good, {"annotated": {"liver": 1}}, 400, "annotated"),
        ("no_such_image", good, {}, 404, "unknown image id"),
    ]


def test_bad_labels_are_refused_and_datastore_unchanged(client, app_paths, phantoms, tmp_path):
    before = _snapshot(app_paths)
    for image, path, params, status, words in _bad_label_cases(phantoms["ph_bad"], tmp_path):
        r = save_label(client, image, path, params)
        assert r.status_code == status, (path.name, r.text)
        assert words in r.json()["detail"], (path.name, r.json())
        assert _snapshot(app_paths) == before, path.name
    assert client.get("/datastore/label?label=ph_bad&tag=final").status_code == 404
    assert "ph_bad" in client.app_instance.datastore().get_unlabeled_images()


@pytest.mark.parametrize("tag", ["final", "original"])
def test_bad_label_refused_for_any_tag(client, phantoms, tmp_path, tag):
    ph = phantoms["ph_bad"]
    p = write_nifti(np.zeros((9, 9, 9), np.uint8), ph.affine, tmp_path / "small.nii.gz")
    r = save_label(client, "ph_bad", p, tag=tag)
    assert r.status_code == 422, r.text


def test_slicer_style_segment_numbers_are_remapped_to_roi_values(client, app_paths, phantoms, tmp_path):
    import nibabel as nib

    ph = phantoms["ph_save"]
    # 3D Slicer exports segments as values 1..N in segment order and says which is which in label_info
    lab = np.zeros(ph.label.shape, np.uint8)
    lab[ph.label == 6] = 1  # "Liver" is segment 1
    lab[ph.label == 1] = 2  # "spleen" is segment 2
    p = write_nifti(lab, ph.affine, tmp_path / "slicer.nii.gz")
    r = save_label(client, "ph_save", p, {"label_info": [{"name": "Liver", "idx": 1}, {"name": "spleen", "idx": 2}]})
    assert r.status_code == 200, r.text
    info = _label_info(client, "ph_save")
    assert info["annotated"] == ["spleen", "liver"] and info["remapped_values"] == {"1": 6, "2": 1}
    saved = np.asarray(nib.load(str(app_paths["studies"] / "labels" / "final" / "ph_save.nii.gz")).dataobj)
    assert set(np.unique(saved)) == {0, 1, 6}
    np.testing.assert_array_equal(saved == 6, ph.label == 6)


def test_ohif_raw_bin_label_is_converted(client, app_paths, phantoms, tmp_path):
    ph = phantoms["ph_save"]
    lab = np.where(ph.label == 3, 3, 0).astype(np.uint8)
    p = tmp_path / "label.bin"
    p.write_bytes(lab.tobytes(order="F"))
    r = save_label(client, "ph_save", p, {"label_info": [{"name": "kidney_left", "idx": 3}]})
    assert r.status_code == 200, r.text
    assert _label_info(client, "ph_save")["annotated"] == ["kidney_left"]
    bad = tmp_path / "short.bin"
    bad.write_bytes(b"\0" * 100)
    r = save_label(client, "ph_save", bad)
    assert r.status_code == 422 and ".bin" in r.json()["detail"]
