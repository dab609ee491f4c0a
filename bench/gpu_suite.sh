#!/usr/bin/env bash
# All GPU measurements in one go (about 9 minutes on one H100/H200): the cuDNN attention check,
# the sampling benchmark and the training benchmark, each next to transformers in the same run.
#   bash bench/gpu_suite.sh [OUTDIR]
# Packages missing on a bare GPU image (ml_collections, grain, ...) can be put as wheels in .whl/.
set -u
export PYTHONUNBUFFERED=1
OUTDIR=${1:-${OUT:-/tmp/gpu_suite}}
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

echo "== attention: cuDNN path vs XLA path =="
timeout 100 $PY bench/attention_check.py 2>&1 | tee "$OUTDIR/attention.log"
if [ "${PIPESTATUS[0]}" != 0 ]; then
  echo "cuDNN attention check failed: the benchmarks below use GEMMA_JAX_ATTENTION=xla"
  export GEMMA_JAX_ATTENTION=xla
fi

echo "== sampling =="
timeout 200 $PY bench/sample_bench.py --gpu --budget_s 150 --repeats 3 2>&1 | tee "$OUTDIR/sample.log"

echo "== training =="
timeout 270 $PY bench/train_bench.py --batch 8 --steps 4 --warmup 2 --timeout 130 \
  --json "$OUTDIR/train.json" 2>&1 | tee "$OUTDIR/train.log"
