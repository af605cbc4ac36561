#!/usr/bin/env python
"""Build the CDPDNet demo data set from real CT volumes found in two PyPI source distributions.

Sources (see docs/demo-data.md and section 3 of the offline-assets design note):

* ``totalsegmentator==2.18.0`` sdist (Apache-2.0): ``tests/reference_files/`` holds CT volumes with
  TotalSegmentator *model output* label maps (its regression reference outputs, not manual
  annotation), a 20-slice CT DICOM series and a larger CT without labels.
* ``pyradiomics==3.0.1`` sdist (BSD-3-Clause): ``data/lung{1,2}_{image,label}.nrrd``, two chest
  CTs with one lung-lesion mask each (origin of the masks not stated). The lungs of ``lung2`` are
  labelled here by threshold (:mod:`cdpdnet.threshold_lungs`), not by hand.

What it writes under ``--out`` (default ``data/demo``)::

    images/<id>.nii.gz        CT images (TotalSegmentator NIfTI files copied byte for byte; NRRD and
                              DICOM converted with SimpleITK; original affines kept, never reoriented)
    labels/<id>.nii.gz        uint8 label maps with ROI values 1..32 (cdpdnet.taxonomy), holding ONLY
                              the ROIs listed in the case's "annotated" list (all else is 0)
    dicom/<series>/           the original DICOM files of the TotalSegmentator series (byte copies)
    dicom/<series>_pacs/      the same files with the empty UIDs / patient fields filled in
                              deterministically, so that a PACS (Orthanc) accepts them
    phantoms/                 synthetic phantom cases (cdpdnet.phantoms), if requested
    datalist.json             MSD-style partially labelled datalist (format below)
    .fetch_manifest.json      sha256 of every written file and the recipe that made it (idempotency)

The result is deliberately PARTIALLY labelled: each labelled image carries a different subset of
the 32 ROIs, as the 11 source data sets of CDPDNet do. ROIs outside a case's field of view (the
pelvis of a chest CT) are annotated as absent: in its ``annotated`` list, with no voxels.

Idempotent: downloads are cached under ``${CDPDNET_CACHE:-~/.cache/cdpdnet}/downloads`` and
verified by sha256; extracted members under ``.../extracted``; an output file is only rewritten
when it is missing, was changed on disk, or its recipe changed. A second run with everything in
place takes about a second and changes nothing.

Usage::

    .venv/bin/python scripts/fetch_demo_data.py --out data/demo
    .venv/bin/python scripts/fetch_demo_data.py --out data/demo --phantoms 0   # real CT only
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from cdpdnet.taxonomy import ROI_BY_NAME, ROIS, map_label_names, roi  # noqa: E402
from cdpdnet.threshold_lungs import LUNG_THRESHOLD_HU, threshold_lung_masks  # noqa: E402

# Bumped whenever the way outputs are built changes: every output is then rebuilt once.
RECIPE_VERSION = 1
MANIFEST_NAME = ".fetch_manifest.json"
DATALIST_NAME = "datalist.json"
MIN_VOXELS = 50  # an ROI with fewer voxels in a label map is not listed as annotated (nor kept)


# ---------------------------------------------------------------------------------------------
# Source distributions


@dataclasses.dataclass(frozen=True)
class Sdist:
    key: str
    requirement: str
    filename: str
    size: int
    sha256: str  # full digest observed on download (2026-11-28), prefixes match offline-assets.md
    pip_args: tuple[str, ...]
    licence: str
    root: str  # top folder inside the tarball
    members: tuple[str, ...]  # files (or folders ending in "/") to extract, relative to root
    build_modules: tuple[str, ...] = ()  # modules pip needs in *this* interpreter (no build isolation)

    @property
    def version(self) -> str:
        return self.requirement.split("==")[1]


TOTALSEG = Sdist(
    key="totalsegmentator",
    requirement="totalsegmentator==2.18.0",
    filename="totalsegmentator-2.18.0.tar.gz",
    size=38_049_988,
    sha256="5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03",
    # the wheel lacks tests/reference_files; only the sdist has them
    pip_args=("--no-binary", ":all:"),
    licence="Apache-2.0 (package LICENSE; PKG-INFO 'License: Apache 2.0'); no separate licence or source "
    "is stated for the test images",
    root="totalsegmentator-2.18.0",
    members=(
        "LICENSE",
        "PKG-INFO",
        "totalsegmentator/map_to_binary.py",
        "tests/reference_files/example_ct_sm.nii.gz",
        "tests/reference_files/example_seg.nii.gz",
        "tests/reference_files/example_ct.nii.gz",
        "tests/reference_files/example_seg_fast_force_split.nii.gz",
        "tests/reference_files/aorta_report/example_ct.nii.gz",
        "tests/reference_files/example_ct_dicom/",
    ),
)
PYRADIOMICS = Sdist(
    key="pyradiomics",
    requirement="pyradiomics==3.0.1",
    filename="pyradiomics-3.0.1.tar.gz",
    size=34_473_030,
    sha256="47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5",
    # setup.py imports numpy and versioneer: pip must use this interpreter's packages
    pip_args=("--no-build-isolation",),
    licence="BSD-3-Clause (package LICENSE.txt, 'Copyright 2017 Harvard Medical School'); the source of the "
    "test images and masks is not stated",
    root="pyradiomics-3.0.1",
    members=(
        "LICENSE.txt",
        "PKG-INFO",
        "data/README.md",
        "data/lung1_image.nrrd",
        "data/lung2_image.nrrd",
        "data/lung2_label.nrrd",
    ),
    build_modules=("numpy", "versioneer", "setuptools", "wheel"),
)
SDISTS = (TOTALSEG, PYRADIOMICS)


def default_cache() -> Path:
    return Path(os.environ.get("CDPDNET_CACHE") or Path.home() / ".cache" / "cdpdnet")


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def log(msg: str = "") -> None:
    print(msg, flush=True)


def download_sdist(sd: Sdist, downloads: Path) -> Path:
    """``pip download`` the sdist into ``downloads`` (once) and check its size and sha256."""
    downloads.mkdir(parents=True, exist_ok=True)
    dest = downloads / sd.filename
    if dest.exists():
        if dest.stat().st_size == sd.size and sha256_of(dest) == sd.sha256:
            log(f"  {sd.filename}: cached, sha256 ok")
            return dest
        log(f"  {sd.filename}: cached file has the wrong size/sha256, downloading again")
    if sd.build_modules:
        probe = "; ".join(f"import {m}" for m in sd.build_modules)
        r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(
                f"{sd.requirement} is downloaded with --no-build-isolation and needs {', '.join(sd.build_modules)} "
                f"in this interpreter ({sys.executable}):\n  {sys.executable} -m pip install "
                f"{' '.join(sd.build_modules)}\n{r.stderr.strip().splitlines()[-1] if r.stderr else ''}"
            )
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *sd.pip_args, "-d", tmp, sd.requirement]
        log(f"  $ {' '.join(cmd)}")
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise SystemExit(f"pip download failed for {sd.requirement}:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        got = Path(tmp) / sd.filename
        if not got.exists():
            raise SystemExit(f"pip download did not produce {sd.filename}: {sorted(os.listdir(tmp))}")
        digest, size = sha256_of(got), got.stat().st_size
        if digest != sd.sha256 or size != sd.size:
            raise SystemExit(
                f"{sd.filename}: sha256 {digest} / {size} bytes, expected {sd.sha256} / {sd.size} bytes; refusing to use it"
            )
        os.replace(got, dest)
        log(f"  {sd.filename}: downloaded in {time.time() - t0:.1f} s, {size:,} bytes, sha256 ok")
    return dest


def _safe_member_path(dest_root: Path, name: str) -> Path:
    """Path of a tar member under ``dest_root``; refuses absolute paths and ``..`` (path traversal)."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or not p.parts:
        raise ValueError(f"unsafe tar member name {name!r}")
    out = (dest_root / Path(*p.parts)).resolve()
    root = dest_root.resolve()
    if out != root and root not in out.parents:
        raise ValueError(f"tar member {name!r} escapes {dest_root}")
    return out


