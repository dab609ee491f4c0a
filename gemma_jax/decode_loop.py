"""The sampler's compiled decode loop: its typed state (`DecodeState`) and `decode`, one jitted
`lax.while_loop` that feeds every row's pending token, draws the next one (gemma_jax.sampling)
and records what the caller asked for: the tokens always; the logits, the log-probs (and the
top-n alternatives) and the penalties' token counts only when wanted, so default sampling
carries none of them (None fields are empty pytrees: nothing is allocated or written).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from gemma_jax.sampling import SamplingParams, sample_logits

MIN_BUCKET = 16  # shortest prefill / output-buffer bucket (powers of two above it)


def bucket(n: int) -> int:
  """Smallest power of two >= n (at least MIN_BUCKET)."""
  return max(MIN_BUCKET, 1 << max(n - 1, 0).bit_length())


@struct.dataclass
class DecodeState:
  """What the compiled decode loop carries from one step to the next (a pytree, donated).

  O is the length of the output buffer: `max_new_tokens` rounded up to a bucket, so calls with
  nearby budgets share one compiled loop; n is the number of top alternatives recorded.
  """

  cache: dict[str, Any]  # the model's KV cache, holding every token fed so far
  next_token_B: jax.Array  # int32 [B]: sampled (or the prompt's last token), not yet in the cache
  position_B: jax.Array  # int32 [B]: the position next_token_B is fed at
  done_B: jax.Array  # bool [B]: the row met a stop; from then on it feeds and emits padding
  step: jax.Array  # int32 []: tokens generated so far (the next column of tokens_BO)
  keys_B: jax.Array  # PRNG keys [B]: step n of row i draws with fold_in(keys_B[i], n)
  tokens_BO: jax.Array  # int32 [B, O]: generated ids, pad_id after a row stops
  # float32 [B, O, V]: the logits each token was drawn from (return_logits).
  logits_BOV: jax.Array | None = None
  # float32 [B, O]: each token's log-prob under the raw logits (return_logprobs).
  logprobs_BO: jax.Array | None = None
  # int32 / float32 [B, O, n]: the n most likely tokens at each step and their log-probs.
  top_ids_BOn: jax.Array | None = None
  top_logprobs_BOn: jax.Array | None = None
  # int32 [B, V]: how often each token was generated so far (any penalty on); bool [B, V]: which
  # tokens occur in the row's prompt (repetition penalty on).
  counts_BV: jax.Array | None = None
  prompt_BV: jax.Array | None = None

  @classmethod
  def create(cls, cache, next_token_B, position_B, keys_B, *, max_new_tokens: int, pad_id: int,
             vocab_size: int | None = None, return_logits: bool = False,
             return_logprobs: bool = False, top_logprobs: int = 0) -> DecodeState:
    """The state before the first step (the V-sized buffers need `vocab_size`)."""
    B, O = len(next_token_B), bucket(max_new_tokens)
    if return_logits and vocab_size is None:
      raise ValueError('DecodeState.create: return_logits needs vocab_size.')
    top = (O, top_logprobs) if return_logprobs and top_logprobs else None
    return cls(
        cache=cache,
        next_token_B=jnp.asarray(next_token_B, jnp.int32),
        position_B=jnp.asarray(position_B, jnp.int32),
        done_B=jnp.zeros((B,), bool),
        step=jnp.zeros((), jnp.int32),
        keys_B=keys_B,
        tokens_BO=jnp.full((B, O), pad_id, jnp.int32),
        logits_BOV=jnp.zeros((B, O, vocab_size), jnp.float32) if return_logits else None,
        logprobs_BO=jnp.zeros((B, O), jnp.float32) if return_logprobs else None,
        top_ids_BOn=None if top is None else jnp.zeros((B, *top), jnp.int32),
        top_logprobs_BOn=None if top is None else jnp.zeros((B, *top), jnp.float32))

  def with_history(self, sampling: SamplingParams, vocab_size: int,
                   prompt_ids: Sequence[Sequence[int]] | None = None) -> DecodeState:
    """The state with the penalties' token counts `sampling` needs (unchanged if it needs none or
    has them). prompt_ids: each row's prompt, which the repetition penalty counts (ids outside
    the vocabulary are ignored, as in transformers); None: no prompt counts."""
    if not sampling.penalised or self.counts_BV is not None:
      return self
    B = len(self.next_token_B)
    prompt_BV = None
    if sampling.repetition_penalty != 1:
      mask = np.zeros((B, vocab_size), bool)
      for i, ids in enumerate(prompt_ids or ()):
        ids = np.asarray(ids, np.int64)
        mask[i, ids[(ids >= 0) & (ids < vocab_size)]] = True
      prompt_BV = jnp.asarray(mask)
    return self.replace(counts_BV=jnp.zeros((B, vocab_size), jnp.int32), prompt_BV=prompt_BV)


def _put(buffer, value, step):
  """Writes value [B, ...] into column `step` of buffer [B, O, ...]."""
  return jax.lax.dynamic_update_slice(buffer, value[:, None], (0, step) + (0,) * (value.ndim - 1))


@functools.partial(jax.jit, static_argnames=('graphdef', 'sampling', 'pad_id'),
                   donate_argnames=('state',))
def decode(graphdef, params, state: DecodeState, stop_ids, limit, *, sampling: SamplingParams,
           pad_id: int) -> DecodeState:
  """Steps until every row is done or `state.step == limit`."""
  if sampling.penalised and state.counts_BV is None:
    raise ValueError('decode: penalties need the token counts; use DecodeState.with_history.')

  def cond(st):
    return (st.step < limit) & ~jnp.all(st.done_B)

  def body(st):
    model = nnx.merge(graphdef, params)
    active_B1 = (~st.done_B)[:, None].astype(jnp.int32)  # finished rows feed padding
    logits_B1V, cache = model(st.next_token_B[:, None], st.position_B[:, None], active_B1,
                              st.cache)
    logits_BV = logits_B1V[:, 0].astype(jnp.float32)
    keys_B = jax.vmap(jax.random.fold_in, (0, None))(st.keys_B, st.step)
    drawn_B = sample_logits(logits_BV, keys_B, sampling, st.counts_BV, st.prompt_BV)
    token_B = jnp.where(st.done_B, pad_id, drawn_B)
    new = {}
    if st.logits_BOV is not None:
      new['logits_BOV'] = _put(st.logits_BOV, logits_BV, st.step)
    if st.logprobs_BO is not None:  # vLLM's 'raw' log-probs: before penalties and warpers
      logp_BV = jax.nn.log_softmax(logits_BV, axis=-1)
      logp_B = jnp.take_along_axis(logp_BV, token_B[:, None], axis=-1)[:, 0]
      new['logprobs_BO'] = _put(st.logprobs_BO, logp_B, st.step)
      if st.top_ids_BOn is not None:
        top_logp_Bn, top_ids_Bn = jax.lax.top_k(logp_BV, st.top_ids_BOn.shape[-1])
        new['top_ids_BOn'] = _put(st.top_ids_BOn, top_ids_Bn.astype(jnp.int32), st.step)
        new['top_logprobs_BOn'] = _put(st.top_logprobs_BOn, top_logp_Bn, st.step)
    if st.counts_BV is not None:  # rows already done emit padding, which does not count
      new['counts_BV'] = st.counts_BV.at[jnp.arange(token_B.shape[0]), token_B].add(
          (~st.done_B).astype(jnp.int32))
    return st.replace(
        cache=cache, next_token_B=token_B, position_B=st.position_B + 1, step=st.step + 1,
        done_B=st.done_B | jnp.isin(token_B, stop_ids), tokens_BO=_put(st.tokens_BO, token_B,
                                                                       st.step), **new)

  return jax.lax.while_loop(cond, body, state)
