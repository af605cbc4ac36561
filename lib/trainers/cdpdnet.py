"""Train task ``cdpdnet``: incremental fine-tuning on the datastore's partial labels.

* Data: every image with a ``final`` label; its annotated ROIs come from the label info
  (``annotated``, written when the label was saved or imported), else the ROI values present in the
  file. ROIs not annotated in an image are unknown there: the partial-label loss never reads them
  (never "everything else is background"). Labels with no annotated ROI are skipped.
* Model: fine-tunes the served model (``model/cdpdnet.pt``; else ``pretrained_cdpdnet.pt``; else a new
  model of the ``preset`` conf) with :class:`cdpdnet.training.Trainer`; the learning rate follows a
  cosine from the preset's rate, without warm-up, so that even a one-epoch round learns something.
* Request params (``POST /train/cdpdnet`` body; defaults in ``/info`` trainers.cdpdnet.config):
  ``max_epochs``, ``iterations_per_epoch`` (0 = the preset's), ``max_minutes`` (0 = no limit),
  ``val_split`` (fraction held out for the validation Dice; only used with >= 5 labelled images),
  ``lr`` (0 = the preset's), ``seed``, ``threads`` (CPU threads; 0 = half the cores in the background
  subprocess, leaving the rest to interactive inference; the torch default in a synchronous run),
  ``device``.
* Publish: a run that completed at least one iteration is published as the next version
  (``model/versions/cdpdnet-vNNNN.pt``, then ``model/cdpdnet.pt`` replaced atomically); the infer
  tasks pick it up on their next request (file identity check).
* Progress: ``model/cdpdnet/train_stats.json`` after every epoch, in the format of MONAI Label's
  trainers (``epoch``, ``total_epochs``, ``best_metric``, ``start_ts``, ``current_time`` while running,
  ``total_time`` when done), which 3D Slicer's and OHIF's progress bars read from ``/info``.
* Stop: ``DELETE /train/`` (MONAI Label kills the subprocess; nothing is published, the served
  model is untouched); gracefully, with SIGTERM/SIGINT to the subprocess, a ``max_minutes`` budget
  or by creating the file ``model/cdpdnet/stop``: the run ends after the running iteration and
  publishes what it learnt.
* One training at a time: MONAI Label answers a second ``POST /train/`` with 429 while its train
  subprocess runs (also to ``?run_sync=true``); this task also holds ``model/cdpdnet/train.lock`` (pid)
  and refuses (409) a run while another live process holds it (e.g. a second server on the same
  model folder); a lock left by a killed run is taken over.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import random
import signal
import threading
import time
from pathlib import Path
from typing import Any

from monailabel.interfaces.tasks.train import TrainTask

from cdpdnet.checkpoint import atomic_write_bytes

from ..datastore import sync_datastore
from ..errors import bad_request, conflict
from ..model_store import ModelStore, resolve_device
from ..rois import final_label_annotation, roi_names
from ..runtime import background_threads, in_background_task

logger = logging.getLogger(__name__)

__all__ = ["CDPDNetTrain", "collect_samples"]

DEFAULTS: dict[str, Any] = {
    "max_epochs": 5,
    "iterations_per_epoch": 0,
    "max_minutes": 0,
    "val_split": 0.2,
    "lr": 0.0,
    "seed": 0,
    "threads": 0,
}


def collect_samples(datastore) -> tuple[list, list[str]]:
    """``PartialSample`` per image with a usable final label, and notes on what was skipped."""
    from cdpdnet.data import PartialSample

    sync_datastore(datastore)
    refresh = getattr(datastore, "refresh_training_labels", None)
    if refresh is not None:  # a DICOMweb datastore: the PACS's newest DICOM-SEG of each image, as ROI values
        refresh()
    samples, notes = [], []
    for image_id in sorted(datastore.get_labeled_images()):
        ann = final_label_annotation(datastore, image_id)
        if ann is None:
            continue
        if not ann["annotated"]:
            notes.append(f"{image_id}: its final label annotates no ROI; skipped")
            continue
        image = datastore.get_image_uri(image_id)
        if not image or not os.path.exists(image):
            notes.append(f"{image_id}: image file missing; skipped")
            continue
        source = str((ann["info"] or {}).get("source") or "datastore")
        samples.append(PartialSample(image=image, label=ann["path"], annotated=tuple(ann["annotated"]),
                                     source=source, name=image_id, extra={"annotated_from": ann["from"]}))
    return samples, notes


class _TrainLock:
    def __init__(self, path: Path):
        self.path = path

    def acquire(self) -> None:
        import psutil

        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                with os.fdopen(fd, "w") as f:
                    f.write(str(os.getpid()))
                return
            except FileExistsError:
                try:
                    pid = int(self.path.read_text().strip() or 0)
                except (OSError, ValueError):
                    pid = 0
                if pid and pid != os.getpid() and psutil.pid_exists(pid):
                    raise conflict(f"a cdpdnet training is already running (pid {pid}); wait for it to finish or "
                                   "stop it with DELETE /train/") from None
                try:  # stale (killed run): take it over
                    self.path.unlink()
                except FileNotFoundError:
                    pass
        raise conflict("could not take the training lock; another training is starting")

    def held(self) -> bool:
        """True while a live process holds the lock."""
        import psutil

        try:
            pid = int(self.path.read_text().strip() or 0)
        except (OSError, ValueError):
            return False
        return bool(pid) and psutil.pid_exists(pid)

    def release(self) -> None:
        try:
            if self.path.read_text().strip() == str(os.getpid()):
                self.path.unlink()
        except OSError:
            pass


def _num(req: dict, key: str, kind, lo: float, hi: float | None = None):
    v = req.get(key, DEFAULTS.get(key))
    try:
        x = kind(v)
        if kind is int and float(v) != int(x):
            raise ValueError
    except (TypeError, ValueError):
        raise bad_request(f"train parameter '{key}' must be {'an integer' if kind is int else 'a number'}, got {v!r}") from None
    if x < lo or (hi is not None and x > hi):
        raise bad_request(f"train parameter '{key}' must be in [{lo}, {hi if hi is not None else 'inf'}], got {v!r}")
    return x


class CDPDNetTrain(TrainTask):
    def __init__(self, store: ModelStore, preset: str = "lite-wide", device: str = "cpu", description: str | None = None):
        super().__init__(description or "Fine-tune CDPDNet on the datastore's final labels (partial labels: each "
                                        "label trains only the ROIs annotated in it)")
        self.store = store
        self.preset = preset
        self.device = device
        self.stats_path = store.work_dir / "train_stats.json"
        self.stop_path = store.work_dir / "stop"
        self._config = dict(DEFAULTS)

    def config(self) -> dict:
        return dict(self._config)

    def stats(self) -> dict:
        try:
            s = json.loads(self.stats_path.read_text())
        except (OSError, ValueError):
            return {}
        if s.get("status") == "RUNNING" and not _TrainLock(self.store.work_dir / "train.lock").held():
            # the run was killed (DELETE /train/) before it could write its final stats
            s["status"] = "STOPPED"
            s["total_time"] = s.pop("current_time", None) or "0:00:00"
        return s

    def _write_stats(self, stats: dict) -> None:
        atomic_write_bytes(self.stats_path, json.dumps(stats, indent=2, default=str).encode())

    # ------------------------------------------------------------------------------------------
    def __call__(self, request: dict, datastore) -> dict:
        req = dict(self._config)
        req.update({k: v for k, v in (request or {}).items() if v is not None})
        epochs = _num(req, "max_epochs", int, 1, 100000)
        iters = _num(req, "iterations_per_epoch", int, 0, 10 ** 7)
        max_minutes = _num(req, "max_minutes", float, 0)
        val_split = _num(req, "val_split", float, 0, 0.9)
        lr = _num(req, "lr", float, 0, 1)
        seed = _num(req, "seed", int, 0, 2 ** 31)
        threads = _num(req, "threads", int, 0, 1024)
        device = resolve_device(str(req.get("device") or self.device))
        if not threads and device == "cpu" and in_background_task():
            threads = background_threads()

        lock = _TrainLock(self.store.work_dir / "train.lock")
        lock.acquire()
        try:
            return self._run(datastore, epochs, iters, max_minutes, val_split, lr, seed, threads, device)
        finally:
            lock.release()

    def _run(self, datastore, epochs, iters, max_minutes, val_split, lr, seed, threads, device) -> dict:
        from cdpdnet.training import TrainConfig, Trainer

        samples, notes = collect_samples(datastore)
        for n in notes:
            logger.info(n)
        if not samples:
            raise conflict("nothing to train on: no image has a final label with annotated ROIs (save a label "
                           "with PUT /datastore/label?tag=final first)")
        order = list(range(len(samples)))
        random.Random(seed).shuffle(order)
        n_val = int(len(samples) * val_split) if len(samples) >= 5 else 0
        val = [samples[i] for i in order[:n_val]]
        train = [samples[i] for i in order[n_val:]]

        start_ts = time.time()
        run_id = datetime.datetime.now().strftime("%Y%m%d_%H%M%S")
        out_dir = self.store.work_dir / f"train_{run_id}"
        init = self.store.latest_trainable()
        base_version = self.store.current_version()
        if self.stop_path.exists():
            self.stop_path.unlink()

        stop_event = threading.Event()
        restore = self._install_signal_handlers(stop_event)

        def should_stop() -> bool:
            return stop_event.is_set() or self.stop_path.exists()

        base = {"rank": 0, "start_ts": int(start_ts), "run_id": run_id, "base_version": base_version,
                "total_epochs": epochs, "device": device, "status": "RUNNING",
                "samples": {"train": len(train), "val": len(val)},
                "annotated_rois": roi_names(sorted({v for s in train for v in s.annotated}))}
        state = {"best": None, "best_epoch": None, "iterations": 0}

        def elapsed() -> str:
            return str(datetime.timedelta(seconds=int(time.time() - start_ts)))

        stats = {**base, "epoch": 0, "current_epoch": 0, "current_iteration": 0, "total_iterations": 0,
                 "best_metric": 0.0, "current_time": elapsed()}
        self._write_stats(stats)

        def on_epoch(es) -> None:
            state["iterations"] += int(es.iterations)
            if es.val_dice is not None and (state["best"] is None or es.val_dice > state["best"]):
                state["best"], state["best_epoch"] = float(es.val_dice), es.epoch + 1
            metrics = {"loss": es.loss, "bce": es.bce, "dice_loss": es.dice_loss, "lr": es.lr}
            s = {**base, "epoch": es.epoch + 1, "current_epoch": es.epoch + 1,
                 "current_iteration": state["iterations"], "total_iterations": trainer.iters,
                 "best_metric": state["best"] if state["best"] is not None else 0.0,
                 "best_metric_epoch": state["best_epoch"], "current_time": elapsed(),
                 "train": {"metrics": metrics, "key_metric_name": "val_mean_dice",
                           "best_metric": state["best"], "best_metric_epoch": state["best_epoch"]}}
            if es.val_dice is not None:
                s["eval"] = {"metrics": {"val_mean_dice": es.val_dice, **{f"val_{k}_dice": v
                                                                          for k, v in es.val_per_roi.items()}}}
            self._write_stats(s)
            stats.clear()
            stats.update(s)

        cfg = TrainConfig(out_dir=str(out_dir), epochs=epochs, iterations_per_epoch=iters or None,
                          max_minutes=max_minutes or None, device=device, init_checkpoint=init, seed=seed,
                          val_every=1 if val else 0, progress=False, lr=lr or None, threads=threads or None,
                          schedule="finetune",
                          # the allocator setting is process-wide: only in MONAI Label's training subprocess,
                          # never in the server's own process (a synchronous run)
                          keep_freed_memory=in_background_task())
        logger.info(f"Training {len(train)} images ({len(val)} validation) from {init or 'scratch'} "
                    f"({base_version or 'no version'}) for {epochs} epochs on {device}")
        try:
            trainer = Trainer(train, self.preset, cfg, validation=val, on_epoch=on_epoch, should_stop=should_stop)
            summary = trainer.run()
        except Exception:
            self._write_stats({**stats, "status": "ERROR", "total_time": elapsed()})
            raise
        finally:
            restore()
            if self.stop_path.exists():
                self.stop_path.unlink()

        version = None
        if summary.get("model"):
            version = self.store.publish(summary["model"], "trained", run_id=run_id, epochs_done=summary["epochs_done"],
                                         images=len(train), best_metric=summary.get("best_metric"),
                                         stopped=summary.get("stopped"))
        final = {**stats, "status": "STOPPED" if summary.get("stopped") else "DONE", "stopped": summary.get("stopped"),
                 "total_time": elapsed(), "model_version": version, "published": bool(version),
                 "last_loss": summary.get("last_loss")}
        final.pop("current_time", None)
        self._write_stats(final)
        (out_dir / "train_stats.json").write_text(json.dumps(final, indent=2, default=str))
        logger.info(f"Training done: {final['status']}; published {version}")
        return final

    @staticmethod
    def _install_signal_handlers(event: threading.Event):
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        old = {}

        def handler(signum, frame):
            logger.info(f"signal {signum}: stopping after the running iteration")
            event.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                old[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):
                pass

        def restore():
            for sig, h in old.items():
                try:
                    signal.signal(sig, h)
                except (ValueError, OSError):
                    pass

        return restore
