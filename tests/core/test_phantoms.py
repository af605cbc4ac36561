"""Tests of the synthetic CT phantom generator (cdpdnet.phantoms). Fast: a handful of 3 mm phantoms."""

import dataclasses
import json
import time

import numpy as np
import pytest

from cdpdnet.phantoms import (
    FULL_SOURCE,
    PHANTOM_SOURCES,
    REFERENCE_PHANTOM_SOURCES,
    SCAN_PROTOCOLS,
    SOURCE_SETS,
    Phantom,
    make_phantom,
    source_label,
    write_phantom_dataset,
)
from cdpdnet.taxonomy import NUM_CLASSES, ROI_BY_NAME, ROIS, sampling_keys

L = {r.name: r.index for r in ROIS}


@pytest.fixture(scope="module")
def phantoms():
    return [make_phantom(s) for s in (0, 1)]


def centroid(ph: Phantom, name: str) -> np.ndarray:
    idx = np.argwhere(ph.label == L[name])
    return (ph.affine[:3, :3] @ idx.mean(0)) + ph.affine[:3, 3]


def test_deterministic_for_a_seed(phantoms):
    again = make_phantom(0)
    assert np.array_equal(again.image, phantoms[0].image)
    assert np.array_equal(again.label, phantoms[0].label)
    assert np.array_equal(again.affine, phantoms[0].affine)


def test_different_seeds_differ(phantoms):
    a, b = phantoms
    assert not np.array_equal(a.label, b.label)
    assert np.mean(a.image != b.image) > 0.5


def test_generation_time():
    t = time.perf_counter()
    make_phantom(123)
    assert time.perf_counter() - t < 5.0  # ~0.5 s on one core; generous for loaded CI machines


def test_shapes_dtypes_affine(phantoms):
    for ph in phantoms:
        assert ph.image.dtype == np.int16 and ph.label.dtype == np.uint8
        assert ph.image.shape == ph.label.shape == ph.organ_label.shape == (110, 87, 150)
        assert ph.spacing == (3.0, 3.0, 3.0)
        assert ph.affine.shape == (4, 4) and ph.affine.dtype == np.float64
        assert np.allclose(np.diag(ph.affine)[:3], ph.spacing)
        assert np.allclose(ph.affine[3], [0, 0, 0, 1])
        assert np.allclose(ph.affine[:3, :3], np.diag(ph.spacing))
        centre = ph.affine @ np.r_[(np.array(ph.shape) - 1) / 2.0, 1.0]
        assert np.allclose(centre[:3], 0.0)
        assert ph.label.max() <= NUM_CLASSES


def test_other_spacing_and_shape():
    ph = make_phantom(3, spacing=(6.0, 6.0, 5.0))
    assert ph.image.shape == (55, 43, 90)
    assert np.allclose(np.diag(ph.affine)[:3], (6.0, 6.0, 5.0))
    assert set(np.unique(ph.label)) >= {L["liver"], L["spleen"], L["aorta"], L["lung_left"]}
    ph = make_phantom(3, spacing=(4.0, 4.0, 4.0), shape=(80, 64, 96))
    assert ph.image.shape == (80, 64, 96)


def test_every_roi_present_with_enough_voxels(phantoms):
    for ph in phantoms:
        counts = ph.roi_voxel_counts()
        assert len(counts) == NUM_CLASSES
        small = {k: v for k, v in counts.items() if v < 30}
        assert not small, f"seed {ph.seed}: {small}"


def test_lesions_inside_their_hosts(phantoms):
    for ph in phantoms:
        assert not np.isin(ph.organ_label, [r.index for r in ROIS if r.is_lesion]).any()
        for r in ROIS:
            if not r.is_lesion:
                continue
            m = ph.label == r.index
            assert m.any(), r.name
            hosts = np.unique(ph.organ_label[m])
            allowed = {L[h] for h in r.hosts}
            assert set(hosts.tolist()) <= allowed, (ph.seed, r.name, hosts)
        # outside lesions the organ label is the label
        les = np.isin(ph.label, [r.index for r in ROIS if r.is_lesion])
        assert np.array_equal(ph.label[~les], ph.organ_label[~les])
        assert {d["roi"] for d in ph.lesions} == {r.name for r in ROIS if r.is_lesion}


