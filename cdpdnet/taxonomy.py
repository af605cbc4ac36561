"""The 32 regions of interest (ROIs) and the 11 source datasets of CDPDNet, as data.

Label value ``i`` (1..32) in every label map of this project is ROI ``ROIS[i-1]``; model output
channel ``c`` is label value ``c + 1``. The class order is the published one
(``utils/utils.py ORGAN_NAME`` of the reference code, see ``docs/reference-deviations.md``).

* ``ROI.name``  canonical machine name (MONAI Label / TotalSegmentator style, used in ``/info``
  labels so that OHIF and 3D Slicer can colour the segments);
* ``ROI.display`` human readable name, used in prompts and reports;
* ``ROI.clip_name`` the exact string of the original CLIP prompt, typos kept ("Arota",
  "Celiac Truck") so that the published CLIP embeddings stay reproducible;
* ``ROI.kind`` ``organ`` / ``tumor`` / ``cyst``; ``ROI.hosts`` the organ(s) a lesion lies in;
* ``ROI.side`` and ``ROI.pair`` for left/right structures.

``DATASETS`` lists the 11 published source datasets and their 16 sampling keys with the ROIs each
one annotates; :func:`map_label_names` maps a foreign dataset's label names onto the taxonomy.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

__all__ = [
    "ROI",
    "ROIS",
    "NUM_CLASSES",
    "ROI_BY_NAME",
    "roi",
    "roi_index",
    "labels_dict",
    "organ_prompt",
    "SourceDataset",
    "DATASETS",
    "DATASET_BY_KEY",
    "task_prompt",
    "normalise_name",
    "resolve_roi_name",
    "roi_keys",
    "NameMapping",
    "map_label_names",
    "UnknownROIError",
    "MAY_OVERLAP",
    "may_overlap",
]


@dataclass(frozen=True)
class ROI:
    index: int
    name: str
    display: str
    clip_name: str
    kind: str = "organ"
    hosts: tuple[str, ...] = ()
    side: str | None = None
    pair: str | None = None
    synonyms: tuple[str, ...] = ()

    @property
    def channel(self) -> int:
        return self.index - 1

    @property
    def is_lesion(self) -> bool:
        return self.kind in ("tumor", "cyst")


def _r(index, name, display, clip_name=None, **kw) -> ROI:
    return ROI(index, name, display, clip_name or display, **kw)


ROIS: tuple[ROI, ...] = (
    _r(1, "spleen", "Spleen", synonyms=("lien",)),
    _r(2, "kidney_right", "Right Kidney", side="right", pair="kidney_left",
       synonyms=("right kidney", "kidney r", "r kidney", "rkidney", "kidney rt")),
    _r(3, "kidney_left", "Left Kidney", side="left", pair="kidney_right",
       synonyms=("left kidney", "kidney l", "l kidney", "lkidney", "kidney lt")),
    _r(4, "gallbladder", "Gallbladder", "Gall Bladder", synonyms=("gall bladder", "gb", "cholecyst")),
    _r(5, "esophagus", "Esophagus", synonyms=("oesophagus", "gullet")),
    _r(6, "liver", "Liver", synonyms=("hepar", "hepatic parenchyma")),
    _r(7, "stomach", "Stomach", synonyms=("gaster", "ventriculus")),
    _r(8, "aorta", "Aorta", "Arota", synonyms=("abdominal aorta", "arota")),
    _r(9, "inferior_vena_cava", "Inferior Vena Cava", "Postcava",
       synonyms=("ivc", "postcava", "vena cava inferior", "inferior vena cava")),
    _r(10, "portal_vein_and_splenic_vein", "Portal Vein and Splenic Vein",
       synonyms=("portal vein", "splenic vein", "portal splenic vein", "psv", "portal and splenic vein",
                 "portal vein and splenic vein")),
    _r(11, "pancreas", "Pancreas"),
    _r(12, "adrenal_gland_right", "Right Adrenal Gland", side="right", pair="adrenal_gland_left",
       synonyms=("right adrenal gland", "right adrenal", "adrenal right", "r adrenal gland", "rag",
                 "suprarenal gland right", "right suprarenal gland")),
    _r(13, "adrenal_gland_left", "Left Adrenal Gland", side="left", pair="adrenal_gland_right",
       synonyms=("left adrenal gland", "left adrenal", "adrenal left", "l adrenal gland", "lag",
                 "suprarenal gland left", "left suprarenal gland")),
    _r(14, "duodenum", "Duodenum"),
    _r(15, "hepatic_vessel", "Hepatic Vessel", synonyms=("hepatic vessels", "liver vessels", "hepatic veins")),
    _r(16, "lung_right", "Right Lung", side="right", pair="lung_left", synonyms=("right lung", "lung r")),
    _r(17, "lung_left", "Left Lung", side="left", pair="lung_right", synonyms=("left lung", "lung l")),
    _r(18, "colon", "Colon", synonyms=("large bowel", "large intestine")),
    _r(19, "small_bowel", "Small Bowel", "Intestine",
       synonyms=("intestine", "small intestine", "bowel", "jejunum ileum", "ileum", "jejunum")),
    _r(20, "rectum", "Rectum"),
    _r(21, "urinary_bladder", "Urinary Bladder", "Bladder", synonyms=("bladder", "vesica urinaria")),
    _r(22, "prostate", "Prostate", synonyms=("prostate gland", "prostate uterus", "prostate/uterus")),
    _r(23, "femur_head_left", "Left Head of Femur", side="left", pair="femur_head_right",
       synonyms=("left femur head", "femoral head left", "left femoral head", "head of femur left",
                 "left head of femur")),
    _r(24, "femur_head_right", "Right Head of Femur", side="right", pair="femur_head_left",
       synonyms=("right femur head", "femoral head right", "right femoral head", "head of femur right",
                 "right head of femur")),
    _r(25, "celiac_trunk", "Celiac Trunk", "Celiac Truck", synonyms=("celiac truck", "coeliac trunk", "celiac artery")),
    _r(26, "kidney_tumor", "Kidney Tumor", kind="tumor", hosts=("kidney_right", "kidney_left"),
       synonyms=("kidney tumour", "renal tumor", "renal tumour", "kidney lesion", "renal mass", "tumor kidney")),
    _r(27, "liver_tumor", "Liver Tumor", kind="tumor", hosts=("liver",),
       synonyms=("liver tumour", "liver lesion", "hepatic tumor", "hepatic lesion", "liver cancer", "tumor liver")),
    _r(28, "pancreas_tumor", "Pancreas Tumor", kind="tumor", hosts=("pancreas",),
       synonyms=("pancreas tumour", "pancreatic tumor", "pancreatic tumour", "pancreatic lesion", "pancreas cancer",
                 "pancreatic mass")),
    _r(29, "hepatic_vessel_tumor", "Hepatic Vessel Tumor", kind="tumor", hosts=("liver",),
       synonyms=("hepatic vessel tumour", "liver vessel tumor")),
    _r(30, "lung_tumor", "Lung Tumor", kind="tumor", hosts=("lung_right", "lung_left"),
       synonyms=("lung tumour", "lung nodule", "lung lesion", "lung cancer", "pulmonary nodule", "lung mass")),
    _r(31, "colon_tumor", "Colon Tumor", kind="tumor", hosts=("colon",),
       synonyms=("colon tumour", "colon cancer", "colorectal tumor", "colon lesion")),
    _r(32, "kidney_cyst", "Kidney Cyst", kind="cyst", hosts=("kidney_right", "kidney_left"),
       synonyms=("renal cyst", "kidney cysts", "cyst kidney")),
)

NUM_CLASSES = len(ROIS)
ROI_BY_NAME: dict[str, ROI] = {r.name: r for r in ROIS}


class UnknownROIError(KeyError):
    """A name that is not one of the 32 ROIs (nor a synonym); ``suggestions`` lists the closest ones."""

    def __init__(self, name: str, suggestions: Sequence[str] = ()):
        self.name = name
        self.suggestions = list(suggestions)
        hint = f"; closest: {', '.join(self.suggestions)}" if self.suggestions else ""
        super().__init__(f"unknown ROI {name!r}{hint}")

    def __str__(self) -> str:  # KeyError quotes its message otherwise
        return self.args[0]


def roi(name_or_index: str | int) -> ROI:
    """Look an ROI up by label value, canonical name, display name or synonym."""
    if isinstance(name_or_index, int) or (isinstance(name_or_index, str) and name_or_index.strip().isdigit()):
        i = int(name_or_index)
        if not 1 <= i <= NUM_CLASSES:
            raise UnknownROIError(str(name_or_index))
        return ROIS[i - 1]
    found = resolve_roi_name(name_or_index)
    if found is None:
        raise UnknownROIError(name_or_index, _closest_by_spelling(name_or_index))
    return found


def roi_index(name_or_index: str | int) -> int:
    return roi(name_or_index).index


def labels_dict() -> dict[str, int]:
    """``{canonical name: label value}`` for all 32 ROIs (the MONAI Label ``labels`` field)."""
    return {r.name: r.index for r in ROIS}


def organ_prompt(r: ROI, template: str = "A computerized tomography of a {}", original_spelling: bool = True) -> str:
    """The text prompt of one ROI. The default reproduces the published CLIP prompt exactly."""
    return template.format(r.clip_name if original_spelling else r.display)


# ---------------------------------------------------------------------------------------------
# Which ROIs may share voxels across annotation conventions. A label map holds one value per voxel,
# but datasets draw borders differently: an organ label often includes the vessels inside it (BTCV's
# liver holds the intrahepatic portal and hepatic veins and the intrahepatic IVC), and adjoining
# tubes meet at conventions (oesophagus / stomach, colon / rectum). Besides these pairs, a lesion
# may overlap its host organs, the lesions that share a host, and what its host may overlap.
# Every other pair is exclusive: a voxel annotated as one is known not to be the other, which
# the partial-label loss can use (``train.exclusion_weight``, see cdpdnet/loss.py).
MAY_OVERLAP: tuple[tuple[str, str], ...] = (
    ("liver", "hepatic_vessel"),
    ("liver", "portal_vein_and_splenic_vein"),
    ("liver", "inferior_vena_cava"),
    ("hepatic_vessel", "portal_vein_and_splenic_vein"),
    ("hepatic_vessel", "inferior_vena_cava"),
    ("hepatic_vessel", "hepatic_vessel_tumor"),
    ("hepatic_vessel", "liver_tumor"),
    ("pancreas", "portal_vein_and_splenic_vein"),
    ("pancreas", "duodenum"),
    ("aorta", "celiac_trunk"),
    ("esophagus", "stomach"),
    ("stomach", "duodenum"),
    ("duodenum", "small_bowel"),
    ("small_bowel", "colon"),
    ("colon", "rectum"),
)
_OVERLAP_PAIRS = frozenset(frozenset(p) for p in MAY_OVERLAP)


def may_overlap(a: str | int, b: str | int) -> bool:
    """Whether two ROIs may share voxels under some dataset's conventions (see :data:`MAY_OVERLAP`).

    Symmetric; an ROI overlaps itself; a lesion overlaps its hosts, the lesions sharing a host and
    whatever its hosts overlap."""
    ra, rb = roi(a), roi(b)
    if ra.index == rb.index:
        return True

    def near(r: ROI) -> set[str]:  # the ROI and, for a lesion, its hosts
        return {r.name, *r.hosts}

    if ra.name in rb.hosts or rb.name in ra.hosts or (ra.is_lesion and rb.is_lesion and set(ra.hosts) & set(rb.hosts)):
        return True
    return any(frozenset((x, y)) in _OVERLAP_PAIRS for x in near(ra) for y in near(rb) if x != y)


# ---------------------------------------------------------------------------------------------
# Source datasets (reference section 2.2). ``task_id`` follows the reference's ``tasknames`` map;
# all six MSD sub-tasks share task 8.


@dataclass(frozen=True)
class SourceDataset:
    key: str
    name: str
    task_id: int
    rois: tuple[int, ...]
    sampling_keys: tuple[str, ...] = ()
    sub_rois: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    @property
    def roi_names(self) -> list[str]:
        return [ROIS[i - 1].name for i in self.rois]


DATASETS: tuple[SourceDataset, ...] = (
    SourceDataset("01", "BTCV (Multi-Atlas Labeling)", 0, tuple(range(1, 15)), ("01",),
                  {"01_2": (1, 3, 4, 5, 6, 7, 11, 14)}),
    SourceDataset("02", "TCIA Pancreas-CT", 1, (1, 3, 4, 5, 6, 7, 11, 14), ("02",)),
    SourceDataset("03", "CHAOS (CT)", 2, (6,), ("03",)),
    SourceDataset("04", "LiTS", 3, (6, 27), ("04",)),
    SourceDataset("05", "KiTS", 4, (2, 3, 26, 32), ("05",)),
    SourceDataset("07", "WORD", 5, (6, 1, 3, 2, 7, 4, 5, 11, 14, 18, 19, 12, 13, 20, 21, 23, 24), ("07",)),
    SourceDataset("08", "AbdomenCT-1K", 6, (6, 2, 3, 1, 11), ("08",)),
    SourceDataset("09", "AMOS (CT)", 7, (1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 21, 22), ("09",)),
    SourceDataset("10", "Medical Segmentation Decathlon", 8,
                  (6, 27, 30, 11, 28, 15, 29, 1, 31),
                  ("10_03", "10_06", "10_07", "10_08", "10_09", "10_10"),
                  {"10_03": (6, 27), "10_06": (30,), "10_07": (11, 28), "10_08": (15, 29), "10_09": (1,),
                   "10_10": (31,)}),
    SourceDataset("12", "CT-ORG", 9, (6, 21, 16, 17, 2, 3), ("12",)),
    SourceDataset("13", "AbdomenCT-12organ (FLARE)", 10, (6, 2, 3, 1, 11, 8, 9, 7, 4, 5, 12, 13, 25), ("13",)),
)
DATASET_BY_KEY: dict[str, SourceDataset] = {d.key: d for d in DATASETS}
NUM_TASKS = len(DATASETS)


def sampling_keys() -> dict[str, tuple[int, ...]]:
    """The 16 sampling keys of the published uniform sampler, each with the ROIs it annotates."""
    out: dict[str, tuple[int, ...]] = {}
    for d in DATASETS:
        for k in d.sampling_keys:
            out[k] = d.sub_rois.get(k, d.rois)
    return out


def task_prompt(rois: Iterable[int | str], original_spelling: bool = True) -> str:
    """Text prompt of a segmentation task, in the style of the reference's ``clip_embedding.py``.

    The verbatim published strings of the 11 datasets (which differ in spelling and order for 01, 09,
    10 and 13) are :data:`cdpdnet.text.PUBLISHED_TASK_PROMPTS`.
    """
    names = [organ_prompt(roi(r), "{}", original_spelling) for r in rois]
    return f"A task of segmenting {', '.join(names)} in computerized tomography"


# ---------------------------------------------------------------------------------------------
# Name resolution and mapping of foreign label names.


def normalise_name(text: str) -> str:
    """Lower case, separators to spaces, British spellings folded: ``"Kidney_Right"`` -> ``"kidney right"``."""
    t = text.strip().lower()
    t = re.sub(r"[_\-/.,()]+", " ", t)
    t = re.sub(r"\s+", " ", t).strip()
    t = t.replace("tumour", "tumor").replace("oesophagus", "esophagus").replace("coeliac", "celiac")
    return t


def roi_keys(r: ROI) -> set[str]:
    """All normalised names of an ROI (canonical, display, CLIP spelling, synonyms)."""
    keys = {r.name, r.display, r.clip_name, *r.synonyms}
    return {normalise_name(k) for k in keys}


_LOOKUP: dict[str, ROI] = {}
for _roi in ROIS:
    for _k in roi_keys(_roi):
        if _k in _LOOKUP and _LOOKUP[_k] is not _roi:
            raise RuntimeError(f"ambiguous ROI synonym {_k!r}")
        _LOOKUP[_k] = _roi
# word-order variants: "kidney right" == "right kidney"
for _k, _roi in list(_LOOKUP.items()):
    _LOOKUP.setdefault(" ".join(sorted(_k.split())), _roi)


def resolve_roi_name(text: str) -> ROI | None:
    """Exact or synonym match of a free-text name (case, separators and word order do not matter)."""
    t = normalise_name(text)
    return _LOOKUP.get(t) or _LOOKUP.get(" ".join(sorted(t.split())))


def _closest_by_spelling(text: str, n: int = 3) -> list[str]:
    import difflib

    t = normalise_name(text)
    scores = {}
    for k, r in _LOOKUP.items():
        s = difflib.SequenceMatcher(None, t, k).ratio()
        scores[r.name] = max(scores.get(r.name, 0.0), s)
    return [k for k, _ in sorted(scores.items(), key=lambda kv: -kv[1])[:n]]


@dataclass
class NameMapping:
    """Result of :func:`map_label_names`: foreign label value -> ROI label value."""

    mapping: dict[int, int]
    how: dict[int, str]
    unmapped: dict[int, str]
    scores: dict[int, float] = field(default_factory=dict)

    def report(self) -> str:
        lines = [f"  {v} -> {self.mapping[v]} {ROIS[self.mapping[v] - 1].name} ({self.how[v]})" for v in sorted(self.mapping)]
        lines += [f"  {v} {n!r}: not mapped" for v, n in sorted(self.unmapped.items())]
        return "\n".join(lines)


def map_label_names(
    names: Mapping[int, str],
    embed: Callable[[Sequence[str]], "object"] | None = None,
    min_similarity: float = 0.80,
) -> NameMapping:
    """Map a foreign dataset's ``{label value: name}`` onto the 32 ROIs.

    First by name and synonym (:func:`resolve_roi_name`), then, for what is left and when ``embed``
    is given (a function returning L2-normalised embeddings ``[N, D]`` for a list of texts, e.g.
    :meth:`cdpdnet.text.TextEncoder.encode`), by cosine similarity of the names to the ROI display
    names and synonyms, accepted above ``min_similarity``. Names that match nothing are reported
    in ``unmapped`` (e.g. vertebrae or ribs of a TotalSegmentator map). Two foreign values may map
    onto the same ROI (lung lobes onto a lung, say).
    """
    mapping: dict[int, int] = {}
    how: dict[int, str] = {}
    scores: dict[int, float] = {}
    left: dict[int, str] = {}
    for value, name in names.items():
        if int(value) == 0:
            continue
        r = resolve_roi_name(name)
        if r is not None:
            mapping[int(value)], how[int(value)] = r.index, "name"
        else:
            left[int(value)] = name
    if left and embed is not None:
        import numpy as np

        cand_text, cand_roi = [], []
        for r in ROIS:
            for k in sorted(roi_keys(r)):
                cand_text.append(k)
                cand_roi.append(r.index)
        values = list(left)
        q = np.asarray(embed([normalise_name(left[v]) for v in values]), dtype=np.float32)
        c = np.asarray(embed(cand_text), dtype=np.float32)
        sim = q @ c.T
        for i, v in enumerate(values):
            j = int(sim[i].argmax())
            if sim[i, j] >= min_similarity:
                mapping[v], how[v], scores[v] = cand_roi[j], f"text similarity {sim[i, j]:.2f} to {cand_text[j]!r}", float(sim[i, j])
                del left[v]
    return NameMapping(mapping, how, left, scores)
