"""DICOM-SEG segment descriptions of the 32 ROIs, in the form MONAI Label's DICOM-SEG writer takes.

MONAI Label's DICOMweb datastore turns a saved label map into DICOM-SEG with dcmqi
(``nifti_to_dicom_seg``): entry ``i`` of ``label_info`` describes the ``i``-th non-zero value present
in the map, and its ``segmentAttribute`` is dcmqi's JSON. Without it every segment is "unknown" with
one fixed code. Here each ROI gets:

* ``SegmentLabel``: its canonical name (what :func:`cdpdnet.taxonomy.labels_dict` and ``/info`` list);
* SNOMED CT codes from DICOM part 16 (read from pydicom's table of DICOM codes, not typed in):
  organs are category *Anatomical Structure* with the organ as type and *Right*/*Left* as type
  modifier for paired organs; tumours are *Morphologically Abnormal Structure* / *Neoplasm* and the
  cyst *Cyst*, with their host organ as anatomic region;
* a display colour (the 3D Slicer / TotalSegmentator generic anatomy colours where MONAI Label has
  one for the name, else a fixed colour per ROI).
"""

from __future__ import annotations

from collections.abc import Iterable

from cdpdnet.taxonomy import ROIS, roi

__all__ = ["segment_attribute", "seg_label_info", "TYPE_CODES"]

# ROI -> (type concept keyword in pydicom's SCT table, laterality or None, anatomic region keyword or None)
TYPE_CODES: dict[str, tuple[str, str | None, str | None]] = {
    "spleen": ("Spleen", None, None),
    "kidney_right": ("Kidney", "Right", None),
    "kidney_left": ("Kidney", "Left", None),
    "gallbladder": ("Gallbladder", None, None),
    "esophagus": ("Esophagus", None, None),
    "liver": ("Liver", None, None),
    "stomach": ("Stomach", None, None),
    "aorta": ("Aorta", None, None),
    "inferior_vena_cava": ("InferiorVenaCava", None, None),
    "portal_vein_and_splenic_vein": ("PortalVein", None, None),  # one segment for both veins
    "pancreas": ("Pancreas", None, None),
    "adrenal_gland_right": ("AdrenalGland", "Right", None),
    "adrenal_gland_left": ("AdrenalGland", "Left", None),
    "duodenum": ("Duodenum", None, None),
    "hepatic_vessel": ("BloodVessel", None, "Liver"),
    "lung_right": ("Lung", "Right", None),
    "lung_left": ("Lung", "Left", None),
    "colon": ("Colon", None, None),
    "small_bowel": ("SmallIntestine", None, None),
    "rectum": ("Rectum", None, None),
    "urinary_bladder": ("UrinaryBladderStructure", None, None),
    "prostate": ("Prostate", None, None),
    "femur_head_left": ("HeadOfFemur", "Left", None),
    "femur_head_right": ("HeadOfFemur", "Right", None),
    "celiac_trunk": ("StructureOfCeliacArtery", None, None),
    "kidney_tumor": ("Neoplasm", None, "Kidney"),
    "liver_tumor": ("Neoplasm", None, "Liver"),
    "pancreas_tumor": ("Neoplasm", None, "Pancreas"),
    "hepatic_vessel_tumor": ("Neoplasm", None, "Liver"),
    "lung_tumor": ("Neoplasm", None, "Lung"),
    "colon_tumor": ("Neoplasm", None, "Colon"),
    "kidney_cyst": ("Cyst", None, "Kidney"),
}


def _code(keyword: str) -> dict[str, str]:
    from pydicom.sr.codedict import codes

    c = getattr(codes.SCT, keyword)
    return {"CodeValue": str(c.value), "CodingSchemeDesignator": "SCT", "CodeMeaning": str(c.meaning)}


def _color(name: str, index: int) -> list[int]:
    try:
        from monailabel.utils.others.generic import GENERIC_ANATOMY_COLORS  # noqa: PLC0415
    except ImportError:  # pragma: no cover - only without MONAI Label
        GENERIC_ANATOMY_COLORS = {}
    for key in (name, name.replace("_", " "), roi(name).display):
        if key in GENERIC_ANATOMY_COLORS:
            return [int(v) for v in GENERIC_ANATOMY_COLORS[key]][:3]
    # a fixed, well spread colour per ROI (golden-angle hues)
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((index * 0.381966) % 1.0, 0.65, 0.95)
    return [int(round(255 * v)) for v in (r, g, b)]