def safe_extract(tar_path: Path, root: str, wanted: Sequence[str], dest_root: Path) -> list[Path]:
    """Extract only ``wanted`` (paths relative to ``root``; a trailing "/" selects a folder's files).

    Only regular files are written (no links, devices or folders from the archive), each through a
    temporary file, and every name is checked against path traversal.
    """
    files = [f"{root}/{w}" for w in wanted if not w.endswith("/")]
    folders = [f"{root}/{w}" for w in wanted if w.endswith("/")]
    found: dict[str, Path] = {}
    with tarfile.open(tar_path, "r:gz") as tar:
        for m in tar:
            if m.name not in files and not any(m.name.startswith(f) for f in folders):
                continue
            if not m.isfile():
                if m.isdir():
                    continue
                raise ValueError(f"{tar_path.name}: refusing non-regular member {m.name!r}")
            out = _safe_member_path(dest_root, m.name)
            out.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(m)
            assert src is not None
            with atomic_path(out) as tmp, open(tmp, "wb") as f:
                shutil.copyfileobj(src, f)
            found[m.name] = out
    missing = [f for f in files if f not in found] + [d for d in folders if not any(k.startswith(d) for k in found)]
    if missing:
        raise SystemExit(f"{tar_path.name}: members not found: {missing}")
    return sorted(found.values())


def extract_sdist(sd: Sdist, tar_path: Path, extracted: Path) -> Path:
    """Extract the needed members once; a stamp records the sdist digest and the member list."""
    root = extracted / sd.root
    stamp = extracted / f".{sd.root}.json"
    want = {"sha256": sd.sha256, "members": list(sd.members)}
    if stamp.exists():
        try:
            st = json.loads(stamp.read_text())
            if {k: st.get(k) for k in want} == want and all(
                (extracted / f).is_file() and (extracted / f).stat().st_size == n for f, n in st["files"].items()
            ):
                return root
        except (ValueError, KeyError, TypeError):
            pass
    t0 = time.time()
    out = safe_extract(tar_path, sd.root, sd.members, extracted)
    files = {str(p.relative_to(extracted.resolve())): p.stat().st_size for p in out}
    write_text_atomic(stamp, json.dumps({**want, "files": files}, indent=1))
    log(f"  extracted {len(out)} files from {sd.filename} in {time.time() - t0:.1f} s")
    return root


# ---------------------------------------------------------------------------------------------
# Atomic writing


def _umask() -> int:
    um = os.umask(0)
    os.umask(um)
    return um


@contextlib.contextmanager
def atomic_path(dest: Path) -> Iterator[Path]:
    """Yield a temporary path next to ``dest`` (same suffixes, hidden name); moved onto ``dest`` on success."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(dest.suffixes[-2:]) if dest.name.endswith(".nii.gz") else dest.suffix
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=f".tmp{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give them the usual mode
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(dest: Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        Path(tmp).write_text(text)


def copy_atomic(src: Path, dest: Path) -> None:
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)


# ---------------------------------------------------------------------------------------------
# Label names: TotalSegmentator class map -> the 32 ROIs


def load_class_map(map_to_binary_py: Path, task: str = "total") -> dict[int, str]:
    """``class_map[task]`` of TotalSegmentator's ``map_to_binary.py``, loaded by path (no install)."""
    spec = importlib.util.spec_from_file_location("_totalseg_map_to_binary", map_to_binary_py)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return {int(k): str(v) for k, v in mod.class_map[task].items()}


# Demo rules for what taxonomy.map_label_names cannot know. They override its result.
#   name -> canonical ROI name, or None for "never map".
DEMO_RULES: dict[str, str | None] = {
    # The taxonomy has whole lungs; a TotalSegmentator lung lobe is part of one, and the union of the
    # lobes is the lung. (Many foreign values onto one ROI is allowed.)
    "lung_upper_lobe_left": "lung_left",
    "lung_lower_lobe_left": "lung_left",
    "lung_upper_lobe_right": "lung_right",
    "lung_middle_lobe_right": "lung_right",
    "lung_lower_lobe_right": "lung_right",
    # Same structure and (today) the same name as the ROI; stated here so that a synonym change in
    # the taxonomy cannot silently drop them from the demo.
    "portal_vein_and_splenic_vein": "portal_vein_and_splenic_vein",
    "urinary_bladder": "urinary_bladder",
    "small_bowel": "small_bowel",
    # CDPDNet's kidney_cyst (KiTS) is any renal cyst; TotalSegmentator splits it by side.
    "kidney_cyst_left": "kidney_cyst",
    "kidney_cyst_right": "kidney_cyst",
    # TotalSegmentator's femur_* is the WHOLE femur, CDPDNet's femur_head_* only the head: not
    # equivalent, never map (the taxonomy synonyms "femur left"/"femur right" would map them).
    "femur_left": None,
    "femur_right": None,
}


