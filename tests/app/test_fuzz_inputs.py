"""Fuzzing the REST API's file and id inputs with hypothesis (the "bad input" part of the reliability work).

Every case goes through the in-process server (the session ``client``'s app, here with
``raise_server_exceptions=False`` so that a crash is a 500 like on a real server):

* ``label_file``: ``PUT /datastore/label`` with NIfTI (``.nii`` / ``.nii.gz``), NRRD (raw, gzip, text),
  MetaImage (``.mha``) and DICOM files built from a valid label of the target image and then broken:
  truncated at a random offset, bytes flipped, header sizes of up to 10^15 voxels, zero / negative /
  NaN / huge spacings, NaN / Inf, float / complex / RGB / int64 / bool voxels, 2D and 4D arrays, the
  wrong shape, values outside 0..32, unsupported file types, empty and random files;
* ``label_params``: a valid label with malformed ``params`` JSON, ``label_info`` / ``annotated`` of
  the wrong types or naming unknown ROIs, malformed tags;
* ``image_file``: ``PUT /datastore/image`` with the same kinds of broken CT volumes (and constant,
  tiny, 2D / 4D ones);
* ``infer_file``: ``POST /infer/cdpdnet`` and ``/infer/cdpdnet_prompt`` with such a file uploaded
  instead of an image id;
* ``infer_params``: ``label_prompt``, ``text``, ``points``, ``point_labels``, ``point_margin_mm``,
  ``text_threshold``, ``device``, ``result_*``, ``label_tag`` of wrong types or ranges;
* ``ids``: path traversal and other malformed ids (``../x``, ``../../etc/passwd``, absolute paths,
  ``a/../../b``, ``%2e%2e/``, NUL bytes, 5000-character and unicode names, existing server paths) in
  every endpoint that takes an image id, label id, tag or session id.

Each case must end in a 4xx whose JSON ``detail`` names the problem (valid controls and harmless
mutations may be accepted; then what was stored is checked and removed again), ``GET /info`` must
answer 200 afterwards, and after a refusal the studies folder (every file's hash, the datastore
json included) and the files around it (canaries, the tree of the test's temporary folder) must be
unchanged. Counts per category and outcome go to ``test-artifacts/fuzz-inputs-summary.json`` and
are printed (``pytest -s``). Examples are derandomized (the same cases every run); the ``slow``
variants try ten times as many.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import math
import os
import struct
import time
import zlib
from collections import Counter, defaultdict
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from conftest import REPO
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

TARGET = "fuzz_target"  # the image this module adds (and removes at the end); labels are saved on it
TARGET_SEED = 107
SUMMARY = REPO / "test-artifacts" / "fuzz-inputs-summary.json"
SLOW_FACTOR = 10

# cases per category in the default run (sized for about a minute on 2 CPU cores)
N_CASES = {"label_file": 150, "label_params": 80, "image_file": 120, "infer_file": 70, "infer_params": 90,
           "ids": 250, "session_archive": 4}


# ------------------------------------------------------------------------------------------------
# Building files
# ------------------------------------------------------------------------------------------------
LPS = np.diag([-1.0, -1.0, 1.0])


def nifti_bytes(arr: np.ndarray, affine: np.ndarray, gz: bool, patches=()) -> bytes:
    """A NIfTI-1 file of ``arr``; ``patches`` are ``(offset, struct format, values)`` written into the
    header afterwards (dims, datatype, pixdim, srow that nibabel would not write)."""
    import nibabel as nib

    img = nib.Nifti1Image(arr, affine, dtype=arr.dtype if arr.dtype.fields is None else None)
    img.set_qform(affine, code=1)
    img.set_sform(affine, code=1)
    raw = bytearray(img.to_bytes())
    for off, fmt, vals in patches:
        struct.pack_into("<" + fmt, raw, off, *vals)
    return gzip.compress(bytes(raw), compresslevel=1) if gz else bytes(raw)


NRRD_TYPES = {"uint8": "uchar", "int8": "signed char", "int16": "short", "uint16": "ushort", "int32": "int",
              "uint32": "uint", "int64": "longlong", "uint64": "ulonglong", "float32": "float",
              "float64": "double"}


def nrrd_bytes(arr: np.ndarray, affine: np.ndarray, encoding: str = "gzip", sizes=None, dirs=None,
               type_name=None, extra=(), vector_axis: bool = False) -> bytes:
    """A NRRD file (LPS space) of ``arr``; ``sizes`` / ``dirs`` / ``type_name`` override the header's."""
    lin = LPS @ affine[:3, :3]
    nd = arr.ndim
    spatial = nd - 1 if vector_axis else nd
    d = dirs if dirs is not None else [tuple(lin[:, i]) for i in range(min(spatial, 3))]
    vecs = ["(" + ",".join(repr(float(c)) for c in v) + ")" for v in d]
    vecs += ["none"] * (nd - len(vecs))
    if vector_axis:  # the first axis holds the components
        vecs = ["none"] + vecs[:-1]
    kinds = (["RGB-color"] if vector_axis else []) + ["domain"] * spatial
    org = LPS @ affine[:3, 3]
    lines = ["NRRD0004", f"type: {type_name or NRRD_TYPES[str(arr.dtype)]}", f"dimension: {nd}",
             "space: left-posterior-superior", f"sizes: {' '.join(str(s) for s in (sizes or arr.shape))}",
             f"space directions: {' '.join(vecs)}", f"kinds: {' '.join(kinds)}", "endian: little",
             f"encoding: {encoding}", f"space origin: ({','.join(repr(float(c)) for c in org)})", *extra]
    head = ("\n".join(lines) + "\n\n").encode()
    data = np.asarray(arr).tobytes(order="F")
    if encoding == "gzip":
        data = gzip.compress(data, compresslevel=1)
    elif encoding == "text":
        data = (" ".join(str(v) for v in np.asarray(arr).ravel(order="F")) + "\n").encode()
    return head + data


MET_TYPES = {"uint8": "MET_UCHAR", "int8": "MET_CHAR", "int16": "MET_SHORT", "uint16": "MET_USHORT",
             "int32": "MET_INT", "uint32": "MET_UINT", "int64": "MET_LONG_LONG", "float32": "MET_FLOAT",
             "float64": "MET_DOUBLE"}


def mha_bytes(arr: np.ndarray, affine: np.ndarray, compressed: bool = False, dims=None, spacing=None,
              channels: int = 1, extra=(), data_file: str = "LOCAL") -> bytes:
    lin = LPS @ affine[:3, :3]
    sp = np.linalg.norm(lin, axis=0) if spacing is None else np.asarray(spacing, float)
    direction = lin / np.where(np.linalg.norm(lin, axis=0) == 0, 1, np.linalg.norm(lin, axis=0))
    spatial = arr.shape[:-1] if channels > 1 else arr.shape
    nd = len(spatial)
    raw = np.asarray(arr).transpose(*reversed(range(arr.ndim))).tobytes() if channels == 1 else \
        np.moveaxis(np.asarray(arr), -1, 0).transpose(*reversed(range(arr.ndim))).tobytes()
    data = zlib.compress(raw, 1) if compressed else raw
    lines = ["ObjectType = Image", f"NDims = {nd}", "BinaryData = True", "BinaryDataByteOrderMSB = False",
             f"CompressedData = {'True' if compressed else 'False'}"]
    if compressed:
        lines.append(f"CompressedDataSize = {len(data)}")
    lines += [f"TransformMatrix = {' '.join(repr(float(x)) for x in direction[:nd, :nd].T.ravel())}",
              f"Offset = {' '.join(repr(float(x)) for x in (LPS @ affine[:3, 3])[:nd])}",
              f"ElementSpacing = {' '.join(repr(float(x)) for x in sp[:nd])}",
              f"DimSize = {' '.join(str(s) for s in (dims or spatial))}",
              f"ElementNumberOfChannels = {channels}", *extra,
              f"ElementType = {MET_TYPES[str(arr.dtype)]}", f"ElementDataFile = {data_file}"]
    return ("\n".join(lines) + "\n").encode() + data


