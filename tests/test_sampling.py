"""gemma_jax.sampling: each rule draws with the probabilities it promises; the penalties and
min-p equal transformers' logits processors (vLLM's formula for frequency / presence)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from gemma_jax.sampling import SamplingParams, apply_penalties, sample_logits, warp_logits


def renormalised(logits, sampling):
  """Reference distribution: softmax(logits / T), keep top-k, then the top-p nucleus, then the
  tokens at least min_p times as likely as the most likely one."""
  p = np.exp((logits - logits.max()) / sampling.temperature)
  p /= p.sum()
  order = np.argsort(-p, kind='stable')
  keep = np.zeros_like(p, bool)
  k = sampling.top_k or len(p)
  kept = p[order[:k]] / p[order[:k]].sum()
  before = np.cumsum(kept) - kept
  keep[order[:k][before < sampling.top_p]] = True
  keep &= p >= sampling.min_p * p.max()
  q = np.where(keep, p, 0)
  return q / q.sum()


RULES = [SamplingParams(temperature=1.0, top_k=4), SamplingParams(temperature=1.0, top_p=0.7),
         SamplingParams(temperature=0.7, top_k=6, top_p=0.8), SamplingParams(temperature=2.0),
         SamplingParams(temperature=1.5, min_p=0.3), SamplingParams(temperature=1.0, top_p=0.9,
                                                                    min_p=0.4)]


@pytest.mark.parametrize('sampling', RULES, ids=str)
def test_sampling_frequencies_match_distribution(sampling):
  """20k draws with distinct keys (fixed seed): every frequency within 0.015 of the renormalised
  probability (> 5 standard deviations for n = 20k) and none outside the kept set."""
  logits = np.array([2.0, 1.5, 1.2, 1.0, 0.6, 0.5, 0.1, -0.3, -1.0, -2.0, 0.9, 1.4], np.float32)
  n = 20_000
  keys = jax.random.split(jax.random.key(0), n)
  draws = sample_logits(jnp.broadcast_to(logits, (n, len(logits))), keys, sampling)
  freq = np.bincount(np.asarray(draws), minlength=len(logits)) / n
  ref = renormalised(logits, sampling)
  assert np.all(freq[ref == 0] == 0)
  np.testing.assert_allclose(freq, ref, atol=0.015)


def test_bad_rules_are_errors():
  for kwargs, match in (({'top_p': 0.0}, 'top_p must be in'), ({'top_p': 1.5}, 'top_p must be in'),
                        ({'temperature': -1.0}, 'temperature must be >= 0'),
                        ({'temperature': float('nan')}, 'temperature must be >= 0'),
                        ({'top_k': -2}, 'top_k must be an integer'),
                        ({'top_k': 2.5}, 'top_k must be an integer'),
                        ({'top_k': True}, 'top_k must be an integer')):
    with pytest.raises(ValueError, match=match):
      SamplingParams(**kwargs)
  assert SamplingParams(top_k=np.int64(3)).top_k == 3


# Logits processors against transformers' (and vLLM's formula) on the same logits and histories.

V = 64


def _case(seed=0, B=4, prompt_len=6, generated=10):
  """Random logits [B, V] (both signs, spread like a model's) and per-row histories: prompt ids
  and generated ids (repeats likely: V is small)."""
  rng = np.random.default_rng(seed)
  logits = (rng.standard_normal((B, V)) * 3).astype(np.float32)
  prompt = rng.integers(0, V, (B, prompt_len))
  gen = rng.integers(0, V // 4, (B, generated))  # few distinct ids: counts above 1
  counts = np.stack([np.bincount(g, minlength=V) for g in gen]).astype(np.int32)
  in_prompt = np.zeros((B, V), bool)
  np.put_along_axis(in_prompt, prompt, True, axis=1)
  return logits, prompt, gen, counts, in_prompt


def _ours(logits, sampling, counts, in_prompt):
  """Our penalties then warpers, scattered back to [B, V] with -inf where dropped."""
  penalised = apply_penalties(jnp.asarray(logits), sampling, jnp.asarray(counts),
                              jnp.asarray(in_prompt))
  if sampling.greedy:
    return np.asarray(penalised)
  vals, idx = warp_logits(penalised, sampling)
  if idx is None:
    return np.asarray(vals)
  out = np.full(logits.shape, -np.inf, np.float32)
  np.put_along_axis(out, np.asarray(idx), np.asarray(vals), axis=1)
  return out


def _transformers(logits, sampling, prompt, gen):
  """transformers' processors in `generate`'s order (repetition penalty; then, sampling,
  temperature, top-k, top-p, min-p) over input_ids = prompt + generated."""
  from transformers.generation import logits_process as lp
  chain = [lp.RepetitionPenaltyLogitsProcessor(sampling.repetition_penalty)]
  if not sampling.greedy:
    chain.append(lp.TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_k:
      chain.append(lp.TopKLogitsWarper(sampling.top_k))
    if sampling.top_p < 1:
      chain.append(lp.TopPLogitsWarper(sampling.top_p))
    if sampling.min_p:
      chain.append(lp.MinPLogitsWarper(sampling.min_p))
  scores = torch.tensor(logits)
  ids = torch.tensor(np.concatenate([prompt, gen], axis=1))
  for processor in chain:
    scores = processor(ids, scores)
  return scores.numpy()


PROCESSOR_RULES = [
    SamplingParams(temperature=0.0, repetition_penalty=1.3),
    SamplingParams(temperature=1.0, repetition_penalty=0.7, min_p=0.05),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.1, repetition_penalty=1.5),
    SamplingParams(temperature=1.3, top_p=0.8, min_p=0.2, repetition_penalty=1.2),
    SamplingParams(temperature=0.5, top_k=8, repetition_penalty=2.0),
]


@pytest.mark.parametrize('sampling', PROCESSOR_RULES, ids=str)
def test_processors_equal_transformers(sampling):
  """The same tokens are dropped and the kept logits agree to 1e-6 with transformers' chain."""
  for seed in range(3):
    logits, prompt, gen, counts, in_prompt = _case(seed)
    ours = _ours(logits, sampling, counts, in_prompt)
    ref = _transformers(logits, sampling, prompt, gen)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(ref))
    kept = ~np.isinf(ref)
    assert kept.sum(1).min() >= 1 and (sampling.greedy or (~kept).any())  # the filters bind
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=0, atol=1e-6)
  # The penalty binds: some kept logit differs from the raw one.
  assert np.abs(_ours(logits, SamplingParams(temperature=0.0, repetition_penalty=
                                             sampling.repetition_penalty), counts, in_prompt)
                - logits).max() > 0.1


