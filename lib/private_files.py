"""Files that hold secrets (passwords, signing keys): written atomically, readable by their owner only."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

__all__ = ["write_private_bytes", "write_private_json"]


def write_private_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` with mode 0600 (temp file + ``os.replace``: the old or the new file, never a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # an older tmp file may have had other bits
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    return path


def write_private_json(path: str | os.PathLike, obj: Any) -> Path:
    return write_private_bytes(path, json.dumps(obj, indent=2).encode())
