#!/usr/bin/env bash
# One command from a fresh clone: set up, fetch the real demo CTs, build the demo studies folder,
# make (or reuse) the demo model, and start the MONAI Label server on http://127.0.0.1:8000.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 MLFLOW_ALLOW_FILE_STORE=true
PY=.venv/bin/python
$PY scripts/fetch_demo_data.py --out data/demo
$PY scripts/make_demo_studies.py --datalist data/demo/datalist.json --studies data/demo/studies
$PY scripts/make_demo_model.py --datalist data/demo/datalist.json --install apps/cdpdnet/model/pretrained_cdpdnet.pt
exec $PY -m monailabel.main start_server --app apps/cdpdnet --studies data/demo/studies \
  --conf models cdpdnet --conf auth false --host 127.0.0.1 --port "${PORT:-8000}" "$@"
