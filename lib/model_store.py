"""Model versions on disk and the warm, auto-reloading segmenter.

Layout under the app's model folder (``apps/cdpdnet/model`` unless ``--conf model_dir``)::

    pretrained_cdpdnet.pt          optional: the model to start from (never downloaded)
    cdpdnet.pt                     the served model, always a complete copy of the newest version
    cdpdnet.json                   {"version", "file", "published_at", "origin", "parent"} of cdpdnet.pt
    versions/cdpdnet-v0001.pt      every published version, never modified or deleted by the app
    versions/cdpdnet-v0002.pt ...
    cdpdnet/                       training runs (train_<run id>/), train_stats.json, locks

Publishing (:meth:`ModelStore.publish`) writes the version file atomically (temp file + rename),
stamps ``model_version`` into the checkpoint, then replaces ``cdpdnet.pt`` atomically with a copy of
it, under a file lock, so a reader sees the old model or the new one, never a part. Crash safety,
step by step (a process killed at any point leaves a consistent store):

1. ``versions/cdpdnet-vNNNN.pt`` (temp + rename): killed before, nothing changed; after, an extra
   complete version that is not served (the next publish takes the next number);
2. a temp copy of it next to ``cdpdnet.pt``, with a chosen mtime;
3. ``cdpdnet.json`` (temp + rename) describing the new file by that mtime, and the served one as
   ``previous``: until the rename of step 4, :meth:`ModelStore.current` matches the served file's
   mtime with ``previous``, so the sidecar always describes the file actually served;
4. rename the temp copy onto ``cdpdnet.pt``.

A failure in steps 1-3 (e.g. no space left on the device) raises, removes what this publish wrote
(the new version file included) and leaves the served model and its sidecar as they were. Temporary
files left by a killed publish (hidden ``.*.tmp``) are removed by the next publish or start-up.

:class:`SegmenterCache` keeps one :class:`cdpdnet.inference.Segmenter` per model file and device and
reloads it when the file's identity (inode, size, mtime) changes: that is how a model published by
the training subprocess reaches the infer tasks without a restart.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from filelock import FileLock

from cdpdnet.checkpoint import atomic_write_bytes, load_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

__all__ = ["ModelStore", "SegmenterCache", "SEGMENTERS", "resolve_device"]

NAME = "cdpdnet"
_VERSION_RE = re.compile(rf"^{NAME}-v(\d{{4,}})\.pt$")


def resolve_device(name: str | None) -> str:
    import torch

    name = (name or "auto").strip().lower()
    if name in ("auto", ""):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        logger.warning(f"device {name!r} requested but CUDA is not available; using cpu")
        return "cpu"
    return name


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class ModelStore:
    def __init__(self, model_dir: str | os.PathLike):
        self.dir = Path(model_dir)
        self.published = self.dir / f"{NAME}.pt"
        self.pretrained = self.dir / f"pretrained_{NAME}.pt"
        self.sidecar = self.dir / f"{NAME}.json"
        self.versions_dir = self.dir / "versions"
        self.work_dir = self.dir / NAME
        self._lock = FileLock(str(self.dir / f".{NAME}.publish.lock"))

    # ------------------------------------------------------------------------------------------
    def versions(self) -> list[tuple[int, Path]]:
        if not self.versions_dir.is_dir():
            return []
        out = []
        for p in self.versions_dir.iterdir():
            m = _VERSION_RE.match(p.name)
            if m:
                out.append((int(m.group(1)), p))
        return sorted(out)

    def version_names(self) -> list[str]:
        return [p.stem for _, p in self.versions()]

    def current(self) -> dict:
        """What ``cdpdnet.pt`` is: the sidecar written with it (or a description of the bare file)."""
        if not self.published.is_file():
            return {}
        try:
            info = json.loads(self.sidecar.read_text())
        except (OSError, ValueError):
            info = {}
        st = self.published.stat()
        previous = info.pop("previous", None) or {}
        if info.get("mtime_ns") != st.st_mtime_ns:
            if previous.get("mtime_ns") == st.st_mtime_ns:  # a publish stopped before its final rename
                info = dict(previous)
            else:  # replaced by someone else (by hand)
                info = {"version": "", "origin": "unversioned file"}
        info.update({"file": str(self.published), "modified_time": int(st.st_mtime)})
        return info

    def current_version(self) -> str:
        return str(self.current().get("version", ""))

    # ------------------------------------------------------------------------------------------
    def publish(self, checkpoint: str | os.PathLike | dict, origin: str, **meta: Any) -> str:
        """Publish a checkpoint (path or payload) as the next version and serve it; returns the version."""
        self.dir.mkdir(parents=True, exist_ok=True)
        self.versions_dir.mkdir(parents=True, exist_ok=True)
        ck = dict(checkpoint) if isinstance(checkpoint, dict) else load_checkpoint(checkpoint)
        with self._lock:
            nums = [n for n, _ in self.versions()]
            n = (max(nums) + 1) if nums else 1
            version = f"{NAME}-v{n:04d}"
            parent = self.current_version()
            ck["model_version"] = version
            ck["published_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            ck["publish_info"] = {"origin": str(origin), "parent": parent,
                                  **{k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) or v is None}}
            vpath = self.versions_dir / f"{version}.pt"
            self.remove_stale_temp_files()
            tmp = None
            try:
                save_checkpoint(vpath, ck)  # 1.
                tmp, mtime_ns = self._staged_copy(vpath)  # 2.
                side = {"version": version, "file": str(vpath), "published_at": ck["published_at"],
                        "origin": origin, "parent": parent, "preset": (ck.get("preset") or {}).get("name"),
                        "mtime_ns": mtime_ns, **ck["publish_info"]}
                side["previous"] = self._served_entry()
                atomic_write_bytes(self.sidecar, json.dumps(side, indent=2).encode())  # 3.
                os.replace(tmp, self.published)  # 4.
                tmp = None
            except BaseException as e:
                for leftover in (tmp, vpath):
                    if leftover is not None and os.path.exists(leftover):
                        os.unlink(leftover)
                if isinstance(e, OSError):
                    raise OSError(e.errno, f"could not publish {version} in {self.dir} ({e.strerror or e}); the "
                                           f"served model is unchanged ({parent or 'none'})") from e
                raise
            _fsync_dir(self.dir)
        logger.info(f"Published model {version} ({origin}) => {self.published}")
        return version

    def _staged_copy(self, src: Path) -> tuple[str, int]:
        """A complete, fsynced copy of ``src`` next to ``cdpdnet.pt`` (hidden temp name) with an mtime that
        differs from the served file's; returns (temp path, mtime_ns)."""
        fd, tmp = tempfile.mkstemp(prefix=f".{self.published.name}.", suffix=".tmp", dir=self.dir)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(fd, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as out, open(src, "rb") as inp:
                shutil.copyfileobj(inp, out, 1 << 22)
                out.flush()
                os.fsync(out.fileno())
            mtime_ns = time.time_ns()
            try:
                if mtime_ns == self.published.stat().st_mtime_ns:
                    mtime_ns += 1
            except FileNotFoundError:
                pass
            os.utime(tmp, ns=(mtime_ns, mtime_ns))
            return tmp, mtime_ns
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def _served_entry(self) -> dict | None:
        """The sidecar entry that describes the file served now (``None`` when none does)."""
        try:
            info = json.loads(self.sidecar.read_text())
            mtime_ns = self.published.stat().st_mtime_ns
        except (OSError, ValueError):
            return None
        previous = info.pop("previous", None) or {}
        for entry in (info, previous):
            if entry.get("mtime_ns") == mtime_ns and entry.get("version"):
                return entry
        return None

    def remove_stale_temp_files(self) -> list[str]:
        """Remove temp files (``.*.tmp``) a killed publish left in the model folder and ``versions/``.

        Only called under the publish lock: every temp file there belongs to a publish, and no other
        publish is running."""
        removed = []
        with self._lock:
            for d in (self.dir, self.versions_dir):
                if not d.is_dir():
                    continue
                for p in d.iterdir():
                    if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                        try:
                            p.unlink()
                            removed.append(p.name)
                        except FileNotFoundError:
                            pass
        if removed:
            logger.warning(f"Removed temporary files left by an interrupted publish in {self.dir}: {removed}")
        return removed

    def ensure_model(self, preset: str, use_pretrained: bool = True, create_untrained: bool = True) -> str:
        """Make sure ``cdpdnet.pt`` exists: publish the pretrained file, else an untrained model of ``preset``.

        Returns what was done (``""`` when a model was already there). Safe against two processes
        starting at once (file lock; the second sees the first's file).
        """
        if self.dir.is_dir():
            self.remove_stale_temp_files()
        if self.published.is_file():
            return ""
        self.dir.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.dir / f".{NAME}.init.lock")):
            if self.published.is_file():
                return ""
            if use_pretrained and self.pretrained.is_file():
                self.publish(self.pretrained, "pretrained", source=str(self.pretrained))
                return "pretrained"
            if not create_untrained:
                return ""
            logger.warning(f"No model in {self.dir} (no {self.pretrained.name}): creating an UNTRAINED "
                           f"'{preset}' model; its masks are noise until it is trained (POST /train/{NAME})")
            self.publish(untrained_checkpoint(preset), "untrained", preset=str(preset))
            return "untrained"

    def latest_trainable(self) -> str | None:
        """The checkpoint to fine-tune from: the served model, else the pretrained one."""
        if self.published.is_file():
            return str(self.published)
        if self.pretrained.is_file():
            return str(self.pretrained)
        return None


