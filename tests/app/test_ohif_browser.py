"""OHIF (the build inside the monailabel wheel) in headless Chromium against the real server and PACS:
open the demo CT study in MONAI Label mode, run auto-segmentation from the panel, and check that
segments with the ROI names appear (the viewer's segmentation service and the rendered viewport).
The screenshots are kept in ``test-artifacts/``."""

from __future__ import annotations

import io
import json
import shutil
import time

import numpy as np
import pytest
from conftest import REPO
from pacs_helpers import _storescu, start_dicomweb_server, stop_server

from cdpdnet.taxonomy import labels_dict

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "test-artifacts"

SEGMENTS_JS = """() => {
  const sm = window.services;
  if (!sm || !sm.segmentationService) return null;
  return sm.segmentationService.getSegmentations().map(s => {
    const lm = (s.representationData || {}).Labelmap || {};
    const counts = {};
    try {
      const vol = window.cornerstone.cache.getVolume(lm.volumeId);
      const data = vol.voxelManager ? vol.voxelManager.getCompleteScalarDataArray() : vol.getScalarData();
      for (let i = 0; i < data.length; i++) { const v = data[i]; if (v) counts[v] = (counts[v] || 0) + 1; }
    } catch (e) { /* no volume yet */ }
    const names = {};
    for (const [k, x] of Object.entries(s.segments || {})) { if (x) names[k] = x.label; }
    return {counts, names};
  });
}"""


def _png(page, name: str) -> np.ndarray:
    from PIL import Image

    ARTIFACTS.mkdir(exist_ok=True)
    data = page.screenshot(path=str(ARTIFACTS / name))
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).astype(np.int16)


def _present(segs) -> dict[str, int]:
    out = {}
    for s in segs or []:
        for value, n in s["counts"].items():
            out[s["names"].get(str(value), f"?{value}")] = n
    return out


@pytest.mark.slow
def test_ohif_auto_segmentation_shows_roi_segments(tmp_path, pacs, demo_series, tiny_checkpoint):
    from playwright.sync_api import sync_playwright

    assert shutil.which(CHROMIUM), "Debian's chromium is missing: scripts/setup.sh installs it (as root)"
    assert _storescu(pacs, demo_series).returncode == 0
    proc, url, log = start_dicomweb_server(tmp_path, pacs, tiny_checkpoint, auth=True)
    from lib.server.users import UserStore

    password = UserStore(tmp_path / "auth").set_user("olivia", "annotator")
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
            # authentication on: the browser answers the server's Basic challenge, as a user typing the
            # annotator's name and password into its login dialog would
            page = browser.new_page(viewport={"width": 1600, "height": 1000},
                                    http_credentials={"username": "olivia", "password": password})
            errors, console = [], []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: console.append(m.text[:200]))
            page.goto(f"{url}/ohif/", wait_until="networkidle", timeout=120_000)
            page.get_by_text("Confirm and Hide").click()
            page.get_by_text("CDPDNet, Demo").first.click()  # the study list came through the server's DICOMweb proxy
            page.get_by_role("button", name="MONAI Label").click()
            page.locator("[data-cy='viewport-pane']").first.wait_for(timeout=120_000)
            page.wait_for_function("() => window.services && window.services.segmentationService", timeout=60_000)
            # point the panel at this server (it defaults to port 8000) and connect
            server = page.locator("input[type=text]").last
            server.fill(f"{url}/")
            box = server.bounding_box()
            page.mouse.click(box["x"] + box["width"] + 30, box["y"] + box["height"] / 2)
            run = page.locator("button[title='Run Segmentation']")
            run.wait_for(timeout=60_000)
            # the panel writes a result into the labelmap it creates on connecting, and drops the result
            # ("Volume Object is NOT In Cache") when that labelmap is not there yet: a user sees the
            # segment list appear before pressing Run; a loaded CI machine can take a while to get there.
            # getLabelmapVolume throws until the segmentation exists, which would end the wait at once
            page.wait_for_function("""() => { const s = window.services.segmentationService;
                return !!(s.getSegmentation('1') && s.getLabelmapVolume('1')); }""", timeout=120_000)
            time.sleep(3)
            before = _png(page, "ohif-before-autoseg.png")
            # the panel's notice shows for a few seconds only: note it whenever it appears
            page.evaluate("""() => { window.__cdpdnetNotice = false;
                new MutationObserver(() => { if (document.body.innerText.includes(
                    'Running Segmentation - Successful')) window.__cdpdnetNotice = true; })
                .observe(document.body, {childList: true, subtree: true, characterData: true}); }""")
            run.click()
            deadline = time.monotonic() + 180
            present = {}
            while time.monotonic() < deadline and not present:
                present = _present(page.evaluate(SEGMENTS_JS))
                time.sleep(1)
            page.wait_for_function("() => window.__cdpdnetNotice", timeout=30_000)  # the panel's own notice (DOM)
            time.sleep(3)  # let the overlay render
            after = _png(page, "ohif-autoseg.png")
            (ARTIFACTS / "ohif-segments.json").write_text(json.dumps(present, indent=1))
            browser.close()
        assert present, (f"no segment voxels after Run; page errors: {errors[:3]}; console: {console[-15:]}\n"
                         f"{log.read_text()[-3000:]}")
        rois = set(labels_dict())
        assert set(present) <= rois, f"segments not named as ROIs: {set(present) - rois}"
        # the viewport shows it: coloured overlay pixels appeared where the image was grey
        changed = np.abs(after - before).sum(-1) > 60
        colour = (after.max(-1) - after.min(-1)) > 60
        assert (changed & colour).sum() > 200, "no coloured overlay appeared in the viewer"
        # every call OHIF made was authenticated as the annotator (inference included)
        assert "audit: olivia (annotator) POST /infer/cdpdnet" in log.read_text(errors="replace")
    finally:
        stop_server(proc)