def test_ras_orientation(phantoms):
    """RAS as nibabel/MONAI read it: axis 0 towards the patient's Right, 1 anterior, 2 superior."""
    import nibabel as nib

    for ph in phantoms:
        assert nib.aff2axcodes(ph.affine) == ("R", "A", "S")
        c = {n: centroid(ph, n) for n in L}
        assert c["liver"][0] > c["spleen"][0]
        assert c["kidney_right"][0] > c["kidney_left"][0]
        assert c["lung_right"][0] > c["lung_left"][0]
        assert c["femur_head_right"][0] > c["femur_head_left"][0]
        assert c["adrenal_gland_right"][0] > c["adrenal_gland_left"][0]
        assert c["inferior_vena_cava"][0] > c["aorta"][0]
        assert c["lung_right"][2] > c["liver"][2] > c["kidney_right"][2] > c["urinary_bladder"][2]
        assert c["urinary_bladder"][2] > c["prostate"][2]
        assert c["adrenal_gland_right"][2] > c["kidney_right"][2]
        assert c["gallbladder"][1] > c["kidney_right"][1]  # anterior
        assert c["urinary_bladder"][1] > c["rectum"][1]
        assert c["pancreas"][1] > c["aorta"][1]


def test_hu_ranges(phantoms):
    for ph in phantoms:
        im = ph.image.astype(np.float64)

        def mean(*names):
            return im[np.isin(ph.label, [L[n] for n in names])].mean()

        assert mean("lung_right", "lung_left") < -600
        assert 40 < mean("liver") < 130
        assert mean("femur_head_left", "femur_head_right") > 200
        assert abs(im[:4, :4, :].mean() + 1000) < 15  # air outside the body
        assert mean("aorta") > 120 and mean("urinary_bladder") < 30
        assert mean("liver_tumor") < mean("liver") - 25
        assert mean("pancreas_tumor") < mean("pancreas") - 20
        assert mean("kidney_cyst") < 30 and mean("kidney_tumor") < mean("kidney_left") - 50
        assert mean("lung_tumor") > -300
        assert ph.image.min() >= -1024 and ph.image.max() <= 3071
        soft = im[np.isin(ph.label, [L["spleen"], L["pancreas"], L["prostate"]])]
        assert 20 < soft.mean() < 130


def test_sources_cover_all_rois_and_are_partial():
    seen = {}
    for src, names in PHANTOM_SOURCES.items():
        assert src != FULL_SOURCE
        for n in names:
            assert n in ROI_BY_NAME, n
            seen.setdefault(n, []).append(src)
    assert set(seen) == set(ROI_BY_NAME)
    assert len(PHANTOM_SOURCES) >= 3
    assert all(len(v) < NUM_CLASSES for v in PHANTOM_SOURCES.values())
    assert sum(len(v) == 1 for v in seen.values()) >= 5


def test_reference_sources_are_the_published_sampling_keys():
    keys = sampling_keys()
    assert list(REFERENCE_PHANTOM_SOURCES) == [f"phantom_{k}" for k in keys] and len(keys) == 16
    for key, values in keys.items():
        assert REFERENCE_PHANTOM_SOURCES[f"phantom_{key}"] == tuple(ROIS[v - 1].name for v in values)
    annotating = {n: sum(n in v for v in REFERENCE_PHANTOM_SOURCES.values()) for n in ROI_BY_NAME}
    assert min(annotating.values()) == 1  # every ROI is annotated somewhere
    assert annotating["liver"] == 10 and annotating["lung_right"] == annotating["hepatic_vessel"] == 1
    assert sum(c == 1 for c in annotating.values()) == 17  # what most sites leave unlabelled
    assert SOURCE_SETS == {"phantom": PHANTOM_SOURCES, "reference": REFERENCE_PHANTOM_SOURCES}