def dicom_bytes(frames: np.ndarray, spacing=(1.0, 1.0), rows=None, cols=None, n_frames=None, bits=16, spp=1,
                cut: int = 0) -> bytes:
    """A CT DICOM file: one slice (2D array) or a multi-frame volume ``[frames, rows, cols]``."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    frames = np.asarray(frames, dtype=np.int16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("fuzz.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.is_little_endian, ds.is_implicit_VR = True, False
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID = "CT", "FUZZ"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    shape = frames.shape
    ds.Rows = rows if rows is not None else shape[-2]
    ds.Columns = cols if cols is not None else shape[-1]
    if frames.ndim == 3 or n_frames is not None:
        ds.NumberOfFrames = n_frames if n_frames is not None else shape[0]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = spp, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 1
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = 1.0
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    data = frames.tobytes()
    ds.PixelData = data[:len(data) - cut] if cut else data
    buf = io.BytesIO()
    ds.save_as(buf, write_like_original=False)
    return buf.getvalue()


# NIfTI-1 header offsets
DIM, DATATYPE, BITPIX, PIXDIM, SROW = 40, 70, 72, 76, 280

SPACING_DEFECTS = {"zero": 0.0, "nan": math.nan, "inf": math.inf, "huge": 1e6, "tiny": 1e-4, "negative": None}
EXT_DEFECTS = [".dcm", ".txt", ".png", "", ".nii.gz.zip", ".mhd", ".hdr", ".npy", ".jpg"]


def encode(fmt: str, arr: np.ndarray, affine: np.ndarray, **kw) -> bytes:
    if fmt in ("nii", "nii.gz"):
        return nifti_bytes(arr, affine, fmt == "nii.gz", kw.get("patches", ()))
    if fmt.startswith("nrrd"):
        enc = fmt.split("-", 1)[1]
        return nrrd_bytes(arr, affine, enc, sizes=kw.get("sizes"), dirs=kw.get("dirs"),
                          vector_axis=kw.get("vector_axis", False), extra=kw.get("extra", ()))
    if fmt.startswith("mha"):
        return mha_bytes(arr, affine, fmt == "mha-zlib", dims=kw.get("sizes"), spacing=kw.get("spacing"),
                         channels=kw.get("channels", 1), data_file=kw.get("data_file", "LOCAL"))
    raise ValueError(fmt)


def suffix(fmt: str) -> str:
    return {"nii": ".nii", "nii.gz": ".nii.gz", "dcm": ".dcm"}.get(fmt, "." + fmt.split("-")[0])


class Case(dict):
    """A generated case; its repr (what hypothesis prints for a failing example) leaves the bytes out."""

    def __repr__(self) -> str:
        shown = {k: (f"<{len(v)} bytes>" if isinstance(v, bytes) else v) for k, v in self.items()}
        return "Case(" + ", ".join(f"{k}={str(v)[:200]!s}" for k, v in shown.items()) + ")"


def build_volume_case(draw, base: np.ndarray, affine: np.ndarray, fmt: str, kind: str, role: str) -> dict:
    """Encode ``base`` (a valid label or CT) in ``fmt`` with the defect ``kind``; returns the case with
    ``content``, ``name``, ``expect`` (refuse / accept / either) and ``words`` (one must be in the 422's detail)."""
    a = base
    ext = suffix(fmt)
    expect, words, detail = "refuse", (), kind
    nifti = fmt.startswith("nii")
    if kind == "valid":
        content, expect = encode(fmt, a, affine), "accept"
    elif kind == "truncate":
        full = encode(fmt, a, affine)
        least = 1
        if fmt == "nrrd-text":  # cutting into the last number leaves a valid file: cut it off whole
            least = len(full) - full.rstrip().rfind(b" ")
        cut = draw(st.integers(least, len(full) - 1))
        content, detail = full[:len(full) - cut], f"-{cut} B"
        words = ("truncated", "corrupt", "header", "ends early", "empty", "size of the data")
    elif kind == "flip":
        full = bytearray(encode(fmt, a, affine))
        n = draw(st.integers(1, 4))
        limit = min(len(full), 348 if nifti and fmt == "nii" else 600)
        for _ in range(n):
            i = draw(st.integers(0, limit - 1))
            full[i] ^= draw(st.integers(1, 255))
        content, expect, detail = bytes(full), "either", f"{n} bytes"
    elif kind == "dims":
        claim = draw(st.sampled_from(["1e9", "huge", "zero", "negative", "axis"]))
        detail = claim
        words = ("truncated", "claims", "limit", "non-positive", "voxel shape", "header", "expand", "size")
        if nifti:
            dims = {"1e9": (1000, 1000, 1000), "huge": (32767, 32767, 32767), "zero": (0,) + a.shape[1:],
                    "negative": (-7,) + a.shape[1:], "axis": a.shape[:2] + (32000,)}[claim]
            content = encode(fmt, a, affine, patches=[(DIM + 2, "3h", dims)])
        else:
            sizes = {"1e9": (1000, 1000, 1000), "huge": (100000, 100000, 100000), "zero": (0,) + a.shape[1:],
                     "negative": (-7,) + a.shape[1:], "axis": a.shape[:2] + (10 ** 9,)}[claim]
            content = encode(fmt, a, affine, sizes=sizes)
    elif kind == "spacing":
        which = draw(st.sampled_from(sorted(SPACING_DEFECTS)))
        axis = draw(st.integers(0, 2))
        norm = float(np.linalg.norm(affine[:3, axis]))
        value = -norm if which == "negative" else SPACING_DEFECTS[which]
        detail = f"{which} axis {axis}"
        words = ("spacing", "geometry", "affine", "pixdim", "direction", "singular", "finite", "voxel size",
                 "qform", "sform")
        if role == "image" and which == "negative":
            expect = "either"  # a flipped axis is a valid orientation (MetaImage: ITK may refuse it)
        if nifti:
            if math.isfinite(value) and value != 0.0:
                b = affine.copy()
                b[:3, axis] = affine[:3, axis] / norm * value
                content = encode(fmt, a, b)
            else:  # NaN / Inf / 0 in pixdim and in the sform (nibabel would not write them)
                content = encode(fmt, a, affine, patches=[(PIXDIM + 4 * (axis + 1), "f", (value,)),
                                                          (SROW + 16 * axis + 4 * axis, "f", (value,))])
        elif fmt.startswith("nrrd"):
            cols = [[float(c) for c in (LPS @ affine[:3, :3])[:, i]] for i in range(3)]
            if math.isnan(value) or math.isinf(value):
                cols[axis] = [value, 0.0, 0.0]
            else:
                cols[axis] = [c / norm * value for c in cols[axis]]
            content = encode(fmt, a, affine, dirs=cols)
        else:
            sp = [float(x) for x in np.linalg.norm(affine[:3, :3], axis=0)]
            sp[axis] = value
            content = encode(fmt, a, affine, spacing=sp)
    elif kind == "nan":
        f = a.astype(np.float32)
        f.flat[draw(st.integers(0, f.size - 1))] = draw(st.sampled_from([math.nan, math.inf, -math.inf]))
        content, words = encode(fmt, f, affine), ("nan", "infinite")
    elif kind == "dtype":
        options = ["int64", "float_integral", "float_fraction", "bool"] + (["complex", "rgb"] if nifti else ["rgb"])
        if role == "image":
            options = ["int64", "uint8", "float32", "float64"] + (["complex", "rgb"] if nifti else ["rgb"])
        which = draw(st.sampled_from(options))
        detail = which
        if which == "complex":
            content, words = encode(fmt, a.astype(np.complex64), affine), ("complex",)
        elif which == "rgb":
            words = ("rgb", "channel", "vector", "voxel shape", "dimensions", "type")
            if nifti:
                rgb = np.zeros(a.shape, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")])
                rgb["R"] = np.clip(a, 0, 255)
                content = encode(fmt, rgb, affine)
            elif fmt.startswith("nrrd"):
                v = np.stack([np.clip(a, 0, 255).astype(np.uint8)] * 3, axis=0)
                content = encode(fmt, v, affine, vector_axis=True)
            else:
                v = np.stack([np.clip(a, 0, 255).astype(np.uint8)] * 3, axis=-1)
                content = encode(fmt, v, affine, channels=3)
        elif which == "float_fraction":
            content, words = encode(fmt, a.astype(np.float32) + 0.25, affine), ("non-integer",)
        elif which == "bool":  # no file format has a bool type: 0/1 as uint8, a valid label
            content, expect = encode(fmt, (a > 0).astype(np.uint8), affine), "accept"
        else:
            dt = {"int64": np.int64, "float_integral": np.float32, "uint8": np.uint8, "float32": np.float32,
                  "float64": np.float64}[which]
            arr = a.astype(dt) if which != "uint8" else np.clip(a, 0, 255).astype(np.uint8)
            if role == "image" and which == "uint8" and arr.max() == arr.min():
                arr.flat[0] = 1
            content, expect = encode(fmt, arr, affine), "accept"
            if which == "int64" and fmt.startswith("mha"):  # ITK's Python wrapping has no 64-bit integer images:
                expect = "either"                            # MONAI's reader fails on them (a clean refusal)
    elif kind == "ndim":
        which = draw(st.sampled_from(["2d", "4d", "4d_t1"]))
        detail = which
        words = ("voxel shape", "dimensions", "channels", "2d", "at least")
        if which == "2d":
            content = encode(fmt, np.ascontiguousarray(a[:, :, a.shape[2] // 2]), affine)
        elif which == "4d":
            content = encode(fmt, np.stack([a] * 3, axis=-1), affine)
        else:
            content, expect = encode(fmt, a[..., None], affine), "accept"
            if not fmt.startswith("nii"):  # NRRD / MetaImage with a 4th axis of size 1: MONAI's NRRD reader
                expect = "either"          # fails on it ("could not broadcast"); a refusal is clean too
    elif kind == "shape":
        which = draw(st.sampled_from(["smaller", "transposed", "tiny"]))
        detail = which
        if role == "image":  # any size is a valid CT as long as every axis has 4 voxels
            b = {"smaller": a[:3], "transposed": a[:, :2], "tiny": a[:2, :2, :2]}[which].copy()
            b.flat[0] = b.max() + 1  # not constant
        else:
            b = {"smaller": a[:-1], "transposed": a.transpose(2, 1, 0), "tiny": a[:3, :3, :3]}[which]
        content = encode(fmt, np.ascontiguousarray(b), affine)
        words = ("voxel shape", "at least", "2d", "voxels")
    elif kind == "values":
        v = draw(st.sampled_from([33, 40, 255, -1, 1000, 2 ** 31 - 1, -(2 ** 15)]))
        b = a.astype(np.int32 if abs(v) > 32767 else np.int16).copy()
        b.flat[draw(st.integers(0, b.size - 1))] = v
        content, words, detail = encode(fmt, b, affine), ("not roi label values",), str(v)
    elif kind == "constant":
        content, words = encode(fmt, np.full(a.shape, -1000, np.int16), affine), ("constant",)
    elif kind == "detached":  # NRRD 'data file' / MetaImage ElementDataFile pointing at a server file
        target = draw(st.sampled_from(["../../canary.raw", "/etc/passwd", "canary.raw"]))
        detail = target
        if fmt.startswith("nrrd"):
            lines = nrrd_bytes(a, affine, "raw").split(b"\n\n", 1)[0].decode().splitlines()
            lines = [ln for ln in lines if not ln.startswith("encoding")] + ["encoding: raw", f"data file: {target}"]
            content = ("\n".join(lines) + "\n\n").encode()
        else:
            content = mha_bytes(a, affine, data_file=target).split(b"ElementDataFile")[0] + \
                f"ElementDataFile = {target}\n".encode()
        words = ("detached",)
    elif kind == "ext":
        ext = draw(st.sampled_from(EXT_DEFECTS + ([".mha"] if role == "image" else [])))
        content = encode("nii.gz", a, affine) if ext != ".dcm" else dicom_bytes(a[:, :, 0].T.astype(np.int16))
        words, detail = ("unsupported file type",), ext or "(none)"
    elif kind == "dicom":
        which = draw(st.sampled_from(["slice", "frames_1e9", "frames_huge", "truncated", "rgb", "bits12"]))
        detail, ext = which, ".dcm"
        sl = a[:, :, a.shape[2] // 2].T.astype(np.int16)
        content = {"slice": lambda: dicom_bytes(sl),
                   "frames_1e9": lambda: dicom_bytes(sl, rows=1000, cols=1000, n_frames=1000),
                   "frames_huge": lambda: dicom_bytes(sl, rows=65535, cols=65535, n_frames=100000),
                   "truncated": lambda: dicom_bytes(np.stack([sl] * 4), cut=100),
                   "rgb": lambda: dicom_bytes(sl, spp=3),
                   "bits12": lambda: dicom_bytes(sl, bits=12)}[which]()
        words = ("truncated", "claims", "samples", "bitsallocated", "at least", "2d", "dimensions", "limit",
                 "unsupported file type", "read")
    elif kind == "empty":
        content, words = b"", ("empty",)
    elif kind == "garbage":
        content = draw(st.binary(min_size=1, max_size=2048))
        words = ("header", "read", "magic", "corrupt", "not a", "truncated", "empty", "gzip", "invalid")
    else:
        raise ValueError(kind)
    return Case(kind=kind, fmt=fmt, detail=detail, name=f"fuzz{ext}", content=content, expect=expect, words=words)


# ------------------------------------------------------------------------------------------------
# Strategies
# ------------------------------------------------------------------------------------------------
LABEL_FORMATS = ["nii", "nii.gz", "nrrd-raw", "nrrd-gzip", "nrrd-text", "mha-raw", "mha-zlib"]
IMAGE_FORMATS = ["nii", "nii.gz", "nrrd-raw", "nrrd-gzip", "nrrd-text"]
INFER_FORMATS = IMAGE_FORMATS + ["mha-raw", "mha-zlib"]
LABEL_KINDS = ["valid", "truncate", "flip", "dims", "spacing", "nan", "dtype", "ndim", "shape", "values", "detached",
               "ext", "dicom", "empty", "garbage"]
IMAGE_KINDS = ["valid", "truncate", "flip", "dims", "spacing", "nan", "dtype", "ndim", "shape", "constant", "detached",
               "ext", "dicom", "empty", "garbage"]
INFER_KINDS = ["truncate", "flip", "dims", "spacing", "nan", "dtype", "ndim", "shape", "constant", "detached", "ext",
               "dicom", "empty", "garbage"]


def _format_for(draw, formats, kind):
    if kind == "detached":  # only NRRD and MetaImage can point at another file
        formats = [f for f in formats if f.startswith(("nrrd", "mha"))]
    return draw(st.sampled_from(formats))


@st.composite
def label_file_cases(draw, target, kind):
    fmt = _format_for(draw, LABEL_FORMATS, kind)
    shape = target["shape"]
    lab = np.zeros(shape, np.uint8)
    v = draw(st.integers(1, 32))
    lo = [draw(st.integers(0, s - 2)) for s in shape]
    hi = [draw(st.integers(a + 1, s)) for a, s in zip(lo, shape)]
    lab[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = v
    return build_volume_case(draw, lab, target["affine"], fmt, kind, "label")


@st.composite
def ct_volume(draw):
    shape = tuple(draw(st.integers(4, 9)) for _ in range(3))
    spacing = [draw(st.sampled_from([0.7, 1.0, 2.5, 5.0])) for _ in range(3)]
    affine = np.diag(spacing + [1.0])
    affine[:3, 3] = [draw(st.integers(-200, 200)) for _ in range(3)]
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 16)))
    return rng.integers(-1024, 1500, size=shape).astype(np.int16), affine


@st.composite
def image_file_cases(draw, kind, formats=IMAGE_FORMATS):
    fmt = _format_for(draw, formats, kind)
    arr, affine = draw(ct_volume())
    return build_volume_case(draw, arr, affine, fmt, kind, "image")


def infer_file_cases(kind):
    return image_file_cases(kind, formats=INFER_FORMATS).map(_infer_expect)


def _infer_expect(case):
    if case["expect"] == "accept":  # an uploaded valid volume would be segmented: fine, but not drawn here
        case["expect"] = "either"
    if case["kind"] == "ext" and case["detail"] == ".dcm":  # a single DICOM slice: readable, but 2D
        case["words"] = ("at least", "2d", "dimensions")
    if case["kind"] == "ext" and case["detail"] == ".mha":  # a supported type here: a NIfTI named .mha
        case["words"] = ("metaimage", "header")
    return case


def _unknown_name():
    from cdpdnet.taxonomy import UnknownROIError, roi

    def unknown(s: str) -> bool:
        try:
            roi(s)
        except UnknownROIError:
            return True
        except Exception:  # noqa: BLE001
            return False
        return False

    words = st.sampled_from(["banana", "qzxv", "Segment_7", "xylophone", "heart muscle", "liverish", "kidney_middle",
                             "tumour of the moon", "", " ", "🦄", "ROI-99"])
    return st.one_of(words, st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                                    max_size=30)).filter(lambda s: s.strip() != "" and unknown(s))


def _bad_roi_items():
    return st.one_of(
        st.integers(33, 10 ** 30), st.integers(-(10 ** 30), 0),
        st.floats(allow_nan=False, allow_infinity=False).filter(lambda f: not float(f).is_integer()),
        _unknown_name(), st.just(None), st.just(True), st.just([[1]]), st.just({"a": 1}))


LABEL_PARAMS_KINDS = ["json", "non_object", "label_info", "annotated", "tag"]


@st.composite
def label_params_cases(draw, kind):
    tag, words = "final", ()
    if kind == "json":
        raw = draw(st.one_of(
            st.sampled_from(["{", "}", "{'a': 1}", "[", "nul", '{"a":}', "\x00", '{"label_info": [}', "{}}",
                             '{"annotated": [1,]}', "NaN]", "[" * 3000 + "]" * 3000, '{"a": "\\ud800"']),
            st.text(max_size=40)))
        try:  # (an empty field is no params at all: valid)
            json.loads(raw)
            raw = raw + "{"
        except (ValueError, RecursionError):
            raw = raw or "{"
        params, words = raw, ("json",)
    elif kind == "non_object":
        params = json.dumps(draw(st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text(max_size=10),
                                           st.none(), st.booleans(), st.floats(allow_nan=False))))
        words = ("json object",)
    elif kind == "label_info":
        bad_entry = draw(st.one_of(
            st.builds(lambda n: {"name": n}, _unknown_name()),
            st.builds(lambda i: {"idx": i}, st.sampled_from(["abc", "1.5", math.inf, -math.inf, 99, -3, 2.5, True,
                                                             [1], {"a": 1}])),
            st.builds(lambda n, i: {"name": n, "idx": i}, _unknown_name(), st.sampled_from([99, 33, -1, "x", 7.5])),
            _bad_roi_items().filter(lambda x: not isinstance(x, dict))))
        good = draw(st.lists(st.sampled_from([{"name": "liver", "idx": 1}, {"name": "Spleen"}, {"idx": 3}, "aorta", 5]),
                             max_size=3))
        entries = good + [bad_entry]
        value = draw(st.one_of(st.just(entries), st.sampled_from(["liver", 7, {"name": "liver"}, 1.5, True])))
        params, words = json.dumps({"label_info": value}), ("label_info",)
    elif kind == "annotated":
        value = draw(st.one_of(st.lists(_bad_roi_items(), min_size=1, max_size=3).map(lambda xs: ["liver"] + xs),
                               _bad_roi_items().filter(lambda x: x is not None),
                               st.sampled_from(["[1,", "liver, banana", "[\"spleen\", 99]", {"liver": 1}])))
        params, words = json.dumps({"annotated": value}), ("annotated",)
    else:
        tag = draw(bad_names())
        params, words = "{}", ("label tag",)
    return Case(kind=kind, params=params, tag=tag, words=words, expect="refuse")


def bad_names():
    """Ids / tags that cannot be file names in the studies folder (must be refused)."""
    return st.one_of(
        st.sampled_from(["../x", "../../etc/passwd", "..", ".", "a/../../b", "%2e%2e/x", "..\\..\\x", "x\x00y", "\x00",
                         "a/b", "./fuzz_target", "fuzz_target/../fuzz_target", "\n", "x" * 5000, "ü" * 150,
                         "名前/../..", ".hidden", "labels/../../x", "../studies", "/tmp", "\t", "x\ny"]),
        st.builds(lambda a, b: a + b, st.sampled_from(["../", "../../", "..\\", "/", "a/../../", "\x00"]),
                  st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20)))


def weird_names():
    """Odd but harmless names (unicode, '%2e%2e%2f' as text, spaces, very long): may be accepted as new ids."""
    return st.one_of(
        st.sampled_from(["%2e%2e%2fx", "..%2f..%2fx", "CON", "nul", "~", "~root", "\u2215etc\u2215passwd", "．．／x",
                         "x" * 200, "ü" * 100, "a b", "-rf", "$(id)", "`id`", "x;y", "\u202e", "final ", "ORIGINAL"]),
        st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=60))


