import math
import os

import numpy as np
import pytest

from cdpdnet.metrics import (
    dice,
    dice_reference,
    evaluate_case,
    hd95_mm,
    hd95_reference,
    nsd,
    render_markdown,
    roi_mask,
    summarise,
    surface_distances,
)

# importing MONAI takes 10-20 s on a loaded CPU: the cross-checks against MONAI run on request
slow = pytest.mark.slow  # compares with MONAI's own implementation (MONAI import is slow on 2 cores)

SHAPE = (24, 20, 18)
SPACING = (0.8, 1.2, 2.5)


def cube(lo, n=10, shape=SHAPE):
    m = np.zeros(shape, bool)
    m[tuple(slice(a, a + n) for a in lo)] = True
    return m


def plates(*xs, shape=SHAPE):
    m = np.zeros(shape, bool)
    for x in xs:
        m[x] = True
    return m


def test_dice_known_values():
    a, b = cube((0, 0, 0)), cube((5, 0, 0))  # overlap 5x10x10 of 1000 each
    assert dice(a, b) == pytest.approx(0.5)
    assert dice_reference(a, b) == pytest.approx(1000 / 2001)
    assert dice(a, a) == 1.0 and dice(a, np.zeros(SHAPE, bool)) == 0.0
    assert math.isnan(dice(np.zeros(SHAPE), np.zeros(SHAPE)))
    assert dice_reference(np.zeros(SHAPE), np.zeros(SHAPE)) == 0.0
    assert dice(a.astype(np.uint8), b.astype(np.uint8)) == pytest.approx(0.5)


def test_hd95_shifted_cubes_anisotropic():
    # shift by 2 voxels along axis 2 (2.5 mm): the 100 voxels of the exposed end face (20 % of the
    # 488 surface voxels) lie exactly 5 mm from the other surface, everything else closer
    a, b = cube((3, 3, 2)), cube((3, 3, 4))
    assert hd95_mm(a, b, SPACING) == pytest.approx(5.0)
    assert hd95_mm(a, b, SPACING, percentile=100) == pytest.approx(5.0)
    c = cube((6, 3, 2))  # 3 voxels along axis 0 (0.8 mm)
    assert hd95_mm(a, c, SPACING) == pytest.approx(2.4)
    assert hd95_mm(a, a, SPACING) == 0.0


@slow
def test_hd95_matches_monai_compute_hausdorff_distance():
    import torch
    from monai.metrics import compute_hausdorff_distance

    rng = np.random.default_rng(0)
    a = cube((3, 3, 2))
    b = cube((4, 2, 5), n=8) | (rng.random(SHAPE) > 0.995)
    ours = hd95_mm(a, b, SPACING)
    ref = compute_hausdorff_distance(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None],
                                     include_background=True, percentile=95, spacing=list(SPACING))
    assert ours == pytest.approx(float(ref[0, 0]), rel=1e-5)


def test_hd95_and_nsd_plates_known_answers():
    a = plates(5)
    b = plates(5, 15)  # b's second plate is 10 voxels = 8 mm away from a
    assert hd95_mm(a, b, SPACING) == pytest.approx(8.0)  # directed b->a: half 0, half 8 mm
    assert nsd(a, b, SPACING, tolerance_mm=7.9) == pytest.approx(2 / 3)
    assert nsd(a, b, SPACING, tolerance_mm=8.0) == pytest.approx(1.0)
    c = plates(8)  # 3 voxels = 2.4 mm
    assert hd95_mm(a, c, SPACING) == pytest.approx(2.4)
    assert nsd(a, c, SPACING, tolerance_mm=2.0) == 0.0
    assert nsd(a, c, SPACING, tolerance_mm=2.5) == 1.0


@slow
def test_nsd_matches_monai_compute_surface_dice():
    import torch
    from monai.metrics import compute_surface_dice

    a, b = cube((3, 3, 2)), cube((4, 2, 4), n=9)
    ours = nsd(a, b, SPACING, tolerance_mm=1.5)
    ref = compute_surface_dice(torch.from_numpy(a)[None, None].float(), torch.from_numpy(b)[None, None].float(),
                               [1.5], include_background=True, spacing=list(SPACING))
    assert ours == pytest.approx(float(ref[0, 0]), rel=1e-5)
    assert 0.0 < ours < 1.0
    for x, y in zip(surface_distances(a, b, SPACING), surface_distances(a, b, SPACING, use_monai=True)):
        np.testing.assert_allclose(np.sort(x), np.sort(y), rtol=1e-5)


