"""Pure parts of scripts/fetch_demo_data.py and scripts/make_demo_studies.py (no download)."""

from __future__ import annotations

import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cdpdnet.taxonomy import ROIS, roi  # noqa: E402


def _load(name: str):
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


fetch = _load("fetch_demo_data")
studies_mod = _load("make_demo_studies")

# A fake TotalSegmentator "total" class map (real names, shuffled values).
FAKE_CLASS_MAP = {
    1: "spleen", 2: "kidney_right", 5: "liver", 10: "lung_upper_lobe_left", 11: "lung_lower_lobe_left",
    12: "lung_upper_lobe_right", 13: "lung_middle_lobe_right", 14: "lung_lower_lobe_right", 18: "small_bowel",
    21: "urinary_bladder", 23: "kidney_cyst_left", 30: "vertebrae_L2", 52: "aorta", 64: "portal_vein_and_splenic_vein",
    75: "femur_left", 76: "femur_right", 79: "spinal_cord", 117: "costal_cartilages",
}


def test_name_mapping_rules_on_fake_class_map():
    cm = fetch.map_totalseg_names(FAKE_CLASS_MAP)
    v2r = {v: ROIS[r - 1].name for v, r in cm.value_to_roi.items()}
    assert v2r[1] == "spleen" and v2r[2] == "kidney_right" and v2r[5] == "liver" and v2r[52] == "aorta"
    assert v2r[10] == v2r[11] == "lung_left"
    assert v2r[12] == v2r[13] == v2r[14] == "lung_right"
    assert v2r[18] == "small_bowel" and v2r[21] == "urinary_bladder"
    assert v2r[64] == "portal_vein_and_splenic_vein"
    assert v2r[23] == "kidney_cyst"
    # whole femur is not the femoral head, although the taxonomy's synonyms would map it
    assert 75 not in v2r and 76 not in v2r
    assert cm.dropped == {30: "vertebrae_L2", 75: "femur_left", 76: "femur_right", 79: "spinal_cord",
                          117: "costal_cartilages"}
    assert "demo rule" in cm.how[10]


def test_class_map_loaded_by_path(tmp_path):
    p = tmp_path / "map_to_binary.py"
    p.write_text("class_map = {'total': {1: 'spleen', 5: 'liver'}, 'other': {1: 'x'}}\n")
    assert fetch.load_class_map(p) == {1: "spleen", 5: "liver"}


def test_partial_label_keeps_only_annotated_values():
    seg = np.array([[[0, 1, 5, 10], [11, 30, 75, 117]]], dtype=np.uint8)
    cm = fetch.map_totalseg_names(FAKE_CLASS_MAP)
    out = fetch.partial_label(seg, cm.value_to_roi, ["liver", "lung_left"])
    assert out.dtype == np.uint8
    liver, lung_left = roi("liver").index, roi("lung_left").index
    np.testing.assert_array_equal(out, [[[0, 0, liver, lung_left], [lung_left, 0, 0, 0]]])
    assert set(np.unique(out)) <= {0, liver, lung_left}
    # nothing annotated -> all background
    assert not fetch.partial_label(seg, cm.value_to_roi, []).any()


def test_choose_annotated_drops_absent_and_tiny():
    counts = {"liver": 1000, "spleen": 10, "aorta": 60}
    keep, skipped = fetch.choose_annotated(counts, ["aorta", "liver", "spleen", "esophagus"], min_voxels=50)
    assert keep == ["liver", "aorta"]  # taxonomy order
    assert skipped == {"spleen": 10, "esophagus": 0}


def test_rois_outside_the_field_of_view_are_annotated_with_no_voxels():
    """An upper-abdomen CT annotates the pelvic ROIs as absent (the loss learns "none here"); one that
    its own label map holds is refused."""
    counts = {"liver": 1000, "urinary_bladder": 0}
    keep, skipped = fetch.choose_annotated(counts, ["liver"], min_voxels=50, absent=["urinary_bladder", "femur_head_left"])
    assert keep == ["liver", "urinary_bladder", "femur_head_left"] and skipped == {}
    with pytest.raises(ValueError, match="declared absent.*urinary_bladder"):
        fetch.choose_annotated({"liver": 1000, "urinary_bladder": 70}, ["liver"], absent=["urinary_bladder"])
    assert {c.id: c.absent for c in fetch.CASES if c.absent} == {
        "totalseg_example_ct_sm": fetch.PELVIS, "pyradiomics_lung2": fetch.PELVIS}


