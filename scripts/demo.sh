#!/usr/bin/env bash
# The README's demo: a small synthetic multi-site BIDS dataset (real MS lesion shapes, bundled),
# the participant level with the bundled demo model (and evaluation against the true masks),
# then the group level.
#
#   ./scripts/demo.sh                  # outputs in ./msxplain-demo (of the current folder)
#
# Knobs: DEMO_DIR (output folder), DEMO_SUBJECTS (default 2), NPROCS (default 2), DEMO_TTA=1
# (test-time mirroring; off here because it multiplies the CPU time by up to 8).
# Templates: the TemplateFlow cache, fetched on first use; with TEMPLATEFLOW_HOME set (or
# MSXPLAIN_OFFLINE=1) nothing is downloaded and the cache must hold them
# (msxplain-tools fetch-templates fills it once).
set -euo pipefail
HERE=$(cd "$(dirname "$0")/.." && pwd)
# shellcheck disable=SC1091
. "$HERE/.venv/bin/activate"
# not a model name: `--model demo` must never find the demo's own outputs
DEMO=${DEMO_DIR:-msxplain-demo}
SUBJECTS=${DEMO_SUBJECTS:-2}
TTA_ARG=(--no-tta)
[ "${DEMO_TTA:-0}" = "1" ] && TTA_ARG=()
mkdir -p "$DEMO"

if [ ! -f "$DEMO/bids/dataset_description.json" ]; then
    rm -rf "$DEMO/bids"
    msxplain-tools synth "$DEMO/bids" --n-subjects "$SUBJECTS" --sites 2 --seed 7 --resolution 1.0 --skull-stripped
fi
msxplain "$DEMO/bids" "$DEMO/out" participant -w "$DEMO/work" "${TTA_ARG[@]}" --nprocs "${NPROCS:-2}" \
    --reference-masks "$DEMO/bids/derivatives/lesions"
msxplain "$DEMO/bids" "$DEMO/out" group
echo "demo: derivatives in $DEMO/out (reports: $DEMO/out/sub-*.html and $DEMO/out/group/; logs: $DEMO/out/sub-*/log/)"
