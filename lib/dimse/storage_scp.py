"""A DICOM Storage SCP (pynetdicom) that takes CT series from scanners or a PACS into the datastore.

* C-ECHO, and C-STORE of any storage SOP class, so that wrong input gets a clear refusal status and a
  log line instead of an opaque negotiation failure. Only CT images with pixel data are kept.
* Allowed callers: ``allowed_callers`` (calling AE titles); anyone else's association is rejected.
* Each accepted instance is written atomically under ``<spool>/incoming/<SeriesInstanceUID>/``. A series
  is *complete* when no instance of it arrived for ``complete_after`` seconds. It is then checked
  (one geometry: rows, columns, pixel spacing, orientation; distinct, evenly spaced slice positions;
  no instance from an aborted association) and either
  - converted to NIfTI and written atomically as ``<studies>/<SeriesInstanceUID>.nii.gz`` (a local
    datastore picks it up), or
  - moved to ``<spool>/quarantine/<SeriesInstanceUID>/`` with ``reason.txt`` and an error log line.
  Nothing half-written ever reaches the studies folder.
* Optionally (``segment_with``), the new series is auto-segmented and the result is sent as DICOM-SEG
  (segments named and coded as the ROIs, :mod:`lib.dicom_seg`) with C-STORE to ``send_to``.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["StorageSCP", "SCPConfig", "Destination", "check_series"]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
STATUS_OK = 0x0000
STATUS_REFUSED_NOT_CT = 0xC001  # C000-CFFF: "cannot understand" (DICOM PS3.4 GG.4)
STATUS_REFUSED_NO_PIXELS = 0xC002
STATUS_REFUSED_BAD_DATASET = 0xC003
STATUS_OUT_OF_RESOURCES = 0xA700
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")  # DICOM UID syntax (PS3.5 9.1); at most 64 characters, checked below


@dataclass
class Destination:
    """Where DICOM-SEG results go (C-STORE)."""

    host: str
    port: int
    ae_title: str


@dataclass
class SCPConfig:
    studies: Path
    spool: Path
    ae_title: str = "CDPDNET"
    host: str = "127.0.0.1"
    port: int = 11112
    allowed_callers: tuple[str, ...] = ()  # empty: any caller
    complete_after: float = 10.0  # seconds without a new instance
    segment_with: Callable[[Path, Path], None] | None = None  # (image.nii.gz, out label.nii.gz)
    send_to: Destination | None = None
    spacing_tolerance: float = 0.01  # relative


class SeriesError(ValueError):
    """A received series that cannot go into the datastore; the message says why."""


def check_series(files: list[Path]) -> list[Path]:
    """Check that ``files`` form one CT volume; return them sorted along the slice normal.

    Raises :class:`SeriesError` for mixed series or geometry, duplicate or unevenly spaced slices.
    """
    import pydicom

    if len(files) < 2:
        raise SeriesError(f"{len(files)} slice(s): a volume needs at least 2")
    heads = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    series = {str(h.get("SeriesInstanceUID", "")) for h in heads}
    if len(series) != 1:
        raise SeriesError(f"mixed series: {sorted(series)}")
    for key in ("Rows", "Columns", "PixelSpacing", "ImageOrientationPatient"):
        vals = {tuple(np.round(np.atleast_1d(np.asarray(h.get(key, []), dtype=float)), 4)) for h in heads}
        if len(vals) != 1:
            raise SeriesError(f"inconsistent {key} across the series: {sorted(vals)[:3]}")
    iop = np.asarray(heads[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(iop[:3], iop[3:])
    pos = np.array([float(np.dot(normal, np.asarray(h.ImagePositionPatient, dtype=float))) for h in heads])
    order = np.argsort(pos)
    gaps = np.diff(pos[order])
    if np.any(gaps < 1e-3):
        raise SeriesError("two slices at the same position (duplicate or mixed acquisitions)")
    if gaps.max() - gaps.min() > 0.01 * gaps.mean() + 1e-3:
        raise SeriesError(f"inconsistent slice spacing: gaps from {gaps.min():.3f} to {gaps.max():.3f} mm")
    return [files[i] for i in order]


@dataclass
class _Series:
    last: float
    files: dict[str, Path] = field(default_factory=dict)
    interrupted: bool = False
    caller: str = ""


class StorageSCP:
    """``start()`` listens; ``stop()`` ends. ``completed`` and ``quarantined`` list series UIDs handled."""

    def __init__(self, config: SCPConfig):
        self.cfg = config
        self.cfg.studies = Path(config.studies)
        self.cfg.spool = Path(config.spool)
        self.incoming = self.cfg.spool / "incoming"
        self.quarantine = self.cfg.spool / "quarantine"
        for d in (self.cfg.studies, self.incoming, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        self._series: dict[str, _Series] = {}
        self._assoc_series: dict[int, set[str]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self.completed: list[str] = []
        self.quarantined: dict[str, str] = {}
        self.sent: list[str] = []
        self.failed: dict[str, str] = {}  # series in the datastore whose DICOM-SEG could not be made or sent
        self._server = None
        self._watcher: threading.Thread | None = None

    # -- network ----------------------------------------------------------------------------
    def start(self) -> StorageSCP:
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.cfg.ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        if self.cfg.allowed_callers:
            ae.require_calling_aet = list(self.cfg.allowed_callers)
        handlers = [(evt.EVT_C_ECHO, lambda e: STATUS_OK), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_CONN_CLOSE, self._on_closed),
                    (evt.EVT_REJECTED, self._on_rejected)]
        self._server = ae.start_server((self.cfg.host, self.cfg.port), block=False, evt_handlers=handlers)
        self._watcher = threading.Thread(target=self._watch, name="scp-series-watcher", daemon=True)
        self._watcher.start()
        logger.info(f"DICOM listener {self.cfg.ae_title}@{self.cfg.host}:{self.cfg.port} "
                    f"(callers: {', '.join(self.cfg.allowed_callers) or 'any'})")
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        if self._watcher is not None:
            self._watcher.join(timeout=30)

    def _on_rejected(self, event) -> None:
        req = event.assoc.requestor
        logger.error(f"DICOM listener: association from {req.ae_title!s} at {req.address} rejected "
                     "(caller not allowed)")

    def _on_aborted(self, event) -> None:
        with self._lock:
            for uid in self._assoc_series.get(id(event.assoc), ()):
                if uid in self._series:
                    self._series[uid].interrupted = True
        logger.error(f"DICOM listener: association from {event.assoc.requestor.ae_title!s} aborted; its series "
                     "will be quarantined")

    def _on_closed(self, event) -> None:
        a = event.assoc
        if a is not None and not (a.is_released or a.is_aborted) and id(a) in self._assoc_series:
            self._on_aborted(event)  # the connection dropped without a release
        self._assoc_series.pop(id(a), None)

    def _on_store(self, event) -> int:
        caller = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception as e:  # noqa: BLE001 - a dataset pydicom cannot decode
            logger.error(f"DICOM listener: refused an instance from {caller}: unreadable dataset ({e})")
            return STATUS_REFUSED_BAD_DATASET
        sop_class = str(ds.get("SOPClassUID", ""))
        modality = str(ds.get("Modality", ""))
        uid, sop = str(ds.get("SeriesInstanceUID", "")), str(ds.get("SOPInstanceUID", ""))
        if modality != "CT" or sop_class not in (CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE):
            logger.error(f"DICOM listener: refused {sop or 'an instance'} from {caller}: modality {modality or '?'} "
                         f"(SOP class {sop_class}); only CT is taken")
            return STATUS_REFUSED_NOT_CT
        if "PixelData" not in ds:
            logger.error(f"DICOM listener: refused {sop} from {caller}: no pixel data")
            return STATUS_REFUSED_NO_PIXELS
        # the UIDs become file names: DICOM UID syntax only (digits and dots), no path tricks
        if not all(_UID.fullmatch(u) and len(u) <= 64 for u in (uid, sop)):
            logger.error(f"DICOM listener: refused an instance from {caller}: missing or invalid UIDs")
            return STATUS_REFUSED_BAD_DATASET
        folder = self.incoming / uid
        try:
            folder.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-")
            os.close(fd)
            ds.save_as(tmp, write_like_original=False)
            os.replace(tmp, folder / f"{sop}.dcm")
        except OSError as e:
            logger.error(f"DICOM listener: could not store {sop}: {e}")
            return STATUS_OUT_OF_RESOURCES
        with self._lock:
            s = self._series.setdefault(uid, _Series(last=time.monotonic(), caller=caller))
            s.files[sop] = folder / f"{sop}.dcm"
            s.last = time.monotonic()
            self._assoc_series.setdefault(id(event.assoc), set()).add(uid)
        return STATUS_OK

    # -- series completion ------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            with self._lock:
                ready = [u for u, s in self._series.items() if now - s.last >= self.cfg.complete_after]
                done = {u: self._series.pop(u) for u in ready}
            for uid, s in done.items():
                try:
                    self._finish(uid, s)
                except Exception as e:  # noqa: BLE001 - never take the listener down
                    self._quarantine(uid, f"unexpected error: {type(e).__name__}: {e}")

    def _finish(self, uid: str, s: _Series) -> None:
        if s.interrupted:
            return self._quarantine(uid, "an association that sent it was aborted (incomplete series)")
        try:
            files = check_series(sorted(s.files.values()))
        except SeriesError as e:
            return self._quarantine(uid, str(e))
        from cdpdnet.imageio import InvalidImageError, load_image, save_volume

        try:
            img = load_image(self.incoming / uid, "series")
        except InvalidImageError as e:
            return self._quarantine(uid, str(e))
        out = self.cfg.studies / f"{uid}.nii.gz"
        arr = np.asarray(img[0])
        save_volume(np.round(arr).astype(np.int16), np.asarray(img.affine, dtype=np.float64), out, dtype=np.int16)
        keep = self.cfg.spool / "series" / uid
        if keep.exists():
            shutil.rmtree(keep)
        keep.parent.mkdir(parents=True, exist_ok=True)
        os.replace(self.incoming / uid, keep)
        self.completed.append(uid)
        logger.info(f"DICOM listener: series {uid} ({len(files)} slices from {s.caller}) -> {out}")
        if self.cfg.segment_with is not None and self.cfg.send_to is not None:  # in the datastore whatever happens
            try:
                self._segment_and_send(uid, out, keep)
            except Exception as e:  # noqa: BLE001
                self.failed[uid] = f"{type(e).__name__}: {e}"
                logger.error(f"DICOM listener: series {uid}: auto-segmentation or sending failed: {self.failed[uid]}")

    def _quarantine(self, uid: str, reason: str) -> None:
        dest = self.quarantine / uid
        if dest.exists():
            shutil.rmtree(dest)
        if (self.incoming / uid).exists():
            os.replace(self.incoming / uid, dest)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "reason.txt").write_text(reason + "\n")
        self.quarantined[uid] = reason
        logger.error(f"DICOM listener: series {uid} quarantined in {dest}: {reason}")

    def _segment_and_send(self, uid: str, image: Path, dicom_dir: Path) -> None:
        from monailabel.datastore.utils.convert import nifti_to_dicom_seg

        from lib.dicom_seg import seg_label_info
        from lib.runtime import interpreter_bin_on_path

        interpreter_bin_on_path()  # dcmqi's itkimage2segimage

        with tempfile.TemporaryDirectory() as tmp:
            label = Path(tmp) / "label.nii.gz"
            self.cfg.segment_with(image, label)
            import nibabel as nib

            present = [int(v) for v in np.unique(np.asarray(nib.load(str(label)).dataobj)) if v > 0]
            if not present:
                logger.warning(f"DICOM listener: series {uid}: nothing segmented, no DICOM-SEG sent")
                return
            seg_file = nifti_to_dicom_seg(str(dicom_dir), str(label), seg_label_info(present))
            if not seg_file:
                logger.error(f"DICOM listener: series {uid}: DICOM-SEG could not be written")
                return
            try:
                if self.cfg.send_to is not None:
                    self._send(Path(seg_file))
                    self.sent.append(uid)
            finally:
                os.unlink(seg_file)

    def _send(self, path: Path) -> None:
        import pydicom
        from pynetdicom import AE

        d = self.cfg.send_to
        ds = pydicom.dcmread(str(path))
        ae = AE(ae_title=self.cfg.ae_title)
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(d.host, d.port, ae_title=d.ae_title)
        if not assoc.is_established:
            raise ConnectionError(f"could not associate with {d.ae_title}@{d.host}:{d.port}")
        try:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code != 0:
                raise ConnectionError(f"{d.ae_title} answered C-STORE with status {code}")
            logger.info(f"DICOM listener: DICOM-SEG {ds.SeriesInstanceUID} sent to {d.ae_title}@{d.host}:{d.port}")
        finally:
            assoc.release()
