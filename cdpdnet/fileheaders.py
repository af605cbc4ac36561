"""Header-only checks of volume files, before a reader allocates or reads any voxel.

Readers (nibabel, pynrrd, ITK, pydicom) size their buffers from the header: a 2 KB file whose header
claims 10^9 voxels makes them allocate gigabytes before they notice that the data is missing, and a
NRRD ``data file:`` or MetaImage ``ElementDataFile`` field makes them read another file on the
server. :func:`inspect_volume_file` parses the header of a NIfTI (``.nii``, ``.nii.gz``), NRRD
(``.nrrd``), MetaImage (``.mha``) or DICOM (``.dcm`` or a ``DICM`` preamble) file itself and refuses,
with a :class:`~cdpdnet.imageio.InvalidImageError` that says why:

* a header that does not parse, a non-positive size, more than ``MAX_VOXELS`` voxels;
* voxel data smaller than the header says (truncated), for compressed data a claim above what the
  compression can expand to (a gzip stream expands at most about 1032:1), and with ``full=True``
  compressed streams that are truncated, corrupt or longer than the header says (decompressed
  in 1 MiB steps, nothing kept);
* detached data files (NRRD ``data file``, MetaImage ``ElementDataFile`` other than ``LOCAL``);
* complex, RGB / vector or multi-channel voxel types;
* non-finite or zero voxel spacings and non-finite or singular orientations.

Other file types return ``None`` (the reader's own errors apply).
"""

from __future__ import annotations

import bz2
import math
import os
import zlib

import numpy as np

__all__ = ["inspect_volume_file", "VOLUME_SUFFIXES", "GZIP_MAX_RATIO"]

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm")
GZIP_MAX_RATIO = 1100  # deflate expands at most ~1032:1 (258-byte matches of 2 bits); a margin on top
_HEADER_LIMIT = 1 << 16  # bytes of text header (NRRD, MetaImage) read at most
_CHUNK = 1 << 20
_TRAILING_SLACK = 1 << 20  # decompressed bytes beyond the header's claim tolerated before refusing


def _invalid():
    from .imageio import InvalidImageError

    return InvalidImageError


def _error(what: str, message: str):
    from .imageio import InvalidImageError

    return InvalidImageError(f"{what} {message}")


def inspect_volume_file(path: str | os.PathLike, what: str = "the file", full: bool = False) -> dict | None:
    """Check a volume file's header; returns ``{"format", "shape", "dtype", "voxels", "data_bytes"}``
    or ``None`` for a file type it does not know. ``full`` also decompresses compressed voxel data to
    check that the stream is complete and as long as the header says. Messages start with ``what``."""
    from .imageio import MAX_VOXELS

    p = str(path)
    low = os.path.basename(p).lower()
    if not os.path.isfile(p):
        return None
    size = os.path.getsize(p)
    if low.endswith((".nii", ".nii.gz")):
        info = _nifti(p, size, what, full)
    elif low.endswith(".nrrd"):
        info = _nrrd(p, size, what, full)
    elif low.endswith(".mha"):
        info = _metaimage(p, size, what, full)
    elif low.endswith(".dcm") or _has_dicm_preamble(p):
        info = _dicom(p, size, what)
    else:
        return None
    shape = info["shape"]
    if any(int(s) <= 0 for s in shape):
        raise _error(what, f"has a header with a non-positive size {list(shape)}")
    voxels = math.prod(int(s) for s in shape)
    if voxels > MAX_VOXELS:
        raise _error(what, f"claims {voxels:,} voxels {list(shape)} in its header, above the limit of {MAX_VOXELS:,}")
    info["voxels"] = voxels
    return info


# -- helpers ------------------------------------------------------------------------------------
def _claim(what: str, need: int, have: int, how: str = "") -> None:
    if have < need:
        raise _error(what, f"is truncated or corrupt: its header describes {need:,} bytes of data but the "
                           f"file holds {have:,}{how}")


def _ratio_bound(what: str, need: int, compressed: int, kind: str = "gzip") -> None:
    if need > GZIP_MAX_RATIO * max(compressed, 1) + 4096:
        raise _error(what, f"claims {need:,} bytes of voxel data in {compressed:,} bytes of {kind} data, more than "
                           f"{kind} can expand to (truncated file or forged header)")


