"""Pre-processing: HU windows, extra window channels (``preprocess.extra_windows``), the body crop."""

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from cdpdnet.data import load_datalist
from cdpdnet.inference import Segmenter
from cdpdnet.phantoms import write_phantom_dataset
from cdpdnet.preprocessing import preprocess_transforms
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
