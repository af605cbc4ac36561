"""ROI lists in requests and in label info, and the "which ROIs are annotated in this label" rule.

Label info (the dict MONAI Label keeps per saved label, ``GET /datastore/label/info``) carries
``"annotated"``: the canonical names (``cdpdnet.taxonomy``) of the ROIs annotated in that label
map. Every ROI not listed is *unknown* in that image, never "background".

The rule used when a label is saved and when a label is read for training or fill-in:

1. the client said so: ``annotated`` in the save params (names, synonyms or label values), or
   ``label_info`` (MONAI Label / OHIF style ``[{"name": ..., "idx": ...}, ...]``, each entry
   resolved by name, else by ``idx``);
2. otherwise the ROI values present in the saved label file plus the ROIs annotated in the
   previous final label of that image (an ROI once annotated stays annotated, so an annotator who
   confirms that an organ is absent does not lose that information by saving again);

in both cases the ROI values present in the file are added (a voxel of value ``v`` means ROI
``v`` was drawn). A label with no ``annotated`` info at all (imported by hand into
``labels/final``) counts as annotating exactly the ROI values present in it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from cdpdnet.taxonomy import NUM_CLASSES, ROIS, UnknownROIError, roi

from .errors import bad_request, unprocessable

logger = logging.getLogger(__name__)

__all__ = [
    "parse_rois",
    "roi_names",
    "annotated_from_info",
    "annotated_from_label_info_list",
    "read_label_array",
    "label_values",
    "final_label_annotation",
]


def roi_names(values: Iterable[int]) -> list[str]:
    return [ROIS[int(v) - 1].name for v in sorted(set(int(v) for v in values))]


def _split_text(value: str, what: str = "value") -> list[str]:
    s = value.strip()
    if s.startswith("["):
        try:
            parsed = json.loads(s)
        except (ValueError, RecursionError):
            raise bad_request(f"'{what}': could not parse {value[:200]!r} as a JSON list") from None
        if not isinstance(parsed, list):
            raise bad_request(f"'{what}': expected a list, got {value[:200]!r}")
        return parsed
    parts = [p.strip() for p in s.replace(";", ",").split(",")]
    return [p for p in parts if p]


def parse_rois(value: Any, what: str = "label_prompt") -> list[int]:
    """A list of ROI label values / names / synonyms (or a comma-separated string) -> sorted ROI values.

    Raises 400 for a malformed field and 422 (listing the closest names) for an unknown ROI.
    """
    if value is None or value == "" or value == []:
        return []
    if isinstance(value, str):
        items = _split_text(value, what)
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        items = [value]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise bad_request(f"'{what}' must be a list of ROI label values or names, got {type(value).__name__}")
    out: set[int] = set()
    for item in items:
        if isinstance(item, bool) or not isinstance(item, (int, float, str)):
            raise bad_request(f"'{what}' entries must be ROI label values (1..{NUM_CLASSES}) or names, got {item!r}")
        if isinstance(item, float):
            if not item.is_integer():
                raise unprocessable(f"'{what}': {item!r} is not an ROI label value (1..{NUM_CLASSES})")
            item = int(item)
        if isinstance(item, int):
            if not 1 <= item <= NUM_CLASSES:
                raise unprocessable(f"'{what}': label value {item} is not one of the {NUM_CLASSES} ROIs "
                                    f"(values 1..{NUM_CLASSES}; see /info models.cdpdnet.labels)")
            out.add(item)
            continue
        try:
            out.add(roi(item).index)
        except UnknownROIError as e:
            raise unprocessable(f"'{what}': {e}") from None
    return sorted(out)


def annotated_from_label_info_list(entries: Any) -> list[int]:
    """``[{"name": "liver", "idx": 6}, ...]`` (MONAI Label / OHIF ``label_info``) -> ROI values.

    Each entry resolves by name (canonical, display name or synonym), else by ``idx`` in 1..32;
    an entry that resolves neither way is a 422 (the client named a structure this model lacks).
    """
    if not isinstance(entries, list):
        raise bad_request(f"'label_info' must be a list of {{'name', 'idx'}} objects, got {type(entries).__name__}")
    out: set[int] = set()
    for e in entries:
        if isinstance(e, (str, int)) and not isinstance(e, bool):
            out.update(parse_rois([e], "label_info"))
            continue
        if not isinstance(e, dict):
            raise bad_request(f"'label_info' entries must be objects with 'name' and/or 'idx', got {e!r}")
        name, idx = e.get("name"), e.get("idx", e.get("index", e.get("value")))
        if name:
            try:
                out.add(roi(str(name)).index)
                continue
            except UnknownROIError as err:
                if idx is None:
                    raise unprocessable(f"'label_info': {err}") from None
        if idx is not None:
            if isinstance(idx, bool) or (isinstance(idx, float) and not idx.is_integer()):
                raise bad_request(f"'label_info': idx {idx!r} is not an integer")
            try:
                v = int(idx)
            except (TypeError, ValueError, OverflowError):
                raise bad_request(f"'label_info': idx {idx!r} is not an integer") from None
            if v == 0:
                continue
            out.update(parse_rois([v], "label_info"))
    return sorted(out)


def annotated_from_info(info: dict | None) -> list[int] | None:
    """The ``annotated`` ROI values stored in a label info dict, or ``None`` when it has none.

    Lenient (stored data, not a request): unknown entries are logged and skipped.
    """
    if not info or info.get("annotated") is None:
        return None
    raw = info["annotated"]
    items = raw if isinstance(raw, (list, tuple)) else _safe_split(raw)
    out: set[int] = set()
    for item in items:
        try:
            out.update(parse_rois([item], "annotated"))
        except Exception:  # noqa: BLE001 - stored info, keep what is usable
            logger.warning(f"label info lists an unknown ROI {item!r}; ignored")
    return sorted(out)


def _safe_split(raw: Any) -> list:
    if isinstance(raw, str):
        try:
            return _split_text(raw)
        except Exception:  # noqa: BLE001
            return []
    return [raw]


# ------------------------------------------------------------------------------------------
# Label files


def read_label_array(path: str):
    """``(array [X, Y, Z], affine 4x4)`` of a label file; raises ``ValueError`` with a reason."""
    from monai.transforms import LoadImage

    if not path or not os.path.exists(path):
        raise ValueError(f"label file {path!r} does not exist")
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        raise ValueError("the label file is empty")
    from cdpdnet.fileheaders import inspect_volume_file

    inspect_volume_file(path, "the label file")  # InvalidImageError (a ValueError) before any voxel is read
    try:
        img = LoadImage(image_only=True)(path)
    except Exception as e:  # noqa: BLE001 - any reader failure means "not an image"
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ValueError(f"the label file could not be read as an image ({msg[:200]})") from None
    arr = np.asarray(img)
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    affine = np.asarray(getattr(img, "affine", np.eye(4)), dtype=np.float64)
    return arr, affine


_VALUES_CACHE: dict[tuple, list[int]] = {}
_VALUES_LOCK = threading.Lock()


def label_values(path: str) -> list[int]:
    """ROI values (1..32) present in a label file (cached by path, size and mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _VALUES_LOCK:
        if key in _VALUES_CACHE:
            return list(_VALUES_CACHE[key])
    arr, _ = read_label_array(path)
    vals = np.unique(np.asarray(arr).round().astype(np.int64))
    out = [int(v) for v in vals if 1 <= v <= NUM_CLASSES]
    with _VALUES_LOCK:
        if len(_VALUES_CACHE) > 4096:
            _VALUES_CACHE.clear()
        _VALUES_CACHE[key] = out
    return list(out)


def final_label_annotation(datastore, image_id: str, tag: str = "final") -> dict | None:
    """``{"path", "annotated" (values), "from": "label_info" | "label_values", "info"}`` of an image's
    final label, or ``None`` when it has none."""
    try:
        path = datastore.get_label_uri(image_id, tag)
    except Exception:  # noqa: BLE001 - remote datastores raise on missing labels
        path = ""
    if not path or not os.path.exists(path):
        return None
    info = datastore.get_label_info(image_id, tag) or {}
    annotated = annotated_from_info(info)
    if annotated is not None:
        return {"path": path, "annotated": annotated, "from": "label_info", "info": info}
    try:
        vals = label_values(path)
    except ValueError as e:
        logger.warning(f"final label of {image_id} is unreadable ({e}); treated as annotating nothing")
        vals = []
    return {"path": path, "annotated": vals, "from": "label_values", "info": info}
