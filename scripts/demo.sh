#!/usr/bin/env bash
# The README's demo: a small synthetic multi-site BIDS dataset (real MS lesion shapes), the
# participant level with the bundled demo model (and evaluation against the true masks), then
# the group level. Everything lands in ./demo (override with DEMO_DIR). Nothing is downloaded.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck disable=SC1091
. .venv/bin/activate
DEMO=${DEMO_DIR:-demo}
mkdir -p "$DEMO"

# TemplateFlow, offline: an existing TEMPLATEFLOW_HOME, else a copy of ../shared/data/templateflow
if [ -z "${TEMPLATEFLOW_HOME:-}" ] || [ ! -d "$TEMPLATEFLOW_HOME/tpl-MNI152NLin2009cAsym" ]; then
    SHARED=${MSXPLAIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}
    if [ -d "$SHARED/templateflow/tpl-MNI152NLin2009cAsym" ]; then
        mkdir -p "$DEMO/templateflow"
        cp -r "$SHARED/templateflow/." "$DEMO/templateflow/"
        export TEMPLATEFLOW_HOME=$PWD/$DEMO/templateflow
    else
        echo "demo: set TEMPLATEFLOW_HOME to a folder holding tpl-MNI152NLin2009cAsym (res-01/res-02 T1w, masks," \
             "GM/WM/CSF probseg), e.g. fetched once with the templateflow client." >&2
        exit 66
    fi
fi
export TEMPLATEFLOW_AUTOUPDATE=0
LESIONS=${MSXPLAIN_SHARED_DATA:-$(cd .. && pwd)/shared/data}/open_ms_data/cross_sectional/MNI
LESION_ARG=()
[ -d "$LESIONS" ] && LESION_ARG=(--lesion-masks "$LESIONS")

if [ ! -f "$DEMO/bids/dataset_description.json" ]; then
    rm -rf "$DEMO/bids"
    msxplain-tools synth "$DEMO/bids" --n-subjects 2 --sites 2 --seed 7 --resolution 1.0 --skull-stripped \
        "${LESION_ARG[@]}"
fi
msxplain "$DEMO/bids" "$DEMO/out" participant -w "$DEMO/work" --no-tta --nprocs "${NPROCS:-2}" \
    --reference-masks "$DEMO/bids/derivatives/lesions"
msxplain "$DEMO/bids" "$DEMO/out" group
echo "demo: derivatives in $DEMO/out (per-participant HTML reports: $DEMO/out/sub-*.html; group: $DEMO/out/group/)"
