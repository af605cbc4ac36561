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

Also, before it writes ``datastore_v2.json``, a local datastore re-reads it when another process
(a training or scoring subprocess) changed it, so one process does not overwrite the other's
label or image info with a stale copy.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np

from cdpdnet.taxonomy import NUM_CLASSES

from .errors import not_found, unprocessable
from .rois import annotated_from_info, annotated_from_label_info_list, parse_rois, read_label_array, roi_names

logger = logging.getLogger(__name__)

__all__ = ["LabelGuardMixin", "guard_datastore", "sync_datastore", "FINAL"]

FINAL = "final"
AFFINE_TOL = 1e-2


def is_dicomweb(ds) -> bool:
    from monailabel.datastore.dicom import DICOMWebDatastore

    return isinstance(ds, DICOMWebDatastore)


def forget_dicomweb_listing(ds, labelled: bool = False) -> None:
    """Drop MONAI Label's cached QIDO results of a DICOMweb datastore.

    MONAI Label 0.8.5 caches the series list and the "labelled" list for
    ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` (2 hours) in class-level TTL caches, so a series that
    arrives in the PACS, or a SEG just saved, stayed invisible to next-sample and ``/info`` until the
    cache expired or the server restarted. The series list is cheap (one QIDO) and is dropped on
    every sync; the labelled list costs one metadata request per SEG and is dropped after a save.
    """
    if not is_dicomweb(ds):
        return
    fns = [type(ds).list_images] + ([type(ds).get_labeled_images] if labelled else [])
    for fn in fns:
        cache = getattr(fn, "cache", None)
        if cache is not None:
            cache.clear()


def sync_datastore(ds) -> None:
    """Pick up changes another process wrote to a local datastore's json (cheap: an mtime check), and
    new series in a DICOMweb datastore's PACS."""
    forget_dicomweb_listing(ds)
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
        try:
            idx = int(idx)
        except (TypeError, ValueError):
            continue
        if r is not None and idx > 0:
            out[idx] = r.index
    return out if any(k != v for k, v in out.items()) else {}