INFER_BAD = {
    "label_prompt": lambda: st.one_of(st.lists(_bad_roi_items(), min_size=1, max_size=3), _bad_roi_items().filter(
        lambda x: x is not None and x is not True), st.sampled_from(["[1,", "banana", "1, 99", "[[1]]"])).map(
        lambda v: {"label_prompt": v}),
    "text": lambda: st.one_of(st.sampled_from([5, 1.5, {"a": 1}, [1], [None], True, ["liver", 3]]),
                              st.sampled_from(["banana", "qzxv xylophone", "🦄🦄", "the moon, liver"])).map(
        lambda v: {"text": v}),
    "prompt": lambda: st.sampled_from(["banana", 7, {"x": 1}]).map(lambda v: {"prompt": v}),
    "points": lambda: st.sampled_from([[[1, 2]], [1, 2, 3], [[1, 2, "a"]], [[1, 2, math.nan]], [[math.inf, 1, 1]],
                                       [[-1, 0, 0]], [[1000, 0, 0]], "garbage", {"a": 1}, [[10 ** 30, 0, 0]],
                                       [[True, 1, 1]], [[1, 2, 3, 4]], [None], "[[1,2]]"]).map(
        lambda v: {"points": v}),
    "point_labels": lambda: st.sampled_from([[2], ["x"], [1, 1], "abc", {"a": 1}, [True], [None], [-1]]).map(
        lambda v: {"points": [[27, 21, 37]], "point_labels": v}),
    "foreground": lambda: st.sampled_from([[[1, 2]], "x", [[60, 1, 1]], [[1.5, math.nan, 1]]]).map(
        lambda v: {"foreground": v}),
    "background": lambda: st.sampled_from([[[1, 2, 3, 4]], 5, [[-5, 1, 1]]]).map(lambda v: {"background": v}),
    "point_margin_mm": lambda: st.sampled_from([-1, "abc", math.nan, math.inf, 1e9, [1, 2], {"a": 1}, 10 ** 400]).map(
        lambda v: {"points": [[27, 21, 37]], "point_margin_mm": v}),
    "text_threshold": lambda: st.sampled_from(["abc", -0.5, 2, True, [0.5], {"x": 1}, math.nan, 10 ** 400]).map(
        lambda v: {"text": "liver", "text_threshold": v}),
    "result_extension": lambda: st.sampled_from([".png", ".exe", "../x", 5, ["x"], ".nii.gz/../../x", ".dcm"]).map(
        lambda v: {"result_extension": v}),
    "result_dtype": lambda: st.sampled_from(["complex64", "bool", "int8", 7, ["uint8"], "float16"]).map(
        lambda v: {"result_dtype": v}),
    "device": lambda: st.sampled_from(["gpu", "cuda:x", "cpu:0", "meta", "mps", "../", 5, ["cpu"], {"a": 1},
                                       "cuda:99999", "cpu; rm -rf /"]).map(lambda v: {"device": v}),
    "label_tag": lambda: bad_names().map(lambda v: {"save_label": True, "label_tag": v}),
    "image": lambda: st.one_of(bad_names(), st.sampled_from([5, ["a"], {"a": 1}, "no_such_image"])).map(
        lambda v: {"image": v}),
}
GENERIC_BAD = ["result_extension", "result_dtype", "device", "label_tag", "image"]
WORDS = {"prompt": ("text",), "foreground": ("foreground",), "background": ("background",),
         "image": ("image",), "label_tag": ("label_tag",)}