def test_source_label_folds_lesions_into_annotated_hosts(phantoms):
    ph = phantoms[0]
    btcv = ph.source_label("phantom_btcv")
    assert set(np.unique(btcv).tolist()) <= set(range(15))
    n_liver = np.isin(ph.label, [L["liver"], L["liver_tumor"], L["hepatic_vessel_tumor"]]).sum()
    assert (btcv == L["liver"]).sum() == n_liver
    assert (btcv == L["pancreas"]).sum() == np.isin(ph.label, [L["pancreas"], L["pancreas_tumor"]]).sum()
    assert (btcv[ph.label == L["hepatic_vessel"]] == 0).all()  # not annotated, not a lesion
    kid = ph.source_label("phantom_kidney")
    assert set(np.unique(kid).tolist()) == {0, L["kidney_right"], L["kidney_left"], L["kidney_tumor"], L["kidney_cyst"]}
    assert np.array_equal(kid == L["kidney_tumor"], ph.label == L["kidney_tumor"])
    pel = source_label(ph.label, ph.organ_label, PHANTOM_SOURCES["phantom_pelvis_chest"])
    assert (pel[ph.label == L["liver_tumor"]] == 0).all()  # host not annotated -> background
    assert np.array_equal(pel == L["lung_tumor"], ph.label == L["lung_tumor"])
    full = source_label(ph.label, ph.organ_label, [r.name for r in ROIS])
    assert np.array_equal(full, ph.label)


def test_write_phantom_dataset(tmp_path):
    import nibabel as nib

    path = write_phantom_dataset(tmp_path / "ds", n_per_source=1, n_heldout=1, seed=7)
    assert path.name == "dataset.json" and path.is_file()
    ds = json.loads(path.read_text())
    assert ds["name"] == "cdpdnet-phantoms" and ds["modality"] == {"0": "CT"}
    assert ds["labels"] == {"0": "background", **{str(r.index): r.name for r in ROIS}}
    assert ds["sources"] == {k: list(v) for k, v in PHANTOM_SOURCES.items()}
    assert len(ds["training"]) == len(PHANTOM_SOURCES) and len(ds["test"]) == 1
    seeds = [c["seed"] for c in ds["training"] + ds["test"]]
    assert len(set(seeds)) == len(seeds)
    for case in ds["training"] + ds["test"]:
        img = nib.load(str(path.parent / case["image"]))
        lab = nib.load(str(path.parent / case["label"]))
        assert case["image"].startswith(("imagesTr/", "imagesTs/")) and case["image"].endswith(".nii.gz")
        assert img.get_data_dtype() == np.int16 and lab.get_data_dtype() == np.uint8
        assert img.shape == lab.shape == (110, 87, 150)
        assert np.allclose(img.affine, lab.affine) and np.allclose(np.diag(img.affine)[:3], 3.0)
        values = set(np.unique(np.asarray(lab.dataobj)).tolist()) - {0}
        allowed = {L[n] for n in case["annotated"]}
        assert values <= allowed, (case["source"], values - allowed)
        if case in ds["test"]:
            assert case["source"] == FULL_SOURCE
            assert values == set(range(1, NUM_CLASSES + 1))
        else:
            assert case["annotated"] == list(PHANTOM_SOURCES[case["source"]])
            assert values == allowed  # every annotated ROI present in every case
    assert not [p for p in path.parent.rglob("*") if "tmp" in p.name]


def test_cli_writes_the_reference_source_set(tmp_path, capsys):
    """`cdpdnet phantoms --sources reference`: 16 sources, each case labelled with its source's ROIs only."""
    import nibabel as nib

    from cdpdnet.cli import main

    assert main(["phantoms", str(tmp_path / "ref"), "--sources", "reference", "--per-source", "1",
                 "--heldout", "0", "--spacing", "9"]) == 0
    ds = json.loads((tmp_path / "ref" / "dataset.json").read_text())
    assert ds["sources"] == {k: list(v) for k, v in REFERENCE_PHANTOM_SOURCES.items()}
    assert [c["source"] for c in ds["training"]] == list(REFERENCE_PHANTOM_SOURCES) and ds["test"] == []
    for case in ds["training"]:
        values = set(np.unique(np.asarray(nib.load(str(tmp_path / "ref" / case["label"])).dataobj)).tolist()) - {0}
        assert values == {L[n] for n in REFERENCE_PHANTOM_SOURCES[case["source"]]}, case["source"]
    with pytest.raises(ValueError, match="unknown source set 'btcv'"):
        write_phantom_dataset(tmp_path / "bad", n_per_source=1, n_heldout=0, sources="btcv")
    with pytest.raises(ValueError, match="unknown virtual source 'phantom_99'"):
        make_phantom(0, (9, 9, 9)).source_label("phantom_99")


