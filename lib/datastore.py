"""Label saving with validation and the annotated-ROI record, for any MONAI Label datastore.

``guard_datastore(ds)`` swaps the datastore object's class for a subclass that adds
:class:`LabelGuardMixin` in front of the original class, so ``isinstance`` checks in MONAI Label
(``DICOMWebDatastore`` for DICOM-SEG output, ...) still hold and every other method is untouched.

``save_label`` (called by ``PUT /datastore/label`` and by infer with ``save_label``):

1. the image must exist (404 otherwise);
2. the label must be readable as an image (OHIF's raw ``.bin`` upload is converted with the image
   as reference first), have the image's voxel shape (and affine, within 1e-2), and hold only
   integer values in 0..32 (422 otherwise); nothing is written when a check fails;
   when the client's ``label_info`` says that file value ``idx`` is structure ``name`` (3D Slicer
   exports segments as 1..N in segment order) and that name is an ROI, the value is rewritten to
   the ROI's label value before saving (``remapped_values`` in the label info);
3. for the ``final`` tag, ``annotated`` (canonical ROI names) and ``annotated_from`` are recorded
   in the label info by the rule in :mod:`lib.rois`.

Ids, tags and uploads (:mod:`lib.inputs`): ``add_image`` refuses an image id or file name that is not
a plain file name (400: MONAI Label joins it into a path, ``../x`` wrote outside the studies folder), a
file type the datastore does not list, and a file that is not a usable 3D CT (422, checked by the header
before any voxel is read, then as :func:`cdpdnet.imageio.load_image` reads it); ``save_label`` refuses
such a tag (400) and label file types other than NIfTI, NRRD, MetaImage and OHIF's ``.bin`` (422). The
id lookups (image / label info, their updates, ``remove_image`` / ``remove_label``) answer 400 for a
malformed id and 404 for an unknown one, instead of MONAI Label's ``{}`` or 500. Nothing is written on
refusal.

Also, before it writes ``datastore_v2.json``, a local datastore re-reads it when another process
(a training or scoring subprocess) changed it, so one process does not overwrite the other's
label or image info with a stale copy.

Crash safety of a local datastore (MONAI Label 0.8.5's ``LocalDatastore`` copies the label onto the
old file and rewrites ``datastore_v2.json`` in place: a server killed meanwhile leaves a truncated
label, or a truncated json that stops the next start-up): here the label is written to a hidden temp
file in its folder, fsynced and renamed over the old one, then the json is written the same way, both
under the datastore's file lock. Killed at any point, the label file is the old or the new one, whole,
and the json parses; killed between the two renames, the new label is listed with the old label's
info (the safe order: an ROI annotated in the new label but not yet listed is unknown, never
background). A failed json write (no space left) puts the old label back; the save answers 507
``no space left on device`` and nothing changed. Temp files of a killed save (``.cdpdnet-save.*.tmp``,
``.datastore_v2.json.*.tmp``) are removed when the datastore is next opened.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
import uuid
from typing import Any

import numpy as np

from cdpdnet.taxonomy import NUM_CLASSES

from .errors import HTTPException, bad_request, not_found, unprocessable
from .inputs import IMAGE_UPLOAD_SUFFIXES, LABEL_UPLOAD_SUFFIXES, check_new_id, check_upload, id_problem, suffix_of
from .rois import annotated_from_info, annotated_from_label_info_list, parse_rois, read_label_array, roi_names

logger = logging.getLogger(__name__)

__all__ = ["LabelGuardMixin", "guard_datastore", "sync_datastore", "FINAL"]

FINAL = "final"
AFFINE_TOL = 1e-2


def sync_datastore(ds) -> None:
    """Pick up changes another process wrote to a local datastore's json (cheap: an mtime check), and
    new series in a remote datastore (see :meth:`LabelGuardMixin.forget_remote_listing`)."""
    forget = getattr(ds, "forget_remote_listing", None)
    if forget is not None:
        forget()
    fn = getattr(ds, "_init_from_datastore_file", None)
    if fn is not None:
        try:
            fn()
        except Exception as e:  # noqa: BLE001
            logger.warning(f"could not re-read the datastore file: {e}")


def _image_geometry(uri: str) -> tuple[tuple[int, ...], np.ndarray]:
    """Voxel shape and affine (RAS) of an image, from the header alone for NIfTI."""
    if uri.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(uri)
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    else:
        from monai.transforms import LoadImage

        img = LoadImage(image_only=True)(uri)
        shape = tuple(int(s) for s in img.shape)
        affine = np.asarray(img.affine, dtype=np.float64)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    return shape, affine


def label_value_map(label_info) -> dict[int, int]:
    """File value -> ROI value from a client's ``label_info`` (``[{"name", "idx"}]``, idx = the value in
    the file, as 3D Slicer and OHIF send it), for the entries whose name is an ROI; ``{}`` when the
    file already holds ROI values (every mapped ``idx`` equals its ROI value)."""
    from cdpdnet.taxonomy import resolve_roi_name

    out: dict[int, int] = {}
    if not isinstance(label_info, list):
        return out
    for e in label_info:
        if not isinstance(e, dict) or e.get("name") is None:
            continue
        idx = e.get("idx", e.get("index", e.get("value")))
        r = resolve_roi_name(str(e["name"]))
        if isinstance(idx, bool) or (isinstance(idx, float) and not idx.is_integer()):
            continue
        try:
            idx = int(idx)
        except (TypeError, ValueError, OverflowError):
            continue
        if r is not None and idx > 0:
            out[idx] = r.index
    return out if any(k != v for k, v in out.items()) else {}


def validate_label(label_path: str, image_uri: str, value_map: dict[int, int] | None = None):
    """Check a label file against its image, remapping file values with ``value_map`` first.

    Returns ``(ROI values present, remapped uint8 array or None, affine)``. Raises 422.
    """
    head = check_upload(label_path, "label", LABEL_UPLOAD_SUFFIXES)  # full header check, nothing read yet
    shape, img_affine = _image_geometry(image_uri)
    if head is not None and head["format"] != "dicom":
        hshape = tuple(int(s) for s in head["shape"])
        while len(hshape) > 3 and hshape[-1] == 1:
            hshape = hshape[:-1]
        if hshape != tuple(shape):
            raise unprocessable(f"label refused: its voxel shape {list(hshape)} differs from the image's {list(shape)}")
    try:
        arr, affine = read_label_array(label_path)
    except ValueError as e:
        raise unprocessable(f"label refused: {e}") from None
    if tuple(arr.shape) != tuple(shape):
        raise unprocessable(f"label refused: its voxel shape {list(arr.shape)} differs from the image's {list(shape)}")
    if not np.allclose(affine, img_affine, atol=AFFINE_TOL):
        raise unprocessable("label refused: its geometry (affine) differs from the image's: "
                            f"label {np.round(affine, 3).tolist()} vs image {np.round(img_affine, 3).tolist()}")
    a = np.asarray(arr)
    if a.dtype.kind not in "biuf":
        raise unprocessable(f"label refused: its voxels are of type {a.dtype}; a label map holds integers 0..32")
    if a.dtype.kind == "b":
        a = a.astype(np.uint8)
    if not np.issubdtype(a.dtype, np.integer):
        if not np.isfinite(a).all():
            raise unprocessable("label refused: it contains NaN or infinite values")
        if not np.array_equal(a, np.round(a)):
            raise unprocessable("label refused: it contains non-integer values; a label map holds ROI values 0..32")
    a = a.astype(np.int64) if np.issubdtype(a.dtype, np.integer) else np.round(a).astype(np.int64)
    remapped = None
    if value_map:
        lut_size = max(int(a.max()) + 1, max(value_map) + 1) if a.size else 1
        if a.min() >= 0 and lut_size <= 65536:
            lut = np.arange(lut_size, dtype=np.int64)
            for k, v in value_map.items():
                lut[k] = v
            a = lut[a]
    vals = np.unique(a)
    bad = [int(v) for v in vals if v < 0 or v > NUM_CLASSES]
    if bad:
        raise unprocessable(f"label refused: values {bad[:10]} are not ROI label values (0 = background, "
                            f"1..{NUM_CLASSES} = the ROIs of /info models.cdpdnet.labels)")
    if value_map:
        remapped = a.astype(np.uint8)
    return [int(v) for v in vals if v > 0], remapped, affine


def annotated_for_save(params: dict, present: list[int], previous: list[int] | None) -> tuple[list[int], str]:
    """The annotated-ROI rule (see :mod:`lib.rois`): returns (ROI values, how)."""
    if params.get("annotated") not in (None, "", []):
        declared = parse_rois(params["annotated"], "annotated")
        return sorted(set(declared) | set(present)), "client annotated + values present"
    if params.get("label_info") not in (None, "", []):
        declared = annotated_from_label_info_list(params["label_info"])
        return sorted(set(declared) | set(present)), "client label_info + values present"
    prev = previous or []
    return sorted(set(present) | set(prev)), "values present + previously annotated"


class LabelGuardMixin:
    """Put in front of a datastore class (see :func:`guard_datastore`)."""

    def save_label(self, image_id: str, label_filename: str, label_tag: str, label_info: dict[str, Any], *args, **kw):
        sync_datastore(self)
        if label_tag:  # MONAI Label's endpoint turns an empty tag into "final"
            check_new_id(label_tag, "label tag")
        if label_info is not None and not isinstance(label_info, dict):
            raise bad_request(f"label params must be a JSON object, got {type(label_info).__name__}")
        info = dict(label_info or {})
        self._require_image(image_id, listed=True)
        image_uri = self.get_image_uri(image_id)
        if not image_uri or not os.path.exists(image_uri):
            raise not_found(f"image {image_id!r} has no readable image file")
        if suffix_of(label_filename, LABEL_UPLOAD_SUFFIXES) is None:
            check_upload(label_filename, "label", LABEL_UPLOAD_SUFFIXES)  # 422 naming the file type
        converted = None
        if str(label_filename).endswith(".bin"):
            from monailabel.datastore.utils.convert import binary_to_image

            try:
                converted = binary_to_image(image_uri, label_filename)
            except Exception as e:  # noqa: BLE001
                raise unprocessable(f"label refused: the raw .bin label does not fit the image ({e})") from None
            label_filename = converted
        remapped_file = None
        try:
            value_map = label_value_map(info.get("label_info"))
            present, remapped, affine = validate_label(label_filename, image_uri, value_map)
            if remapped is not None:  # the client's file values were segment numbers: store ROI values
                import tempfile

                from cdpdnet.imageio import save_label_map

                fd, remapped_file = tempfile.mkstemp(prefix="cdpdnet_label_", suffix=".nii.gz")
                os.close(fd)
                save_label_map(remapped, affine, remapped_file)
                label_filename = remapped_file
                info["remapped_values"] = {str(k): v for k, v in sorted(value_map.items())}
            if (label_tag or FINAL) == FINAL:
                prev = None
                try:
                    if self.get_label_uri(image_id, FINAL):
                        prev = annotated_from_info(self.get_label_info(image_id, FINAL))
                except Exception:  # noqa: BLE001
                    prev = None
                annotated, how = annotated_for_save(info, present, prev)
                info["annotated"] = roi_names(annotated)
                info["annotated_from"] = how
                self.describe_final_label(info, present)
            try:
                if self._plain_local_save():
                    label_id = self._save_label_atomically(image_id, label_filename, label_tag, info)
                else:
                    label_id = super().save_label(image_id, label_filename, label_tag, info, *args, **kw)
            except OSError as e:
                if e.errno in _NO_SPACE:
                    raise HTTPException(status_code=507, detail=f"label not saved: no space left on device "
                                                                f"({e.strerror or e}); the previous label of "
                                                                f"{image_id!r} is unchanged") from None
                raise
            self._remove_other_label_files(image_id, label_tag or FINAL)
            self.forget_remote_listing(labelled=True)
            self._cdpdnet_last_save = {"image": image_id, "tag": label_tag or FINAL,
                                       **{k: info[k] for k in ("annotated", "annotated_from") if k in info}}
            return label_id
        finally:
            for tmp in (converted, remapped_file):
                if tmp and os.path.exists(tmp):
                    os.unlink(tmp)

    # -- images -------------------------------------------------------------------------------
    def add_image(self, image_id: str, image_filename: str, image_info: dict[str, Any]) -> str:
        """Refuse a malformed id (400), a file type the datastore does not list or a file that is not a
        usable 3D CT (422) before MONAI Label copies it into the studies folder."""
        from cdpdnet.imageio import InvalidImageError, load_image

        sync_datastore(self)
        if image_id:
            check_new_id(image_id, "image id")
        else:  # MONAI Label names the image after the (temporary) file
            check_new_id(self._to_id(os.path.basename(image_filename))[0], "image id (from the file name)")
        listed = tuple(e.replace("*", "") for e in (getattr(self, "_extensions", None) or ["*.nii.gz", "*.nii"]))
        suffixes = tuple(e for e in IMAGE_UPLOAD_SUFFIXES if e in listed) or IMAGE_UPLOAD_SUFFIXES
        check_upload(image_filename, "image", suffixes, volume=True)
        try:
            load_image(image_filename, "image")
        except InvalidImageError as e:
            msg = str(e).replace(f"image {os.path.basename(image_filename)}", "the image")
            raise unprocessable(f"image refused: {msg}") from None
        return super().add_image(image_id, image_filename, image_info)

    def remove_image(self, image_id: str) -> None:
        self._require_image(image_id)
        return super().remove_image(image_id)

    def get_image_info(self, image_id: str) -> dict[str, Any]:
        self._require_image(image_id)
        return super().get_image_info(image_id)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        sync_datastore(self)
        self._require_image(image_id)
        return super().update_image_info(image_id, info)

    # -- labels -------------------------------------------------------------------------------
    def get_label_info(self, label_id: str, label_tag: str) -> dict[str, Any]:
        self._require_label(label_id, label_tag)
        return super().get_label_info(label_id, label_tag)

    def remove_label(self, label_id: str, label_tag: str) -> None:
        self._require_label(label_id, label_tag)
        return super().remove_label(label_id, label_tag)

    def _remove_other_label_files(self, image_id: str, label_tag: str) -> None:
        """After a label is saved as ``<id>.nrrd``, remove a ``<id>.nii.gz`` (etc.) left by an earlier save in
        another format: MONAI Label keeps it, and a rescan of the folder may list the stale file again."""
        store = getattr(self, "_datastore", None)
        label = store.label(image_id, label_tag) if store is not None and hasattr(store, "label") else None
        if label is None or not hasattr(store, "label_path"):
            return
        folder = store.label_path(label_tag)
        keep = self._filename(image_id, label.ext)
        for ext in (".nii.gz", ".nii", ".nrrd", ".mha"):
            name = self._filename(image_id, ext)
            path = os.path.join(folder, name)
            if name != keep and os.path.isfile(path) and self._to_id(name)[0] == image_id:
                logger.info(f"label of {image_id!r} ({label_tag}) saved as {keep}: removing the older {name}")
                os.unlink(path)

    # -- id checks ------------------------------------------------------------------------------
    def knows_image(self, image_id: str) -> bool | None:
        """Whether the datastore has this image id; ``None`` when that takes a remote query (then MONAI
        Label's own answer stands)."""
        store = getattr(self, "_datastore", None)
        objects = getattr(store, "objects", None)
        return None if objects is None else image_id in objects

    def _require_image(self, image_id: str, listed: bool = False) -> None:
        """400 for an id that cannot be a file name, 404 for an unknown one."""
        known = (image_id in self.list_images()) if listed else self.knows_image(image_id)
        if known is False or (known is None and id_problem(image_id)):
            if id_problem(image_id):
                check_new_id(image_id, "image id")
            raise not_found(f"image {_shown(image_id)} is not in the datastore (unknown image id)")

    def _require_label(self, label_id: str, label_tag: str) -> None:
        if label_tag and id_problem(label_tag):
            check_new_id(label_tag, "label tag")
        self._require_image(label_id)
        if self.knows_image(label_id) and not self.get_label_uri(label_id, label_tag):
            raise not_found(f"image {_shown(label_id)} has no {_shown(label_tag)} label")

    # -- crash-safe writes of a local datastore --------------------------------------------------
    def _plain_local_save(self) -> bool:
        """True when the next ``save_label`` in line is MONAI Label's ``LocalDatastore.save_label``."""
        from monailabel.datastore.local import LocalDatastore

        return getattr(super().save_label, "__func__", None) is LocalDatastore.save_label

    def _save_label_atomically(self, image_id: str, label_filename: str, label_tag: str,
                               label_info: dict[str, Any]) -> str:
        """``LocalDatastore.save_label`` with a crash-safe write order (see the module docstring)."""
        from filelock import FileLock
        from monailabel.datastore.local import DataModel

        obj = self._datastore.objects.get(image_id)
        if not obj:
            raise not_found(f"image {image_id!r} is not in the datastore (unknown image id)")
        _, label_ext = self._to_id(os.path.basename(label_filename))
        label_path = self._datastore.label_path(label_tag)
        name = self._filename(image_id, label_ext)
        dest = os.path.join(label_path, name)
        logger.info(f"Saving label of {image_id} ({label_tag}) => {dest}")
        with FileLock(self._lock_file):
            os.makedirs(label_path, exist_ok=True)
            backup = None
            if os.path.exists(dest):  # a second name for the old file, to put it back if the json cannot be written
                backup = os.path.join(label_path, f"{_SAVE_PREFIX}{name}.{uuid.uuid4().hex[:8]}.old.tmp")
                os.link(dest, backup)
            try:
                _atomic_copy_file(label_filename, dest, f"{_SAVE_PREFIX}{name}.")
                info = dict(label_info or {})
                info["ts"] = int(time.time())
                info["name"] = name
                before = obj.labels.get(label_tag)
                obj.labels[label_tag] = DataModel(info=info, ext=label_ext)
                try:
                    self._update_datastore_file(lock=False)
                except BaseException:
                    if before is None:
                        obj.labels.pop(label_tag, None)
                    else:
                        obj.labels[label_tag] = before
                    if backup is not None:
                        os.replace(backup, dest)
                        backup = None
                    else:
                        os.unlink(dest)
                    raise
            finally:
                if backup is not None and os.path.exists(backup):
                    os.unlink(backup)
        return image_id

    def _update_datastore_file(self, lock=True):
        """``datastore_v2.json`` written atomically (temp file + rename) instead of in place."""
        from filelock import FileLock

        from cdpdnet.checkpoint import atomic_write_bytes

        path = getattr(self, "_datastore_config_path", None)
        if not path:
            return super()._update_datastore_file(lock=lock)

        def write():
            data = json.dumps(self._datastore.model_dump(exclude={"base_path"}), indent=2, default=str)
            atomic_write_bytes(path, data.encode())
            self._config_ts = os.stat(path).st_mtime

        if lock:
            with FileLock(self._lock_file):
                write()
        else:
            write()

    def remove_stale_temp_files(self) -> list[str]:
        """Temp files of saves killed half-way (only ours: see the module docstring); under the datastore lock,
        so no save in progress (this process or another) is touched."""
        from filelock import FileLock

        path = getattr(self, "_datastore_config_path", None)
        if not path or not os.path.isdir(os.path.dirname(path)):
            return []
        removed = []
        json_prefix = f".{os.path.basename(path)}."
        with FileLock(self._lock_file):
            folders = [(os.path.dirname(path), json_prefix)]
            labels = self._datastore.label_path(None)
            if os.path.isdir(labels):
                folders += [(os.path.join(labels, t), _SAVE_PREFIX) for t in os.listdir(labels)
                            if os.path.isdir(os.path.join(labels, t))]
            for folder, prefix in folders:
                for f in os.listdir(folder):
                    if f.startswith(prefix) and f.endswith(".tmp"):
                        try:
                            os.unlink(os.path.join(folder, f))
                            removed.append(os.path.join(os.path.basename(folder), f))
                        except OSError:
                            pass
        if removed:
            logger.warning(f"Removed temporary files of interrupted label saves: {removed}")
        return removed

    # -- hooks that a remote datastore's guard overrides (lib.dicomweb_datastore) ---------------
    def describe_final_label(self, info: dict[str, Any], present: list[int]) -> None:
        """Add what the datastore needs to store a final label with ROI values ``present`` (nothing here)."""

    def forget_remote_listing(self, labelled: bool = False) -> None:
        """Drop cached listings of a remote datastore (nothing to drop for a local one)."""

    def refresh_training_labels(self) -> None:
        """Bring the final labels up to date before training (local labels always are)."""

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        sync_datastore(self)
        self._require_label(label_id, label_tag)
        return super().update_label_info(label_id, label_tag, info)


def _shown(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 80 else s[:77] + "..."


def guard_datastore(ds):
    """Return ``ds`` with :class:`LabelGuardMixin` (for a DICOMweb datastore its subclass
    :class:`lib.dicomweb_datastore.DICOMwebGuardMixin`) in front of its class (idempotent)."""
    cls = type(ds)
    if issubclass(cls, LabelGuardMixin):
        return ds
    from monailabel.datastore.dicom import DICOMWebDatastore

    mixin = LabelGuardMixin
    if isinstance(ds, DICOMWebDatastore):
        from .dicomweb_datastore import DICOMwebGuardMixin as mixin
    ds.__class__ = type(f"Guarded{cls.__name__}", (mixin, cls), {})
    try:
        ds.remove_stale_temp_files()
    except OSError as e:
        logger.warning(f"could not clean up temporary files in the datastore: {e}")
    return ds


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_SAVE_PREFIX = ".cdpdnet-save."


def _atomic_copy_file(src: str, dest: str, prefix: str) -> None:
    """Copy ``src`` onto ``dest`` so that ``dest`` is the old file or the complete new one, never a part
    (temp file in ``dest``'s folder, fsync, rename, fsync of the folder); the temp file is removed on failure."""
    import shutil
    import tempfile

    folder = os.path.dirname(dest) or "."
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # like shutil.copy's new files, not mkstemp's 0600
        with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
            shutil.copyfileobj(inp, out, 1 << 20)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
