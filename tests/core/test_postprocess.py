import numpy as np
import pytest

from cdpdnet.postprocess import (
    DEFAULT_RULES,
    REFERENCE_RULES,
    axis_direction,
    merge_order,
    merge_to_label_map,
    postprocess_masks,
    split_label_map,
    top_k_components,
)

SHAPE = (24, 20, 16)


def box(lo, hi, shape=SHAPE):
    m = np.zeros(shape, dtype=np.uint8)
    m[tuple(slice(a, b) for a, b in zip(lo, hi))] = 1
    return m


def test_empty_input_gives_empty_output():
    assert postprocess_masks({}) == {}
    masks = {r: np.zeros(SHAPE, np.uint8) for r in range(1, 33)}
    out = postprocess_masks(masks, spacing=(1.5, 1.5, 1.5))
    assert set(out) == set(masks)
    assert all(m.dtype == bool and m.shape == SHAPE and not m.any() for m in out.values())


def test_largest_component_kept():
    liver = box((1, 1, 1), (6, 6, 6)) | box((10, 10, 10), (12, 12, 12)) | box((20, 1, 1), (22, 3, 3))
    out = postprocess_masks({6: liver})[6]
    np.testing.assert_array_equal(out, box((1, 1, 1), (6, 6, 6)).astype(bool))


def test_26_connectivity_diagonal_touch_is_one_component():
    m = np.zeros(SHAPE, bool)
    m[2, 2, 2] = m[3, 3, 3] = m[4, 4, 4] = True
    m[10, 10, 10] = True
    assert top_k_components(m, 1).sum() == 3


def test_inputs_not_modified():
    liver = box((1, 1, 1), (6, 6, 6)) | box((10, 10, 10), (12, 12, 12))
    tumour = box((4, 4, 4), (8, 8, 8)) | box((18, 15, 12), (20, 17, 14))
    vein = box((5, 5, 0), (8, 8, 16))
    panc = box((10, 2, 6), (14, 5, 9))
    masks = {6: liver, 27: tumour, 10: vein, 11: panc}
    copies = {k: v.copy() for k, v in masks.items()}
    out = postprocess_masks(masks)
    for k in masks:
        np.testing.assert_array_equal(masks[k], copies[k])
        assert out[k] is not masks[k]


def lungs():
    """Two lungs in RAS: axis 0 runs Left -> Right, so the low-index block is the left lung."""
    low_x = box((1, 2, 2), (8, 15, 14))  # patient's left
    high_x = box((14, 2, 2), (23, 15, 14))  # patient's right, larger
    return low_x, high_x


def test_lungs_split_by_side_in_ras():
    low_x, high_x = lungs()
    # the model swapped the labels and left a speck: post-processing fixes both
    right_pred = low_x.copy()
    right_pred[11, 10, 10] = 1
    out = postprocess_masks({16: right_pred, 17: high_x})
    np.testing.assert_array_equal(out[17], low_x.astype(bool))  # left lung at low axis-0 index
    np.testing.assert_array_equal(out[16], high_x.astype(bool))


def test_lungs_split_respects_axcodes():
    low_x, high_x = lungs()
    out = postprocess_masks({16: low_x, 17: high_x}, axcodes="LPS")  # axis 0 runs Right -> Left
    np.testing.assert_array_equal(out[16], low_x.astype(bool))
    np.testing.assert_array_equal(out[17], high_x.astype(bool))
    assert axis_direction("RAS", "R") == (0, 1) and axis_direction("LPS", "R") == (0, -1)


def test_single_lung_component_not_deleted():
    low_x, high_x = lungs()
    bridge = box((8, 6, 6), (14, 8, 8))
    merged = (low_x | high_x | bridge).astype(bool)
    left_pred = low_x | box((8, 6, 6), (11, 8, 8))
    right_pred = high_x | box((11, 6, 6), (14, 8, 8))
    out = postprocess_masks({16: right_pred, 17: left_pred})
    assert out[16].any() and out[17].any()
    np.testing.assert_array_equal(out[16], right_pred.astype(bool))
    np.testing.assert_array_equal(out[17], left_pred.astype(bool))
    assert ((out[16] | out[17]) == merged).all()


