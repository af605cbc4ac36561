"""Next-sample strategies and the uncertainty scoring method that feeds them."""

from __future__ import annotations

from cdpdnet.taxonomy import NUM_CLASSES, ROIS


def _unlabelled(client) -> set[str]:
    return set(client.app_instance.datastore().get_unlabeled_images())


def _image_info(client, image: str) -> dict:
    r = client.get(f"/datastore/image/info?image={image}")
    assert r.status_code == 200, r.text
    return r.json()


def test_random_and_first_return_unlabelled_images(client):
    for strategy in ("random", "first"):
        r = client.post(f"/activelearning/{strategy}", json={})
        assert r.status_code == 200, r.text
        assert r.json()["id"] in _unlabelled(client)


def test_unknown_strategy_and_scoring_method_are_404(client):
    assert client.post("/activelearning/no_such_strategy", json={}).status_code == 404
    assert client.post("/scoring/no_such_method?run_sync=true", json={}).status_code == 404


def test_scoring_then_uncertainty_and_missing_roi_strategies(client):
    # before scoring: the strategies still answer, and say that there is no score yet
    r = client.post("/activelearning/cdpdnet_missing_rois", json={"labelled_only": True})
    assert r.status_code == 200, r.text

    r = client.post("/scoring/cdpdnet_uncertainty?run_sync=true", json={})
    assert r.status_code == 200, r.text
    res = r.json()
    assert res["scored"] and not res["failed"]
    version = res["model_version"]
    scores = {}
    for image in res["scored"]:
        sc = _image_info(client, image)["cdpdnet_uncertainty"]
        assert sc["model_version"] == version and 0.0 <= sc["score"] <= 1.0
        assert set(sc["rois"]) <= {r.name for r in ROIS}
        assert all(0.0 <= u <= 1.0 for u in sc["rois"].values())
        scores[image] = sc
    # scoring again with the same model skips everything (cheap to run after every next-sample)
    again = client.post("/scoring/cdpdnet_uncertainty?run_sync=true", json={}).json()
    assert again["scored"] == [] and again["skipped"] == len(res["scored"])

    # cdpdnet_uncertainty: the most uncertain unlabelled image
    r = client.post("/activelearning/cdpdnet_uncertainty", json={})
    assert r.status_code == 200, r.text
    pick = r.json()
    unlabelled = _unlabelled(client)
    assert pick["id"] in unlabelled and pick["scored"] is True
    assert pick["score"] == max(scores[i]["score"] for i in unlabelled if i in scores)

    # cdpdnet_missing_rois over partially labelled images: which ROIs to fill in
    r = client.post("/activelearning/cdpdnet_missing_rois", json={"labelled_only": True})
    assert r.status_code == 200, r.text
    pick = r.json()
    assert pick["id"] not in unlabelled and pick["labelled"] is True
    annotated = set(pick["annotated_rois"])
    assert annotated and not annotated & set(pick["missing_rois"])
    assert len(annotated) + len(pick["missing_rois"]) == NUM_CLASSES
    assert set(pick["fill_in_rois"]) <= set(pick["missing_rois"])
    per = scores[pick["id"]]["rois"]
    assert set(pick["fill_in_rois"]) == {n for n in pick["missing_rois"] if n in per}
    assert [per[n] for n in pick["fill_in_rois"]] == sorted((per[n] for n in pick["fill_in_rois"]), reverse=True)

    # over all images: an unlabelled image misses all 32 ROIs
    r = client.post("/activelearning/cdpdnet_missing_rois", json={})
    pick = r.json()
    assert pick["scored"] is True and pick["missing_rois"]
    if pick["id"] in unlabelled:
        assert len(pick["missing_rois"]) == NUM_CLASSES and pick["annotated_rois"] == []