def untrained_checkpoint(preset: str) -> dict:
    """A randomly initialised model of ``preset`` with the 11 published source tasks (text embedded)."""
    from cdpdnet.factory import build_model, checkpoint_payload
    from cdpdnet.preset import load_preset
    from cdpdnet.text import build_text_encoder, compute_prompt_embeddings, default_tasks

    p = load_preset(preset)
    enc = build_text_encoder(p.text["encoder"])
    tasks = [(name, tuple(rs)) for name, rs in default_tasks()]
    emb = compute_prompt_embeddings(enc, tasks=tasks)
    if emb["dim"] != p.network.text_dim:
        raise ValueError(f"text encoder {emb['encoder']} gives {emb['dim']}-d embeddings but preset {p.name} "
                         f"expects {p.network.text_dim}")
    model = build_model(p, num_tasks=len(tasks))
    model.net.set_text_embeddings(emb.pop("organ_embeddings"), emb.pop("task_embeddings"))
    text = {k: v for k, v in emb.items() if not hasattr(v, "shape")}
    return checkpoint_payload(model, p, [{"name": n, "rois": [int(r) for r in rs]} for n, rs in tasks], text,
                              epoch=None, metrics={}, untrained=True)


# ----------------------------------------------------------------------------------------------
class _Entry:
    def __init__(self, key, segmenter, ident):
        self.key = key
        self.segmenter = segmenter
        self.ident = ident
        self.lock = threading.Lock()  # one inference at a time per model (CPU: no gain from more)