@dataclasses.dataclass
class ClassMapping:
    value_to_roi: dict[int, int]  # foreign label value -> ROI value 1..32
    how: dict[int, str]
    dropped: dict[int, str]  # foreign value -> name, not mapped
    names: dict[int, str]

    def report(self) -> str:
        lines = []
        for v in sorted(self.value_to_roi):
            lines.append(f"    {v:3d} {self.names[v]:<32} -> {self.value_to_roi[v]:2d} {ROIS[self.value_to_roi[v] - 1].name} ({self.how[v]})")
        lines.append(f"    dropped ({len(self.dropped)}): " + ", ".join(f"{v}:{n}" for v, n in sorted(self.dropped.items())))
        return "\n".join(lines)


def map_totalseg_names(class_map: Mapping[int, str], rules: Mapping[str, str | None] = DEMO_RULES) -> ClassMapping:
    """taxonomy.map_label_names (names and synonyms only), then the explicit ``rules`` on top."""
    names = {int(k): str(v) for k, v in class_map.items() if int(k) != 0}
    nm = map_label_names(names)
    value_to_roi = dict(nm.mapping)
    how = dict(nm.how)
    for v, n in names.items():
        if n in rules:
            target = rules[n]
            if target is None:
                value_to_roi.pop(v, None)
                how[v] = "demo rule: not equivalent, dropped"
            else:
                value_to_roi[v] = ROI_BY_NAME[target].index
                how[v] = "demo rule" if nm.mapping.get(v) != value_to_roi[v] else "name (confirmed by demo rule)"
    dropped = {v: n for v, n in names.items() if v not in value_to_roi}
    how = {v: h for v, h in how.items() if v in value_to_roi}
    return ClassMapping(value_to_roi, how, dropped, names)


# ---------------------------------------------------------------------------------------------
# Partial labels


def value_counts(seg: np.ndarray) -> dict[int, int]:
    """``{value: voxels}`` of a non-negative integer label map (bincount: much faster than np.unique)."""
    a = np.asarray(seg).ravel()
    if a.size == 0:
        return {}
    if a.min() < 0:
        raise ValueError("label maps must not hold negative values")
    c = np.bincount(a.astype(np.intp, copy=False))
    return {int(v): int(c[v]) for v in np.flatnonzero(c)}


def roi_voxel_counts(seg: np.ndarray, value_to_roi: Mapping[int, int]) -> dict[str, int]:
    """Voxels per ROI (canonical name) after mapping; ROIs with no voxel are absent."""
    counts = value_counts(seg)
    out: dict[str, int] = {}
    for v, c in counts.items():
        r = value_to_roi.get(v)
        if r:
            name = ROIS[r - 1].name
            out[name] = out.get(name, 0) + int(c)
    return out


def choose_annotated(counts: Mapping[str, int], requested: Iterable[str], min_voxels: int = MIN_VOXELS,
                     absent: Iterable[str] = ()) -> tuple[list[str], dict[str, int]]:
    """The annotated ROIs (taxonomy order): the requested ones present with at least ``min_voxels``
    voxels, plus the ``absent`` ones (outside the field of view, annotated with no voxels); and the
    requested ROIs left out, with their counts. An "absent" ROI with voxels is an error."""
    req = [roi(n).name for n in requested]
    gone = [roi(n).name for n in absent]
    seen = {n: counts[n] for n in gone if counts.get(n, 0)}
    if seen:
        raise ValueError(f"ROIs declared absent are in the label map: {seen}")
    keep = [r.name for r in ROIS if (r.name in req and counts.get(r.name, 0) >= min_voxels) or r.name in gone]
    skipped = {n: counts.get(n, 0) for n in req if n not in keep}
    return keep, skipped


def partial_label(seg: np.ndarray, value_to_roi: Mapping[int, int], annotated: Iterable[str | int]) -> np.ndarray:
    """Map foreign values to ROI values 1..32 and keep ONLY the ``annotated`` ROIs (others become 0)."""
    seg = np.asarray(seg)
    if seg.size and (seg.min() < 0):
        raise ValueError("label maps must not hold negative values")
    keep = {roi(a).index for a in annotated}
    lut = np.zeros(int(seg.max(initial=0)) + 1, dtype=np.uint8)
    for v, r in value_to_roi.items():
        if r in keep and v < lut.size:
            lut[v] = r
    return lut[seg.astype(np.int64, copy=False)]


def write_partial_label_nifti(seg_path: Path, out_path: Path, value_to_roi: Mapping[int, int], annotated: Iterable[str]) -> np.ndarray:
    """Write the partial label of a NIfTI label map: uint8, same grid, affine and qform/sform codes."""
    import nibabel as nib

    src = nib.load(str(seg_path))
    arr = partial_label(np.asanyarray(src.dataobj), value_to_roi, annotated)
    hdr = src.header.copy()
    hdr.set_data_dtype(np.uint8)
    hdr["scl_slope"], hdr["scl_inter"] = np.nan, np.nan
    img = nib.Nifti1Image(arr, src.affine, hdr)
    img.set_qform(src.header.get_qform(), code=int(src.header["qform_code"]))
    img.set_sform(src.header.get_sform(), code=int(src.header["sform_code"]))
    with atomic_path(out_path) as tmp:
        nib.save(img, str(tmp))
    return arr


# ---------------------------------------------------------------------------------------------
# Lungs by threshold for a chest CT whose own label holds only a lesion


