"""Partially labelled data: samples, datalists, partial-label transforms and uniform source sampling."""

from .datalist import DataList, LabelResolution, load_datalist, resolve_label_names
from .samples import PartialSample, annotated_values, annotated_vector, split_by_source
from .transforms import (
    SOURCE_SAMPLING,
    PartialLabelToChannelsd,
    RemapLabelValuesd,
    UniformSourceDataset,
    label_to_channels,
    lesion_host_table,
    rarest_roi_weights,
    roi_source_counts,
    source_rois,
)

__all__ = [
    "PartialSample",
    "annotated_vector",
    "annotated_values",
    "split_by_source",
    "DataList",
    "LabelResolution",
    "load_datalist",
    "resolve_label_names",
    "RemapLabelValuesd",
    "PartialLabelToChannelsd",
    "UniformSourceDataset",
    "SOURCE_SAMPLING",
    "rarest_roi_weights",
    "roi_source_counts",
    "source_rois",
    "label_to_channels",
    "lesion_host_table",
]
