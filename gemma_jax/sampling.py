"""Sampling rules: how the next token is drawn from the logits (penalties, temperature, top-k,
top-p, min-p).

`SamplingParams` describes a rule (`GREEDY` is argmax); `sample_logits` applies it to a batch of
float32 logits with one PRNG key per row, inside the sampler's compiled decode loop. The
processors are also importable one by one (`apply_penalties`, `warp_logits`) for tests and
notebooks.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How the next token is drawn from the logits.

  Order (transformers' `generate` order; the three penalties in vLLM's): the penalties --
  repetition, then frequency, then presence -- change the logits; then temperature, top-k,
  top-p and min-p choose the candidates and their weights. Greedy (temperature 0) takes the argmax
  of the penalised logits (the warpers do not change it), as transformers does.

  temperature: logits are divided by it; 0 means greedy (argmax; top_k/top_p/min_p then do
    nothing).
  top_k: keep the k most likely tokens (0: all).
  top_p: then keep the smallest most-likely set whose probability reaches top_p (1.0: all).
  min_p: then drop tokens whose probability (after temperature, among those kept) is below min_p
    times the most likely token's (0: off; transformers' MinPLogitsWarper).
  repetition_penalty: every token in the row's prompt or generated so far has its logit divided
    by it when positive, multiplied when negative (1.0: off; transformers'
    RepetitionPenaltyLogitsProcessor, CTRL's rule). Must be > 0.
  frequency_penalty: subtracted from a token's logit once per time it was generated so far in the
    row (the prompt does not count; 0: off; OpenAI's / vLLM's rule). In [-2, 2].
  presence_penalty: subtracted once from the logit of every token generated so far in the row
    (the prompt does not count; 0: off). In [-2, 2].
  The draw is reproducible for a seed: row i of a call uses the key fold_in(key(seed), i).
  """

  temperature: float = 1.0
  top_k: int = 0
  top_p: float = 1.0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  frequency_penalty: float = 0.0
  presence_penalty: float = 0.0

  def __post_init__(self):
    if not self.temperature >= 0:  # also rejects NaN
      raise ValueError(f'SamplingParams: temperature must be >= 0, got {self.temperature}.')
    if not isinstance(self.top_k, (int, np.integer)) or isinstance(self.top_k, bool) or (
        self.top_k < 0):
      raise ValueError(f'SamplingParams: top_k must be an integer >= 0, got {self.top_k!r}.')
    if not 0 < self.top_p <= 1:
      raise ValueError(f'SamplingParams: top_p must be in (0, 1], got {self.top_p}.')
    if not 0 <= self.min_p <= 1:
      raise ValueError(f'SamplingParams: min_p must be in [0, 1], got {self.min_p}.')
    if not (self.repetition_penalty > 0 and math.isfinite(self.repetition_penalty)):
      raise ValueError('SamplingParams: repetition_penalty must be a finite number > 0 (1.0: '
                       f'off), got {self.repetition_penalty}.')
    for name in ('frequency_penalty', 'presence_penalty'):
      value = getattr(self, name)
      if not -2 <= value <= 2:
        raise ValueError(f'SamplingParams: {name} must be in [-2, 2] (0: off), got {value}.')

  @property
  def greedy(self) -> bool:
    """Whether the rule is argmax (temperature 0), which needs no PRNG draw."""
    return self.temperature == 0

  @property
  def penalised(self) -> bool:
    """Whether any penalty is on: the decode loop then counts each row's generated tokens."""
    return (self.repetition_penalty != 1 or self.frequency_penalty != 0
            or self.presence_penalty != 0)


GREEDY = SamplingParams(temperature=0.0)