def test_single_lung_requested_alone():
    low_x, _ = lungs()
    extra = box((20, 18, 14), (22, 20, 16))
    out = postprocess_masks({17: low_x | extra})
    np.testing.assert_array_equal(out[17], low_x.astype(bool))


def test_femur_heads_split_by_side():
    """A left-femur channel that fires on both heads keeps the left one (largest_cc kept the larger, right one)."""
    low_x, high_x = lungs()  # low axis-0 index = patient's left in RAS; the right block is larger
    out = postprocess_masks({23: low_x | high_x, 24: high_x})
    np.testing.assert_array_equal(out[23], low_x.astype(bool))
    np.testing.assert_array_equal(out[24], high_x.astype(bool))
    ref = postprocess_masks({23: low_x | high_x, 24: high_x}, rules=REFERENCE_RULES)
    np.testing.assert_array_equal(ref[23], high_x.astype(bool))  # the reference's largest_cc: wrong side


def test_gallbladder_keeps_the_component_next_to_the_liver():
    liver = box((2, 2, 8), (12, 12, 16))
    gallbladder = box((6, 12, 9), (9, 14, 12))  # touches the liver
    bladder = box((4, 4, 0), (14, 14, 4))  # larger, 4 voxels (24 mm at 6 mm) below the liver
    out = postprocess_masks({6: liver, 4: gallbladder | bladder}, spacing=(6.0, 6.0, 6.0))
    np.testing.assert_array_equal(out[4], gallbladder.astype(bool))
    # no liver requested, an empty liver, or nothing near the liver: the largest component, as before
    for masks in ({4: gallbladder | bladder}, {6: np.zeros(SHAPE, np.uint8), 4: gallbladder | bladder},
                  {6: liver, 4: bladder | box((20, 17, 0), (22, 19, 2))}):
        np.testing.assert_array_equal(postprocess_masks(masks, spacing=(6.0, 6.0, 6.0))[4], bladder.astype(bool))
    # the margin is in millimetres: at 1.5 mm the bladder lies 6 mm from the liver, within 10 mm
    np.testing.assert_array_equal(postprocess_masks({6: liver, 4: gallbladder | bladder})[4], bladder.astype(bool))


def test_hepatic_vessels_keep_every_component_near_the_liver():
    """The vessel channel's components inside or within 10 mm of the liver stay, all of them (a vessel
    tree falls apart at a coarse grid); one far from it (a femoral head) goes; without a liver (not
    requested or predicted empty) the vessels stay as predicted, as the reference leaves them."""
    liver = box((2, 2, 8), (12, 12, 16))
    inside = box((4, 4, 10), (6, 6, 14)) | box((8, 8, 10), (10, 10, 12))  # two vessel pieces in the liver
    beside = box((12, 5, 9), (13, 7, 11))  # touches the liver's border: 0 mm away
    far = box((16, 14, 0), (20, 18, 3))  # 5 voxels (30 mm at 6 mm) from the liver, and larger than each piece
    out = postprocess_masks({6: liver, 15: inside | beside | far}, spacing=(6.0, 6.0, 6.0))
    np.testing.assert_array_equal(out[15], (inside | beside).astype(bool))
    for masks in ({15: inside | far}, {6: np.zeros(SHAPE, np.uint8), 15: inside | far}):
        np.testing.assert_array_equal(postprocess_masks(masks, spacing=(6.0, 6.0, 6.0))[15], (inside | far).astype(bool))
    # nothing near a predicted liver: no vessels; the margin is in millimetres (1 mm voxels: 5 mm away)
    assert not postprocess_masks({6: liver, 15: far}, spacing=(6.0, 6.0, 6.0))[15].any()
    np.testing.assert_array_equal(postprocess_masks({6: liver, 15: far}, spacing=(1.0, 1.0, 1.0))[15], far.astype(bool))
    assert REFERENCE_RULES[15].kind == "none"


