"""Scoring: the log-probability of each token of given continuations after given prompts, in
batched uncached forwards (the primitive of multiple-choice evals and of RL losses).

How a call runs. Each (prompt, continuation) pair becomes one row, prompt + continuation,
right-padded (segment id 0 on the padding, positions 0..n-1 on the real tokens) to a power-of-two
length bucket, as the sampler's prefill buckets are; rows go `batch_size` at a time (fewer rows
than that: the next power of two), the last batch padded with empty rows to the same shape, so
repeated calls reuse a few compiled shapes. The forward returns final-normed hidden states; only
those that predict a continuation token (gathered into a second, shorter bucket) go through the
output head, so a long prompt costs no [T, V] logits and only [B, U] float32 log-probs come back
to the host.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gemma_jax.decode_loop import bucket
from gemma_jax.loss import token_logprobs


@functools.partial(jax.jit, static_argnames=('graphdef',))
def _score(graphdef, params, tokens_BT, segment_ids_BT, where_BU, targets_BU):
  """Float32 log-probs [B, U] of `targets_BU`, each predicted by the hidden state at `where_BU`.

  Positions run 0..T-1 on every row: the real tokens sit at the start (right padding), so their
  positions are exact, and the padding (segment 0) never reaches them.
  """
  model = nnx.merge(graphdef, params)
  B, T = tokens_BT.shape
  positions_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
  x_BTD, _ = model(tokens_BT, positions_BT, segment_ids_BT, return_hidden=True)
  x_BUD = jnp.take_along_axis(x_BTD, where_BU[..., None], axis=1)
  return token_logprobs(model.logits(x_BUD), targets_BU)


def _ids(text_or_ids, tokenizer, *, add_bos: bool, what: str, vocab_size: int) -> list[int]:
  """Token ids of one prompt (`add_bos`) or continuation; `what` names it in errors."""
  if isinstance(text_or_ids, str):
    if tokenizer is None:
      raise ValueError(f'score: {what} is text but there is no tokenizer; pass token-id lists.')
    ids = tokenizer.encode(text_or_ids, add_bos=add_bos)
  else:
    ids = [int(i) for i in text_or_ids]
  if not ids:
    raise ValueError(f'score: {what} is empty; it needs at least one token.')
  bad = [i for i in ids if not 0 <= i < vocab_size]
  if bad:
    raise ValueError(f'score: {what} has token ids {bad[:5]} outside the model\'s vocabulary '
                     f'[0, {vocab_size}).')
  return ids


def score(model, tokenizer, prompts: Sequence[str | Sequence[int]],
          continuations: Sequence[str | Sequence[int]], *, batch_size: int = 16,
          ) -> list[np.ndarray]:
  """Per-token log-probabilities of `continuations[i]` after `prompts[i]`, for every i.

  Returns one float32 array per pair, [len(continuation tokens)]: entry j is log_softmax of the
  model's float32 logits (raw: no temperature or other sampling rule) at the continuation's
  token j, given the prompt and continuation tokens 0..j-1. Sum it for a sequence score.

  Prompts: text (encoded with BOS, as `Sampler.encode` does) or token-id lists (used as is);
  continuations: text (encoded without BOS) or token-id lists. `tokenizer` (a
  gemma_jax.tokenizer.Tokenizer) may be None when every input is a token-id list.
  `batch_size`: rows per forward. Raises ValueError, naming the pair's index, for mismatched
  list lengths, an empty prompt or continuation, an id outside the vocabulary, or a pair longer
  than the model's `max_seq_len`; all inputs are checked before any compute.
  """
  if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or (
      batch_size < 1):
    raise ValueError(f'score: batch_size must be an integer >= 1, got {batch_size!r}.')
  if isinstance(prompts, str) or isinstance(continuations, str):
    raise ValueError('score: prompts and continuations are lists (one entry per pair), not str.')
  if len(prompts) != len(continuations):
    raise ValueError(f'score: {len(prompts)} prompts but {len(continuations)} continuations; '
                     'pass one continuation per prompt.')
  config = model.config
  V, max_len = config.vocab_size, config.max_seq_len
  pairs = []
  for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
    p = _ids(prompt, tokenizer, add_bos=True, what=f'prompt {i}', vocab_size=V)
    c = _ids(continuation, tokenizer, add_bos=False, what=f'continuation {i}', vocab_size=V)
    if len(p) + len(c) > max_len:
      raise ValueError(f'score: pair {i} has {len(p)} prompt + {len(c)} continuation tokens, '
                       f'more than the model\'s max_seq_len={max_len}; shorten it.')
    pairs.append((p, c))
  if not pairs:
    return []

  pad_id = tokenizer.pad_id if tokenizer is not None else 0
  graphdef, params = nnx.split(model)
  B = min(batch_size, 1 << (len(pairs) - 1).bit_length())  # a power of two below batch_size
  out = []
  for start in range(0, len(pairs), B):
    batch = pairs[start:start + B]
    T = min(bucket(max(len(p) + len(c) for p, c in batch)), max_len)
    U = min(bucket(max(len(c) for _, c in batch)), T)
    tokens = np.full((B, T), pad_id, np.int32)
    segment_ids = np.zeros((B, T), np.int32)
    where = np.zeros((B, U), np.int32)
    targets = np.zeros((B, U), np.int32)
    for r, (p, c) in enumerate(batch):
      n = len(p) + len(c)
      tokens[r, :n], segment_ids[r, :n] = p + c, 1
      # Token len(p) + j of the row is predicted by the hidden state one before it.
      where[r, :len(c)] = np.arange(len(p) - 1, n - 1)
      targets[r, :len(c)] = c
    logprobs_BU = np.asarray(_score(graphdef, params, jnp.asarray(tokens),
                                    jnp.asarray(segment_ids), jnp.asarray(where),
                                    jnp.asarray(targets)))
    out.extend(logprobs_BU[r, :len(c)].copy() for r, (_, c) in enumerate(batch))
  return out


def multiple_choice(model, tokenizer, prompt: str | Sequence[int],
                    choices: Sequence[str | Sequence[int]], *, batch_size: int = 16,
                    ) -> tuple[int, list[float]]:
  """(index of the most likely choice, each choice's summed log-prob) after `prompt`: the
  unnormalised sequence score of multiple-choice evals (`score` of every pair, summed)."""
  if not choices:
    raise ValueError('multiple_choice: choices is empty; pass at least one.')
  sums = [float(np.sum(lp)) for lp in
          score(model, tokenizer, [prompt] * len(choices), choices, batch_size=batch_size)]
  return int(np.argmax(sums)), sums
