"""Both lungs by threshold: the classical reference the demo data and bench/unseen_ct.py use."""

import numpy as np

from cdpdnet.threshold_lungs import threshold_lung_masks

SPACING = (2.0, 2.0, 4.0)


def ellipsoid(shape, centre_mm, radii_mm, spacing=SPACING):
    grids = np.meshgrid(*[np.arange(n) * s for n, s in zip(shape, spacing)], indexing="ij")
    return sum(((g - c) / r) ** 2 for g, c, r in zip(grids, centre_mm, radii_mm)) <= 1.0


def chest(shape=(160, 120, 60)):
    """Air around a soft-tissue body holding two lungs with a vessel each, joined by a trachea and
    bronchi; a gas bubble in the bowel below the lungs. Returns (hu, right lung, left lung) with the
    right lung at the larger axis-0 index (RAS voxel order)."""
    hu = np.full(shape, -1000.0)
    hu[ellipsoid(shape, (160, 120, 120), (140, 100, 400))] = 40.0
    right = ellipsoid(shape, (215, 120, 140), (45, 60, 90))
    left = ellipsoid(shape, (105, 120, 140), (40, 55, 85))
    hu[right | left] = -850.0
    for lung in (right, left):  # a vessel inside each lung: a hole the label must keep
        hu[lung & ellipsoid(shape, (215 if lung is right else 105, 120, 140), (4, 4, 60))] = 40.0
    trachea = ellipsoid(shape, (160, 120, 240), (8, 8, 60))
    bronchi = ellipsoid(shape, (160, 120, 190), (70, 4, 4))
    hu[trachea | bronchi] = -1000.0
    gas = ellipsoid(shape, (150, 110, 20), (12, 12, 12))
    hu[gas] = -950.0
    return hu, right, left


def dice(a, b):
    return 2 * (a & b).sum() / (a.sum() + b.sum())


def test_two_lungs_found_with_their_vessels_without_airway_or_outside_air():
    hu, right, left = chest()
    masks = threshold_lung_masks(hu, SPACING, min_ml=50.0)
    assert len(masks) == 2
    big, small = masks
    assert big.sum() >= small.sum()
    assert dice(big, right) > 0.95 and dice(small, left) > 0.95
    both = big | small
    assert not both[0].any() and not both[:, 0].any()  # the air around the body is not lung
    assert both[215 // 2, 120 // 2, 140 // 4]  # the vessel inside the right lung is kept
    assert not both[80, 60, 57]  # the trachea above the lungs is not lung


def test_gas_below_the_size_floor_is_not_a_lung():
    hu, _, _ = chest()
    masks = threshold_lung_masks(hu, SPACING, min_ml=50.0)
    gas = ellipsoid(hu.shape, (150, 110, 20), (12, 12, 12))
    assert not any(m[gas].any() for m in masks)


def test_no_lungs_in_a_body_without_air():
    hu = np.full((40, 40, 10), -1000.0)
    hu[5:35, 5:35] = 30.0
    assert threshold_lung_masks(hu, SPACING) == []