def _high_frequency_sd(image: np.ndarray, label: np.ndarray) -> float:
    """The noise a network sees: the image minus its 3x3x3 mean, inside the liver."""
    from scipy import ndimage

    img = image.astype(np.float32)
    return float((img - ndimage.uniform_filter(img, 3))[ndimage.binary_erosion(label == L["liver"], iterations=2)].std())


def test_scan_protocols_change_the_rendering_not_the_anatomy():
    """One seed under two protocols: the same label map; the low-dose protocol is noisier, the arterial one's aorta
    brighter. Without a protocol a seed renders as before (noise drawn at random)."""
    by_name = {p.name: p for p in SCAN_PROTOCOLS}
    standard, low_dose, smooth, arterial = (by_name[n] for n in (
        "portal venous, standard dose", "low dose, sharp kernel", "smooth kernel, high dose", "arterial-weighted contrast"))
    ph = {p.name: make_phantom(5, (6.0, 6.0, 6.0), protocol=p) for p in (standard, low_dose, smooth, arterial)}
    labels = [x.label for x in ph.values()]
    assert all(np.array_equal(labels[0], lab) for lab in labels[1:])
    noise = {n: _high_frequency_sd(x.image, x.label) for n, x in ph.items()}
    assert noise[low_dose.name] > 1.3 * noise[standard.name] > 1.3 * noise[smooth.name], noise
    aorta = {n: float(x.image[x.label == L["aorta"]].mean()) for n, x in ph.items()}
    assert aorta[arterial.name] > aorta[standard.name] + 20, aorta
    plain = make_phantom(5, (6.0, 6.0, 6.0))
    assert np.array_equal(plain.label, labels[0]) and np.array_equal(plain.image, make_phantom(5, (6.0, 6.0, 6.0)).image)


def test_write_phantom_dataset_with_scan_protocols(tmp_path, capsys):
    """`cdpdnet phantoms --scan-protocols`: source k scanned with protocol k, held-out case i like source i; recorded."""
    from cdpdnet.cli import main
    from cdpdnet.data import load_datalist

    assert main(["phantoms", str(tmp_path / "p"), "--per-source", "1", "--heldout", "6", "--spacing", "9",
                 "--scan-protocols"]) == 0
    ds = json.loads((tmp_path / "p" / "dataset.json").read_text())
    sources = list(PHANTOM_SOURCES)
    assert ds["scan_protocols"] == {s: dataclasses.asdict(SCAN_PROTOCOLS[k]) for k, s in enumerate(sources)}
    assert [(c["source"], c["protocol"]) for c in ds["training"]] == [(s, SCAN_PROTOCOLS[k].name)
                                                                       for k, s in enumerate(sources)]
    assert [c["scanned_like"] for c in ds["test"]] == sources + sources[:1]
    assert [c["protocol"] for c in ds["test"]] == [SCAN_PROTOCOLS[k % 5].name for k in range(6)]
    dl = load_datalist(tmp_path / "p" / "dataset.json")  # the extra keys do not disturb loading
    assert len(dl.training) == 5 and len(dl.test) == 6
    plain = write_phantom_dataset(tmp_path / "plain", n_per_source=1, n_heldout=1, spacing=(9, 9, 9))
    ds = json.loads(plain.read_text())
    assert "scan_protocols" not in ds and not [c for c in ds["training"] + ds["test"] if "protocol" in c]