def _stream_size(fh, decompressor_factory, what: str, limit: int, kind: str) -> int:
    """Decompressed length of the stream from ``fh``'s position (1 MiB at a time, nothing kept); refuses a
    stream that is corrupt, ends early, is followed by other data, or decompresses beyond ``limit``."""
    total = 0
    d = decompressor_factory()
    data = b""

    def more(out: bytes) -> None:
        nonlocal total
        total += len(out)
        if total > limit:
            raise _error(what, f"holds more voxel data than its header describes (the {kind} stream is longer "
                               f"than {limit:,} bytes)")

    try:
        while not d.eof:
            if not data:
                data = fh.read(_CHUNK)
                if not data:  # input used up: drain what the decompressor still holds
                    more(d.flush() if hasattr(d, "flush") else b"")
                    if not d.eof:
                        raise _error(what, f"is truncated: its {kind} stream ends early (after {total:,} "
                                           "decompressed bytes)")
                    break
            more(d.decompress(data, _CHUNK))
            if hasattr(d, "unconsumed_tail"):  # zlib keeps unread input here
                data = d.unconsumed_tail
            else:  # bz2 keeps it inside; drain before feeding more
                data = b""
                while not d.eof and not d.needs_input:
                    more(d.decompress(b"", _CHUNK))
        rest = d.unused_data + data
        while True:  # only zero (or whitespace) padding may follow; gzip may have further members
            if rest.strip(b"\0\r\n "):
                if kind == "gzip" and rest.lstrip(b"\0")[:2] == b"\x1f\x8b":
                    fh.seek(fh.tell() - len(rest.lstrip(b"\0")))
                    return total + _stream_size(fh, decompressor_factory, what, limit - total, kind)
                raise _error(what, f"has other data after the end of its {kind} stream")
            rest = fh.read(_CHUNK)
            if not rest:
                return total
    except _invalid():
        raise
    except (zlib.error, OSError, EOFError, ValueError) as e:
        raise _error(what, f"has a corrupt {kind} stream ({e})") from None


def _gzip_stream(fh, what, limit):
    return _stream_size(fh, lambda: zlib.decompressobj(16 + zlib.MAX_WBITS), what, limit, "gzip")


def _zlib_stream(fh, what, limit):
    return _stream_size(fh, lambda: zlib.decompressobj(zlib.MAX_WBITS), what, limit, "zlib")


def _bz2_stream(fh, what, limit):
    return _stream_size(fh, bz2.BZ2Decompressor, what, limit, "bzip2")


def _check_dtype(what: str, dtype: np.dtype) -> np.dtype:
    dtype = np.dtype(dtype)
    if dtype.fields is not None or dtype.kind == "V":
        raise _error(what, f"has RGB / vector voxels ({dtype}); a single-channel scalar volume is needed")
    if dtype.kind == "c":
        raise _error(what, f"has complex voxel values ({dtype}); a real-valued volume is needed")
    if dtype.kind not in "iuf":
        raise _error(what, f"has voxels of type {dtype}, not a number type")
    return dtype


def _check_spacing(what: str, spacing, label: str = "voxel spacing") -> None:
    sp = np.asarray(spacing, dtype=np.float64)
    if not np.isfinite(sp).all() or (np.abs(sp) < 1e-6).any():
        raise _error(what, f"has a {label} {[float(x) for x in sp]} that is not finite and non-zero")


def _check_matrix(what: str, m, label: str) -> None:
    a = np.asarray(m, dtype=np.float64)
    if not np.isfinite(a).all():
        raise _error(what, f"has a non-finite {label}")
    if a.ndim == 2 and a.shape[0] == a.shape[1] and abs(np.linalg.det(a)) < 1e-12:
        raise _error(what, f"has a singular {label}")


