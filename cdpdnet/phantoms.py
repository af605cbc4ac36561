"""Synthetic CT-like torso phantoms with all 32 CDPDNet ROIs, and partially labelled datasets of them.

What it models
--------------
A contrast-enhanced (portal-venous-like) CT of an adult torso from the lower chest to the pelvis
(default field of view 330 x 260 x 450 mm, RAS voxel order as nibabel and MONAI use it: axis 0
towards the patient's Right, axis 1 towards Anterior, axis 2 towards Superior). The body is an elliptic cylinder with skin,
subcutaneous fat and a muscle wall, air (-1000 HU) outside; vertebral column with discs and spinal
canal, ribs, sacrum, iliac wings, pubic/ischial bones, acetabula and proximal femurs as bone;
paraspinal, psoas and gluteal muscles; heart and mediastinum (unlabelled) above a two-domed
diaphragm. The 32 ROIs are smooth, randomly deformed ellipsoids (liver, spleen, kidneys with
cortex/medulla, adrenal glands as a lambda of two plates, gallbladder, bladder, prostate, femur
heads) and tubes along splines (aorta, inferior vena cava, oesophagus, portal/splenic vein, celiac
trunk, hepatic veins and intrahepatic portal branches, stomach, duodenum as a C around the
pancreatic head, pancreas, colon with caecum, flexures and sigmoid, small-bowel loops, rectum).
Hollow organs have a wall and a content (gastric fluid with an anterior air cap, fluid-filled small
bowel with an enhancing wall, mottled stool/gas in colon and rectum). Lesions: 1-3 hypodense liver
tumours, one hepatic vessel tumour (necrotic core, enhancing rim) abutting the hepatic vessels, a
heterogeneous kidney tumour and a water-density kidney cyst, a hypodense pancreas tumour, a lung
nodule and an intraluminal colon tumour on the colon wall; every lesion lies entirely inside its
host organ and carries its own label value (it overwrites the host in :attr:`Phantom.label`; the
label map without lesions is :attr:`Phantom.organ_label`).

Per seed: organ sizes +-15 % (small structures +-10 %), position jitter, body habitus (width,
depth, fat thickness), a global pose (rotation of a few degrees, translation, +-6 % scale),
contrast enhancement level, low- and mid-frequency tissue texture, mild blur (partial volume) and
Gaussian noise of 10-20 HU. Small structures are kept at least ~4 voxels thick at 3 mm, on the
generous side of anatomy, so that a small network can learn every ROI at 3 mm spacing.

What it does not model
----------------------
Real anatomical variability and pathology beyond the listed lesions, female anatomy (the
"prostate" ROI is always a prostate), arms, the upper chest, bowel peristalsis or motion,
contrast phases other than portal-venous, streak/beam-hardening/metal artefacts, realistic CT
noise texture (the noise is nearly white), thin structures (adrenal limbs, vessel branches and the
colon wall are thicker than in life), organ sliding/contact physics (overlaps are resolved by a
fixed priority), lymph nodes, mesenteric vessels other than the portal/splenic vein and the
iliac vessels. Images are for tests, demos and learning benchmarks, never for clinical use.

Partial labels: :data:`PHANTOM_SOURCES` defines virtual source datasets, each annotating a subset
of the ROIs (5 sources, the learning benchmark's default); :data:`REFERENCE_PHANTOM_SOURCES` gives the
label structure of the reference's training data instead (16 sources, one per sampling key of the
published sampler; 17 ROIs annotated by one of them); :data:`SOURCE_SETS` names both.
:func:`source_label` turns a full label map into one source's partial label map (ROIs it does not
annotate become background, except lesions of an annotated host, which become the host), and
:func:`write_phantom_dataset` writes an MSD-style dataset of them.

Scan protocols: by default every source's phantoms come from one acquisition model, so no image tells
which source it came from. Real source datasets differ in dose, reconstruction kernel and contrast
timing, which a network can learn to tell apart. With ``scan_protocols=True``
:func:`write_phantom_dataset` gives each source one of :data:`SCAN_PROTOCOLS` (noise, blur and
enhancement that differ between sources), and each held-out case the protocol of one source in turn.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from .taxonomy import NUM_CLASSES, ROIS, roi, sampling_keys

__all__ = [
    "Phantom",
    "make_phantom",
    "source_label",
    "PHANTOM_SOURCES",
    "REFERENCE_PHANTOM_SOURCES",
    "SCAN_PROTOCOLS",
    "ScanProtocol",
    "SOURCE_SETS",
    "FULL_SOURCE",
    "DEFAULT_FOV_MM",
    "TISSUES",
    "write_phantom_dataset",
]

DEFAULT_FOV_MM = (330.0, 260.0, 450.0)
FULL_SOURCE = "phantom_full"

# Virtual source datasets (partial labels). Several ROIs are annotated by one source only.
PHANTOM_SOURCES: dict[str, tuple[str, ...]] = {
    "phantom_btcv": tuple(r.name for r in ROIS[:14]),
    "phantom_liver": ("liver", "liver_tumor", "hepatic_vessel", "hepatic_vessel_tumor"),
    "phantom_kidney": ("kidney_right", "kidney_left", "kidney_tumor", "kidney_cyst"),
    "phantom_pancreas": ("pancreas", "pancreas_tumor"),
    "phantom_pelvis_chest": (
        "lung_right", "lung_left", "lung_tumor", "colon", "colon_tumor", "small_bowel", "rectum",
        "urinary_bladder", "prostate", "femur_head_left", "femur_head_right", "celiac_trunk",
        "aorta", "inferior_vena_cava",
    ),
}

# The reference's label structure (section 2.2): one virtual source per sampling key of the published
# uniform sampler, annotating what that dataset annotates ("phantom_01" = BTCV's 14 ROIs, "phantom_10_06" =
# the MSD lung tumours, ...). 17 ROIs are annotated by one source of 16, so a naive model is told
# "background" for them in 15 of 16 samples; with PHANTOM_SOURCES it is told so in 4 of 5 at most.
REFERENCE_PHANTOM_SOURCES: dict[str, tuple[str, ...]] = {
    f"phantom_{key}": tuple(ROIS[i - 1].name for i in rois) for key, rois in sampling_keys().items()
}

# Named source sets (``cdpdnet phantoms --sources``, ``bench/learning_phantoms.py --sources``).
SOURCE_SETS: dict[str, dict[str, tuple[str, ...]]] = {
    "phantom": PHANTOM_SOURCES,
    "reference": REFERENCE_PHANTOM_SOURCES,
}


@dataclass(frozen=True)
class ScanProtocol:
    """How one virtual source's scanner renders a phantom.

    ``noise_sd``: white Gaussian noise in HU (dose); ``smoothing_mm``: the FWHM-like blur (reconstruction
    kernel, slice profile); ``vessel_enhancement`` and ``parenchyma_enhancement`` multiply the HU of the
    enhancing vessels and organs (contrast dose and timing), on top of each case's own random level.
    """

    name: str
    noise_sd: float
    smoothing_mm: float
    vessel_enhancement: float = 1.0
    parenchyma_enhancement: float = 1.0


# One protocol per source, in the order of a source set (cycled for more sources). They differ where real
# datasets differ and keep every ROI visible: at the extremes of each case's random enhancement the hepatic
# vessels (165 HU) stay ~32 HU above the liver (95 HU), ~39 HU without a protocol, before the +-4 HU per-tissue jitter.
SCAN_PROTOCOLS: tuple[ScanProtocol, ...] = (
    ScanProtocol("portal venous, standard dose", noise_sd=14.0, smoothing_mm=1.2),
    ScanProtocol("low dose, sharp kernel", noise_sd=24.0, smoothing_mm=0.7),
    ScanProtocol("smooth kernel, high dose", noise_sd=9.0, smoothing_mm=2.0),
    ScanProtocol("arterial-weighted contrast", noise_sd=14.0, smoothing_mm=1.2, vessel_enhancement=1.25,
                 parenchyma_enhancement=0.95),
    ScanProtocol("lower contrast dose", noise_sd=18.0, smoothing_mm=1.0, vessel_enhancement=0.95),
)

_L = {r.name: r.index for r in ROIS}

# ---------------------------------------------------------------------------------------------
# Tissue classes: name -> (mean HU, low-frequency texture amplitude, mid-frequency texture amplitude,
# enhancement group: 0 none, 1 parenchyma, 2 vessel)
TISSUES: dict[str, tuple[float, float, float, int]] = {
    "air": (-1000.0, 0.0, 0.0, 0),
    "skin": (25.0, 5.0, 3.0, 0),
    "fat": (-100.0, 8.0, 5.0, 0),
    "visceral_fat": (-92.0, 10.0, 8.0, 0),
    "muscle": (52.0, 6.0, 5.0, 0),
    "bone_cortex": (850.0, 80.0, 40.0, 0),
    "bone_marrow": (260.0, 40.0, 45.0, 0),
    "disc": (85.0, 5.0, 5.0, 0),
    "csf": (15.0, 3.0, 3.0, 0),
    "cartilage": (75.0, 4.0, 4.0, 0),
    "lung": (-855.0, 25.0, 35.0, 0),
    "myocardium": (95.0, 6.0, 4.0, 1),
    "blood_pool": (170.0, 8.0, 4.0, 2),
    "liver": (95.0, 7.0, 4.0, 1),
    "spleen": (108.0, 6.0, 4.0, 1),
    "kidney_cortex": (175.0, 8.0, 6.0, 1),
    "kidney_medulla": (118.0, 8.0, 6.0, 1),
    "adrenal": (42.0, 4.0, 4.0, 1),
    "gi_wall": (72.0, 5.0, 4.0, 1),
    "sb_wall": (112.0, 5.0, 5.0, 1),
    "gastric_fluid": (18.0, 4.0, 3.0, 0),
    "bowel_fluid": (22.0, 4.0, 4.0, 0),
    "stool": (-80.0, 10.0, 30.0, 0),  # mottled with gas, see _synthesise
    "gas": (-950.0, 10.0, 10.0, 0),
    "bile": (8.0, 3.0, 2.0, 0),
    "pancreas": (82.0, 5.0, 9.0, 1),
    "esophagus": (48.0, 4.0, 4.0, 1),
    "artery": (168.0, 6.0, 3.0, 2),
    "ivc": (128.0, 12.0, 4.0, 2),
    "portal": (172.0, 6.0, 3.0, 2),
    "hepatic_vessel": (165.0, 6.0, 3.0, 2),
    "urine": (6.0, 3.0, 2.0, 0),
    "prostate": (42.0, 5.0, 7.0, 1),
    "liver_tumor": (45.0, 4.0, 5.0, 1),
    "hvt_core": (16.0, 3.0, 4.0, 0),
    "hvt_rim": (120.0, 5.0, 5.0, 1),
    "kidney_tumor": (62.0, 6.0, 22.0, 1),
    "kidney_cyst": (5.0, 2.0, 2.0, 0),
    "pancreas_tumor": (38.0, 4.0, 5.0, 1),
    "lung_tumor": (30.0, 5.0, 8.0, 1),
    "colon_tumor": (82.0, 5.0, 7.0, 1),
}
_TNAMES = tuple(TISSUES)
T = {n: i for i, n in enumerate(_TNAMES)}


# ---------------------------------------------------------------------------------------------
@dataclass
class Phantom:
    """One synthetic CT. ``image`` int16 HU and ``label`` uint8 (0..32) are ``[X, Y, Z]`` in RAS
    voxel order, ``affine`` the 4x4 voxel->RAS-mm matrix (nibabel convention)."""

    image: np.ndarray
    label: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    seed: int = 0
    organ_label: np.ndarray | None = None  # label map before lesions were painted (hosts whole)
    lesions: list[dict] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.image.shape)

    def roi_voxel_counts(self) -> dict[str, int]:
        counts = np.bincount(self.label.ravel(), minlength=NUM_CLASSES + 1)
        return {r.name: int(counts[r.index]) for r in ROIS}

    def source_label(self, source: str | Iterable[str]) -> np.ndarray:
        """The partial label map of a virtual source (a source name of any set in :data:`SOURCE_SETS`, or ROI names)."""
        if isinstance(source, str):
            known = {name: rois for sources in SOURCE_SETS.values() for name, rois in sources.items()}
            if source not in known:
                raise ValueError(f"unknown virtual source {source!r}; known: {sorted(known)}")
            names = known[source]
        else:
            names = tuple(source)
        return source_label(self.label, self.organ_label, names)


def source_label(label: np.ndarray, organ_label: np.ndarray | None, annotated: Iterable[str | int]) -> np.ndarray:
    """Partial label map of a source annotating ``annotated`` ROIs (names or label values).

    ROIs not annotated become 0, except a lesion whose host is annotated: its voxels take the host's
    value (from ``organ_label``, the label map without lesions), as published datasets include
    tumours in their organ.
    """
    ann = {roi(a).index for a in annotated}
    lut = np.zeros(NUM_CLASSES + 1, dtype=np.uint8)
    for v in ann:
        lut[v] = v
    out = lut[label]
    missing = [r.index for r in ROIS if r.is_lesion and r.index not in ann]
    if missing and organ_label is not None:
        m = np.isin(label, missing)
        if m.any():
            out[m] = lut[organ_label[m]]
    return out


# ---------------------------------------------------------------------------------------------
# Geometry helpers


def _rot(rx: float = 0.0, ry: float = 0.0, rz: float = 0.0) -> np.ndarray:
    """Rotation matrix ``Rz @ Ry @ Rx`` (angles in degrees)."""
    a, b, c = np.deg2rad([rx, ry, rz])
    Rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    Ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    Rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return Rz @ Ry @ Rx


def _spline(points, radii, step: float = 6.0):
    """Catmull-Rom spline through ``points`` sampled every ~``step`` mm, radii interpolated linearly."""
    P = np.asarray(points, dtype=np.float64)
    R = np.asarray(radii, dtype=np.float64)
    if R.ndim == 0:
        R = np.full(len(P), float(R))
    if len(P) == 2:
        n = max(2, int(np.ceil(np.linalg.norm(P[1] - P[0]) / step)) + 1)
        t = np.linspace(0, 1, n)[:, None]
        return P[0] + t * (P[1] - P[0]), R[0] + t[:, 0] * (R[1] - R[0])
    ext = np.vstack([2 * P[0] - P[1], P, 2 * P[-1] - P[-2]])
    out_p, out_r = [], []
    for i in range(len(P) - 1):
        p0, p1, p2, p3 = ext[i], ext[i + 1], ext[i + 2], ext[i + 3]
        n = max(2, int(np.ceil(np.linalg.norm(p2 - p1) / step)))
        t = (np.arange(n) / n)[:, None]
        pts = 0.5 * ((2 * p1) + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                     + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        out_p.append(pts)
        out_r.append(R[i] + t[:, 0] * (R[i + 1] - R[i]))
    out_p.append(P[-1:])
    out_r.append(R[-1:])
    return np.vstack(out_p), np.concatenate(out_r)


class _Grid:
    """Voxel grid with precomputed body-frame coordinates (mm) of every voxel centre.

    World (RAS mm) ``w = t + s * R @ b`` for body coordinates ``b`` (``R`` includes the mirror of x);
    the body frame has x towards the patient's left, y anterior, z superior, origin at the centre of the nominal field of view.
    """

    def __init__(self, shape, spacing, origin, R, t, s):
        self.shape = tuple(int(n) for n in shape)
        self.sp = np.asarray(spacing, dtype=np.float64)
        self.origin = np.asarray(origin, dtype=np.float64)
        self.R, self.t, self.s = np.asarray(R, float), np.asarray(t, float), float(s)
        ax = [(self.origin[i] + self.sp[i] * np.arange(self.shape[i]) - self.t[i]).astype(np.float32)
              for i in range(3)]
        Rt = (self.R.T / self.s).astype(np.float32)
        bx, by, bz = ax[0][:, None, None], ax[1][None, :, None], ax[2][None, None, :]
        self.X = Rt[0, 0] * bx + Rt[0, 1] * by + Rt[0, 2] * bz
        self.Y = Rt[1, 0] * bx + Rt[1, 1] * by + Rt[1, 2] * bz
        self.Z = Rt[2, 0] * bx + Rt[2, 1] * by + Rt[2, 2] * bz
        self.full = tuple(slice(0, n) for n in self.shape)

    def box(self, lo, hi):
        """Index slices covering the body-frame box ``[lo, hi]`` (None when outside the grid)."""
        lo, hi = np.asarray(lo, float), np.asarray(hi, float)
        corners = np.array([[lo[0] if i & 1 else hi[0], lo[1] if i & 2 else hi[1], lo[2] if i & 4 else hi[2]]
                            for i in range(8)])
        w = self.t + self.s * corners @ self.R.T
        idx = (w - self.origin) / self.sp
        a = np.maximum(np.floor(idx.min(0)).astype(int) - 1, 0)
        b = np.minimum(np.ceil(idx.max(0)).astype(int) + 2, self.shape)
        if np.any(b <= a):
            return None
        return tuple(slice(int(i), int(j)) for i, j in zip(a, b))

    def xyz(self, sl):
        return self.X[sl], self.Y[sl], self.Z[sl]


def _union(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _rel(inner, outer):
    return tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, outer))


# ---------------------------------------------------------------------------------------------
class _Builder:
    def __init__(self, seed, spacing, shape, fov_mm, pose):
        self.rng = np.random.default_rng(seed)
        rng = self.rng
        self.spacing = tuple(float(s) for s in spacing)
        if shape is None:
            shape = tuple(max(8, int(round(f / s))) for f, s in zip(fov_mm, self.spacing))
        self.shape = tuple(int(n) for n in shape)
        sp = np.asarray(self.spacing)
        origin = -(np.asarray(self.shape) - 1) / 2.0 * sp
        self.affine = np.diag([*self.spacing, 1.0]).astype(np.float64)
        self.affine[:3, 3] = origin
        if pose:
            R = _rot(*rng.uniform(-4, 4, 3))
            t = rng.uniform([-6, -4, -10], [6, 4, 10])
            s = rng.uniform(0.94, 1.06)
        else:
            rng.uniform(size=7)
            R, t, s = np.eye(3), np.zeros(3), 1.0
        # the body frame has x towards the patient's left; RAS world x points to the patient's right
        R = R @ np.diag([-1.0, 1.0, 1.0])
        self.g = _Grid(self.shape, self.spacing, origin, R, t, s)
        self.lab = np.zeros(self.shape, dtype=np.uint8)
        self.tis = np.full(self.shape, T["air"], dtype=np.uint8)
        self.lesions: list[dict] = []

    # ----- random helpers
    def J(self, p, mm=6.0):
        return np.asarray(p, float) + self.rng.uniform(-mm, mm, 3)

    def S(self, lo=0.85, hi=1.15):
        return float(self.rng.uniform(lo, hi))

    # ----- primitive shapes
    def wobble_fn(self, amp, n=3):
        f = self.rng.normal(0, 1.8, (n, 3))
        ph = self.rng.uniform(0, 2 * np.pi, n)
        a = np.full(n, amp / n)
        return f, ph, a

    def ellipsoid(self, c, r, R=None, wob=0.0, sl=None, p=2.0):
        """Normalised radius field ``q`` (inside where ``q < 1``) of a deformed (super)ellipsoid."""
        c, r = np.asarray(c, float), np.asarray(r, float)
        wf = self.wobble_fn(wob) if wob > 0 else None
        if sl is None:
            reach = r.max() * (1 + wob) * 1.02
            sl = self.g.box(c - reach, c + reach)
            if sl is None:
                return None, None
        X, Y, Z = self.g.xyz(sl)
        d = (X - np.float32(c[0]), Y - np.float32(c[1]), Z - np.float32(c[2]))
        if R is None:
            u = [d[i] / np.float32(r[i]) for i in range(3)]
        else:
            Rf = np.asarray(R, np.float32)
            u = [(Rf[0, i] * d[0] + Rf[1, i] * d[1] + Rf[2, i] * d[2]) / np.float32(r[i]) for i in range(3)]
        if p == 2.0:
            q = np.sqrt(u[0] * u[0] + u[1] * u[1] + u[2] * u[2])
        else:
            q = (np.abs(u[0]) ** p + np.abs(u[1]) ** p + np.abs(u[2]) ** p) ** (1.0 / p)
        if wf is not None:
            f, ph, a = wf
            w = np.zeros_like(q)
            for k in range(len(a)):
                w += np.float32(a[k]) * np.sin(np.float32(f[k, 0]) * u[0] + np.float32(f[k, 1]) * u[1]
                                               + np.float32(f[k, 2]) * u[2] + np.float32(ph[k]))
            q = q / (1 + w)
        return sl, q

    def tube(self, points, radii, step=None):
        """Signed distance (mm, negative inside) to a tube of varying radius along a spline."""
        if step is None:
            step = max(4.0, 1.5 * min(self.spacing))
        P, Rr = _spline(points, radii, step)
        segs, box = [], None
        for i in range(len(P) - 1):
            a, b = P[i], P[i + 1]
            m = max(Rr[i], Rr[i + 1]) + 1.0
            sl = self.g.box(np.minimum(a, b) - m, np.maximum(a, b) + m)
            if sl is None:
                continue
            segs.append((sl, a, b, Rr[i], Rr[i + 1]))
            box = _union(box, sl)
        if box is None:
            return None, None
        sdf = np.full(tuple(s.stop - s.start for s in box), np.inf, dtype=np.float32)
        for sl, a, b, ra, rb in segs:
            X, Y, Z = self.g.xyz(sl)
            ab = (b - a).astype(np.float32)
            L2 = np.float32(max(float(ab @ ab), 1e-6))
            dx, dy, dz = X - np.float32(a[0]), Y - np.float32(a[1]), Z - np.float32(a[2])
            t = (dx * ab[0] + dy * ab[1] + dz * ab[2]) / L2
            np.clip(t, 0, 1, out=t)
            ex, ey, ez = dx - t * ab[0], dy - t * ab[1], dz - t * ab[2]
            dist = np.sqrt(ex * ex + ey * ey + ez * ez) - (np.float32(ra) + t * np.float32(rb - ra))
            sub = sdf[_rel(sl, box)]
            np.minimum(sub, dist, out=sub)
        return box, sdf

    # ----- painting
    def paint(self, sl, mask, lab=None, tis=None):
        if sl is None or mask is None:
            return
        if lab is not None:
            self.lab[sl][mask] = lab
        if tis is not None:
            if np.isscalar(tis):
                self.tis[sl][mask] = tis
            else:
                self.tis[sl][mask] = tis[mask]

    # =========================================================================================
    def build(self):
        self._body()
        self._skeleton_and_muscles_params()
        self._muscles()
        self._thorax()
        self._abdomen()
        self._pelvis_organs()
        self._vessels()
        self._bones()
        self.organ_label = self.lab.copy()
        self._lesions()

    # ----- body wall
    def _body(self):
        rng, g = self.rng, self.g
        self.habx = rng.uniform(0.93, 1.02)
        self.haby = rng.uniform(0.92, 1.0)
        self.fat_mm = rng.uniform(10, 24)
        self.muscle_mm = rng.uniform(8, 12)
        zk = np.array([-260, -120, 0, 120, 260.0])
        axk = np.array([152, 154, 144, 146, 150.0]) * self.habx
        ayk = np.array([110, 114, 118, 118, 118.0]) * self.haby
        self.yc = -8.0
        ax = np.interp(g.Z, zk, axk).astype(np.float32)
        ay = np.interp(g.Z, zk, ayk).astype(np.float32)
        yy = g.Y - np.float32(self.yc)
        rho = np.sqrt((g.X / ax) ** 2 + (yy / ay) ** 2)
        rad = np.sqrt(g.X * g.X + yy * yy)
        d_in = rad * (1 - rho) / np.maximum(rho, 1e-3)  # approx. depth below the skin (mm)
        self.d_in = d_in
        body = rho < 1
        # anterior fat thicker than posterior
        fat = np.float32(self.fat_mm) * (1 + 0.2 * np.clip(yy / ay, -1, 1))
        tis = self.tis
        tis[body] = T["skin"]
        tis[body & (d_in > 2.5)] = T["fat"]
        wall_in = 2.5 + fat
        tis[body & (d_in > wall_in)] = T["muscle"]
        cav = body & (d_in > wall_in + np.float32(self.muscle_mm))
        tis[cav] = T["visceral_fat"]
        self.body = body
        self.cav = cav
        self.wall_in = wall_in

    def _skeleton_and_muscles_params(self):
        rng = self.rng
        self.spine_y0 = -62.0 + rng.uniform(-4, 4)
        self.lordosis = rng.uniform(6, 12)

    def spine_y(self, z):
        return self.spine_y0 + self.lordosis * np.exp(-((np.asarray(z, float)) / 90.0) ** 2)

    def _muscles(self):
        g = self.g
        # paraspinal muscles
        for s in (-1, 1):
            sl = g.box((s * 35 - 35, -140, -230), (s * 35 + 35, -40, 230))
            if sl is None:
                continue
            X, Y, Z = g.xyz(sl)
            yv = self.spine_y(Z)
            m = ((X - s * 36) / 30) ** 2 + ((Y - (yv - 42)) / 24) ** 2 < 1
            m &= self.body[sl] & (Z > -150)
            self.paint(sl, m, tis=T["muscle"])
        # psoas
        for s in (-1, 1):
            yv = self.spine_y(np.array([110, 0, -100, -160]))
            sl, sdf = self.tube([(s * 26, yv[0] + 6, 110), (s * 42, yv[1] + 12, 0), (s * 62, -8, -100),
                                 (s * 75, 12, -160), (s * 80, 20, -230)], [7, 17, 19, 16, 15])
            self.paint(sl, sdf < 0, tis=T["muscle"])
        # gluteal / pelvic wall muscles
        for s in (-1, 1):
            sl, q = self.ellipsoid((s * 80, -65, -185), (60, 48, 75))
            if sl is not None:
                self.paint(sl, (q < 1) & self.body[sl], tis=T["muscle"])
            sl, q = self.ellipsoid((s * 95, -15, -215), (45, 45, 45))
            if sl is not None:
                self.paint(sl, (q < 1) & self.body[sl], tis=T["muscle"])

    # ----- thorax: diaphragm, lungs, heart
    def diaphragm(self, X, Y):
        k = np.float32(self.dia_k)
        zr = np.float32(self.dia_r) - k * ((X + 60) ** 2 + 0.7 * Y**2) / 1000
        zl = np.float32(self.dia_l) - k * ((X - 60) ** 2 + 0.7 * (Y + 5) ** 2) / 1000
        return np.maximum(zr, zl)

    def _thorax(self):
        rng, g = self.rng, self.g
        self.dia_r = 168 + rng.uniform(-8, 8)
        self.dia_l = self.dia_r - 10 + rng.uniform(-5, 5)
        self.dia_k = rng.uniform(7, 9)
        sl = g.box((-170, -140, 60), (170, 140, 240))
        if sl is None:
            return
        X, Y, Z = g.xyz(sl)
        zd = self.diaphragm(X, Y)
        cav = self.cav[sl]
        # thoracic cavity: inside the rib cage (cavity minus a rib layer of ~10 mm)
        inner = cav & (self.d_in[sl] > self.wall_in[sl] + np.float32(self.muscle_mm + 3))
        lung = inner & (Z > zd + 4)
        # mediastinum
        yv = self.spine_y(Z)
        med = (np.abs(X - 8) < 24) & (Y > yv - 5)
        # heart
        self.heart_c = self.J((22, 30, 222), 6)
        self.heart_r = np.array([72, 56, 62]) * self.S(0.92, 1.08)
        self.heart_R = _rot(0, 0, 25 + rng.uniform(-5, 5))
        _, qh = self.ellipsoid(self.heart_c, self.heart_r, self.heart_R, 0.03, sl=sl)
        heart = (qh < 1) & (Z > zd + 2) & cav
        lung &= ~med & ~(qh < 1.08)
        # spine region
        lung &= ~((np.abs(X) < 32) & (Y < yv + 22))
        lab = np.where(X < 0, np.uint8(_L["lung_right"]), np.uint8(_L["lung_left"]))
        self.lab[sl][lung] = lab[lung]
        self.tis[sl][lung] = T["lung"]
        med_m = med & inner & (Z > zd + 2)
        self.tis[sl][med_m] = T["visceral_fat"]
        self.lab[sl][med_m] = 0
        self.tis[sl][heart] = T["myocardium"]
        _, qh2 = self.ellipsoid(self.heart_c, self.heart_r * 0.72, self.heart_R, 0.0, sl=sl)
        self.tis[sl][heart & (qh2 < 1)] = T["blood_pool"]
        self.lab[sl][heart] = 0

    def below(self, sl, margin=3.0):
        """Mask of voxels below the diaphragm (and inside the abdominal cavity) in ``sl``."""
        X, Y, Z = self.g.xyz(sl)
        return (Z < self.diaphragm(X, Y) - np.float32(margin)) & self.cav[sl]

    # ----- abdominal organs, lowest priority first
    def _abdomen(self):
        rng, g = self.rng, self.g
        # ---- small bowel: serpentine loops in the lower abdomen
        n_sweeps = 5
        pts, x_side = [], 1
        dj = self.J((42, 22, 38), 5)
        self.dj = dj
        pts.append(dj)
        z0 = rng.uniform(2, 10)
        dz = rng.uniform(23, 26)
        for k in range(n_sweeps):
            z = z0 - k * dz
            xs = np.linspace(60, -60, 7) * x_side
            for j, x in enumerate(xs):
                y = rng.uniform(0, 20) if (j + k) % 2 == 0 else rng.uniform(30, 50)
                zz = z + (12 if j % 2 == 0 else -12) + rng.uniform(-4, 4)
                pts.append(np.array([x + rng.uniform(-5, 5), y, zz]))
            x_side = -x_side
        sb_r = rng.uniform(11.5, 13.5)
        sl, sdf = self.tube(pts, sb_r)
        if sl is not None:
            m = (sdf < 0) & self.below(sl)
            tis = np.where(sdf > -4.0, np.uint8(T["sb_wall"]), np.uint8(T["bowel_fluid"]))
            self.paint(sl, m, _L["small_bowel"], tis)

        # ---- colon (caecum .. sigmoid)
        j = lambda p, mm=6: self.J(p, mm)  # noqa: E731
        cs = self.S(0.9, 1.1)
        cpts = [j((-75, 22, -78)), j((-88, 5, -30)), j((-92, 0, 20)), j((-82, 28, 48)),
                j((-45, 50, 40), 8), j((0, 54, 26), 8), j((45, 50, 42), 8), j((92, 18, 75)),
                j((98, -5, 35)), j((96, -8, -20)), j((85, 2, -72)), j((58, 30, -102), 8),
                j((20, 34, -96), 8), j((2, -2, -108), 4), j((0, -38, -118), 3)]
        crad = np.array([29, 26, 24, 23, 21, 21, 21, 21, 20, 19, 18, 17, 17, 17, 17]) * cs
        self.colon_pts = cpts
        sl, sdf = self.tube(cpts, crad)
        if sl is not None:
            m = (sdf < 0) & self.below(sl)
            M = self._colon_content(sl, sdf)
            self.paint(sl, m, _L["colon"], M)

        # ---- rectum
        rpts = [cpts[-1], self.J((0, -46, -150), 3), self.J((0, -50, -185), 3), (0, -44, -235)]
        sl, sdf = self.tube(rpts, np.array([17, 18, 18, 16]) * self.S(0.92, 1.08))
        if sl is not None:
            m = (sdf < 0) & self.cav[sl]
            self.paint(sl, m, _L["rectum"], self._colon_content(sl, sdf))

        # ---- stomach
        ss = self.S()
        spts = [self.J((36, 4, 128), 3), self.J((58, -6, 142), 5), self.J((76, 12, 118), 5),
                self.J((64, 38, 94), 5), self.J((34, 54, 68), 5), self.J((2, 46, 62), 4)]
        srad = np.array([20, 34, 33, 30, 23, 14]) * np.array([1, ss, ss, ss, ss, 1])
        sl, sdf = self.tube(spts, srad)
        self.pylorus = spts[-1]
        if sl is not None:
            m = (sdf < 0) & self.below(sl)
            X, Y, Z = g.xyz(sl)
            ymax = Y[m].max() if m.any() else 0
            level = ymax - rng.uniform(12, 22)
            tis = np.where(sdf > -4.5, np.uint8(T["gi_wall"]),
                           np.where(Y > level, np.uint8(T["gas"]), np.uint8(T["gastric_fluid"])))
            self.paint(sl, m, _L["stomach"], tis)

        # ---- duodenum (C around the pancreatic head)
        dpts = [self.pylorus, self.J((-30, 30, 70), 3), self.J((-60, 12, 64), 3), self.J((-70, 6, 36), 3),
                self.J((-60, 8, 10), 3), self.J((-22, 12, -1), 3), self.J((14, 10, 2), 3),
                self.J((36, 14, 20), 3), dj]
        sl, sdf = self.tube(dpts, 13.0 * self.S(0.92, 1.08))
        if sl is not None:
            m = (sdf < 0) & self.below(sl)
            tis = np.where(sdf > -4.0, np.uint8(T["gi_wall"]), np.uint8(T["bowel_fluid"]))
            self.paint(sl, m, _L["duodenum"], tis)

        # ---- liver: right lobe + left lobe, below the diaphragm and above an oblique inferior surface
        ls = self.S()
        cR, rR = self.J((-65, -5, 110), 6), np.array([72, 80, 70]) * ls
        cL, rL = self.J((5, 40, 118), 6), np.array([55, 40, 35]) * self.S()
        RL = _rot(0, -12 + rng.uniform(-5, 5), rng.uniform(-8, 8))
        boxL = _union(self.g.box(cR - rR * 1.1, cR + rR * 1.1), self.g.box(cL - rL * 1.1, cL + rL * 1.1))
        _, q1 = self.ellipsoid(cR, rR, _rot(0, 0, rng.uniform(-8, 8)), 0.07, sl=boxL)
        _, q2 = self.ellipsoid(cL, rL, RL, 0.08, sl=boxL)
        X, Y, Z = g.xyz(boxL)
        z_inf = np.float32(45 + rng.uniform(-5, 5)) + np.float32(0.45) * (X + 80) - np.float32(0.1) * Y
        liver = ((q1 < 1) | (q2 < 1)) & (Z > z_inf) & self.below(boxL, 3.0)
        self.paint(boxL, liver, _L["liver"], T["liver"])
        self.liver_box = boxL

        # ---- spleen
        sl, q = self.ellipsoid(self.J((95, -32, 112), 6), np.array([26, 52, 44]) * self.S(),
                               _rot(0, 0, -30 + rng.uniform(-8, 8)), 0.08)
        if sl is not None:
            self.paint(sl, (q < 1) & self.below(sl), _L["spleen"], T["spleen"])

        # ---- pancreas (head in the duodenal C, tail to the splenic hilum)
        ps = self.S(0.92, 1.1)
        ppts = [self.J((-37, 14, 44), 3), self.J((-8, 28, 55), 3), self.J((28, 22, 64), 3),
                self.J((64, 2, 76), 3), self.J((86, -14, 86), 3)]
        sl, sdf = self.tube(ppts, np.array([18, 13, 12.5, 11.5, 9.5]) * ps)
        if sl is not None:
            m = (sdf < 0) & self.below(sl)
            self.paint(sl, m, _L["pancreas"], T["pancreas"])
        self.pancreas_pts = ppts

        # ---- gallbladder
        sl, q = self.ellipsoid(self.J((-48, 42, 60), 5), np.array([16, 18, 32]) * self.S(),
                               _rot(-20 + rng.uniform(-8, 8), 15, 0), 0.05)
        if sl is not None:
            self.paint(sl, (q < 1) & self.below(sl), _L["gallbladder"], T["bile"])

        # ---- kidneys (cortex/medulla)
        for name, c0, rz in (("kidney_right", (-76, -45, 32), 1), ("kidney_left", (76, -42, 46), -1)):
            ks = self.S()
            c = self.J(c0, 6)
            r = np.array([27, 22, 55]) * ks
            R = _rot(0, rz * (-12 + rng.uniform(-5, 5)), rz * (-28 + rng.uniform(-8, 8)))
            # R: upper pole tilted medially, hilum facing antero-medially
            sl, q = self.ellipsoid(c, r, R, 0.05)
            if sl is None:
                continue
            m = (q < 1) & self.cav[sl]
            tis = np.where(q < 0.62, np.uint8(T["kidney_medulla"]), np.uint8(T["kidney_cortex"]))
            self.paint(sl, m, _L[name], tis)
            setattr(self, name + "_top", c + R @ np.array([0, 0, r[2]]))

        # ---- adrenal glands: a lambda of two plates above/medial to the upper poles
        for name, c0 in (("adrenal_gland_right", (-50, -36, 104)), ("adrenal_gland_left", (48, -30, 96))):
            c = self.J(c0, 4)
            a = self.S(0.9, 1.1)
            box = self.g.box(c - 26, c + 26)
            if box is None:
                continue
            m = np.zeros(tuple(b.stop - b.start for b in box), bool)
            base = rng.uniform(-10, 10)
            for ang, off in ((35 + base, (-5, 4, 0)), (-35 + base, (5, 4, -4))):
                _, q = self.ellipsoid(c + np.asarray(off), np.array([6.8, 15, 17]) * a, _rot(0, 0, ang), 0.04, sl=box)
                m |= q < 1
            self.paint(box, m & self.cav[box], _L[name], T["adrenal"])

    def _colon_content(self, sl, sdf):
        tis = np.where(sdf > -4.0, np.uint8(T["gi_wall"]), np.uint8(T["stool"]))
        return tis

    # ----- pelvic organs
    def _pelvis_organs(self):
        sl, q = self.ellipsoid(self.J((0, 20, -140), 6), np.array([45, 36, 34]) * self.S(), None, 0.06)
        if sl is not None:
            self.paint(sl, (q < 1) & self.cav[sl], _L["urinary_bladder"], T["urine"])
        sl, q = self.ellipsoid(self.J((0, -2, -186), 3), np.array([21, 17, 19]) * self.S(0.9, 1.1), None, 0.05)
        if sl is not None:
            self.paint(sl, (q < 1) & self.body[sl], _L["prostate"], T["prostate"])

    # ----- vessels
    def _vessels(self):
        rng = self.rng
        vs = self.S(0.92, 1.08)
        # celiac trunk (painted before the aorta so that the aorta wins at the ostium)
        zc = 96 + rng.uniform(-6, 6)
        cpts = [(12, -25, zc), (11, -8, zc - 3), (10 + rng.uniform(-4, 4), 8, zc - 7),
                (12 + rng.uniform(-4, 4), 20 + rng.uniform(-3, 3), zc - 10)]
        sl, sdf = self.tube(cpts, 6.2 * self.S(0.95, 1.08))
        self.paint(sl, sdf < 0 if sdf is not None else None, _L["celiac_trunk"], T["artery"])
        # aorta
        apts = [(30, -48, 240), (26, -42, 170), (16, -29, 120), (11, -24, 60), (8, -19, 0), (6, -20, -45)]
        apts = [self.J(p, 2.5) for p in apts]
        apts[2][2] = max(apts[2][2], zc + 18)
        sl, sdf = self.tube(apts, np.array([13, 12.5, 12, 11.5, 11, 10.5]) * vs)
        self.paint(sl, sdf < 0 if sdf is not None else None, _L["aorta"], T["artery"])
        bif = apts[-1]
        # iliac arteries (unlabelled)
        for s in (-1, 1):
            sl, sdf = self.tube([bif, (s * 40, -15, -95), (s * 58, 12, -150), (s * 72, 32, -210)], [7, 6.5, 6, 6])
            if sl is not None:
                m = (sdf < 0) & (self.lab[sl] != _L["aorta"])
                self.paint(sl, m, 0, T["artery"])
        # inferior vena cava
        ipts = [(-20, -25, -55), (-22, -22, 0), (-24, -22, 60), (-28, -24, 110), (-22, -14, 150), (-14, -2, 174)]
        ipts = [self.J(p, 2.5) for p in ipts]
        sl, sdf = self.tube(ipts, np.array([11, 11.5, 12, 12, 12.5, 13]) * vs)
        self.paint(sl, sdf < 0 if sdf is not None else None, _L["inferior_vena_cava"], T["ivc"])
        ivc_top = ipts[4]
        for s in (-1, 1):  # iliac veins
            sl, sdf = self.tube([ipts[0], (s * 42, -28, -100), (s * 60, -2, -150), (s * 74, 20, -210)], [8, 8, 7.5, 7.5])
            if sl is not None:
                m = (sdf < 0) & (self.lab[sl] != _L["inferior_vena_cava"]) & (self.tis[sl] != T["artery"])
                self.paint(sl, m, 0, T["ivc"])
        # oesophagus
        epts = [self.J((6, -27, 240), 3), self.J((8, -22, 178), 3), self.J((20, -9, 145), 3), self.J((30, -1, 133), 2)]
        sl, sdf = self.tube(epts, 9.5 * self.S(0.95, 1.08))
        self.paint(sl, sdf < 0 if sdf is not None else None, _L["esophagus"], T["esophagus"])
        # splenic vein + portal vein
        hil = self.J((-36, 18, 86), 3)
        pv = [self.J((88, -20, 92), 3), self.J((60, -8, 74), 3), self.J((28, 8, 60), 2), self.J((-4, 15, 54), 2),
              self.J((-22, 18, 70), 2), hil]
        sl, sdf = self.tube(pv, np.array([5.8, 6, 6, 7.5, 8, 8]) * vs)
        self.paint(sl, sdf < 0 if sdf is not None else None, _L["portal_vein_and_splenic_vein"], T["portal"])
        # hepatic vessels: three hepatic veins into the IVC, two portal branches from the hilum; inside liver only
        liver_box = self.liver_box
        hv = np.zeros(tuple(s.stop - s.start for s in liver_box), bool)
        branches = [
            ([ivc_top, self.J((-60, 0, 140), 6), self.J((-100, 8, 115), 6)], [6.5, 5.5, 4.6]),
            ([ivc_top, self.J((-40, 25, 130), 6), self.J((-50, 50, 105), 6)], [6.5, 5.5, 4.6]),
            ([ivc_top, self.J((-5, 20, 140), 5), self.J((15, 45, 125), 6)], [6.2, 5.3, 4.6]),
            ([hil, self.J((-62, 8, 96), 5), self.J((-92, -10, 90), 6)], [6.5, 5.5, 4.6]),
            ([hil, self.J((-15, 32, 100), 5), self.J((10, 48, 110), 6)], [6.0, 5.2, 4.6]),
        ]
        for pts, rad in branches:
            sl, sdf = self.tube(pts, rad)
            if sl is None:
                continue
            inter = tuple(slice(max(a.start, b.start), min(a.stop, b.stop)) for a, b in zip(sl, liver_box))
            if any(s.stop <= s.start for s in inter):
                continue
            sub = hv[_rel(inter, liver_box)]
            sub |= sdf[_rel(inter, sl)] < 0
        hv &= self.lab[liver_box] == _L["liver"]
        self.paint(liver_box, hv, _L["hepatic_vessel"], T["hepatic_vessel"])

    # ----- bones (highest priority of the non-lesion structures)
    def _bones(self):
        rng, g = self.rng, self.g
        cortex, marrow = np.uint8(T["bone_cortex"]), np.uint8(T["bone_marrow"])
        # vertebral column
        sl = g.box((-60, -130, -80), (60, -10, 240))
        if sl is not None:
            X, Y, Z = g.xyz(sl)
            yv = self.spine_y(Z).astype(np.float32)
            lumbar = np.clip((120 - Z) / 60, 0, 1)
            rx = 19 + 5 * lumbar
            ry = 15 + 3 * lumbar
            rb = np.sqrt((X / rx) ** 2 + ((Y - yv) / ry) ** 2)
            period = 30 + 5 * lumbar
            phase = np.mod(Z - np.float32(rng.uniform(0, 30)), period)
            body = (rb < 1) & (phase < period - 7) & (Z > -75)
            disc = (rb < 0.97) & (phase >= period - 7) & (Z > -75)
            canal_c = yv - ry - 9
            rc = np.sqrt(X**2 + (Y - canal_c) ** 2)
            canal = (rc < 8) & (Z > -75)
            arch = (rc >= 8) & (rc < 15) & (Y < yv - ry + 2) & (Z > -75)
            spinous = (np.abs(X) < 5.5) & (Y < canal_c - 10) & (Y > canal_c - 34) & (Z > -75) & (phase < period - 9)
            transverse = (np.abs(X) < 42) & (np.abs(Y - canal_c - 4) < 5.5) & (phase < 12) & (Z > -40)
            inwall = self.d_in[sl] > self.wall_in[sl] + 3
            bone = (body | arch | spinous | transverse) & inwall
            canal &= inwall
            tis = np.where(rb > 0.86, cortex, marrow)
            tis = np.where(arch | spinous | transverse, cortex, tis)
            lab_b = self.lab[sl]
            self.tis[sl][bone] = tis[bone]
            lab_b[bone] = 0
            self.tis[sl][disc] = T["disc"]
            lab_b[disc] = 0
            self.tis[sl][canal] = T["csf"]
            lab_b[canal] = 0
        # sacrum: tilted plate
        sl = g.box((-60, -125, -175), (60, -50, -60))
        if sl is not None:
            X, Y, Z = g.xyz(sl)
            yc = -76 + (Z + 70) * 0.28  # more posterior inferiorly
            half_w = 48 - (-70 - Z) * 0.3
            m = (np.abs(Y - yc) < 13) & (np.abs(X) < half_w) & (Z < -68) & (Z > -170)
            tis = np.where(np.abs(Y - yc) > 9, cortex, marrow)
            self.tis[sl][m] = tis[m]
            self.lab[sl][m] = 0
        # ribs (lower chest), in the muscle layer of the chest wall
        sl = g.box((-170, -140, 40), (170, 140, 240))
        if sl is not None:
            X, Y, Z = g.xyz(sl)
            d_in = self.d_in[sl]
            w = self.wall_in[sl] + np.float32(self.muscle_mm)
            ring = (d_in > self.wall_in[sl] + 1) & (d_in < w + 3)
            stripe = np.mod(Z + 0.35 * Y + np.float32(rng.uniform(0, 30)), 30) < 10
            ribs = ring & stripe & (Z > 50) & ((Y < 35) | (np.abs(X) > 70)) & self.body[sl]
            self.tis[sl][ribs] = cortex
            self.lab[sl][ribs] = 0
        # iliac wings, iliac body, pubic and ischial rami
        for s in (-1, 1):
            sl = g.box((s * 90 - 80, -110, -150), (s * 90 + 80, 60, -40))
            if sl is not None:
                X, Y, Z = g.xyz(sl)
                rr = np.sqrt((X - s * 15) ** 2 + (Y - 5) ** 2)
                ztop = -52 - 0.1 * np.abs(Y)
                wing = (np.abs(rr - 102) < 5.5) & (s * X > 42) & (Y < 35) & (Z < ztop) & (Z > -135)
                self.tis[sl][wing] = cortex
                self.lab[sl][wing] = 0
            for pts, rad in (
                ([(s * 70, -45, -105), (s * 82, -18, -140), (s * 84, -5, -160)], [14, 15, 13]),  # iliac body
                ([(s * 82, 22, -175), (s * 45, 48, -192), (s * 10, 58, -200)], [10, 10, 10]),  # superior pubic ramus
                ([(s * 78, -28, -182), (s * 68, -40, -225), (s * 55, -30, -245)], [13, 13, 12]),  # ischium
            ):
                sl2, sdf = self.tube(pts, rad)
                if sl2 is not None:
                    m = sdf < 0
                    tis = np.where(sdf > -3, cortex, marrow)
                    self.tis[sl2][m] = tis[m]
                    self.lab[sl2][m] = 0
        # femora: head (labelled), neck and shaft; acetabulum around the head
        for name, s in (("femur_head_left", 1), ("femur_head_right", -1)):
            c = self.J((s * 88, 5, -160), 4)
            rh = 23.5 * self.S(0.93, 1.07)
            # acetabulum: spherical shell, upper-medial half
            sl, q = self.ellipsoid(c, (rh + 13,) * 3)
            if sl is not None:
                X, Y, Z = g.xyz(sl)
                dirn = np.array([-s * 0.55, 0.0, 0.83])
                dot = (X - c[0]) * dirn[0] + (Y - c[1]) * dirn[1] + (Z - c[2]) * dirn[2]
                rq = q * (rh + 13)
                cup = (rq > rh + 4) & (rq < rh + 13) & (dot > -0.15 * rh)
                cart = (rq >= rh) & (rq <= rh + 4) & (dot > -0.3 * rh)
                tis = np.where(rq > rh + 10, cortex, marrow)
                self.tis[sl][cup] = tis[cup]
                self.lab[sl][cup] = 0
                self.tis[sl][cart] = T["cartilage"]
                self.lab[sl][cart] = 0
            troch = c + np.array([s * 34, -10, -32])
            sl, sdf = self.tube([c, troch, troch + np.array([-s * 4, 4, -70])], [15, 17, 15])
            if sl is not None:
                m = sdf < 0
                tis = np.where(sdf > -3, cortex, marrow)
                self.tis[sl][m] = tis[m]
                self.lab[sl][m] = 0
            sl, q = self.ellipsoid(c, (rh,) * 3, None, 0.02)
            if sl is not None:
                m = q < 1
                tis = np.where(q > 1 - 3.0 / rh, cortex, marrow)
                self.tis[sl][m] = tis[m]
                self.lab[sl][m] = _L[name]

    # ----- lesions
    def _host_crop(self, host_vals, pad=2):
        m = np.isin(self.lab, host_vals)
        if not m.any():
            return None, None
        idx = [np.flatnonzero(m.any(axis=tuple(j for j in range(3) if j != i))) for i in range(3)]
        sl = tuple(slice(max(int(ix[0]) - pad, 0), min(int(ix[-1]) + pad + 1, n)) for ix, n in zip(idx, self.shape))
        return sl, m[sl]

    def place_lesion(self, name, host_vals, radius, tissue, wob=0.12, near=None, near_mm=6.0,
                     wall_band=None, min_radius=5.5, host_mask_fn=None):
        """Place one lesion fully inside the host (label values ``host_vals``); returns its voxel count."""
        rng, g = self.rng, self.g
        sl, host = self._host_crop(host_vals)
        if sl is None:
            return 0
        depth = ndimage.distance_transform_edt(np.pad(host, 1), sampling=self.spacing)[1:-1, 1:-1, 1:-1]
        margin = 0.5 * max(self.spacing)
        r = radius
        cand = None
        for _ in range(8):
            need = r * (1 + wob) * g.s + margin
            cand = depth >= need
            if wall_band is not None:
                cand &= depth <= need + wall_band
            if near is not None:
                nm = np.isin(self.lab[sl], near)
                if nm.any():
                    dn = ndimage.distance_transform_edt(~nm, sampling=self.spacing)
                    cand2 = cand & (dn <= need + near_mm)
                    if cand2.any():
                        cand = cand2
            if cand.any():
                break
            r = max(min_radius, 0.85 * r)
        if not cand.any():  # last resort: the deepest voxel, radius to fit
            k = np.unravel_index(int(np.argmax(depth)), depth.shape)
            r = max((depth[k] - margin) / (g.s * (1 + wob)), 0.6 * max(self.spacing))
            cand = np.zeros_like(depth, bool)
            cand[k] = True
        flat = np.flatnonzero(cand)
        k = np.unravel_index(int(flat[rng.integers(len(flat))]), cand.shape)
        gk = tuple(int(s.start + i) for s, i in zip(sl, k))
        c = np.array([g.X[gk], g.Y[gk], g.Z[gk]], float)
        rr = r * np.array([rng.uniform(0.85, 1.0), rng.uniform(0.85, 1.0), 1.0])
        R = _rot(*rng.uniform(-90, 90, 3))
        box, q = self.ellipsoid(c, rr, R, wob)
        if box is None:
            return 0
        inside = np.isin(self.lab[box], host_vals)
        m = (q < 1) & inside
        if not callable(tissue):
            tis = tissue
        else:
            tis = tissue(q, rr)
        self.paint(box, m, _L[name], tis)
        n = int(m.sum())
        hosts = np.unique(self.organ_label[box][m]).tolist()
        self.lesions.append({"roi": name, "center_mm": [float(v) for v in c], "radius_mm": float(r),
                             "voxels": n, "host": [ROIS[h - 1].name for h in hosts if h]})
        return n

    def _lesions(self):
        rng = self.rng
        liver = [_L["liver"]]
        # hepatic vessel tumour first (needs room next to the vessels)
        self.place_lesion("hepatic_vessel_tumor", liver, rng.uniform(11, 15),
                          lambda q, rr: np.where(q > 1 - 2.8 / rr.min(), np.uint8(T["hvt_rim"]), np.uint8(T["hvt_core"])),
                          near=[_L["hepatic_vessel"]], near_mm=5.0)
        for _ in range(int(rng.integers(1, 4))):
            self.place_lesion("liver_tumor", liver, rng.uniform(9, 19), T["liver_tumor"])
        kid = [_L["kidney_right"], _L["kidney_left"]]
        k_t = kid[int(rng.integers(2))]
        self.place_lesion("kidney_tumor", [k_t], rng.uniform(11, 15), T["kidney_tumor"], wob=0.1)
        k_c = kid[int(rng.integers(2))]
        self.place_lesion("kidney_cyst", [k_c], rng.uniform(8.5, 11), T["kidney_cyst"], wob=0.04)
        self.place_lesion("pancreas_tumor", [_L["pancreas"]], rng.uniform(9, 12), T["pancreas_tumor"], wob=0.08)
        lung = [_L["lung_right"], _L["lung_left"]][int(rng.integers(2))]
        self.place_lesion("lung_tumor", [lung], rng.uniform(9, 14), T["lung_tumor"], wob=0.15)
        self.place_lesion("colon_tumor", [_L["colon"]], rng.uniform(9, 12), T["colon_tumor"], wob=0.1,
                          wall_band=1.5 * max(self.spacing))

    # ----- image synthesis
    def synthesise(self, noise_sd=None, smoothing_mm=1.2, vessel_enhancement=1.0, parenchyma_enhancement=1.0):
        rng, shape = self.rng, self.shape
        sp = np.asarray(self.spacing)
        n = len(_TNAMES)
        base = np.array([TISSUES[k][0] for k in _TNAMES], np.float32)
        aT = np.array([TISSUES[k][1] for k in _TNAMES], np.float32)
        aM = np.array([TISSUES[k][2] for k in _TNAMES], np.float32)
        grp = np.array([TISSUES[k][3] for k in _TNAMES])
        # contrast enhancement level and per-tissue jitter
        e_par = rng.uniform(0.92, 1.08) * parenchyma_enhancement
        e_vas = rng.uniform(0.86, 1.14) * vessel_enhancement
        base = np.where(grp == 1, base * e_par, np.where(grp == 2, base * e_vas, base)).astype(np.float32)
        base += rng.uniform(-4, 4, n).astype(np.float32) * (grp > 0)
        # low-frequency texture (~20 mm) and mid-frequency texture (~3 mm)
        cshape = tuple(int(np.ceil(s * d / 20.0)) + 2 for s, d in zip(shape, sp))
        coarse = rng.standard_normal(cshape).astype(np.float32)
        Tf = ndimage.zoom(coarse, [s / c for s, c in zip(shape, cshape)], order=1, prefilter=False)
        Tf = _fit(Tf, shape)
        Mf = rng.standard_normal(shape, dtype=np.float32)
        Mf = ndimage.gaussian_filter(Mf, sigma=np.maximum(2.5 / sp, 0.6), mode="nearest")
        Mf /= max(float(Mf.std()), 1e-6)
        tis = self.tis
        img = base[tis]
        img += aT[tis] * Tf
        img += aM[tis] * Mf
        st = tis == T["stool"]
        img[st & (Mf > 0.35)] = -880.0 + 20 * Mf[st & (Mf > 0.35)]
        if smoothing_mm and smoothing_mm > 0:
            img = ndimage.gaussian_filter(img, sigma=smoothing_mm / sp / 2.355 * 2.0, mode="nearest")
        sd = float(rng.uniform(10, 20)) if noise_sd is None else float(noise_sd)
        if sd > 0:
            nz = rng.standard_normal(shape, dtype=np.float32)
            img += np.float32(sd) * nz
        np.clip(img, -1024, 3071, out=img)
        return np.rint(img).astype(np.int16), sd


def _fit(a, shape):
    out = np.zeros(shape, a.dtype)
    sl = tuple(slice(0, min(x, y)) for x, y in zip(a.shape, shape))
    out[sl] = a[sl]
    for ax in range(3):  # edge-pad if zoom came out one short
        if a.shape[ax] < shape[ax]:
            idx = [slice(None)] * 3
            idx[ax] = slice(a.shape[ax], shape[ax])
            src = [slice(None)] * 3
            src[ax] = slice(a.shape[ax] - 1, a.shape[ax])
            out[tuple(idx)] = out[tuple(src)]
    return out


def make_phantom(
    seed: int,
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    shape: Sequence[int] | None = None,
    *,
    fov_mm: Sequence[float] = DEFAULT_FOV_MM,
    noise_sd: float | None = None,
    smoothing_mm: float = 1.2,
    pose: bool = True,
    protocol: ScanProtocol | None = None,
) -> Phantom:
    """A synthetic CT phantom with all 32 ROIs (deterministic for ``seed``).

    ``spacing`` in mm (x, y, z); ``shape`` defaults to ``fov_mm / spacing`` (110 x 87 x 150 at
    3 mm); the field of view is centred on world (0, 0, 0). ``noise_sd`` (HU) defaults to a random
    value in 10..20; ``smoothing_mm`` is the FWHM-like width of the blur; ``pose=False`` disables the
    random global rotation, translation and scale. ``protocol`` (one of :data:`SCAN_PROTOCOLS`, or
    your own) sets the noise and blur instead of ``noise_sd`` and ``smoothing_mm`` and scales the
    contrast enhancement; the anatomy of a seed is the same under every protocol.
    """
    b = _Builder(int(seed), spacing, shape, fov_mm, pose)
    b.build()
    if protocol is None:
        image, _ = b.synthesise(noise_sd, smoothing_mm)
    else:
        image, _ = b.synthesise(protocol.noise_sd, protocol.smoothing_mm, protocol.vessel_enhancement,
                                protocol.parenchyma_enhancement)
    return Phantom(image=image, label=b.lab, affine=b.affine, spacing=b.spacing, seed=int(seed),
                   organ_label=b.organ_label, lesions=b.lesions)


# ---------------------------------------------------------------------------------------------
# Dataset writing


def _save_nifti_atomic(arr: np.ndarray, affine: np.ndarray, path: Path) -> None:
    from .imageio import save_volume

    save_volume(arr, affine, path)


def _write_json_atomic(obj, path: Path) -> None:
    from .checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(obj, indent=2) + "\n").encode())


def write_phantom_dataset(
    out_dir: str | os.PathLike,
    n_per_source: int = 4,
    n_heldout: int = 3,
    spacing: Sequence[float] = (3.0, 3.0, 3.0),
    seed: int = 0,
    sources: str | dict[str, Sequence[str]] | None = None,
    scan_protocols: bool = False,
) -> Path:
    """Write an MSD-style partially labelled phantom dataset; returns the path of ``dataset.json``.

    ``n_per_source`` training cases per virtual source (label maps restricted to that source's ROIs,
    see :func:`source_label`) under ``imagesTr``/``labelsTr``, and ``n_heldout`` fully labelled test
    cases under ``imagesTs``/``labelsTs``. Every case has its own seed (``seed * 100000 + k``), so two
    source sets with the same number of cases in all and the same ``seed`` hold the same images, labelled
    differently. ``sources``: ``{name: ROI names}``, or a name of :data:`SOURCE_SETS` (default
    :data:`PHANTOM_SOURCES`). ``scan_protocols``: the k-th source's cases are rendered with
    ``SCAN_PROTOCOLS[k % len(SCAN_PROTOCOLS)]`` and held-out case i with the protocol of source ``i % len(sources)``, so
    an image tells which source it resembles (the dataset records each case's ``protocol``); by
    default every case is rendered alike, with random noise.
    """
    if isinstance(sources, str):
        if sources not in SOURCE_SETS:
            raise ValueError(f"unknown source set {sources!r}; known: {sorted(SOURCE_SETS)}")
        sources = SOURCE_SETS[sources]
    out = Path(out_dir)
    for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    sources = dict(PHANTOM_SOURCES if sources is None else sources)
    for names in sources.values():
        for n in names:
            roi(n)  # validate
    protocols = ({src: SCAN_PROTOCOLS[j % len(SCAN_PROTOCOLS)] for j, src in enumerate(sources)}
                 if scan_protocols else {})
    k = 0
    training, test = [], []
    for src, names in sources.items():
        canon = [roi(n).name for n in names]
        for i in range(n_per_source):
            case_seed = int(seed) * 100000 + k
            k += 1
            ph = make_phantom(case_seed, spacing, protocol=protocols.get(src))
            cid = f"{src}_{i:03d}"
            _save_nifti_atomic(ph.image, ph.affine, out / "imagesTr" / f"{cid}.nii.gz")
            _save_nifti_atomic(source_label(ph.label, ph.organ_label, canon), ph.affine, out / "labelsTr" / f"{cid}.nii.gz")
            training.append({"image": f"imagesTr/{cid}.nii.gz", "label": f"labelsTr/{cid}.nii.gz",
                             "source": src, "annotated": canon, "seed": case_seed,
                             **({"protocol": protocols[src].name} if protocols else {})})
    all_names = [r.name for r in ROIS]
    for i in range(n_heldout):
        case_seed = int(seed) * 100000 + k
        k += 1
        like = list(sources)[i % len(sources)] if protocols else None
        ph = make_phantom(case_seed, spacing, protocol=protocols.get(like))
        cid = f"{FULL_SOURCE}_{i:03d}"
        _save_nifti_atomic(ph.image, ph.affine, out / "imagesTs" / f"{cid}.nii.gz")
        _save_nifti_atomic(ph.label, ph.affine, out / "labelsTs" / f"{cid}.nii.gz")
        test.append({"image": f"imagesTs/{cid}.nii.gz", "label": f"labelsTs/{cid}.nii.gz",
                     "source": FULL_SOURCE, "annotated": all_names, "seed": case_seed,
                     **({"protocol": protocols[like].name, "scanned_like": like} if protocols else {})})
    labels = {"0": "background", **{str(r.index): r.name for r in ROIS}}
    ds = {
        "name": "cdpdnet-phantoms",
        "description": "Synthetic CT-like torso phantoms with 32 ROIs and partial labels per virtual source "
                       "(cdpdnet.phantoms); not real patient data.",
        "reference": "cdpdnet.phantoms",
        "licence": "CC0",
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": labels,
        "spacing": [float(s) for s in spacing],
        "sources": {s: [roi(n).name for n in names] for s, names in sources.items()},
        **({"scan_protocols": {s: asdict(p) for s, p in protocols.items()}} if protocols else {}),
        "numTraining": len(training),
        "numTest": len(test),
        "training": training,
        "test": test,
    }
    path = out / "dataset.json"
    _write_json_atomic(ds, path)
    return path
