"""The 32 ROIs, the 11 datasets and the mapping of foreign label names."""

import pytest

from cdpdnet import taxonomy as tx


def test_rois_match_the_published_class_order():
    assert tx.NUM_CLASSES == 32
    assert [r.clip_name for r in tx.ROIS[:9]] == ["Spleen", "Right Kidney", "Left Kidney", "Gall Bladder",
                                                   "Esophagus", "Liver", "Stomach", "Arota", "Postcava"]
    assert tx.ROIS[24].clip_name == "Celiac Truck" and tx.ROIS[24].name == "celiac_trunk"
    assert [r.index for r in tx.ROIS if r.is_lesion] == list(range(26, 33))
    assert len(set(tx.labels_dict())) == 32 and tx.labels_dict()["liver"] == 6


def test_lesion_hosts_and_pairs_are_consistent():
    for r in tx.ROIS:
        for h in r.hosts:
            assert tx.roi(h).kind == "organ"
        if r.pair:
            assert tx.roi(r.pair).pair == r.name and tx.roi(r.pair).side != r.side


def test_datasets_and_sampling_keys():
    assert len(tx.DATASETS) == 11
    keys = tx.sampling_keys()
    assert len(keys) == 16 and keys["10_08"] == (15, 29) and keys["04"] == (6, 27)
    assert sorted(d.task_id for d in tx.DATASETS) == list(range(11))
    covered = {v for rois in keys.values() for v in rois}
    assert covered == set(range(1, 33))


@pytest.mark.parametrize("text,name", [
    ("IVC", "inferior_vena_cava"), ("postcava", "inferior_vena_cava"), ("Gall bladder", "gallbladder"),
    ("small bowel", "small_bowel"), ("intestine", "small_bowel"), ("Kidney_Right", "kidney_right"),
    ("right kidney", "kidney_right"), ("liver tumour", "liver_tumor"), ("Oesophagus", "esophagus"),
    ("Arota", "aorta"), ("celiac truck", "celiac_trunk"),
])
def test_synonyms(text, name):
    assert tx.roi(text).name == name


def test_unknown_name_lists_closest():
    with pytest.raises(tx.UnknownROIError) as e:
        tx.roi("spleeen")
    assert e.value.suggestions[0] == "spleen" and "closest" in str(e.value)
    with pytest.raises(tx.UnknownROIError):
        tx.roi(33)


def test_map_label_names_by_synonym_and_reports_the_rest():
    m = tx.map_label_names({0: "background", 1: "Liver", 2: "IVC", 3: "vertebrae_L1", 4: "kidney_left"})
    assert m.mapping == {1: 6, 2: 9, 4: 3}
    assert m.unmapped == {3: "vertebrae_L1"}
    assert "not mapped" in m.report()


def test_map_label_names_by_text_similarity():
    from cdpdnet.text import build_text_encoder

    enc = build_text_encoder("minilm")
    m = tx.map_label_names({1: "hepatic tumour mass", 2: "toaster"}, embed=enc.encode, min_similarity=0.6)
    assert m.mapping.get(1) == tx.roi_index("liver_tumor"), m.report()
    assert 2 in m.unmapped
