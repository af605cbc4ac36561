"""A partially labelled training sample: image, label map and the set of ROIs annotated in it.

Every ROI that is not in ``annotated`` is UNKNOWN for that sample (not background): the loss
(:class:`cdpdnet.loss.PartialLabelLoss`) never reads its channel.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cdpdnet.taxonomy import NUM_CLASSES, ROIS

__all__ = ["PartialSample", "annotated_vector", "annotated_values", "split_by_source"]


def annotated_vector(annotated: Iterable[int] | np.ndarray | Any) -> np.ndarray:
    """ROI label values (1..32) or an already built 0/1 vector of length 32 -> ``uint8 [32]`` (1 = annotated).

    A 32-long sequence whose entries are all 0/1 is taken as a ready vector (an ROI-value tuple
    of length 32 would be ``1..32`` and is therefore unambiguous).
    """
    if hasattr(annotated, "detach"):  # torch tensor
        annotated = annotated.detach().cpu().numpy()
    arr = np.asarray(annotated if not isinstance(annotated, (set, frozenset)) else sorted(annotated))
    if arr.ndim == 1 and arr.shape[0] == NUM_CLASSES and (arr.dtype == bool or np.isin(arr, (0, 1)).all()):
        return arr.astype(np.uint8)
    vec = np.zeros(NUM_CLASSES, dtype=np.uint8)
    if arr.size:
        vals = arr.astype(np.int64).ravel()
        bad = vals[(vals < 1) | (vals > NUM_CLASSES)]
        if bad.size:
            raise ValueError(f"annotated ROI values must be in 1..{NUM_CLASSES}, got {sorted(set(bad.tolist()))}")
        vec[vals - 1] = 1
    return vec


def annotated_values(vector: Sequence[int] | np.ndarray) -> tuple[int, ...]:
    """Inverse of :func:`annotated_vector`: ``uint8 [32]`` -> sorted ROI label values."""
    return tuple(int(i) + 1 for i in np.flatnonzero(np.asarray(vector)))


@dataclass
class PartialSample:
    """One case of a partially labelled dataset.

    ``annotated``: ROI label values (1..32) annotated in this case; every other ROI is unknown.
    ``label_values``: map from the label file's values to ROI values (values not in the map become
    0 = "none of the annotated ROIs"); ``None`` when the file already holds ROI values.
    ``label`` is ``None`` for an unlabelled (test) image.
    """

    image: str
    label: str | None
    annotated: tuple[int, ...]
    source: str
    label_values: dict[int, int] | None = None
    name: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.annotated = tuple(sorted({int(v) for v in self.annotated}))
        annotated_vector(self.annotated)  # validates the range
        if self.label_values is not None:
            self.label_values = {int(k): int(v) for k, v in self.label_values.items()}
            bad = {k: v for k, v in self.label_values.items() if not 0 <= v <= NUM_CLASSES or k < 0}
            if bad:
                raise ValueError(f"label_values must map values >= 0 onto ROI values 0..{NUM_CLASSES}: {bad}")
        if self.name is None:
            self.name = _stem(self.label or self.image)

    @property
    def annotated_names(self) -> list[str]:
        return [ROIS[v - 1].name for v in self.annotated]

    def to_dict(self) -> dict[str, Any]:
        """MONAI-style dict: ``image``, ``label`` (omitted when ``None``), ``annotated`` (``uint8 [32]``),
        ``source``, ``name`` and ``label_values`` (omitted when ``None``; :class:`RemapLabelValuesd`
        consumes and drops it, so that collation never sees a per-sample dict), plus ``extra``."""
        d: dict[str, Any] = {"image": self.image}
        if self.label is not None:
            d["label"] = self.label
        d["annotated"] = annotated_vector(self.annotated)
        d["source"] = self.source
        d["name"] = self.name
        if self.label_values is not None:
            d["label_values"] = dict(self.label_values)
        d.update(self.extra)
        return d


def _stem(path: str) -> str:
    import os

    base = os.path.basename(str(path))
    for ext in (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".h5", ".npz", ".npy", ".gz"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return os.path.splitext(base)[0]


def split_by_source(samples: Iterable[PartialSample]) -> dict[str, list[PartialSample]]:
    """Group samples by ``source``, in order of first appearance."""
    out: dict[str, list[PartialSample]] = OrderedDict()
    for s in samples:
        out.setdefault(s.source, []).append(s)
    return dict(out)