def test_frequency_and_presence_follow_vllm():
  """vLLM's apply_penalties: repetition over prompt | generated, then logit -= frequency * count
  - presence * (count > 0), the counts over generated tokens only."""
  logits, prompt, gen, counts, in_prompt = _case(1)
  for rep, freq, pres in [(1.0, 0.5, 0.0), (1.0, 0.0, 1.5), (1.4, -0.3, 0.8), (1.0, 2.0, -2.0)]:
    sampling = SamplingParams(temperature=0.0, repetition_penalty=rep, frequency_penalty=freq,
                              presence_penalty=pres)
    ref = logits.copy()
    seen = in_prompt | (counts > 0)
    ref = np.where(seen, np.where(ref > 0, ref / rep, ref * rep), ref)
    ref = ref - freq * counts - pres * (counts > 0)
    got = np.asarray(apply_penalties(jnp.asarray(logits), sampling, jnp.asarray(counts),
                                     jnp.asarray(in_prompt)))
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-6)
    assert np.abs(got - logits).max() > 0.1
    # The prompt alone never moves frequency / presence: only generated tokens count.
    only_prompt = np.asarray(apply_penalties(jnp.asarray(logits), sampling,
                                             jnp.zeros_like(counts), jnp.asarray(in_prompt)))
    expect = np.where(in_prompt, np.where(logits > 0, logits / rep, logits * rep), logits)
    np.testing.assert_allclose(only_prompt, expect, rtol=0, atol=1e-6)


def test_greedy_takes_the_argmax_of_the_penalised_logits():
  logits, _, _, counts, in_prompt = _case(2)
  counts[np.arange(len(logits)), logits.argmax(-1)] += 2  # each row's raw argmax was generated
  sampling = SamplingParams(temperature=0.0, repetition_penalty=3.0, frequency_penalty=1.0)
  keys = jax.random.split(jax.random.key(0), len(logits))
  got = sample_logits(jnp.asarray(logits), keys, sampling, jnp.asarray(counts),
                      jnp.asarray(in_prompt))
  want = np.argmax(_ours(logits, sampling, counts, in_prompt), axis=-1)
  np.testing.assert_array_equal(got, want)
  assert (want != logits.argmax(-1)).all()  # the penalties changed every row's choice


def test_bad_penalties_are_errors():
  for kwargs, match in (({'repetition_penalty': 0.0}, 'repetition_penalty must be a finite'),
                        ({'repetition_penalty': -1.0}, 'repetition_penalty must be a finite'),
                        ({'repetition_penalty': float('inf')}, 'repetition_penalty must be'),
                        ({'frequency_penalty': 2.5}, r'frequency_penalty must be in \[-2, 2\]'),
                        ({'presence_penalty': -3.0}, r'presence_penalty must be in \[-2, 2\].*-3'),
                        ({'presence_penalty': float('nan')}, 'presence_penalty must be in'),
                        ({'min_p': 1.5}, r'min_p must be in \[0, 1\]'),
                        ({'min_p': -0.1}, r'min_p must be in \[0, 1\]')):
    with pytest.raises(ValueError, match=match):
      SamplingParams(**kwargs)
  with pytest.raises(ValueError, match='need counts_BV'):
    sample_logits(jnp.zeros((1, 4)), jax.random.split(jax.random.key(0), 1),
                  SamplingParams(presence_penalty=1.0))
