"""Pre-processing: HU windows, extra window channels (``preprocess.extra_windows``), the body crop."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from cdpdnet.data import load_datalist
from cdpdnet.inference import Segmenter
from cdpdnet.phantoms import write_phantom_dataset
from cdpdnet.preprocessing import anti_alias_sigma, preprocess_transforms
from cdpdnet.preset import load_preset
from cdpdnet.training import TrainConfig, Trainer

TWO_WINDOWS = {"preprocess": {"extra_windows": [[-1000.0, 250.0]]}, "network": {"in_channels": 2}}


def _chest(noise_seed=0):
    """Air (-1000 HU with noise up to +40) around a soft-tissue body (40 HU) holding a lung (-850 HU)."""
    rng = np.random.default_rng(noise_seed)
    hu = (-1000.0 + rng.uniform(0, 40, (40, 30, 50))).astype(np.float32)
    hu[8:32, 6:24, 5:45] = 40.0
    hu[12:20, 10:20, 20:36] = -850.0
    return MetaTensor(torch.from_numpy(hu)[None], affine=torch.diag(torch.tensor([3.0, 3.0, 3.0, 1.0])))


def test_extra_window_adds_a_channel_that_tells_lung_from_air():
    pp = dict(load_preset("tiny").preprocess, spacing=[3.0, 3.0, 3.0])
    one = preprocess_transforms(pp)({"image": _chest()})["image"]
    two = preprocess_transforms(dict(pp, extra_windows=[[-1000.0, 250.0]]))({"image": _chest()})["image"]
    assert one.shape[0] == 1 and two.shape[0] == 2
    torch.testing.assert_close(two[0], one[0])  # channel 0 is the main window, unchanged
    np.testing.assert_allclose(np.asarray(two.affine), np.asarray(one.affine))
    # the body crop comes from channel 0: the noisy air (above -1000 HU, so > 0 in the wide window) is cut
    assert tuple(two.shape[1:]) == (24, 18, 40)
    lung = two[:, 4:12, 4:14, 15:31]
    assert float(lung[0].max()) == 0.0  # the soft-tissue window maps lung to the value of air ...
    assert float(lung[1].min()) > 0.1  # ... the wide window does not
    assert 0.8 < float(two[1, 0, 0, 0]) < 0.9  # soft tissue (40 HU) in [-1000, 250]


def test_preset_channels_must_match_the_windows():
    with pytest.raises(ValueError, match="in_channels=1 but the preprocessing gives 2 channels"):
        load_preset("tiny", {"preprocess": {"extra_windows": [[-1000.0, 250.0]]}})
    with pytest.raises(ValueError, match="in_channels=2 but the preprocessing gives 1 channels"):
        load_preset("tiny", {"network": {"in_channels": 2}})


def test_two_window_preset_trains_and_segments(tmp_path):
    data = write_phantom_dataset(tmp_path / "ph", n_per_source=1, n_heldout=1, spacing=(6, 6, 6))
    dl = load_datalist(data)
    preset = load_preset("tiny", TWO_WINDOWS)
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), epochs=1, iterations_per_epoch=2, progress=False, num_samples=1)
    summary = Trainer(dl.training, preset, cfg).run()
    seg = Segmenter(summary["model"])
    assert seg.preset.network.in_channels == 2 and seg.preset.preprocess["extra_windows"] == [[-1000.0, 250.0]]
    res = seg.segment(dl.test[0].image)
    import nibabel as nib

    img = nib.load(dl.test[0].image)
    assert res.label.shape == img.shape and res.label.dtype == np.uint8
    np.testing.assert_allclose(res.affine, img.affine)


def _body(hu: np.ndarray, spacing=3.0) -> MetaTensor:
    return MetaTensor(torch.from_numpy(hu.astype(np.float32))[None], affine=torch.diag(torch.tensor([spacing] * 3 + [1.0])))


def _hu(x) -> np.ndarray:  # back from the tiny preset's soft-tissue window [-175, 250] to HU
    return np.asarray(x[0]) * 425.0 - 175.0


def test_anti_alias_sigma_follows_the_spacing_factor_per_axis():
    assert anti_alias_sigma([3.0, 3.0, 1.5], [6.0, 6.0, 6.0]) == [0.5, 0.5, 1.5]
    assert anti_alias_sigma([0.8, 0.8, 6.0], [6.0, 6.0, 4.0]) == [pytest.approx(3.25), pytest.approx(3.25), 0.0]
    assert anti_alias_sigma([6.0] * 3, [6.0] * 3) == [0.0, 0.0, 0.0]


def test_anti_alias_lowers_the_noise_that_a_coarser_grid_keeps():
    rng = np.random.default_rng(0)
    hu = 40.0 + 20.0 * rng.standard_normal((64, 64, 64))
    pp = dict(load_preset("tiny").preprocess, spacing=[6.0, 6.0, 6.0], crop_foreground=False)
    plain = preprocess_transforms(pp)({"image": _body(hu)})["image"]
    aa = preprocess_transforms(dict(pp, anti_alias=True))({"image": _body(hu)})["image"]
    assert plain.shape == aa.shape == (1, 32, 32, 32)
    np.testing.assert_allclose(np.asarray(aa.affine), np.asarray(plain.affine))
    inner = (slice(2, -2),) * 3  # away from the edges
    assert 18.0 < _hu(plain)[inner].std() < 22.0  # point sampling keeps the 3 mm noise
    assert _hu(aa)[inner].std() < 0.6 * _hu(plain)[inner].std()
    assert abs(_hu(aa)[inner].mean() - 40.0) < 1.0


def test_anti_alias_keeps_a_thin_structure_whichever_way_the_grid_falls():
    pp = dict(load_preset("tiny").preprocess, spacing=[6.0, 6.0, 6.0], crop_foreground=False)
    peaks = {}
    for aa in (False, True):
        for phase in (0, 1):  # a 3 mm thick bright sheet (200 HU in 40 HU) on an even or an odd voxel
            hu = np.full((32, 32, 32), 40.0)
            hu[:, 16 + phase, :] = 200.0
            out = _hu(preprocess_transforms(dict(pp, anti_alias=aa))({"image": _body(hu)})["image"])
            peaks[aa, phase] = float(out[4:-4, :, 4:-4].max())
    # point sampling shows the sheet at full contrast or loses it, depending on the grid
    assert max(peaks[False, 0], peaks[False, 1]) > 190.0 and min(peaks[False, 0], peaks[False, 1]) < 45.0
    # filtered (sigma 0.5 voxel: weights 0.11 / 0.79 / 0.11), it is there on both grids at partial contrast
    assert 50.0 < peaks[True, 1] < peaks[True, 0] < 175.0


def test_anti_alias_leaves_label_maps_alone():
    rng = np.random.default_rng(1)
    hu = 40.0 + 20.0 * rng.standard_normal((32, 32, 32))
    lab = np.zeros((32, 32, 32), np.float32)
    lab[8:20, 9:21, 10:22] = 6
    pp = dict(load_preset("tiny").preprocess, spacing=[6.0, 6.0, 6.0], crop_foreground=False)
    outs = [preprocess_transforms(dict(pp, anti_alias=aa), label_keys=("label",))({"image": _body(hu), "label": _body(lab)})
            for aa in (False, True)]
    torch.testing.assert_close(outs[0]["label"].as_tensor(), outs[1]["label"].as_tensor())
    assert set(np.unique(np.asarray(outs[1]["label"]))) == {0.0, 6.0}


def test_anti_alias_main_filters_the_main_window_only():
    pp = dict(load_preset("tiny").preprocess, spacing=[6.0, 6.0, 6.0], extra_windows=[[-1000.0, 250.0]])
    images = {aa: preprocess_transforms(dict(pp, anti_alias=aa))({"image": _chest(noise_seed=3)})["image"]
              for aa in (False, True, "main")}
    assert images["main"].shape == images[True].shape == images[False].shape
    torch.testing.assert_close(images["main"][0], images[True][0])  # the soft-tissue window, filtered
    torch.testing.assert_close(images["main"][1], images[False][1])  # the lung window, as without the filter
    assert not torch.allclose(images[True][1], images[False][1])


@pytest.mark.parametrize("value", ["yes", 1, "Main"])
def test_preset_anti_alias_must_be_a_boolean_or_main(value):
    with pytest.raises(ValueError, match=f"preprocess.anti_alias must be true, false or \"main\", got {value!r}"):
        load_preset("tiny", {"preprocess": {"anti_alias": value}})