def add_threshold_lungs(seg: np.ndarray, hu: np.ndarray, spacing: Sequence[float],
                        lps_x_of: Callable[[np.ndarray], float]) -> tuple[np.ndarray, dict[int, int]]:
    """``seg`` (a case's own binary mask) plus both lungs of :func:`threshold_lung_masks`: a label map
    of values 1 (the own mask, painted last), 2 (right lung) and 3 (left lung), and the value -> ROI
    map of the lungs. ``lps_x_of(mask)`` is a mask's mean LPS x in mm (+x is the patient's left); the
    lung further left is the left lung, a lone lung is sided against the middle of the frame."""
    out = np.zeros(seg.shape, np.uint8)
    masks = threshold_lung_masks(hu, spacing)
    xs = [lps_x_of(m) for m in masks]
    middle = float(np.mean(xs)) if len(masks) == 2 else lps_x_of(np.ones(seg.shape, bool))
    for m, x in zip(masks, xs):
        out[m] = 3 if x > middle else 2
    out[seg > 0] = 1
    return out, {2: roi("lung_right").index, 3: roi("lung_left").index}


# ---------------------------------------------------------------------------------------------
# The cases


@dataclasses.dataclass
class Case:
    id: str
    sdist: Sdist
    image: str  # member path relative to the sdist root (a folder for DICOM)
    origin: str
    label: str | None = None
    source: str | None = None
    requested: tuple[str, ...] = ()
    label_kind: str = "totalseg"  # "totalseg": TotalSegmentator class map; "binary": mask -> mask_roi
    mask_roi: str = ""  # the ROI of a "binary" label's mask (default: requested[0])
    threshold_lungs: bool = False  # also label both lungs with threshold_lung_masks (binary cases only)
    # ROIs outside the field of view: annotated with no voxels, so the loss learns "none here" (a
    # source map that labels one of them must hold none of it)
    absent: tuple[str, ...] = ()
    why: str = ""


RF = "tests/reference_files/"
# The pelvic ROIs: outside the field of view of an upper-abdomen or a chest CT
PELVIS = ("rectum", "urinary_bladder", "prostate", "femur_head_left", "femur_head_right")
CASES: tuple[Case, ...] = (
    Case(
        "totalseg_example_ct_sm", TOTALSEG, RF + "example_ct_sm.nii.gz",
        label=RF + "example_seg.nii.gz", source="totalseg_abdomen",
        requested=("spleen", "kidney_right", "kidney_left", "gallbladder", "liver", "stomach", "pancreas"),
        origin="TotalSegmentator 2.18.0 sdist, tests/reference_files/example_ct_sm.nii.gz (upper abdomen CT, 3 mm); "
        "label from example_seg.nii.gz = TotalSegmentator 'total' model output (regression reference), not manual",
        absent=PELVIS,
        why="upper-abdomen field of view: the solid abdominal organs, as labelled by TCIA Pancreas-CT / BTCV-like sources; "
        "the pelvic organs are annotated as absent (9 cm of upper abdomen)",
    ),
    Case(
        "totalseg_example_ct", TOTALSEG, RF + "example_ct.nii.gz",
        label=RF + "example_seg_fast_force_split.nii.gz", source="totalseg_torso",
        requested=("lung_right", "lung_left", "aorta", "inferior_vena_cava", "portal_vein_and_splenic_vein", "esophagus",
                   "duodenum", "colon", "small_bowel", "urinary_bladder", "prostate", "adrenal_gland_right",
                   "adrenal_gland_left"),
        origin="TotalSegmentator 2.18.0 sdist, tests/reference_files/example_ct.nii.gz (lower chest to pelvis CT, 3 mm); "
        "label from example_seg_fast_force_split.nii.gz = TotalSegmentator 'total' fast model output, not manual",
        why="long field of view: lungs (bases), vessels, bowel, bladder, prostate and adrenals; the solid organs it also "
        "shows are deliberately NOT annotated, so the two TotalSegmentator cases complement each other",
    ),
    Case(
        "pyradiomics_lung2", PYRADIOMICS, "data/lung2_image.nrrd", label="data/lung2_label.nrrd",
        source="pyradiomics_lung", requested=("lung_right", "lung_left", "lung_tumor"), label_kind="binary",
        mask_roi="lung_tumor", threshold_lungs=True,
        origin="pyradiomics 3.0.1 sdist, data/lung2_image.nrrd (chest CT, 0.63x0.63x5 mm); lung tumour from "
        "data/lung2_label.nrrd, a lung-lesion mask of unknown origin (pyradiomics test case); both lungs by "
        f"threshold_lung_masks ({LUNG_THRESHOLD_HU:g} HU threshold, connected components, not manual)",
        absent=PELVIS,
        why="the only real tumour label available offline, and the only whole chest with lung labels (the "
        "TotalSegmentator CTs show the lung bases only); the pelvic organs are annotated as absent (a chest CT)",
    ),
    Case(
        "pyradiomics_lung1", PYRADIOMICS, "data/lung1_image.nrrd",
        origin="pyradiomics 3.0.1 sdist, data/lung1_image.nrrd (chest CT, 0.57x0.57x5 mm); its lesion mask is "
        "deliberately left out (unlabelled image for active learning / inference)",
    ),
    Case(
        "totalseg_example_ct_dicom", TOTALSEG, RF + "example_ct_dicom/",
        origin="TotalSegmentator 2.18.0 sdist, tests/reference_files/example_ct_dicom/ (20-slice CT DICOM series, "
        "Siemens Biograph40 mCT, JPEG 2000 lossless) read with SimpleITK ImageSeriesReader",
    ),
    Case(
        "totalseg_aorta_report_ct", TOTALSEG, RF + "aorta_report/example_ct.nii.gz",
        origin="TotalSegmentator 2.18.0 sdist, tests/reference_files/aorta_report/example_ct.nii.gz (chest/abdomen CT, 1.5 mm)",
    ),
)
DICOM_SERIES = "totalseg_example_ct_dicom"


# ---------------------------------------------------------------------------------------------
# Output bookkeeping (idempotency)