INFER_PARAMS_KINDS = sorted(INFER_BAD) + ["model"]


@st.composite
def infer_params_cases(draw, kind):
    model = "model" if kind == "model" else draw(st.sampled_from(
        ["cdpdnet_prompt", "cdpdnet"] if kind in GENERIC_BAD else ["cdpdnet_prompt"]))
    if model == "model":  # an unknown model name in the path
        name = draw(st.one_of(st.sampled_from(["segmentation", "CDPDNET", "..", "cdpdnet_prompt2", "%00"]),
                              st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1,
                                      max_size=20)).filter(lambda s: s not in ("cdpdnet", "cdpdnet_prompt")))
        return Case(kind="model", model=name, params={}, words=("model", "not found", "method not allowed"),
                    expect="refuse")
    key = kind
    bad = draw(INFER_BAD[key]())
    extras = draw(st.dictionaries(st.sampled_from(["fill_in", "result_extension", "device", "label_prompt"]),
                                  st.none(), max_size=2))
    good = {"fill_in": False, "result_extension": ".nii.gz", "device": "cpu", "label_prompt": [6]}
    params = {k: good[k] for k in extras if k not in bad and (model == "cdpdnet_prompt" or k != "label_prompt")}
    params.update(bad)
    words = WORDS.get(key, (key,))
    if key == "text" and isinstance(bad["text"], str):
        words = ("unknown roi text",)
    return Case(kind=key, model=model, params=params, words=words, expect="refuse")


