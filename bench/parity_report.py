"""Prints max|Δ|/max|ref| of our logits against transformers on the parity-test models.

  .venv/bin/python bench/parity_report.py
"""

import os
import sys
import tempfile

import jax.numpy as jnp
import numpy as np
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests'))
from gemma_jax.convert import load_hf  # pylint: disable=g-import-not-at-top
from hf_models import FAMILIES, hf_logits, make_hf_model  # pylint: disable=g-import-not-at-top


def rel(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float32) - b)) / np.max(np.abs(b)))


def main():
  print(f'{"family":<11} {"ours f32":>9} {"ours bf16":>10} {"HF bf16":>9}   (vs HF float32, 3x20 tokens)')
  for family in FAMILIES:
    hf = make_hf_model(family)
    with tempfile.TemporaryDirectory() as d:
      hf.save_pretrained(d)
      tokens = np.random.default_rng(0).integers(0, hf.config.vocab_size, (3, 20))
      ref = hf_logits(hf, tokens)
      f32 = load_hf(d)(jnp.asarray(tokens))[0]
      bf16 = load_hf(d, dtype=jnp.bfloat16)(jnp.asarray(tokens))[0]
      hf16 = hf_logits(transformers.AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16),
                       tokens)
    print(f'{family:<11} {rel(f32, ref):>9.1e} {rel(bf16, ref):>10.1e} {rel(hf16, ref):>9.1e}')


if __name__ == '__main__':
  main()
