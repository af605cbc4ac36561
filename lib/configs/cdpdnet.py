"""The CDPDNet task config: conf options, the model store, and the tasks built on them.

``--conf`` options (all optional):

* ``preset``: ``lite-wide`` (default) | ``lite`` | ``paper`` | ``tiny`` | a preset JSON path. Used when the app has to
  create a model (no ``model/cdpdnet.pt`` and no ``model/pretrained_cdpdnet.pt``) and when training
  starts without any model. A checkpoint is self-describing: an existing model keeps its own preset
  (a differing ``preset`` is reported in the log and in ``/info``); to serve another preset, point
  ``model_dir`` at a folder holding (or to hold) that preset's model.
* ``use_pretrained_model``: ``true`` (default) | ``false``. When ``model/cdpdnet.pt`` does not exist yet,
  publish ``model/pretrained_cdpdnet.pt`` (if present) as the first version. Nothing is downloaded.
* ``create_untrained_model``: ``true`` (default) | ``false``. With neither file, create a randomly
  initialised model of ``preset`` (so that training from scratch works); its masks are noise.
* ``device``: ``auto`` (default: cuda if available, else cpu) | ``cpu`` | ``cuda`` | ``cuda:N``.
* ``model_dir``: the model folder (default ``<app>/model``).
* ``text_threshold``: the cosine similarity a free-text prompt needs to match an ROI (default 0.65).
* ``threads``: CPU threads for the server's inference, ``auto`` (default) = the cores that background
  training/scoring (half the cores, see ``lib/runtime.py``) leave free; oversubscribing the cores
  makes both crawl.
* ``subgrids``: ``1`` | ``2`` | ``4`` | ``8``: how many model grids, shifted by half a voxel, each
  volume is read on (their probabilities averaged); default the served model's preset
  (``infer.subgrids``). Fewer is faster (network time scales with it), more draws finer borders.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from monailabel.interfaces.config import TaskConfig
from monailabel.utils.others.generic import strtobool

from cdpdnet.taxonomy import labels_dict

from ..model_store import ModelStore, resolve_device
from ..runtime import in_background_task, server_threads

logger = logging.getLogger(__name__)

__all__ = ["CDPDNet"]


class CDPDNet(TaskConfig):
    def init(self, name: str, model_dir: str, conf: dict[str, str], planner: Any, **kwargs):
        super().init(name, model_dir, conf, planner, **kwargs)
        conf = conf or {}
        self.preset = str(conf.get("preset", "lite-wide"))
        self.use_pretrained = bool(strtobool(str(conf.get("use_pretrained_model", "true"))))
        self.create_untrained = bool(strtobool(str(conf.get("create_untrained_model", "true"))))
        self.device = resolve_device(conf.get("device", "auto"))
        self.text_threshold = float(conf.get("text_threshold", 0.65))
        self.threads = self._set_threads(str(conf.get("threads", "auto")))
        self.subgrids = self._subgrids(conf.get("subgrids"))
        self.labels = labels_dict()
        self.store = ModelStore(model_dir)
        self.path = [str(self.store.pretrained), str(self.store.published)]
        self.init_error = ""
        try:
            done = self.store.ensure_model(self.preset, self.use_pretrained, self.create_untrained)
            if done:
                logger.info(f"Initial model: {done} => {self.store.published}")
        except Exception as e:  # noqa: BLE001 - report, do not crash the server
            self.init_error = f"{type(e).__name__}: {e}"
            logger.error(f"Could not create an initial model in {model_dir}: {self.init_error}")
        self._check_preset()

    def _set_threads(self, value: str) -> int:
        """CPU threads of the server process (background tasks set their own, see lib/runtime.py)."""
        import torch

        if self.device != "cpu" or in_background_task():
            return torch.get_num_threads()
        try:
            n = server_threads() if value.strip().lower() in ("auto", "", "0") else int(value)
        except ValueError:
            logger.warning(f"--conf threads {value!r} is not a number; using auto")
            n = server_threads()
        torch.set_num_threads(max(1, n))
        logger.info(f"Inference uses {max(1, n)} CPU threads (of {os.cpu_count()} cores; --conf threads)")
        return max(1, n)

    @staticmethod
    def _subgrids(value) -> int | None:
        from cdpdnet.inference import SUBGRID_SHIFTS

        if value is None or str(value).strip().lower() in ("", "auto", "preset"):
            return None
        try:
            n = int(str(value).strip())
        except ValueError:
            n = -1
        if n not in SUBGRID_SHIFTS:
            logger.warning(f"--conf subgrids {value!r} is not one of {sorted(SUBGRID_SHIFTS)}; using the model's preset")
            return None
        return n

    def _check_preset(self) -> None:
        self.model_preset = self.store.current().get("preset") or ""
        if "preset" not in (self.conf or {}) or not self.model_preset:
            return
        wanted = os.path.splitext(os.path.basename(self.preset))[0]
        if self.model_preset != wanted:
            logger.warning(f"--conf preset {self.preset} but the served model {self.store.published} is a "
                           f"'{self.model_preset}' model; it keeps its own preset (use --conf model_dir <folder> "
                           f"to serve a '{wanted}' model)")

    def infer(self):
        from ..infers.cdpdnet import CDPDNetInfer, CDPDNetPromptInfer

        common = dict(store=self.store, labels=self.labels, device=self.device, text_threshold=self.text_threshold,
                      subgrids=self.subgrids)
        return {
            self.name: CDPDNetInfer(name=self.name, **common),
            f"{self.name}_prompt": CDPDNetPromptInfer(name=f"{self.name}_prompt", **common),
        }

    def trainer(self):
        from ..trainers.cdpdnet import CDPDNetTrain

        return CDPDNetTrain(store=self.store, preset=self.preset, device=self.device)

    def strategy(self):
        from ..activelearning import MissingROIUncertainty, TTAUncertainty

        return {
            f"{self.name}_uncertainty": TTAUncertainty(),
            f"{self.name}_missing_rois": MissingROIUncertainty(),
        }

    def scoring_method(self):
        from ..scoring import TTAUncertaintyScoring

        return {f"{self.name}_uncertainty": TTAUncertaintyScoring(store=self.store, device=self.device)}
