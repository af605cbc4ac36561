"""DICOM-SEG segment descriptions of the ROIs (lib/dicom_seg.py), without a PACS."""

from __future__ import annotations

import pytest

from cdpdnet.taxonomy import ROIS
from lib.dicom_seg import seg_label_info, segment_attribute


def test_entries_follow_the_values_present_in_ascending_order():
    info = seg_label_info([27, 6, 0, 6])
    assert [e["segmentAttribute"]["labelID"] for e in info] == [6, 27]
    assert [e["name"] for e in info] == ["liver", "liver_tumor"]
    assert seg_label_info([0]) == []


@pytest.mark.parametrize("r", ROIS, ids=lambda r: r.name)
def test_every_roi_has_snomed_codes_a_name_and_a_colour(r):
    a = segment_attribute(r.index)
    assert a["SegmentLabel"] == r.name and a["labelID"] == r.index
    for key in ("SegmentedPropertyCategoryCodeSequence", "SegmentedPropertyTypeCodeSequence"):
        code = a[key]
        assert code["CodingSchemeDesignator"] == "SCT" and code["CodeValue"].isdigit() and code["CodeMeaning"]
    assert len(a["recommendedDisplayRGBValue"]) == 3 and all(0 <= v <= 255 for v in a["recommendedDisplayRGBValue"])
    if r.is_lesion:  # tumours and the cyst: abnormal structure located in their host organ
        assert a["SegmentedPropertyCategoryCodeSequence"]["CodeValue"] == "49755003"
        assert "AnatomicRegionSequence" in a


def test_paired_organs_carry_laterality():
    right, left = segment_attribute("kidney_right"), segment_attribute("kidney_left")
    assert right["SegmentedPropertyTypeCodeSequence"] == left["SegmentedPropertyTypeCodeSequence"]
    assert right["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"] == "24028007"  # Right
    assert left["SegmentedPropertyTypeModifierCodeSequence"]["CodeValue"] == "7771000"  # Left
    assert "SegmentedPropertyTypeModifierCodeSequence" not in segment_attribute("liver")