# -- NIfTI --------------------------------------------------------------------------------------
def _nifti(p: str, size: int, what: str, full: bool) -> dict:
    import nibabel as nib

    try:
        img = nib.load(p)
        hdr = img.header
        shape = tuple(int(s) for s in hdr.get_data_shape())
        dtype = hdr.get_data_dtype()
        offset = int(getattr(img.dataobj, "offset", None) or hdr.get_data_offset())  # the header's may read 0
        zooms = [float(z) for z in hdr.get_zooms()[:3]]
        codes = int(hdr["qform_code"]), int(hdr["sform_code"])
        qform = np.asarray(hdr.get_qform(), dtype=np.float64) if codes[0] > 0 else None
        sform = np.asarray(hdr.get_sform(), dtype=np.float64) if codes[1] > 0 else None
    except Exception as e:  # noqa: BLE001 - any header failure means "not a usable NIfTI file"
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        if p.lower().endswith(".gz"):  # a broken gzip stream is the likelier cause: say so
            with open(p, "rb") as fh:
                if fh.read(2) == b"\x1f\x8b":
                    fh.seek(0)
                    try:
                        _gzip_stream(fh, what, 1 << 62)
                    except _invalid() as ge:
                        reason = str(ge)[len(what):].strip()
                        raise _error(what, f"could not be read as an image: the file {reason}") from None
        raise _error(what, "could not be read as an image (no readable NIfTI header: "
                           f"{msg.replace(p, os.path.basename(p))[:200]})") from None
    if not isinstance(img, (nib.Nifti1Image, nib.Nifti2Image)):
        raise _error(what, f"is a {type(img).__name__}, not a single-file NIfTI image")
    dtype = _check_dtype(what, dtype)
    if not shape:
        raise _error(what, "has no dimensions in its NIfTI header")
    _check_spacing(what, zooms, "NIfTI voxel size (pixdim)")
    for name, m in (("qform", qform), ("sform", sform)):
        if m is not None:
            _check_matrix(what, m[:3, :3], f"NIfTI {name}")
            if not np.isfinite(m).all():
                raise _error(what, f"has a non-finite NIfTI {name}")
    if qform is not None and sform is not None:  # readers differ in which they use: they must agree on voxel size
        zq, zs = np.linalg.norm(qform[:3, :3], axis=0), np.linalg.norm(sform[:3, :3], axis=0)
        if not np.allclose(zq, zs, rtol=0.01, atol=1e-4):
            raise _error(what, f"has a NIfTI qform and sform with different voxel sizes ({np.round(zq, 4).tolist()} "
                               f"vs {np.round(zs, 4).tolist()} mm; corrupt pixdim?)")
    voxels = math.prod(shape)
    need = offset + voxels * dtype.itemsize
    if p.lower().endswith(".gz"):
        _ratio_bound(what, need, size)
        if full:
            with open(p, "rb") as fh:
                got = _gzip_stream(fh, what, need + _TRAILING_SLACK)
            _claim(what, need, got, " after decompression")
    else:
        _claim(what, need, size)
    return {"format": "nifti", "shape": shape, "dtype": str(dtype), "data_bytes": voxels * dtype.itemsize}


# -- NRRD ---------------------------------------------------------------------------------------
def _read_text_header(p: str, what: str, kind: str, end) -> tuple[list[str], int]:
    """Lines of a text header up to the line for which ``end(line)`` is true; returns (lines, data offset)."""
    with open(p, "rb") as fh:
        head = fh.read(_HEADER_LIMIT)
    lines: list[str] = []
    pos = 0
    while True:
        nl = head.find(b"\n", pos)
        if nl < 0:
            raise _error(what, f"has no complete {kind} header (not terminated within {_HEADER_LIMIT:,} bytes)")
        raw = head[pos:nl]
        pos = nl + 1
        try:
            line = raw.decode("ascii").rstrip("\r")
        except UnicodeDecodeError:
            raise _error(what, f"has a {kind} header with non-text bytes (corrupt)") from None
        if end(line):
            return lines, pos
        lines.append(line)


_NRRD_ENCODINGS = {"raw": "raw", "gzip": "gzip", "gz": "gzip", "bzip2": "bzip2", "bz2": "bzip2",
                   "ascii": "text", "text": "text", "txt": "text", "hex": "hex"}


