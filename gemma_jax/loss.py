"""Token cross-entropy for SFT (over whole logits, or fused with the output head in chunks), and
per-token and per-sequence log-probabilities for the preference and RL losses.

The output head of a 256K-vocabulary model makes the biggest activation of a training step: the
float32 logits [B, T, V] (16.8 GB for 8 x 2048 tokens), kept for the backward pass together with
their gradient. `head_loss_sums` never makes them whole. It walks the sequence U = `chunk` tokens
at a time (a `lax.scan`); each chunk makes its logits [B, U, V], reduces them to the loss, and
computes its share of the two head gradients there and then: d/dx for the chunk's hidden states
and d/dW added into a float32 accumulator of the (tied) embedding table. The backward pass only
scales these by the incoming cotangent (a `jax.custom_vjp`), so nothing is recomputed: the FLOPs
are those of the unfused head, and memory holds one chunk's logits instead of all of them.

Under a mesh the accumulator keeps one [V, D] partial sum per batch shard ([P, V, D], P over the
batch mesh axes), so the head gradient is reduced across devices once per step, as in the unfused
loss, not once per chunk.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from gemma_jax.layers import soft_cap
from gemma_jax.sharding import constrain, shard_count


def token_loss_sums(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                    ) -> tuple[jax.Array, jax.Array]:
  """Float32 cross-entropy and top-1 hits summed over tokens where `mask_BT` is 1.

  Returns `(loss_sum, correct_sum)`; divide by `mask_BT.sum()` for per-token means. A hit is a
  target whose logit equals the row's maximum, so the maximum that stabilises the logsumexp also
  scores accuracy: one pass over the [B, T, V] logits fewer than an argmax (ties count as hits).
  """
  loss_BT, correct_BT, _, _ = _token_stats(logits_BTV.astype(jnp.float32), targets_BT)
  mask_BT = mask_BT.astype(jnp.float32)
  return jnp.sum(loss_BT * mask_BT), jnp.sum(correct_BT * mask_BT)


def sequence_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array, mask_BT: jax.Array,
                      ) -> tuple[jax.Array, jax.Array]:
  """Float32 log-probability of each row's targets where `mask_BT` is 1, summed per row, and
  the number of those targets: `(logp_B, count_B)` (the sequence scores of preference losses)."""
  mask_BT = mask_BT.astype(jnp.float32)
  return jnp.sum(token_logprobs(logits_BTV, targets_BT) * mask_BT, axis=-1), jnp.sum(mask_BT,
                                                                                   axis=-1)


def token_logprobs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """Float32 log-probability of each target under the logits: log_softmax gathered, [B, T]."""
  return -_token_stats(logits_BTV.astype(jnp.float32), targets_BT)[0]


def _token_stats(logits_BTV, targets_BT):
  """Per-token cross-entropy and hit (1.0 / 0.0) of float32 logits, with exp(logits - max) and
  its row sums, from which the gradient in the logits is exp / sum - one_hot(target)."""
  max_BT = jax.lax.stop_gradient(jnp.max(logits_BTV, axis=-1))
  exp_BTV = jnp.exp(logits_BTV - max_BT[..., None])
  sum_BT = jnp.sum(exp_BTV, axis=-1)
  target_logit_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  loss_BT = max_BT + jnp.log(sum_BT) - target_logit_BT
  return loss_BT, (target_logit_BT >= max_BT).astype(jnp.float32), exp_BTV, sum_BT


def head_loss_sums(x_BTD: jax.Array, table_VD: jax.Array, targets_BT: jax.Array,
                   mask_BT: jax.Array, *, chunk: int, cap: float | None = None,
                   ) -> tuple[jax.Array, jax.Array]:
  """`token_loss_sums(soft_cap(x_BTD @ table_VD.T, cap), ...)`, `chunk` tokens of T at a time.

  x_BTD: final-normed hidden states (`Transformer(..., return_hidden=True)`); table_VD: the tied
  embedding table in the compute dtype. Matmuls run in that dtype with float32 accumulation; the
  softmax and loss are float32. T need not divide by `chunk` (the tail is padded and masked).
  Differentiable in x_BTD, table_VD and mask_BT.
  """
  if chunk < 1:
    raise ValueError(f'head_loss_sums: chunk={chunk} must be >= 1.')
  B, T, D = x_BTD.shape
  U = min(chunk, T)
  pad = -T % U
  if pad:
    x_BTD = jnp.pad(x_BTD, ((0, 0), (0, pad), (0, 0)))
    targets_BT = jnp.pad(targets_BT, ((0, 0), (0, pad)))
    mask_BT = jnp.pad(mask_BT, ((0, 0), (0, pad)))
  n = (T + pad) // U
  table_VD = constrain(table_VD, ('vocab', None))  # gathered once, before the loop
  # [B, n*U, ...] -> [n, B, U, ...]: the scan walks n; rows keep their batch sharding.
  chunks = lambda a: jnp.swapaxes(a.reshape(B, n, U, *a.shape[2:]), 0, 1)
  return _fused_head_loss(cap, chunks(x_BTD), table_VD, chunks(targets_BT),
                          chunks(mask_BT.astype(jnp.float32)))


def _scan_chunks(cap, x_nBUD, table_VD, targets_nBU, mask_nBU, with_grads: bool):
  """Loss and hits per token [n, B, U]; with grads also d(loss_sum)/dx [n,B,U,D] and /dW [V,D]."""
  n, B, U, D = x_nBUD.shape
  V = table_VD.shape[0]
  P = shard_count('batch', B)  # one accumulator per batch shard: no reduction inside the loop

  def body(dtable_PVD, xs):
    x_BUD, targets_BU, mask_BU = xs
    z_BUV = jnp.einsum('BUD,VD->BUV', x_BUD, table_VD, preferred_element_type=jnp.float32)
    logits_BUV = constrain(soft_cap(z_BUV, cap), ('batch', 'length', 'vocab'))
    # One exp serves the loss and its gradient.
    loss_BU, correct_BU, exp_BUV, sum_BU = _token_stats(logits_BUV, targets_BU)
    if not with_grads:
      return dtable_PVD, (loss_BU, correct_BU, None)
    hit_BUV = jnp.arange(V, dtype=targets_BU.dtype) == targets_BU[..., None]
    d_BUV = (exp_BUV * (1.0 / sum_BU)[..., None] - hit_BUV) * mask_BU[..., None]
    if cap is not None:  # d/dz of cap * tanh(z / cap) = 1 - tanh^2
      d_BUV = d_BUV * (1.0 - jnp.square(logits_BUV / cap))
    d_BUV = d_BUV.astype(x_BUD.dtype)
    dx_BUD = jnp.einsum('BUV,VD->BUD', d_BUV, table_VD,
                        preferred_element_type=jnp.float32).astype(x_BUD.dtype)
    d_PbUV = d_BUV.reshape(P, B // P, U, V)
    x_PbUD = x_BUD.reshape(P, B // P, U, D)
    dtable_PVD += jnp.einsum('PbUV,PbUD->PVD', d_PbUV, x_PbUD,
                             preferred_element_type=jnp.float32)
    return constrain(dtable_PVD, ('batch', 'vocab', None)), (loss_BU, correct_BU, dx_BUD)

  init = jnp.zeros((P, V, D) if with_grads else (), jnp.float32)
  if with_grads:
    init = constrain(init, ('batch', 'vocab', None))
  dtable_PVD, (loss_nBU, correct_nBU, dx_nBUD) = jax.lax.scan(
      body, init, (x_nBUD, targets_nBU, mask_nBU))
  loss_sum = jnp.sum(loss_nBU * mask_nBU)
  correct_sum = jnp.sum(correct_nBU * mask_nBU)
  grads = (dx_nBUD, jnp.sum(dtable_PVD, axis=0), loss_nBU) if with_grads else None
  return (loss_sum, correct_sum), grads


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_head_loss(cap, x_nBUD, table_VD, targets_nBU, mask_nBU):
  return _scan_chunks(cap, x_nBUD, table_VD, targets_nBU, mask_nBU, with_grads=False)[0]


def _fused_head_loss_fwd(cap, x_nBUD, table_VD, targets_nBU, mask_nBU):
  sums, grads = _scan_chunks(cap, x_nBUD, table_VD, targets_nBU, mask_nBU, with_grads=True)
  return sums, (grads, table_VD, targets_nBU)  # the last two only for their dtype and shape


def _fused_head_loss_bwd(cap, residuals, cotangents):
  del cap
  (dx_nBUD, dtable_VD, loss_nBU), table_VD, targets_nBU = residuals
  g = cotangents[0]  # the hit count has no gradient
  return ((g * dx_nBUD).astype(dx_nBUD.dtype), (g * dtable_VD).astype(table_VD.dtype),
          np.zeros(targets_nBU.shape, jax.dtypes.float0), g * loss_nBU)


_fused_head_loss.defvjp(_fused_head_loss_fwd, _fused_head_loss_bwd)
