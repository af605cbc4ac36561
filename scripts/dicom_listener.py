#!/usr/bin/env python
"""Run the DICOM Storage SCP: CT series sent here (C-STORE) go into a studies folder (see lib/dimse).

    scripts/dicom_listener.py --studies data/demo/studies --port 11112 --aet CDPDNET \\
        [--allow SCANNER1 --allow PACS] [--model apps/cdpdnet/model/pretrained_cdpdnet.pt \\
         --send-to PACS@127.0.0.1:4242]

With --model and --send-to, every completed series is auto-segmented (all 32 ROIs) and the result goes
to that AE as DICOM-SEG. Incomplete or inconsistent series are quarantined under --spool.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from lib.dimse import Destination, SCPConfig, StorageSCP  # noqa: E402


def destination(text: str) -> Destination:
    try:
        aet, hostport = text.split("@", 1)
        host, port = hostport.rsplit(":", 1)
        return Destination(host, int(port), aet)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected AET@host:port, got {text!r}") from None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", required=True, help="studies folder the series are written to (NIfTI)")
    ap.add_argument("--spool", help="received DICOM, kept series and quarantine (default <studies>/../dicom-spool)")
    ap.add_argument("--aet", default="CDPDNET", help="our AE title")
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback only)")
    ap.add_argument("--port", type=int, default=11112)
    ap.add_argument("--allow", action="append", default=[], help="calling AE title allowed (repeat; default any)")
    ap.add_argument("--complete-after", type=float, default=10.0, help="seconds of silence that end a series")
    ap.add_argument("--model", help="checkpoint to auto-segment every new series with")
    ap.add_argument("--send-to", type=destination, help="AET@host:port that gets the DICOM-SEG (needs --model)")
    a = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if a.model and not a.send_to:
        ap.error("--model needs --send-to (the DICOM-SEG is sent there; nothing else keeps it)")
    if a.send_to and not a.model:
        ap.error("--send-to needs --model")
    segment = None
    if a.model:
        from cdpdnet.inference import Segmenter

        seg = Segmenter(a.model)
        segment = lambda image, out: seg.segment(str(image), output=str(out))  # noqa: E731
    studies = Path(a.studies)
    cfg = SCPConfig(studies=studies, spool=Path(a.spool) if a.spool else studies.parent / "dicom-spool",
                    ae_title=a.aet, host=a.host, port=a.port, allowed_callers=tuple(a.allow),
                    complete_after=a.complete_after, segment_with=segment, send_to=a.send_to)
    scp = StorageSCP(cfg).start()
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    done.wait()
    scp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
