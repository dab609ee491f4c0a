#!/usr/bin/env bash
# The GPU measurements, each next to transformers in the same run where there is one.
#   bash bench/gpu_suite.sh [OUTDIR] [SECTIONS]
# SECTIONS (comma-separated, default attention,sample,train: about 9 minutes on one H100/H200):
#   attention  the cuDNN attention path against the XLA path (logits and gradients)
#   sample     bench/sample_bench.py, batch 1 and 16
#   train      bench/train_bench.py, gemma1-2b batch 8, whole-logits loss (ours and transformers)
#   chunk      the same with the head-fused loss (loss_chunk 512) at batch 8 and 16 (ours)
#   train7b    gemma1-7b on one card: XLA's memory plan, then remat=full, bf16 params and AdamW
#              state, head-fused loss, batch 2 (ours; about 4 minutes)
#   gemma4     Gemma 4 26B-A4B shapes, 6 of its 30 layers (one whole period: 5 local, 1 global;
#              5.6 B params, 1.36 B active per token): train_bench at 4 x 2048, bf16 params and
#              AdamW, both sides (estimated peak ~85 GB ours, ~100 GB transformers), then
#              sample_bench's MoE decode on the same shapes, batch 1 and 16 (about 7 minutes,
#              at most 11).
#              GEMMA4_TRAIN / GEMMA4_SAMPLE replace the shape flags (e.g. on an 80 GB card:
#              GEMMA4_TRAIN="--preset gemma4-26b-a4b --layers 4 --seq 2048 --batch 2").
#   quant      bench/quant_bench.py: gemma1-7b shapes, random bf16 weights, decoding with bf16,
#              int8 and int4 (groups of 32) weights at batch 1 and 16: tokens/s,
#              ratio to bf16, parameter bytes and % of the weight-bytes roofline (goal: int8 at
#              batch 1 >= 1.6x bf16; about 5 minutes, at most 7). QUANT_SAMPLE replaces the
#              flags; the same section on CPU in about a minute (nvidia-smi's absence is harmless):
#              QUANT_SAMPLE="--preset tiny-gemma1 --dtype bfloat16 --batch 1,16 --new_tokens 8
#              --modes float,int8:16,int4:16 --repeats 1 --bandwidth_mib 64" PYTHON=.venv/bin/python
#              bash bench/gpu_suite.sh /tmp/out quant
#   grpo       bench/grpo_bench.py: a GRPO job (configs/gemma3_270m_grpo.py's task, LoRA) in gemma3-1b
#              shapes with random bf16 weights, 8 prompts x 8 completions per step: rollout vs
#              update seconds per step (about 4 minutes; needs grain and ml_collections, e.g. from
#              .whl/). GRPO_BENCH replaces the flags; on CPU in about a minute:
#              GRPO_BENCH="--preset tiny-gemma3 --steps 3" PYTHON=.venv/bin/python
#              bash bench/gpu_suite.sh /tmp/out grpo
# Packages missing on a bare GPU image (ml_collections, grain, ...) can be put as wheels in .whl/.
set -u
export PYTHONUNBUFFERED=1
OUTDIR=${1:-${OUT:-/tmp/gpu_suite}}
SECTIONS=",${2:-attention,sample,train},"
want() { [[ $SECTIONS == *",$1,"* ]]; }
mkdir -p "$OUTDIR"
PY=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import jax, flax, torch, transformers; print('jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"

if want attention; then
  echo "== attention: cuDNN path vs XLA path =="
  timeout 100 $PY bench/attention_check.py 2>&1 | tee "$OUTDIR/attention.log"
  if [ "${PIPESTATUS[0]}" != 0 ]; then
    echo "cuDNN attention check failed: the benchmarks below use GEMMA_JAX_ATTENTION=xla"
    export GEMMA_JAX_ATTENTION=xla
  fi
fi

if want sample; then
  echo "== sampling =="
  timeout 200 $PY bench/sample_bench.py --gpu --budget_s 150 --repeats 3 2>&1 | tee "$OUTDIR/sample.log"
fi

if want train; then
  echo "== training =="
  timeout 270 $PY bench/train_bench.py --batch 8 --steps 4 --warmup 2 --timeout 130 \
    --json "$OUTDIR/train.json" 2>&1 | tee "$OUTDIR/train.log"
fi

if want chunk; then
  echo "== training, head-fused loss =="
  timeout 270 $PY bench/train_bench.py --batch 8,16 --loss_chunk 512 --sides ours --steps 4 \
    --warmup 2 --timeout 130 --json "$OUTDIR/train_chunk.json" 2>&1 | tee "$OUTDIR/train_chunk.log"
fi

if want train7b; then
  echo "== gemma1-7b on one card =="
  timeout 100 $PY bench/step_memory.py --runs gemma1-7b:2:2048:full:bfloat16:512 2>&1 \
    | tee "$OUTDIR/step_memory_7b.log"
  timeout 200 $PY bench/train_bench.py --preset gemma1-7b --batch 2 --remat full \
    --param_dtype bfloat16 --loss_chunk 512 --sides ours --steps 3 --warmup 1 --timeout 190 \
    --json "$OUTDIR/train_7b.json" 2>&1 | tee "$OUTDIR/train_7b.log"
fi

if want gemma4; then
  G4_TRAIN=${GEMMA4_TRAIN:-"--preset gemma4-26b-a4b --layers 6 --seq 2048 --batch 4"}
  G4_SAMPLE=${GEMMA4_SAMPLE:-"--preset gemma4-26b-a4b --layers 6"}
  echo "== gemma4 training: $G4_TRAIN =="
  # shellcheck disable=SC2086  # the shape flags are meant to split
  timeout 420 $PY bench/train_bench.py $G4_TRAIN --steps 4 --warmup 2 --timeout 200 \
    --json "$OUTDIR/train_gemma4.json" 2>&1 | tee "$OUTDIR/train_gemma4.log"
  echo "== gemma4 decoding: $G4_SAMPLE =="
  # shellcheck disable=SC2086
  timeout 230 $PY bench/sample_bench.py --gpu $G4_SAMPLE --budget_s 170 --repeats 1 2>&1 \
    | tee "$OUTDIR/sample_gemma4.log"
fi

if want quant; then
  QUANT=${QUANT_SAMPLE:-"--preset gemma1-7b --batch 1,16 --repeats 3 --budget_s 330"}
  echo "== quantized decoding: $QUANT =="
  # shellcheck disable=SC2086  # the flags are meant to split
  timeout 420 $PY bench/quant_bench.py $QUANT 2>&1 | tee "$OUTDIR/quant.log"
fi

if want grpo; then
  GRPO=${GRPO_BENCH:-"--preset gemma3-1b --dtype bfloat16 --steps 6 --batch 8"}
  echo "== GRPO step split (rollout vs update): $GRPO =="
  # shellcheck disable=SC2086  # the flags are meant to split
  timeout 400 $PY bench/grpo_bench.py $GRPO 2>&1 | tee "$OUTDIR/grpo.log"
fi