def validate_label(label_path: str, image_uri: str, value_map: dict[int, int] | None = None):
    """Check a label file against its image, remapping file values with ``value_map`` first.

    Returns ``(ROI values present, remapped uint8 array or None, affine)``. Raises 422.
    """
    try:
        arr, affine = read_label_array(label_path)
    except ValueError as e:
        raise unprocessable(f"label refused: {e}") from None
    shape, img_affine = _image_geometry(image_uri)
    if tuple(arr.shape) != tuple(shape):
        raise unprocessable(f"label refused: its voxel shape {list(arr.shape)} differs from the image's {list(shape)}")
    if not np.allclose(affine, img_affine, atol=AFFINE_TOL):
        raise unprocessable("label refused: its geometry (affine) differs from the image's: "
                            f"label {np.round(affine, 3).tolist()} vs image {np.round(img_affine, 3).tolist()}")
    a = np.asarray(arr)
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
        info = dict(label_info or {})
        if image_id not in self.list_images():
            raise not_found(f"image {image_id!r} is not in the datastore (unknown image id)")
        image_uri = self.get_image_uri(image_id)
        if not image_uri or not os.path.exists(image_uri):
            raise not_found(f"image {image_id!r} has no readable image file")
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
                if is_dicomweb(self):  # DICOM-SEG segments named and coded as the ROIs they hold
                    from .dicom_seg import seg_label_info

                    if not present:
                        raise unprocessable("label refused: it is empty, and a DICOM-SEG needs at least one segment")
                    info["label_info"] = seg_label_info(present)
            label_id = super().save_label(image_id, label_filename, label_tag, info, *args, **kw)
            forget_dicomweb_listing(self, labelled=True)
            self._cdpdnet_last_save = {"image": image_id, "tag": label_tag or FINAL,
                                       **{k: info[k] for k in ("annotated", "annotated_from") if k in info}}
            return label_id
        finally:
            for tmp in (converted, remapped_file):
                if tmp and os.path.exists(tmp):
                    os.unlink(tmp)

    def update_image_info(self, image_id: str, info: dict[str, Any]) -> None:
        sync_datastore(self)
        return super().update_image_info(image_id, info)

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """DICOMweb: a final label asked for by *image* id is the local copy of the image's newest SEG
        (see :meth:`_download_labeled_data`); MONAI Label would take the id for a SEG series."""
        if is_dicomweb(self) and label_tag == FINAL and not image_id and label_id in self.list_images():
            from monailabel.datastore.local import LocalDatastore

            uri = LocalDatastore.get_label_uri(self, label_id, FINAL)
            if not uri or not os.path.exists(uri):
                self._download_labeled_data()
                uri = LocalDatastore.get_label_uri(self, label_id, FINAL)
            return uri
        if image_id:
            return super().get_label_uri(label_id, label_tag, image_id)
        return super().get_label_uri(label_id, label_tag)

    def _download_labeled_data(self):
        """DICOMweb: the training labels are the PACS's DICOM-SEGs, read back with ROI values.

        Replaces MONAI Label 0.8.5's version, which (1) kept whichever SEG of an image it met first, so
        an annotator's correction (a newer SEG) was never trained on, and (2) used dcmqi's segment
        numbers (1..N) as label values, which are not ROI values. Here, per image, the newest SEG
        (SeriesDate/SeriesTime, then InstanceCreation) is converted by :func:`lib.dicom_seg.seg_to_label_map`
        and stored as the final label with its segments as the annotated ROIs, unless the cached one
        already came from that SEG. A SEG that cannot be read is skipped with a warning.
        """
        if not is_dicomweb(self):
            return super()._download_labeled_data()
        import tempfile

        from monailabel.datastore.local import LocalDatastore
        from pydicom import Dataset

        from .dicom_seg import seg_to_label_map

        client = self._client
        images = set(self.list_images())
        newest: dict[str, tuple[str, str, str]] = {}  # image -> (timestamp, study, seg series)
        for q in client.search_for_series(search_filters={"Modality": "SEG"}):
            seg = Dataset.from_json(q)
            study, series = str(seg.StudyInstanceUID), str(seg.SeriesInstanceUID)
            try:
                meta = Dataset.from_json(client.retrieve_series_metadata(study, series)[0])
                ref = str(meta.ReferencedSeriesSequence[0].SeriesInstanceUID)
            except Exception as e:  # noqa: BLE001
                logger.warning(f"DICOM-SEG {series} ignored: no readable referenced series ({e})")
                continue
            if ref not in images:
                continue
            stamp = "".join(str(meta.get(k, "")) for k in ("SeriesDate", "SeriesTime", "InstanceCreationDate",
                                                            "InstanceCreationTime", "ContentDate", "ContentTime"))
            if ref not in newest or (stamp, series) > (newest[ref][0], newest[ref][2]):
                newest[ref] = (stamp, study, series)
        for image_id, (_, study, series) in newest.items():
            try:
                if LocalDatastore.get_label_uri(self, image_id, FINAL) and \
                        LocalDatastore.get_label_info(self, image_id, FINAL).get("SeriesInstanceUID") == series:
                    continue  # cached from this very SEG
            except Exception:  # noqa: BLE001
                pass
            try:
                image_uri = self.get_image_uri(image_id)
                seg = client.retrieve_series(study, series)[0]
                fd, tmp = tempfile.mkstemp(prefix="cdpdnet_seg_", suffix=".nii.gz")
                os.close(fd)
                try:
                    rois = seg_to_label_map(seg, image_uri, tmp)
                    LocalDatastore.save_label(self, image_id, tmp, FINAL, {
                        "SeriesInstanceUID": series, "StudyInstanceUID": study, "annotated": roi_names(rois),
                        "annotated_from": "DICOM-SEG segments"})
                finally:
                    os.unlink(tmp)
                logger.info(f"training label of {image_id}: DICOM-SEG {series} ({len(rois)} ROIs)")
            except Exception as e:  # noqa: BLE001
                logger.warning(f"DICOM-SEG {series} of {image_id} could not be used for training: {e}")

    def update_label_info(self, label_id: str, label_tag: str, info: dict[str, Any]) -> None:
        sync_datastore(self)
        return super().update_label_info(label_id, label_tag, info)


def guard_datastore(ds):
    """Return ``ds`` with :class:`LabelGuardMixin` in front of its class (idempotent)."""
    cls = type(ds)
    if issubclass(cls, LabelGuardMixin):
        return ds
    ds.__class__ = type(f"Guarded{cls.__name__}", (LabelGuardMixin, cls), {})
    return ds
