#!/usr/bin/env bash
# One GPU session (run through the library's device tool, from the repository root):
#   1. train the demo ensemble with the recipe (msxplain-tools train-demo) on synthetic data;
#   2. benchmark per-member inference against nnUNetv2_predict with full-size default plans,
#      5 members and TTA on a 1 mm brain-sized image.
# Packages missing on the device travel as wheels in .devcarry/whl (see docs/demo-model.md);
# SimpleITK's 52 MB wheel does not fit the transfer, so an import-only stand-in is used
# (nnU-Net imports it but, with the NibabelIOWithReorient reader, never calls it).
set -uo pipefail
START=$(date +%s)
BUDGET=${BUDGET:-570}
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
exec > >(tee "$OUT/console.log") 2>&1
export PYTHONUNBUFFERED=1
left() { echo $(( BUDGET - ($(date +%s) - START) )); }

if [ -z "${SKIP_INSTALL:-}" ]; then  # (SKIP_INSTALL=1: a dry run in a venv that has everything)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
        .devcarry/whl/*.whl || exit 1
fi
export PYTHONPATH=/tmp/site:$PWD:$PWD/.devcarry/shim
DEVICE=${DEVICE:-cuda}
[ "$DEVICE" = cuda ] && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, numpy, nnunetv2, bids_app.training.recipe as r; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" || exit 1
NCPU=$(nproc)
W=$(( NCPU > 2 ? NCPU - 1 : 1 ))

# ---- 1. demo ensemble ------------------------------------------------------------------
TRAIN_SECONDS=${TRAIN_SECONDS:-200}
python3 -c "import sys; from bids_app.cli.tools import main; sys.exit(main())" train-demo /tmp/recipe \
    --out-model /tmp/model --n-train ${N_TRAIN:-60} --n-val ${N_VAL:-10} --n-test ${N_TEST:-8} \
    --resolution ${RES:-1.0} --workers "$W" --members ${MEMBERS:-4} --train-seconds "$TRAIN_SECONDS" \
    --iterations-per-epoch ${ITERS:-50} --device "$DEVICE" --features ${FEATURES:-8 16 32 64 96} \
    --patch-size ${PATCH:-96 96 96} --batch-size 2 --da-workers ${DA:-3} ${EXTRA:-} \
    --templates .devcarry/templates --lesion-masks .devcarry/lesions
echo "train-demo exit $? after $(( $(date +%s) - START )) s"
cp /tmp/recipe/report.json "$OUT/report.json" 2>/dev/null
tar czf "$OUT/logs.tar.gz" -C /tmp/recipe logs cases.json \
    $(cd /tmp/recipe && ls -d nnUNet_results/*/*/fold_*/training_log_*.txt nnUNet_results/*/*/fold_*/progress.png 2>/dev/null) \
    nnUNet_preprocessed/Dataset501_MsxplainSynth/nnUNetPlans.json 2>/dev/null
MODEL=$(ls -d /tmp/model/*/* 2>/dev/null | head -1)
if [ -n "$MODEL" ]; then
    ( cd "$(dirname "$(dirname "$MODEL")")" && rel=${MODEL#$(dirname "$(dirname "$MODEL")")/} &&
      tar cf "$OUT/model_meta.tar" "$rel"/*.json &&
      tar cf "$OUT/model_a.tar" "$rel"/fold_0 "$rel"/fold_1 &&
      tar cf "$OUT/model_b.tar" $(ls -d "$rel"/fold_* | tail -n +3) )
fi

# ---- 2. inference benchmark (issue 2), if time is left -----------------------------------
T=$(( $(left) - 15 ))
if [ "$T" -gt 60 ]; then
    timeout "$T" python3 benchmarks/bench_inference.py --plans ${BENCH_PLANS:-default} --members 5 \
        --size ${BENCH_SIZE:-182 218 182} --device "$DEVICE" --workdir /tmp/bench --json "$OUT/bench_inference_gpu.json"
    echo "bench exit $?"
else
    echo "no time left for the inference benchmark ($T s)"
fi
echo "session done after $(( $(date +%s) - START )) s"
ls -la "$OUT"