def _nrrd(p: str, size: int, what: str, full: bool) -> dict:
    import nrrd
    from nrrd.reader import _determine_datatype

    with open(p, "rb") as fh:
        magic = fh.read(8)
    if not magic.startswith(b"NRRD000"):
        if magic and b"NRRD0004"[:len(magic)] == magic:
            raise _error(what, f"is truncated: {size} bytes, not even a NRRD header")
        raise _error(what, "could not be read as an image (not a NRRD file: no 'NRRD000x' magic line)")
    lines, offset = _read_text_header(p, what, "NRRD", lambda line: line.strip() == "")
    try:
        header = nrrd.read_header(lines)
    except Exception as e:  # noqa: BLE001 - pynrrd raises NRRDError, ValueError, ...
        raise _error(what, f"has an invalid NRRD header ({str(e).strip()[:200]})") from None
    for key in ("data file", "datafile"):
        if key in header:
            raise _error(what, f"points at a detached data file ({header[key]!r}); only self-contained NRRD "
                               "files are accepted")
    try:
        sizes = [int(s) for s in np.atleast_1d(header["sizes"])]
        dim = int(header["dimension"])
        dtype = _determine_datatype(header)
    except Exception as e:  # noqa: BLE001
        raise _error(what, f"has an invalid NRRD header ({str(e).strip()[:200]})") from None
    if len(sizes) != dim:
        raise _error(what, f"has {len(sizes)} sizes for dimension {dim} in its NRRD header")
    dtype = _check_dtype(what, dtype)
    encoding = _NRRD_ENCODINGS.get(str(header.get("encoding", "")).lower())
    if encoding is None:
        raise _error(what, f"has an unsupported NRRD encoding {header.get('encoding')!r}")
    if any(s <= 0 for s in sizes):
        raise _error(what, f"has a header with a non-positive size {sizes}")
    dirs = header.get("space directions")
    if dirs is not None:
        d = np.asarray(dirs, dtype=np.float64)
        rows = d[~np.isnan(d).all(axis=1)] if d.ndim == 2 else d  # 'none' rows (non-spatial axes) are NaN
        if rows.size and not np.isfinite(rows).all():
            raise _error(what, "has non-finite NRRD space directions")
        if rows.size and (np.linalg.norm(rows, axis=-1) < 1e-6).any():
            raise _error(what, "has a zero-length NRRD space direction (zero voxel spacing)")
        if rows.ndim == 2 and rows.shape[0] == rows.shape[1]:
            _check_matrix(what, rows, "NRRD space directions matrix")
    if header.get("spacings") is not None:
        sp = np.asarray(header["spacings"], dtype=np.float64)
        _check_spacing(what, sp[~np.isnan(sp)], "NRRD spacing")
    if header.get("space origin") is not None and not np.isfinite(np.asarray(header["space origin"], float)).all():
        raise _error(what, "has a non-finite NRRD space origin")
    for key in ("line skip", "lineskip", "byte skip", "byteskip"):
        allowed = (0, -1) if key.startswith("byte") and encoding == "raw" else (0,)
        if key in header and header[key] not in allowed:
            raise _error(what, f"uses the NRRD field '{key}: {header[key]}', which is not accepted")
    voxels = math.prod(sizes)
    need = voxels * dtype.itemsize
    have = size - offset
    if encoding == "raw":
        _claim(what, need, have)
    elif encoding == "text":
        _claim(what, voxels, have, " (as text)")
    elif encoding == "hex":
        _claim(what, 2 * need, have, " (as hex text)")
    elif encoding == "gzip":
        _ratio_bound(what, need, have)
    if full and encoding in ("gzip", "bzip2"):
        with open(p, "rb") as fh:
            fh.seek(offset)
            got = (_gzip_stream if encoding == "gzip" else _bz2_stream)(fh, what, need + _TRAILING_SLACK)
        _claim(what, need, got, " after decompression")
    return {"format": "nrrd", "shape": tuple(sizes), "dtype": str(dtype), "data_bytes": need}


# -- MetaImage ------------------------------------------------------------------------------------
_MET_TYPES = {"MET_CHAR": "i1", "MET_UCHAR": "u1", "MET_SHORT": "i2", "MET_USHORT": "u2", "MET_INT": "i4",
              "MET_UINT": "u4", "MET_LONG": "i4", "MET_ULONG": "u4", "MET_LONG_LONG": "i8",
              "MET_ULONG_LONG": "u8", "MET_FLOAT": "f4", "MET_DOUBLE": "f8"}


_MET_UNREADABLE = ("MET_CHAR", "MET_LONG_LONG", "MET_ULONG_LONG")


