"""The label guard of a DICOMweb datastore (MONAI Label's ``DICOMWebDatastore``, a PACS behind it).

:func:`lib.datastore.guard_datastore` puts :class:`DICOMwebGuardMixin` in front of such a datastore.
On top of the checks of :class:`~lib.datastore.LabelGuardMixin` it

* names and codes the DICOM-SEG segments of a saved final label as the ROIs they hold
  (:func:`lib.dicom_seg.seg_label_info`) and refuses an empty one (a SEG needs a segment);
* drops MONAI Label 0.8.5's cached QIDO results: it keeps the series list and the "labelled" list for
  ``MONAI_LABEL_DICOMWEB_CACHE_EXPIRY`` (2 hours) in class-level TTL caches, so a series that arrives
  in the PACS, or a SEG just saved, stayed invisible to next-sample and ``/info`` until the cache
  expired or the server restarted. The series list is cheap (one QIDO) and is dropped on every
  sync; the labelled list costs one metadata request per SEG and is dropped after a save;
* reads the training labels back from the PACS: per image the newest SEG, with ROI values.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from monailabel.datastore.local import LocalDatastore
from pydicom import Dataset

from .datastore import FINAL, LabelGuardMixin
from .dicom_seg import seg_label_info, seg_to_label_map
from .errors import unprocessable
from .rois import roi_names

logger = logging.getLogger(__name__)

__all__ = ["DICOMwebGuardMixin"]


class DICOMwebGuardMixin(LabelGuardMixin):
    """Put in front of a ``DICOMWebDatastore`` (see :func:`lib.datastore.guard_datastore`)."""

    def describe_final_label(self, info: dict[str, Any], present: list[int]) -> None:
        if not present:
            raise unprocessable("label refused: it is empty, and a DICOM-SEG needs at least one segment")
        info["label_info"] = seg_label_info(present)

    def forget_remote_listing(self, labelled: bool = False) -> None:
        fns = [type(self).list_images] + ([type(self).get_labeled_images] if labelled else [])
        for fn in fns:
            cache = getattr(fn, "cache", None)  # cachetools' @cached exposes its TTLCache
            if cache is not None:
                cache.clear()

    def refresh_training_labels(self) -> None:
        self._download_labeled_data()

    def knows_image(self, image_id: str) -> bool | None:
        """Series are listed by the PACS (a query), not by the local cache: id lookups only refuse
        malformed ids and otherwise keep MONAI Label's answers."""
        return None

    def get_label_uri(self, label_id: str, label_tag: str, image_id: str = "") -> str:
        """DICOMweb: a final label asked for by *image* id is the local copy of the image's newest SEG
        (see :meth:`_download_labeled_data`); MONAI Label would take the id for a SEG series."""
        if label_tag == FINAL and not image_id and label_id in self.list_images():
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