def test_write_partial_label_nifti_keeps_grid_and_subset(tmp_path):
    aff = np.array([[-1.5, 0, 0, 10], [0, -1.5, 0, 20], [0, 0, 2.0, -30], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    seg = rng.choice([0, 1, 2, 5, 10, 13, 75], size=(6, 5, 4)).astype(np.uint8)
    src = tmp_path / "seg.nii.gz"
    img = nib.Nifti1Image(seg, aff)
    img.set_qform(aff, code=1)
    img.set_sform(aff, code=1)
    nib.save(img, src)
    cm = fetch.map_totalseg_names(FAKE_CLASS_MAP)
    counts = fetch.roi_voxel_counts(seg, cm.value_to_roi)
    assert counts["lung_left"] == int((seg == 10).sum()) and "femur_head_left" not in counts
    out = tmp_path / "labels" / "case.nii.gz"
    fetch.write_partial_label_nifti(src, out, cm.value_to_roi, ["spleen", "lung_right"])
    got = nib.load(out)
    np.testing.assert_allclose(got.affine, aff)
    assert nib.aff2axcodes(got.affine) == ("L", "P", "S")
    arr = np.asanyarray(got.dataobj)
    assert got.get_data_dtype() == np.uint8
    assert set(np.unique(arr)) - {0} == {roi("spleen").index, roi("lung_right").index}
    np.testing.assert_array_equal(arr == roi("spleen").index, seg == 1)
    np.testing.assert_array_equal(arr == roi("lung_right").index, seg == 13)
    assert not list(out.parent.glob(".*"))  # no temporary file left behind


def _tar(path: Path, members: dict[str, bytes], symlink: tuple[str, str] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            t.addfile(ti, io.BytesIO(data))
        if symlink:
            ti = tarfile.TarInfo(symlink[0])
            ti.type, ti.linkname = tarfile.SYMTYPE, symlink[1]
            t.addfile(ti)
    return path


def test_safe_extract_only_wanted_and_no_traversal(tmp_path):
    tp = _tar(tmp_path / "ok.tar.gz", {"pkg-1/a.txt": b"a", "pkg-1/b.txt": b"b", "pkg-1/d/x": b"x", "pkg-1/d/y": b"y"})
    dest = tmp_path / "ex"
    files = fetch.safe_extract(tp, "pkg-1", ["a.txt", "d/"], dest)
    assert sorted(p.relative_to(dest.resolve()).as_posix() for p in files) == ["pkg-1/a.txt", "pkg-1/d/x", "pkg-1/d/y"]
    assert not (dest / "pkg-1" / "b.txt").exists()

    bad = _tar(tmp_path / "bad.tar.gz", {"pkg-1/d/ok": b"1", "pkg-1/d/../../../evil": b"2"})
    with pytest.raises(ValueError):
        fetch.safe_extract(bad, "pkg-1", ["d/"], tmp_path / "ex2")
    assert not (tmp_path / "evil").exists()

    link = _tar(tmp_path / "link.tar.gz", {"pkg-1/d/ok": b"1"}, symlink=("pkg-1/d/l", "/etc/passwd"))
    with pytest.raises(ValueError):
        fetch.safe_extract(link, "pkg-1", ["d/"], tmp_path / "ex3")

    with pytest.raises(SystemExit):
        fetch.safe_extract(tp, "pkg-1", ["missing.txt"], tmp_path / "ex4")


def test_merge_phantom_dataset_rebases_paths(tmp_path):
    out = tmp_path / "demo"
    pdir = out / "phantoms"
    pdir.mkdir(parents=True)
    d = {
        "sources": {"phantom_a": ["liver", "liver_tumor"]},
        "training": [{"image": "imagesTr/a_000.nii.gz", "label": "labelsTr/a_000.nii.gz", "source": "phantom_a",
                      "annotated": ["liver", "Liver Tumour"], "seed": 3}],
        "test": [{"image": "imagesTs/f_000.nii.gz", "label": "labelsTs/f_000.nii.gz", "source": "phantom_full"}],
    }
    (pdir / "dataset.json").write_text(json.dumps(d))
    tr, te, src = fetch.merge_phantom_dataset(pdir / "dataset.json", out, "synthetic")
    assert tr == [{"image": "phantoms/imagesTr/a_000.nii.gz", "label": "phantoms/labelsTr/a_000.nii.gz",
                   "source": "phantom_a", "annotated": ["liver", "liver_tumor"], "origin": "synthetic, case seed 3"}]
    assert te[0]["image"] == "phantoms/imagesTs/f_000.nii.gz" and len(te[0]["annotated"]) == len(ROIS)
    assert src == {"phantom_a": ["liver", "liver_tumor"]}


def test_labels_field_lists_all_32():
    lf = fetch.labels_field()
    assert lf["0"] == "background" and lf["1"] == "spleen" and lf["32"] == "kidney_cyst" and len(lf) == 33


# ---------------------------------------------------------------------------------------------
# make_demo_studies


def _nii(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr, np.diag([2.0, 2.0, 3.0, 1.0])), path)


@pytest.fixture()
def fake_datalist(tmp_path):
    base = tmp_path / "demo"
    rng = np.random.default_rng(1)
    for i in ("a", "b", "c"):
        _nii(base / "images" / f"case_{i}.nii.gz", rng.integers(-1000, 1000, (8, 7, 6)).astype(np.int16))
    lab_a = np.zeros((8, 7, 6), np.uint8)
    lab_a[1:3, 1:3, 1:3] = roi("liver").index
    lab_a[4:6, 4:6, 2:4] = roi("spleen").index
    lab_b = np.zeros((8, 7, 6), np.uint8)
    lab_b[2:5, 2:5, 2:5] = roi("lung_tumor").index
    _nii(base / "labels" / "case_a.nii.gz", lab_a)
    _nii(base / "labels" / "case_b.nii.gz", lab_b)
    dl = {
        "name": "fake", "labels": fetch.labels_field(),
        "sources": {"s1": ["spleen", "liver"], "s2": ["lung_tumor"]},
        "training": [
            {"image": "images/case_a.nii.gz", "label": "labels/case_a.nii.gz", "source": "s1",
             "annotated": ["spleen", "liver"], "origin": "fake a"},
            {"image": "images/case_b.nii.gz", "label": "labels/case_b.nii.gz", "source": "s2",
             "annotated": ["lung_tumor"], "origin": "fake b"},
        ],
        "unlabelled": [{"image": "images/case_c.nii.gz", "origin": "fake c"}],
        "test": [],
    }
    p = base / "datalist.json"
    p.write_text(json.dumps(dl))
    return p


def test_make_demo_studies_label_info_and_idempotent(fake_datalist, tmp_path):
    from monailabel.datastore.local import LocalDatastore

    studies = tmp_path / "studies"
    r1 = studies_mod.build_studies(fake_datalist, studies, verbose=False)
    assert r1["copied"] == 3 and r1["saved"] == 2
    assert sorted(p.name for p in studies.glob("*.nii.gz")) == ["case_a.nii.gz", "case_b.nii.gz", "case_c.nii.gz"]

    ds = LocalDatastore(str(studies), auto_reload=False)
    assert sorted(ds.get_labeled_images()) == ["case_a", "case_b"]
    assert ds.get_unlabeled_images() == ["case_c"]
    info = ds.get_label_info("case_a", "final")
    assert info["annotated"] == ["spleen", "liver"] and info["source"] == "s1" and info["origin"] == "fake a"
    assert ds.get_label_info("case_b", "final")["annotated"] == ["lung_tumor"]
    assert ds.get_labels_by_image_id("case_c") == {}
    assert ds.get_image_info("case_c")["origin"] == "fake c"
    lab = np.asanyarray(nib.load(ds.get_label_uri("case_a", "final")).dataobj)
    assert set(np.unique(lab)) == {0, roi("spleen").index, roi("liver").index}
    # persisted in MONAI Label's own bookkeeping file
    store = json.loads((studies / "datastore_v2.json").read_text())
    assert store["objects"]["case_b"]["labels"]["final"]["info"]["annotated"] == ["lung_tumor"]

    before = (studies / "datastore_v2.json").read_bytes()
    r2 = studies_mod.build_studies(fake_datalist, studies, verbose=False)
    assert r2["copied"] == 0 and r2["saved"] == 0 and r2["info_updates"] == 0
    assert (studies / "datastore_v2.json").read_bytes() == before

    # a changed annotated list is saved again
    dl = json.loads(fake_datalist.read_text())
    dl["training"][0]["annotated"] = ["liver", "spleen", "stomach"]
    fake_datalist.write_text(json.dumps(dl))
    r3 = studies_mod.build_studies(fake_datalist, studies, verbose=False)
    assert r3["saved"] == 1
    assert LocalDatastore(str(studies), auto_reload=False).get_label_info("case_a", "final")["annotated"] == [
        "liver", "spleen", "stomach"]


def test_make_demo_studies_rejects_duplicate_ids(fake_datalist):
    dl = json.loads(fake_datalist.read_text())
    dl["unlabelled"].append({"image": "labels/case_a.nii.gz"})
    with pytest.raises(SystemExit):
        studies_mod.plan(dl, fake_datalist.parent)


def test_add_threshold_lungs_sides_by_affine_and_keeps_the_lesion_on_top():
    """The lesion-only chest CT gets both lungs: the one further to the patient's left (LPS +x) is
    lung_left whatever the array order, and the case's own lesion mask is painted over them."""
    sys.path.insert(0, str(REPO / "tests" / "core"))
    from test_threshold_lungs import SPACING, chest

    hu, right, left = chest()  # right lung at the larger axis-0 index (RAS order)
    lesion = np.zeros(hu.shape, np.uint8)
    lesion[105, 60, 35] = 1  # inside a lung
    for lps_sign in (-1.0, 1.0):  # RAS order (LPS x falls with the index), then a mirrored affine
        out, rois = fetch.add_threshold_lungs(lesion, hu, SPACING, lambda m, s=lps_sign: s * float(np.argwhere(m)[:, 0].mean()))
        assert rois == {2: roi("lung_right").index, 3: roi("lung_left").index}
        patient_left = left if lps_sign < 0 else right
        assert out[105, 60, 35] == 1
        assert (out[patient_left] == 3).mean() > 0.95 and (out[right if patient_left is left else left] == 2).mean() > 0.95


def test_demo_model_cache_key_follows_training_settings_only(tmp_path):
    """The demo model (20 CPU minutes) is retrained when a training setting of its preset changes, not
    when a description, an inference setting or another preset's file does."""
    key = _load("make_demo_model").cache_key
    datalist = tmp_path / "datalist.json"
    datalist.write_text('{"training": []}')
    base = json.loads((REPO / "cdpdnet" / "presets" / "lite-wide.json").read_text())
    variants = {}
    for name, change in {"same": {}, "description": {"description": "edited"},
                         "threshold": {"infer": {**base["infer"], "threshold": 0.45}},
                         "lr": {"train": {**base["train"], "lr": 0.001}}}.items():
        f = tmp_path / f"{name}.json"
        f.write_text(json.dumps({**base, **change, "name": "lite-wide"}))
        variants[name] = key(datalist, str(f), 20.0)
    assert variants["same"] == variants["description"] == variants["threshold"] == key(datalist, "lite-wide", 20.0)
    assert variants["lr"] != variants["same"]
    assert key(datalist, "lite-wide", 10.0) != variants["same"]


def test_reused_demo_model_takes_the_presets_inference_settings(tiny_checkpoint, tmp_path):
    """A cached demo model reused after an inference-only change of its preset (the key is the same)
    gets the preset's ``infer`` section and description; its weights stay."""
    import shutil

    import torch

    from cdpdnet.checkpoint import load_checkpoint
    from cdpdnet.inference import Segmenter

    refresh = _load("make_demo_model").refresh_inference_settings
    model = tmp_path / "demo.pt"
    shutil.copy(tiny_checkpoint, model)
    before = load_checkpoint(model)
    preset = dict(before["preset"], description="edited")
    preset["infer"] = {**preset["infer"], "threshold": 0.45, "roi_thresholds": {"celiac_trunk": 0.25}}
    (tmp_path / "preset.json").write_text(json.dumps(preset))
    assert refresh(model, str(tmp_path / "preset.json")) is True
    after = load_checkpoint(model)
    assert after["preset"]["infer"]["threshold"] == 0.45 and after["preset"]["description"] == "edited"
    assert {k: v for k, v in after["preset"].items() if k not in ("infer", "description")} == \
        {k: v for k, v in before["preset"].items() if k not in ("infer", "description")}
    assert all(torch.equal(after["state_dict"][k], v) for k, v in before["state_dict"].items())
    seg = Segmenter(model)
    assert seg.threshold == 0.45 and seg.threshold_of(roi("celiac_trunk").index) == 0.25
    assert refresh(model, str(tmp_path / "preset.json")) is False  # nothing to do the second time