class Outputs:
    """Writes an output only when it is missing, changed on disk, or its recipe changed."""

    def __init__(self, out: Path, force: bool = False):
        self.out = out
        self.force = force
        self.path = out / MANIFEST_NAME
        try:
            self.manifest: dict[str, dict[str, str]] = json.loads(self.path.read_text()) if self.path.exists() else {}
        except ValueError:
            self.manifest = {}
        self.written: list[str] = []
        self.kept: list[str] = []

    @staticmethod
    def recipe_of(*parts: Any) -> str:
        blob = json.dumps([RECIPE_VERSION, *parts], sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def up_to_date(self, rel: str, recipe: str) -> bool:
        m = self.manifest.get(rel)
        p = self.out / rel
        return (not self.force and m is not None and m.get("recipe") == recipe and p.is_file()
                and p.stat().st_size == m.get("size") and sha256_of(p) == m.get("sha256"))

    def record(self, rel: str, recipe: str, wrote: bool) -> None:
        p = self.out / rel
        self.manifest[rel] = {"recipe": recipe, "sha256": sha256_of(p), "size": p.stat().st_size}
        (self.written if wrote else self.kept).append(rel)

    def ensure(self, rel: str, recipe: str, build) -> bool:
        """Call ``build(path)`` unless ``rel`` is up to date; returns True if it was (re)written."""
        if self.up_to_date(rel, recipe):
            self.kept.append(rel)
            return False
        build(self.out / rel)
        self.record(rel, recipe, True)
        return True

    def save(self) -> None:
        text = json.dumps(dict(sorted(self.manifest.items())), indent=1) + "\n"
        if not self.path.exists() or self.path.read_text() != text:
            write_text_atomic(self.path, text)


def sitk_write_atomic(img, dest: Path) -> None:
    import SimpleITK as sitk

    with atomic_path(dest) as tmp:
        sitk.WriteImage(img, str(tmp), True)


def sitk_header(path: Path):
    """Geometry of an image file without reading its voxels."""
    import SimpleITK as sitk

    r = sitk.ImageFileReader()
    r.SetFileName(str(path))
    r.ReadImageInformation()
    return r


def read_dicom_series(folder: Path):
    import SimpleITK as sitk

    reader = sitk.ImageSeriesReader()
    ids = reader.GetGDCMSeriesIDs(str(folder))
    if len(ids) != 1:
        raise SystemExit(f"{folder}: expected one DICOM series, found {len(ids)}")
    files = reader.GetGDCMSeriesFileNames(str(folder), ids[0])
    reader.SetFileNames(files)
    return reader.Execute(), files


def write_pacs_copy(src_files: Sequence[Path], dest_dir: Path, series_key: str) -> None:
    """Copy a DICOM series with its empty UIDs and patient fields filled in, deterministically.

    The TotalSegmentator series is anonymised down to empty SOPClassUID, SOPInstanceUID,
    StudyInstanceUID, SeriesInstanceUID, PatientID and PatientName; a PACS such as Orthanc needs
    them. The JPEG 2000 lossless pixel data is decompressed (explicit VR little endian, lossless):
    Debian's Orthanc cannot transcode JPEG 2000, so it could not serve the series over WADO to a
    client that asks for an uncompressed transfer syntax (as MONAI Label's DICOMweb datastore does).
    """
    import pydicom
    from pydicom.uid import generate_uid

    study = generate_uid(entropy_srcs=["cdpdnet-demo", series_key, "study"])
    series = generate_uid(entropy_srcs=["cdpdnet-demo", series_key, "series"])
    tmp_dir = Path(tempfile.mkdtemp(dir=dest_dir.parent, prefix=f".{dest_dir.name}."))
    try:
        for f in src_files:
            ds = pydicom.dcmread(str(f))
            sop_class = ds.file_meta.get("MediaStorageSOPClassUID") or "1.2.840.10008.5.1.4.1.1.2"
            sop = ds.get("SOPInstanceUID") or ds.file_meta.get("MediaStorageSOPInstanceUID") or generate_uid(
                entropy_srcs=["cdpdnet-demo", series_key, Path(f).name])
            ds.SOPClassUID = sop_class
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.StudyInstanceUID = ds.get("StudyInstanceUID") or study
            ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or series
            ds.PatientID = ds.get("PatientID") or "CDPDNET-DEMO-0001"
            ds.PatientName = ds.get("PatientName") or "CDPDNet^Demo"
            if not ds.get("StudyID"):
                ds.StudyID = "1"
            if not ds.get("AccessionNumber"):
                ds.AccessionNumber = "CDPDNETDEMO1"
            if ds.file_meta.TransferSyntaxUID.is_compressed:
                ds.decompress()
            ds.save_as(str(tmp_dir / Path(f).name), write_like_original=False)
        os.chmod(tmp_dir, 0o777 & ~_umask())
        for f in tmp_dir.iterdir():
            os.chmod(f, 0o666 & ~_umask())
        if dest_dir.exists():
            shutil.rmtree(dest_dir)
        os.replace(tmp_dir, dest_dir)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir)


# ---------------------------------------------------------------------------------------------
# Phantoms (cdpdnet.phantoms, written by another part of the project)


def phantoms_available() -> bool:
    return (REPO_ROOT / "cdpdnet" / "phantoms.py").is_file()


def _entry_rois(e: Mapping[str, Any], sources: Mapping[str, Any]) -> list[str]:
    for key in ("annotated", "rois", "annotated_rois", "labels"):
        if key in e and isinstance(e[key], (list, tuple)):
            return [roi(v).name for v in e[key]]
    src = e.get("source")
    if src is not None and src in sources:
        return [roi(v).name for v in sources[src]]
    raise ValueError(f"phantom entry {e.get('image')!r} says neither which ROIs it annotates nor its source's")


