#!/usr/bin/env bash
# The test command of the README (CI runs it too).
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -q "$@"
