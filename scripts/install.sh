#!/usr/bin/env bash
# The one install recipe of msxplain: used by the README, .ci/run and the Dockerfile.
#
#   ./scripts/install.sh                 # .venv/ with the pinned dependencies, msxplain (editable) and test tools
#
# Environment knobs (the Dockerfile uses them):
#   MSXPLAIN_VENV=<dir>|system   where to install (default: .venv next to this repository)
#   MSXPLAIN_EXTRAS=test|""      optional dependency groups (default: test)
#   MSXPLAIN_EDITABLE=1|0        editable install of the package (default: 1)
#   MSXPLAIN_TORCH=default|cpu   default: PyPI's torch wheels (with CUDA on Linux x86-64, ~4 GB);
#                                cpu: PyTorch's CPU-only wheel index (~200 MB; docs/install.md)
#   PYTHON=python3.11            interpreter used to create the venv
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${MSXPLAIN_VENV:-.venv}
EXTRAS=${MSXPLAIN_EXTRAS-test}
EDITABLE=${MSXPLAIN_EDITABLE:-1}
PYTHON=${PYTHON:-python3}

if [ "$VENV" = "system" ]; then
    PY="$PYTHON"
else
    [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
    PY="$VENV/bin/python"
fi
PIP=("$PY" -m pip)

"${PIP[@]}" install --quiet --upgrade pip
# torch first and pinned: nnunetv2 would otherwise pull whatever torch is newest
TORCH_INDEX=()
case "${MSXPLAIN_TORCH:-default}" in
    default) ;;
    cpu) TORCH_INDEX=(--index-url https://download.pytorch.org/whl/cpu) ;;
    *) echo "install: MSXPLAIN_TORCH must be 'default' or 'cpu'" >&2; exit 64 ;;
esac
"${PIP[@]}" install --quiet "${TORCH_INDEX[@]}" torch==2.14.1 torchvision==0.29.1
spec="."
[ -n "$EXTRAS" ] && spec=".[${EXTRAS}]"
if [ "$EDITABLE" = "1" ]; then
    "${PIP[@]}" install --quiet -e "$spec"
else
    "${PIP[@]}" install --quiet "$spec"
fi
echo "installed: $("$PY" -m bids_app --version) ($PY)"