def merge_phantom_dataset(dataset_json: Path, out: Path, origin: str) -> tuple[list[dict], list[dict], dict[str, list[str]]]:
    """Entries of a phantom ``dataset.json`` re-based onto ``out`` (training, test, sources)."""
    d = json.loads(dataset_json.read_text())
    base = dataset_json.parent
    raw_sources = d.get("sources") or {}
    sources = {str(k): [roi(v).name for v in vs] for k, vs in raw_sources.items()}

    def rel(p: str) -> str:
        q = Path(p) if Path(p).is_absolute() else base / p
        return os.path.relpath(q.resolve(), out.resolve())

    def conv(e: Mapping[str, Any], split: str) -> dict:
        if "image" not in e:
            raise ValueError(f"{dataset_json}: a {split} entry has no 'image'")
        o: dict[str, Any] = {"image": rel(e["image"])}
        if e.get("label"):
            o["label"] = rel(e["label"])
        src = e.get("source", e.get("dataset"))
        if src is not None:
            o["source"] = str(src)
        if e.get("label"):
            try:
                o["annotated"] = _entry_rois(e, raw_sources)
            except ValueError:
                if split == "training":
                    raise
                o["annotated"] = [r.name for r in ROIS]  # held-out phantoms are fully labelled
        o["origin"] = e.get("origin") or (origin + (f", case seed {e['seed']}" if "seed" in e else ""))
        return o

    training = [conv(e, "training") for e in d.get("training", []) + d.get("validation", [])]
    test = [conv(e, "test") for e in d.get("test", [])]
    for e in training:
        if "source" in e:
            s = sources.setdefault(e["source"], [])
            s.extend(n for n in e["annotated"] if n not in s)
    sources = {k: [r.name for r in ROIS if r.name in v] for k, v in sources.items()}
    return training, test, sources


def _phantom_files_present(dataset_json: Path) -> bool:
    try:
        d = json.loads(dataset_json.read_text())
    except ValueError:
        return False
    entries = d.get("training", []) + d.get("validation", []) + d.get("test", [])
    paths = [e[k] for e in entries for k in ("image", "label") if e.get(k)]
    return all((Path(p) if Path(p).is_absolute() else dataset_json.parent / p).is_file() for p in paths)


def make_phantoms(out: Path, n: int, n_heldout: int, spacing: Sequence[float], seed: int, outputs: Outputs) -> tuple[list, list, dict]:
    from cdpdnet.phantoms import write_phantom_dataset

    pdir = out / "phantoms"
    stamp_rel = "phantoms/.params.json"
    params = {"n_per_source": n, "n_heldout": n_heldout, "spacing": list(spacing), "seed": seed,
              "phantoms_py_sha256": sha256_of(REPO_ROOT / "cdpdnet" / "phantoms.py")}
    recipe = outputs.recipe_of("phantoms", params)
    stamp = out / stamp_rel
    ds_json = None
    if outputs.up_to_date(stamp_rel, recipe):
        ds_json = Path(json.loads(stamp.read_text())["dataset_json"])
        ds_json = ds_json if ds_json.is_absolute() else out / ds_json
        if not ds_json.exists() or not _phantom_files_present(ds_json):
            ds_json = None
    if ds_json is None:
        t0 = time.time()
        ds_json = Path(write_phantom_dataset(pdir, n_per_source=n, n_heldout=n_heldout, spacing=tuple(spacing), seed=seed))
        log(f"  phantoms written in {time.time() - t0:.1f} s: {ds_json}")
        write_text_atomic(stamp, json.dumps({**params, "dataset_json": os.path.relpath(ds_json.resolve(), out.resolve())}, indent=1))
        outputs.record(stamp_rel, recipe, True)
    else:
        outputs.kept.append(stamp_rel)
        log(f"  phantoms up to date: {ds_json}")
    origin = f"synthetic phantom (cdpdnet.phantoms.write_phantom_dataset, seed {seed}, spacing {tuple(spacing)})"
    return merge_phantom_dataset(ds_json, out, origin)


# ---------------------------------------------------------------------------------------------
# Main


def labels_field() -> dict[str, str]:
    return {"0": "background", **{str(r.index): r.name for r in ROIS}}


