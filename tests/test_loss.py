"""gemma_jax.loss: the head-fused chunked loss equals the unfused one, values and gradients, and
never holds the whole [B, T, V] logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gemma_jax import loss
from gemma_jax.layers import soft_cap

B, T, D, V = 3, 13, 8, 37


def _inputs(dtype=jnp.float32):
  k = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(k[0], (B, T, D), dtype)
  table = jax.random.normal(k[1], (V, D), dtype)
  targets = jax.random.randint(k[2], (B, T), 0, V)
  best = jnp.argmax(jnp.einsum('BTD,VD->BTV', x, table), axis=-1)
  targets = jnp.where(jnp.arange(T) % 2 == 0, best, targets)  # some top-1 hits to count
  mask = (jax.random.uniform(k[3], (B, T)) > 0.3).astype(jnp.float32)
  return x, table, targets, mask


def _unfused(cap):
  def f(x, table, targets, mask):
    logits = jnp.einsum('BTD,VD->BTV', x, table, preferred_element_type=jnp.float32)
    return loss.token_loss_sums(soft_cap(logits, cap), targets, mask)
  return f


@pytest.mark.parametrize('cap', [None, 5.0])
@pytest.mark.parametrize('chunk', [1, 4, 13, 64])  # T = 13: padded tail, exact, one short chunk
def test_fused_head_loss_equals_unfused_values_and_gradients(cap, chunk):
  x, table, targets, mask = _inputs()
  fused = lambda x, table, targets, mask: loss.head_loss_sums(x, table, targets, mask,
                                                               chunk=chunk, cap=cap)
  want, got = _unfused(cap)(x, table, targets, mask), jax.jit(fused)(x, table, targets, mask)
  np.testing.assert_allclose(got[0], want[0], rtol=1e-6)  # loss sum
  assert float(got[1]) == float(want[1]) > 0  # top-1 hits

  def grads(f):  # a non-unit cotangent: the backward pass must scale what the forward stored
    return jax.jit(jax.grad(lambda x, w, m: 0.37 * f(x, w, targets, m)[0], argnums=(0, 1, 2)))(
        x, table, mask)

  for g_got, g_want in zip(grads(fused), grads(_unfused(cap))):
    assert float(jnp.abs(g_want).max()) > 0
    np.testing.assert_allclose(g_got, g_want, rtol=1e-5, atol=1e-6)


def test_fused_head_loss_in_bfloat16_keeps_dtypes_and_is_close():
  x, table, targets, mask = _inputs(jnp.bfloat16)
  f = lambda x, w: loss.head_loss_sums(x, w, targets, mask, chunk=4, cap=5.0)[0]
  value, (dx, dw) = jax.value_and_grad(f, argnums=(0, 1))(x, table)
  assert dx.dtype == dw.dtype == jnp.bfloat16 and value.dtype == jnp.float32
  f32 = lambda x, w: _unfused(5.0)(x, w, targets, mask)[0]
  want, (want_dx, want_dw) = jax.value_and_grad(f32, argnums=(0, 1))(
      x.astype(jnp.float32), table.astype(jnp.float32))
  np.testing.assert_allclose(value, want, rtol=1e-2)
  np.testing.assert_allclose(dx.astype(jnp.float32), want_dx, atol=2e-2 * np.abs(want_dx).max())
  np.testing.assert_allclose(dw.astype(jnp.float32), want_dw, atol=2e-2 * np.abs(want_dw).max())


def test_fused_head_loss_never_holds_the_whole_logits():
  """XLA's own buffer plan for value_and_grad: the unfused loss needs at least the [B, T, V]
  float32 logits; the fused one stays under half of them (one chunk's logits and gradient)."""
  b, t, d, v = 4, 512, 64, 8192
  args = (jax.ShapeDtypeStruct((b, t, d), jnp.float32), jax.ShapeDtypeStruct((v, d), jnp.float32),
          jax.ShapeDtypeStruct((b, t), jnp.int32), jax.ShapeDtypeStruct((b, t), jnp.float32))
  logits_bytes = b * t * v * 4

  def temp_bytes(f):
    compiled = jax.jit(jax.value_and_grad(f, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes

  unfused = temp_bytes(lambda *a: _unfused(None)(*a)[0])
  fused = temp_bytes(lambda *a: loss.head_loss_sums(*a, chunk=64)[0])
  assert unfused >= logits_bytes
  assert fused < logits_bytes / 2


def test_chunk_must_be_positive():
  with pytest.raises(ValueError, match='chunk=0'):
    loss.head_loss_sums(*_inputs(), chunk=0)
