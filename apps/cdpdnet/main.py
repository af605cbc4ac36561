"""MONAI Label app serving CDPDNet (text-guided universal CT segmentation of 32 organs and tumours).

Start::

    monailabel start_server --app apps/cdpdnet --studies <folder or DICOMweb URL> --conf models cdpdnet
    # or, without an activated venv:  .venv/bin/python -m monailabel.main start_server --app apps/cdpdnet ...

Conf options (``--conf key value``): ``preset`` (lite | paper | tiny | preset.json), ``use_pretrained_model``
(true | false), ``create_untrained_model``, ``device`` (auto | cpu | cuda), ``model_dir``, ``text_threshold``;
see ``lib/configs/cdpdnet.py``. ``models`` is accepted for the usual command line (only ``cdpdnet`` exists).

Tasks: infer ``cdpdnet`` (segmentation, all ROIs, fill-in of partial labels) and ``cdpdnet_prompt``
(vista3d: label_prompt / text / points); train ``cdpdnet`` (partial-label fine-tuning, versioned
publishing, hot reload); strategies ``random``, ``first``, ``cdpdnet_uncertainty``,
``cdpdnet_missing_rois``; scoring ``cdpdnet_uncertainty``. Label saves are validated and record the
annotated ROIs (``lib/datastore.py``).

``lib`` and ``cdpdnet`` live at the repository root: this file puts the root on ``sys.path`` and on
``PYTHONPATH`` (MONAI Label runs training and scoring as ``python -m monailabel.interfaces.utils.app``
subprocesses, which load this file again and need ``PYTHONPATH`` set in the server's environment).
"""

from __future__ import annotations

import logging
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__))))


def _setup_paths() -> None:
    if REPO_ROOT not in sys.path:
        sys.path.insert(0, REPO_ROOT)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if REPO_ROOT not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, *parts])
    # another app's `lib` imported earlier in this process would shadow ours
    mod = sys.modules.get("lib")
    if mod is not None and not str(getattr(mod, "__file__", "") or "").startswith(os.path.join(REPO_ROOT, "lib")):
        for name in [n for n in sys.modules if n == "lib" or n.startswith("lib.")]:
            del sys.modules[name]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the app never downloads anything
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


def _die_with_server() -> None:
    """In MONAI Label's train/scoring subprocess: get SIGTERM when the server goes away.

    MONAI Label starts these with ``python -m monailabel.interfaces.utils.app`` and does not stop them
    when the server is killed; an orphaned scoring run was seen using a core for 12 minutes. Linux's
    ``PR_SET_PDEATHSIG`` ties the child to its parent (the training task turns SIGTERM into a clean stop).
    """
    if not sys.argv or not sys.argv[0].endswith(os.path.join("interfaces", "utils", "app.py")):
        os.environ["CDPDNET_SERVER_PID"] = str(os.getpid())  # inherited by the subprocesses it starts
        return
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        server = os.environ.get("CDPDNET_SERVER_PID")
        if server and os.getppid() != int(server):  # the server died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: nothing to do
        pass


_setup_paths()
_die_with_server()

from lib.runtime import interpreter_bin_on_path  # noqa: E402

interpreter_bin_on_path()  # dcmqi for DICOM-SEG: no GitHub download at start-up

from monailabel.interfaces.app import MONAILabelApp  # noqa: E402
from monailabel.tasks.activelearning.first import First  # noqa: E402
from monailabel.tasks.activelearning.random import Random  # noqa: E402

import cdpdnet  # noqa: E402,F401
from lib.configs.cdpdnet import CDPDNet  # noqa: E402
from lib.datastore import FINAL, guard_datastore, sync_datastore  # noqa: E402
from lib.errors import bad_request, not_found  # noqa: E402
from lib.inputs import (INFER_UPLOAD_SUFFIXES, check_new_id, check_upload, guard_sessions,  # noqa: E402
                        harden_endpoints, id_problem, is_uploaded_file)
from lib.pacs import use_dicomweb_credentials  # noqa: E402
from lib.rois import final_label_annotation  # noqa: E402
from lib.server import ServerOptions  # noqa: E402
from lib.server import install as install_server_guards  # noqa: E402

logger = logging.getLogger(__name__)

# -- model upload (PUT /model/cdpdnet): validated, then published as a version (lib/model_upload.py) ----
from lib.model_upload import install as _install_model_upload  # noqa: E402

_install_model_upload()
# ---------------------------------------------------------------------------------------------------

MODEL = "cdpdnet"