def build(out: Path, cache: Path, phantoms: int, phantom_heldout: int, phantom_spacing: Sequence[float],
          seed: int, min_voxels: int, pacs_copy: bool, force: bool) -> dict:
    import nibabel as nib
    import SimpleITK as sitk

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    downloads, extracted = cache / "downloads", cache / "extracted"
    log(f"[1/4] source distributions (cache {cache})")
    roots: dict[str, Path] = {}
    for sd in SDISTS:
        tar_path = download_sdist(sd, downloads)
        roots[sd.key] = extract_sdist(sd, tar_path, extracted)

    log("[2/4] TotalSegmentator class map -> CDPDNet ROIs")
    class_map = load_class_map(roots["totalsegmentator"] / "totalsegmentator" / "map_to_binary.py")
    cm = map_totalseg_names(class_map)
    log(cm.report())

    log(f"[3/4] images and partial labels -> {out}")
    outputs = Outputs(out, force=force)
    training: list[dict] = []
    unlabelled: list[dict] = []
    sources: dict[str, list[str]] = {}
    summary: list[dict] = []
    for c in CASES:
        sd = c.sdist
        src_img = roots[sd.key] / c.image
        img_rel, lab_rel = f"images/{c.id}.nii.gz", f"labels/{c.id}.nii.gz"
        base_recipe = [sd.sha256, c.image, c.label]
        dicom_files: list[str] = []

        # image
        if c.image.endswith("/"):
            sitk_img, dicom_files = read_dicom_series(src_img)
            outputs.ensure(img_rel, outputs.recipe_of("dicom-series", base_recipe),
                           lambda p, im=sitk_img: sitk_write_atomic(sitk.Cast(im, sitk.sitkInt16) if im.GetPixelID() != sitk.sitkInt16 else im, p))
        elif c.image.endswith(".nrrd"):
            outputs.ensure(img_rel, outputs.recipe_of("nrrd", base_recipe),
                           lambda p, s=src_img: sitk_write_atomic(sitk.ReadImage(str(s)), p))
        else:  # NIfTI from TotalSegmentator: byte copy keeps header and affine exactly
            outputs.ensure(img_rel, outputs.recipe_of("copy", base_recipe), lambda p, s=src_img: copy_atomic(s, p))
        img = nib.load(str(out / img_rel))
        info = {"id": c.id, "shape": tuple(int(x) for x in img.shape), "spacing": tuple(round(float(z), 4) for z in img.header.get_zooms()[:3]),
                "axcodes": "".join(nib.aff2axcodes(img.affine)), "dtype": str(img.get_data_dtype())}

        if c.label is None:
            unlabelled.append({"image": img_rel, "origin": c.origin})
            info.update(role="unlabelled")
            summary.append(info)
            if dicom_files:
                dicom_rel = f"dicom/{DICOM_SERIES}"
                for f in dicom_files:
                    rel = f"{dicom_rel}/{Path(f).name}"
                    outputs.ensure(rel, outputs.recipe_of("dicom-copy", sd.sha256, Path(f).name), lambda p, s=Path(f): copy_atomic(s, p))
                if pacs_copy:
                    names = sorted(Path(f).name for f in dicom_files)
                    recipe = outputs.recipe_of("dicom-pacs-uncompressed", sd.sha256, names)
                    rels = [f"{dicom_rel}_pacs/{n}" for n in names]
                    if not all(outputs.up_to_date(r, recipe) for r in rels):
                        write_pacs_copy([Path(f) for f in dicom_files], out / f"{dicom_rel}_pacs", DICOM_SERIES)
                        for r in rels:
                            outputs.record(r, recipe, True)
                    else:
                        outputs.kept.extend(rels)
                info["dicom"] = f"{len(dicom_files)} files -> {dicom_rel}/" + (f" and {dicom_rel}_pacs/" if pacs_copy else "")
            continue

        # label: counts on the source map decide the annotated subset
        src_lab = roots[sd.key] / c.label
        if c.label_kind == "totalseg":
            seg_img = nib.load(str(src_lab))
            if seg_img.shape != img.shape or not np.allclose(seg_img.affine, img.affine, atol=1e-4):
                raise SystemExit(f"{c.id}: label grid differs from the image grid")
            seg = np.asanyarray(seg_img.dataobj)
            value_to_roi = cm.value_to_roi
        else:
            lab_sitk = sitk.ReadImage(str(src_lab))
            im_sitk = sitk_header(src_img)
            if (lab_sitk.GetSize() != im_sitk.GetSize() or not np.allclose(lab_sitk.GetOrigin(), im_sitk.GetOrigin(), atol=1e-3)
                    or not np.allclose(lab_sitk.GetSpacing(), im_sitk.GetSpacing(), atol=1e-5)
                    or not np.allclose(lab_sitk.GetDirection(), im_sitk.GetDirection(), atol=1e-5)):
                raise SystemExit(f"{c.id}: label grid differs from the image grid")
            seg = sitk.GetArrayFromImage(lab_sitk)
            if set(value_counts(seg)) - {0, 1}:
                raise SystemExit(f"{c.id}: expected a binary mask, got values {sorted(value_counts(seg))}")
            value_to_roi = {1: roi(c.mask_roi or c.requested[0]).index}
            if c.threshold_lungs:  # on [x, y, z] arrays (SimpleITK's are [z, y, x]) with SimpleITK's spacing
                def lps_x(mask, im=lab_sitk):
                    return im.TransformContinuousIndexToPhysicalPoint([float(v) for v in np.argwhere(mask).mean(axis=0)])[0]
                hu = sitk.GetArrayFromImage(sitk.ReadImage(str(src_img))).T
                lung_seg, lung_rois = add_threshold_lungs(seg.T, hu, lab_sitk.GetSpacing(), lps_x)
                seg = np.ascontiguousarray(lung_seg.T)
                value_to_roi.update(lung_rois)
        counts = roi_voxel_counts(seg, value_to_roi)
        try:
            annotated, skipped = choose_annotated(counts, c.requested, min_voxels, c.absent)
        except ValueError as e:
            raise SystemExit(f"{c.id}: {e}") from None
        present = [a for a in annotated if a not in c.absent]
        if not present:
            raise SystemExit(f"{c.id}: none of the requested ROIs is present: {counts}")
        recipe = outputs.recipe_of("label", base_recipe, c.label_kind, sorted(value_to_roi.items()), annotated,
                                   *(["threshold-lungs-1", LUNG_THRESHOLD_HU] if c.threshold_lungs else []))
        if c.label_kind == "totalseg":
            outputs.ensure(lab_rel, recipe, lambda p: write_partial_label_nifti(src_lab, p, value_to_roi, annotated))
        else:
            def _write_binary(p, seg=seg, lab_sitk=lab_sitk, v2r=value_to_roi, ann=annotated):
                lab = sitk.GetImageFromArray(partial_label(seg, v2r, ann))
                lab.CopyInformation(lab_sitk)
                sitk_write_atomic(lab, p)
            outputs.ensure(lab_rel, recipe, _write_binary)
        lab_img = nib.load(str(out / lab_rel))
        if lab_img.shape != img.shape or not np.allclose(lab_img.affine, img.affine, atol=1e-3):
            raise SystemExit(f"{c.id}: written label and image affines differ:\n{lab_img.affine}\n{img.affine}")
        written_vals = set(value_counts(np.asanyarray(lab_img.dataobj))) - {0}
        if written_vals != {roi(a).index for a in present}:
            raise SystemExit(f"{c.id}: written label holds {sorted(written_vals)}, expected {present}")
        training.append({"image": img_rel, "label": lab_rel, "source": c.source, "annotated": annotated, "origin": c.origin})
        s = sources.setdefault(c.source, [])
        s.extend(a for a in annotated if a not in s)
        info.update(role="training", source=c.source, annotated={a: counts.get(a, 0) for a in annotated},
                    not_annotated_present={n: k for n, k in sorted(counts.items()) if n not in annotated},
                    requested_but_skipped=skipped)
        summary.append(info)

    test: list[dict] = []
    if phantoms > 0:
        log(f"[4/4] phantoms: {phantoms} per source, {phantom_heldout} held out")
        p_train, p_test, p_sources = make_phantoms(out, phantoms, phantom_heldout, phantom_spacing, seed, outputs)
        for k in p_sources:
            if k in sources:
                raise SystemExit(f"phantom source name {k!r} clashes with a real-CT source")
        training += p_train
        test += p_test
        sources.update(p_sources)
        log(f"  + {len(p_train)} phantom training cases, {len(p_test)} held-out test cases, sources {sorted(p_sources)}")
    else:
        log("[4/4] phantoms: skipped" + ("" if phantoms_available() else " (cdpdnet/phantoms.py not present)"))

    sources = {k: [r.name for r in ROIS if r.name in v] for k, v in sources.items()}
    datalist = {
        "name": "cdpdnet-demo",
        "description": "Partially labelled CT demo set for CDPDNet: real CT volumes from the TotalSegmentator 2.18.0 and "
        "pyradiomics 3.0.1 source distributions, each labelled for a different subset of the 32 ROIs"
        + (", plus synthetic phantoms" if phantoms > 0 else "") + ". Label values are ROI values 1..32; a case's "
        "'annotated' list says which ROIs its label map holds; every other ROI is unknown there, not background.",
        "labels": labels_field(),
        "sources": sources,
        "training": training,
        "unlabelled": unlabelled,
        "test": test,
        "provenance": provenance_text(min_voxels),
    }
    text = json.dumps(datalist, indent=1) + "\n"
    dl_path = out / DATALIST_NAME
    if force or not dl_path.exists() or dl_path.read_text() != text:
        write_text_atomic(dl_path, text)
        outputs.written.append(DATALIST_NAME)
    else:
        outputs.kept.append(DATALIST_NAME)
    outputs.save()
    return {"summary": summary, "written": outputs.written, "kept": outputs.kept, "seconds": time.time() - t_start,
            "datalist": str(dl_path)}


