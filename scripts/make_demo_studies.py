#!/usr/bin/env python
"""Turn a demo ``datalist.json`` into a MONAI Label local-datastore studies folder.

* every ``training`` and ``unlabelled`` image is copied to ``<studies>/<id>.nii.gz`` (``<id>`` = the
  image file name without ``.nii.gz``), with ``{"source", "origin"}`` in its image info;
* every ``training`` label is imported as the ``final`` label with
  ``LocalDatastore.save_label(id, label_path, "final", {"annotated": [...], "source": ..., "origin": ...})``,
  so the app can tell which ROIs an image's label map holds (partial labels). MONAI Label 0.8.5
  keeps that dict in ``datastore_v2.json`` (plus its own ``ts``/``name``) and returns it from
  ``get_label_info`` and ``/datastore?output=all``; this script reads it back to check;
* unlabelled images get no label; ``test`` (held-out) entries are left out unless ``--include-test``
  (then as unlabelled images).

Idempotent: an image or label is only copied/saved again when its content or info changed;
files already in the studies folder that the datalist does not name are left alone.

Usage::

    .venv/bin/python scripts/make_demo_studies.py --datalist data/demo/datalist.json --studies data/demo/studies
    monailabel start_server --app apps/cdpdnet --studies data/demo/studies ...
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

LABEL_TAG = "final"
INFO_KEYS = ("annotated", "source", "origin")
EXTS = (".nii.gz", ".nii")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


def _same_file(a: Path, b: Path) -> bool:
    return a.is_file() and b.is_file() and a.stat().st_size == b.stat().st_size and _sha256(a) == _sha256(b)


def image_id_of(path: str) -> tuple[str, str]:
    name = Path(path).name
    for ext in EXTS:
        if name.endswith(ext):
            return name[: -len(ext)], ext
    raise ValueError(f"{path}: the studies folder takes NIfTI images ({', '.join(EXTS)}) only")


def _copy_atomic(src: Path, dest: Path) -> None:
    # the temporary name does not match *.nii.gz, so a running datastore watcher ignores it
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        um = os.umask(0)
        os.umask(um)
        os.chmod(tmp, 0o666 & ~um)  # mkstemp makes 0600 files
        os.replace(tmp, dest)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def plan(datalist: dict, base: Path, include_test: bool = False) -> list[dict[str, Any]]:
    """One item per image: id, image path, optional label path and label info."""
    items: list[dict[str, Any]] = []
    splits = [("training", True), ("unlabelled", False)] + ([("test", False)] if include_test else [])
    seen: dict[str, str] = {}
    for split, labelled in splits:
        for e in datalist.get(split, []):
            img = Path(e["image"]) if Path(e["image"]).is_absolute() else base / e["image"]
            iid, ext = image_id_of(e["image"])
            if iid in seen:
                raise SystemExit(f"image id {iid!r} occurs twice ({seen[iid]} and {e['image']}); ids must be unique")
            seen[iid] = e["image"]
            item: dict[str, Any] = {"id": iid, "ext": ext, "image": img, "split": split,
                                    "image_info": {k: e[k] for k in ("source", "origin") if k in e}}
            if labelled:
                if not e.get("label"):
                    raise SystemExit(f"training entry {e['image']} has no label")
                if not e.get("annotated"):
                    raise SystemExit(f"training entry {e['image']} has no 'annotated' list")
                lab = Path(e["label"]) if Path(e["label"]).is_absolute() else base / e["label"]
                if image_id_of(e["label"])[1] != ext:
                    raise SystemExit(f"{e['label']}: label and image must have the same extension")
                item["label"] = lab
                item["label_info"] = {"annotated": list(e["annotated"]), "source": e.get("source"),
                                      "origin": e.get("origin", "")}
            items.append(item)
    for it in items:
        for k in ("image", "label"):
            if k in it and not Path(it[k]).is_file():
                raise SystemExit(f"missing file: {it[k]}")
    return items


def build_studies(datalist_path: Path, studies: Path, include_test: bool = False, verbose: bool = True) -> dict:
    from monailabel.datastore.local import LocalDatastore

    datalist_path = Path(datalist_path).resolve()
    studies = Path(studies).resolve()
    dl = json.loads(datalist_path.read_text())
    items = plan(dl, datalist_path.parent, include_test)
    studies.mkdir(parents=True, exist_ok=True)
    say = print if verbose else (lambda *a, **k: None)

    copied = 0
    for it in items:
        dest = studies / f"{it['id']}{it['ext']}"
        if not _same_file(it["image"], dest):
            _copy_atomic(it["image"], dest)
            copied += 1

    ds = LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False)  # reconciles new files
    saved = info_updates = 0
    for it in items:
        iid = it["id"]
        cur_img = ds.get_image_info(iid)
        if it["image_info"] and any(cur_img.get(k) != v for k, v in it["image_info"].items()):
            ds.update_image_info(iid, dict(it["image_info"]))
            info_updates += 1
        if "label" not in it:
            continue
        want = it["label_info"]
        uri = ds.get_label_uri(iid, LABEL_TAG)
        cur = ds.get_label_info(iid, LABEL_TAG)
        if uri and _same_file(it["label"], Path(uri)) and all(cur.get(k) == want[k] for k in INFO_KEYS):
            continue
        ds.save_label(iid, str(it["label"]), LABEL_TAG, dict(want))
        saved += 1

    # read back from disk with a fresh datastore object: the info must have been persisted
    ds2 = LocalDatastore(str(studies), extensions=("*.nii.gz", "*.nii"), auto_reload=False, read_only=True)
    problems = []
    for it in items:
        if it["id"] not in ds2.list_images():
            problems.append(f"{it['id']}: not in the datastore")
            continue
        if "label" in it:
            got = ds2.get_label_info(it["id"], LABEL_TAG)
            bad = {k: got.get(k) for k in INFO_KEYS if got.get(k) != it["label_info"][k]}
            if bad:
                problems.append(f"{it['id']}: label info not persisted: {bad}")
    if problems:
        raise SystemExit("datastore check failed:\n  " + "\n  ".join(problems))

    st = ds2.status()
    labelled = [it["id"] for it in items if "label" in it]
    say(f"studies {studies}: {st['total']} images, {st['completed']} with a final label "
        f"({copied} images copied, {saved} labels saved, {info_updates} image infos updated)")
    for it in items:
        if "label" in it:
            say(f"  {it['id']:<32} final  source={it['label_info']['source']}  annotated={it['label_info']['annotated']}")
        else:
            say(f"  {it['id']:<32} (unlabelled)")
    return {"studies": str(studies), "status": st, "copied": copied, "saved": saved, "info_updates": info_updates,
            "labelled": labelled, "unlabelled": [it["id"] for it in items if "label" not in it]}


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description="Build a MONAI Label local-datastore studies folder from a demo datalist.json: images as "
        "<studies>/<id>.nii.gz, training labels as 'final' labels whose label info lists the annotated ROIs "
        "({'annotated', 'source', 'origin'}). Idempotent.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    ap.add_argument("--datalist", type=Path, default=Path("data/demo/datalist.json"), help="datalist.json of fetch_demo_data.py")
    ap.add_argument("--studies", type=Path, default=Path("data/demo/studies"), help="studies folder to create/update")
    ap.add_argument("--include-test", action="store_true", help="also add the held-out 'test' images (unlabelled)")
    ap.add_argument("--quiet", action="store_true", help="only errors")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    build_studies(a.datalist, a.studies, a.include_test, verbose=not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
