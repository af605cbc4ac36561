"""Partial labels: loss masking, channel targets, label remapping, datalists, uniform source sampling."""

from __future__ import annotations

import json
import os
from collections import Counter

import nibabel as nib
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdpdnet.data import (
    PartialLabelToChannelsd,
    PartialSample,
    RemapLabelValuesd,
    UniformSourceDataset,
    annotated_vector,
    load_datalist,
    rarest_roi_weights,
    resolve_label_names,
    split_by_source,
)
from cdpdnet.loss import DeepSupervisionLoss, NaiveBackgroundLoss, PartialLabelLoss, softplus
from cdpdnet.phantoms import PHANTOM_SOURCES
from cdpdnet.taxonomy import NUM_CLASSES, roi_index, sampling_keys

LIVER, LIVER_TUMOR = roi_index("liver"), roi_index("liver_tumor")
K_R, K_L, K_TUM, K_CYST = (roi_index(n) for n in ("kidney_right", "kidney_left", "kidney_tumor", "kidney_cyst"))


# ---------------------------------------------------------------------------------------------- loss


def _loop_reference(logits, target, annotated, smooth=1.0):
    """Per-(b, c) gather, as the reference ``utils/loss.py`` does."""
    bces, dices = [], []
    for b in range(logits.shape[0]):
        for c in range(logits.shape[1]):
            if not annotated[b, c]:
                continue
            z, y = logits[b, c].double().reshape(-1), target[b, c].double().reshape(-1)
            p = torch.sigmoid(z)
            bces.append(F.binary_cross_entropy_with_logits(z, y))
            dices.append(1 - 2 * (p * y).sum() / (p.sum() + y.sum() + smooth))
    return torch.stack(bces).mean(), torch.stack(dices).mean()