def _metaimage(p: str, size: int, what: str, full: bool) -> dict:
    fields: dict[str, str] = {}

    def is_last(line: str) -> bool:
        key, _, value = line.partition("=")
        if _ and key.strip():
            fields[key.strip()] = value.strip()
        return key.strip() == "ElementDataFile"

    _, offset = _read_text_header(p, what, "MetaImage", is_last)
    if fields.get("ElementDataFile") != "LOCAL":
        raise _error(what, f"points at a detached data file (ElementDataFile = {fields.get('ElementDataFile')!r}); "
                           "only self-contained .mha files (ElementDataFile = LOCAL) are accepted")
    try:
        ndims = int(fields["NDims"])
        shape = tuple(int(s) for s in fields["DimSize"].split())
        etype = fields["ElementType"].upper()
        channels = int(fields.get("ElementNumberOfChannels", "1"))
        header_size = int(fields.get("HeaderSize", "0"))
    except (KeyError, ValueError) as e:
        raise _error(what, f"has an invalid MetaImage header (missing or malformed {e})") from None
    if len(shape) != ndims:
        raise _error(what, f"has {len(shape)} sizes for NDims = {ndims} in its MetaImage header")
    if etype not in _MET_TYPES:
        raise _error(what, f"has voxels of MetaImage type {etype}; a scalar number type is needed")
    if etype in _MET_UNREADABLE:  # ITK's Python wrapping has no such images (and looking for them stalls ~20 s)
        raise _error(what, f"has {etype} voxels, which the MetaImage reader cannot read; save it as 8-bit unsigned, "
                           "16- or 32-bit integers or floats")
    if channels != 1:
        raise _error(what, f"has {channels} channels per voxel; a single-channel scalar volume is needed")
    dtype = np.dtype(_MET_TYPES[etype])
    try:
        for key in ("ElementSpacing", "ElementSize"):
            if key in fields:
                _check_spacing(what, [float(x) for x in fields[key].split()], f"MetaImage {key}")
        for key in ("TransformMatrix", "Rotation", "Orientation"):
            if key in fields:
                m = np.asarray([float(x) for x in fields[key].split()], dtype=np.float64)
                n = int(round(math.sqrt(m.size)))
                _check_matrix(what, m.reshape(n, n) if n * n == m.size else m, f"MetaImage {key}")
        for key in ("Offset", "Position", "Origin"):
            if key in fields and not np.isfinite([float(x) for x in fields[key].split()]).all():
                raise _error(what, f"has a non-finite MetaImage {key}")
    except _invalid():
        raise
    except ValueError as e:
        raise _error(what, f"has a malformed MetaImage geometry field ({e})") from None
    if any(s <= 0 for s in shape):
        raise _error(what, f"has a header with a non-positive size {list(shape)}")
    need = math.prod(shape) * dtype.itemsize
    have = size - offset - max(header_size, 0)
    if fields.get("CompressedData", "False").lower() == "true":
        _ratio_bound(what, need, have, "zlib")
        if full:
            with open(p, "rb") as fh:
                fh.seek(offset + max(header_size, 0))
                got = _zlib_stream(fh, what, need + _TRAILING_SLACK)
            _claim(what, need, got, " after decompression")
    else:
        _claim(what, need, have)
    return {"format": "metaimage", "shape": shape, "dtype": str(dtype), "data_bytes": need}


# -- DICOM ----------------------------------------------------------------------------------------
def _has_dicm_preamble(p: str) -> bool:
    try:
        with open(p, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def _dicom(p: str, size: int, what: str) -> dict:
    import pydicom

    try:
        ds = pydicom.dcmread(p, defer_size="1 KB", force=False)
        rows = int(ds.get("Rows", 0) or 0)
        cols = int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        bits = int(ds.get("BitsAllocated", 0) or 0)
        elem = ds.get_item("PixelData") if "PixelData" in ds else None
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    except Exception as e:  # noqa: BLE001 - pydicom raises many kinds
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise _error(what, "could not be read as an image (not a readable DICOM file: "
                           f"{msg.replace(p, os.path.basename(p))[:200]})") from None
    if elem is None:
        raise _error(what, "is a DICOM file without pixel data (PixelData)")
    if rows <= 0 or cols <= 0 or frames <= 0:
        raise _error(what, f"has a DICOM header with a non-positive size (Rows {rows}, Columns {cols}, "
                           f"NumberOfFrames {frames})")
    if spp != 1:
        raise _error(what, f"has {spp} samples per pixel (colour); a single-channel CT is needed")
    if bits not in (8, 16, 32, 64):
        raise _error(what, f"has BitsAllocated {bits}; 8, 16, 32 or 64 are needed")
    need = rows * cols * frames * bits // 8
    length = int(getattr(elem, "length", 0) or 0)
    encapsulated = bool(ts is not None and getattr(ts, "is_encapsulated", False)) or length == 0xFFFFFFFF
    if encapsulated:
        _ratio_bound(what, need, size, "compressed DICOM")
    else:
        _claim(what, need, min(length, size))
    return {"format": "dicom", "shape": (cols, rows, frames), "dtype": f"{bits}-bit", "data_bytes": need}