class CDPDNetApp(MONAILabelApp):
    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        conf = dict(conf or {})
        models = [m.strip() for m in str(conf.get("models", MODEL)).split(",") if m.strip()]
        unknown = [m for m in models if m not in (MODEL, "all")]
        if unknown:
            logger.warning(f"--conf models {conf.get('models')}: this app has only '{MODEL}'; ignoring {unknown}")
        self.model_dir = os.path.abspath(conf.get("model_dir") or os.path.join(app_dir, "model"))
        if conf.get("dicomweb_credentials"):  # before the datastore is made: it reads them from settings
            use_dicomweb_credentials(conf["dicomweb_credentials"])
        self.task_config = CDPDNet()
        self.task_config.init(MODEL, self.model_dir, conf, None)
        harden_endpoints()  # 400 for malformed JSON form fields and infer requests without an image
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="MONAI Label - CDPDNet",
            description="CDPDNet: text-guided universal CT segmentation of 32 organs and tumours, trained on "
                        "partially labelled data; fill-in of partial labels, prompts, active learning",
            version=_version(),
        )

    # -- tasks ------------------------------------------------------------------------------
    def init_datastore(self):
        return guard_datastore(super().init_datastore())

    def _load_sessions(self, load=False):
        return guard_sessions(super()._load_sessions(load))  # session ids are file names: no traversal

    def init_infers(self):
        return dict(self.task_config.infer())

    def init_trainers(self):
        return {MODEL: self.task_config.trainer()}

    def init_strategies(self):
        return {"random": Random(), "first": First(), **self.task_config.strategy()}

    def init_scoring_methods(self):
        return dict(self.task_config.scoring_method())

    def on_init_complete(self):
        """In the server (not in a training subprocess): authentication, roles and limits in front of the
        routes (``lib/server``)."""
        super().on_init_complete()
        import monailabel.app

        done = install_server_guards(monailabel.app.app, ServerOptions(self.conf, self.app_dir, self.studies))
        logger.info(f"Server guards: {done}")

    # -- requests ---------------------------------------------------------------------------
    def infer(self, request, datastore=None):
        request = dict(request)
        for key in ("cdpdnet_existing", "image_id"):  # set here only, never by a client
            request.pop(key, None)
        model = request.get("model")
        if model not in self._infers:
            raise not_found(f"unknown model {model!r}; available: {', '.join(self._infers)}")
        image = request.get("image")
        if _truthy(request.get("save_label")):  # MONAI Label saves the result under this tag
            check_new_id(request.get("label_tag") or "original", "label_tag")
        if isinstance(image, str):
            if not image:
                raise bad_request("no image: pass ?image=<image id> (or upload a file)")
            if is_uploaded_file(image, self.sessions()):  # MONAI Label's temporary copy of an upload
                check_upload(image, "uploaded image", INFER_UPLOAD_SUFFIXES, volume=True)
            else:  # an image id; never a path on the server (MONAI Label read any existing path)
                ds = datastore or self.datastore()
                sync_datastore(ds)
                if image not in ds.list_images():
                    if id_problem(image):
                        check_new_id(image, "image id")
                    raise not_found(f"image {image!r} is not in the datastore (unknown image id)")
                request["image_id"] = image
                ann = final_label_annotation(ds, image, FINAL)
                if ann is not None:
                    request["cdpdnet_existing"] = {"path": ann["path"], "annotated": ann["annotated"],
                                                   "from": ann["from"]}
        return super().infer(request, datastore)

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise not_found(f"unknown strategy {strategy!r}; available: {', '.join(self._strategies)}")
        return super().next_sample(request)

    def scoring(self, request, datastore=None):
        method = request.get("method")
        if method not in self._scoring_methods:
            raise not_found(f"unknown scoring method {method!r}; available: {', '.join(self._scoring_methods)}")
        return super().scoring(request, datastore)

    def train(self, request):
        model = request.get("model")
        if model not in self._trainers:
            raise not_found(f"unknown train task {model!r}; available: {', '.join(self._trainers)}")
        return super().train(request)

    def on_save_label(self, image_id, label_id):
        super().on_save_label(image_id, label_id)
        last = getattr(self.datastore(), "_cdpdnet_last_save", None) or {}
        if last.get("image") != image_id:
            return {}
        return {k: last[k] for k in ("tag", "annotated", "annotated_from") if k in last}

    def info(self):
        meta = super().info()
        store = self.task_config.store
        cur = store.current()
        meta["cdpdnet"] = {
            "model_version": cur.get("version", ""),
            "model_origin": cur.get("origin", ""),
            "preset": cur.get("preset", ""),
            "versions": store.version_names(),
            "model_dir": str(store.dir),
            "device": self.task_config.device,
            "threads": self.task_config.threads,
            "init_error": self.task_config.init_error,
        }
        return meta


def _truthy(v) -> bool:
    return v.strip().lower() in ("1", "true", "yes", "on") if isinstance(v, str) else bool(v)


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("cdpdnet")
    except Exception:  # noqa: BLE001
        return "0"
