"""Partial-label transforms and the uniform-over-sources dataset (reference sections 2.4 and 4).

* :class:`RemapLabelValuesd`: a foreign label map -> ROI values (1..32), unmapped values -> 0.
* :class:`PartialLabelToChannelsd`: an ROI-valued label map ``[1,X,Y,Z]`` -> ``target`` ``uint8
  [32,X,Y,Z]`` (organ channels include their lesions) and ``annotated`` ``uint8 [32]``. This is the
  reference's offline ``post_label``, built on the fly; unannotated channels are 0 and flagged 0 in
  ``annotated`` (the reference stored 255 there; the loss reads the flag instead).
* :class:`UniformSourceDataset`: item ``i`` draws source ``i % n_sources``, then a random case.

Apply :class:`PartialLabelToChannelsd` on the whole volume, before any cropping, so that a lesion
always sees its host organ (the reference also builds ``post_label`` on whole volumes).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from monai.utils import convert_to_dst_type

from cdpdnet.taxonomy import NUM_CLASSES, ROI_BY_NAME, ROIS

from .samples import PartialSample, annotated_vector, split_by_source

__all__ = ["RemapLabelValuesd", "PartialLabelToChannelsd", "UniformSourceDataset", "lesion_host_table",
           "label_to_channels", "rarest_roi_weights", "roi_source_counts", "source_rois", "SOURCE_SAMPLING"]


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_int_labels(arr: np.ndarray) -> np.ndarray:
    """Label map as the smallest unsigned integer type (float maps from LoadImage are rounded)."""
    if arr.dtype.kind == "b":
        return arr.astype(np.uint8)
    if arr.dtype.kind == "f":
        arr = np.rint(arr)
    if arr.size == 0:
        return arr.astype(np.uint8)
    lo, hi = arr.min(), arr.max()
    if lo < 0:
        raise ValueError(f"label maps must not hold negative values (min {lo})")
    dtype = np.uint8 if hi < 256 else np.uint16 if hi < 65536 else np.uint32
    return arr.astype(dtype, copy=False)


def _lut_from(values: Mapping | Sequence | np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(values, Mapping):
        items = {int(k): int(v) for k, v in values.items()}
        lut = np.zeros(max(items, default=0) + 1, dtype=np.uint8)
        for k, v in items.items():
            if not 0 <= v <= 255 or k < 0:
                raise ValueError(f"bad label value map entry {k} -> {v}")
            lut[k] = v
        return lut
    return _to_numpy(values).astype(np.uint8).ravel()


class RemapLabelValuesd(MapTransform):
    """Map each sample's label values onto ROI values with a lookup table (no voxel loops).

    ``data[values_key]`` is ``{file value: ROI value}`` (or a lookup-table vector); values that are
    not in it become 0, i.e. "none of the annotated ROIs". A missing or ``None`` entry leaves the
    label untouched (the file already holds ROI values). The output is ``uint8`` (same container
    type and metadata as the input); ``values_key`` is removed when ``drop_values=True`` so that
    per-sample dicts never reach the collate function.
    """

    def __init__(self, keys: KeysCollection = "label", values_key: str = "label_values", drop_values: bool = True,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.values_key = values_key
        self.drop_values = drop_values

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        values = d.pop(self.values_key, None) if self.drop_values else d.get(self.values_key)
        if values is None:
            return d
        lut = _lut_from(values)
        for key in self.key_iterator(d):
            lab = _as_int_labels(_to_numpy(d[key]))
            if lab.size and int(lab.max()) >= lut.shape[0]:
                lut = np.concatenate([lut, np.zeros(int(lab.max()) + 1 - lut.shape[0], np.uint8)])
            out = np.take(lut, lab)
            d[key] = convert_to_dst_type(out, d[key], dtype=np.uint8)[0] if isinstance(d[key], torch.Tensor) else out
        return d


def lesion_host_table() -> dict[int, tuple[int, ...]]:
    """``{lesion ROI value: host organ ROI values}`` from ``taxonomy.ROI.hosts``."""
    return {r.index: tuple(ROI_BY_NAME[h].index for h in r.hosts) for r in ROIS if r.hosts}


def _bbox(mask: np.ndarray) -> tuple[slice, ...] | None:
    sl = []
    for ax in range(mask.ndim):
        other = tuple(i for i in range(mask.ndim) if i != ax)
        idx = np.flatnonzero(mask.any(axis=other))
        if idx.size == 0:
            return None
        sl.append(slice(int(idx[0]), int(idx[-1]) + 1))
    return tuple(sl)


def _union_box(a: tuple[slice, ...], b: tuple[slice, ...]) -> tuple[slice, ...]:
    return tuple(slice(min(x.start, y.start), max(x.stop, y.stop)) for x, y in zip(a, b))


def _nearest_host(lab: np.ndarray, lesion: np.ndarray, hosts: Sequence[int], sampling) -> np.ndarray:
    """For each lesion voxel (in ``lesion``'s order of ``np.nonzero``) the position in ``hosts`` of the
    host whose labelled voxels are nearest (ties go to the first host).

    Per host, the exact Euclidean distance transform of "not this host" is computed only in the
    bounding box of the lesions and that host's voxels: every host voxel lies in the box, so the
    distance found there is the global one.
    """
    from scipy.ndimage import distance_transform_edt

    lbox = _bbox(lesion)
    coords = np.nonzero(lesion)
    dists = []
    for h in hosts:
        hmask = lab == h
        hbox = _bbox(hmask)
        if hbox is None:
            dists.append(np.full(coords[0].shape, np.inf))
            continue
        box = _union_box(lbox, hbox)
        dt = distance_transform_edt(~hmask[box], sampling=sampling)
        local = tuple(c - s.start for c, s in zip(coords, box))
        dists.append(dt[local])
    return np.argmin(np.stack(dists), axis=0)


def label_to_channels(label: np.ndarray, annotated: np.ndarray, spacing: Sequence[float] | None = None,
                      include_lesions: bool = True) -> np.ndarray:
    """ROI-valued label map ``[X,Y,Z]`` (or ``[1,X,Y,Z]``) + ``uint8 [32]`` annotated flags -> ``uint8 [32,X,Y,Z]``.

    Channel ``c`` is ``label == c+1`` for annotated ROIs, 0 otherwise. With ``include_lesions``
    an annotated organ channel also takes the voxels of the lesions it hosts (``ROI.hosts``); for a
    lesion with several hosts (kidneys, lungs) each voxel goes to the annotated host whose labelled
    voxels are nearest (in mm when ``spacing`` is given). If no annotated host has voxels the lesion
    is added to no host channel; if only one has, it takes all the lesion voxels.
    """
    lab = _as_int_labels(np.asarray(label))
    if lab.ndim == 4:
        if lab.shape[0] != 1:
            raise ValueError(f"label must have one channel, got shape {lab.shape}")
        lab = lab[0]
    ann = annotated_vector(annotated).astype(bool)
    counts = np.bincount(lab.ravel(), minlength=NUM_CLASSES + 1) if lab.dtype.itemsize <= 2 else None
    present = (counts[1:NUM_CLASSES + 1] > 0) if counts is not None else np.isin(np.arange(1, NUM_CLASSES + 1), lab)
    out = np.zeros((NUM_CLASSES,) + lab.shape, dtype=np.uint8)
    for c in np.flatnonzero(ann & present):
        np.equal(lab, c + 1, out=out[c].view(bool))
    if not include_lesions:
        return out
    # group lesions by their (annotated, present) host set so that e.g. kidney tumour + cyst share one EDT
    groups: dict[tuple[int, ...], list[int]] = {}
    for les, hosts in lesion_host_table().items():
        if not present[les - 1]:
            continue
        hs = tuple(h for h in hosts if ann[h - 1])
        if hs:
            groups.setdefault(hs, []).append(les)
    for hosts, lesions in groups.items():
        lmask = np.isin(lab, lesions) if len(lesions) > 1 else lab == lesions[0]
        with_voxels = tuple(h for h in hosts if present[h - 1])
        if len(hosts) == 1:
            out[hosts[0] - 1] |= lmask
        elif len(with_voxels) == 1:
            out[with_voxels[0] - 1] |= lmask
        elif len(with_voxels) > 1:
            side = _nearest_host(lab, lmask, with_voxels, spacing)
            coords = np.nonzero(lmask)
            for j, h in enumerate(with_voxels):
                sel = side == j
                out[(np.full(int(sel.sum()), h - 1),) + tuple(c[sel] for c in coords)] = 1
    return out


class PartialLabelToChannelsd(MapTransform):
    """ROI-valued label ``[1,X,Y,Z]`` -> ``data[output_key]`` ``uint8 [32,X,Y,Z]`` and ``data[annotated_key]``
    ``uint8 [32]`` (1 = annotated). See :func:`label_to_channels` for the channel rule.

    ``data[annotated_key]`` may hold ROI values (``(6, 27)``) or a 0/1 vector of length 32. The
    target keeps the label's container type and metadata (a MetaTensor stays a MetaTensor, so
    later spatial transforms can list ``target`` in their keys); the voxel spacing for the
    left/right lesion split comes from the MetaTensor's affine unless ``spacing`` is given.
    """

    def __init__(self, label_key: str = "label", annotated_key: str = "annotated", output_key: str = "target",
                 include_lesions: bool = True, spacing: Sequence[float] | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(label_key, allow_missing_keys)
        self.label_key, self.annotated_key, self.output_key = label_key, annotated_key, output_key
        self.include_lesions = include_lesions
        self.spacing = spacing

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        if self.label_key not in d:
            if self.allow_missing_keys:
                return d
            raise KeyError(f"key {self.label_key!r} not found")
        if self.annotated_key not in d:
            raise KeyError(f"key {self.annotated_key!r} not found: the annotated ROIs of the sample are required")
        label = d[self.label_key]
        spacing = self.spacing
        if spacing is None and hasattr(label, "pixdim"):
            spacing = [float(s) for s in _to_numpy(label.pixdim)]
        ann = annotated_vector(d[self.annotated_key])
        out = label_to_channels(_to_numpy(label), ann, spacing, self.include_lesions)
        d[self.output_key] = convert_to_dst_type(out, label, dtype=np.uint8)[0] if isinstance(label, torch.Tensor) \
            else out
        d[self.annotated_key] = ann
        return d


SOURCE_SAMPLING = ("uniform", "rarest_roi")


def source_rois(samples: Iterable[PartialSample]) -> dict[str, set[int]]:
    """The ROI values (1..32) that each source annotates in any of its samples, by source."""
    return {s: {int(r) for c in v for r in c.annotated} for s, v in split_by_source(samples).items()}


def roi_source_counts(annotated: Mapping[str, Iterable[int]]) -> Counter:
    """How many sources annotate each ROI value, from ``{source: ROI values}`` (ROIs no source
    annotates are absent)."""
    return Counter(int(r) for v in annotated.values() for r in set(v))


def rarest_roi_weights(annotated: Mapping[str, Iterable[int]]) -> dict[str, float]:
    """Sampling weight of each source: 1 / (the number of sources that annotate its rarest ROI).

    ``annotated`` maps each source to the ROI values (1..32) it annotates. With the reference's uniform
    sampler an ROI that one of 16 sources annotates is annotated in 1 sample of 16, however many ROIs
    that source brings; weighted this way each source's rarest ROI is annotated about equally often
    (a source that shares its rarest ROI with k - 1 others gets 1 / k), and a source whose ROIs all
    have other sources too is drawn less often but still drawn. The 16 sampling keys of the reference
    (:func:`cdpdnet.taxonomy.sampling_keys`): the 10 keys with an ROI of their own get 1, the two
    liver-tumour keys 1/2 each, the other 4 keys 1/4 to 1/10, so each of the 17 single-key ROIs (and
    the liver tumour) is annotated in 1 sample of 11.6 instead of 16. Where every source has an ROI of
    its own (the benchmark's 5 phantom sources), all weights are 1: the uniform sampler. Weights, not
    probabilities.
    """
    rois = {s: {int(r) for r in v} for s, v in annotated.items()}
    counts = roi_source_counts(rois)
    empty = sorted(s for s, v in rois.items() if not v)
    if empty:
        raise ValueError(f"sources that annotate no ROI cannot be weighted by their rarest ROI: {empty}")
    return {s: 1.0 / min(counts[r] for r in v) for s, v in rois.items()}


class UniformSourceDataset(torch.utils.data.Dataset):
    """Uniform sampling over source datasets (reference ``UniformDataset``, section 4).

    Item ``i`` takes source ``i % n_sources`` (sources in order of first appearance, or ``sources``)
    and then a case of that source drawn uniformly from a generator seeded by ``(seed, epoch, i)``:
    reproducible, independent of worker scheduling, different each epoch. ``length`` defaults to
    the number of samples (one reference "epoch"). ``transform`` gets ``sample.to_dict()``; without
    it the dict is returned. The epoch lives in shared memory, so :meth:`set_epoch` also reaches
    persistent DataLoader workers (batches they prefetched before the call keep the old epoch).

    ``source_weights`` (``{source: weight > 0}``, the others 1; not in the reference) draws item ``i``'s
    source at random in proportion to the weights instead, from the same ``(seed, epoch, i)`` generator,
    so that a source whose ROIs are learned last can be sampled more often. ``sampling="rarest_roi"``
    (not in the reference; ``"uniform"`` by default) draws the sources in proportion to
    :func:`rarest_roi_weights` instead, times ``source_weights`` where both are given.
    """

    def __init__(self, samples: Sequence[PartialSample] | Mapping[str, Sequence[PartialSample]],
                 transform: Callable[[dict], Any] | None = None, length: int | None = None, seed: int = 0,
                 sources: Sequence[str] | None = None, source_weights: Mapping[str, float] | None = None,
                 sampling: str = "uniform") -> None:
        groups = dict(samples) if isinstance(samples, Mapping) else split_by_source(samples)
        if sources is not None:
            missing = [s for s in sources if s not in groups or not groups[s]]
            if missing:
                raise ValueError(f"sources without samples: {missing}")
            groups = {s: groups[s] for s in sources}
        self.groups = {s: list(v) for s, v in groups.items() if len(v)}
        if not self.groups:
            raise ValueError("UniformSourceDataset needs at least one sample")
        self.source_names = list(self.groups)
        if sampling not in SOURCE_SAMPLING:
            raise ValueError(f"source sampling must be one of {SOURCE_SAMPLING}, got {sampling!r}")
        w = np.ones(len(self.source_names))
        if sampling == "rarest_roi":
            rarest = rarest_roi_weights({s: {r for c in v for r in c.annotated} for s, v in self.groups.items()})
            w = np.array([rarest[s] for s in self.source_names])
        if source_weights:
            if not isinstance(source_weights, Mapping):
                raise ValueError(f"source_weights must be a mapping {{source name: weight > 0}}, got {source_weights!r}")
            unknown = sorted(set(source_weights) - set(self.source_names))
            if unknown:
                raise ValueError(f"source_weights names sources without samples: {unknown}; "
                                 f"the sources are {self.source_names}")
            for name, v in source_weights.items():
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not (np.isfinite(v) and v > 0):
                    raise ValueError(f"source_weights[{name!r}] must be a number > 0, got {v!r}")
            w = w * np.array([float(source_weights.get(s, 1.0)) for s in self.source_names])
        self.source_p = w / w.sum() if sampling != "uniform" or source_weights else None
        self.transform = transform
        self.length = int(length) if length is not None else sum(len(v) for v in self.groups.values())
        self.seed = int(seed)
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()

    @property
    def epoch(self) -> int:
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return self.length

    def pick(self, index: int) -> PartialSample:
        """The sample that item ``index`` of the current epoch uses."""
        if not 0 <= index < self.length:
            raise IndexError(index)
        rng = np.random.default_rng((self.seed, self.epoch, index))
        if self.source_p is None:
            src = self.source_names[index % len(self.source_names)]
        else:
            src = self.source_names[int(rng.choice(len(self.source_names), p=self.source_p))]
        cases = self.groups[src]
        return cases[int(rng.integers(len(cases)))]

    def __getitem__(self, index: int) -> Any:
        d = self.pick(int(index)).to_dict()
        return self.transform(d) if self.transform is not None else d