ID_ENDPOINTS = ["get_image", "head_image", "put_image", "delete_image", "get_image_info", "put_image_info",
                "put_label_image", "put_label_tag", "delete_label_id", "delete_label_tag", "get_label",
                "get_label_tag", "get_label_info", "put_label_info", "infer_query", "infer_params", "infer_session",
                "get_session", "delete_session", "raw_url"]
RAW_IDS = ["%2e%2e%2fx", "..%2f..%2fx", "%2e%2e/%2e%2e/etc/passwd", "%252e%252e%252f", "..%5c..%5cx", "%00", "x%00y",
           "..%2F..%2Fcanary", "%2Fetc%2Fpasswd"]


@st.composite
def id_cases(draw, extra_ids, endpoint):
    if endpoint == "raw_url":
        return Case(endpoint=endpoint, id=draw(st.sampled_from(RAW_IDS)),
                    via=draw(st.sampled_from(["get_image_info", "get_label_info", "put_image", "infer", "delete_image"])))
    ident = draw(st.one_of(bad_names(), bad_names(), weird_names(), st.sampled_from(extra_ids)))
    return Case(endpoint=endpoint, id=ident)


# ------------------------------------------------------------------------------------------------
# The harness
# ------------------------------------------------------------------------------------------------
def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


class Fuzz:
    def __init__(self, raw, studies: Path, base: Path, scratch: Path, outside: Path, sessions: Path, target: dict):
        self.raw, self.studies, self.base, self.scratch = raw, studies, base, scratch
        self.outside, self.sessions, self.target = outside, sessions, target
        self.counts: dict[str, Counter] = defaultdict(Counter)
        self.kinds: dict[str, Counter] = defaultdict(Counter)
        self.by_kind: dict[str, Counter] = defaultdict(Counter)
        self.variants: dict[str, Counter] = defaultdict(Counter)
        self.seconds: dict[str, float] = defaultdict(float)
        self.examples: dict[str, dict] = defaultdict(dict)
        self.known = set()

    # -- state --------------------------------------------------------------------------------
    def studies_state(self) -> dict:
        return {str(p.relative_to(self.studies)): _sha(p) for p in sorted(self.studies.rglob("*")) if p.is_file()}

    def tree_state(self) -> dict:
        """Everything under the session's temporary folder but the studies folder and the fuzz files."""
        out = {}
        skip = (self.studies, self.scratch)
        for root, dirs, files in os.walk(self.base):
            r = Path(root)
            dirs[:] = [d for d in dirs if r / d not in skip]
            for d in dirs:
                out[str((r / d).relative_to(self.base)) + "/"] = None
            for f in files:
                p = r / f
                st_ = p.lstat()
                out[str(p.relative_to(self.base))] = (st_.st_size, st_.st_mtime_ns)
        for p in sorted(self.outside.rglob("*")):
            if p.is_file():
                out["sha:" + str(p.relative_to(self.base))] = _sha(p)
        return out

    def state(self) -> tuple:
        return self.studies_state(), self.tree_state()

    def escapes(self, name: str, folder: Path, ext: str = ".nii.gz") -> bool:
        """True when ``folder/name<ext>`` is not a file directly in ``folder`` (traversal) or cannot be a path."""
        if not isinstance(name, str) or "\x00" in name or not name:
            return True
        real = os.path.realpath(os.path.join(folder, name + ext))
        return os.path.dirname(real) != os.path.realpath(folder) or os.path.basename(real) in (".", "..")

    def write_is_safe(self, name: str) -> bool:
        """Whether a write to this id / tag, were it let through, stays inside the session's temporary folder
        (the tests run as root: never risk a write elsewhere)."""
        if "\x00" in name:
            return True
        base = os.path.realpath(self.base)
        for folder, n in ((self.studies, name + ".nii.gz"), (self.studies / "labels", os.path.join(name, "x")),
                          (self.studies / "labels" / "final", name + ".nii.gz")):
            real = os.path.realpath(os.path.join(folder, n))
            if not real.startswith(base + os.sep):
                return False
        return True

    # -- requests -----------------------------------------------------------------------------
    def put_label(self, image: str, tag: str, name: str, content: bytes, params: str = "{}"):
        return self.raw.put("/datastore/label", params={"image": image, "tag": tag}, data={"params": params},
                            files={"label": (name, content, "application/octet-stream")})

    def put_image(self, image: str, name: str, content: bytes):
        return self.raw.put("/datastore/image", params={"image": image}, data={"params": "{}"},
                            files={"file": (name, content, "application/octet-stream")})

    # -- checks -------------------------------------------------------------------------------
    def record(self, category: str, kind: str, r, t0: float, variant: str = "") -> None:
        self.seconds[category] += time.perf_counter() - t0
        self.counts[category][str(r.status_code)] += 1
        self.kinds[category][kind] += 1
        self.by_kind[category][f"{kind}: {r.status_code}"] += 1
        if variant:
            self.variants[category][f"{kind} ({variant})"] += 1
        ex = self.examples[category]
        key = f"{r.status_code} {kind}" + (f" ({variant})" if variant else "")
        if key not in ex and len(ex) < 40:
            try:
                ex[key] = r.json().get("detail") if r.content else None
            except ValueError:
                ex[key] = r.text[:200]

    def check(self, category: str, case: dict, r, before: tuple, what: str) -> bool:
        """Status, message, server alive, state unchanged after a refusal; returns True when accepted."""
        status = r.status_code
        where = f"[{category}] {what}: {status} {r.text[:400]!r} | counts so far {dict(self.counts[category])}"
        assert status < 500, "server error " + where
        info = self.raw.get("/info/")
        assert info.status_code == 200, f"GET /info after the case answered {info.status_code}; " + where
        if 200 <= status < 300:
            assert case["expect"] in ("accept", "either"), "broken input accepted " + where
            return True
        assert 400 <= status < 500, "not a 4xx " + where
        assert case["expect"] != "accept", "valid input refused " + where
        if r.request.method != "HEAD":
            detail = r.json().get("detail")
            assert isinstance(detail, str) and detail.strip(), "no 'detail' message " + where
            if case["expect"] == "refuse" and case.get("words"):
                low = detail.lower()
                assert any(w in low for w in case["words"]), f"the message names none of {case['words']} " + where
        after = self.state()
        if after != before:
            s0, t0 = before
            s1, t1 = after
            changed = sorted(k for k in set(s0) | set(s1) if s0.get(k) != s1.get(k))
            moved = sorted(k for k in set(t0) | set(t1) if t0.get(k) != t1.get(k))
            raise AssertionError(f"state changed by a refusal: studies {changed[:10]}, around {moved[:10]} " + where)
        return False