def test_adrenal_glands_keep_the_component_next_to_their_kidney():
    """An adrenal channel that also fires on the (larger) urinary bladder, far below, keeps the gland
    within 40 mm of the kidney of its side, not the bladder; the reference's rule keeps the bladder."""
    shape = (30, 20, 40)
    kidney_r, kidney_l = box((20, 5, 14), (26, 11, 22), shape), box((2, 5, 14), (8, 11, 22), shape)
    gland_r = box((20, 8, 26), (22, 10, 28), shape)  # 4 voxels (24 mm at 6 mm) above the right kidney
    gland_l = box((4, 8, 23), (6, 10, 25), shape)
    bladder = box((10, 6, 0), (18, 14, 4), shape)
    out = postprocess_masks({2: kidney_r, 3: kidney_l, 12: gland_r | bladder, 13: gland_l | bladder},
                            spacing=(6.0, 6.0, 6.0))
    np.testing.assert_array_equal(out[12], gland_r.astype(bool))
    np.testing.assert_array_equal(out[13], gland_l.astype(bool))
    ref = postprocess_masks({2: kidney_r, 12: gland_r | bladder}, spacing=(6.0, 6.0, 6.0), rules=REFERENCE_RULES)
    np.testing.assert_array_equal(ref[12], bladder.astype(bool))
    # the kidney of the other side does not count: no right kidney, so the largest component, as before
    other = postprocess_masks({3: kidney_l, 12: gland_r | bladder}, spacing=(6.0, 6.0, 6.0))
    np.testing.assert_array_equal(other[12], bladder.astype(bool))


def test_weights_rank_components_by_confidence():
    """A larger but fainter false positive loses to a smaller, confident organ when weights are given."""
    organ, faint = box((1, 1, 1), (5, 5, 5)), box((10, 10, 10), (16, 16, 16))  # 64 and 216 voxels
    prob_above = np.where(organ, 0.55, np.where(faint, 0.1, 0.0))  # probability minus the threshold
    np.testing.assert_array_equal(postprocess_masks({5: organ | faint})[5], faint.astype(bool))  # by voxel count
    for w in ({5: prob_above}, lambda roi: prob_above if roi == 5 else None):
        np.testing.assert_array_equal(postprocess_masks({5: organ | faint}, weights=w)[5], organ.astype(bool))
    # the gallbladder's "largest near the liver" ranks by weight too; ROIs without weights keep counts
    liver = box((0, 0, 0), (24, 20, 8))
    near_small, near_big = box((2, 2, 8), (4, 4, 10)), box((10, 10, 8), (16, 16, 12))
    w = {4: np.where(near_small, 0.5, np.where(near_big, 0.01, 0.0))}
    out = postprocess_masks({6: liver, 4: near_small | near_big, 1: organ | faint}, spacing=(6.0, 6.0, 6.0), weights=w)
    np.testing.assert_array_equal(out[4], near_small.astype(bool))
    np.testing.assert_array_equal(out[1], faint.astype(bool))


def test_lite_wide_threshold():
    from cdpdnet.preset import load_preset

    assert load_preset("lite-wide").infer["threshold"] == 0.4
    assert load_preset("lite-wide").infer["overlap"] == load_preset("lite").infer["overlap"]  # the rest inherited


def test_inference_requests_the_liver_for_the_gallbladder_and_both_femur_heads():
    from cdpdnet.inference import required_channels

    assert required_channels([4]) == [4, 6]
    assert required_channels([15]) == [6, 15]
    assert required_channels([23]) == [6, 23, 24]
    assert required_channels([21]) == [6, 21] and required_channels([7]) == [6, 7]
    assert required_channels([12]) == [2, 12, 13] and required_channels([13]) == [3, 12, 13]