def apply_penalties(logits_BV: jax.Array, sampling: SamplingParams, counts_BV: jax.Array,
                    prompt_BV: jax.Array | None = None) -> jax.Array:
  """The penalised float32 logits [B, V]: repetition, then frequency, then presence.

  counts_BV: int32, how often each token was generated so far in the row. prompt_BV: bool, which
  tokens occur in the row's prompt (needed only for the repetition penalty; None: none do).
  """
  logits_BV = logits_BV.astype(jnp.float32)
  seen_BV = counts_BV > 0
  if sampling.repetition_penalty != 1:
    penalty = sampling.repetition_penalty
    in_history_BV = seen_BV if prompt_BV is None else seen_BV | prompt_BV
    penalised_BV = jnp.where(logits_BV < 0, logits_BV * penalty, logits_BV / penalty)
    logits_BV = jnp.where(in_history_BV, penalised_BV, logits_BV)
  if sampling.frequency_penalty:
    logits_BV = logits_BV - sampling.frequency_penalty * counts_BV.astype(jnp.float32)
  if sampling.presence_penalty:
    logits_BV = logits_BV - sampling.presence_penalty * seen_BV.astype(jnp.float32)
  return logits_BV


def warp_logits(logits_BV: jax.Array, sampling: SamplingParams
                ) -> tuple[jax.Array, jax.Array | None]:
  """(vals_Bk, idx_Bk): the candidates a sampled (temperature > 0) rule draws from, after
  temperature, top-k, top-p and min-p; dropped candidates have logit -inf.

  With top-k or top-p, `lax.top_k` keeps k candidates per row sorted most likely first (top-p
  without top-k sorts the whole vocabulary every step) and idx_Bk holds their token ids; without
  either, the candidates are the whole vocabulary in order and idx_Bk is None.
  """
  logits_BV = logits_BV.astype(jnp.float32) / sampling.temperature
  V = logits_BV.shape[-1]
  k = min(sampling.top_k, V) if sampling.top_k else (V if sampling.top_p < 1 else 0)
  if k == 0:
    vals_Bk, idx_Bk = logits_BV, None
  else:  # suffix k: the k top-k candidates per row (K is reserved for kv heads)
    vals_Bk, idx_Bk = jax.lax.top_k(logits_BV, k)
    if sampling.top_p < 1:
      probs_Bk = jax.nn.softmax(vals_Bk, axis=-1)
      mass_before_Bk = jnp.cumsum(probs_Bk, axis=-1) - probs_Bk
      vals_Bk = jnp.where(mass_before_Bk < sampling.top_p, vals_Bk, -jnp.inf)
  if sampling.min_p > 0:
    probs_Bk = jax.nn.softmax(vals_Bk, axis=-1)
    floor_B1 = sampling.min_p * jnp.max(probs_Bk, axis=-1, keepdims=True)
    vals_Bk = jnp.where(probs_Bk < floor_B1, -jnp.inf, vals_Bk)
  return vals_Bk, idx_Bk


def sample_logits(logits_BV: jax.Array, keys_B: jax.Array, sampling: SamplingParams,
                  counts_BV: jax.Array | None = None,
                  prompt_BV: jax.Array | None = None) -> jax.Array:
  """Draws one token id per row from float32 logits [B, V] with one PRNG key per row.

  counts_BV / prompt_BV: each row's history for the penalties (see `apply_penalties`); required
  when `sampling.penalised`.
  """
  if sampling.penalised:
    if counts_BV is None:
      raise ValueError('sample_logits: the penalties of this SamplingParams need counts_BV, the '
                       'per-row counts of generated tokens.')
    logits_BV = apply_penalties(logits_BV, sampling, counts_BV, prompt_BV)
  if sampling.greedy:
    return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
  vals_Bk, idx_Bk = warp_logits(logits_BV, sampling)
  choice_B = jax.vmap(jax.random.categorical)(keys_B, vals_Bk).astype(jnp.int32)
  if idx_Bk is None:
    return choice_B
  return jnp.take_along_axis(idx_Bk, choice_B[:, None], axis=-1)[:, 0].astype(jnp.int32)