def _write_summary(fz: Fuzz) -> str:
    rows = []
    total = Counter()
    for cat in N_CASES:
        c = fz.counts.get(cat, Counter())
        n = sum(c.values())
        total.update(c)
        rows.append((cat, n, ", ".join(f"{k}: {v}" for k, v in sorted(c.items())), fz.seconds.get(cat, 0.0)))
    summary = {
        "cases": sum(total.values()),
        "outcomes": dict(sorted(total.items())),
        "categories": {cat: {"cases": sum(fz.counts[cat].values()), "outcomes": dict(sorted(fz.counts[cat].items())),
                             "outcomes_by_kind": dict(sorted(fz.by_kind[cat].items())),
                             "variants": dict(sorted(fz.variants[cat].items())), "seconds": round(fz.seconds[cat], 2),
                             "example_messages": fz.examples[cat]}
                       for cat in N_CASES if fz.counts.get(cat)},
        "note": "outcomes are HTTP status codes; 2xx only for valid controls and harmless mutations (then checked "
                "and removed); every 4xx had a JSON detail naming the problem, GET /info answered 200 after each "
                "case and the studies folder and the files around it were unchanged after each refusal",
    }
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    SUMMARY.write_text(json.dumps(summary, indent=2, ensure_ascii=False, default=str))
    lines = [f"{'category':14s} {'cases':>6s}  {'seconds':>7s}  outcomes (HTTP status: count)"]
    lines += [f"{cat:14s} {n:6d}  {sec:7.1f}  {outs}" for cat, n, outs, sec in rows]
    lines.append(f"{'total':14s} {summary['cases']:6d}  {sum(fz.seconds.values()):7.1f}  "
                 + ", ".join(f"{k}: {v}" for k, v in sorted(total.items())))
    return "\n".join(lines)


@pytest.fixture(scope="module")
def fz(client, app_paths, tmp_path_factory):
    from fastapi.testclient import TestClient

    from cdpdnet.phantoms import make_phantom

    # a crash is a 500 here, as on a real server; a redirect is an answer (3xx), not followed
    raw = TestClient(client.app, raise_server_exceptions=False, follow_redirects=False)
    studies = Path(app_paths["studies"])
    base = Path(app_paths["root"]).parent
    scratch = tmp_path_factory.mktemp("fuzz_files")
    outside = tmp_path_factory.mktemp("fuzz_outside")
    ph = make_phantom(TARGET_SEED, spacing=(6.0, 6.0, 6.0))
    ct = nifti_bytes(ph.image.astype(np.int16), ph.affine, gz=True)
    # canaries: a valid CT outside the studies folder (next to it and further out), raw voxels for a NRRD
    # 'data file', infer sessions outside the session store (one whose image is missing: MONAI Label removes
    # such a session's folder)
    (outside / "canary.nii.gz").write_bytes(ct)
    (outside / "canary.raw").write_bytes(ph.image.astype(np.int16).tobytes(order="F"))
    (Path(app_paths["root"]) / "canary.nii.gz").write_bytes(ct)
    sessions = Path(client.app_instance.sessions().store_path)
    sessions.mkdir(parents=True, exist_ok=True)
    for name, image in (("sess", outside / "canary.nii.gz"), ("dangling", outside / "missing.nii.gz")):
        d = outside / name
        d.mkdir()
        (d / "meta.info").write_text(json.dumps({"name": name, "path": str(d), "image": str(image), "meta": {},
                                                 "create_ts": 1, "last_access_ts": int(time.time()),
                                                 "expiry": 10 ** 9}) + "\n")
    r = raw.put("/datastore/image", params={"image": TARGET}, data={"params": "{}"},
                files={"file": ("fuzz_target.nii.gz", ct, "application/octet-stream")})
    assert r.status_code == 200, r.text
    fuzz = Fuzz(raw, studies, base, scratch, outside, sessions, Case(shape=tuple(ph.image.shape), affine=ph.affine,
                                                                     ct=ct))
    fuzz.known = set(client.app_instance.datastore().list_images()) | {"final", "original"}
    cwd = os.getcwd()
    fuzz.extra_ids = sorted({str(outside / "canary.nii.gz"), os.path.relpath(outside / "canary.nii.gz", cwd),
                             str(outside / "canary"), "../canary", os.path.relpath(outside / "canary", studies),
                             os.path.relpath(outside / "sess", sessions), os.path.relpath(outside / "dangling", sessions),
                             str(outside / "sess"), str(Path(app_paths["root"]) / "canary.nii.gz"), "/etc/passwd",
                             "../../etc/passwd", "/proc/self/environ", "file:///etc/passwd"})
    fuzz.n = 0
    yield fuzz
    table = _write_summary(fuzz)
    print(f"\nFuzzed inputs ({SUMMARY.relative_to(REPO)}):\n{table}")
    raw.delete("/datastore/image", params={"id": TARGET})