def test_pelvic_organs_below_the_liver_and_the_stomach_above_its_lowest_point():
    """RAS: axis 2 grows towards the head. The liver spans z 20-29. A 'urinary bladder' blob at the
    liver's level (the stomach of an upper-abdomen CT) is dropped even though it is the largest; the
    one below is kept; the stomach keeps its component at the liver's level and loses the one in the
    pelvis; the femur heads lose their blobs in the chest. Without a liver prediction nothing moves."""
    shape = (24, 20, 40)
    liver = box((2, 2, 20), (12, 12, 30), shape)
    high = box((14, 2, 22), (22, 12, 32), shape)  # at the liver's level, large
    low = box((8, 8, 2), (12, 12, 6), shape)  # in the pelvis, small
    both = high | low
    out = postprocess_masks({6: liver, 21: both, 7: both, 23: both, 24: box((0, 0, 0), (3, 3, 3), shape)},
                            spacing=(3.0, 3.0, 3.0))
    assert out[21][10, 10, 3] and not out[21][16, 5, 25]
    assert out[7][16, 5, 25] and not out[7][10, 10, 3]
    assert not (out[23] | out[24])[16, 5, 25]
    alone = postprocess_masks({21: both}, spacing=(3.0, 3.0, 3.0))
    assert alone[21][16, 5, 25] and not alone[21][10, 10, 3]  # largest component, as before
    ref = postprocess_masks({6: liver, 21: both}, spacing=(3.0, 3.0, 3.0), rules=REFERENCE_RULES)
    assert ref[21][16, 5, 25]  # the reference's rules keep the largest


def test_tumour_outside_host_removed_inside_kept():
    liver = box((2, 2, 2), (12, 12, 12))
    inside = box((4, 4, 4), (7, 7, 7))
    near = box((12, 5, 5), (14, 6, 6))  # within 3 mm (2 voxels at 1.5 mm) of the liver surface
    far = box((18, 16, 13), (20, 18, 15))
    out = postprocess_masks({6: liver, 27: inside | near | far}, spacing=(1.5, 1.5, 1.5))
    np.testing.assert_array_equal(out[27], (inside | near).astype(bool))
    # margin in mm: 0 mm keeps only what lies inside the (closed) liver
    out0 = postprocess_masks({6: liver, 27: inside | near | far}, host_margin_mm=0.0)
    np.testing.assert_array_equal(out0[27], inside.astype(bool))


def test_lesion_component_lying_in_another_organ_is_dropped():
    """A liver tumour channel that also fires on the right adrenal gland (next to the liver, inside the
    tumour's host margin) would paint the gland out of the label map: that component, lying in an
    organ the liver tumour may not overlap and outside the liver, is dropped; the real tumour, one only
    bordering the gland, one inside the liver that another organ's channel covers too, and a tumour
    over its own host are kept. ``lesion_in_organ_fraction=None`` keeps them all."""
    shape = (24, 20, 16)
    liver = box((2, 2, 2), (14, 14, 12), shape)
    gland = box((14, 4, 4), (16, 6, 6), shape)  # touches the liver: half of it within a 6 mm margin at 6 mm
    tumour = box((5, 5, 5), (8, 8, 8), shape)
    bordering = box((12, 9, 4), (15, 11, 6), shape)  # 6 voxels, 2 of them in a second gland mask
    gland2 = box((14, 9, 4), (16, 10, 6), shape)
    masks = {6: liver, 12: gland | gland2, 27: tumour | gland | bordering}
    out = postprocess_masks(masks, spacing=(6.0, 6.0, 6.0), host_margin_mm=6.0)
    np.testing.assert_array_equal(out[27], (tumour | bordering).astype(bool))
    label = merge_to_label_map(out)
    assert (label[gland.astype(bool)] == 12).all() and (label[tumour.astype(bool)] == 27).all()
    kept = postprocess_masks(masks, spacing=(6.0, 6.0, 6.0), host_margin_mm=6.0, lesion_in_organ_fraction=None)
    in_margin = box((14, 4, 4), (15, 6, 6), shape)  # the gland's half within one voxel of the liver
    np.testing.assert_array_equal(kept[27], (tumour | in_margin | bordering).astype(bool))
    assert (merge_to_label_map(kept)[in_margin.astype(bool)] == 27).all()
    # an organ channel that fires on a tumour inside the tumour's host does not take the tumour
    spleen_over_tumour = box((4, 4, 4), (9, 9, 9), shape)
    np.testing.assert_array_equal(postprocess_masks({6: liver, 1: spleen_over_tumour, 27: tumour})[27], tumour.astype(bool))
    # a lesion may lie in its host and in what its host may overlap: kidney tumour over the kidney kept
    kidney = box((2, 2, 2), (8, 8, 8), shape)
    ktum = box((3, 3, 3), (5, 5, 5), shape)
    np.testing.assert_array_equal(postprocess_masks({2: kidney, 26: ktum})[26], ktum.astype(bool))


