"""Load partially labelled datalists: our dataset.json, a plain MSD dataset.json, or a folder layout.

Three inputs are understood by :func:`load_datalist`:

(a) our MSD-style ``dataset.json``::

        {"labels": {"0": "background", "1": "spleen", ...},          # file value -> name (optional)
         "sources": {"01": ["spleen", "kidney_right", ...], ...},    # optional
         "training": [{"image": "...", "label": "...", "source": "01",
                       "annotated": ["liver", "liver_tumor"]}, ...],  # source/annotated optional
         "validation": [...], "test": [...]}

    A case's annotated set is its own ``annotated`` list, else its source's entry in ``sources``,
    else every ROI that ``labels`` maps. Without ``labels`` the files must hold ROI values.

(b) a plain Medical Segmentation Decathlon ``dataset.json`` (``Task03_Liver`` ...): the label
    names are mapped with :func:`cdpdnet.taxonomy.map_label_names`; MSD's generic lesion names
    ("cancer", "Tumour", "colon cancer primaries") and bare organ words ("Vessel") are resolved
    from the dataset's other labels, its ``name``, folder name and ``description``; every mapped ROI
    is annotated. Names that stay unmapped are listed in :meth:`DataList.report`; their voxels
    become 0 (they are simply not annotated ROIs, see :class:`cdpdnet.data.transforms.RemapLabelValuesd`).

(c) a folder ``images/`` + ``labels/`` (or ``imagesTr/labelsTr``, ``imagesTs[/labelsTs]``) matched
    by file-name stem (nnU-Net's ``_0000`` channel suffix is ignored), with the label names from
    ``labels.json`` (``{value: name}`` or ``{"labels": {...}}``) or the ``label_names`` argument.

Relative paths are resolved against the json's folder (or ``base_dir``).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdpdnet.taxonomy import (
    NUM_CLASSES,
    ROIS,
    ROI,
    UnknownROIError,
    roi_keys,
    map_label_names,
    normalise_name,
    roi,
)

from .samples import PartialSample, _stem

__all__ = ["DataList", "load_datalist", "resolve_label_names", "LabelResolution"]

SPLITS = ("training", "validation", "test")
IMAGE_EXTS = (".nii.gz", ".nii", ".mha", ".mhd", ".nrrd", ".h5")

# Words that only say "a lesion" without saying where.
LESION_WORDS = {
    "cancer", "cancers", "tumor", "tumors", "lesion", "lesions", "mass", "masses", "nodule", "nodules",
    "metastasis", "metastases", "carcinoma", "carcinomas", "neoplasm", "neoplasms", "malignancy", "tumorous",
}
# Words that carry no anatomical meaning in a label / dataset name.
FILLER_WORDS = {
    "primaries", "primary", "secondary", "the", "of", "and", "with", "in", "segmentation", "ct", "mri", "task",
    "label", "labels", "region", "regions", "dataset", "data", "volume", "volumes", "msd", "decathlon", "a", "an",
    "structure", "structures", "target", "targets",
}
SIDE_WORDS = {"right", "left", "r", "l", "rt", "lt"}


def _singular(w: str) -> str:
    if w.endswith("ies") and len(w) > 4:
        return w[:-3] + "y"
    if w.endswith("s") and len(w) > 3 and not w.endswith(("ss", "us", "as", "is")):
        return w[:-1]
    return w


def _words(text: str) -> set[str]:
    """Normalised, singularised words; CamelCase is split (``HepaticVessel`` -> hepatic, vessel)."""
    text = re.sub(r"(?<=[a-z])(?=[A-Z])", " ", str(text))
    out = set()
    for w in normalise_name(text).split():
        if re.fullmatch(r"task\d*|\d+", w):
            continue
        out.add(_singular(w))
    return out


_ROI_KEY_WORDS: dict[int, list[frozenset[str]]] = {
    r.index: [frozenset(_singular(w) for w in k.split()) - SIDE_WORDS for k in roi_keys(r)] for r in ROIS
}


def _organs_named_by(words: set[str], required: set[str] | None = None) -> list[ROI]:
    """Organ ROIs having a name/synonym whose words (sides ignored) are all in ``words``
    (and, if given, that contains all of ``required``). Keeps only the most specific matches."""
    best: dict[int, int] = {}
    for r in ROIS:
        if r.kind != "organ":
            continue
        for kw in _ROI_KEY_WORDS[r.index]:
            if kw and kw <= words and (required is None or required <= kw):
                best[r.index] = max(best.get(r.index, 0), len(kw))
    if not best:
        return []
    top = max(best.values())
    return [ROIS[i - 1] for i, n in best.items() if n == top]


def _lesion_of(organs: Sequence[ROI], kind: str = "tumor") -> ROI | None:
    """The unique lesion ROI of ``kind`` named after, else hosted by, one of ``organs``."""
    if not organs:
        return None
    names = {o.name for o in organs}
    by_name = [r for r in ROIS if r.kind == kind and any(r.name == f"{n}_{kind}" for n in names)]
    if len(by_name) == 1:
        return by_name[0]
    if len(by_name) > 1:
        return None
    by_host = [r for r in ROIS if r.kind == kind and names & set(r.hosts)]
    return by_host[0] if len(by_host) == 1 else None


@dataclass
class LabelResolution:
    """File value -> ROI value, with how each was found and what stayed unmapped."""

    mapping: dict[int, int]
    how: dict[int, str]
    unmapped: dict[int, str]
    notes: list[str] = field(default_factory=list)

    def label_values(self) -> dict[int, int] | None:
        """``None`` when the file values already are ROI values, else the value map."""
        identity = all(k == v for k, v in self.mapping.items())
        clash = any(1 <= k <= NUM_CLASSES for k in self.unmapped)
        return None if identity and not clash else dict(self.mapping)


def resolve_label_names(
    names: Mapping[int | str, str],
    context: Sequence[str] = (),
    embed: Callable[[Sequence[str]], Any] | None = None,
    min_similarity: float = 0.80,
) -> LabelResolution:
    """Map ``{file value: name}`` onto ROI values.

    1. exact names and synonyms (:func:`map_label_names` without ``embed``);
    2. bare organ words ("Vessel") completed from the ``context`` texts (dataset name, folder,
       description: "HepaticVessel" -> hepatic_vessel), organs only, and only when unique;
    3. lesion names: an organ in the name itself ("colon cancer primaries" -> colon_tumor), else a
       generic lesion word ("cancer", "Tumour") resolved against the organs mapped in this label set
       (liver + cancer -> liver_tumor; hepatic vessel + tumour -> hepatic_vessel_tumor), else
       against the context texts ("Lung" + cancer -> lung_tumor), first unique answer wins;
    4. what is left, by text similarity when ``embed`` is given.
    """
    clean: dict[int, str] = {}
    for k, v in names.items():
        if int(k) != 0:
            clean[int(k)] = str(v)
    first = map_label_names(clean)
    mapping, how = dict(first.mapping), dict(first.how)
    left = dict(first.unmapped)
    notes: list[str] = []
    ctx_words = [w for w in (_words(c) - FILLER_WORDS - LESION_WORDS for c in context if c) if w]

    # 2. bare organ words
    for v, name in list(left.items()):
        w = _words(name) - FILLER_WORDS
        if not w or w & LESION_WORDS:
            continue
        found = None
        for cw in [set()] + ctx_words:
            cands = _organs_named_by(w | cw, required=w)
            if len(cands) == 1:
                found = (cands[0], " ".join(sorted(cw)) or "own words")
                break
            if len(cands) > 1 and not cw:
                notes.append(f"{v} {name!r} is ambiguous ({', '.join(c.name for c in cands)})"
                             + ("; split left/right first" if all(c.side for c in cands) else ""))
        if found:
            mapping[v], how[v] = found[0].index, f"context {found[1]!r}"
            del left[v]

    # 3. lesion names
    mapped_organs = [ROIS[r - 1] for r in sorted(set(mapping.values())) if ROIS[r - 1].kind == "organ"]
    for v, name in list(left.items()):
        w = _words(name) - FILLER_WORDS
        if not w & LESION_WORDS:
            continue
        own = w - LESION_WORDS
        found = None
        if own:
            les = _lesion_of(_organs_named_by(own))
            if les is not None:
                found = (les, "organ in name")
        else:
            les = _lesion_of(mapped_organs)
            if les is not None:
                found = (les, f"with {', '.join(o.name for o in mapped_organs)}")
            else:
                for cw in ctx_words:
                    les = _lesion_of(_organs_named_by(cw))
                    if les is not None:
                        found = (les, f"context {' '.join(sorted(cw))!r}")
                        break
        if found:
            mapping[v], how[v] = found[0].index, f"lesion {found[1]}"
            del left[v]

    # 4. text similarity
    if left and embed is not None:
        second = map_label_names(left, embed=embed, min_similarity=min_similarity)
        mapping.update(second.mapping)
        how.update(second.how)
        left = dict(second.unmapped)
    return LabelResolution(mapping, how, left, notes)


@dataclass
class DataList:
    training: list[PartialSample] = field(default_factory=list)
    validation: list[PartialSample] = field(default_factory=list)
    test: list[PartialSample] = field(default_factory=list)
    sources: dict[str, tuple[int, ...]] = field(default_factory=dict)
    unmapped: dict[int, str] = field(default_factory=dict)
    mapping: dict[int, int] = field(default_factory=dict)
    how: dict[int, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    origin: str = ""

    def __getitem__(self, split: str) -> list[PartialSample]:
        if split not in SPLITS:
            raise KeyError(split)
        return getattr(self, split)

    def all(self) -> list[PartialSample]:
        return [*self.training, *self.validation, *self.test]

    def report(self) -> str:
        lines = [f"datalist {self.origin}: {len(self.training)} training, {len(self.validation)} validation, "
                 f"{len(self.test)} test"]
        if self.mapping:
            lines.append("label values:")
            for v in sorted(self.mapping):
                r = self.mapping[v]
                lines.append(f"  {v} -> {r} {ROIS[r - 1].name} ({self.how.get(v, '')})")
        for v, n in sorted(self.unmapped.items()):
            lines.append(f"  {v} {n!r}: NOT MAPPED, its voxels are not an annotated ROI (set to 0)")
        lines.append("sources:")
        for s, rois in self.sources.items():
            n = sum(x.source == s for x in self.all())
            lines.append(f"  {s} ({n} cases): {', '.join(ROIS[r - 1].name for r in rois)}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------


def _read_label_names(obj: Mapping | str | os.PathLike | None) -> dict[int, str] | None:
    if obj is None:
        return None
    if not isinstance(obj, Mapping):
        with open(obj) as f:
            obj = json.load(f)
    if "labels" in obj and isinstance(obj["labels"], Mapping):
        obj = obj["labels"]
    out: dict[int, str] = {}
    for k, v in obj.items():
        if isinstance(v, (int, float)) and not str(k).strip().lstrip("-").isdigit():  # nnU-Net v2: {name: value}
            k, v = v, k
        if not isinstance(v, str):
            raise ValueError(f"label map entry {k!r}: {v!r} is not a name (region labels are not supported)")
        out[int(k)] = v
    return out


def _resolve_rois(names: Sequence, where: str, errors: list[str]) -> tuple[int, ...]:
    out = []
    for n in names:
        try:
            out.append(roi(int(n) if isinstance(n, (int, float)) and not isinstance(n, bool) else str(n)).index)
        except UnknownROIError as e:
            close = f" (closest: {', '.join(e.suggestions)})" if e.suggestions else ""
            errors.append(f"{n!r} in {where}{close}")
    return tuple(sorted(set(out)))


def _raise_unknown(errors: list[str]) -> None:
    if errors:
        uniq = list(dict.fromkeys(errors))
        shown = "; ".join(uniq[:10]) + (f"; ... {len(uniq) - 10} more" if len(uniq) > 10 else "")
        raise ValueError(f"unknown ROI name(s): {shown}")


def _abspath(p: str | None, root: Path) -> str | None:
    if p is None:
        return None
    q = Path(os.path.expanduser(str(p)))
    return os.path.normpath(str(q if q.is_absolute() else (root / q).absolute()))


def _context_of(data: Mapping, folder: Path) -> list[str]:
    return [str(data.get("name", "")), re.sub(r"^Task\d+_?", "", folder.name), str(data.get("description", ""))]


def load_datalist(
    path_or_dir: str | os.PathLike,
    base_dir: str | os.PathLike | None = None,
    embed: Callable[[Sequence[str]], Any] | None = None,
    *,
    label_names: Mapping[int | str, str] | str | os.PathLike | None = None,
    source: str | None = None,
    check_files: bool = True,
    min_similarity: float = 0.80,
) -> DataList:
    """Load a datalist (see the module docstring for the three formats).

    ``label_names`` overrides the json's ``labels`` (and is needed for a folder without
    ``labels.json``); ``source`` overrides the default source name (json ``source``/folder name);
    ``embed`` maps names that are not synonyms by text similarity (see :func:`map_label_names`).
    Raises ``ValueError`` for unknown ROI names in ``annotated``/``sources`` and
    ``FileNotFoundError`` for missing files (``check_files``).
    """
    p = Path(path_or_dir).expanduser()
    if p.is_dir():
        js = p / "dataset.json"
        if js.is_file():
            with open(js) as f:
                data = json.load(f)
            if not any(k in data for k in SPLITS):  # e.g. nnU-Net v2: labels only, scan the folders
                names = _read_label_names(label_names) or _read_label_names(data.get("labels"))
                return _load_folder(p, names, embed, source, check_files, min_similarity, _context_of(data, p))
            return _load_json(js, data, base_dir, embed, label_names, source, check_files, min_similarity)
        names = _read_label_names(label_names)
        if names is None and (p / "labels.json").is_file():
            names = _read_label_names(p / "labels.json")
        return _load_folder(p, names, embed, source, check_files, min_similarity, [p.name])
    if p.is_file():
        with open(p) as f:
            data = json.load(f)
        return _load_json(p, data, base_dir, embed, label_names, source, check_files, min_similarity)
    raise FileNotFoundError(f"no datalist at {str(p)!r}")


def _finish(dl: DataList, declared: dict[str, tuple[int, ...]], check_files: bool) -> DataList:
    srcs: dict[str, set[int]] = {s: set(v) for s, v in declared.items()}
    for s in dl.all():
        if s.source not in declared:
            srcs.setdefault(s.source, set()).update(s.annotated)
    dl.sources = {s: tuple(sorted(v)) for s, v in srcs.items()}
    if check_files:
        missing = [f for s in dl.all() for f in (s.image, s.label) if f is not None and not os.path.exists(f)]
        if missing:
            more = f" ... and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise FileNotFoundError(f"{len(missing)} file(s) of {dl.origin} missing: {', '.join(missing[:5])}{more}")
    return dl


def _load_json(js: Path, data: Mapping, base_dir, embed, label_names, source, check_files, min_similarity) -> DataList:
    root = Path(base_dir).expanduser() if base_dir is not None else js.parent
    folder = js.parent
    names = _read_label_names(label_names) if label_names is not None else _read_label_names(data.get("labels"))
    errors: list[str] = []
    dl = DataList(origin=str(js))

    res = None
    if names is not None:
        res = resolve_label_names(names, _context_of(data, folder), embed, min_similarity)
        dl.mapping, dl.how, dl.unmapped, dl.notes = res.mapping, res.how, res.unmapped, list(res.notes)
    label_values = res.label_values() if res is not None else None
    mapped = tuple(sorted(set(res.mapping.values()))) if res is not None else None

    declared: dict[str, tuple[int, ...]] = {}
    for s, rois in (data.get("sources") or {}).items():
        declared[str(s)] = _resolve_rois(rois, f"sources[{s!r}]", errors)

    if source is None:
        source = data.get("source")
    if source is None:
        source = folder.name if re.match(r"^Task\d+", folder.name) else (data.get("name") or folder.name)
    source = str(source)

    for split in SPLITS:
        entries = data.get(split) or []
        out = dl[split]
        for i, e in enumerate(entries):
            if isinstance(e, str):
                e = {"image": e}
            if "image" not in e:
                raise ValueError(f"{js}: {split}[{i}] has no 'image'")
            src = str(e.get("source", source))
            if "annotated" in e:
                ann = _resolve_rois(e["annotated"], f"{split}[{i}] 'annotated'", errors)
            elif src in declared:
                ann = declared[src]
            elif mapped is not None:
                ann = mapped
            else:
                raise ValueError(f"{js}: {split}[{i}] has no 'annotated', its source {src!r} is not in 'sources' "
                                 "and there is no 'labels' map to take the annotated ROIs from")
            if mapped is not None and e.get("label") is not None:
                extra = sorted(set(ann) - set(mapped))
                if extra:
                    raise ValueError(
                        f"{js}: {split}[{i}] annotates {[ROIS[r - 1].name for r in extra]} but 'labels' gives "
                        "no label value for them (their channels would be all background)")
            out.append(PartialSample(
                image=_abspath(e["image"], root), label=_abspath(e.get("label"), root), annotated=ann,
                source=src, label_values=label_values, name=e.get("name")))
    _raise_unknown(errors)
    return _finish(dl, declared, check_files)


def _scan(d: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    if not d.is_dir():
        return out
    for f in sorted(d.iterdir()):
        if f.is_file() and f.name.lower().endswith(IMAGE_EXTS) and not f.name.startswith("."):
            out[_stem(f.name)] = f
    return out


def _load_folder(root: Path, names, embed, source, check_files, min_similarity, context) -> DataList:
    if names is None:
        raise ValueError(f"{root}: a folder layout needs a label-name map: labels.json ({{value: name}}) "
                         "or the label_names argument")
    res = resolve_label_names(names, context, embed, min_similarity)
    dl = DataList(origin=str(root), mapping=res.mapping, how=res.how, unmapped=res.unmapped, notes=list(res.notes))
    label_values = res.label_values()
    ann = tuple(sorted(set(res.mapping.values())))
    source = str(source or root.name)
    layouts = [("imagesTr", "labelsTr", "training"), ("images", "labels", "training"),
               ("imagesVal", "labelsVal", "validation"), ("imagesTs", "labelsTs", "test")]
    found = False
    for idir, ldir, split in layouts:
        images, labels = _scan(root / idir), _scan(root / ldir)
        if not images and not labels:
            continue
        found = True
        by_case: dict[str, Path] = {}
        for stem, f in images.items():
            case = re.sub(r"_\d{4}$", "", stem) if stem not in labels else stem
            if case in by_case:
                continue  # further channels of a multi-channel nnU-Net case: the first one is used
            by_case[case] = f
        orphans = sorted(set(labels) - set(by_case))
        if orphans:
            raise ValueError(f"{root / ldir}: label(s) without an image in {idir}: {', '.join(orphans[:5])}")
        unlabelled = []
        for case, f in by_case.items():
            lab = labels.get(case)
            if lab is None:
                unlabelled.append(case)
                dl.test.append(PartialSample(os.path.abspath(f), None, ann, source, label_values, name=case))
            else:
                dl[split].append(PartialSample(os.path.abspath(f), os.path.abspath(lab), ann, source, label_values,
                                               name=case))
        if unlabelled and split != "test":
            dl.notes.append(f"{len(unlabelled)} image(s) in {idir} have no label and were put in test: "
                            f"{', '.join(unlabelled[:5])}")
    if not found:
        raise ValueError(f"{root}: no dataset.json and no images/labels (or imagesTr/labelsTr) folders")
    return _finish(dl, {}, check_files)
