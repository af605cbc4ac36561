"""Where app code runs: the server process, or one of MONAI Label's background task subprocesses."""

from __future__ import annotations

import os
import sys

__all__ = ["in_background_task", "background_threads", "server_threads", "interpreter_bin_on_path"]


def in_background_task() -> bool:
    """True inside ``python -m monailabel.interfaces.utils.app`` (MONAI Label's train/scoring subprocess)."""
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    return getattr(spec, "name", "") == "monailabel.interfaces.utils.app"


def background_threads() -> int:
    """CPU threads for a background task: half the cores (at least 1), the rest stay free for the
    server's interactive inference (and no oversubscription of OpenMP threads on small machines)."""
    return max(1, (os.cpu_count() or 2) // 2)


def server_threads() -> int:
    """CPU threads for the server's inference: the cores the background tasks leave free (at least 1).

    More threads than free cores is far worse than fewer: with OpenMP busy-waiting, a 2-thread
    inference next to a 2-thread training on 2 cores measured 20 s instead of 0.7 s.
    """
    n = os.cpu_count() or 2
    return max(1, n - background_threads())


def interpreter_bin_on_path() -> None:
    """Put the folder of this Python (the venv's ``bin``) on ``PATH``.

    dcmqi's ``itkimage2segimage`` (DICOM-SEG writing) is installed there by the ``dcmqi`` wheel; when
    the venv is not activated it is not found, and MONAI Label then tries to download dcmqi from GitHub.
    """
    bindir = os.path.dirname(sys.executable)
    if bindir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([bindir, os.environ.get("PATH", "")])