def test_empty_conventions():
    z, a = np.zeros(SHAPE, bool), cube((3, 3, 3))
    assert math.isnan(hd95_mm(z, z, SPACING)) and math.isnan(nsd(z, z, SPACING))
    assert hd95_mm(z, a, SPACING) == math.inf and hd95_mm(a, z, SPACING) == math.inf
    assert hd95_mm(z, a, SPACING, one_empty=123.0) == 123.0
    assert nsd(z, a, SPACING) == 0.0 and nsd(a, z, SPACING) == 0.0
    assert hd95_reference(z, a) == 999.0 and math.isnan(hd95_reference(a, z))
    # reference HD95: pooled percentile in voxel units
    assert hd95_reference(plates(5), plates(8)) == pytest.approx(3.0)


def test_masks_touching_border():
    a = np.zeros(SHAPE, bool)
    a[:, :, :4] = True
    b = np.zeros(SHAPE, bool)
    b[:, :, :6] = True
    assert hd95_mm(a, b, SPACING) == pytest.approx(5.0)


def test_evaluate_case_and_summary():
    gt = np.zeros(SHAPE, np.uint8)
    gt[2:12, 2:12, 2:12] = 6  # liver
    gt[4:6, 4:6, 4:6] = 27  # tumour inside the liver
    gt[14:20, 14:18, 2:6] = 1  # spleen
    pred = gt.copy()
    pred[14:20, 14:18, 2:6] = 0  # spleen missed
    res = evaluate_case(pred, gt, SPACING, ["liver", 27, 1, "kidney_left"])
    assert set(res) == {"liver", "liver_tumor", "spleen"}  # empty gt skipped (reference rule)
    assert res["liver"]["dice"] == 1.0 and res["liver"]["hd95"] == 0.0 and res["liver"]["nsd"] == 1.0
    assert res["spleen"] == {"dice": 0.0, "dice_ref": 0.0, "hd95": math.inf, "nsd": 0.0}
    assert roi_mask(gt, 6).sum() == 1000  # organ includes its lesions ...
    assert roi_mask(gt, 6, organs_include_lesions=False).sum() == 992  # ... unless asked not to
    res_all = evaluate_case({6: gt > 0}, gt, SPACING, [6, 3], skip_empty_gt=False)
    assert math.isnan(res_all["kidney_left"]["dice"]) and math.isnan(res_all["kidney_left"]["hd95"])

    records = [
        {"case": "a", "dataset": "04", "results": {"liver": {"dice": 0.9, "dice_ref": 0.9, "hd95": 2.0, "nsd": 0.8}}},
        {"case": "b", "dataset": "04", "results": {"liver": {"dice": 0.7, "dice_ref": 0.7, "hd95": 4.0, "nsd": 0.6}}},
        {"case": "c", "dataset": "03", "results": {"liver": {"dice": 0.5, "dice_ref": 0.5, "hd95": 6.0, "nsd": math.nan},
                                                   "spleen": {"dice": 1.0, "dice_ref": 1.0, "hd95": 0.0, "nsd": 1.0}}},
    ]
    s = summarise(records)
    assert s["per_dataset"]["04"]["liver"]["dice"] == pytest.approx(0.8) and s["per_dataset"]["04"]["liver"]["n"] == 2
    assert s["per_roi"]["liver"]["dice"] == pytest.approx(0.7)  # case-weighted (reference)
    assert s["per_roi_dataset_mean"]["liver"]["dice"] == pytest.approx(0.65)  # each dataset once
    assert s["per_roi"]["liver"]["nsd"] == pytest.approx(0.7)  # NaN ignored
    assert s["mean"]["dice"] == pytest.approx(0.85)
    assert list(s["per_roi"]) == ["spleen", "liver"]  # label order
    md = render_markdown(s)
    assert "| liver | 3 | 70.00 |" in md and "| spleen |" in md and "03" in md
