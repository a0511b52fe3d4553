#!/usr/bin/env bash
# The test commands of the README:
#   ./scripts/test.sh          the default suite (no full-pipeline runs; under ~12 min on 2 cores)
#   ./scripts/test.sh --all    everything, the full-pipeline runs (marked slow) included: what CI runs
# Other arguments go to pytest (a -m of your own replaces the default selection).
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
    shift
    select=()
fi
for arg in "$@"; do
    [ "$arg" = "-m" ] && select=()
done
exec .venv/bin/python -m pytest -q --durations=20 "${select[@]}" "$@"
