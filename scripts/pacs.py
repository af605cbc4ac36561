#!/usr/bin/env python
"""Start, stop or check the development PACS (Orthanc + DICOMweb, loopback only; see lib/pacs/orthanc.py).

    scripts/pacs.py start [--dir runs/pacs] [--http-port 8042] [--dicom-port 4242]
    scripts/pacs.py status | stop [--dir runs/pacs]

The password is in <dir>/credentials.json (mode 0600); it is never printed. To serve the PACS with
the app, pass ``--studies http://127.0.0.1:8042/dicom-web --conf dicomweb_credentials
<dir>/credentials.json`` (docs/pacs.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib.pacs import OrthancPACS, PACSError  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["start", "stop", "status"])
    ap.add_argument("--dir", default=str(REPO / "runs" / "pacs"), help="Orthanc's data folder (default runs/pacs)")
    ap.add_argument("--http-port", type=int, default=8042)
    ap.add_argument("--dicom-port", type=int, default=4242)
    a = ap.parse_args()
    pacs = OrthancPACS(Path(a.dir), http_port=a.http_port, dicom_port=a.dicom_port)
    try:
        if a.action == "start":
            pacs.start()
            print(f"PACS running: DICOMweb {pacs.dicomweb_url}, DICOM {pacs.aet}@127.0.0.1:{pacs.dicom_port}, "
                  f"user {pacs.user}, password in {pacs.folder / 'credentials.json'}")
        elif a.action == "stop":
            pacs.stop()
            print("PACS stopped")
        else:
            print("running" if pacs.is_running() else "not running")
            return 0 if pacs.is_running() else 3
    except PACSError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
