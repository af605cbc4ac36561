"""Infer tasks of the app, in process: /info, shapes and affines, prompts, points, fill-in, bad requests."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest
from conftest import infer, infer_label

from cdpdnet.taxonomy import NUM_CLASSES, ROIS, labels_dict


def _present(label) -> set[int]:
    return {int(v) for v in np.unique(label) if v}


def test_info_lists_both_tasks_and_32_labels(client):
    r = client.get("/info/")
    assert r.status_code == 200, r.text
    info = r.json()
    models = info["models"]
    assert models["cdpdnet"]["type"] == "segmentation"
    assert models["cdpdnet_prompt"]["type"] == "vista3d"
    for m in ("cdpdnet", "cdpdnet_prompt"):
        assert models[m]["labels"] == labels_dict()
        assert len(models[m]["labels"]) == NUM_CLASSES
        assert models[m]["model_version"].startswith("cdpdnet-v")
    assert info["labels"] == [r.name for r in ROIS]
    assert "cdpdnet" in info["trainers"]
    assert {"random", "first", "cdpdnet_uncertainty", "cdpdnet_missing_rois"} <= set(info["strategies"])
    assert "cdpdnet_uncertainty" in info["scoring"]
    assert info["cdpdnet"]["versions"][0] == "cdpdnet-v0001"
    assert info["cdpdnet"]["model_origin"] in ("pretrained", "trained")


def test_infer_returns_label_map_in_image_space(client, app_paths, tmp_path):
    label, affine, res = infer_label(client, "cdpdnet", "ph_unlabelled_a", {}, tmp_path)
    img = nib.load(str(app_paths["studies"] / "ph_unlabelled_a.nii.gz"))
    assert label.shape == img.shape
    assert label.dtype == np.uint8
    np.testing.assert_allclose(affine, img.affine, atol=1e-4)
    assert res["label_names"] == labels_dict()
    assert res["model_version"].startswith("cdpdnet-v")
    assert len(res["proposed_rois"]) == NUM_CLASSES
    assert set(res["present_rois"]) == {ROIS[v - 1].name for v in _present(label)}
    assert res["fill_in"]["active"] is False
    assert {"pre", "infer", "post", "write", "total"} <= set(res["latencies"])


def test_infer_nrrd_output_keeps_geometry(client, app_paths, tmp_path):
    from monai.transforms import LoadImage

    label, affine, _ = infer_label(client, "cdpdnet", "ph_unlabelled_a", {"result_extension": ".nrrd"}, tmp_path)
    ref = LoadImage(image_only=True)(str(app_paths["studies"] / "ph_unlabelled_a.nii.gz"))
    assert label.shape == tuple(ref.shape)
    np.testing.assert_allclose(affine, np.asarray(ref.affine), atol=1e-3)


def test_label_prompt_returns_only_those_rois(client, tmp_path):
    label, _, res = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_a",
                                {"label_prompt": [6, "spleen"], "fill_in": False}, tmp_path)
    assert res["requested_rois"] == ["spleen", "liver"]
    assert res["proposed_rois"] == ["spleen", "liver"]
    assert _present(label) <= {1, 6}
    assert res["prompt"]["label_prompt"] == ["spleen", "liver"]


def test_text_prompt_by_name_synonym_and_similarity(client, tmp_path):
    label, _, res = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_b",
                                {"text": "Left Kidney, IVC, hepatic organ"}, tmp_path)
    assert res["requested_rois"] == ["kidney_left", "liver", "inferior_vena_cava"]
    assert _present(label) <= {3, 6, 9}
    how = {t["text"]: t for t in res["prompt"]["text"]}
    assert how["Left Kidney"]["how"] == "name"
    assert how["hepatic organ"]["how"] == "text similarity" and how["hepatic organ"]["rois"] == ["liver"]
    # "prompt" is accepted as an alias; a generic word takes every ROI within the ambiguity margin
    _, _, res2 = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_b", {"prompt": "kidneys"}, tmp_path)
    assert set(res2["requested_rois"]) >= {"kidney_right", "kidney_left"}


def test_unknown_text_is_422_listing_closest_rois(client):
    r = infer(client, "cdpdnet_prompt", "ph_unlabelled_a", {"text": "banana"})
    assert r.status_code == 422, r.text
    detail = r.json()["detail"]
    assert "banana" in detail and "closest ROIs" in detail
    assert any(roi.name in detail for roi in ROIS)


@pytest.mark.parametrize("params,status,words", [
    ({"label_prompt": [99]}, 422, "not one of the 32 ROIs"),
    ({"label_prompt": ["livr"]}, 422, "liver"),
    ({"label_prompt": {"a": 1}}, 400, "label_prompt"),
    ({"points": [[1, 2]]}, 400, "[x, y, z]"),
    ({"points": [[1000, 2, 3]]}, 422, "outside the image"),
    ({"points": [[1, 2, 3]], "point_labels": [1, 0]}, 400, "point_labels"),
    ({"points": [[1, 2, 3]], "point_labels": [7]}, 400, "point_labels"),
    ({"text": 5}, 400, "text prompt"),
    ({"result_extension": ".png"}, 400, "result_extension"),
])
def test_bad_prompt_params_are_4xx(client, params, status, words):
    r = infer(client, "cdpdnet_prompt", "ph_unlabelled_a", params)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_unknown_image_and_model_are_404(client):
    r = infer(client, "cdpdnet", "no_such_image")
    assert r.status_code == 404 and "unknown image id" in r.json()["detail"]
    r = infer(client, "no_such_model", "ph_unlabelled_a")
    assert r.status_code == 404 and "unknown model" in r.json()["detail"]


def test_fill_in_keeps_existing_annotation_and_reports_proposals(client, app_paths, tmp_path):
    existing = np.asarray(nib.load(str(app_paths["studies"] / "labels" / "final" / "ph_liver.nii.gz")).dataobj)
    assert _present(existing) == {6, 27}
    label, _, res = infer_label(client, "cdpdnet", "ph_liver", {}, tmp_path)
    assert res["fill_in"]["active"] is True
    assert res["fill_in"]["annotated_rois"] == ["liver", "liver_tumor"]
    assert "liver" not in res["proposed_rois"] and "liver_tumor" not in res["proposed_rois"]
    assert len(res["proposed_rois"]) == NUM_CLASSES - 2
    keep = existing > 0
    np.testing.assert_array_equal(label[keep], existing[keep])  # never overwritten
    new = (existing == 0) & (label > 0)
    assert not np.isin(label[new], [6, 27]).any()  # annotated ROIs are not proposed elsewhere
    # the prompt task fills in too; fill_in=false gives the plain prediction
    _, _, res2 = infer_label(client, "cdpdnet_prompt", "ph_liver", {"label_prompt": ["liver", "spleen"]}, tmp_path)
    assert res2["proposed_rois"] == ["spleen"]
    _, _, res3 = infer_label(client, "cdpdnet", "ph_liver", {"fill_in": False}, tmp_path)
    assert res3["fill_in"]["active"] is False and "liver" in res3["proposed_rois"]


def _a_component_voxel(label: np.ndarray) -> tuple[int, tuple[int, int, int]]:
    from scipy import ndimage

    best = None
    for v in sorted(_present(label)):
        comp, n = ndimage.label(label == v, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(comp.ravel())[1:]
        k = int(sizes.argmax()) + 1
        if best is None or sizes[k - 1] > best[0]:
            idx = np.argwhere(comp == k)
            best = (int(sizes[k - 1]), v, tuple(int(c) for c in idx[len(idx) // 2]))
    assert best is not None, "the tiny model predicted nothing on the phantom"
    return best[1], best[2]


def _expected_after_click(full: np.ndarray, q, keep: bool) -> np.ndarray:
    from scipy import ndimage

    out = np.zeros_like(full)
    nb = tuple(slice(max(a - 1, 0), a + 2) for a in q)
    for w in _present(full):
        comp, n = ndimage.label(full == w, structure=np.ones((3, 3, 3)))
        hit = set(np.unique(comp[nb])) - {0}
        ids = hit if keep else set(range(1, n + 1)) - hit
        out[np.isin(comp, sorted(ids))] = w
    return out


def test_points_keep_and_drop_clicked_components(client, tmp_path):
    full, _, _ = infer_label(client, "cdpdnet", "ph_unlabelled_b", {}, tmp_path)
    v, q = _a_component_voxel(full)
    whole = {"point_margin_mm": 10000, "fill_in": False}  # the box is the whole image: same prediction as `full`

    fg, _, res = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_b",
                             {"points": [list(q)], "point_labels": [1], **whole}, tmp_path)
    assert fg[q] == v
    np.testing.assert_array_equal(fg, _expected_after_click(full, q, keep=True))
    assert res["points"]["components_kept"] >= 1

    bg, _, res = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_b",
                             {"points": [list(q)], "point_labels": [0], **whole}, tmp_path)
    assert bg[q] == 0
    np.testing.assert_array_equal(bg, _expected_after_click(full, q, keep=False))
    assert res["points"]["components_dropped"] >= 1

    # OHIF's deepgrow-style keys work too, and a component clicked both ways is kept
    both, _, _ = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_b",
                             {"foreground": [list(q)], "background": [list(q)], **whole}, tmp_path)
    np.testing.assert_array_equal(both, fg)


def test_points_limit_the_region(client, tmp_path):
    label, _, res = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_b",
                                {"points": [[27, 21, 37]], "point_labels": [0], "point_margin_mm": 30}, tmp_path)
    lo, hi = res["points"]["region"]["lo"], res["points"]["region"]["hi"]
    assert lo == [22, 16, 32] and hi == [33, 27, 43]  # 30 mm = 5 voxels at 6 mm on each side
    outside = np.ones(label.shape, bool)
    outside[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = False
    assert not label[outside].any()


def test_output_json_only(client):
    r = infer(client, "cdpdnet_prompt", "ph_unlabelled_a", {"label_prompt": [1]}, output="json")
    assert r.status_code == 200
    assert json.loads(r.content)["proposed_rois"] == ["spleen"]


def test_result_files_live_in_the_servers_own_folder(client, monkeypatch):
    """MONAI Label deletes a result file after sending it under its name; MONAILabelClient saves what it
    receives as ``<temp dir>/<that name>``. A result written in the temp dir itself made the server's
    clean-up delete the client's copy on the same machine (a flaky FileNotFoundError in CI)."""
    import os
    import tempfile

    import monailabel.endpoints.infer as endpoint

    removed = []
    real_remove = endpoint.remove_file
    monkeypatch.setattr(endpoint, "remove_file", lambda p: (removed.append(p), real_remove(p)))
    for output in ("all", "image"):
        r = infer(client, "cdpdnet", "ph_unlabelled_a", {}, output=output)
        assert r.status_code == 200, r.text
    assert len(removed) == 2
    shared = os.path.realpath(tempfile.gettempdir())
    for path in removed:
        folder = os.path.dirname(os.path.realpath(path))
        assert folder != shared and os.path.basename(folder).startswith("cdpdnet_results_"), path
        assert not os.path.exists(path)  # still cleaned up
        assert (os.stat(folder).st_mode & 0o777) == 0o700