def test_host_margin_converted_per_axis():
    liver = box((2, 2, 2), (10, 10, 10))
    along_z = box((5, 5, 10), (6, 6, 12))  # 2 voxels past the liver along axis 2
    spacing = (1.0, 1.0, 3.0)  # 3 mm margin = 1 voxel along z
    out = postprocess_masks({6: liver, 27: along_z}, spacing=spacing)
    np.testing.assert_array_equal(out[27], box((5, 5, 10), (6, 6, 11)).astype(bool))


def test_tumour_with_empty_requested_host_is_emptied_and_unrequested_host_keeps_it():
    tumour = box((4, 4, 4), (7, 7, 7))
    out = postprocess_masks({2: np.zeros(SHAPE, np.uint8), 3: np.zeros(SHAPE, np.uint8), 26: tumour})
    assert not out[26].any()
    out = postprocess_masks({26: tumour})
    np.testing.assert_array_equal(out[26], tumour.astype(bool))


def test_kidney_tumour_uses_both_kidneys():
    right_k = box((15, 5, 5), (20, 10, 10))
    left_k = box((2, 5, 5), (7, 10, 10))
    tumour = box((3, 6, 6), (5, 8, 8)) | box((16, 6, 6), (18, 8, 8)) | box((10, 16, 12), (12, 18, 14))
    out = postprocess_masks({2: right_k, 3: left_k, 26: tumour})
    np.testing.assert_array_equal(out[26], (box((3, 6, 6), (5, 8, 8)) | box((16, 6, 6), (18, 8, 8))).astype(bool))


def test_our_lesion_rules_only_in_default_table():
    panc = box((2, 2, 2), (8, 8, 8))
    tumour = box((3, 3, 3), (5, 5, 5)) | box((18, 15, 12), (20, 17, 14))
    assert not postprocess_masks({11: panc, 28: tumour})[28][19, 16, 13]
    assert postprocess_masks({11: panc, 28: tumour}, rules=REFERENCE_RULES)[28][19, 16, 13]
    assert DEFAULT_RULES[28].source == "ours" and DEFAULT_RULES[27].source == "reference"


def test_psv_cut_below_pancreas_and_without_pancreas():
    vein = box((5, 5, 0), (8, 8, 16))
    panc = box((10, 2, 6), (14, 5, 9)) | box((20, 15, 1), (21, 16, 2))  # speck removed by largest CC
    out = postprocess_masks({10: vein, 11: panc})
    assert not out[10][:, :, :6].any()
    np.testing.assert_array_equal(out[10][:, :, 6:], vein[:, :, 6:].astype(bool))
    # no pancreas requested, or an empty pancreas: vein unchanged, no crash
    np.testing.assert_array_equal(postprocess_masks({10: vein})[10], vein.astype(bool))
    out = postprocess_masks({10: vein, 11: np.zeros(SHAPE, np.uint8)})
    np.testing.assert_array_equal(out[10], vein.astype(bool))
    assert not out[11].any()