def segment_attribute(value: int | str, segment_number: int | None = None) -> dict:
    """dcmqi ``segmentAttributes`` entry for an ROI (label value or name)."""
    r = roi(value if isinstance(value, str) else int(value))
    type_kw, side, region = TYPE_CODES[r.name]
    abnormal = r.is_lesion
    attr = {
        "labelID": int(segment_number if segment_number is not None else r.index),
        "SegmentLabel": r.name,
        "SegmentDescription": r.display,
        "SegmentAlgorithmType": "AUTOMATIC",
        "SegmentAlgorithmName": "CDPDNet",
        "SegmentedPropertyCategoryCodeSequence": (_code("MorphologicallyAbnormalStructure") if abnormal else
                                                  {"CodeValue": "123037004", "CodingSchemeDesignator": "SCT",
                                                   "CodeMeaning": "Anatomical Structure"}),
        "SegmentedPropertyTypeCodeSequence": _code(type_kw),
        "recommendedDisplayRGBValue": _color(r.name, r.index),
    }
    if side:
        attr["SegmentedPropertyTypeModifierCodeSequence"] = _code(side)
    if region:
        attr["AnatomicRegionSequence"] = _code(region)
    return attr


def seg_label_info(values: Iterable[int], model_name: str = "CDPDNet") -> list[dict]:
    """``label_info`` for MONAI Label's ``nifti_to_dicom_seg``: one entry per non-zero value present, in
    ascending order (the order it pairs them in)."""
    out = []
    for v in sorted({int(x) for x in values if int(x) > 0}):
        attr = segment_attribute(v)
        out.append({"name": attr["SegmentLabel"], "description": attr["SegmentDescription"],
                    "color": attr["recommendedDisplayRGBValue"], "model_name": model_name,
                    "segmentAttribute": attr})
    return out


assert set(TYPE_CODES) == {r.name for r in ROIS}, "every ROI needs its DICOM codes"


def seg_to_label_map(seg, reference_image: str, out_path: str) -> list[int]:
    """A DICOM-SEG dataset -> a ``uint8`` label map of ROI values on ``reference_image``'s grid.

    Segment numbers are not ROI values (dcmqi numbers segments 1..N), so each segment is mapped by its
    ``SegmentLabel`` (canonical name, display name or synonym) to its ROI. Returns the ROI values of
    all segments, empty or not (a SEG lists what was annotated). Unknown segment names raise
    ``ValueError`` naming them.
    """
    import numpy as np
    import pydicom_seg
    import SimpleITK as sitk

    from cdpdnet.imageio import save_label_map

    to_roi, unknown = {}, []
    for s in seg.SegmentSequence:
        try:
            to_roi[int(s.SegmentNumber)] = roi(str(s.SegmentLabel)).index
        except KeyError:
            unknown.append(str(s.SegmentLabel))
    if unknown:
        raise ValueError(f"DICOM-SEG segments not among the 32 ROIs: {unknown}")
    result = pydicom_seg.MultiClassReader().read(seg)
    seg_img = result.image  # segment numbers, on the SEG's own frames
    lut = np.zeros(max(to_roi, default=0) + 1, dtype=np.uint8)
    for number, value in to_roi.items():
        lut[number] = value
    arr = sitk.GetArrayFromImage(seg_img)
    mapped = sitk.GetImageFromArray(lut[np.clip(arr, 0, len(lut) - 1)])
    mapped.CopyInformation(seg_img)
    ref = sitk.ReadImage(str(reference_image))
    on_ref = sitk.Resample(mapped, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    # the reference NIfTI (RAS affine, as MONAI writes it) -> numpy [X, Y, Z] with that affine
    import nibabel as nib

    ref_nii = nib.load(str(reference_image))
    data = sitk.GetArrayFromImage(on_ref).transpose(2, 1, 0)  # sitk is [z, y, x]
    save_label_map(data.astype(np.uint8), ref_nii.affine, out_path)
    return sorted(set(to_roi.values()))