class SegmenterCache:
    """One warm Segmenter per (model file, device, Segmenter arguments), reloaded when the file changes."""

    def __init__(self):
        self._entries: dict[tuple, _Entry] = {}
        self._lock = threading.Lock()
        self.loads = 0

    @staticmethod
    def _ident(path: str) -> tuple:
        st = os.stat(path)
        return st.st_ino, st.st_size, st.st_mtime_ns

    def get(self, path: str | os.PathLike, device: str = "cpu", **segmenter_kwargs) -> _Entry:
        from cdpdnet.inference import Segmenter

        path = os.path.realpath(str(path))
        key = (path, str(device), *sorted(segmenter_kwargs.items()))
        with self._lock:
            ident = self._ident(path)
            entry = self._entries.get(key)
            if entry is not None and entry.ident == ident:
                return entry
            prev = entry.ident if entry else None
            t = time.perf_counter()
            seg = Segmenter(path, device=device, **segmenter_kwargs)
            # the file may have been replaced while it was read: identify what was loaded by its version
            entry = _Entry(key, seg, ident)
            self._entries[key] = entry
            self.loads += 1
            logger.info(f"{'Reloaded' if prev else 'Loaded'} model {path} (version "
                        f"{seg.loaded.version or '?'}) on {device} in {time.perf_counter() - t:.2f}s")
            return entry

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


SEGMENTERS = SegmenterCache()