def test_masks_touching_borders():
    full = np.ones(SHAPE, np.uint8)
    # (a liver tumour filling a lung would be dropped as lying in another organ: kept here, borders are the point)
    out = postprocess_masks({6: full, 27: full, 16: full[:, :, :], 17: np.zeros(SHAPE, bool)}, lesion_in_organ_fraction=None)
    assert out[6].all() and out[27].all()  # host touching the border is not eroded by the closing
    assert out[16].all() and not out[17].any()
    corner = box((0, 0, 0), (3, 3, 3)) | box((SHAPE[0] - 2, SHAPE[1] - 2, SHAPE[2] - 2), SHAPE)
    np.testing.assert_array_equal(postprocess_masks({1: corner})[1], box((0, 0, 0), (3, 3, 3)).astype(bool))


def test_hepatic_vessel_unprocessed_and_bad_keys():
    m = box((1, 1, 1), (3, 3, 3)) | box((10, 10, 10), (12, 12, 12))
    np.testing.assert_array_equal(postprocess_masks({15: m})[15], m.astype(bool))
    with pytest.raises(ValueError):
        postprocess_masks({33: m})
    with pytest.raises(ValueError):
        postprocess_masks({1: m, 2: m[:-1]})


def test_merge_lesions_over_organs_and_split():
    liver = box((2, 2, 2), (12, 12, 12))
    tumour = box((4, 4, 4), (6, 6, 6))
    vessel_tumour = box((5, 5, 5), (7, 7, 7))
    spleen = box((10, 10, 10), (14, 14, 14))
    label = merge_to_label_map({29: vessel_tumour, 27: tumour, 6: liver, 1: spleen}, SHAPE)
    assert label.dtype == np.uint8
    assert label[4, 4, 4] == 27 and label[5, 5, 5] == 29 and label[3, 3, 3] == 6
    assert label[11, 11, 11] == 6 and label[13, 13, 13] == 1  # later organ wins among organs
    parts = split_label_map(label, ["liver", 27])
    assert set(parts) == {6, 27} and parts[27].sum() == 8 - 1
    assert set(split_label_map(label)) == {1, 6, 27, 29}
    assert not merge_to_label_map({}, SHAPE).any()


def test_merge_paints_duodenum_over_small_bowel_and_oesophagus_over_stomach():
    bowel, duodenum = box((2, 2, 2), (12, 12, 12)), box((4, 4, 4), (6, 6, 6))
    stomach, oesophagus = box((14, 2, 2), (20, 8, 8)), box((15, 3, 3), (17, 5, 5))
    label = merge_to_label_map({19: bowel, 14: duodenum, 7: stomach, 5: oesophagus}, SHAPE)
    assert label[5, 5, 5] == 14 and label[3, 3, 3] == 19
    assert label[16, 4, 4] == 5 and label[19, 7, 7] == 7
    assert merge_order([19, 27, 14, 1]) == [1, 19, 14, 27]  # lesions still last


def test_lungs_win_overlaps_with_other_organs():
    """Painted last among the organs: a rectum channel firing on lung air (an unseen chest CT) does
    not take the lung, while the lung tumour, a lesion, is still painted over the lung."""
    lung, rectum, tumour = box((2, 2, 2), (12, 12, 12)), box((8, 8, 8), (16, 16, 16)), box((4, 4, 4), (6, 6, 6))
    label = merge_to_label_map({20: rectum, 17: lung, 30: tumour, 18: box((0, 0, 0), (3, 3, 3))}, SHAPE)
    assert label[10, 10, 10] == 17 and label[14, 14, 14] == 20 and label[5, 5, 5] == 30 and label[2, 2, 2] == 17
    assert merge_order([16, 20, 17, 1, 30, 25]) == [1, 20, 25, 16, 17, 30]


def test_components_of_masks_one_voxel_thick():
    """cc3d raised on e.g. [[[1, 0, 1]]] (the bounding box of a thin prediction): a 500 on small uploads."""
    from cdpdnet.postprocess import top_k_components

    mask = np.array([[[1, 0, 1, 1]]], dtype=bool)
    np.testing.assert_array_equal(top_k_components(mask, 1), [[[False, False, True, True]]])
    rng = np.random.default_rng(0)
    for _ in range(300):
        m = rng.random(tuple(rng.integers(1, 4, size=3))) < 0.5
        top_k_components(m, 2)
