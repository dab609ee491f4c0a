#!/usr/bin/env bash
# The main job, from a fresh machine with only python3: set up .venv, fine-tune the quickstart
# model on the shipped letter-reversal data (2 CPU cores: ~2 minutes), print exact match on
# held-out prompts before and after training, then sample from the exported checkpoint.
# Usage: bash scripts/quickstart.sh [WORKDIR]        (default workdir/quickstart; rerunning resumes)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-workdir/quickstart}"
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -r requirements.txt
# Editable gemma_jax, so that experiment code outside this checkout can `import gemma_jax` too.
# (--no-deps: the line above installed them; the filter hides setuptools' import-hook notice.)
PYTHONWARNINGS='ignore:Editable installation' .venv/bin/python -m pip install -q --no-deps -e .
.venv/bin/python train.py --config=configs/quickstart.py --workdir="$WORKDIR"
echo
echo "Sampling from $WORKDIR/final (held-out prompts, greedy):"
.venv/bin/python sample.py --ckpt="$WORKDIR/final" --chat --greedy --max_new_tokens=16 \
  --prompt="Reverse the letters: q u i c k" --prompt="Reverse the letters: j a x" </dev/null
