"""DICOMweb credentials from a file, so the password is never in the environment, argv or a log.

MONAI Label reads the DICOMweb user and password from ``MONAI_LABEL_DICOMWEB_USERNAME`` /
``MONAI_LABEL_DICOMWEB_PASSWORD``. ``start_server`` then writes every setting, the password
included, as ``export ...`` lines into its debug log and into the environment of every training
subprocess. ``--conf dicomweb_credentials <file>`` avoids both: the app reads a JSON file
(``{"user": ..., "password": ...}``, the format ``scripts/pacs.py`` writes; ``username`` is accepted
too) and sets MONAI Label's settings object in its own process only; training and scoring
subprocesses read the same file again.
"""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["use_dicomweb_credentials", "read_credentials"]


def read_credentials(path: str | os.PathLike) -> tuple[str, str]:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
        user = data.get("user") or data.get("username")
        password = data["password"]
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise ValueError(f"--conf dicomweb_credentials {path}: expected a JSON file with 'user' and 'password' "
                         f"({type(e).__name__})") from None
    if not user or not isinstance(password, str):
        raise ValueError(f"--conf dicomweb_credentials {path}: 'user' and 'password' must be non-empty strings")
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(f"{path} is readable by other accounts (mode {oct(mode & 0o777)}); chmod 600 it")
    return str(user), password


def use_dicomweb_credentials(path: str | os.PathLike) -> None:
    """Set MONAI Label's DICOMweb user and password (this process only) from ``path``."""
    from monailabel.config import settings

    user, password = read_credentials(path)
    settings.MONAI_LABEL_DICOMWEB_USERNAME = user
    settings.MONAI_LABEL_DICOMWEB_PASSWORD = password
    logger.info(f"DICOMweb credentials: user {user!r} from {path}")
