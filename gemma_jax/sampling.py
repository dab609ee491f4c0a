"""Sampling rules: how the next token is drawn from the logits (temperature, top-k, top-p).

`SamplingParams` describes a rule (`GREEDY` is argmax); `sample_logits` applies it to a batch of
float32 logits with one PRNG key per row, inside the sampler's compiled decode loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is drawn from the logits, in this order: temperature, top-k, top-p.

  temperature: logits are divided by it; 0 means greedy (argmax; top_k/top_p then do nothing).
  top_k: keep the k most likely tokens (0: all).
  top_p: then keep the smallest most-likely set whose probability reaches top_p (1.0: all).
  The draw is reproducible for a seed: row i of a call uses the key fold_in(key(seed), i).
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:  # also rejects NaN
      raise ValueError(f'SamplingParams: temperature must be >= 0, got {self.temperature}.')
    if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or (
        self.top_k < 0):
      raise ValueError(f'SamplingParams: top_k must be an integer >= 0, got {self.top_k!r}.')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'SamplingParams: top_p must be in (0, 1], got {self.top_p}.')

  @property
  def greedy(self) -> bool:
    """Whether the rule is argmax (temperature 0), which needs no PRNG draw."""
    return self.temperature == 0


GREEDY = SamplingParams(temperature=0.0)


def sample_logits(logits_BV: jax.Array, keys_B: jax.Array, sampling: SamplingParams) -> jax.Array:
  """Draws one token id per row from float32 logits [B, V] with one PRNG key per row.

  top_k uses `lax.top_k`; top_p without top_k sorts the whole vocabulary every step.
  """
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  V = logits_BV.shape[-1]
  k = min(sampling.top_k, V) if sampling.top_k else (V if sampling.top_p < 1 else 0)
  if k == 0:
    return jax.vmap(jax.random.categorical)(keys_B, logits_BV).astype(jnp.int32)
  # Suffix k: the k top-k candidates per row (K is reserved for kv heads).
  vals_Bk, idx_Bk = jax.lax.top_k(logits_BV, k)  # sorted, most likely first
  if sampling.top_p < 1:
    probs_Bk = jax.nn.softmax(vals_Bk, axis=-1)
    mass_before_Bk = jnp.cumsum(probs_Bk, axis=-1) - probs_Bk
    vals_Bk = jnp.where(mass_before_Bk < sampling.top_p, vals_Bk, -jnp.inf)
  choice_B = jax.vmap(jax.random.categorical)(keys_B, vals_Bk)
  return jnp.take_along_axis(idx_Bk, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