def provenance_text(min_voxels: int) -> str:
    return (
        f"Built by scripts/fetch_demo_data.py (recipe {RECIPE_VERSION}). "
        f"{TOTALSEG.filename} (PyPI sdist of {TOTALSEG.requirement}, sha256 {TOTALSEG.sha256}; licence: {TOTALSEG.licence}): "
        "CT images and label maps from tests/reference_files/. Its organ labels are TotalSegmentator MODEL OUTPUTS (the "
        "reference outputs of its regression tests), not manual annotation. "
        f"{PYRADIOMICS.filename} (PyPI sdist of {PYRADIOMICS.requirement}, sha256 {PYRADIOMICS.sha256}; licence: "
        f"{PYRADIOMICS.licence}): chest CTs and lung-lesion masks from data/; the masks' origin is unknown. The lungs of "
        "pyradiomics_lung2 are labelled by a threshold algorithm (cdpdnet.threshold_lungs), not by hand. ROIs outside a "
        "case's field of view may be annotated as absent (listed in 'annotated', no voxels). "
        "TotalSegmentator class names were mapped with cdpdnet.taxonomy.map_label_names plus the demo rules of the script "
        "(lung lobes -> lungs; whole femur NOT mapped to femur_head_*); unmapped classes were dropped. "
        f"Requested ROIs with fewer than {min_voxels} voxels are not annotated. Images keep their original affines "
        "(no reorientation); NRRD and DICOM were converted to NIfTI with SimpleITK. See docs/demo-data.md."
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    default_ph = 2 if phantoms_available() else 0
    ap = argparse.ArgumentParser(
        description="Download two PyPI source distributions (TotalSegmentator 2.18.0, pyradiomics 3.0.1) and build a "
        "partially labelled CT demo data set (NIfTI + MSD-style datalist.json) from the real CT volumes inside them. "
        "Idempotent: a re-run with everything in place changes nothing.",
        epilog="Downloads ~72 MB once into $CDPDNET_CACHE/downloads (default ~/.cache/cdpdnet). The pyradiomics sdist "
        "needs numpy, versioneer, setuptools and wheel installed in this interpreter (pip --no-build-isolation). "
        "Then: scripts/make_demo_studies.py --datalist <out>/datalist.json --studies <out>/studies",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--out", type=Path, default=REPO_ROOT / "data" / "demo", help="output folder")
    ap.add_argument("--cache", type=Path, default=default_cache(), help="cache folder ($CDPDNET_CACHE)")
    ap.add_argument("--phantoms", type=int, default=default_ph,
                    help="synthetic phantom cases per phantom source from cdpdnet.phantoms (0: none; the default is 2 "
                    "when cdpdnet/phantoms.py exists, else 0)")
    ap.add_argument("--phantom-heldout", type=int, default=2, help="fully labelled held-out phantoms (datalist 'test')")
    ap.add_argument("--phantom-spacing", type=float, nargs=3, default=(3.0, 3.0, 3.0), metavar=("X", "Y", "Z"),
                    help="phantom voxel spacing in mm")
    ap.add_argument("--seed", type=int, default=0, help="phantom random seed")
    ap.add_argument("--min-voxels", type=int, default=MIN_VOXELS,
                    help="a requested ROI with fewer voxels is not annotated (and zeroed)")
    ap.add_argument("--no-pacs-copy", dest="pacs_copy", action="store_false", default=argparse.SUPPRESS,
                    help="do not write dicom/<series>_pacs/ (the DICOM copy with UIDs filled in, written by default)")
    ap.set_defaults(pacs_copy=True)
    ap.add_argument("--force", action="store_true", help="rewrite every output even if up to date")
    args = ap.parse_args(argv)
    if args.phantoms > 0 and not phantoms_available():
        ap.error("--phantoms needs cdpdnet/phantoms.py (write_phantom_dataset), which is not present")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a = parse_args(argv)
    res = build(a.out.resolve(), a.cache.expanduser().resolve(), a.phantoms, a.phantom_heldout, a.phantom_spacing,
                a.seed, a.min_voxels, a.pacs_copy, a.force)
    log("\nsummary")
    for s in res["summary"]:
        log(f"  {s['id']:<28} {s['role']:<10} shape {s['shape']} spacing {s['spacing']} {s['axcodes']} {s['dtype']}")
        if s["role"] == "training":
            log(f"      source {s['source']}; annotated (voxels): {s['annotated']}")
            if s["requested_but_skipped"]:
                log(f"      requested but absent or < min voxels: {s['requested_but_skipped']}")
            if s["not_annotated_present"]:
                log(f"      present in the source map but NOT annotated here (zeroed): {s['not_annotated_present']}")
        if "dicom" in s:
            log(f"      DICOM: {s['dicom']}")
    log(f"\n{len(res['written'])} files written, {len(res['kept'])} up to date; {res['seconds']:.1f} s; {res['datalist']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
