#!/usr/bin/env bash
# One GPU session for every open issue that needs a device (run through the library's device
# tool from the repository root; 15 minutes in all, start-up included: the stages below fit
# about 11 minutes of command time and each is cut by `timeout` so that the next still runs):
#   1. issue 14: train / resume the demo-v2 members (scripts/demo_model/gpu_oneshot.py), ~6 min;
#   2. issue 17: test-time mirroring loop vs one batch of 8 vs the float32 path on a full-size
#      5-member model (benchmarks/bench_mirror_batch.py), ~1.5 min;
#   3. issue 17: a whole participant on the GPU: patient07, full-size 5 members, TTA, explanations
#      (benchmarks/bench_participant.py), ~2.5 min;
#   4. issue 2/17: per-member inference against nnUNetv2_predict (benchmarks/bench_inference.py), rest.
# Everything a stage prints goes to $OUT/console.log; training state comes back as
# $OUT/train-state-*.tar (merge with gpu_oneshot.py --merge). Carry (run tool `carry`):
#   .devcarry  (wheels the device lacks in .devcarry/whl, the MNI templates in .devcarry/templates,
#               the open_ms_data masks in .devcarry/lesions and patient07 in
#               .devcarry/shared/open_ms_data/cross_sectional/MNI/patient07)
#   .train-state/demo-v2/state.json  (and any checkpoints that fit)
# CPU dry run: SKIP_INSTALL=1 DEVICE=cpu TRAIN_BUDGET=60 SMALL=1 OUT=/tmp/out scripts/device/gpu_session.sh
set -uo pipefail
START=$(date +%s)
BUDGET=${BUDGET:-660}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/console.log") 2>&1
export PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }
stage() { echo "==== $1 (at $(( $(date +%s) - START )) s, $(left) s left)"; }

if [ -z "${SKIP_INSTALL:-}" ] && ls .devcarry/whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .devcarry/whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
else
    export PYTHONPATH=$PWD
fi
PY=${PY:-python3}
DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, nnunetv2, bids_app; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" || exit 1
export TEMPLATEFLOW_HOME=${TEMPLATEFLOW_HOME:-$PWD/.devcarry/templates}
export MSXPLAIN_SHARED_DATA=${MSXPLAIN_SHARED_DATA:-$PWD/.devcarry/shared}
export MSXPLAIN_OFFLINE=1

# ---- 1. issue 14: demo-v2 members ------------------------------------------------------------
stage "issue 14: demo-v2 training"
TRAIN_BUDGET=${TRAIN_BUDGET:-330}
STATE=${STATE:-.train-state/demo-v2}
if [ -f "$STATE/state.json" ]; then
    $PY scripts/demo_model/gpu_oneshot.py --state "$STATE" --out "$OUT" --device "$DEVICE" \
        --budget-seconds "$TRAIN_BUDGET" --hard-timeout $(( TRAIN_BUDGET + 40 )) -- \
        --templates "$TEMPLATEFLOW_HOME" --lesion-masks "${LESIONS:-.devcarry/lesions}"
    echo "training exit $?"
else
    echo "no $STATE/state.json carried: training skipped"
fi

# ---- 2. issue 17: batched mirroring and half precision ----------------------------------------
stage "issue 17: mirroring loop / batch of 8 / float32"
SIZE=${SIZE:-182 218 182}
MEMBERS=${MEMBERS:-5}
SMALLNET=()
[ -n "${SMALL:-}" ] && SIZE="48 56 48" && MEMBERS=1 && SMALLNET=(--features 8 16 32 64 96)
timeout $(( $(left) > 120 ? 110 : 30 )) $PY benchmarks/bench_mirror_batch.py --device "$DEVICE" \
    --members "$MEMBERS" --size $SIZE "${SMALLNET[@]}"
echo "mirror bench exit $?"

# ---- 3. issue 17: a whole participant ---------------------------------------------------------
stage "issue 17: participant (full-size, TTA, explanations)"
T=$(( $(left) - 100 ))
if [ "$T" -gt 60 ]; then
    SMALLEXPLAIN=()
    [ -n "${SMALL:-}" ] && SMALLEXPLAIN=(--explain-max-lesions 1 --explain-samples 2)
    rm -rf /tmp/bench_participant
    timeout "$T" $PY benchmarks/bench_participant.py --model full-size --members "$MEMBERS" --tta \
        --grid different --no-rerun --keep /tmp/bench_participant "${SMALLNET[@]}" \
        --extra --device "$DEVICE" --explain "${SMALLEXPLAIN[@]}"
    echo "participant bench exit $?"
    cp /tmp/bench_participant/bench.json "$OUT/bench_participant.json" 2>/dev/null
else
    echo "no time left for the participant ($T s)"
fi

# ---- 4. per-member inference vs nnUNetv2_predict -----------------------------------------------
stage "issue 2/17: inference vs nnUNetv2_predict"
T=$(( $(left) - 10 ))
if [ "$T" -gt 60 ] && [ -z "${SMALL:-}" ]; then
    timeout "$T" $PY benchmarks/bench_inference.py --plans default --members "$MEMBERS" --size $SIZE \
        --device "$DEVICE" --workdir /tmp/bench --json "$OUT/bench_inference.json"
    echo "inference bench exit $?"
else
    echo "inference benchmark skipped ($T s left)"
fi
stage "done"
ls -la "$OUT"