def test_conf_subgrids_reaches_the_segmenter(client, monkeypatch, tmp_path):
    """``--conf subgrids N`` (the infer tasks' ``subgrids``) reads each volume on N half-voxel shifted
    grids instead of as the served model's preset says; a bad value is logged and the preset's kept."""
    import cdpdnet.inference as inference
    from lib.configs.cdpdnet import CDPDNet

    assert [CDPDNet._subgrids(v) for v in (None, "auto", "", "4", " 2 ", "8")] == [None, None, None, 4, 2, 8]
    assert CDPDNet._subgrids("3") is None and CDPDNet._subgrids("two") is None
    calls = []
    real = inference.sliding_window_inference
    monkeypatch.setattr(inference, "sliding_window_inference", lambda *a, **k: calls.append(1) or real(*a, **k))
    task = client.app_instance._infers["cdpdnet_prompt"]
    params = {"label_prompt": ["liver"], "fill_in": False}
    label_one, _, _ = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_a", params, tmp_path)
    assert len(calls) == 1  # the tiny preset: one grid, no mirrored pass
    monkeypatch.setattr(task, "segmenter_kwargs", {"subgrids": 4})
    calls.clear()
    label_four, _, res = infer_label(client, "cdpdnet_prompt", "ph_unlabelled_a", params, tmp_path)
    assert len(calls) == 4 and label_four.shape == label_one.shape
    assert res["proposed_rois"] == ["liver"]
