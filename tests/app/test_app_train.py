"""Training: a background round publishes a new version that the next infer uses; train-while-training,
stop, bad params; and the model store's versioning on its own."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import infer

TIMEOUT = 240


def _wait_running(client, timeout=TIMEOUT):
    t = time.time()
    while time.time() - t < timeout:
        r = client.get("/train/?check_if_running=true")
        if r.status_code == 200 and r.json().get("status") == "RUNNING":
            return r.json()
        last = client.get("/train/").json()
        if last.get("status") in ("DONE", "ERROR", "STOPPED"):
            pytest.fail(f"training ended before it was seen running: {last}")
        time.sleep(0.2)
    pytest.fail("training did not start")


def _wait_done(client, timeout=TIMEOUT):
    t = time.time()
    while time.time() - t < timeout:
        r = client.get("/train/")
        if r.status_code == 200 and r.json().get("status") not in ("SUBMITTED", "RUNNING"):
            return r.json()
        time.sleep(0.5)
    pytest.fail("training did not finish")


def _info(client):
    return client.get("/info/").json()


def test_background_training_publishes_new_version_used_by_next_infer(client, app_paths):
    before = _info(client)["cdpdnet"]
    params = {"max_epochs": 2, "iterations_per_epoch": 1, "val_split": 0, "threads": 1}
    r = client.post("/train/cdpdnet", json=params)
    assert r.status_code == 200, r.text
    _wait_running(client)

    # train while training: MONAI Label refuses with 429 and a clear message
    r2 = client.post("/train/cdpdnet", json=params)
    assert r2.status_code == 429, r2.text
    assert "already running" in r2.json()["detail"].lower()

    # inference is not blocked by the training subprocess
    assert infer(client, "cdpdnet", "ph_unlabelled_a", output="json").status_code == 200

    task = _wait_done(client)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))

    after = _info(client)["cdpdnet"]
    assert len(after["versions"]) == len(before["versions"]) + 1
    new = after["versions"][-1]
    assert after["model_version"] == new and after["model_origin"] == "trained"
    model_dir = app_paths["model_dir"]
    for v in after["versions"]:  # previous versions are kept
        assert (model_dir / "versions" / f"{v}.pt").is_file()

    stats = _info(client)["train_stats"]["cdpdnet"]
    assert stats["total_epochs"] == 2 and stats["epoch"] == 2
    assert "total_time" in stats and isinstance(stats["best_metric"], float)
    assert stats["model_version"] == new and stats["status"] == "DONE"
    assert stats["base_version"] == before["model_version"]
    assert {"start_ts", "current_iteration", "total_iterations"} <= set(stats)
    assert stats["samples"]["train"] >= 2  # ph_liver and ph_kidneys at least (partial labels)

    model_info = client.get("/model/info/cdpdnet").json()
    assert model_info["checksum"] and model_info["train_stats"]["model_version"] == new

    # the next infer reloads the published model (no restart)
    res = json.loads(infer(client, "cdpdnet", "ph_unlabelled_a", output="json").content)
    assert res["model_version"] == new


def test_stop_training_leaves_the_served_model_intact(client, app_paths):
    published = app_paths["model_dir"] / "cdpdnet.pt"
    before_bytes = published.read_bytes()
    before = _info(client)["cdpdnet"]
    r = client.post("/train/cdpdnet", json={"max_epochs": 100000, "iterations_per_epoch": 1, "val_split": 0,
                                            "threads": 1})
    assert r.status_code == 200, r.text
    t0 = time.time()
    _wait_running(client)
    while time.time() - t0 < TIMEOUT:  # wait until the trainer is in its epoch loop
        stats = _info(client)["train_stats"]["cdpdnet"]
        if stats.get("status") == "RUNNING" and stats.get("start_ts", 0) >= int(t0) and stats.get("epoch", 0) >= 1:
            break
        time.sleep(0.3)
    else:
        pytest.fail("training never reached its first epoch")
    r = client.delete("/train/")
    assert r.status_code == 200 and r.json()["status"] == "STOPPED"
    assert client.get("/train/").json()["status"] == "STOPPED"
    assert published.read_bytes() == before_bytes
    assert _info(client)["cdpdnet"]["versions"] == before["versions"]
    time.sleep(0.5)
    assert _info(client)["train_stats"]["cdpdnet"]["status"] == "STOPPED"  # Slicer's progress bar ends


def test_sync_train_refused_while_another_holds_the_lock(client, app_paths):
    lock = app_paths["model_dir"] / "cdpdnet" / "train.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.write_text(str(os.getppid()))  # a live process that is not this one
    try:
        r = client.post("/train/cdpdnet?run_sync=true", json={"max_epochs": 1})
        assert r.status_code == 409, r.text
        assert "already running" in r.json()["detail"]
    finally:
        lock.unlink()


@pytest.mark.parametrize("params,words", [
    ({"max_epochs": "many"}, "max_epochs"),
    ({"max_epochs": 0}, "max_epochs"),
    ({"val_split": 2}, "val_split"),
])
def test_bad_train_params_are_400(client, params, words):
    r = client.post("/train/cdpdnet?run_sync=true", json=params)
    assert r.status_code == 400, r.text
    assert words in r.json()["detail"]


def test_sync_training_round_in_process(client, app_paths):
    before = _info(client)["cdpdnet"]["versions"]
    r = client.post("/train/cdpdnet?run_sync=true", json={"max_epochs": 1, "iterations_per_epoch": 1, "val_split": 0})
    assert r.status_code == 200, r.text
    stats = r.json()
    assert stats["status"] == "DONE" and stats["published"] is True
    assert _info(client)["cdpdnet"]["versions"] == before + [stats["model_version"]]


# ------------------------------------------------------------------------------------------------
def test_model_store_versions_and_atomic_publish(tiny_checkpoint, tmp_path):
    from lib.model_store import SegmenterCache, ModelStore

    from cdpdnet.checkpoint import load_checkpoint

    store = ModelStore(tmp_path / "model")
    assert store.ensure_model("tiny", use_pretrained=True, create_untrained=False) == ""
    assert not store.published.exists()
    (tmp_path / "model").mkdir(exist_ok=True)
    Path(store.pretrained).write_bytes(Path(tiny_checkpoint).read_bytes())
    assert store.ensure_model("tiny") == "pretrained"
    assert store.current_version() == "cdpdnet-v0001"
    cache = SegmenterCache()
    e1 = cache.get(store.published, "cpu")
    assert e1.segmenter.loaded.version == "cdpdnet-v0001"
    assert cache.get(store.published, "cpu") is e1  # warm
    v2 = store.publish(tiny_checkpoint, "trained", run_id="x")
    assert v2 == "cdpdnet-v0002" and store.version_names() == ["cdpdnet-v0001", "cdpdnet-v0002"]
    ck = load_checkpoint(store.published)
    assert ck["model_version"] == v2 and ck["publish_info"]["parent"] == "cdpdnet-v0001"
    e2 = cache.get(store.published, "cpu")
    assert e2 is not e1 and e2.segmenter.loaded.version == v2  # reloaded after publish
    assert not [p for p in store.dir.iterdir() if p.name.endswith(".tmp")]
    # a file replaced behind the store's back is reported as unversioned
    store.published.write_bytes(store.published.read_bytes())
    assert store.current()["version"] == ""


def test_untrained_model_is_created_when_nothing_exists(tmp_path):
    from lib.model_store import ModelStore

    store = ModelStore(tmp_path / "model")
    assert store.ensure_model("tiny", use_pretrained=False) == "untrained"
    assert store.current()["origin"] == "untrained" and store.current()["preset"] == "tiny"