def _random_batch(seed=0, B=3, C=NUM_CLASSES, shape=(5, 4, 3)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(B, C, *shape, generator=g) * 2
    target = (torch.rand(B, C, *shape, generator=g) > 0.7).to(torch.uint8)
    annotated = torch.rand(B, C, generator=g) > 0.6
    annotated[0, 0] = True
    return logits, target, annotated


def test_loss_equals_per_pair_loop_reference():
    logits, target, annotated = _random_batch()
    loss_fn = PartialLabelLoss()
    loss = loss_fn(logits, target, annotated)
    bce, dice = _loop_reference(logits, target, annotated)
    assert torch.allclose(loss.double(), bce + dice, atol=1e-5)
    comp = loss_fn.components()
    assert comp["bce"] == pytest.approx(float(bce), abs=1e-5)
    assert comp["dice"] == pytest.approx(float(dice), abs=1e-5)
    assert comp["pairs"] == int(annotated.sum())
    weighted = PartialLabelLoss(bce_weight=0.5, dice_weight=2.0)(logits, target, annotated.to(torch.uint8))
    assert torch.allclose(weighted.double(), 0.5 * bce + 2 * dice, atol=1e-5)


def test_loss_softplus_matches_torch_in_value_and_gradient_without_overflow():
    # the loss's softplus avoids log1p (not vectorised on the CPU); it must stay F.softplus to within
    # float32 rounding, with the exact gradient sigmoid(z), and stay finite where exp(z) overflows
    z = torch.cat([torch.linspace(-120, 120, 4001), torch.tensor([-1e4, -88.8, -17.0, 0.0, 17.0, 88.8, 1e4])])
    z = z.requires_grad_(True)
    out = softplus(z)
    out.sum().backward()
    want = F.softplus(z.detach().double())
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    assert (out.detach().double() - want).abs().max() <= 1e-6 * want.clamp_min(1.0).max()
    assert torch.allclose(z.grad, torch.sigmoid(z.detach()), rtol=0, atol=0)
    # and the loss built on it equals torch's BCE-with-logits on large logits
    y = (torch.arange(z.numel()) % 3 == 0).float()
    ours = (softplus(z.detach()) - z.detach() * y).mean()
    assert float(ours) == pytest.approx(float(F.binary_cross_entropy_with_logits(z.detach(), y)), rel=1e-6)


def test_loss_on_channels_last_logits_matches_contiguous():
    # the trainer's logits are channels-last 3D on the CPU; the loss reorders them, so value and gradient
    # must not depend on the layout (and the gradient comes back in the caller's layout)
    logits, target, annotated = _random_batch(seed=2)
    grads = []
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        z = logits.clone().contiguous(memory_format=layout).requires_grad_(True)
        y = target.contiguous(memory_format=layout)
        loss = PartialLabelLoss(pos_fraction=0.01)(z, y, annotated)
        loss.backward()
        grads.append((float(loss.detach()), z.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-9)
    assert grads[1][1].shape == logits.shape


def test_exclusion_term_supervises_unannotated_channels_only_on_excluding_annotated_rois():
    g = torch.Generator().manual_seed(3)
    B, C, shape = 2, 4, (6, 5, 4)
    logits = torch.randn(B, C, *shape, generator=g)
    target = (torch.rand(B, C, *shape, generator=g) > 0.6).to(torch.uint8)
    annotated = torch.tensor([[True, True, False, False], [False, True, True, False]])
    # channel 2 excludes 0 and 1; channel 3 excludes 1 only; channel 0 excludes 2 (1 may overlap 0)
    excl = torch.zeros(C, C)
    excl[2, 0] = excl[2, 1] = excl[3, 1] = excl[0, 2] = 1
    plain = PartialLabelLoss()
    with_excl = PartialLabelLoss(exclusion=excl, exclusion_weight=0.5)
    z = logits.clone().requires_grad_(True)
    loss = with_excl(z, target, annotated)
    loss.backward()
    # reference: per unannotated pair, BCE towards 0 on the voxels of the annotated ROIs it excludes
    terms = []
    for b in range(B):
        for c in range(C):
            if annotated[b, c]:
                continue
            known = torch.zeros(shape, dtype=torch.bool)
            for d in range(C):
                if annotated[b, d] and excl[c, d]:
                    known |= target[b, d].bool()
            if known.any():
                terms.append((F.softplus(logits[b, c].double()) * known).mean())
                # gradient exactly on the known negatives, pushing the logit down
                assert torch.all(z.grad[b, c][~known] == 0) and torch.all(z.grad[b, c][known] > 0)
            else:
                assert torch.all(z.grad[b, c] == 0)
    expected = plain(logits, target, annotated).double() + 0.5 * torch.stack(terms).mean()
    assert float(loss.detach()) == pytest.approx(float(expected), abs=1e-5)
    assert with_excl.components()["exclusion"] == pytest.approx(float(torch.stack(terms).mean()), abs=1e-6)
    # sample 1: channel 0 is pushed by annotated channel 2, channel 3 by annotated channel 1
    assert z.grad[1, 0].abs().sum() > 0 and z.grad[1, 3].abs().sum() > 0
    # annotated channels get the plain loss's gradient
    z0 = logits.clone().requires_grad_(True)
    plain(z0, target, annotated).backward()
    assert torch.allclose(z.grad[annotated], z0.grad[annotated])
    # all annotated: nothing to add; the naive loss has no exclusion term
    full = torch.ones(B, C, dtype=torch.bool)
    assert float(with_excl(logits, target, full)) == pytest.approx(float(plain(logits, target, full)))
    with pytest.raises(ValueError, match="square"):
        PartialLabelLoss(exclusion=torch.zeros(3, 4))
    with pytest.raises(ValueError, match="channels"):
        with_excl(logits[:, :3], target[:, :3], annotated[:, :3])


def test_exclusion_matrix_follows_the_taxonomy():
    from cdpdnet.taxonomy import ROIS, may_overlap
    from cdpdnet.training import exclusion_matrix

    e = exclusion_matrix()
    assert e.shape == (NUM_CLASSES, NUM_CLASSES) and torch.equal(e, e.T) and not e.diagonal().any()
    c = roi_index

    def excludes(a, b):
        return bool(e[c(a) - 1, c(b) - 1])

    assert excludes("liver", "spleen") and excludes("lung_left", "lung_right") and excludes("kidney_tumor", "liver")
    assert excludes("urinary_bladder", "adrenal_gland_left") and excludes("lung_tumor", "liver_tumor")
    # hosts and their lesions, lesions of one host, vessels inside organs, tubes that meet
    for a, b in [("liver", "liver_tumor"), ("kidney_left", "kidney_cyst"), ("kidney_tumor", "kidney_cyst"),
                 ("liver", "hepatic_vessel"), ("liver", "portal_vein_and_splenic_vein"), ("aorta", "celiac_trunk"),
                 ("colon", "rectum"), ("rectum", "colon_tumor"), ("lung_right", "lung_tumor"),
                 ("portal_vein_and_splenic_vein", "liver_tumor")]:
        assert not excludes(a, b) and not excludes(b, a) and may_overlap(a, b), (a, b)
    assert sum(not may_overlap(a.name, b.name) for a in ROIS for b in ROIS) == int(e.sum())


def test_loss_zero_gradient_on_unannotated_channels():
    logits, target, annotated = _random_batch(seed=1)
    logits.requires_grad_(True)
    PartialLabelLoss()(logits, target, annotated).backward()
    g = logits.grad.flatten(2).abs().amax(-1)  # [B, C]
    assert torch.all(g[~annotated] == 0)
    assert torch.all(g[annotated] > 0)


def test_log_dice_pulls_a_missed_small_structure_and_leaves_good_organs_alone():
    """``log_dice``: a 27-voxel lesion the network misses (probability 0.004, the lung tumour's case)
    gets many times the plain Dice's pull; a well segmented organ and an empty target are unchanged;
    unannotated channels still get no gradient; the value is -ln of the smoothed Dice."""
    shape = (1, 3, 20, 20, 20)
    y = torch.zeros(shape)
    y[0, 0, :3, :3, :3] = 1  # small lesion, missed
    y[0, 1, :15, :15, :15] = 1  # organ, well segmented
    z0 = torch.full(shape, -5.5)
    z0[0, 1] += 9.0 * y[0, 1]
    ann = torch.tensor([[True, True, True]])  # channel 2: annotated, empty target

    def grads(log_dice: bool, annotated=ann):
        z = z0.clone().requires_grad_(True)
        PartialLabelLoss(bce_weight=0.0, log_dice=log_dice)(z, y, annotated).backward()
        return z.grad

    plain, logd = grads(False), grads(True)
    lesion, organ = y[0, 0] > 0, y[0, 1] > 0
    assert logd[0, 0][lesion].mean() < 10 * plain[0, 0][lesion].mean() < 0
    assert torch.allclose(logd[0, 1][organ], plain[0, 1][organ], rtol=0.1)
    assert torch.equal(logd[0, 2], plain[0, 2])
    assert torch.all(grads(True, torch.tensor([[False, True, True]]))[0, 0] == 0)

    fn = PartialLabelLoss(log_dice=True)
    _, dice = fn.per_pair(z0, y)
    p = torch.sigmoid(z0).flatten(2)
    yf = y.flatten(2)
    expected = -torch.log((2 * (p * yf).sum(-1) + 1) / (p.sum(-1) + yf.sum(-1) + 1))
    assert torch.allclose(dice[0, :2], expected[0, :2])
    assert dice[0, 2] == pytest.approx(1.0)


def test_focal_gamma_silences_easy_negatives_and_keeps_the_pull_of_missed_positives():
    """``focal_gamma``: 0 is the plain BCE; at 2 a confidently right negative (p = 0.02) pushes
    about 50x less than with BCE, a missed positive (p = 0.02) pulls about as hard, unannotated channels
    still get no gradient, and a negative gamma is refused."""
    logits, target, annotated = _random_batch(seed=5)
    assert torch.allclose(PartialLabelLoss(focal_gamma=0.0)(logits, target, annotated),
                          PartialLabelLoss()(logits, target, annotated))

    y = torch.zeros(1, 2, 10, 10, 10)
    y[0, 0, :3, :3, :3] = 1
    ann = torch.tensor([[True, False]])

    def grads(gamma: float):
        z = torch.full(y.shape, -3.9, requires_grad=True)  # p = 0.02
        PartialLabelLoss(dice_weight=0.0, focal_gamma=gamma)(z, y, ann).backward()
        return z.grad

    bce, focal = grads(0.0), grads(2.0)
    pos, neg = y[0, 0] > 0, y[0, 0] == 0
    assert focal[0, 0][pos].mean() <= 0.9 * bce[0, 0][pos].mean() < 0  # at least 90 % of the BCE's pull
    assert 0 < 40 * focal[0, 0][neg].mean() < bce[0, 0][neg].mean()
    assert torch.all(focal[0, 1] == 0)
    only_first = PartialLabelLoss(focal_gamma=2.0, focal_channels=torch.tensor([True, False]))
    bce_pairs, _ = PartialLabelLoss().per_pair(logits[:, :2], target[:, :2])
    focal_pairs, _ = PartialLabelLoss(focal_gamma=2.0).per_pair(logits[:, :2], target[:, :2])
    mixed, _ = only_first.per_pair(logits[:, :2], target[:, :2])
    assert torch.allclose(mixed[:, 0], focal_pairs[:, 0]) and torch.allclose(mixed[:, 1], bce_pairs[:, 1])
    with pytest.raises(ValueError, match="focal_gamma must be >= 0"):
        PartialLabelLoss(focal_gamma=-1.0)


def test_pos_fraction_pulls_small_structures_and_leaves_large_ones_and_empty_pairs_alone():
    """``pos_fraction``: 0 is the plain BCE; at 0.01 the 27 positives of a 1000-voxel pair weigh
    0.01 * 973 / 27 = 0.36 < 1, so nothing changes, while in a 8000-voxel pair they get weight
    0.01 * 7973 / 27 = 2.95 on their pull; a pair with half its voxels positive, a pair with an empty
    target and every negative voxel keep the plain BCE; unannotated channels get no gradient; a
    fraction outside [0, 1) is refused."""
    logits, target, annotated = _random_batch(seed=6)
    assert torch.allclose(PartialLabelLoss(pos_fraction=0.0)(logits, target, annotated),
                          PartialLabelLoss()(logits, target, annotated))

    def grads(fraction: float, y: torch.Tensor, ann: torch.Tensor):
        z = torch.full(y.shape, -6.0, requires_grad=True)  # a channel trapped near its prior
        PartialLabelLoss(dice_weight=0.0, pos_fraction=fraction)(z, y, ann).backward()
        return z.grad

    small = torch.zeros(1, 1, 10, 10, 10)
    small[0, 0, :3, :3, :3] = 1
    assert torch.allclose(grads(0.01, small, None), grads(0.0, small, None))
    y = torch.zeros(1, 4, 20, 20, 20)
    y[0, 0, :3, :3, :3] = 1  # small lesion
    y[0, 1, :10] = 1  # large organ
    y[0, 3, :3, :3, :3] = 1  # unannotated
    ann = torch.tensor([[True, True, True, False]])
    plain, weighted = grads(0.0, y, ann), grads(0.01, y, ann)
    pos = y[0, 0] > 0
    assert torch.allclose(weighted[0, 0][pos], plain[0, 0][pos] * (0.01 * 7973 / 27), rtol=1e-4)
    assert weighted[0, 0][pos].max() < 0
    assert torch.equal(weighted[0, 0][~pos], plain[0, 0][~pos])
    assert torch.equal(weighted[0, 1:3], plain[0, 1:3])  # large organ, empty target
    assert torch.all(weighted[0, 3] == 0)
    only_second = PartialLabelLoss(dice_weight=0.0, pos_fraction=0.01, pos_channels=torch.tensor([False, True]))
    z = torch.full((1, 2, 20, 20, 20), -6.0, requires_grad=True)
    both = torch.stack([y[0, 0], y[0, 0]])[None]
    only_second(z, both).backward()
    assert torch.equal(z.grad[0, 0], grads(0.0, both, None)[0, 0])
    assert torch.allclose(z.grad[0, 1], grads(0.01, both, None)[0, 1])
    assert not torch.allclose(z.grad[0, 0], z.grad[0, 1])
    per_channel = PartialLabelLoss(dice_weight=0.0, pos_fraction=[0.0, 0.01])  # one fraction per channel
    z = torch.full((1, 2, 20, 20, 20), -6.0, requires_grad=True)
    per_channel(z, both).backward()
    assert torch.equal(z.grad[0, 0], grads(0.0, both, None)[0, 0])
    assert torch.allclose(z.grad[0, 1], grads(0.01, both, None)[0, 1])
    with pytest.raises(ValueError, match="pos_fraction has 3 values but the logits have 2 channels"):
        PartialLabelLoss(pos_fraction=[0.01, 0.01, 0.01])(z, both)
    for bad in (-0.1, 1.0, [0.01, 1.5], [[0.01]]):
        with pytest.raises(ValueError, match="pos_fraction must be in"):
            PartialLabelLoss(pos_fraction=bad)


def test_pair_weights_make_weighted_means_over_the_annotated_pairs():
    """``pair_weights``: the BCE and Dice means become weighted means over the annotated pairs (the
    per-pair loop with each pair counted ``w_c`` times); all ones is the plain loss; a heavier channel
    gets ``w`` times the gradient of the others, with its own pull and push unchanged; unannotated
    channels still get none; a weight that is not positive, or one too few, is refused."""
    logits, target, annotated = _random_batch(seed=11, C=4)
    assert torch.allclose(PartialLabelLoss(pair_weights=torch.ones(4))(logits, target, annotated),
                          PartialLabelLoss()(logits, target, annotated))
    w = torch.tensor([1.0, 10.0, 2.0, 0.5])
    loss = PartialLabelLoss(pair_weights=w)(logits, target, annotated)
    bces, dices, ws = [], [], []
    for b in range(logits.shape[0]):
        for c in range(4):
            if annotated[b, c]:
                bce, dice = _loop_reference(logits[b:b + 1, c:c + 1], target[b:b + 1, c:c + 1], torch.ones(1, 1))
                bces.append(bce * w[c])
                dices.append(dice * w[c])
                ws.append(w[c])
    expected = (torch.stack(bces).sum() + torch.stack(dices).sum()) / torch.stack(ws).sum()
    assert torch.allclose(loss.double(), expected, atol=1e-5)

    z = torch.full((1, 3, 6, 6, 6), -4.0, requires_grad=True)
    y = torch.zeros(1, 3, 6, 6, 6)
    y[0, :, :2, :2, :2] = 1
    PartialLabelLoss(pair_weights=[1.0, 10.0, 1.0])(z, y, torch.tensor([[True, True, False]])).backward()
    assert torch.allclose(z.grad[0, 1], 10 * z.grad[0, 0])
    assert z.grad[0, 1][y[0, 1] > 0].max() < 0 and torch.all(z.grad[0, 2] == 0)
    with pytest.raises(ValueError, match="pair_weights has 2 values but the logits have 3 channels"):
        PartialLabelLoss(pair_weights=[1.0, 2.0])(z, y)
    for bad in ([1.0, 0.0, 1.0], [-1.0], [[1.0]]):
        with pytest.raises(ValueError, match="pair_weights must be one positive number per channel"):
            PartialLabelLoss(pair_weights=bad)


def test_deep_supervision_loss_weights_scales_and_keeps_small_lesions():
    """Full-resolution loss weighted 4/7, the next scales 2/7 and 1/7 against the target averaged down:
    a one-voxel lesion is still a (fractional) target at 1/8 of the resolution, and unannotated
    channels get no gradient at any scale."""
    logits, target, annotated = _random_batch(seed=4, shape=(8, 8, 8))
    base = PartialLabelLoss()
    ds = DeepSupervisionLoss(PartialLabelLoss())
    assert torch.allclose(ds(logits, [], target, annotated), base(logits, target, annotated))
    aux = [torch.randn(3, NUM_CLASSES, 4, 4, 4, requires_grad=True), torch.randn(3, NUM_CLASSES, 2, 2, 2, requires_grad=True)]
    loss = ds(logits, aux, target, annotated)
    y = target.float()
    expected = (4 * base(logits, target, annotated) + 2 * base(aux[0], F.avg_pool3d(y, 2), annotated)
                + base(aux[1], F.avg_pool3d(y, 4), annotated)) / 7
    assert torch.allclose(loss, expected)
    assert ds.components()["pairs"] == int(annotated.sum())  # the full-resolution terms
    loss.backward()
    for a in aux:
        g = a.grad.flatten(2).abs().amax(-1)
        assert torch.all(g[~annotated] == 0) and torch.all(g[annotated] > 0)

    lesion = torch.zeros(1, NUM_CLASSES, 8, 8, 8, dtype=torch.uint8)
    lesion[0, 0, 1, 6, 3] = 1  # one voxel
    coarse = torch.full((1, NUM_CLASSES, 2, 2, 2), -4.0, requires_grad=True)
    ds(torch.full((1, NUM_CLASSES, 8, 8, 8), -4.0), [coarse], lesion, torch.ones(1, NUM_CLASSES, dtype=torch.bool)).backward()
    assert coarse.grad[0, 0, 0, 1, 0] < 0 and coarse.grad[0, 0, 0, 1, 0] < coarse.grad[0, 0, 1, 0, 1]  # pulled up there


def test_loss_nothing_annotated_is_connected_zero():
    logits, target, _ = _random_batch(seed=2)
    logits.requires_grad_(True)
    loss = PartialLabelLoss()(logits, target, torch.zeros(3, NUM_CLASSES, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_naive_flag_supervises_every_channel():
    logits, target, annotated = _random_batch(seed=3)
    logits.requires_grad_(True)
    naive = PartialLabelLoss(treat_unannotated_as_background=True)
    loss = naive(logits, target, annotated)
    bce, dice = _loop_reference(logits.detach(), target, torch.ones_like(annotated))
    assert torch.allclose(loss.double(), bce + dice, atol=1e-5)
    loss.backward()
    assert torch.all(logits.grad.flatten(2).abs().amax(-1) > 0)
    assert torch.allclose(NaiveBackgroundLoss()(logits, target, annotated), loss)


# ------------------------------------------------------------------------------------- channel target


def _ann(*values):
    return annotated_vector(values)


def test_organ_channel_includes_its_tumour_and_unannotated_are_zero():
    lab = np.zeros((1, 8, 8, 6), np.uint8)
    lab[0, 1:6, 1:6, 1:5] = LIVER
    lab[0, 2:4, 2:4, 2:3] = LIVER_TUMOR
    lab[0, 7, 7, 5] = roi_index("spleen")  # present in the map but not annotated
    d = PartialLabelToChannelsd()({"label": lab, "annotated": (LIVER, LIVER_TUMOR)})
    t, ann = d["target"], d["annotated"]
    assert t.dtype == np.uint8 and t.shape == (NUM_CLASSES, 8, 8, 6)
    assert ann.dtype == np.uint8 and ann.shape == (NUM_CLASSES,)
    assert set(np.flatnonzero(ann) + 1) == {LIVER, LIVER_TUMOR}
    np.testing.assert_array_equal(t[LIVER - 1], np.isin(lab[0], (LIVER, LIVER_TUMOR)))
    np.testing.assert_array_equal(t[LIVER_TUMOR - 1], lab[0] == LIVER_TUMOR)
    others = [c for c in range(NUM_CLASSES) if c + 1 not in (LIVER, LIVER_TUMOR)]
    assert t[others].max() == 0  # the spleen voxel is unknown, not a spleen target


def test_kidney_lesions_go_to_the_nearest_side():
    from monai.data import MetaTensor

    lab = np.zeros((1, 20, 6, 6), np.uint8)
    lab[0, 1:6, 1:5, 1:5] = K_R
    lab[0, 14:19, 1:5, 1:5] = K_L
    lab[0, 6:8, 2:4, 2:4] = K_TUM  # touching the right kidney
    lab[0, 12:14, 2:4, 2:4] = K_CYST  # touching the left kidney
    lab[0, 3, 2, 2] = K_TUM  # inside the right kidney
    data = {"label": MetaTensor(torch.from_numpy(lab), affine=torch.diag(torch.tensor([1.5, 1.0, 2.0, 1.0]))),
            "annotated": _ann(K_R, K_L, K_TUM, K_CYST)}
    t = PartialLabelToChannelsd()(data)["target"]
    assert isinstance(t, MetaTensor) and t.dtype == torch.uint8 and tuple(t.shape) == (NUM_CLASSES, 20, 6, 6)
    assert torch.allclose(t.affine, data["label"].affine)
    t = t.numpy()
    right, left = t[K_R - 1].astype(bool), t[K_L - 1].astype(bool)
    np.testing.assert_array_equal(right, np.isin(lab[0], (K_R,)) | ((lab[0] == K_TUM)))
    np.testing.assert_array_equal(left, np.isin(lab[0], (K_L, K_CYST)))
    assert not (right & left).any()
    np.testing.assert_array_equal(t[K_TUM - 1], lab[0] == K_TUM)
    np.testing.assert_array_equal(t[K_CYST - 1], lab[0] == K_CYST)


def test_lesion_not_merged_into_unannotated_host():
    lab = np.zeros((1, 6, 6, 6), np.uint8)
    lab[0, 1:3, 1:3, 1:3] = LIVER_TUMOR
    t = PartialLabelToChannelsd()({"label": lab, "annotated": _ann(LIVER_TUMOR)})["target"]
    assert t[LIVER - 1].max() == 0 and t[LIVER_TUMOR - 1].sum() == 8


def test_remap_label_values():
    from monai.data import MetaTensor

    raw = np.array([0, 1, 2, 3, 2, 1], np.float32).reshape(1, 6, 1, 1)
    out = RemapLabelValuesd()({"label": raw, "label_values": {1: LIVER, 2: LIVER_TUMOR}})
    assert "label_values" not in out
    np.testing.assert_array_equal(out["label"].ravel(), [0, LIVER, LIVER_TUMOR, 0, LIVER_TUMOR, LIVER])
    assert out["label"].dtype == np.uint8
    mt = MetaTensor(torch.from_numpy(raw), affine=torch.diag(torch.tensor([2.0, 2.0, 2.0, 1.0])))
    out = RemapLabelValuesd()({"label": mt, "label_values": {"1": LIVER}})
    assert isinstance(out["label"], MetaTensor) and torch.allclose(out["label"].affine, mt.affine)
    assert out["label"].flatten().tolist() == [0, LIVER, 0, 0, 0, LIVER]
    untouched = RemapLabelValuesd()({"label": raw})
    assert untouched["label"] is raw


# ------------------------------------------------------------------------------------------ datalists


def _nii(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4)), str(path))
    return path


def _case(root, folder, name, label=None):
    img = _nii(root / f"images{folder}" / name, np.zeros((4, 4, 3), np.int16))
    lab = None
    if label is not None:
        lab = _nii(root / f"labels{folder}" / name, label)
    return img, lab


def test_our_json_format(tmp_path):
    _case(tmp_path, "Tr", "a.nii.gz", np.zeros((4, 4, 3), np.uint8))
    _case(tmp_path, "Tr", "b.nii.gz", np.zeros((4, 4, 3), np.uint8))
    _case(tmp_path, "Tr", "c.nii.gz", np.zeros((4, 4, 3), np.uint8))
    labels = {"0": "background", **{str(i): n for i, n in [(1, "spleen"), (6, "liver"), (27, "liver_tumor")]}}
    spec = {
        "labels": labels,
        "sources": {"lits": ["liver", "Liver Tumour"], "msd09": ["spleen"]},
        "training": [
            {"image": "imagesTr/a.nii.gz", "label": "labelsTr/a.nii.gz", "source": "lits"},
            {"image": "imagesTr/b.nii.gz", "label": "labelsTr/b.nii.gz", "source": "msd09"},
        ],
        "validation": [{"image": "imagesTr/c.nii.gz", "label": "labelsTr/c.nii.gz", "source": "other",
                        "annotated": ["liver"]}],
    }
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    dl = load_datalist(tmp_path)
    assert [s.annotated for s in dl.training] == [(LIVER, LIVER_TUMOR), (1,)]
    assert dl.validation[0].annotated == (LIVER,) and dl.validation[0].source == "other"
    assert dl.training[0].label_values is None  # file values already are ROI values
    assert dl.sources == {"lits": (LIVER, LIVER_TUMOR), "msd09": (1,), "other": (LIVER,)}
    assert dl.training[0].image == os.path.abspath(tmp_path / "imagesTr" / "a.nii.gz")
    d = dl.training[0].to_dict()
    assert d["annotated"].shape == (NUM_CLASSES,) and d["annotated"].dtype == np.uint8
    assert set(d) >= {"image", "label", "annotated", "source"} and "label_values" not in d
    assert set(split_by_source(dl.all())) == {"lits", "msd09", "other"}
    assert "lits" in dl.report()


def test_unknown_annotated_roi_is_a_clear_error(tmp_path):
    spec = {"training": [{"image": "x.nii.gz", "label": "y.nii.gz", "annotated": ["livr", "spleen", "kidny left"]}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError) as e:
        load_datalist(tmp_path / "dataset.json", check_files=False)
    msg = str(e.value)
    assert "'livr'" in msg and "liver" in msg and "'kidny left'" in msg and "kidney_left" in msg
    assert "'spleen'" not in msg


def test_missing_files_are_reported(tmp_path):
    spec = {"labels": {"0": "background", "1": "spleen"}, "training": [{"image": "x.nii.gz", "label": "y.nii.gz"}]}
    (tmp_path / "dataset.json").write_text(json.dumps(spec))
    with pytest.raises(FileNotFoundError, match="x.nii.gz"):
        load_datalist(tmp_path)


def test_msd_task03_liver_end_to_end(tmp_path):
    from monai.transforms import Compose, LoadImaged

    root = tmp_path / "Task03_Liver"
    lab = np.zeros((4, 4, 3), np.uint8)
    lab[1:3, 1:3, :] = 1
    lab[1, 1, 1] = 2
    _case(root, "Tr", "liver_0.nii.gz", lab)
    _nii(root / "imagesTs" / "liver_9.nii.gz", np.zeros((4, 4, 3), np.int16))
    spec = {"name": "Liver", "description": "Liver and tumour segmentation",
            "labels": {"0": "background", "1": "liver", "2": "cancer"},
            "training": [{"image": "./imagesTr/liver_0.nii.gz", "label": "./labelsTr/liver_0.nii.gz"}],
            "test": ["./imagesTs/liver_9.nii.gz"]}
    (root / "dataset.json").write_text(json.dumps(spec))
    dl = load_datalist(root)
    s = dl.training[0]
    assert s.source == "Task03_Liver" and s.annotated == (LIVER, LIVER_TUMOR)
    assert s.label_values == {1: LIVER, 2: LIVER_TUMOR}
    assert dl.test[0].label is None and dl.sources == {"Task03_Liver": (LIVER, LIVER_TUMOR)}
    assert not dl.unmapped
    chain = Compose([LoadImaged(["image", "label"], ensure_channel_first=True), RemapLabelValuesd(),
                     PartialLabelToChannelsd()])
    out = chain(s.to_dict())
    t = np.asarray(out["target"])
    np.testing.assert_array_equal(t[LIVER - 1], lab > 0)
    np.testing.assert_array_equal(t[LIVER_TUMOR - 1], lab == 2)
    assert t.sum() == (lab > 0).sum() + 1


def test_msd_task08_vessel_and_tumour(tmp_path):
    root = tmp_path / "Task08_HepaticVessel"
    _case(root, "Tr", "hepaticvessel_001.nii.gz", np.zeros((4, 4, 3), np.uint8))
    spec = {"name": "HepaticVessel", "labels": {"0": "background", "1": "Vessel", "2": "Tumour"},
            "training": [{"image": "./imagesTr/hepaticvessel_001.nii.gz",
                          "label": "./labelsTr/hepaticvessel_001.nii.gz"}]}
    (root / "dataset.json").write_text(json.dumps(spec))
    dl = load_datalist(root / "dataset.json")
    hv, hvt = roi_index("hepatic_vessel"), roi_index("hepatic_vessel_tumor")
    assert dl.training[0].label_values == {1: hv, 2: hvt}
    assert dl.training[0].annotated == (hv, hvt)


@pytest.mark.parametrize("name,labels,expected", [
    ("Pancreas", {"1": "pancreas", "2": "cancer"}, {1: "pancreas", 2: "pancreas_tumor"}),
    ("Lung", {"1": "cancer"}, {1: "lung_tumor"}),
    ("Colon", {"1": "colon cancer primaries"}, {1: "colon_tumor"}),
    ("Spleen", {"1": "spleen"}, {1: "spleen"}),
])
def test_msd_generic_lesion_names(name, labels, expected):
    res = resolve_label_names({"0": "background", **labels}, context=[name, f"Task0x_{name}", ""])
    assert res.mapping == {k: roi_index(v) for k, v in expected.items()} and not res.unmapped


def test_folder_layout_with_labels_json(tmp_path):
    lab = np.zeros((4, 4, 3), np.uint8)
    lab[0, 0, 0], lab[1, 1, 1], lab[2, 2, 2] = 1, 2, 3
    _nii(tmp_path / "images" / "case1_0000.nii.gz", np.zeros((4, 4, 3), np.int16))
    _nii(tmp_path / "labels" / "case1.nii.gz", lab)
    _nii(tmp_path / "images" / "case2_0000.nii.gz", np.zeros((4, 4, 3), np.int16))
    (tmp_path / "labels.json").write_text(json.dumps({"0": "background", "1": "Liver", "2": "vertebrae L1",
                                                      "3": "Right Kidney"}))
    dl = load_datalist(tmp_path, source="mine")
    assert len(dl.training) == 1 and dl.training[0].name == "case1"
    assert dl.training[0].annotated == (K_R, LIVER) and dl.training[0].source == "mine"
    assert dl.training[0].label_values == {1: LIVER, 3: K_R}
    assert dl.unmapped == {2: "vertebrae L1"} and "vertebrae L1" in dl.report()
    assert [s.name for s in dl.test] == ["case2"] and dl.test[0].label is None
    out = RemapLabelValuesd()({"label": lab[None], "label_values": dl.training[0].label_values})
    assert sorted(np.unique(out["label"]).tolist()) == [0, K_R, LIVER]  # the vertebra voxel is just 0


def test_label_map_forms_and_left_right_hint():
    from cdpdnet.data.datalist import _read_label_names

    assert _read_label_names({"background": 0, "liver": 1}) == {0: "background", 1: "liver"}  # nnU-Net v2
    assert _read_label_names({"labels": {"0": "background", "2": "spleen"}}) == {0: "background", 2: "spleen"}
    res = resolve_label_names({1: "kidney", 2: "Kidney Tumour"})
    assert res.unmapped == {1: "kidney"} and res.mapping == {2: K_TUM}
    assert any("left/right" in n for n in res.notes)


# --------------------------------------------------------------------------------------- sampling


def test_uniform_source_dataset_visits_each_source_equally():
    samples = ([PartialSample(f"a{i}", None, (1,), "A") for i in range(1)]
               + [PartialSample(f"b{i}", None, (6,), "B") for i in range(5)]
               + [PartialSample(f"c{i}", None, (2, 3), "C") for i in range(24)])
    ds = UniformSourceDataset(samples, length=30, seed=7)
    assert len(ds) == 30
    items = [ds[i] for i in range(len(ds))]
    assert Counter(d["source"] for d in items) == {"A": 10, "B": 10, "C": 10}
    first = [d["image"] for d in items]
    assert first == [ds[i]["image"] for i in range(30)]  # reproducible
    ds.set_epoch(1)
    assert [ds[i]["image"] for i in range(30)] != first
    ds.set_epoch(0)
    assert [ds[i]["image"] for i in range(30)] == first
    assert len({d["image"] for d in items if d["source"] == "C"}) > 3
    ds2 = UniformSourceDataset(samples, transform=lambda d: d["source"])
    assert len(ds2) == 30 and ds2[1] == "B"


def test_rarest_roi_weights_annotate_each_sources_rarest_roi_equally_often():
    """With the reference's 16 sampling keys the 17 ROIs one key labels (and the liver tumour, two keys)
    are each annotated in 1 sample of 11.6 instead of 16; every key is still drawn; sources that each
    have an ROI of their own (the benchmark's phantom sources) keep the uniform sampler."""
    keys = sampling_keys()
    w = rarest_roi_weights(keys)
    assert set(w) == set(keys) and all(v > 0 for v in w.values())
    assert w["10_06"] == w["07"] == w["12"] == 1.0 and w["04"] == w["10_03"] == 0.5 and w["03"] == 0.1
    total = sum(w.values())
    share = {r: sum(w[k] for k, v in keys.items() if r in v) / total for r in range(1, NUM_CLASSES + 1)}
    single = [r for r in share if sum(r in v for v in keys.values()) == 1]
    assert len(single) == 17 and min(share.values()) == pytest.approx(1 / total)
    assert all(share[r] == pytest.approx(1 / total) for r in single + [roi_index("liver_tumor")])
    assert 1 / total > 1.3 / len(keys)  # against the uniform sampler's 1 in 16
    assert rarest_roi_weights({s: [roi_index(n) for n in v] for s, v in PHANTOM_SOURCES.items()}) == \
        {s: 1.0 for s in PHANTOM_SOURCES}
    with pytest.raises(ValueError, match=r"sources that annotate no ROI .*\['B'\]"):
        rarest_roi_weights({"A": [1], "B": []})


def test_rarest_roi_sampling_draws_sources_by_those_weights_times_source_weights():
    samples = ([PartialSample(f"a{i}", None, (1, 2), "A") for i in range(3)]    # liver + its own ROI 2
               + [PartialSample(f"b{i}", None, (1,), "B") for i in range(3)]    # liver only: 1/3
               + [PartialSample(f"c{i}", None, (1, 6), "C") for i in range(3)])  # liver + its own ROI 6
    ds = UniformSourceDataset(samples, length=7000, seed=3, sampling="rarest_roi")
    counts = Counter(ds.pick(i).source for i in range(len(ds)))
    assert abs(counts["B"] / 7000 - 1 / 7) < 0.02 and abs(counts["A"] / 7000 - 3 / 7) < 0.02
    both = UniformSourceDataset(samples, length=7000, seed=3, sampling="rarest_roi", source_weights={"B": 3})
    assert np.allclose(both.source_p, [1 / 3, 1 / 3, 1 / 3])
    assert UniformSourceDataset(samples, sampling="uniform").source_p is None
    with pytest.raises(ValueError, match=r"source sampling must be one of \('uniform', 'rarest_roi'\), got 'rare'"):
        UniformSourceDataset(samples, sampling="rare")


def test_source_weights_draw_a_source_in_proportion_and_refuse_unknown_sources():
    samples = ([PartialSample(f"a{i}", None, (1,), "A") for i in range(3)]
               + [PartialSample(f"b{i}", None, (6,), "B") for i in range(3)]
               + [PartialSample(f"c{i}", None, (2, 3), "C") for i in range(3)])
    ds = UniformSourceDataset(samples, length=4000, seed=3, source_weights={"C": 2})
    counts = Counter(ds.pick(i).source for i in range(len(ds)))
    assert abs(counts["C"] / 4000 - 0.5) < 0.03 and abs(counts["A"] / 4000 - 0.25) < 0.03
    assert [ds.pick(i).image for i in range(50)] == [ds.pick(i).image for i in range(50)]  # reproducible
    with pytest.raises(ValueError, match=r"sources without samples: \['D'\]"):
        UniformSourceDataset(samples, source_weights={"D": 2})
    for bad in (0, -1, float("nan"), "2", True):
        with pytest.raises(ValueError, match=r"source_weights\['A'\] must be a number > 0"):
            UniformSourceDataset(samples, source_weights={"A": bad})
    with pytest.raises(ValueError, match="must be a mapping"):
        UniformSourceDataset(samples, source_weights=[("A", 2)])


def test_unannotated_weight_adds_weak_background_targets_to_unannotated_channels_only():
    """``unannotated_weight``: the unannotated pairs get lambda x the mean of their BCE towards 0 (no Dice); the
    annotated pairs' gradient is the plain loss's; with every channel annotated nothing changes."""
    g = torch.Generator().manual_seed(5)
    B, C, shape = 2, 3, (5, 4, 3)
    logits = torch.randn(B, C, *shape, generator=g)
    target = (torch.rand(B, C, *shape, generator=g) > 0.7).to(torch.uint8)
    annotated = torch.tensor([[True, False, False], [True, True, False]])
    target[~annotated] = 0  # what PartialLabelToChannelsd gives an unannotated channel
    z_plain, z_weak = (logits.clone().requires_grad_(True) for _ in range(2))
    plain = PartialLabelLoss()(z_plain, target, annotated)
    weak_loss = PartialLabelLoss(unannotated_weight=0.1)
    weak = weak_loss(z_weak, target, annotated)
    plain.backward()
    weak.backward()
    expected = torch.stack([F.softplus(logits[b, c].double()).mean() for b in range(B) for c in range(C)
                            if not annotated[b, c]]).mean()
    assert float((weak - plain).detach()) == pytest.approx(0.1 * float(expected), abs=1e-6)
    assert weak_loss.components()["unannotated"] == pytest.approx(float(expected), abs=1e-6)
    assert torch.allclose(z_weak.grad[annotated], z_plain.grad[annotated])
    assert torch.all(z_plain.grad[~annotated] == 0)
    n_unannotated, voxels = int((~annotated).sum()), logits[0, 0].numel()
    want = 0.1 * torch.sigmoid(logits[~annotated]) / (n_unannotated * voxels)  # pushes every voxel down
    assert torch.allclose(z_weak.grad[~annotated], want, atol=1e-7)
    everything = torch.ones(B, C, dtype=torch.bool)
    assert float(weak_loss(logits, target, everything)) == pytest.approx(float(PartialLabelLoss()(logits, target, everything)))
    with pytest.raises(ValueError, match="unannotated_weight must be >= 0"):
        PartialLabelLoss(unannotated_weight=-1)


def test_unannotated_cap_bounds_the_weak_push_where_a_channel_predicts_much_of_the_crop():
    """``unannotated_cap`` rho: an unannotated pair whose mean probability exceeds rho has its weak term scaled by
    rho / mean p (the factor carries no gradient); a pair below rho, and every annotated pair, keep their gradient."""
    B, C, shape = 2, 3, (6, 5, 4)
    logits = torch.full((B, C, *shape), -6.0)  # p ~ 0.0025 everywhere ...
    logits[0, 1, :3] = 4.0  # ... but a large predicted ROI (half of the crop) in an unannotated pair
    logits[1, 2, 0, 0, :2] = 4.0  # and a small one (2 voxels of 120) in another
    target = torch.zeros(B, C, *shape, dtype=torch.uint8)
    target[:, 0, 2:4] = 1
    annotated = torch.tensor([[True, False, False], [True, True, False]])
    rho = 0.05
    z_weak, z_cap = (logits.clone().requires_grad_(True) for _ in range(2))
    weak = PartialLabelLoss(unannotated_weight=0.1)
    weak(z_weak, target, annotated).backward()
    capped = PartialLabelLoss(unannotated_weight=0.1, unannotated_cap=rho)
    capped(z_cap, target, annotated).backward()
    mean_p = torch.sigmoid(logits).flatten(2).mean(-1)
    assert float(mean_p[0, 1]) > 0.4 and float(mean_p[1, 2]) < rho and float(mean_p[0, 2]) < rho
    assert torch.allclose(z_cap.grad[0, 1], z_weak.grad[0, 1] * rho / mean_p[0, 1], rtol=1e-5)
    for b, c in ((1, 2), (0, 2)):  # below the cap: the full push
        assert torch.allclose(z_cap.grad[b, c], z_weak.grad[b, c])
    assert torch.allclose(z_cap.grad[annotated], z_weak.grad[annotated])
    assert capped.components()["unannotated"] < weak.components()["unannotated"]
    with pytest.raises(ValueError, match=r"unannotated_cap must be in \[0, 1\]"):
        PartialLabelLoss(unannotated_weight=0.1, unannotated_cap=1.5)
    with pytest.raises(ValueError, match=r"unannotated_cap \(0.01\) bounds the weak term of unannotated_weight, which is 0"):
        PartialLabelLoss(unannotated_cap=0.01)
