"""Checkpoints and inference: file to file, in the input's own space; bad input gets clear errors."""

import math

import nibabel as nib
import numpy as np
import pytest
import torch

from cdpdnet.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from cdpdnet.factory import model_from_checkpoint
from cdpdnet.imageio import InvalidImageError
from cdpdnet.inference import Segmenter, required_channels
from cdpdnet.phantoms import make_phantom
from cdpdnet.taxonomy import UnknownROIError, roi_index


def test_checkpoint_round_trip(tiny_checkpoint, tmp_path):
    a = model_from_checkpoint(tiny_checkpoint)
    b = model_from_checkpoint(load_checkpoint(tiny_checkpoint))
    for (k, v), (k2, v2) in zip(a.model.net.state_dict().items(), b.model.net.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(a.model(x, 1), b.model(x, 1))
    assert a.tasks[1]["name"] == "b" and a.task_id("b") == 1 and a.task_id(None) == -1
    with pytest.raises(ValueError, match="unknown source dataset"):
        a.task_id("nope")


def test_corrupt_and_foreign_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="trunc.pt"):
        model_from_checkpoint(tmp_path / "trunc.pt")
    torch.save({"net": {"w": torch.zeros(1)}}, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointError, match="not a CDPDNet checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        load_checkpoint(tmp_path / "text.pt")
    ck = load_checkpoint(tiny_checkpoint)
    ck["state_dict"] = {k: v for k, v in ck["state_dict"].items() if "decoder" not in k}
    save_checkpoint(tmp_path / "partial.pt", {k: v for k, v in ck.items() if k not in ("format", "format_version")})
    with pytest.raises(CheckpointError, match="does not fit"):
        model_from_checkpoint(tmp_path / "partial.pt")


def test_checkpoint_write_is_atomic(tiny_checkpoint, tmp_path, monkeypatch):
    target = tmp_path / "model.pt"
    target.write_bytes(tiny_checkpoint.read_bytes())
    before = target.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr("os.fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(target, {"preset": {}, "state_dict": {}, "tasks": []})
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary left behind


@pytest.fixture(scope="module")
def segmenter(tiny_checkpoint):
    return Segmenter(tiny_checkpoint)


def _lps_nifti(path, spacing=(0.9, 1.1, 4.0), shape=(60, 50, 24)):
    """A phantom stored in LPS orientation with anisotropic spacing and an off-centre origin."""
    ph = make_phantom(3, spacing=spacing, shape=shape)
    img = ph.image[::-1, ::-1, :].copy()
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [40.0, 30.0, -20.0]
    nii = nib.Nifti1Image(img, aff)
    nib.save(nii, path)
    return img, aff


def test_output_has_the_inputs_shape_affine_and_orientation(segmenter, tmp_path):
    img, aff = _lps_nifti(tmp_path / "ct.nii.gz")
    res = segmenter.segment(tmp_path / "ct.nii.gz", output=tmp_path / "seg.nii.gz")
    out = nib.load(tmp_path / "seg.nii.gz")
    assert out.shape == img.shape
    np.testing.assert_allclose(out.affine, aff, atol=1e-5)
    assert nib.aff2axcodes(out.affine) == ("L", "P", "S")
    assert out.get_data_dtype() == np.uint8
    assert res.label.shape == img.shape and res.label.dtype == np.uint8
    assert set(np.unique(res.label).tolist()) <= set(range(33))
    assert {"load", "preprocess", "network", "postprocess", "resample", "write"} <= set(res.timings)


def test_label_lands_on_the_same_physical_voxels(segmenter, monkeypatch):
    """With an oracle network (liver = bright voxels), the label map comes back where the object was,
    through RAS reorientation, 6 mm resampling, body crop and the way back."""
    spacing = (2.0, 2.5, 3.0)
    img = np.full((60, 48, 40), -1000.0, dtype=np.float32)
    img[5:55, 4:44, 3:37] = 0.0  # body
    img[30:45, 10:25, 12:27] = 200.0  # bright box, off-centre
    aff = np.diag([-spacing[0], -spacing[1], spacing[2], 1.0])
    aff[:3, 3] = [10.0, -5.0, 7.0]
    liver = roi_index("liver")

    def oracle(self, x, channels, task_id=-1):
        out = torch.full((1, len(channels), *x.shape[2:]), -10.0)
        out[0, channels.index(liver)] = (x[0, 0] > 0.6).float() * 20 - 10
        return out

    monkeypatch.setattr(Segmenter, "predict_logits", oracle)
    res = segmenter.segment(img, rois=["liver"], affine=aff)
    pred, truth = res.label == liver, img > 100
    dice = 2 * (pred & truth).sum() / (pred.sum() + truth.sum())
    assert dice > 0.8, dice
    np.testing.assert_allclose(np.argwhere(pred).mean(0), np.argwhere(truth).mean(0), atol=1.5)


def test_roi_subset_and_names(segmenter, tmp_path):
    ph = make_phantom(1, spacing=(6.0, 6.0, 6.0))
    res = segmenter.segment(ph.image, rois=["liver", "IVC"], affine=ph.affine, task="b")
    assert res.rois == [roi_index("liver"), roi_index("inferior_vena_cava")]
    assert set(res.present()) <= set(res.rois)
    with pytest.raises(UnknownROIError, match="closest"):
        segmenter.segment(ph.image, rois=["livr"], affine=ph.affine)


def test_required_channels_include_hosts_and_pairs():
    need = required_channels([roi_index("liver_tumor"), roi_index("lung_left")])
    assert roi_index("liver") in need and roi_index("lung_right") in need


@pytest.mark.parametrize("make,match", [
    (lambda: np.zeros((40, 40)), "2D|dimensions|3D"),
    (lambda: np.full((20, 20, 20), np.nan, dtype=np.float32), "NaN"),
    (lambda: np.zeros((20, 20, 20), dtype=np.float32), "constant"),
    (lambda: np.zeros((20, 20, 2), dtype=np.float32) + np.arange(2), "at least"),
])
def test_bad_arrays_are_refused_clearly(segmenter, make, match):
    with pytest.raises((InvalidImageError, ValueError), match=match):
        segmenter.segment(make())


def test_bad_files_are_refused_clearly(segmenter, tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InvalidImageError, match="could not be read"):
        segmenter.segment(tmp_path / "bad.nii.gz")
    nib.save(nib.Nifti1Image(np.random.rand(10, 10, 10, 3).astype(np.float32), np.eye(4)), tmp_path / "4d.nii.gz")
    with pytest.raises(InvalidImageError, match="channels or time points"):
        segmenter.segment(tmp_path / "4d.nii.gz")
    with pytest.raises(InvalidImageError, match="does not exist"):
        segmenter.segment(tmp_path / "missing.nii.gz")


def test_cli_infer_and_clear_errors(tiny_checkpoint, tmp_path, capsys):
    from cdpdnet.cli import main

    ph = make_phantom(2, spacing=(6.0, 6.0, 6.0))
    nib.save(nib.Nifti1Image(ph.image, ph.affine), tmp_path / "ct.nii.gz")
    assert main(["infer", "--model", str(tiny_checkpoint), "--input", str(tmp_path / "ct.nii.gz"),
                 "--output", str(tmp_path / "out.nii.gz"), "--rois", "liver,spleen"]) == 0
    assert nib.load(tmp_path / "out.nii.gz").shape == ph.image.shape
    assert main(["infer", "--model", str(tiny_checkpoint), "--input", str(tmp_path / "ct.nii.gz"), "--output",
                 str(tmp_path / "o2.nii.gz"), "--rois", "liver", "--roi-threshold", "liver=0.3"]) == 0
    for bad, says in (("liver:0.3", "NAME=VALUE"), ("livr=0.3", "livr"), ("liver=1.3", "must be in (0, 1)")):
        assert main(["infer", "--model", str(tiny_checkpoint), "--input", str(tmp_path / "ct.nii.gz"),
                     "--output", str(tmp_path / "o3.nii.gz"), "--roi-threshold", bad]) == 2
        assert says in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"junk")
    assert main(["infer", "--model", str(tmp_path / "junk.pt"), "--input", str(tmp_path / "ct.nii.gz"),
                 "--output", str(tmp_path / "o.nii.gz")]) == 2
    assert "not a PyTorch checkpoint" in capsys.readouterr().err


def test_cli_phantoms_and_evaluate(tiny_checkpoint, tmp_path, capsys):
    from cdpdnet.cli import main

    assert main(["phantoms", str(tmp_path / "ph"), "--per-source", "1", "--heldout", "1", "--spacing", "6"]) == 0
    assert main(["evaluate", "--model", str(tiny_checkpoint), "--data", str(tmp_path / "ph" / "dataset.json"),
                 "--split", "test", "--out", str(tmp_path / "report.md")]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "liver" in report and "hd95" in report.lower()
    assert main(["map-labels", "IVC", "vertebra_L1"]) == 0
    out = capsys.readouterr().out
    assert "inferior_vena_cava" in out and "not mapped" in out


def test_coarse_model_draws_smooth_borders_on_a_fine_input(segmenter, monkeypatch):
    """The model grid (6 mm for ``tiny``) is coarser than the input (1.5 mm): probabilities are resampled
    trilinearly, so a 36 mm sphere comes back round at 1.5 mm, and the component that post-processing
    dropped (liver keeps its largest component) does not come back through the interpolation."""
    n, sp = 64, 1.5
    grid = np.stack(np.meshgrid(*[np.arange(n) * sp] * 3, indexing="ij"), -1)
    big = np.linalg.norm(grid - [40.3, 47.1, 44.6], axis=-1) < 18.0
    small = np.linalg.norm(grid - [80.0, 30.0, 30.0], axis=-1) < 9.0
    img = np.full((n, n, n), 0.0, dtype=np.float32)
    img[big | small] = 200.0
    aff = np.diag([sp, sp, sp, 1.0])
    liver = roi_index("liver")

    def oracle(self, x, channels, task_id=-1):
        out = torch.full((1, len(channels), *x.shape[2:]), -10.0)
        out[0, channels.index(liver)] = (x[0, 0] - 0.647) * 40  # midway between 0 and 200 HU, graded at the border
        return out

    monkeypatch.setattr(Segmenter, "predict_logits", oracle)
    res = segmenter.segment(img, rois=["liver"], affine=aff)
    assert res.model_space_shape[0] < n // 3  # the model really worked on a coarser grid
    pred = res.label == liver
    dice = 2 * (pred & big).sum() / (pred.sum() + big.sum())
    assert dice > 0.9, dice  # measured 0.923; nearest resampling of the label map gave 0.873
    assert not (pred & small).any()


def _liver_with_uncertain_tumour(monkeypatch) -> np.ndarray:
    """A 40^3 volume (3 mm) of an organ sphere with a lesion inside, and a model (monkeypatched) that
    gives the liver p = 0.9 and the liver tumour p = 0.35 on the lesion, -10 logits elsewhere."""
    n = 40
    grid = np.stack(np.meshgrid(*[np.arange(n) * 3.0] * 3, indexing="ij"), -1)
    r = np.linalg.norm(grid - 60.0, axis=-1)
    img = np.where(r < 45.0, 100.0, 0.0) + np.where(r < 18.0, 100.0, 0.0)  # organ 100 HU, lesion 200 HU
    liver, tumour = roi_index("liver"), roi_index("liver_tumor")

    def oracle(self, x, channels, task_id=-1):
        out = torch.full((1, len(channels), *x.shape[2:]), -10.0)
        out[0, channels.index(liver)][x[0, 0] > 0.55] = math.log(0.9 / 0.1)
        out[0, channels.index(tumour)][x[0, 0] > 0.8] = math.log(0.35 / 0.65)  # p = 0.35 in the lesion
        return out

    monkeypatch.setattr(Segmenter, "predict_logits", oracle)
    return img.astype(np.float32)


def test_lesion_threshold_applies_to_lesions_only(tiny_checkpoint, monkeypatch):
    """``lesion_threshold`` cuts the tumour and cyst channels, ``threshold`` the organs."""
    img = _liver_with_uncertain_tumour(monkeypatch)
    liver, tumour = roi_index("liver"), roi_index("liver_tumor")
    aff = np.diag([3.0, 3.0, 3.0, 1.0])
    found = {}
    for lt in (0.3, 0.4):
        seg = Segmenter(tiny_checkpoint, threshold=0.4, lesion_threshold=lt)
        label = seg.segment(img.astype(np.float32), rois=["liver", "liver_tumor"], affine=aff).label
        found[lt] = set(np.unique(label).tolist()) - {0}
        assert label[20, 20, 20] == (tumour if lt == 0.3 else liver)
    assert found == {0.3: {liver, tumour}, 0.4: {liver}}
    assert Segmenter(tiny_checkpoint, threshold=0.45).lesion_threshold == 0.45  # default: the threshold
    with pytest.raises(ValueError, match="lesion_threshold must be in"):
        Segmenter(tiny_checkpoint, lesion_threshold=1.5)


def test_roi_thresholds_override_for_single_rois(tiny_checkpoint, monkeypatch):
    """``roi_thresholds`` (argument, else the preset's ``infer.roi_thresholds``) sets one ROI's threshold
    above ``threshold`` and ``lesion_threshold``; names go through the taxonomy (synonyms too)."""
    img = _liver_with_uncertain_tumour(monkeypatch)
    liver, tumour = roi_index("liver"), roi_index("liver_tumor")
    aff = np.diag([3.0, 3.0, 3.0, 1.0])

    def present(seg: Segmenter) -> set[int]:
        return set(np.unique(seg.segment(img, rois=["liver", "liver_tumor"], affine=aff).label).tolist()) - {0}

    assert present(Segmenter(tiny_checkpoint, threshold=0.4, lesion_threshold=0.4)) == {liver}
    seg = Segmenter(tiny_checkpoint, threshold=0.4, lesion_threshold=0.4, roi_thresholds={"liver tumour": 0.3})
    assert seg.threshold_of(tumour) == 0.3 and seg.threshold_of(liver) == 0.4
    assert seg.threshold_of(roi_index("kidney_tumor")) == 0.4  # other lesions keep lesion_threshold
    assert present(seg) == {liver, tumour}
    # the preset's map is the default, {} turns it off, and an entry beats lesion_threshold either way
    loaded = model_from_checkpoint(tiny_checkpoint)
    loaded.preset.infer["roi_thresholds"] = {"liver_tumor": 0.3, "liver": 0.8}
    assert present(Segmenter(loaded, threshold=0.4, lesion_threshold=0.5)) == {liver, tumour}
    assert present(Segmenter(loaded, roi_thresholds={"liver": 0.95})) == set()  # the tumour goes with its host
    assert present(Segmenter(loaded, threshold=0.4, lesion_threshold=0.4, roi_thresholds={})) == {liver}
    with pytest.raises(UnknownROIError):
        Segmenter(tiny_checkpoint, roi_thresholds={"livr tumour": 0.3})
    with pytest.raises(ValueError, match="roi_thresholds\\['celiac_trunk'\\] must be in"):
        Segmenter(tiny_checkpoint, roi_thresholds={"celiac_trunk": 0.0})


def test_cli_lesion_mirror_follows_the_preset_unless_told_otherwise(tiny_checkpoint, tmp_path, monkeypatch):
    """``cdpdnet infer``: a checkpoint whose preset reads the lung tumour twice (``infer.lesion_mirror``
    ``"max"``, ``lesion_mirror_rois`` ``["lung_tumor"]``, as ``lite-wide``) runs the second, mirrored
    sliding window only when the lung tumour is asked for; ``--lesion-mirror off`` saves that pass."""
    import cdpdnet.inference as inference
    from cdpdnet.cli import main

    calls = []
    real = inference.sliding_window_inference
    monkeypatch.setattr(inference, "sliding_window_inference", lambda *a, **k: calls.append(1) or real(*a, **k))
    nib.save(nib.Nifti1Image(np.random.default_rng(0).normal(0, 100, (24, 20, 16)).astype(np.float32),
                             np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "ct.nii.gz")
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["preset"]["infer"].update(lesion_mirror="max", lesion_mirror_rois=["lung_tumor"])
    save_checkpoint(tmp_path / "m.pt", ckpt)

    def passes(*extra: str) -> int:
        calls.clear()
        assert main(["infer", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "ct.nii.gz"),
                     "--output", str(tmp_path / "seg.nii.gz"), *extra]) == 0
        return len(calls)

    assert passes("--rois", "lung tumour") == 2
    assert passes("--rois", "lung tumour", "--lesion-mirror", "off") == 1
    assert passes("--rois", "liver,liver tumour") == 1  # the liver's lesions: one pass


def test_cli_roi_threshold_sets_one_entry_over_the_presets_map(tiny_checkpoint, tmp_path, monkeypatch):
    """``cdpdnet infer --roi-threshold NAME=VALUE`` changes that ROI only: the preset's other per-ROI
    thresholds stay (a synonym replaces the preset's entry of the same ROI), and ``--no-roi-thresholds``
    drops the preset's map."""
    from cdpdnet.cli import main

    img = _liver_with_uncertain_tumour(monkeypatch)  # liver p 0.9, liver tumour p 0.35
    nib.save(nib.Nifti1Image(img, np.diag([3.0, 3.0, 3.0, 1.0])), tmp_path / "ct.nii.gz")
    ckpt = load_checkpoint(tiny_checkpoint)
    ckpt["preset"]["infer"].update(threshold=0.4, lesion_threshold=0.4, roi_thresholds={"liver_tumor": 0.3})
    save_checkpoint(tmp_path / "m.pt", ckpt)
    liver, tumour = roi_index("liver"), roi_index("liver_tumor")

    def present(*extra: str) -> set[int]:
        out = tmp_path / "seg.nii.gz"
        assert main(["infer", "--model", str(tmp_path / "m.pt"), "--input", str(tmp_path / "ct.nii.gz"),
                     "--output", str(out), "--rois", "liver,liver_tumor", *extra]) == 0
        return set(np.unique(np.asarray(nib.load(out).dataobj)).tolist()) - {0}

    assert present() == {liver, tumour}  # the preset's 0.3 lets the p 0.35 tumour through
    assert present("--roi-threshold", "liver=0.5") == {liver, tumour}  # the tumour's 0.3 kept
    assert present("--roi-threshold", "liver=0.95") == set()  # the tumour goes with its host
    assert present("--roi-threshold", "liver tumour=0.5") == {liver}  # a synonym replaces the entry
    assert present("--no-roi-thresholds") == {liver}  # lesion_threshold 0.4 again
    assert present("--no-roi-thresholds", "--roi-threshold", "liver_tumor=0.3") == {liver, tumour}


def test_lesion_mirror_reads_the_lesion_channels_on_the_mirrored_volume_too(tiny_checkpoint):
    """``lesion_mirror`` (argument, else the preset's ``infer.lesion_mirror``; off by default): a second
    pass on the volume mirrored left-right, flipped back, combined with the first for the lesion
    channels only (the mean probability, or the larger); organ channels keep the single pass."""
    torch.manual_seed(0)
    x = torch.rand(1, 1, 24, 20, 16)
    liver, tumour, cyst = roi_index("liver"), roi_index("liver_tumor"), roi_index("kidney_cyst")
    chans = [liver, tumour, cyst]
    one = Segmenter(tiny_checkpoint)
    assert one.lesion_mirror == "off"
    plain = one.predict_logits(x, chans)
    mirrored = one.predict_logits(torch.flip(x, [2]), chans).flip(2)  # RAS: axis 0 runs left-right
    assert not torch.allclose(plain, mirrored)  # a random tiny network is not mirror-symmetric
    mean = Segmenter(tiny_checkpoint, lesion_mirror="mean").predict_logits(x, chans)
    top = Segmenter(tiny_checkpoint, lesion_mirror="max").predict_logits(x, chans)
    for both in (mean, top):
        assert torch.equal(both[:, 0], plain[:, 0])  # the liver: one pass
    p = (torch.sigmoid(plain[:, 1:]) + torch.sigmoid(mirrored[:, 1:])) / 2
    assert torch.allclose(torch.sigmoid(mean[:, 1:]), p, atol=1e-5)
    assert torch.allclose(top[:, 1:], torch.maximum(plain[:, 1:], mirrored[:, 1:]))
    with pytest.raises(ValueError, match="lesion_mirror must be 'off', 'mean' or 'max', got 'both'"):
        Segmenter(tiny_checkpoint, lesion_mirror="both")
    # lesion_mirror_rois: only the lesions named get the second pass; an organ there is refused by name
    only = Segmenter(tiny_checkpoint, lesion_mirror="max", lesion_mirror_rois=["kidney cyst"]).predict_logits(x, chans)
    assert torch.equal(only[:, :2], plain[:, :2]) and torch.equal(only[:, 2], top[:, 2])
    with pytest.raises(ValueError, match=r"lesion_mirror_rois must name lesions \(tumours, cyst\), got organs \['liver'\]"):
        Segmenter(tiny_checkpoint, lesion_mirror="max", lesion_mirror_rois=["liver", "lung_tumor"])


def test_segmenter_filters_before_down_sampling_when_the_checkpoints_preset_says_so(tiny_checkpoint, monkeypatch):
    """``preprocess.anti_alias`` travels in the checkpoint: inference filters as training did."""
    seen = {}

    def spy(self, x, channels, task_id=-1):
        seen[self.preset.preprocess.get("anti_alias", False)] = x[0, 0].float().numpy() * 425.0 - 175.0
        return torch.full((len(channels), *x.shape[2:]), -10.0)

    monkeypatch.setattr(Segmenter, "predict_logits", spy)
    rng = np.random.default_rng(0)
    img = (40.0 + 20.0 * rng.standard_normal((64, 64, 64))).astype(np.float32)  # 3 mm, to the tiny preset's 6 mm
    for aa in (False, True):
        loaded = model_from_checkpoint(tiny_checkpoint)
        loaded.preset.preprocess["anti_alias"] = aa
        Segmenter(loaded).segment(img, rois=["liver"], affine=np.diag([3.0, 3.0, 3.0, 1.0]))
    assert seen[False].shape == seen[True].shape == (32, 32, 32)
    inner = (slice(2, -2),) * 3
    assert seen[True][inner].std() < 0.6 * seen[False][inner].std()


def test_subgrids_are_the_presets_grid_and_its_half_voxel_shifts(tiny_checkpoint):
    """``subgrids``: the first grid is the one a single-grid Segmenter reads; each other grid is shifted
    by half a voxel along the axes of its shift, and holds the image at the points its affine names (a
    linear ramp, which trilinear resampling reproduces exactly, so a wrong affine would show)."""
    sp, shape = 3.0, (40, 36, 32)
    aff = np.diag([sp, sp, sp, 1.0])
    aff[:3, 3] = [10.0, -20.0, 5.0]
    coef = np.array([0.5, -0.3, 0.2])  # HU per mm along x, y, z: 40 +- 110 HU, inside the window, all body

    def ramp(world):
        return 40.0 + (world - aff[:3, 3] - 60.0) @ coef

    idx = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1)
    img = ramp(idx * sp + aff[:3, 3]).astype(np.float32)
    one = Segmenter(tiny_checkpoint).model_grids(Segmenter._as_metatensor(img, aff))
    eight = Segmenter(tiny_checkpoint, subgrids=8).model_grids(Segmenter._as_metatensor(img, aff))
    assert len(one) == 1 and len(eight) == 8
    base = np.asarray(one[0].affine)
    np.testing.assert_allclose(np.asarray(eight[0].affine), base)
    n = [min(a, b) for a, b in zip(one[0].shape[1:], eight[0].shape[1:])]
    np.testing.assert_allclose(eight[0][:, :n[0], :n[1], :n[2]], one[0][:, :n[0], :n[1], :n[2]], atol=1e-6)
    shifts = set()
    for g in eight:
        a = np.asarray(g.affine)
        np.testing.assert_allclose(a[:3, :3], base[:3, :3])  # 6 mm, RAS
        shifts.add(tuple(np.round(((a[:3, 3] - base[:3, 3]) / 3.0) % 2).astype(int)))  # in half voxels
        gi = np.stack(np.meshgrid(*[np.arange(k - 1) for k in g.shape[1:]], indexing="ij"), -1)  # the last may pad
        want = (ramp(gi @ a[:3, :3].T + a[:3, 3]) + 175.0) / 425.0  # the tiny preset's window
        np.testing.assert_allclose(np.asarray(g[0])[tuple(slice(0, k - 1) for k in g.shape[1:])], want, atol=1e-4)
    assert shifts == {tuple(s) for s in np.ndindex(2, 2, 2)}
    with pytest.raises(ValueError, match=r"subgrids must be one of \[1, 2, 4, 8\], got 3"):
        Segmenter(tiny_checkpoint, subgrids=3)


def test_subgrids_draw_a_thin_vessel_closer_to_the_truth_wherever_the_grid_falls(tiny_checkpoint, monkeypatch):
    """A tube 9 mm across at 1.5 mm, read at 6 mm by an oracle (the aorta where the image is bright), at
    six positions 1 mm apart. On one grid its border is drawn from points 6 mm apart and the Dice
    depends on where they fall (measured 0.60-0.86); four grids, half a voxel apart, lift the mean and
    the worst case (measured 0.76 -> 0.81 and 0.60 -> 0.74). (A tube 6 mm across that one grid's points
    miss can be averaged away instead: docs/reference-deviations.md.)"""
    n, sp = 48, 1.5
    grid = np.stack(np.meshgrid(*[np.arange(n) * sp] * 3, indexing="ij"), -1)
    aorta = roi_index("aorta")

    def oracle(self, x, channels, task_id=-1):
        out = torch.full((1, len(channels), *x.shape[2:]), -10.0)
        out[0, channels.index(aorta)] = (x[0, 0] - 0.647) * 40  # midway between 0 and 200 HU
        return out

    monkeypatch.setattr(Segmenter, "predict_logits", oracle)
    dice = {1: [], 4: []}
    for k in dice:
        seg = Segmenter(tiny_checkpoint, subgrids=k)
        for off in range(6):
            tube = np.linalg.norm(grid[..., :2] - [30.0 + off, 33.0 + 0.7 * off], axis=-1) < 4.5
            img = np.where(tube, 200.0, 0.0).astype(np.float32)
            pred = seg.segment(img, rois=["aorta"], affine=np.diag([sp, sp, sp, 1.0])).label == aorta
            dice[k].append(2 * (pred & tube).sum() / (pred.sum() + tube.sum()))
    assert np.mean(dice[4]) > np.mean(dice[1]) + 0.03, dice
    assert min(dice[4]) > min(dice[1]) + 0.1, dice


def test_subgrids_average_each_grids_kept_probabilities():
    """A grid that kept nothing, or a voxel outside a grid's box, counts 0 in the mean: a component that
    one grid of two keeps at p 0.9 stays at threshold 0.4 (mean 0.45) and goes at 0.5."""
    lo, hi = np.array([2, 2, 2]), np.array([4, 5, 4])
    one = (lo, hi, np.full((2, 3, 2), 0.9, dtype=np.float32))
    box, mask = Segmenter._mean_above([one, None], 2, 0.4)
    assert box == (slice(2, 4), slice(2, 5), slice(2, 4)) and mask.all()
    assert not Segmenter._mean_above([one, None], 2, 0.5)[1].any()
    other = (np.array([3, 2, 2]), np.array([5, 5, 4]), np.full((2, 3, 2), 0.9, dtype=np.float32))
    box, mask = Segmenter._mean_above([one, other], 2, 0.5)  # the union box; only the overlap passes 0.5
    assert box == (slice(2, 5), slice(2, 5), slice(2, 4))
    assert mask[1].all() and not mask[0].any() and not mask[2].any()
    assert Segmenter._mean_above([None, None], 2, 0.5) is None
