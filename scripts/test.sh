#!/usr/bin/env bash
# Set everything up and run the tests. The default run leaves out tests marked 'slow';
# pass --slow to run only those, --all for both. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export HF_HUB_OFFLINE=1 MLFLOW_ALLOW_FILE_STORE=true PYTHONDONTWRITEBYTECODE=1
marker=(-m "not slow")
case "${1:-}" in
  --slow) marker=(-m slow); shift ;;
  --all) marker=(-m "slow or not slow"); shift ;;
esac
exec .venv/bin/python -m pytest "${marker[@]}" -q -rfEs "$@"