def fuzz_test(category: str, body, kinds, slow: bool = False):
    """A hypothesis test of ``body(fz, kind, data)`` for each kind of case (so that every kind is tried): derandomized
    (the same cases every run), no example database, the category's examples shared out between the kinds."""
    n = max(4, N_CASES[category] * (SLOW_FACTOR if slow else 1) // len(kinds))

    @pytest.mark.parametrize("kind", kinds)
    @settings(max_examples=n, derandomize=True, database=None, deadline=None, print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def test(fz, kind, data):
        body(fz, kind, data)

    test.__name__ = f"test_fuzz_{category}" + ("_slow" if slow else "")
    return pytest.mark.slow(test) if slow else test


def _load_checked(path: Path):
    from monai.transforms import LoadImage

    img = LoadImage(image_only=True)(str(path))
    arr = np.asarray(img)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    return arr, np.asarray(img.affine, dtype=np.float64)


def _label_file(fz: Fuzz, kind: str, data) -> None:
    case = data.draw(label_file_cases(fz.target, kind))
    before = fz.state()
    t0 = time.perf_counter()
    r = fz.put_label(TARGET, "final", case["name"], case["content"])
    fz.record("label_file", kind, r, t0, case["fmt"])
    if fz.check("label_file", case, r, before, f"{case['kind']} ({case['detail']}) as {case['fmt']}"):
        stored = [p for p in (fz.studies / "labels" / "final").glob(TARGET + ".*")]
        assert len(stored) == 1, stored
        arr, affine = _load_checked(stored[0])  # what was stored is a label map of the target
        assert arr.shape == fz.target["shape"], (case["kind"], arr.shape)
        assert np.allclose(affine, fz.target["affine"], atol=1e-2), (case["kind"], affine)
        vals = np.unique(arr)
        assert np.isfinite(vals).all() and (vals == np.round(vals)).all() and vals.min() >= 0 and vals.max() <= 32


def _label_params(fz: Fuzz, kind: str, data) -> None:
    from hypothesis import assume

    case = data.draw(label_params_cases(kind))
    assume(fz.write_is_safe(case["tag"]))  # the tests run as root: a write let through must stay in the temp folder
    label = fz.valid_label if hasattr(fz, "valid_label") else None
    if label is None:
        lab = np.zeros(fz.target["shape"], np.uint8)
        lab[10:20, 10:20, 10:20] = 6
        label = fz.valid_label = nifti_bytes(lab, fz.target["affine"], gz=True)
    before = fz.state()
    t0 = time.perf_counter()
    r = fz.put_label(TARGET, case["tag"], "label.nii.gz", label, params=case["params"])
    fz.record("label_params", kind, r, t0)
    fz.check("label_params", case, r, before, f"{case['kind']}: params {case['params'][:200]!r} tag {case['tag'][:80]!r}")


def _image_file(fz: Fuzz, kind: str, data) -> None:
    case = data.draw(image_file_cases(kind))
    fz.n += 1
    image_id = f"fz_img_{fz.n}"
    before = fz.state()
    t0 = time.perf_counter()
    r = fz.put_image(image_id, case["name"], case["content"])
    fz.record("image_file", kind, r, t0, case["fmt"])
    if fz.check("image_file", case, r, before, f"{case['kind']} ({case['detail']}) as {case['fmt']}"):
        from cdpdnet.imageio import load_image

        stored = list(fz.studies.glob(image_id + ".*"))
        assert len(stored) == 1 and stored[0].parent == fz.studies, stored
        load_image(stored[0])  # a usable 3D CT
        d = fz.raw.delete("/datastore/image", params={"id": image_id})
        assert d.status_code == 200, d.text
        assert not list(fz.studies.glob(image_id + ".*"))


def _infer_file(fz: Fuzz, kind: str, data) -> None:
    case = data.draw(infer_file_cases(kind))
    model = data.draw(st.sampled_from(["cdpdnet", "cdpdnet_prompt"]))
    before = fz.state()
    t0 = time.perf_counter()
    r = fz.raw.post(f"/infer/{model}", params={"output": "json"}, data={"params": "{}"},
                    files={"file": (case["name"], case["content"], "application/octet-stream")})
    fz.record("infer_file", kind, r, t0, f"{case['fmt']}, {model}")
    fz.check("infer_file", case, r, before, f"{model}: {case['kind']} ({case['detail']}) as {case['fmt']}")


def _infer_params(fz: Fuzz, kind: str, data) -> None:
    from hypothesis import assume

    case = data.draw(infer_params_cases(kind))
    assume(fz.write_is_safe(str(case["params"].get("label_tag", ""))))
    url = "/infer/" + (path_quote(case["model"]) if case["kind"] == "model" else case["model"])
    before = fz.state()
    t0 = time.perf_counter()
    r = fz.raw.post(url, params={"image": TARGET, "output": "json"}, data={"params": json.dumps(case["params"])})
    fz.record("infer_params", kind, r, t0, case["model"] if kind != "model" else "")
    fz.check("infer_params", case, r, before, f"{case['model']}: {json.dumps(case['params'])[:300]}")


def path_quote(s: str) -> str:
    """A path segment with '.' escaped too: the client must not resolve '..' itself (a raw HTTP client would send it)."""
    return quote(s, safe="").replace(".", "%2E")


NOT_FOUND_WORDS = ("not found", "not valid", "unknown", "no image", "not in the datastore", "method not allowed",
                   "has no")


def _ids(fz: Fuzz, kind: str, data) -> None:
    from hypothesis import assume

    case = data.draw(id_cases(fz.extra_ids, kind))
    ep, ident = case["endpoint"], case["id"]
    assume(ident not in fz.known)
    raw = fz.raw
    label = fz.valid_label if hasattr(fz, "valid_label") else None
    if label is None:
        lab = np.zeros(fz.target["shape"], np.uint8)
        lab[10:20, 10:20, 10:20] = 6
        label = fz.valid_label = nifti_bytes(lab, fz.target["affine"], gz=True)
    ct_file = {"file": ("fz.nii.gz", fz.target["ct"], "application/octet-stream")}
    label_file = {"label": ("label.nii.gz", label, "application/octet-stream")}
    expect, cleanup = "refuse", None
    if ep == "raw_url":
        from urllib.parse import unquote

        decoded = unquote(ident)
        via = case["via"]
        if via == "put_image":
            assume(fz.write_is_safe(decoded))
            expect = "refuse" if fz.escapes(decoded, fz.studies) else "either"
        ep = f"raw_url:{via}"
        call = {"get_image_info": lambda: raw.get(f"/datastore/image/info?image={ident}"),
                "get_label_info": lambda: raw.get(f"/datastore/label/info?label={ident}&tag=final"),
                "put_image": lambda: raw.put(f"/datastore/image?image={ident}", data={"params": "{}"}, files=ct_file),
                "infer": lambda: raw.post(f"/infer/cdpdnet?image={ident}&output=json"),
                "delete_image": lambda: raw.delete(f"/datastore/image?id={ident}")}[via]
        if expect == "either":
            cleanup = ("image", decoded)
    else:
        if ep == "put_image":
            assume(fz.write_is_safe(ident))
            expect = "refuse" if fz.escapes(ident, fz.studies) else "either"
            cleanup = ("image", ident)
        elif ep in ("get_session", "delete_session"):  # a trailing '/' is routing (a slash redirect), not an id
            assume(not ident.endswith("/"))
        elif ep == "put_label_tag":
            assume(fz.write_is_safe(ident))
            expect = "refuse" if fz.escapes(ident, fz.studies / "labels", "") else "either"
            cleanup = ("label", ident)
        q = path_quote(ident)
        call = {
            "get_image": lambda: raw.get("/datastore/image", params={"image": ident}),
            "head_image": lambda: raw.head("/datastore/image", params={"image": ident}),
            "put_image": lambda: raw.put("/datastore/image", params={"image": ident}, data={"params": "{}"},
                                         files=ct_file),
            "delete_image": lambda: raw.delete("/datastore/image", params={"id": ident}),
            "get_image_info": lambda: raw.get("/datastore/image/info", params={"image": ident}),
            "put_image_info": lambda: raw.put("/datastore/image/info", params={"image": ident}, data={"info": "{}"}),
            "put_label_image": lambda: raw.put("/datastore/label", params={"image": ident, "tag": "final"},
                                               data={"params": "{}"}, files=label_file),
            "put_label_tag": lambda: raw.put("/datastore/label", params={"image": TARGET, "tag": ident},
                                             data={"params": "{}"}, files=label_file),
            "delete_label_id": lambda: raw.delete("/datastore/label", params={"id": ident, "tag": "final"}),
            "delete_label_tag": lambda: raw.delete("/datastore/label", params={"id": TARGET, "tag": ident}),
            "get_label": lambda: raw.get("/datastore/label", params={"label": ident, "tag": "final"}),
            "get_label_tag": lambda: raw.get("/datastore/label", params={"label": TARGET, "tag": ident}),
            "get_label_info": lambda: raw.get("/datastore/label/info", params={"label": ident, "tag": "final"}),
            "put_label_info": lambda: raw.put("/datastore/label/info", params={"label": ident, "tag": "final"},
                                              data={"info": "{}"}),
            "infer_query": lambda: raw.post("/infer/cdpdnet", params={"image": ident, "output": "json"}),
            "infer_params": lambda: raw.post("/infer/cdpdnet", params={"image": TARGET, "output": "json"},
                                             data={"params": json.dumps({"image": ident})}),
            "infer_session": lambda: raw.post("/infer/cdpdnet", params={"session_id": ident, "output": "json"}),
            "get_session": lambda: raw.get(f"/session/{q}"),
            "delete_session": lambda: raw.delete(f"/session/{q}"),
        }[ep]
    before = fz.state()
    t0 = time.perf_counter()
    r = call()
    fz.record("ids", kind, r, t0, case.get("via", ""))
    c = {"expect": expect, "words": NOT_FOUND_WORDS + ("path separator", "control characters", "starts with '.'",
                                                        "bytes long", "is empty")}
    if fz.check("ids", c, r, before, f"{ep} with {ident[:120]!r}"):
        kind, name = cleanup
        if kind == "image":  # a harmless new id: stored directly in the studies folder, then removed
            new_id = r.json()["image"]
            assert (fz.studies / f"{new_id}.nii.gz").is_file(), new_id
            d = raw.delete("/datastore/image", params={"id": new_id})
            assert d.status_code == 200, d.text
        else:  # a harmless new tag: stored in labels/<tag>/, then removed
            assert (fz.studies / "labels" / name / f"{TARGET}.nii.gz").is_file(), name
            d = raw.delete("/datastore/label", params={"id": TARGET, "tag": name})
            assert d.status_code == 200, d.text


KINDS = {"label_file": LABEL_KINDS, "label_params": LABEL_PARAMS_KINDS, "image_file": IMAGE_KINDS,
         "infer_file": INFER_KINDS, "infer_params": INFER_PARAMS_KINDS, "ids": ID_ENDPOINTS}
test_fuzz_label_file = fuzz_test("label_file", _label_file, LABEL_KINDS)
test_fuzz_label_params = fuzz_test("label_params", _label_params, LABEL_PARAMS_KINDS)
test_fuzz_image_file = fuzz_test("image_file", _image_file, IMAGE_KINDS)
test_fuzz_infer_file = fuzz_test("infer_file", _infer_file, INFER_KINDS)
test_fuzz_infer_params = fuzz_test("infer_params", _infer_params, INFER_PARAMS_KINDS)
test_fuzz_ids = fuzz_test("ids", _ids, ID_ENDPOINTS)
test_fuzz_label_file_slow = fuzz_test("label_file", _label_file, LABEL_KINDS, slow=True)
test_fuzz_label_params_slow = fuzz_test("label_params", _label_params, LABEL_PARAMS_KINDS, slow=True)
test_fuzz_image_file_slow = fuzz_test("image_file", _image_file, IMAGE_KINDS, slow=True)
test_fuzz_infer_file_slow = fuzz_test("infer_file", _infer_file, INFER_KINDS, slow=True)
test_fuzz_infer_params_slow = fuzz_test("infer_params", _infer_params, INFER_PARAMS_KINDS, slow=True)
test_fuzz_ids_slow = fuzz_test("ids", _ids, ID_ENDPOINTS, slow=True)


def test_uploaded_valid_image_is_still_segmented(fz):
    """The control for infer_file: MONAI Label's temporary copy of an upload is still read."""
    r = fz.raw.post("/infer/cdpdnet_prompt", params={"output": "json"}, data={"params": json.dumps({"label_prompt": [6]})},
                    files={"file": ("ct.nii.gz", fz.target["ct"], "application/octet-stream")})
    assert r.status_code == 200, r.text
    assert r.json()["shape"] == list(fz.target["shape"])


def test_session_archives_with_traversal_are_refused(fz):
    """``PUT /session/?uncompress=true`` unpacked tar members named ``../x`` outside the session folder."""
    import tarfile

    def tar(members) -> bytes:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            for name, kind in members:
                ti = tarfile.TarInfo(name)
                if kind == "link":
                    ti.type, ti.linkname = tarfile.SYMTYPE, "/etc"
                    t.addfile(ti)
                else:
                    data = b"fuzz"
                    ti.size = len(data)
                    t.addfile(ti, io.BytesIO(data))
        return buf.getvalue()

    escape = fz.outside / "escaped_by_tar.txt"
    rel = os.path.relpath(escape, "/tmp/x")  # unpacked into a temporary folder in /tmp
    cases = [[(rel, "file")], [("../../../../../../../../" + str(escape).lstrip("/"), "file")],
             [("ok.txt", "file"), ("lnk", "link")], [("a/../../b.txt", "file")]]
    for members in cases:
        before = fz.state()
        t0 = time.perf_counter()
        r = fz.raw.put("/session/", params={"uncompress": "true"},
                       files={"files": ("session.tar", tar(members), "application/x-tar")})
        fz.record("session_archive", "tar", r, t0, members[-1][0][:40])
        assert r.status_code == 422, r.text
        assert "archive refused" in r.json()["detail"]
        assert not escape.exists()
        assert fz.state() == before


def test_fuzz_summary(fz):
    """Counts per category and outcome: written to test-artifacts/fuzz-inputs-summary.json and printed."""
    ran = {c: fz.counts[c] for c in N_CASES if fz.counts.get(c)}
    # it checks the fuzz cases of this session: selected without any of them, it has nothing to check
    assert ran, "no fuzz case ran in this session: select test_fuzz_summary together with them (-k fuzz)"
    table = _write_summary(fz)
    for cat, c in ran.items():
        assert not any(k.startswith("5") for k in c), f"{cat}: server errors\n{table}"
        assert sum(c.values()) >= min(10, N_CASES[cat]), f"{cat}: too few cases\n{table}"
        missing = sorted(set(KINDS.get(cat, [])) - set(fz.kinds[cat]))
        assert not missing, f"{cat}: kinds never tried {missing}\n{table}"
    assert SUMMARY.is_file(), table
