"""Properties of one attention layer: the mask rules by position (causal, window, segments,
padding), cached decoding == uncached forward, the LOCAL ring buffer, grouped-query == multi-head
with repeated k/v, and the logit soft-cap. Small float32 layers, called eagerly."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gemma_jax.attention import Attention, init_layer_cache, layer_cache_length
from gemma_jax.config import AttentionType, ModelConfig

G, LO = AttentionType.GLOBAL, AttentionType.LOCAL
WINDOW = 4
CFG = ModelConfig(name='attn-test', num_layers=1, embed_dim=16, hidden_dim=32, num_heads=4,
                  head_dim=8, num_kv_heads=2, vocab_size=32, attention_types=(G,),
                  sliding_window=WINDOW, use_qk_norm=True, rope_base_local=10.0,
                  rope_base_global=100.0)


def _layer(attn_type, config=CFG, seed=0):
  """An Attention layer with random weights, QK-norm scales included (not left at zero)."""
  attn = Attention(config, attn_type, rngs=nnx.Rngs(seed))
  if config.use_qk_norm:
    rng = np.random.default_rng(seed)
    for norm in (attn._query_norm, attn._key_norm):
      norm.scale.set_value(jnp.asarray(rng.normal(0, 0.5, norm.scale.shape), jnp.float32))
  return attn


def _x(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def _allowed(pos, seg, window):
  """allowed[k, p]: the documented rule, query p sees key k (numpy, by position)."""
  pos, seg = np.asarray(pos), np.asarray(seg)
  qp, kp = pos[None, :], pos[:, None]
  ok = (seg[:, None] == seg[None, :]) & (seg[:, None] != 0) & (kp <= qp)
  if window is not None:
    ok &= qp - kp < window
  return ok


# (attention type, positions, segment ids) over T = 10 tokens of one row.
MASK_CASES = {
    'causal': (G, list(range(10)), [1] * 10),
    'window': (LO, list(range(10)), [1] * 10),
    'packed_with_trailing_padding': (G, [0, 1, 2, 0, 1, 2, 3, 0, 0, 0],
                                     [1, 1, 1, 2, 2, 2, 2, 0, 0, 0]),
    'left_padded_packed_window': (LO, [0, 0, 0, 1, 2, 3, 4, 0, 1, 2],
                                  [0, 0, 1, 1, 1, 1, 1, 2, 2, 2]),
}


@pytest.mark.parametrize('case', list(MASK_CASES))
def test_changing_a_key_outside_the_allowed_set_never_changes_an_output(case):
  """Perturbing token k changes output p iff the rule lets p see k (or k == p)."""
  attn_type, pos, seg = MASK_CASES[case]
  attn = _layer(attn_type)
  T = len(pos)
  x_TD = _x((T, CFG.embed_dim))
  # Row 0 unperturbed; row 1 + k perturbs token k only: one call measures every influence.
  noise = _x((T, CFG.embed_dim), seed=1)
  xs = jnp.concatenate([x_TD[None], x_TD[None] + jnp.eye(T)[:, :, None] * noise[None]])
  pos_BT = jnp.broadcast_to(jnp.asarray(pos, jnp.int32), (T + 1, T))
  seg_BT = jnp.broadcast_to(jnp.asarray(seg, jnp.int32), (T + 1, T))
  out, cache, _ = attn(xs, pos_BT, seg_BT)
  assert cache is None
  diff_KP = np.abs(np.asarray(out[1:] - out[:1])).max(-1)
  allowed = _allowed(pos, seg, attn.window) | np.eye(T, dtype=bool)
  real = np.asarray(seg) != 0  # padding queries see nothing; their output is unspecified
  assert diff_KP[:, real][~allowed[:, real]].max(initial=0.0) <= 1e-6
  assert diff_KP[:, real][allowed[:, real]].min() > 1e-4


def _run_cached(attn, x_BTD, pos_BT, seg_BT, chunks, cache_length):
  """Feeds the row in chunks through a fresh cache; returns (outputs [B,T,D], final cache)."""
  B = x_BTD.shape[0]
  cache = init_layer_cache(CFG, attn.attn_type, B, cache_length, jnp.float32)
  outs, start = [], 0
  for n in chunks:
    sl = slice(start, start + n)
    out, cache, _ = attn(x_BTD[:, sl], pos_BT[:, sl], seg_BT[:, sl], cache,
                      jnp.asarray(start, jnp.int32))
    outs.append(out)
    start += n
  return jnp.concatenate(outs, axis=1), cache


def _left_padded_batch(total=11, pad=2):
  """Row 0 full, row 1 left-padded by `pad` (segment 0, position 0), as the sampler lays rows."""
  seg = np.ones((2, total), np.int32)
  seg[1, :pad] = 0
  pos = np.stack([np.arange(total), np.maximum(np.arange(total) - pad, 0)]).astype(np.int32)
  return _x((2, total, CFG.embed_dim), seed=3), jnp.asarray(pos), jnp.asarray(seg)


@pytest.mark.parametrize('attn_type', [G, LO])
def test_cached_decoding_equals_uncached_forward(attn_type):
  """Prefill (3), a chunk longer than the window (6 > 4), then one-token steps == one forward."""
  attn = _layer(attn_type)
  x, pos, seg = _left_padded_batch()
  full, _, _ = attn(x, pos, seg)
  cached, _ = _run_cached(attn, x, pos, seg, chunks=(3, 6, 1, 1), cache_length=16)
  real = np.asarray(seg) != 0
  np.testing.assert_allclose(np.asarray(cached)[real], np.asarray(full)[real], rtol=1e-5,
                             atol=1e-5)


def test_local_chunk_longer_than_the_window_sees_itself():
  """A first chunk of 7 tokens into a 4-slot ring equals the uncached forward on every token."""
  attn = _layer(LO)
  x, pos, seg = _left_padded_batch(total=7, pad=0)
  full, _, _ = attn(x, pos, seg)
  cached, cache = _run_cached(attn, x, pos, seg, chunks=(7,), cache_length=16)
  np.testing.assert_allclose(cached, full, rtol=1e-5, atol=1e-5)
  assert cache['k'].shape[1] == WINDOW


def test_layer_cache_length_and_empty_cache():
  """GLOBAL keeps cache_length slots, LOCAL min(window, cache_length); empty slots have pos -1."""
  assert layer_cache_length(CFG, G, 16) == 16
  assert layer_cache_length(CFG, LO, 16) == WINDOW
  assert layer_cache_length(CFG, LO, 3) == 3
  c = init_layer_cache(CFG, LO, 2, 16, jnp.bfloat16)
  assert c['k'].shape == c['v'].shape == (2, WINDOW, CFG.num_kv_heads, CFG.head_dim)
  assert c['k'].dtype == jnp.bfloat16 and not np.asarray(c['k'], np.float32).any()
  np.testing.assert_array_equal(c['pos'], -np.ones((2, WINDOW)))


def test_local_ring_buffer_keeps_only_the_window():
  """After each chunk the ring holds exactly the newest `window` tokens, token i in slot i % S."""
  attn = _layer(LO)
  x, pos, seg = _left_padded_batch(total=11, pad=2)
  kpos = np.where(np.asarray(seg) != 0, np.asarray(pos), -1)  # padding is stored as -1
  cache = init_layer_cache(CFG, LO, 2, 16, jnp.float32)
  start = 0
  for n in (3, 6, 1, 1):
    sl = slice(start, start + n)
    _, cache, _ = attn(x[:, sl], pos[:, sl], seg[:, sl], cache, jnp.asarray(start, jnp.int32))
    start += n
    expected = np.full((2, WINDOW), -1)
    for i in range(max(0, start - WINDOW), start):
      expected[:, i % WINDOW] = kpos[:, i]
    np.testing.assert_array_equal(cache['pos'], expected)
  assert cache['k'].shape == (2, WINDOW, CFG.num_kv_heads, CFG.head_dim)


@pytest.mark.parametrize('attn_type', [G, LO])
def test_grouped_query_equals_multi_head_with_repeated_kv(attn_type):
  """K=2 kv heads for N=4 queries == fused N=K=4 attention whose k/v heads repeat per group."""
  gqa = _layer(attn_type)
  mha = _layer(attn_type, CFG.replace(num_kv_heads=CFG.num_heads), seed=5)
  assert mha.config.fused_qkv and not gqa.config.fused_qkv
  group = CFG.num_heads // CFG.num_kv_heads
  kv = gqa.kv_einsum.w[...]  # [2, K, D, H]; query head n reads kv head n // group
  mha.qkv_einsum.w.set_value(jnp.stack([gqa.q_einsum.w[...],
                                        jnp.repeat(kv[0], group, axis=0),
                                        jnp.repeat(kv[1], group, axis=0)]))
  mha.attn_vec_einsum.w.set_value(gqa.attn_vec_einsum.w[...])
  mha._query_norm.scale.set_value(gqa._query_norm.scale[...])
  mha._key_norm.scale.set_value(gqa._key_norm.scale[...])
  _, pos, seg = MASK_CASES['left_padded_packed_window']
  x = _x((1, len(pos), CFG.embed_dim), seed=7)
  pos, seg = jnp.asarray([pos]), jnp.asarray([seg])
  np.testing.assert_allclose(gqa(x, pos, seg)[0], mha(x, pos, seg)[0], rtol=1e-5, atol=1e-6)


def _probe_probs(cap, scale=32.0):
  """Attention weights [T, S] read off a 1-head layer built so that out[t] == probs[t].

  Token t is scale * e_t, v = x / scale = e_t and the output projection is the identity, so the
  output row t is the softmax row of query t; `scale` makes the raw logits large.
  """
  D = 8
  config = ModelConfig(name='cap', num_layers=1, embed_dim=D, hidden_dim=16, num_heads=1,
                       head_dim=D, num_kv_heads=1, vocab_size=8, attention_types=(G,),
                       attn_logits_soft_cap=cap)
  attn = Attention(config, G, rngs=nnx.Rngs(0))
  rng = np.random.default_rng(0)
  wq, wk = rng.normal(size=(2, D, D)) / np.sqrt(D)
  attn.qkv_einsum.w.set_value(jnp.asarray(
      np.stack([wq, wk, np.eye(D) / scale])[:, None], jnp.float32))
  attn.attn_vec_einsum.w.set_value(jnp.eye(D, dtype=jnp.float32)[None])
  x = jnp.eye(D, dtype=jnp.float32)[None] * scale
  out, _, _ = attn(x, jnp.arange(D)[None], jnp.ones((1, D), jnp.int32))
  return np.asarray(out[0], np.float64)


@pytest.mark.parametrize('cap', [None, 2.0])
def test_logit_soft_cap_bounds_logits(cap):
  """With cap c every visible logit lies in (-c, c): weights of one row differ by < exp(2c)."""
  probs = _probe_probs(cap)
  T = probs.shape[0]
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  assert not probs[np.triu_indices(T, 1)].any()  # future keys get exactly zero weight
  with np.errstate(divide='ignore'):  # uncapped weights may underflow to 0: spread inf
    spread = max(np.log(p[:t + 1].max()) - np.log(p[:t + 1].min()) for t, p in enumerate(probs))
  if cap is None:
    assert spread > 2 * 2.0  # the probe's raw logits really do exceed the cap used below
  else:
    assert spread < 2 * cap
