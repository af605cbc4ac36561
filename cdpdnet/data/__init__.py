"""Partially labelled data: samples, datalists, partial-label transforms and uniform source sampling."""

from .datalist import DataList, LabelResolution, load_datalist, resolve_label_names
from .samples import PartialSample, annotated_values, annotated_vector, split_by_source
from .transforms import (
    PartialLabelToChannelsd,
    RemapLabelValuesd,
    UniformSourceDataset,
    label_to_channels,
    lesion_host_table,
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
    "label_to_channels",
    "lesion_host_table",
]
